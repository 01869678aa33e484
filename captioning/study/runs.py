"""Plan and run the study: one folder per (arm, seed), trained and evaluated, resumable.

An *arm* is a mechanism with its settings (:data:`ARMS`, each with the sentence the report prints):
the main arms ``none`` (the no-attention control), ``soft`` and ``hard`` (captioning/config.py's
defaults), and diagnostic arms that ask why hard attention trains as it does. Two budgets
(:data:`BUDGETS`): ``quick`` (2,000 scenes x 6 epochs) and ``default`` (10,000 x 6, what users train).

Layout under the study folder OUT (default ``runs/compare-<budget>``)::

    study.json                   the plan of the latest invocation and every invocation's environment
    <arm>-seed<k>/               a training run: captioning train's outputs (best.ckpt, logs/, ...)
    <arm>-ckpt<i>/               with --checkpoints: only the evaluations of a given checkpoint
        eval/metrics_test.json   captioning evaluate with the study's decoder settings (hard: expected)
        eval-argmax/, eval-sample/   hard attention only: the other test-time modes
        eval-last/               last.ckpt scored alike, where the validation chose another epoch
    encoders/soft-seed<k>.pt     a frozen arm's encoder: the backbone of soft-seed<k>/best.ckpt
    features-seed<k>/            its annotation grids, computed once (captioning/data/feature_cache.py)
    logs/<run>.txt               with --jobs > 1: each run's output

A run counts as trained when its ``metrics.json`` and ``best.ckpt`` exist and its ``config.yaml``
equals the config this invocation would train (other settings are an error, never mixed in); one
interrupted mid-training is trained again from scratch, so its learning curve against wall time
comes from one process. An evaluation counts as done when its metrics file has the study's decoder
settings and metrics, and, for a given checkpoint, its ``checkpoint.json`` names the file now at that
path (size and modification time): a checkpoint replaced since is evaluated again.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from captioning.console import CaptioningError
from captioning.config import HARD_MODES, Config, ConfigError, build_config, flatten, safe_yaml, to_dict  # expected first
from captioning.data.coco import read_json
from captioning.data.prepare import available_cores
from captioning.files import RunLock, atomic_write
from captioning.progress import Progress, format_duration

ATTENTIONS = ("none", "soft", "hard")


@dataclass(frozen=True)
class Arm:
    """One arm: a mechanism and the config overrides that make it, beside the study's settings."""

    attention: str  # model.attention
    overrides: tuple[str, ...] = ()
    about: str = ""  # one sentence for the report
    main: bool = True  # a main arm (--seeds) or a diagnostic one (--diagnostic-seeds)
    # A frozen-encoder arm: the encoder of this arm's run of the same seed, frozen (its grids cached).
    frozen_from: str | None = None
    # The arms this one differs from by one setting, tested against it in the report (beside none and soft).
    versus: tuple[str, ...] = ()


#: capgen's optimiser (optimizers.py, capgen.py): Adam at 2e-4 with its own update (bias correction
#: about none, captioning/training/optimizers.py), a constant learning rate, no gradient clipping.
CAPGEN_OPTIM = ("optim.lr=2e-4", "optim.encoder_lr=2e-4", "optim.adam_bias_correction=false",
                "optim.schedule=constant", "optim.grad_clip=0")

