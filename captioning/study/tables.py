"""The study's tables in README.md and docs/study.md, regenerated from the committed run records.

    python -m captioning.study.tables            # rewrite every table block from docs/results/
    python -m captioning.study.tables --check    # exit 1, naming the block, where a doc disagrees

A table block in a Markdown file is the text between ``<!-- results: NAME -->`` and
``<!-- /results -->``; NAME is a key of :data:`BLOCKS`. Everything else in the file is left as it is.
The records are captioning/study/results.py's, one JSON file per run under
``docs/results/<budget>/``; the estimator measurement is ``docs/results/variance.json``
(captioning/study/variance.py).

Statistics: mean ± sample standard deviation over seeds; intervals are 95% (Student's for a mean,
Welch's for a difference of means); each table of tests is one family, corrected with Holm's
method; "detectable" is the true difference a Welch test at 0.05 would find with probability 0.8,
given the observed spreads and seed counts.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from captioning.config import HARD_MODES
from captioning.files import atomic_write
from captioning.study import results
from captioning.study.collect import GROUNDING_KINDS
from captioning.study.report import TESTED, md_table, number, p_text
from captioning.study.runs import StudyError
from captioning.study.stats import detectable_difference, holm, mean_interval, paired_p, welch_interval

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
DOCS = (ROOT / "README.md", ROOT / "docs" / "study.md", ROOT / "docs" / "faithfulness.md")
MAIN = ("none", "soft", "hard")
#: The factorial: (arm, terms, optimiser).
FACTORIAL = (("soft", "-", "this project's"), ("soft-capgen-optim", "-", "capgen's"),
             ("hard", "averaged", "this project's"), ("hard-capgen-optim", "averaged", "capgen's"),
             ("hard-arctic", "summed", "this project's"), ("hard-arctic-capgen-optim", "summed", "capgen's"))
#: The factorial's tests: (label, arm a, arm b), difference a - b.
FACTORIAL_TESTS = (
    ("summed - averaged, this project's optimiser", "hard-arctic", "hard"),
    ("summed - averaged, capgen's optimiser", "hard-arctic-capgen-optim", "hard-capgen-optim"),
    ("capgen's - this project's optimiser, soft", "soft-capgen-optim", "soft"),
    ("capgen's - this project's optimiser, hard averaged", "hard-capgen-optim", "hard"),
    ("capgen's - this project's optimiser, hard summed", "hard-arctic-capgen-optim", "hard-arctic"),
)
#: The study's design: budget -> arm -> seeds. The docs' conclusions are drawn at these counts;
#: ``--missing BUDGET`` names the runs that have no record yet.
DESIGN: dict[str, dict[str, int]] = {
    "default": {"none": 10, "soft": 10, "hard": 10, "hard-arctic": 2, "soft-capgen-optim": 2,
                "hard-capgen-optim": 2, "hard-arctic-capgen-optim": 2},
    "quick": {arm: 3 for arm, _, _ in FACTORIAL},
}
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join(md_table(header, rows)) + "\n"


class Records:
    """The committed records of one budget, by arm (seed order)."""

    def __init__(self, records: list[dict]) -> None:
        self.by_arm: dict[str, list[dict]] = {}
        for record in sorted(records, key=lambda r: (r["arm"], r["seed"])):
            self.by_arm.setdefault(record["arm"], []).append(record)

    def values(self, arm: str, key: str, mode: str | None = None) -> list[float]:
        """``key`` of each seed's test (``mode``, or the first mode recorded) where it was measured."""
        tests = [r["test"].get(mode) if mode else next(iter(r["test"].values())) for r in self.by_arm.get(arm, [])]
        return [test[key] for test in tests if test and test.get(key) is not None]

    def signal(self, arm: str, key: str) -> list[float]:
        """The late-in-training mean of training signal ``key`` of each seed that logged it."""
        return [r["signal"][key]["late"] for r in self.by_arm.get(arm, []) if key in r.get("signal", {})]


def _summary(values: list[float], decimals: int = 1) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{number(values[0], decimals)} (1 seed)"
    return f"{number(statistics.fmean(values), decimals)} ± {number(statistics.stdev(values), decimals)}"


