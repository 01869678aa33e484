"""Read every run's files into one summary (summary.json), the only source report.md is built from.

Sources per run: ``eval*/metrics_test.json`` (captioning evaluate), ``metrics.json`` (train.py:
training time and steps) and ``logs/metrics.csv`` (Lightning's CSV log: validation curves and the
training signal logged by CaptioningModule).

Scale: everything in the summary is on the report's display scale, 0-100 (CIDEr-D, natively 0-10,
x100, as evaluate.py prints it). A metrics file says its scale in its ``"scale"`` key: "0-1"
values are multiplied by 100, "0-100" values are taken as they are; any other scale is an error.
Validation BLEU-4 in the CSV log is on the 0-1 scale unless any value exceeds 1.

Steps: Lightning logs a training step under its 0-based batch index and a validation under the
index of the epoch's last batch; the summary counts optimizer steps taken, i.e. that index + 1.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Iterable

from captioning.study.runs import ARMS, HARD_MODES, Plan, Run, StudyError, read_record

#: (key in a metrics file, column title); the caption metrics first.
METRICS: tuple[tuple[str, str], ...] = (
    ("bleu_1", "BLEU-1"), ("bleu_2", "BLEU-2"), ("bleu_3", "BLEU-3"), ("bleu_4", "BLEU-4"),
    ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr"),
    ("caption_accuracy", "caption accuracy"), ("pointing_game", "pointing game"), ("mass_in_box", "mass in box"),
)
#: Grounding by word kind (captioning/evaluation/grounding.py): (kind, title, key suffix). Each kind
#: has pointing_game<suffix>, mass_in_box<suffix>, the uniform map's uniform_pointing_game<suffix>
#: and uniform_mass_in_box<suffix> (scores), and grounding_words<suffix> (a count).
GROUNDING_KINDS: tuple[tuple[str, str, str], ...] = (
    ("noun", "nouns", ""), ("attribute", "attribute words", "_attribute"), ("phrase", "whole object phrase", "_phrase"),
)
GROUNDING_SCORES = tuple(f"{prefix}{name}{suffix}" for _, _, suffix in GROUNDING_KINDS
                         for prefix in ("", "uniform_") for name in ("pointing_game", "mass_in_box"))
GROUNDING_COUNTS = tuple(f"grounding_words{suffix}" for _, _, suffix in GROUNDING_KINDS)
#: Every value read from a metrics file: the scores (display scale), then the word counts.
SCORES = tuple(dict.fromkeys([key for key, _ in METRICS] + list(GROUNDING_SCORES)))
VALUES = SCORES + GROUNDING_COUNTS
#: Training-signal keys read from the CSV log (train/<key>); see CaptioningModule._log_training_signal.
SIGNAL_KEYS = ("attention_entropy", "baseline", "reinforce_cost", "reinforce_signal_mean",
               "reinforce_signal_var", "reinforce_signal_sq", "reinforce_signal_sq_no_baseline")
#: The fixed quality for "steps to reach": this fraction of the lowest best validation BLEU-4 of
#: all runs, so that every run reaches it and all are timed to the same level.
TARGET_FRACTION = 0.8


def read_eval(path: Path, root: Path) -> dict:
    """One evaluate.py metrics file -> {"file", "scale", "decode", "num_images", "values"} (display scale)."""
    data = read_record(path)
    if data is None:
        raise StudyError(f"{path} is missing or not JSON; rerun captioning compare to evaluate again")
    scale = data.get("scale")
    if scale not in (None, "0-1", "0-100"):
        raise StudyError(f"{path}: unknown \"scale\" {scale!r} (expected \"0-1\" or \"0-100\")")
    factor = 1.0 if scale == "0-100" else 100.0
    metrics = data.get("metrics", {})
    # A metric may be null (e.g. grounding when no generated word names an object): not measured.
    values = {key: float(metrics[key]) * factor for key in SCORES if metrics.get(key) is not None}
    values.update({key: float(metrics[key]) for key in GROUNDING_COUNTS if metrics.get(key) is not None})
    return {"file": _relative(path, root), "scale": scale, "decode": data.get("decode"),
            "num_images": data.get("num_images"), "tokenizer": data.get("tokenizer"),
            "skipped": data.get("skipped", {}), "values": values}


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _number(text: str | None) -> float | None:
    if text in (None, ""):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def read_log(train_dir: Path | None) -> dict:
    """logs/metrics.csv -> {"curve": validation curve, "signal": training-signal series} (empty if absent)."""
    path = train_dir / "logs" / "metrics.csv" if train_dir else None
    if path is None or not path.is_file():
        return {"curve": None, "signal": {}}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    val = [r for r in rows if _number(r.get("val/bleu_4")) is not None]
    curve = None
    if val:
        bleu = [_number(r["val/bleu_4"]) for r in val]
        factor = 1.0 if max(bleu) > 1.0 else 100.0
        cider = [_number(r.get("val/cider")) for r in val]
        elapsed = [_number(r.get("val/elapsed_s")) for r in val]
        curve = {
            "step": [int(float(r["step"])) + 1 for r in val],
            "bleu_4": [b * factor for b in bleu],
            "cider": [c * factor for c in cider] if all(c is not None for c in cider) else None,
            "elapsed_s": elapsed if all(e is not None for e in elapsed) else None,
        }
    signal = {}
    for key in SIGNAL_KEYS:
        points = [(int(float(r["step"])) + 1, _number(r.get(f"train/{key}"))) for r in rows]
        points = [(s, v) for s, v in points if v is not None]
        if points:
            signal[key] = {"step": [s for s, _ in points], "value": [v for _, v in points]}
    return {"curve": curve, "signal": signal}


def aggregate(values: Iterable[float | None]) -> dict | None:
    """Mean and sample standard deviation (n - 1) over seeds; None values (not measured) left out."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    return {"mean": statistics.fmean(present), "std": statistics.stdev(present) if len(present) > 1 else None,
            "n": len(present), "values": present}