#: The study's arms, in report order. Every arm shares the study's other settings.
ARMS: dict[str, Arm] = {
    "none": Arm("none", (), "the no-attention control: the context is the mean annotation at every step, "
                            "the same decoder otherwise"),
    "soft": Arm("soft", (), "soft attention (Sec. 4.2), the default settings"),
    "hard": Arm("hard", (), "hard attention (Sec. 4.1) as it trains by default: the REINFORCE and entropy terms "
                            "averaged over captions (Eq. 12's 1/N), C_n the caption's NLL per real token, the 0.5 "
                            "substitution drawn once per minibatch (the authors' code)"),
    "hard-arctic": Arm("hard", ("loss.hard_reduction=sum",),
                       "hard with the authors' code strengths: REINFORCE and entropy summed over the captions of "
                       "a step (capgen's known gradients carry no 1/B)", main=False, versus=("hard",)),
    "hard-arctic-le0": Arm("hard", ("loss.hard_reduction=sum", "loss.entropy=0"),
                           "hard-arctic without the entropy bonus (lambda_e = 0)", main=False,
                           versus=("hard-arctic",)),
    "hard-arctic-frozen": Arm("hard", ("loss.hard_reduction=sum",),
                              "hard-arctic on a frozen encoder: the CNN of the soft run of the same seed, as capgen's "
                              "CNN is fixed and pre-trained", main=False, frozen_from="soft",
                              versus=("none-frozen",)),
    "none-frozen": Arm("none", (), "the control on the same frozen encoder as hard-arctic-frozen: what that encoder "
                                   "gives without attention", main=False, frozen_from="soft"),
    "hard-frozen": Arm("hard", (), "hard (the default strength) on the same frozen encoder", main=False,
                       frozen_from="soft", versus=("none-frozen", "hard-arctic-frozen")),
    "hard-loo": Arm("hard", ("loss.samples=4",),
                    "hard with a lower-variance estimator (beyond the paper): 4 location sequences sampled per "
                    "caption, each with the mean cost of the other 3 as its baseline", main=False,
                    versus=("hard",)),
    # The factorial {averaged, summed terms} x {this project's optimiser, capgen's}, with soft under both.
    "soft-capgen-optim": Arm("soft", CAPGEN_OPTIM,
                             "soft with capgen's optimiser: Adam 2e-4 without bias correction (capgen's update), "
                             "constant learning rate, no clipping", main=False, versus=("soft",)),
    "hard-capgen-optim": Arm("hard", CAPGEN_OPTIM,
                             "hard (averaged terms) with capgen's optimiser", main=False,
                             versus=("hard", "soft-capgen-optim")),
    "hard-arctic-capgen-optim": Arm("hard", ("loss.hard_reduction=sum", *CAPGEN_OPTIM),
                                    "hard-arctic (summed terms) with capgen's optimiser: the authors' recipe in both "
                                    "factors", main=False,
                                    versus=("hard-arctic", "hard-capgen-optim", "soft-capgen-optim")),
    "hard-image": Arm("hard", ("loss.substitution=image",),
                      "hard with the 0.5 substitution drawn once per image (the paper's text)", main=False,
                      versus=("hard",)),
}
#: The arms a study trains unless --arms says otherwise.
DEFAULT_ARMS = ("none", "soft", "hard", "hard-arctic", "soft-capgen-optim", "hard-capgen-optim",
                "hard-arctic-capgen-optim")
SPLIT = "test"
#: budget -> {config key: (value, reason)}, applied only without --config (the synthetic dataset).
BUDGETS: dict[str, dict[str, tuple[object, str]]] = {
    "quick": {
        "data.synthetic.num_train": (2000, "the quick budget: 2,000 training scenes for 6 epochs (12,000 scene "
                                           "presentations, 378 steps), a fifth of the synthetic default, so that "
                                           "every arm over 3 seeds fits an hour or two of a 2-core CPU; soft attention "
                                           "already beats the no-attention control there, but quality is below the "
                                           "default budget's."),
        "train.max_epochs": (6, "with 2,000 training scenes (see data.synthetic.num_train), 6 epochs; the cosine "
                                "learning-rate decay is stretched to the run."),
    },
    "default": {},  # captioning train's defaults: 10,000 scenes x 6 epochs (1,875 steps)
}


class StudyError(CaptioningError):
    """A one-line problem with the study's inputs or its folder, and how to fix it."""