def load(budget: str, folder: Path = RESULTS) -> Records:
    path = folder / budget
    return Records(results.load(path) if path.is_dir() else [])


# ------------------------------------------------------------------------------ the blocks


def main_per_seed(folder: Path) -> str:
    """Every seed of the main arms at the default budget: BLEU-4 / caption accuracy."""
    recs = load("default", folder)
    seeds = sorted({r["seed"] for arm in MAIN for r in recs.by_arm.get(arm, [])})
    rows = []
    for seed in seeds:
        row = [str(seed)]
        for arm in MAIN:
            record = next((r for r in recs.by_arm.get(arm, []) if r["seed"] == seed), None)
            test = next(iter(record["test"].values())) if record else None
            row.append("-" if test is None else f"{number(test['bleu_4'])} / {number(test['caption_accuracy'])}")
        rows.append(row)
    for label, fn in (("mean ± sd", _summary), ("95% interval of the mean", _interval_text)):
        rows.append([f"**{label}**"] + [f"{fn(recs.values(a, 'bleu_4'))} / {fn(recs.values(a, 'caption_accuracy'))}"
                                        for a in MAIN])
    return _table(["seed", *[f"{a}: BLEU-4 / caption accuracy" for a in MAIN]], rows) + "\n" + _threads_text(recs)


def _threads_text(recs: Records) -> str:
    """Which thread count the runs trained with (their float rounding depends on it)."""
    counts = Counter(r.get("threads") for mine in recs.by_arm.values() for r in mine)
    if not counts:
        return "No run recorded yet.\n"
    parts = [f"{n} run(s) on {t if t is not None else 'an unrecorded number of'} thread(s)"
             for t, n in sorted(counts.items(), key=lambda kv: str(kv[0]))]
    return "Threads per run, every arm of this budget: " + ", ".join(parts) + ".\n"


def _interval_text(values: list[float]) -> str:
    interval = mean_interval(values)
    return "n/a" if interval is None else f"[{number(interval[0])}, {number(interval[1])}]"


def _tests(recs: Records, pairs: Sequence[tuple[str, str, str]], metrics=TESTED) -> str:
    """One family: each (label, a, b) x metric, Welch's 95% interval of a - b, p, Holm's p."""
    found = []
    for label, a, b in pairs:
        for key, title in metrics:
            xa, xb = recs.values(a, key), recs.values(b, key)
            found.append((label, title, xa, xb, welch_interval(xa, xb)))
    adjusted = iter(holm([f[4].p for f in found if f[4] is not None]))
    rows = []
    for label, title, xa, xb, interval in found:
        if interval is None:
            rows.append([label, title, f"{len(xa)} / {len(xb)}", "not tested (fewer than 2 seeds on a side)",
                         "-", "-", "-"])
            continue
        detectable = detectable_difference(statistics.stdev(xa), statistics.stdev(xb), len(xa), len(xb))
        rows.append([label, title, f"{len(xa)} / {len(xb)}",
                     f"{interval.difference:+.1f} [{interval.low:+.1f}, {interval.high:+.1f}]",
                     p_text(interval.p), p_text(next(adjusted)), number(detectable)])
    return _table(["comparison", "metric", "seeds", "difference [95% interval]", "p (Welch)", "p (Holm)",
                   "detectable"], rows)


def main_differences(folder: Path) -> str:
    return _tests(load("default", folder), (("soft - none", "soft", "none"), ("hard - none", "hard", "none"),
                                            ("hard - soft", "hard", "soft")))


def _factorial_means(budget: str, folder: Path) -> str:
    recs = load(budget, folder)
    rows = []
    for arm, terms, optimiser in FACTORIAL:
        if arm not in recs.by_arm:
            continue
        rows.append([f"`{arm}`", terms, optimiser, str(len(recs.by_arm[arm])),
                     _summary(recs.values(arm, "bleu_4")), _summary(recs.values(arm, "caption_accuracy")),
                     _summary(recs.signal(arm, "attention_entropy"), 2)])
    return _table(["arm", "REINFORCE and entropy", "optimiser", "seeds", "BLEU-4", "caption accuracy",
                   "attention entropy, last fifth (nats)"], rows) + "\n" + _threads_text(recs)


