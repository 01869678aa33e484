"""The study's figures (PNG, matplotlib's Agg backend) and report.md, drawn from summary.json alone.

Every number in report.md is formatted by :func:`cell` / :func:`number` from a value in the
summary, so the tests can check each table cell against the metrics files it came from.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from captioning.files import atomic_write
from captioning.study.collect import GROUNDING_KINDS
from captioning.study.runs import ARMS
from captioning.study.stats import welch

COLORS = {"none": "tab:gray", "soft": "tab:blue", "hard": "tab:orange", "hard-arctic": "tab:red",
          "hard-arctic-le0": "tab:pink", "hard-arctic-frozen": "tab:brown", "none-frozen": "tab:cyan",
          "hard-frozen": "gold", "hard-loo": "tab:green",
          "hard-image": "tab:olive"}
#: The metrics each arm is tested on against the control and against soft attention (here and in the docs).
TESTED = (("bleu_4", "BLEU-4"), ("cider", "CIDEr"), ("caption_accuracy", "caption accuracy"))
SIGNAL_BINS = 30  # training-signal series are averaged in this many equal step bins per seed
PM = "±"


# ------------------------------------------------------------------------------ formatting


def number(value: float | None, decimals: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{decimals}f}"


def p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def cell(agg: dict | None, decimals: int = 1, runs: int | None = None) -> str:
    """An aggregate as "mean ± std" (the mean alone for one value, "n/a" when not measured), with
    "(n=k)" when only k of the ``runs`` runs measured it (e.g. grounding needs object words)."""
    if agg is None:
        return "n/a"
    text = number(agg["mean"], decimals)
    if agg["std"] is not None:
        text += f" {PM} {number(agg['std'], decimals)}"
    if runs is not None and agg["n"] < runs:
        text += f" (n={agg['n']})"
    return text


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


# ------------------------------------------------------------------------------ figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, labelled: Sequence[tuple], path: Path, **legend) -> None:
    """Each (axes, x label) labelled, gridded and with a legend where it has lines; the figure -> ``path``."""
    for ax, xlabel in labelled:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _band(ax, x: np.ndarray, ys: np.ndarray, label: str, color: str, linestyle: str = "-") -> None:
    """Mean over seeds (rows of ys) as a line, mean ± sample std shaded; NaN ignored, std 0 where
    fewer than two rows have a value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns and single-value columns
        mean = np.nanmean(ys, axis=0)
        std = np.nan_to_num(np.nanstd(ys, axis=0, ddof=1))
    ax.plot(x, mean, color=color, linestyle=linestyle, marker="o" if len(x) <= 40 else None, markersize=3,
            label=f"{label} (n={ys.shape[0]})")
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.25, linewidth=0)


def _color(arm: str) -> str:
    return COLORS.get(arm, "tab:purple")


def _curves(runs: list[dict], arm: str, key: str):
    """Validation curves of one arm, aligned by validation index (truncated to the shortest)."""
    curves = [r["curve"] for r in runs if r["arm"] == arm and r["curve"] and r["curve"].get(key)]
    if not curves:
        return None
    n = min(len(c["step"]) for c in curves)
    steps = np.array(curves[0]["step"][:n], dtype=float)
    ys = np.array([c[key][:n] for c in curves], dtype=float)
    times = [c["elapsed_s"][:n] for c in curves if c["elapsed_s"]]
    wall = np.mean(np.array(times, dtype=float), axis=0) if len(times) == len(curves) else None
    return steps, wall, ys