@dataclass
class Run:
    """One model of the study: trained by it, or given as a checkpoint."""

    name: str  # e.g. "soft-seed0" or "hard-ckpt1"
    attention: str  # model.attention: none, soft or hard
    dir: Path  # this run's folder under the study folder
    checkpoint: Path  # the checkpoint evaluated: dir/best.ckpt, or the one given
    seed: int  # train.seed (a given checkpoint's from its config)
    train_dir: Path | None = None  # where train.py's metrics.json and logs/metrics.csv are, if known
    trained_here: bool = True  # False: a checkpoint given with --checkpoints
    arm: str = ""  # the arm (ARMS); "" = the attention's name

    def __post_init__(self) -> None:
        self.arm = self.arm or self.attention

    @property
    def depends_on(self) -> str | None:
        """The run whose encoder this frozen-encoder run trains on (it must be trained first)."""
        arm = ARMS.get(self.arm) if self.trained_here else None
        return f"{arm.frozen_from}-seed{self.seed}" if arm and arm.frozen_from else None

    @property
    def encoder_file(self) -> Path:
        """A frozen-encoder run's backbone weights, taken from its source run's best.ckpt."""
        return self.dir.parent / "encoders" / f"{self.depends_on}.pt"

    def arm_overrides(self) -> tuple[str, ...]:
        if not self.trained_here or self.arm not in ARMS:
            return ()
        overrides = ARMS[self.arm].overrides
        if self.depends_on:  # paths JSON-quoted, so YAML reads them as strings whatever they look like
            cache = self.dir.parent / f"features-seed{self.seed}"
            overrides += (f"model.encoder.weights={json.dumps(str(self.encoder_file))}",
                          "model.encoder.fine_tune_from=null", f"data.feature_cache={json.dumps(str(cache))}")
        return overrides

    def modes(self) -> tuple[str | None, ...]:
        """Test-time attention modes evaluated: the mechanism's own (hard: expected, argmax and
        sample), or None for one that has none (soft, none)."""
        from captioning.models.attention import MECHANISMS  # torch: here, not when the command parses

        return MECHANISMS[self.attention].test_modes or (None,)

    def eval_dir(self, mode: str | None) -> Path:
        """The evaluation folder of a test-time ``mode``, or with ``"last"`` that of last.ckpt."""
        return self.dir / ("eval" if mode in (None, "expected") else f"eval-{mode}")

    def metrics_file(self, mode: str | None) -> Path:
        return self.eval_dir(mode) / f"metrics_{SPLIT}.json"

    def checkpoint_steps(self) -> tuple[int, int] | None:
        """The optimizer steps of best.ckpt (chosen on the validation split) and last.ckpt, or None
        for a run this study did not train. Memory-mapped: only the step is read."""
        import torch

        last = self.dir / "last.ckpt"
        if not self.trained_here or not last.is_file():
            return None
        return tuple(torch.load(p, map_location="cpu", weights_only=True, mmap=True).get("global_step")
                     for p in (self.checkpoint, last))


@dataclass
class Plan:
    """What one invocation of the study (captioning compare) asked for."""

    out_dir: Path
    runs: list[Run]
    config_file: Path | None
    overrides: list[str]  # study defaults, then the user's --set, in order
    defaults: dict[str, dict]  # study defaults applied: key -> {"value", "reason"}
    beam_size: int
    max_len: int
    metrics: list[str]
    command: str
    checkpoints_given: bool = False
    checkpoint_differences: list[str] = field(default_factory=list)
    config: dict | None = None  # the runs' shared config (attention and seed marked as varying)
    budget: str | None = None  # BUDGETS key (None with --config or --checkpoints)

    def decode(self) -> dict:
        return {"split": SPLIT, "beam_size": self.beam_size, "max_len": self.max_len}


# ------------------------------------------------------------------------------ planning


def study_overrides(config_file: Path | None, user_sets: Sequence[str],
                    budget: str = "quick") -> tuple[list[str], dict[str, dict]]:
    """The budget's settings (synthetic only: without --config), then the user's --set."""
    if config_file is not None:
        return list(user_sets), {}
    user_keys = {text.split("=", 1)[0].strip() for text in user_sets}
    defaults = {key: {"value": value, "reason": reason} for key, (value, reason) in BUDGETS[budget].items()
                if key not in user_keys}
    return [f"{key}={d['value']}" for key, d in defaults.items()] + list(user_sets), defaults


def run_config(config_file: Path | None, overrides: Sequence[str], attention: str, seed: int,
               arm_overrides: Sequence[str] = ()) -> Config:
    """The config train.py builds for ``--config F --set ... --set <arm's> --attention A --seed S``."""
    try:
        return build_config(config_file, [*overrides, *arm_overrides, f"model.attention={attention}",
                                           f"train.seed={seed}"])
    except ConfigError as err:
        raise StudyError(str(err)) from None