def _factorial_tests(budget: str, folder: Path) -> str:
    return _tests(load(budget, folder), FACTORIAL_TESTS, metrics=(TESTED[0], TESTED[2]))


def selection(folder: Path) -> str:
    """best.ckpt (chosen on the validation split) against the last epoch's checkpoint, on the test
    split: per arm, the paired change (last - chosen, by seed), Student's 95% interval and paired t
    test, Holm-corrected over the arms where some run chose an earlier epoch."""
    recs = load("default", folder)
    found = []
    for arm in MAIN:
        mine = recs.by_arm.get(arm, [])
        if not mine:
            continue
        best = [next(iter(r["test"].values()))["bleu_4"] for r in mine]
        last = [r["test_last"]["bleu_4"] if "test_last" in r else b for r, b in zip(mine, best)]
        earlier = [r for r in mine if r["selection"]["best_epoch"] != r["selection"]["last_epoch"]]
        missing = sum(1 for r in earlier if "test_last" not in r)
        if missing:
            raise StudyError(f"{arm}: {missing} run(s) chose an earlier epoch but have no test_last; "
                             "rerun captioning compare to score last.ckpt, then export again")
        changes = [l - b for b, l in zip(best, last)]
        tested = len(changes) > 1 and statistics.stdev(changes) > 0
        p = paired_p(changes) if tested else None
        found.append((arm, mine, best, last, len(earlier), changes, p))
    adjusted = iter(holm([f[6] for f in found if f[6] is not None]))
    rows = []
    for arm, mine, best, last, differ, changes, p in found:
        interval = mean_interval(changes)
        change = f"{statistics.fmean(changes):+.2f}" + ("" if interval is None else
                                                        f" [{interval[0]:+.2f}, {interval[1]:+.2f}]")
        epochs = ", ".join(str(e) for e in sorted(r["selection"]["best_epoch"] + 1 for r in mine))
        tests = ["-", "-"] if p is None else [p_text(p), p_text(next(adjusted))]
        rows.append([arm, str(len(mine)), str(differ), epochs, _summary(best), _summary(last), change, *tests])
    return _table(["arm", "seeds", "runs whose best epoch is not the last", "epoch chosen (1-6), per seed",
                   "test BLEU-4, validation's choice", "test BLEU-4, last epoch",
                   "change, last - chosen [paired 95% interval]", "p (paired t)", "p (Holm)"], rows)


README_METRICS = (("bleu_1", "BLEU-1", 1), ("bleu_4", "BLEU-4", 1), ("meteor", "METEOR", 1), ("rouge_l", "ROUGE-L", 1),
                  ("cider", "CIDEr", 0), ("caption_accuracy", "caption accuracy", 1))


def readme(folder: Path) -> str:
    recs = load("default", folder)
    rows = [[f"`{arm}`", str(len(recs.by_arm.get(arm, [])))]
            + [_summary(recs.values(arm, key), decimals) for key, _, decimals in README_METRICS] for arm in MAIN]
    return _table(["attention", "seeds", *[title for _, title, _ in README_METRICS]], rows)


def grounding(folder: Path) -> str:
    """Pointing game / mass in box by word kind, the main attention arms at the default budget."""
    recs = load("default", folder)

    def scores(arm: str, prefix: str = "") -> list[str]:
        return [f"{_summary(recs.values(arm, f'{prefix}pointing_game{suffix}'))} / "
                f"{_summary(recs.values(arm, f'{prefix}mass_in_box{suffix}'))}" for _, _, suffix in GROUNDING_KINDS]

    rows = [[arm, *scores(arm)] for arm in ("soft", "hard") if arm in recs.by_arm]
    rows.append(["a uniform map", *scores("soft", "uniform_")])
    return _table(["arm", *[f"{title}: pointing / mass" for _, title, _ in GROUNDING_KINDS]], rows)


