"""Each finished run of a study as one small JSON record, the raw results the docs are built from.

``captioning compare ... --export-results DIR`` writes ``DIR/<run>.json`` for every run of the
study that is trained and evaluated (the others are left for a later export). A record holds what
a reader needs to check a table without the run folder (no checkpoint):

    study          the budget (quick, default) or "config" (a study with --config)
    arm, attention, seed
    overrides      the settings that differ from captioning train's defaults, in order: the
                   budget's, the user's --set, the arm's (a frozen encoder named by its source run)
    threads        the torch threads the run trained with (cores / --jobs of its invocation)
    train_seconds, global_step, epochs
    test           {test-time mode: {metric: value}}, display scale 0-100 (CIDEr-D x100), the
                   study's decoder settings (``decode``) on the test split, best.ckpt
    selection      which validation chose best.ckpt: its epoch, the last epoch, and with
                   ``test_last`` the last epoch's checkpoint scored alike where it differs
    validation     the validation curve: step, BLEU-4, CIDEr-D (greedy, the validation split)
    signal         the training signal (train/<key> of the CSV log): mean over the first and the
                   last fifth of its logged points

The docs' tables are regenerated from such records alone (captioning/study/tables.py).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from captioning.config import safe_yaml
from captioning.files import atomic_write
from captioning.study import collect
from captioning.study.runs import ARMS, Plan, Run, StudyError, is_evaluated, read_record

FORMAT = 1
#: train.monitor -> what chose best.ckpt, in the record's words.
SELECTION_RULES = {"bleu_4": "validation BLEU-4 (greedy)", "nll": "validation NLL"}


def _threads(run: Run, plan: Plan) -> int | None:
    """The torch threads ``run`` trained with: its study invocation's cores // --jobs when it was
    trained in parallel, else the invocation's own thread count (study.json); None when unknown."""
    study = read_record(plan.out_dir / "study.json") or {}
    for invocation in reversed(study.get("invocations", [])):
        did = invocation.get("did") or {}
        environment = invocation.get("environment") or {}
        words = shlex.split(invocation.get("command", ""))
        jobs = next((int(w.split("=", 1)[1]) if "=" in w else int(words[i + 1])
                     for i, w in enumerate(words) if w.startswith("--jobs")), 1)
        cores = (environment.get("hardware") or {}).get("cpu_cores")
        if run.name in did.get("in_parallel", []) or (did == {} and jobs > 1 and cores):
            return max(1, cores // jobs) if cores else None
        if run.name in did.get("trained", []):
            return environment.get("torch_threads")
    return None


def _settings(run: Run, plan: Plan) -> list[str]:
    arm = ARMS.get(run.arm)
    own = list(arm.overrides) if arm and run.trained_here else []
    if run.depends_on:
        own.append(f"model.encoder: the frozen CNN of {run.depends_on}")
    return [*plan.overrides, *own]


def _values(evaluation: dict) -> dict:
    return {key: round(value, 4) for key, value in evaluation["values"].items()}


def _best_epoch(run: Run, curve: dict | None) -> int | None:
    """The 0-based validation that chose best.ckpt: the one at its step (whatever train.monitor
    was), or None when the run or its curve is not known."""
    steps = run.checkpoint_steps()
    if not curve or steps is None or steps[0] not in curve["step"]:
        return None
    return curve["step"].index(steps[0])


def run_record(run: Run, plan: Plan) -> dict:
    """One finished run of ``plan`` as its record (module docstring)."""
    collected = collect.collect_run(run, plan.out_dir)
    curve = collected["curve"]
    record = {
        "format": FORMAT,
        "study": plan.budget or "config",
        "name": run.name, "arm": run.arm, "attention": run.attention, "seed": run.seed,
        "overrides": _settings(run, plan),
        "threads": _threads(run, plan),
        "train_seconds": collected["train_seconds"], "global_step": collected["global_step"],
        "epochs": collected["epochs"],
        "decode": plan.decode(),
        "test": {mode: _values(evaluation) for mode, evaluation in collected["eval"].items()},
        "validation": None if curve is None else {
            "step": curve["step"], "bleu_4": [round(v, 3) for v in curve["bleu_4"]],
            "cider": None if curve["cider"] is None else [round(v, 2) for v in curve["cider"]],
            "elapsed_s": None if curve["elapsed_s"] is None else [round(v, 1) for v in curve["elapsed_s"]]},
        "signal": {},
    }
    for key, series in collected["signal"].items():
        part = collect.early_late(series)
        if part:
            record["signal"][key] = {"early": round(part["early"], 6), "late": round(part["late"], 6)}
    best = _best_epoch(run, curve)
    last = None if curve is None else len(curve["step"]) - 1
    saved = safe_yaml((run.dir / "config.yaml").read_text()) if (run.dir / "config.yaml").is_file() else {}
    monitor = ((saved or {}).get("train") or {}).get("monitor", "bleu_4")
    record["selection"] = {"rule": SELECTION_RULES.get(monitor, monitor), "best_epoch": best, "last_epoch": last}
    last_eval = run.metrics_file("last")
    if best is not None and best != last and last_eval.is_file():
        record["test_last"] = _values(collect.read_eval(last_eval, plan.out_dir))
    return record


def _own_record(path: Path, name: str) -> bool:
    """Whether ``path`` is absent or a record of run ``name`` (one the export may replace)."""
    if not path.exists():
        return True
    record = read_record(path) if path.is_file() and not path.is_symlink() else None
    return record is not None and record.get("format") == FORMAT and record.get("name") == name


def export(plan: Plan, dest: Path, log=print) -> list[Path]:
    """Write the record of every finished run of ``plan`` into ``dest`` as ``<run>.json``; -> the
    files written. Unfinished runs are named and skipped. The folder may hold other files (it is
    committed, in a checkout at any path): the export writes only its own file names, and replaces
    such a file only where it already holds a record of the same run."""
    written, waiting = [], []
    foreign = [f"{run.name}.json" for run in plan.runs if not _own_record(dest / f"{run.name}.json", run.name)]
    if foreign:
        raise StudyError(f"{dest / foreign[0]} is not a results record of run {foreign[0][:-5]}; move it away, "
                         "or export into another folder")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StudyError(f"cannot write the study's results into {dest}: {err.strerror or err}") from None
    for run in plan.runs:
        if not (run.dir / "metrics.json").is_file() or not all(is_evaluated(run, m, plan) for m in run.modes()):
            waiting.append(run.name)
            continue
        path = dest / f"{run.name}.json"
        atomic_write(path, json.dumps(run_record(run, plan), indent=1) + "\n")
        written.append(path)
    log(f"compare: exported {len(written)} run record(s) into {dest}"
        + (f"; not finished yet: {', '.join(waiting)}" if waiting else ""))
    return written


def load(folder: Path) -> list[dict]:
    """Every record in ``folder`` (sorted by file name), checked for the fields the tables read."""
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise StudyError(f"{path} is not a results record ({err}); export it again with "
                             "captioning compare --export-results") from None
        missing = [k for k in ("study", "arm", "seed", "test") if k not in record]
        if missing or record.get("format") != FORMAT:
            raise StudyError(f"{path} is not a results record of format {FORMAT} (missing {', '.join(missing) or 'format'}); "
                             "export it again with captioning compare --export-results")
        records.append(record)
    return records
