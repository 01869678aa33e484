"""No attention, soft and hard attention: train every arm under identical settings over several
seeds, evaluate them alike, and write a report folder (report.md, PNG figures, the raw numbers as JSON).

    captioning compare --jobs 2                          # the quick budget: 7 arms x 3 seeds
    captioning compare --budget default --seeds 10 --diagnostic-seeds 2 --jobs 2   # what users train
    captioning compare --arms none soft hard             # the main arms only
    captioning compare --config my_coco.yaml --set data.root=/data/coco   # full size, GPU
    captioning compare --checkpoints soft=runs/a/best.ckpt,runs/b/best.ckpt hard=runs/c/best.ckpt

Each run is the train workflow's main() in its own folder under --out-dir (a subprocess when the
config asks for several devices), then the evaluate workflow's main() on the test split with the
same decoder settings (hard models: expected, argmax and sampled locations). The arms are listed
in captioning/study/runs.py (ARMS): the main arms none (the no-attention control), soft and hard
(the defaults), and diagnostic arms that ask why hard attention trains as it does. A rerun skips
finished runs and evaluations, so a study can be run in parts (--runs). Without --config the study
trains on the synthetic dataset at the chosen budget: quick (2,000 scenes x 6 epochs) or default
(10,000 x 6, what captioning train does); the reason is written into the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

from captioning.config import to_dict
from captioning.console import CaptioningError, as_flag, command_line, main_of, option_set_outside, positive_int
from captioning.evaluation import metrics, run as evaluate
from captioning.files import atomic_write_json, claim_folder
from captioning.progress import format_duration
from captioning.study import collect, examples, report, results
from captioning.study.runs import (ARMS, BUDGETS, DEFAULT_ARMS, Plan, Run, StudyError, environment, execute,
                                  execute_parallel, parse_checkpoints, plan_checkpoint_runs, plan_training_runs,
                                  run_config, study_overrides, write_study_json)
from captioning.training import run as train


#: What --help says a study costs: the run counts and the wall times measured on the project's
#: 2-core CPU, as docs/study.md reports them (its table of budgets).
DURATIONS = (
    "How long, as measured on a 2-core CPU with --jobs 2 (docs/study.md): --budget quick (what runs without "
    "arguments) trains 7 arms x 3 seeds = 21 runs, a run 4.5 to 19 min (the CPU shared with other "
    "trainings); --budget default --seeds 10 --diagnostic-seeds 2 trains 3 main arms x 10 seeds + 4 "
    "factorial arms x 2 seeds = 38 runs, a run 7.5 to 10 min on the otherwise idle CPU and 10 to 56 min with "
    "other trainings sharing it. Fewer runs: --arms none soft hard, --seeds 1, or --runs NAME ...")


#: The options evaluating given checkpoints reads; every other one shapes training and is refused there.
CHECKPOINT_OPTIONS = ("checkpoints", "runs", "out_dir", "beam_size", "max_len", "metrics", "examples")


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog=DURATIONS)
    p.add_argument("--budget", choices=list(BUDGETS), default="quick",
                   help="synthetic training budget without --config: quick (2,000 scenes x 6 epochs, default: "
                        "21 runs) or default (captioning train's 10,000 x 6); their durations below")
    p.add_argument("--seeds", type=positive_int, default=3, metavar="N",
                   help="training seeds per main arm (default 3)")
    p.add_argument("--diagnostic-seeds", type=positive_int, metavar="N",
                   help="training seeds per diagnostic arm (default: --seeds)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(DEFAULT_ARMS),
                   help=f"arms to train (default: {' '.join(DEFAULT_ARMS)})")
    p.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                   help="runs trained at a time, each in its own process with cores/N threads (default 1)")
    p.add_argument("--runs", nargs="+", metavar="NAME",
                   help="train and evaluate only these runs (e.g. soft-seed2), and write no report: to run a "
                        "study in parts or on several machines; a last invocation without --runs writes it")
    p.add_argument("--out-dir", type=Path, help="default: runs/compare-<budget>")
    p.add_argument("--config", type=Path, help="YAML of differences from the defaults (as train.py; e.g. COCO)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--checkpoints", nargs="+", metavar="ATTENTION=CKPT[,CKPT...]",
                   help="evaluate existing checkpoints instead of training: soft=A,B hard=C,D [none=E,F]")
    p.add_argument("--beam-size", type=positive_int, metavar="N", help="default: the config's decode.beam_size")
    p.add_argument("--max-len", type=positive_int, metavar="N", help="default: the config's decode.max_len")
    p.add_argument("--metrics", nargs="+", choices=list(metrics.SCORERS), default=list(metrics.DEFAULT_METRICS),
                   help=f"passed to evaluate.py (default: {' '.join(metrics.DEFAULT_METRICS)})")
    p.add_argument("--export-results", type=Path, metavar="DIR",
                   help="train nothing: write one small JSON record per finished run into DIR (settings, seed, test "
                        "metrics, validation curve, training signal), the raw results the docs' tables are built from")
    p.add_argument("--examples", type=positive_int, default=3, metavar="K",
                   help="test images drawn with soft and hard attention side by side (default 3)")
    return p.parse_args(argv)


def check_run_names(names: list[str] | None, runs: list[Run]) -> None:
    """--runs names only runs of this study (a misspelt one would leave the part silently undone)."""
    unknown = sorted(set(names or ()) - {r.name for r in runs})
    if unknown:
        raise StudyError(f"--runs: no run {unknown[0]} in this study; its runs are {', '.join(r.name for r in runs)}")


def make_plan(args: argparse.Namespace, argv: list[str], prog: str | None = None) -> Plan:
    """The runs and settings of this invocation, checked before anything runs."""
    command = command_line(prog or "python scripts/compare.py", argv)
    if args.checkpoints:
        given = option_set_outside(args, parse_args([]), CHECKPOINT_OPTIONS)
        if given:
            raise StudyError(f"{as_flag(given)} applies to training only; --checkpoints evaluates the given "
                             "checkpoints as they are")
        from captioning.checkpoint import checkpoint_config, read_checkpoint

        runs, differences = plan_checkpoint_runs(args.out_dir, parse_checkpoints(args.checkpoints))
        check_run_names(args.runs, runs)
        cfg, _ = checkpoint_config(read_checkpoint(runs[0].checkpoint), runs[0].checkpoint)
        shared = to_dict(cfg)  # the first checkpoint's; differences are listed separately
        shared["model"]["attention"], shared["train"]["seed"] = "per checkpoint", "per checkpoint"
        return Plan(args.out_dir, runs, None, [], {}, args.beam_size or cfg.decode.beam_size,
                    args.max_len or cfg.decode.max_len, list(args.metrics), command, True, differences, shared)
    overrides, defaults = study_overrides(args.config, args.set, args.budget)
    runs = plan_training_runs(args.out_dir, args.seeds, args.arms, args.diagnostic_seeds)
    for run in runs:  # validates every arm's settings before any run starts
        cfg = run_config(args.config, overrides, run.attention, run.seed, run.arm_overrides())
    cfg = run_config(args.config, overrides, "soft", 0)
    shared = to_dict(cfg)
    shared["model"]["attention"], shared["train"]["seed"] = "per arm", "per run"
    check_run_names(args.runs, runs)
    return Plan(args.out_dir, runs, args.config, overrides, defaults, args.beam_size or cfg.decode.beam_size,
                args.max_len or cfg.decode.max_len, list(args.metrics), command, config=shared,
                budget=None if args.config else args.budget)


def child_argv(argv: list[str], name: str) -> list[str]:
    """This invocation's arguments for one run in its own process: without --jobs and --runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            if arg.startswith("-"):
                skip = False
            else:
                continue
        if arg in ("--jobs", "--runs"):
            skip = True
            continue
        if arg.startswith(("--jobs=", "--runs=")):
            continue
        out.append(arg)
    return [*out, "--runs", name]