def hard_modes(folder: Path) -> str:
    """The hard checkpoints decoded with each test-time mode (BLEU-4)."""
    rows = []
    for budget in ("quick", "default"):
        recs = load(budget, folder)
        if "hard" in recs.by_arm:
            rows.append(["hard", budget, str(len(recs.by_arm["hard"]))]
                        + [_summary(recs.values("hard", "bleu_4", mode)) for mode in HARD_MODES])
    return _table(["arm", "budget", "seeds", *HARD_MODES], rows)


def variance(folder: Path) -> str:
    path = folder / "variance.json"
    if not path.is_file():
        return "No measurement committed yet (`python -m captioning.study.variance`).\n"
    data = json.loads(path.read_text())
    rows = []
    for point in data["points"]:
        one, loo = point["estimators"]["1"], point["estimators"][str(data["samples"])]
        k = data["samples"]
        rows.append([point["checkpoint"], f"{point['baseline']:.3f}", f"{one['mean_gradient_sq_norm']:.3g}",
                     f"{one['variance']:.3g}", f"{one['variance'] / k:.3g}", f"{loo['variance']:.3g}",
                     f"{one['variance'] / k / loo['variance']:.2f}", f"{loo['seconds'] / one['seconds']:.2f}"])
    return _table(["checkpoint", "baseline b", "squared norm of the mean gradient", "1 draw, moving baseline",
                   f"mean of {k} independent draws ({k} decoder passes)",
                   f"{k} draws, leave-one-out ({k} decoder passes)", f"ratio: {k} independent / leave-one-out",
                   f"seconds per estimate, {k} draws / 1"], rows)


BLOCKS: dict[str, Callable[[Path], str]] = {
    "readme": readme,
    "main-per-seed": main_per_seed,
    "main-differences": main_differences,
    "selection": selection,
    "grounding": grounding,
    "hard-modes": hard_modes,
    "factorial-quick": lambda folder: _factorial_means("quick", folder),
    "factorial-quick-tests": lambda folder: _factorial_tests("quick", folder),
    "factorial-default": lambda folder: _factorial_means("default", folder),
    "factorial-default-tests": lambda folder: _factorial_tests("default", folder),
    "variance": variance,
}


def render(text: str, folder: Path = RESULTS) -> str:
    """``text`` with every table block rebuilt from the records in ``folder``."""
    def block(match: re.Match) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise StudyError(f"unknown results block {name!r}; known: {', '.join(BLOCKS)}")
        return match.group(1) + BLOCKS[name](folder) + match.group(4)

    return BLOCK.sub(block, text)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m captioning.study.tables", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 where a doc's table disagrees")
    p.add_argument("--results", type=Path, default=RESULTS, help="the records' folder (default: docs/results)")
    p.add_argument("--missing", choices=list(DESIGN), metavar="BUDGET",
                   help="print the runs of the study's design at BUDGET (quick, default) that have no record yet, "
                        "for captioning compare --runs; change nothing")
    args = p.parse_args(argv)
    if not args.results.is_dir():  # else every table would be rebuilt empty
        raise StudyError(f"--results {args.results} is not a folder: give the folder that holds the records "
                         "(docs/results, or what captioning compare --export-results wrote)")
    if args.missing:
        done = {r["name"] for mine in load(args.missing, args.results).by_arm.values() for r in mine}
        design = DESIGN[args.missing]
        print(" ".join(f"{arm}-seed{seed}" for seed in range(max(design.values())) for arm, seeds in design.items()
                       if seed < seeds and f"{arm}-seed{seed}" not in done))
        return 0
    stale = []
    for doc in DOCS:  # a StudyError is printed as one line, exit status 2, by console.guarded
        text = doc.read_text()
        new = render(text, args.results)
        if new != text:
            stale.append(doc)
            if not args.check:
                atomic_write(doc, new)
    if args.check and stale:
        print("error: tables out of step with docs/results in " + ", ".join(str(d.relative_to(ROOT)) for d in stale)
              + "; run python -m captioning.study.tables", file=sys.stderr)
        return 1
    print(("checked " if args.check else "rebuilt ") + ", ".join(str(d.relative_to(ROOT)) for d in DOCS))
    return 0


if __name__ == "__main__":
    from captioning.console import guarded  # its one-line errors and exit statuses, as every command's

    sys.exit(guarded(main))