def reach(curve: dict | None, target: float) -> dict | None:
    """First validation at or above ``target`` BLEU-4: its step and wall time (None if never)."""
    if not curve:
        return None
    for i, value in enumerate(curve["bleu_4"]):
        if value >= target:
            return {"step": curve["step"][i], "seconds": curve["elapsed_s"][i] if curve["elapsed_s"] else None}
    return None


def early_late(series: dict | None) -> dict | None:
    """Mean of a logged series over its first and last fifth of points (training signal summary)."""
    if not series or len(series["value"]) < 2:
        return None
    values = series["value"]
    k = max(1, len(values) // 5)
    return {"early": statistics.fmean(values[:k]), "late": statistics.fmean(values[-k:]), "points": len(values),
            "early_until_step": series["step"][k - 1], "late_from_step": series["step"][-k]}


def collect_run(run: Run, root: Path) -> dict:
    train = (read_record(run.train_dir / "metrics.json") if run.train_dir else None) or {}
    log = read_log(run.train_dir)
    curve = log["curve"]
    return {
        "name": run.name, "arm": run.arm, "attention": run.attention, "seed": run.seed, "dir": run.dir.name,
        "checkpoint": str(run.checkpoint), "trained_here": run.trained_here,
        "eval": {mode or "expected": read_eval(run.metrics_file(mode), root) for mode in run.modes()},
        "train_seconds": train.get("train_seconds"), "global_step": train.get("global_step"),
        "epochs": train.get("epochs"),
        "curve": curve,
        "best_val_bleu_4": max(curve["bleu_4"]) if curve else None,
        "final_val_bleu_4": curve["bleu_4"][-1] if curve else None,
        "signal": log["signal"],
    }


def build_summary(plan: Plan, study: dict, examples: dict | None) -> dict:
    """Everything the report shows, computed from the runs' files (display scale)."""
    runs = [collect_run(run, plan.out_dir) for run in plan.runs]
    bests = [r["best_val_bleu_4"] for r in runs if r["best_val_bleu_4"] is not None]
    target = TARGET_FRACTION * min(bests) if bests else None
    for r in runs:
        r["to_target"] = reach(r["curve"], target) if target is not None else None

    # The arms present, in the study's order (ARMS), then any other (given checkpoints' mechanisms).
    present = list(dict.fromkeys(r["arm"] for r in runs))
    arms = [a for a in ARMS if a in present] + [a for a in present if a not in ARMS]
    table, signal_summary = {}, {}
    hard_modes = {}  # hard arm -> test-time mode -> metric -> aggregate
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        row = {key: aggregate(r["eval"]["expected"]["values"].get(key) for r in mine) for key in VALUES}
        row["train_seconds"] = aggregate(r["train_seconds"] for r in mine)
        row["global_step"] = aggregate(r["global_step"] for r in mine)
        row["steps_to_target"] = aggregate((r["to_target"] or {}).get("step") for r in mine)
        row["seconds_to_target"] = aggregate((r["to_target"] or {}).get("seconds") for r in mine)
        row["best_val_bleu_4"] = aggregate(r["best_val_bleu_4"] for r in mine)
        row["runs"] = len(mine)
        row["reached_target"] = sum(1 for r in mine if r["to_target"])
        row["attention"] = mine[0]["attention"]
        table[arm] = row
        signal_summary[arm] = {}
        for key in SIGNAL_KEYS:
            parts = [early_late(r["signal"].get(key)) for r in mine]
            parts = [p for p in parts if p]
            if parts:
                signal_summary[arm][key] = {
                    "early": aggregate(p["early"] for p in parts), "late": aggregate(p["late"] for p in parts),
                    "early_until_step": max(p["early_until_step"] for p in parts),
                    "late_from_step": min(p["late_from_step"] for p in parts)}
        hard = [r for r in mine if r["attention"] == "hard"]
        if hard:
            hard_modes[arm] = {mode: {key: aggregate(r["eval"][mode]["values"].get(key) for r in hard
                                                     if mode in r["eval"]) for key in VALUES} for mode in HARD_MODES}
    decodes = {r["name"]: {m: e["decode"] for m, e in r["eval"].items()} for r in runs}
    return {
        "study": study, "metrics": [list(m) for m in METRICS], "arms": arms, "runs": runs, "table": table,
        "hard_modes": hard_modes, "signal_summary": signal_summary, "decode": decodes,
        "target": {"val_bleu_4": target, "fraction": TARGET_FRACTION,
                   "rule": f"{TARGET_FRACTION} x the lowest best validation BLEU-4 of all runs"},
        "examples": examples,
    }
