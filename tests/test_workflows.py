"""Every workflow behind the console script, run as an installed package would be: ``python -m
captioning ...`` from a folder outside the repository (no scripts/, no configs/ beside it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import captioning
from captioning import cli

WORKFLOWS = ("train", "evaluate", "prepare", "caption", "compare", "benchmark", "export", "demo")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("elsewhere")
    assert REPO not in folder.parents
    return folder


def run_module(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m captioning ARGS`` in ``cwd``, importing the same package as this test."""
    env = dict(os.environ, PYTHONPATH=str(Path(captioning.__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "captioning", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_help_lists_every_workflow(outside):
    proc = run_module(["--help"], outside)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(cli.COMMANDS)
    assert set(WORKFLOWS) <= set(listed)


@pytest.mark.parametrize("command", WORKFLOWS)
def test_workflow_help_runs_outside_the_repository(outside, command):
    proc = run_module([command, "--help"], outside)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: captioning {command} ")
    assert "`" not in proc.stdout  # plain words, not the reStructuredText of a docstring


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_setup_shows_pips_progress_and_the_quick_demo_trains_on_the_tiny_config(tmp_path):
    """A dry run (make -n) of a fresh clone's setup and quick demo: what they would run and say."""
    proc = subprocess.run(["make", "-n", "-C", str(REPO), "demo", "QUICK=1", f"VENV={tmp_path / 'venv'}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    pip = next(line for line in lines if " -m pip install " in line)
    assert "--quiet" not in pip and " -q " not in pip
    train = next(line for line in lines if "scripts/train.py" in line)
    assert "--config configs/tiny.yaml" in train
    assert [line.split(":")[0] for line in lines if line.startswith('echo "demo ')] == [
        'echo "demo 1/3', 'echo "demo 2/3', 'echo "demo 3/3']


def test_make_demo_variants_write_their_own_folders_and_say_how_to_run_captioning(tmp_path):
    """make demo ATTENTION=hard after make demo leaves both runs: each variant trains into its own
    folder. The last lines of setup and demo say how to reach the venv's captioning."""
    venv = tmp_path / "venv"

    def planned(*variables: str) -> list[str]:
        proc = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), "demo", *variables,
                               f"VENV={venv}"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    folders = {}
    for variables in [(), ("ATTENTION=hard",), ("QUICK=1",), ("CONFIG=configs/tiny.yaml", "ATTENTION=hard")]:
        lines = planned(*variables)
        train = next(line for line in lines if "scripts/train.py" in line).split()
        folders[variables] = train[train.index("--out-dir") + 1]
        assert lines[-1] == (f'echo "demo: to run captioning yourself: source {venv}/bin/activate, then captioning '
                             f'--help (or, without activating, {venv}/bin/captioning --help)"')
    assert list(folders.values()) == ["runs/demo-soft", "runs/demo-hard", "runs/demo-tiny-soft", "runs/demo-tiny-hard"]
    setup = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), "setup", f"VENV={venv}"],
                           capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert f"{venv}/bin/captioning --help" in setup[-1] and setup[-1].startswith('echo "setup: done')
    readme = (REPO / "README.md").read_text()
    assert "source .venv/bin/activate && captioning --help   # or: .venv/bin/captioning --help" in readme


def test_readme_lists_every_command():
    line = next(line for line in (REPO / "README.md").read_text().splitlines()
                if line.startswith("captioning --help"))
    assert line.split("#", 1)[1].split("(")[0].split() == " | ".join(cli.COMMANDS).split()


HEAVY = ("torch", "torchvision", "pytorch_lightning", "matplotlib")


def imported_by(code: str, cwd: Path) -> list[str]:
    """The heavy packages that importing and running ``code`` in a fresh process loaded."""
    probe = f"import sys\n{code}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = dict(os.environ, PYTHONPATH=str(Path(captioning.__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split("\n")[-2].split() if proc.stdout.strip() else []


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_help_answers_before_torch_or_lightning_load(outside, command):
    """--help parses the arguments before the workflow imports torch, Lightning or matplotlib (each
    takes seconds to import on a busy CPU)."""
    code = (f"from captioning.cli import main\ntry:\n    main([{command!r}, '--help'])\n"
            "except SystemExit:\n    pass")
    assert imported_by(code, outside) == []


def test_the_api_imports_only_what_it_uses(outside):
    """``import captioning`` imports nothing heavy; ``from captioning import Captioner`` imports torch
    (the model) but not torchvision (until a backbone is built), Lightning or matplotlib."""
    assert imported_by("import captioning", outside) == []
    assert imported_by("from captioning import Captioner", outside) == ["torch"]


def test_every_command_resolves_to_a_main():
    """Every command is the main() of captioning/<area>/run.py."""
    for name in cli.COMMANDS:
        module = cli.COMMANDS[name][0].split(":")[0]
        assert module.startswith("captioning.") and module.endswith(".run"), module
        assert callable(cli.workflow(name)), name
    for name in cli.COMMANDS:
        assert callable(cli.workflow(name)), name


def test_unknown_command_is_one_line_error(outside):
    proc = run_module(["nonsense"], outside)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: unknown command 'nonsense'; commands: {', '.join(cli.COMMANDS)}"]


def test_caption_and_evaluate_run_outside_the_repository(outside, untrained):
    """A tiny untrained checkpoint: caption two test images, then score the test split."""
    run = untrained()
    ckpt = run.ckpt

    proc = run_module(["caption", "--checkpoint", str(ckpt), "--from-split", "test", "--limit", "2", "--json",
                       "--device", "cpu"], outside)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 and all(isinstance(r["caption"], str) for r in rows)

    proc = run_module(["evaluate", "--checkpoint", str(ckpt), "--split", "test", "--metrics", "bleu",
                       "--tokenizer", "simple", "--device", "cpu", "--out-dir", str(outside / "eval")], outside)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((outside / "eval" / "metrics_test.json").read_text())
    assert metrics["num_images"] == len(run.test_paths)


def test_a_closed_pipe_ends_quietly(tmp_path):
    """``captioning --help | head -0``: the reader is gone before we write; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "captioning", "--help"], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(Path(captioning.__file__).resolve().parents[1])),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child has imported anything, so its write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err


# ---------------------------------------------------------------- a new user's first training


@pytest.fixture(scope="module")
def new_run(tmp_path_factory) -> SimpleNamespace:
    """A tiny training into a new folder, as a new user starts one: in its own folder (relative
    data root and run folder), output to pipes (not a terminal), --logger tensorboard."""
    pytest.importorskip("tensorboard", reason="--logger tensorboard needs the tensorboard extra")
    here = tmp_path_factory.mktemp("first")
    proc = run_module(["train", "--config", str(REPO / "configs" / "tiny.yaml"), "--max-epochs", "2",
                       "--out-dir", "runs/new", "--logger", "tensorboard"], here)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(folder=here, ckpt=here / "runs" / "new" / "best.ckpt", out=proc.stdout, err=proc.stderr)


def test_a_new_training_prints_what_a_user_needs_and_no_dependency_noise(new_run):
    text = new_run.out + new_run.err
    for noise in ("litlogger", "LeafSpec", "exists and is not empty", "v_num", "was configured so 100%",
                  "multiple `ModelCheckpoint` callbacks", "Total Flops"):
        assert noise not in text, noise
    assert "\r" not in text  # plain lines off a terminal: no carriage-return bars in a log
    lines = new_run.err.splitlines()
    assert any(line.startswith("epoch 2/2: 4/4 batches (100%)") and "loss " in line for line in lines)
    assert any(line.startswith("epoch 2/2 validation (greedy, x100): BLEU-4 ") for line in lines)
    scoring = lines.index("test: scoring the captions with the COCO metrics ...")
    assert any(line.startswith("test: 1/1 batches (100%)") for line in lines[:scoring])
    assert "test split, 8 images" in new_run.out


def test_caption_and_evaluate_from_another_folder_use_the_runs_data_and_write_nothing_there(new_run, tmp_path):
    data = new_run.folder / "data"
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    proc = run_module(["caption", "--checkpoint", str(new_run.ckpt), "--from-split", "test", "--limit", "2",
                       "--json", "--device", "cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [Path(json.loads(line)["path"]).parents[2] for line in proc.stdout.splitlines()] == [data, data]
    proc = run_module(["evaluate", "--checkpoint", str(new_run.ckpt), "--split", "test", "--metrics", "bleu",
                       "--tokenizer", "simple", "--device", "cpu", "--out-dir", str(new_run.folder / "eval")],
                      tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []  # no data/ generated where the command ran
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_a_checkpoint_that_does_not_say_where_it_was_trained_is_refused_with_the_fix(new_run, tmp_path):
    """A checkpoint from before the training folder was recorded, read from another folder: the
    relative data root would generate a new synthetic set here; refused, with --data-root as the fix."""
    ckpt = torch.load(new_run.ckpt, map_location="cpu", weights_only=True)
    del ckpt["workdir"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    here = tmp_path / "elsewhere"
    here.mkdir()
    proc = run_module(["caption", "--checkpoint", str(tmp_path / "old.ckpt"), "--from-split", "test",
                       "--device", "cpu"], here)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--data-root" in proc.stderr and "Traceback" not in proc.stderr
    assert list(here.iterdir()) == []
    proc = run_module(["caption", "--checkpoint", str(tmp_path / "old.ckpt"), "--from-split", "test", "--limit", "1",
                       "--data-root", str(new_run.folder / "data"), "--device", "cpu"], here)
    assert proc.returncode == 0, proc.stderr
    assert list(here.iterdir()) == []