def plan_training_runs(out_dir: Path, seeds: int, arms: Sequence[str] = DEFAULT_ARMS,
                       diagnostic_seeds: int | None = None) -> list[Run]:
    """Seeds 0..seeds-1 of each main arm and 0..diagnostic_seeds-1 (default: seeds) of each diagnostic
    arm, every arm for each seed in turn (so a cut-short study is balanced)."""
    diagnostic_seeds = seeds if diagnostic_seeds is None else diagnostic_seeds
    if seeds < 1 or diagnostic_seeds < 1:
        raise StudyError(f"--seeds and --diagnostic-seeds must be at least 1, got {seeds} and {diagnostic_seeds}")
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise StudyError(f"unknown arm(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARMS)}")
    runs = []
    for seed in range(max(seeds, diagnostic_seeds)):
        for arm in dict.fromkeys(arms):
            if seed >= (seeds if ARMS[arm].main else diagnostic_seeds):
                continue
            folder = out_dir / f"{arm}-seed{seed}"
            runs.append(Run(f"{arm}-seed{seed}", ARMS[arm].attention, folder, folder / "best.ckpt", seed, folder,
                            arm=arm))
    names = {r.name for r in runs}
    for run in runs:
        if run.depends_on and run.depends_on not in names:
            raise StudyError(f"arm {run.arm} trains on the encoder of {run.depends_on}, which this study does not "
                             f"train: add arm {ARMS[run.arm].frozen_from} to --arms (with at least as many seeds)")
    return runs


def parse_checkpoints(items: Sequence[str]) -> dict[str, list[Path]]:
    """``["soft=a.ckpt,b.ckpt", "hard=c.ckpt"]`` -> {"soft": [...], "hard": [...]}; soft and hard needed,
    ``none=`` (the no-attention control) optional."""
    given: dict[str, list[Path]] = {}
    for item in items:
        name, sep, paths = item.partition("=")
        name = name.strip()
        if not sep or name not in ATTENTIONS or not paths.strip():
            raise StudyError(f"--checkpoints takes soft=A.ckpt,B.ckpt and hard=C.ckpt,D.ckpt (and optionally "
                             f"none=E.ckpt), got {item!r}")
        given.setdefault(name, []).extend(Path(p.strip()) for p in paths.split(",") if p.strip())
    missing = [a for a in ("soft", "hard") if not given.get(a)]
    if missing:
        raise StudyError(f"--checkpoints needs checkpoints of both mechanisms; none given for {', '.join(missing)} "
                         f"(e.g. --checkpoints soft=runs/soft/best.ckpt hard=runs/hard/best.ckpt)")
    absent = [path for paths in given.values() for path in paths if not path.is_file()]
    if absent:
        raise StudyError(f"checkpoint {absent[0]} does not exist")
    # Each checkpoint is one run of its arm: the same file twice (another spelling, a link) would be a
    # second seed that is no second measurement. The file's device and inode name it whatever the path.
    seen: dict[tuple[int, int], Path] = {}
    for path in (path for paths in given.values() for path in paths):
        stat = path.stat()
        first = seen.setdefault((stat.st_dev, stat.st_ino), path)
        if first is not path:
            also = f" (also as {first})" if str(first) != str(path) else ""
            raise StudyError(f"checkpoint {path} is given twice{also}; each checkpoint is one run of its arm: give "
                             "each file once")
    return given


def plan_checkpoint_runs(out_dir: Path, given: dict[str, list[Path]]) -> tuple[list[Run], list[str]]:
    """Runs for given checkpoints, and the config differences between them beyond attention and seed.
    Each checkpoint's attention must be the one it was given as; its training logs are used when they
    sit beside it (train.py's folder layout)."""
    from captioning.checkpoint import CheckpointError, checkpoint_config, read_checkpoint

    runs, configs = [], {}
    for attention in ATTENTIONS:
        for i, path in enumerate(given.get(attention, [])):
            try:
                cfg, _ = checkpoint_config(read_checkpoint(path), path)
            except CheckpointError as err:
                raise StudyError(str(err)) from None
            if cfg.model.attention != attention:
                raise StudyError(f"{path} is a {cfg.model.attention}-attention checkpoint, given as {attention}=")
            train_dir = path.parent if (path.parent / "logs" / "metrics.csv").is_file() \
                or (path.parent / "metrics.json").is_file() else None
            name = f"{attention}-ckpt{i}"
            runs.append(Run(name, attention, out_dir / name, path, cfg.train.seed, train_dir, trained_here=False))
            configs[name] = flatten(to_dict(cfg))
    return runs, _differences(configs)


# Keys that legitimately differ between the runs of one study.
_PER_RUN_KEYS = {"model.attention", "train.seed", "decode.hard_mode"}