def learning_curves(summary: dict, path: Path) -> bool:
    """Validation BLEU-4 (and CIDEr when logged) against steps and wall time; False if no run has logs."""
    runs = summary["runs"]
    keys = [k for k in ("bleu_4", "cider") if any(_curves(runs, a, k) for a in summary["arms"])]
    if not keys:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 4 * len(keys)), squeeze=False)
    target = summary["target"]["val_bleu_4"]
    for row, key in zip(axes, keys):
        title = {"bleu_4": "validation BLEU-4", "cider": "validation CIDEr"}[key]
        for arm in summary["arms"]:
            got = _curves(runs, arm, key)
            if got is None:
                continue
            steps, wall, ys = got
            _band(row[0], steps, ys, arm, _color(arm))
            if wall is not None:
                _band(row[1], wall, ys, arm, _color(arm))
        for ax in row:
            if key == "bleu_4" and target is not None:
                ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"target {target:.1f}")
            ax.set_ylabel(f"{title} (0-100)")
        row[0].set_title(f"{title} vs steps (mean {PM} std over seeds)")
        row[1].set_title(f"{title} vs wall time")
    xlabels = ("training step", "wall time (s, mean over seeds)")
    _save(fig, [(ax, xlabel) for row in axes for ax, xlabel in zip(row, xlabels)], path, loc="lower right")
    return True


