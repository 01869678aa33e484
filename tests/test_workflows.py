"""Every workflow behind the console script, run as an installed package would be: ``python -m
captioning ...`` from a folder outside the repository (no scripts/, no configs/ beside it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import captioning
from captioning import cli
from captioning.config import build_config
from captioning.data.datamodule import CaptionDataModule
from conftest import save_untrained_checkpoint

WORKFLOWS = ("train", "evaluate", "prepare", "caption", "compare", "benchmark")
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


def test_caption_and_evaluate_run_outside_the_repository(outside):
    """A tiny untrained checkpoint: caption two test images, then score the test split."""
    cfg = build_config(overrides=[
        f"data.root={outside / 'data'}", "data.synthetic.num_train=12", "data.synthetic.num_val=4",
        "data.synthetic.num_test=4", "decode.max_len=4", "model.decoder.embed_dim=16",
        "model.decoder.hidden_dim=32", "model.decoder.attention_dim=16"])
    data = CaptionDataModule(cfg.data)
    data.prepare_data()
    data.setup("fit")
    ckpt = save_untrained_checkpoint(cfg, data.vocab, outside / "run" / "best.ckpt")

    proc = run_module(["caption", "--checkpoint", str(ckpt), "--from-split", "test", "--limit", "2", "--json",
                       "--device", "cpu"], outside)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 and all(isinstance(r["caption"], str) for r in rows)

    proc = run_module(["evaluate", "--checkpoint", str(ckpt), "--split", "test", "--metrics", "bleu",
                       "--tokenizer", "simple", "--device", "cpu", "--out-dir", str(outside / "eval")], outside)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((outside / "eval" / "metrics_test.json").read_text())
    assert metrics["num_images"] == 4


def test_a_closed_pipe_ends_quietly(tmp_path):
    """``captioning --help | head -0``: the reader is gone before we write; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "captioning", "--help"], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(Path(captioning.__file__).resolve().parents[1])),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child has imported anything, so its write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err