def _differences(configs: dict[str, dict]) -> list[str]:
    keys = sorted(set().union(*configs.values()) - _PER_RUN_KEYS) if configs else []
    out = []
    for key in keys:
        values = {name: flat.get(key) for name, flat in configs.items()}
        if len({json.dumps(v) for v in values.values()}) > 1:
            out.append(f"{key}: " + ", ".join(f"{name}={v!r}" for name, v in values.items()))
    return out


# ------------------------------------------------------------------------------ state


def read_record(path: Path) -> dict | None:
    """A JSON record a run wrote (metrics, study.json), or None where it is missing or damaged:
    the work that writes it is then done again."""
    try:
        data = read_json(path, "record", StudyError)
    except (StudyError, OSError):
        return None
    return data if isinstance(data, dict) else None


def is_trained(run: Run, cfg: Config) -> bool:
    """Finished with exactly ``cfg``; raises StudyError if the folder holds a run of other settings."""
    saved = run.dir / "config.yaml"
    if saved.is_file():
        old = flatten(safe_yaml(saved.read_text()) or {})
        new = flatten(to_dict(cfg))
        # Keys on one side only were added to (or removed from) the config since: not a difference.
        changed = [k for k in sorted(set(old) & set(new)) if old[k] != new[k]]
        if changed:
            k = changed[0]
            raise StudyError(f"{run.dir} was trained with other settings ({k}: {old.get(k)!r}, now {new.get(k)!r}); "
                             f"use another --out-dir, or delete that folder to train it again")
    metrics = read_record(run.dir / "metrics.json")
    return metrics is not None and "train_seconds" in metrics and run.checkpoint.is_file()


def is_evaluated(run: Run, mode: str | None, plan: Plan, last: bool = False) -> bool:
    """``last``: the evaluation of last.ckpt (eval-last/) rather than the run's checkpoint."""
    data = read_record(run.metrics_file("last" if last else mode))
    if data is None:
        return False
    decode = data.get("decode", {})
    checkpoint = run.dir / "last.ckpt" if last else run.checkpoint
    same = (decode.get("beam_size") == plan.beam_size and decode.get("max_len") == plan.max_len
            and decode.get("hard_mode") == mode and data.get("split") == SPLIT
            and data.get("checkpoint") == str(checkpoint))
    done = set(data.get("metrics", {})) | set(data.get("skipped", {}))
    wanted = {"bleu": "bleu_4", "meteor": "meteor", "rouge": "rouge_l", "cider": "cider"}
    return (same and all(wanted[m] in done for m in plan.metrics if m in wanted)
            and (last or checkpoint_change(run, mode) is None))


#: Beside a given checkpoint's evaluation: the checkpoint file it scored (checkpoint_identity).
EVALUATED_FILE = "checkpoint.json"