def _binned(series: list[dict], max_step: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed means in SIGNAL_BINS equal step bins -> (bin centres, [seeds, bins] with NaN where empty)."""
    edges = np.linspace(0, max_step + 1, SIGNAL_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    out = np.full((len(series), SIGNAL_BINS), np.nan)
    for i, s in enumerate(series):
        steps, values = np.array(s["step"], dtype=float), np.array(s["value"], dtype=float)
        which = np.clip(np.digitize(steps, edges) - 1, 0, SIGNAL_BINS - 1)
        for b in range(SIGNAL_BINS):
            if np.any(which == b):
                out[i, b] = values[which == b].mean()
    return centres, out


def _signal(ax, runs: list[dict], arm: str, key: str, label: str, linestyle: str = "-") -> None:
    """One arm's training-signal series ``key``, binned by step, as a band (nothing where it has none)."""
    series = [r["signal"][key] for r in runs if r["arm"] == arm and key in r["signal"]]
    if series:
        centres, binned = _binned(series, max(max(s["step"]) for s in series))
        keep = ~np.all(np.isnan(binned), axis=0)
        _band(ax, centres[keep], binned[:, keep], label, _color(arm), linestyle)


def training_signal(summary: dict, path: Path) -> bool:
    """Attention entropy (train, and test by word position), baseline and REINFORCE signal variance."""
    runs = summary["runs"]
    if not any(r["signal"] for r in runs) and not summary.get("examples"):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (a, b), (c, d) = axes
    arms = summary["arms"]
    hard_arms = [arm for arm in arms if summary["table"][arm].get("attention") == "hard"]
    for arm in arms:
        _signal(a, runs, arm, "attention_entropy", arm)
    a.set_title("attention entropy per word, training (nats)")
    for arm in hard_arms:
        _signal(b, runs, arm, "baseline", f"{arm}: baseline b")
        _signal(b, runs, arm, "reinforce_cost", f"{arm}: mean cost C_n of sampled captions", "--")
    b.set_title("hard: REINFORCE baseline and cost")
    for arm in hard_arms:
        _signal(c, runs, arm, "reinforce_signal_sq", f"{arm}: with baseline, mean (lambda_r (C_n - b))^2")
        _signal(c, runs, arm, "reinforce_signal_sq_no_baseline", f"{arm}: without, mean (lambda_r C_n)^2", "--")
        _signal(c, runs, arm, "reinforce_signal_var", f"{arm}: var of lambda_r C_n over the batch", ":")
    c.set_title("hard: REINFORCE signal, with and without the baseline")
    if c.lines:
        c.set_yscale("log")
    examples = summary.get("examples") or {}
    for arm in arms:
        rows = [v for name, v in (examples.get("entropy_by_position") or {}).items()
                if any(r["name"] == name and r["arm"] == arm for r in runs)]
        if rows:
            n = min(len(v) for v in rows)
            if n:
                _band(d, np.arange(1, n + 1), np.array([v[:n] for v in rows], dtype=float), arm, _color(arm))
    if examples.get("uniform_entropy"):
        d.axhline(examples["uniform_entropy"], color="gray", linestyle=":", label="uniform over the grid")
    d.set_title("attention entropy by word position, test (nats)")
    _save(fig, [(a, "training step"), (b, "training step"), (c, "training step"), (d, "word position")], path,
          fontsize=8)
    return True


# ------------------------------------------------------------------------------ report.md


def write_report(summary: dict, out_dir: Path) -> Path:
    """report.md in ``out_dir`` (figures in out_dir/figures), from ``summary`` alone."""
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    has_curves = learning_curves(summary, figures / "learning_curves.png")
    has_signal = training_signal(summary, figures / "training_signal.png")
    study, table, metrics = summary["study"], summary["table"], summary["metrics"]
    arms = summary["arms"]
    first_eval = summary["runs"][0]["eval"]["expected"]
    caption_keys, other_keys = metrics[:7], metrics[7:]
    target = summary["target"]["val_bleu_4"]
    lines: list[str] = ["# No attention, soft and hard attention", ""]
    counts = ", ".join(f"{a} ({table[a]['runs']} run{'s' if table[a]['runs'] != 1 else ''})" for a in arms)
    source = "given checkpoints" if study["checkpoints_given"] else "trained by this study with identical settings"
    decode = study["decode"]
    lines += [
        f"Arms: {counts}; {source}, each "
        f"evaluated by `captioning evaluate` on the same {decode['split']} split ({first_eval['num_images']} images) "
        f"with the same decoder settings: beam size {decode['beam_size']}, at most {decode['max_len']} words; "
        "a hard model attends with the expected alpha (its default) unless said otherwise. "
        f"Metrics on a 0-100 scale (CIDEr-D, natively 0-10, x100); mean {PM} sample standard deviation over runs. "
        "Every number here is in `summary.json`, collected from the files named there.",
        "",
    ]
    if study.get("arms"):
        lines += [f"- `{arm}`: {about}" for arm, about in study["arms"].items() if arm in arms] + [""]
    if study.get("budget"):
        lines += [f"Budget: `{study['budget']}` (`--budget`; its settings and why are under Settings).", ""]
    lines += ["Regenerate (reruns skip finished runs):", "", "```bash", study["command"], "```", "", "## Results", ""]
    lines += md_table(["arm", "runs"] + [title for _, title in caption_keys],
                      [[a, str(table[a]["runs"])] + [cell(table[a][k], 1, table[a]["runs"]) for k, _ in caption_keys]
                       for a in arms])
    lines += [""]
    target_text = number(target)
    lines += md_table(
        ["arm"] + [title for _, title in other_keys]
        + ["training time (s)", "training steps", f"steps to val BLEU-4 >= {target_text}",
           f"time to val BLEU-4 >= {target_text} (s)"],
        [[a] + [cell(table[a][k], 1, table[a]["runs"]) for k, _ in other_keys]
         + [cell(table[a][k], 0, table[a]["runs"])
            for k in ("train_seconds", "global_step", "steps_to_target", "seconds_to_target")]
         for a in arms])
    reached = ", ".join(f"{a} {table[a]['reached_target']} of {table[a]['runs']}" for a in arms)
    lines += [
        "",
        f"Training time: `train_seconds` of the training run's `metrics.json` (data loading, training and the validation "
        f"after every epoch). Fixed quality: validation BLEU-4 (greedy decoding, logged after every epoch) of "
        f"{target_text}, which is {summary['target']['rule']}; steps and wall time to the first validation at or "
        f"above it (runs that reached it: {reached}). Pointing game and mass in box here score the nouns "
        "(see Grounding by word kind); they read n/a when the metrics files hold no grounding metrics.",
        "",
    ]
    lines += _control_text(summary)
    lines += [""] + _significance_text(summary)
    lines += ["", "Each run:", ""]
    lines += md_table(
        ["run", "seed", "BLEU-4", "CIDEr", "caption accuracy", "training time (s)", "steps to target",
         "best val BLEU-4", "metrics file"],
        [[r["name"], str(r["seed"])] + [number(r["eval"]["expected"]["values"].get(k)) for k, _ in TESTED]
         + [number(r["train_seconds"], 0), str((r["to_target"] or {}).get("step", "n/a")), number(r["best_val_bleu_4"]),
            f"`{r['eval']['expected']['file']}`"] for r in summary["runs"]])

    lines += ["", "## Grounding by word kind", ""]
    lines += _grounding_text(summary)

    lines += ["", "## Learning curves", ""]
    if has_curves:
        lines += ["Validation BLEU-4 after every epoch against training steps and against wall time since the "
                  f"start of training (mean over seeds as the line, mean {PM} std shaded; curves aligned by "
                  "validation index; wall time is the mean over seeds).", "",
                  "![learning curves](figures/learning_curves.png)"]
    else:
        lines += ["n/a: none of the runs has a training log (`logs/metrics.csv`) beside its checkpoint."]

    lines += ["", "## Training signal", ""]
    lines += _signal_text(summary)
    if has_signal:
        lines += ["", "![training signal](figures/training_signal.png)"]

    lines += ["", "## Attention maps: the same test images, soft and hard", ""]
    examples = (summary.get("examples") or {}).get("examples") or []
    if examples:
        lines += ["Each figure: the soft model's caption (left) and the hard model's (right), one panel per word "
                  "with that word's attention upsampled and smoothed over the image (the paper's Figs. 2-3). "
                  "Decoded with the study's decoder settings; the hard model attends with the expected alpha.", ""]
        for ex in examples:
            lines += [f"Test image {ex['image_id']}: soft ({ex['soft']['run']}): \"{ex['soft']['caption']}\"; "
                      f"hard ({ex['hard']['run']}): \"{ex['hard']['caption']}\"", "",
                      f"![attention, image {ex['image_id']}]({ex['figure']})", ""]
    else:
        lines += ["n/a: no examples were decoded.", ""]

    lines += ["## Hard attention at test time: expected, argmax and sampled locations", ""]
    hm = summary["hard_modes"]
    lines += ["The same hard checkpoints decoded three ways (`captioning evaluate --hard-mode`): the expected context "
              "sum_i alpha_i a_i (the authors' default), the single most likely location, and a location sampled "
              "from alpha at every step (seeded per run). Grounding: nouns, scored on the attention the decoder "
              "used (argmax: that one cell; sample: in expectation over the draw).", ""]
    rows = [[f"{arm} {mode}"] + [cell(hm[arm][mode][k], 1, table[arm]["runs"]) for k, _ in metrics]
            for arm in hm for mode in hm[arm]]
    lines += md_table(["hard arm, mode"] + [title for _, title in metrics], rows) if rows else ["n/a: no hard arm."]

    lines += ["", "## Settings", ""]
    lines += _settings_text(summary)
    path = out_dir / "report.md"
    atomic_write(path, "\n".join(lines).rstrip() + "\n")
    return path


def _control_text(summary: dict) -> list[str]:
    """Each arm against the no-attention control: the difference of the means and the seed spread."""
    table = summary["table"]
    if "none" not in table:
        return ["No no-attention control among the runs: what attention adds is not measured here."]
    rows = []
    for arm in summary["arms"]:
        if arm == "none":
            continue
        row = [arm]
        for key, _ in TESTED:
            mine, ctrl = table[arm].get(key), table["none"].get(key)
            if mine is None or ctrl is None:
                row += ["n/a", "n/a"]
                continue
            spread = max(x["std"] or 0.0 for x in (mine, ctrl))
            diff = mine["mean"] - ctrl["mean"]
            row += [f"{diff:+.1f}", f"{number(spread)} ({'beyond' if abs(diff) > spread else 'within'})"]
        rows.append(row)
    head = ["arm"] + [column for _, title in TESTED for column in (f"{title} minus none", "seed spread")]
    return ["Against the no-attention control (difference of the means; the seed spread is the larger sample "
            "standard deviation of the two arms; 'beyond' when the difference exceeds it):", ""] + md_table(head, rows)


def _significance_text(summary: dict) -> list[str]:
    """Welch's t-test of each arm against the control and against soft attention, over seeds."""
    table = summary["table"]
    pairs = [(arm, reference) for reference in ("none", "soft") if reference in table
             for arm in summary["arms"] if arm not in (reference, "none")]  # none vs soft is soft vs none
    # A diagnostic arm against the arm it differs from by one setting (e.g. hard-arctic-le0 vs hard-arctic).
    pairs += [(arm, other) for arm in summary["arms"] if arm in ARMS
              for other in ARMS[arm].versus if other in table and other not in ("none", "soft")]
    rows, single = [], []
    for arm, reference in pairs:
        counts = [len((table[name].get("bleu_4") or {}).get("values", [])) for name in (arm, reference)]
        if min(counts) < 2:  # no test with one run on a side: say so once, not in a row of n/a
            single += [name for name, n in zip((arm, reference), counts) if n < 2 and name not in single]
            continue
        row = [f"{arm} vs {reference}"]
        for key, _ in TESTED:
            mine, ref = table[arm].get(key), table[reference].get(key)
            result = welch(mine["values"], ref["values"]) if mine and ref else None
            row.append("n/a" if result is None else
                       f"{result.difference:+.1f} (t = {result.t:.2f}, df = {result.df:.1f}, p = {p_text(result.p)})")
        rows.append(row)
    # The runs of each arm as collect counts them; a table without that count has its BLEU-4 values.
    counts = [table[arm].get("runs") or len((table[arm].get("bleu_4") or {}).get("values", []))
              for arm in summary["arms"]]
    runs = (f"{min(counts)} to {max(counts)} runs" if min(counts) != max(counts)
            else f"{counts[0]} run{'' if counts[0] == 1 else 's'}")
    text = [
        "Welch's t-test over seeds of each arm against the control, against soft attention and against the arm "
        "it differs from by one setting (difference of the means; two-sided p; n/a where a metric is missing or "
        "neither side varies). "
        "The spread covers the training seed only: initial weights, dropout masks, minibatch order and sampled "
        f"locations; every run trains and is tested on the same data (`data.synthetic.seed`). With {runs} an arm, "
        "only large differences reach p < 0.05.",
        "",
    ]
    note = ([f"Not tested (one run): {', '.join(single)}; their differences are in the table above.", ""]
            if single else [])
    if not rows:
        return text + note + ["n/a: no two arms with 2 runs or more to compare."]
    return text + note + md_table(["comparison"] + [title for _, title in TESTED], rows)


def _grounding_text(summary: dict) -> list[str]:
    """Pointing game and mass in box for nouns, attribute words and the whole phrase, with the uniform map."""
    table = summary["table"]
    rows = []
    for arm in summary["arms"]:
        t = table[arm]
        for _, title, suffix in GROUNDING_KINDS:
            if t.get(f"grounding_words{suffix}") is None:
                continue
            scores = ("pointing_game", "uniform_pointing_game", "mass_in_box", "uniform_mass_in_box")
            rows.append([f"{arm}, {title}"] + [cell(t.get(f"{name}{suffix}"), 1, t["runs"]) for name in scores]
                        + [cell(t.get(f"grounding_words{suffix}"), 0, t["runs"])])
    text = [
        "Does a word's attention map look at the object it describes? Scored against the boxes of the "
        "object's class, on the test captions (`captioning/evaluation/grounding.py`): *nouns* (the shape "
        "noun), *attribute words* (each size or colour word of the noun's phrase, scored against the same "
        "boxes), and the *whole object phrase* (the mean of the maps of its attribute words and noun, scored "
        "as one map). Beside each, what a uniform map scores on the same words: below it, the attention "
        "looks away from the object; above it, at the object. The no-attention control's maps are uniform: its "
        "mass in box equals the reference, and its pointing game (a flat map's maximum is its first cell) means "
        "nothing.",
        "",
    ]
    if not rows:
        return text + ["n/a: the metrics files hold no grounding by word kind."]
    return text + md_table(["arm, word kind", "pointing game", "uniform map", "mass in box", "uniform map", "words"],
                           rows)


def _signal_text(summary: dict) -> list[str]:
    s = summary["signal_summary"]
    lines = [
        "Logged during training by `CaptioningModule` (`logs/metrics.csv`, every `train.log_every` steps): "
        "`train/attention_entropy`, the mean entropy of alpha_t per word in nats (both mechanisms; "
        "a uniform map over the grid has log L); for hard attention, in the minibatches that sampled "
        "locations (the others use the expected context and have no REINFORCE term), the baseline "
        "`train/baseline` b, the mean cost C_n (the caption's NLL per real token), and the learning "
        "signal lambda_r (C_n - b) (b: the baseline, or for `hard-loo` the mean cost of the caption's other draws) that multiplies d log p(s|a)/dW in the REINFORCE estimate: "
        "`train/reinforce_signal_var`, its variance over the minibatch's captions (the part no constant "
        "baseline can remove), and `train/reinforce_signal_sq`, its mean square (variance + squared mean: "
        "what the estimator's variance scales with), beside `train/reinforce_signal_sq_no_baseline`, the mean "
        "square of lambda_r C_n (the same without the baseline). Mean over the first and the last fifth of the "
        "logged points of each run, then mean over runs:",
        "",
    ]
    rows = []
    names = {"attention_entropy": "attention entropy (nats)", "baseline": "baseline b",
             "reinforce_cost": "mean cost C_n", "reinforce_signal_var": "signal variance",
             "reinforce_signal_sq": "signal mean square", "reinforce_signal_sq_no_baseline":
             "signal mean square without the baseline", "reinforce_signal_mean": "signal mean"}
    for arm in summary["arms"]:
        for key, title in names.items():
            part = s.get(arm, {}).get(key)
            if part:
                rows.append([arm, title, f"{cell(part['early'], 4)} (to step {part['early_until_step']})",
                             f"{cell(part['late'], 4)} (from step {part['late_from_step']})"])
    if rows:
        lines += md_table(["arm", "quantity", "early in training", "late in training"], rows)
    else:
        lines += ["n/a: none of the runs has a training log with these keys."]
    examples = summary.get("examples") or {}
    per_word = examples.get("entropy_per_word") or {}
    if per_word:
        lines += ["", f"At test time (first {examples['images']} test images, the study's decoder settings), mean "
                  f"attention entropy per word, nats (uniform over the {examples['locations']} locations: "
                  f"{number(examples['uniform_entropy'], 3)}): "
                  + "; ".join(f"{name} {number(v, 3)}" for name, v in per_word.items()) + "."]
    return lines


def _settings_text(summary: dict) -> list[str]:
    study = summary["study"]
    lines = [f"- Study default `{key}={d['value']}` (applied because no `--config` was given): {d['reason']}"
             for key, d in study["defaults"].items()]
    config_file = f"`{study['config_file']}`" if study["config_file"] else \
        "none (the defaults of captioning/config.py: the synthetic dataset)"
    lines += [f"- Config file: {config_file}",
              f"- Overrides (`--set`, in order): {', '.join('`' + o + '`' for o in study['overrides']) or 'none'}",
              f"- Metrics asked of captioning evaluate: {', '.join(study['metrics'])}"]
    if study["checkpoint_differences"]:
        lines += ["- **The given checkpoints differ in settings beyond attention and seed:** "
                  + "; ".join(study["checkpoint_differences"])]
    decode = summary["runs"][0]["eval"]["expected"]["decode"]
    lines += ["", "Decoder settings, as recorded in the metrics files (first run; every run used the same beam "
              "size and length):", "", "```json", json.dumps(decode, indent=1), "```"]
    config = study.get("config")
    if config:
        lines += ["", "<details><summary>Full config of the runs (attention and seed vary per run)</summary>", "",
                  "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", "", "</details>"]
    lines += ["", "Software and hardware of each invocation of the study on this folder:", ""]
    rows = []
    for inv in study["invocations"]:
        env, hw = inv["environment"], inv["environment"]["hardware"]
        versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
        gpus = ", ".join(hw["gpus"]) or "no GPU"
        did = "interrupted"
        if inv.get("did"):
            did = f"trained {len(inv['did']['trained'])}, evaluated {len(inv['did']['evaluated'])}"
            if inv["did"].get("in_parallel"):
                did += f"; {len(inv['did']['in_parallel'])} runs trained and evaluated in parallel processes"
        rows.append([inv["started"], f"{hw['cpu']} ({hw['cpu_cores']} cores), {hw['memory_gib']} GiB, {gpus}",
                     versions, did])
    lines += md_table(["started", "hardware", "software", "did"], rows)
    lines += ["", "Files: `study.json` (plan and invocations), `summary.json` (every number above), "
              "each run's `metrics.json`, `logs/metrics.csv` and `eval*/metrics_test.json`, figures in `figures/`."]
    return lines