def run(argv: list[str] | None = None, prog: str | None = None) -> None:
    """``captioning compare`` with ``argv``. Raises StudyError or ForeignFolderError (status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog)
    if args.out_dir is None:
        args.out_dir = Path(f"runs/compare-{args.budget}")
    started = time.perf_counter()

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        plan = make_plan(args, argv, prog)
        # The study writes its runs, study.json, summary.json, report.md and figures/ only into a
        # folder of its own: new, empty, or marked by an earlier invocation.
        claim_folder(plan.out_dir, "study", "--out-dir", what="write the study")
        if args.export_results is not None:
            results.export(plan, args.export_results, log=log)
            return
        if args.runs:  # one part of a study: its runs, no study.json entry, no report
            if args.jobs > 1:
                part = dataclasses.replace(plan, runs=[r for r in plan.runs if r.name in args.runs])
                execute_parallel(part, lambda name: child_argv(argv, name), args.jobs, log=log)
            did = execute(plan, train.run, evaluate.run, log=log, only=set(args.runs))
            print(f"compare: did {', '.join(did['trained'] + did['evaluated']) or 'nothing'}; "
                  "run the command without --runs for the report", file=sys.stderr)
            return
        invocation = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "command": plan.command,
                      "environment": environment(), "did": None}
        write_study_json(plan, invocation)
        log(f"compare: {len(plan.runs)} runs in {plan.out_dir}: " + ", ".join(r.name for r in plan.runs))
        parallel = []
        if args.jobs > 1:
            parallel = execute_parallel(plan, lambda name: child_argv(argv, name), args.jobs, log=log)
        invocation["did"] = execute(plan, train.run, evaluate.run, log=log)
        invocation["did"]["in_parallel"] = parallel
        study = write_study_json(plan, invocation, replace_last=True)
        decoded = examples.decode_examples(plan, args.examples, log=log)
        summary = collect.build_summary(plan, study, decoded)
        atomic_write_json(plan.out_dir / "summary.json", summary, indent=1)
        path = report.write_report(summary, plan.out_dir)
    except CaptioningError:
        raise
    except OSError as err:
        raise StudyError(err) from None
    print(f"wrote {path}, {plan.out_dir / 'summary.json'} and {plan.out_dir / 'figures'}/ "
          f"in {format_duration(time.perf_counter() - started)}")


main = main_of(run)