def checkpoint_identity(path: Path) -> dict:
    """What tells one version of a checkpoint file from another: its size and modification time (ns).
    Not a digest: a checkpoint can be hundreds of MB and is asked about at every check; any rewrite
    of the file, in place or swapped in, gives it a new modification time."""
    stat = path.stat()
    return {"checkpoint": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def checkpoint_change(run: Run, mode: str | None) -> str | None:
    """Why the evaluation of a given checkpoint in ``mode`` may not be of the file now at its path
    (it was replaced since, or no record says which file was scored), or None. The study's own
    checkpoints change only by training again, which removes their evaluations (clear_unfinished)."""
    if run.trained_here:
        return None
    record = read_record(run.eval_dir(mode) / EVALUATED_FILE)
    if record is None:
        return f"{run.name}'s evaluation does not record which version of {run.checkpoint} it scored"
    if record != checkpoint_identity(run.checkpoint):
        return f"{run.checkpoint} changed since {run.name} was evaluated (its size or modification time differs)"
    return None


def clear_unfinished(run: Run) -> None:
    """Remove what a run interrupted mid-training left, so it restarts cleanly (only train.py's files).
    A run that another live process is training (a part of the study run elsewhere) is refused."""
    from captioning.training.run_folder import LOCK_NAME, RESULT_FILES

    lock = RunLock(run.dir / LOCK_NAME)
    if (holder := lock.live_holder()) is not None:
        raise StudyError(f"{run.name} is being trained by {lock.describe(holder)}; let it finish, then run this "
                         "command again")
    for name in RESULT_FILES:
        (run.dir / name).unlink(missing_ok=True)
    for folder in [run.dir / "logs", run.dir / "epochs", run.dir / "eval-last", *[run.eval_dir(m) for m in HARD_MODES]]:
        if folder.is_dir():
            shutil.rmtree(folder)


# ------------------------------------------------------------------------------ environment


def environment() -> dict:
    """Software versions and hardware, for the report's settings section."""
    from importlib import metadata

    import torch

    from captioning.device import cpu_name
    from captioning.evaluation.metrics import java_version

    versions = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "pytorch-lightning", "numpy", "pillow", "pycocoevalcap", "matplotlib"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    versions["java"] = java_version()
    versions["torch"] = torch.__version__  # with its build tag, e.g. +cu130 or +cpu
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    return {"versions": versions, "hardware": {"cpu": cpu_name(), "cpu_cores": available_cores(), "memory_gib": memory_gib,
                                                "gpus": gpus, "platform": platform.platform()},
            "torch_threads": torch.get_num_threads()}


def write_study_json(plan: Plan, invocation: dict, replace_last: bool = False) -> dict:
    """study.json: the latest plan, and every invocation (command, environment, what it ran) appended
    (``replace_last``: this invocation's entry, written when it started, is updated)."""
    path = plan.out_dir / "study.json"
    previous = (read_record(path) or {}).get("invocations", [])
    if replace_last:
        previous = previous[:-1]
    study = {
        "command": plan.command, "budget": plan.budget,
        "arms": {r.arm: ARMS[r.arm].about for r in plan.runs if r.trained_here and r.arm in ARMS},
        "config_file": str(plan.config_file) if plan.config_file else None,
        "overrides": plan.overrides, "defaults": plan.defaults, "decode": plan.decode(),
        "hard_modes": list(HARD_MODES), "metrics": plan.metrics,
        "checkpoints_given": plan.checkpoints_given, "checkpoint_differences": plan.checkpoint_differences,
        "config": plan.config,
        "runs": [{"name": r.name, "arm": r.arm, "attention": r.attention, "seed": r.seed, "dir": r.dir.name,
                  "checkpoint": str(r.checkpoint), "train_dir": str(r.train_dir) if r.train_dir else None}
                 for r in plan.runs],
        "invocations": [*previous, invocation],
    }
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(study, indent=2))
    return study


# ------------------------------------------------------------------------------ running


def train_argv(plan: Plan, run: Run) -> list[str]:
    argv = ["--attention", run.attention, "--seed", str(run.seed), "--out-dir", str(run.dir),
            "--no-progress", "--no-test"]
    if plan.config_file is not None:
        argv += ["--config", str(plan.config_file)]
    for text in [*plan.overrides, *run.arm_overrides()]:
        argv += ["--set", text]
    return argv


def evaluate_argv(plan: Plan, run: Run, mode: str | None, last: bool = False) -> list[str]:
    checkpoint = run.dir / "last.ckpt" if last else run.checkpoint
    argv = ["--checkpoint", str(checkpoint), "--split", SPLIT, "--out-dir", str(run.eval_dir("last" if last else mode)),
            "--beam-size", str(plan.beam_size), "--max-len", str(plan.max_len), "--metrics", *plan.metrics]
    if mode is not None:
        argv += ["--hard-mode", mode]
    return argv


def prepare_dataset(configs: dict[str, Config]) -> None:
    """Generate the dataset before the first run, so no run's training time includes it."""
    from captioning.data.datamodule import CaptionDataModule

    CaptionDataModule(next(iter(configs.values())).data).prepare_data()


def execute_parallel(plan: Plan, child_argv: Callable[[str], list[str]], jobs: int,
                     log: Callable[[str], None] = print) -> list[str]:
    """Work on up to ``jobs`` runs at a time, each in its own ``captioning compare ... --runs NAME``
    process with ``cores // jobs`` threads (at least 1), its output in OUT/logs/NAME.txt; a run waits
    for the run it depends on (a frozen encoder's source). -> the names of the runs worked on.

    Each child trains and evaluates its run exactly as the one-process study does (execute), so the
    results do not depend on --jobs beyond the thread count's float rounding."""
    configs = run_configs(plan)
    waiting = [r for r in plan.runs if not is_done(r, plan, configs)]
    if not waiting:
        return []
    prepare_dataset(configs)
    threads = str(max(1, available_cores() // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    logs = plan.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    done, failed = [], []
    progress = Progress(len(waiting), "compare", unit="runs", enabled=False)
    log(f"compare: {len(waiting)} runs to do, {jobs} at a time with {threads} thread(s) each; "
        f"each run's output in {logs}/")
    try:
        while waiting or running:
            for run in list(waiting):
                if len(running) >= jobs:
                    break
                if run.depends_on in failed:
                    waiting.remove(run)
                    failed.append(run.name)
                    log(f"compare: {run.name} skipped: {run.depends_on} failed")
                    continue
                if run.depends_on in running or any(w.name == run.depends_on for w in waiting):
                    continue  # its source run is not trained yet
                waiting.remove(run)
                with (logs / f"{run.name}.txt").open("a") as out:  # the child writes to its own copy
                    proc = subprocess.Popen([sys.executable, "-m", "captioning", "compare", *child_argv(run.name)],
                                            stdout=out, stderr=subprocess.STDOUT, env=env)
                running[run.name] = (proc, time.perf_counter())
                log(f"compare: started {run.name} (pid {proc.pid})")
            time.sleep(1.0)
            for name, (proc, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode == 0:
                    done.append(name)
                    _log_done(log, progress, f"finished {name}", time.perf_counter() - started)
                else:
                    failed.append(name)
                    log(f"compare: {name} failed with exit status {proc.returncode}; see {logs / f'{name}.txt'}")
    except KeyboardInterrupt:
        for proc, _ in running.values():
            proc.send_signal(signal.SIGINT)
        for proc, _ in running.values():
            proc.wait()
        raise
    if failed:
        raise StudyError(f"{len(failed)} run(s) failed: {', '.join(failed)} (their output is in {logs}/); "
                         "rerun the same command to retry them")
    return done


def train_in_subprocess(argv: list[str]) -> None:
    """Multi-device training: Lightning's DDP relaunches the current program for every rank, so the
    study must not be that program; ``captioning train`` runs in its own process instead."""
    proc = subprocess.run([sys.executable, "-m", "captioning", "train", *argv])
    if proc.returncode != 0:
        raise StudyError(f"captioning train {' '.join(argv)} failed with exit status {proc.returncode}")


def write_encoder_file(checkpoint: Path, path: Path) -> None:
    """The torchvision state dict of ``checkpoint``'s encoder backbone -> ``path``, loadable with
    ``model.encoder.weights=path``. Stages the model does not keep stay at their fresh initialisation
    (they are never run)."""
    import torchvision

    from captioning.checkpoint import CheckpointError, checkpoint_config, read_checkpoint
    from captioning.models.encoder import backbone_stages
    from captioning.training.trainer import AtomicCheckpointIO

    try:
        ckpt = read_checkpoint(checkpoint)
        cfg, _ = checkpoint_config(ckpt, checkpoint)
    except CheckpointError as err:
        raise StudyError(str(err)) from None
    prefix = "model.encoder.stages."
    trained = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    net = torchvision.models.get_model(cfg.model.encoder.backbone, weights=None)
    stages = dict(backbone_stages(net, cfg.model.encoder.backbone))
    for name in {key.split(".", 1)[0] for key in trained}:
        stages[name].load_state_dict({k.split(".", 1)[1]: v for k, v in trained.items() if k.startswith(f"{name}.")})
    AtomicCheckpointIO().save_checkpoint(net.state_dict(), path)  # torch.save, written whole, then swapped in


def _log_done(log: Callable[[str], None], progress: Progress, what: str, seconds: float) -> None:
    """One line per piece of work done: its time, the count done and the study's elapsed time and ETA."""
    progress.update(1)
    log(f"compare: {what} in {format_duration(seconds)} ({progress.done}/{progress.total} {progress.unit}; "
        f"elapsed {format_duration(progress.elapsed)}, ETA {format_duration(progress.eta)})")


def run_configs(plan: Plan) -> dict[str, Config]:
    """The config each run the study trains is trained with, by run name."""
    return {r.name: run_config(plan.config_file, plan.overrides, r.attention, r.seed, r.arm_overrides())
            for r in plan.runs if r.trained_here}


def is_done(run: Run, plan: Plan, configs: dict[str, Config]) -> bool:
    trained = not run.trained_here or is_trained(run, configs[run.name])
    return trained and all(is_evaluated(run, m, plan) for m in run.modes())


def _failed(what: str, err: CaptioningError) -> CaptioningError:
    """A run's error as the study reports it; Ctrl-C and SIGTERM (statuses 128 + the signal's number)
    stay what they are, so the study ends as its user stopped it."""
    return err if err.exit_status >= 128 else StudyError(f"{what} failed: {err}")


def execute(plan: Plan, train_fn: Callable[[list[str]], object], evaluate_fn: Callable[[list[str]], object],
            log: Callable[[str], None] = print, only: set[str] | None = None) -> dict:
    """Train what is not trained, evaluate what is not evaluated; -> what this invocation did.

    ``train_fn``/``evaluate_fn`` take captioning train's and captioning evaluate's argv (their
    ``run``: a failure raises its CaptioningError), so the study runs exactly the project's entry
    points. ``only``: the names of the runs to work on (the others are left as they are).
    """
    import torch

    def evaluate(what: str, argv: list[str], seed: int) -> None:
        torch.manual_seed(seed)  # so that decoding with sampled locations is reproducible
        try:
            evaluate_fn(argv)
        except CaptioningError as err:
            raise _failed(f"evaluating {what}", err) from None

    configs = run_configs(plan)
    mine = [r for r in plan.runs if only is None or r.name in only]
    to_train = [r for r in mine if r.trained_here and not is_trained(r, configs[r.name])]
    to_eval_count = sum(1 for r in mine for m in r.modes() if r in to_train or not is_evaluated(r, m, plan))
    did = {"trained": [], "evaluated": []}
    progress = Progress(len(to_train) + to_eval_count, "compare", unit="trainings and evaluations", enabled=False)
    skipped = [r.name for r in mine if r.trained_here and r not in to_train]
    if skipped:
        log(f"compare: already trained, skipped: {', '.join(skipped)}")
    if to_train:
        prepare_dataset(configs)

    for run in mine:
        if run in to_train:
            cfg = configs[run.name]
            if run.depends_on:  # a frozen-encoder run: its source run's encoder, written out for it
                source = next((r for r in plan.runs if r.name == run.depends_on), None)
                if source is None or not is_trained(source, configs[source.name]):
                    raise StudyError(f"{run.name} needs {run.depends_on} trained first (its encoder)")
                write_encoder_file(source.checkpoint, run.encoder_file)
            clear_unfinished(run)
            log(f"compare: training {run.name} ({cfg.train.max_epochs} epochs) into {run.dir}")
            start = time.perf_counter()
            argv = train_argv(plan, run)
            try:
                (train_in_subprocess if cfg.train.devices * cfg.train.num_nodes > 1 else train_fn)(argv)
            except CaptioningError as err:
                raise _failed(f"training {run.name}", err) from None
            if not is_trained(run, cfg):
                raise StudyError(f"training {run.name} finished without {run.dir / 'metrics.json'} and best.ckpt")
            did["trained"].append(run.name)
            _log_done(log, progress, f"trained {run.name}", time.perf_counter() - start)
        for mode in run.modes():
            if is_evaluated(run, mode, plan):
                continue
            if run.metrics_file(mode).is_file() and (change := checkpoint_change(run, mode)):
                log(f"compare: {change}; evaluating it again")
            start = time.perf_counter()
            identity = None if run.trained_here else checkpoint_identity(run.checkpoint)  # the file about to be read
            evaluate(f"{run.name} ({mode or 'soft'})", evaluate_argv(plan, run, mode), run.seed)
            if identity is not None:
                atomic_write(run.eval_dir(mode) / EVALUATED_FILE, json.dumps(identity, indent=2))
            if not is_evaluated(run, mode, plan):
                raise StudyError(f"evaluating {run.name} wrote no usable {run.metrics_file(mode)}")
            did["evaluated"].append(f"{run.name}:{mode or 'soft'}")
            _log_done(log, progress, f"evaluated {run.name}" + (f" ({mode})" if mode else ""),
                      time.perf_counter() - start)
        # How much the choice of checkpoint matters: the last epoch's, scored alike, where the
        # validation chose another (results.py's "test_last").
        mode = run.modes()[0]
        if not is_evaluated(run, mode, plan, last=True) and (steps := run.checkpoint_steps()) and steps[0] != steps[1]:
            evaluate(f"{run.name}'s last.ckpt", evaluate_argv(plan, run, mode, last=True), run.seed)
            did["evaluated"].append(f"{run.name}:last")
    return did
