"""Validation at the door: configs, checkpoints and data that would train on garbage or trace back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import make_config
from captioning.checkpoint import CheckpointError, check_resumable, load_checkpoint
from captioning.config import ConfigError, build_config, to_dict
from captioning.training.module import CaptioningModule

pytestmark = pytest.mark.usefixtures("seed", "one_thread")


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("override, message", [
    ("optim.lr=nan", "'optim.lr' must be a finite number, got nan"),
    ("optim.lr=.inf", "'optim.lr' must be a finite number, got inf"),
    ("optim.lr=-1", "'optim.lr' must be positive, got -1.0"),
    ("optim.lr=0", "'optim.lr' must be positive, got 0.0"),
    ("optim.encoder_lr=-0.1", "'optim.encoder_lr' must be >= 0"),
    ("loss.doubly_stochastic=nan", "'loss.doubly_stochastic' must be a finite number"),
    ("train.max_epochs=0", "'train.max_epochs' must be positive, got 0"),
    ("train.max_epochs=-1", "'train.max_epochs' must be positive, got -1"),
    ("train.patience=0", "'train.patience' must be positive"),
    ("data.image_size=-5", "'data.image_size' must be positive, got -5"),
])
def test_bad_numbers_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_config("configs/tiny.yaml", [override])


# ------------------------------------------------------------------------------ checkpoints


@pytest.fixture
def module(tiny_vocab):
    return CaptioningModule.create(make_config(), tiny_vocab)


def _save(module, path, **changes):
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 3,
            "global_step": 10}
    ckpt.update(changes)
    torch.save(ckpt, path)
    return path


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_directory_and_fifo_are_named_as_such(tmp_path):
    assert "is a directory" in _error(tmp_path)
    fifo = tmp_path / "pipe.ckpt"
    os.mkfifo(fifo)
    assert "not a regular file" in _error(fifo)
    assert "does not exist" in _error(tmp_path / "missing.ckpt")


def test_damaged_vocab_or_config(tmp_path, module):
    hp = dict(module.hparams)
    assert "no vocabulary" in _error(_save(module, tmp_path / "a.ckpt", hyper_parameters={**hp, "vocab": None}))
    assert "no vocabulary" in _error(_save(module, tmp_path / "b.ckpt", hyper_parameters={"config": hp["config"]}))
    config = to_dict(make_config())
    config["data"]["image_size"] = -5
    message = _error(_save(module, tmp_path / "c.ckpt", hyper_parameters={**hp, "config": config}))
    assert "damaged or incompatible config" in message and "'data.image_size' must be positive" in message
    assert "damaged" in _error(_save(module, tmp_path / "d.ckpt", hyper_parameters={**hp, "config": None}))


def test_state_dict_mismatch_names_the_first_key(tmp_path, module):
    hp = dict(module.hparams)
    config = to_dict(make_config(model__decoder__hidden_dim=64))
    message = _error(_save(module, tmp_path / "shape.ckpt", hyper_parameters={**hp, "config": config}))
    assert "'decoder." in message and "has shape" in message
    state = dict(module.state_dict())
    dropped = next(iter(state))
    del state[dropped]
    message = _error(_save(module, tmp_path / "missing.ckpt", state_dict=state))
    assert f"'{dropped[len('model.'):]}' is missing" in message
    state = {**module.state_dict(), "model.extra.weight": torch.zeros(1)}
    assert "unexpected 'extra.weight'" in _error(_save(module, tmp_path / "extra.ckpt", state_dict=state))


def test_weights_only_checkpoint_cannot_be_resumed(tmp_path, module):
    path = _save(module, tmp_path / "w.ckpt")
    with pytest.raises(CheckpointError, match="cannot be resumed: it holds weights only"):
        check_resumable(torch.load(path, weights_only=True), path)


# ------------------------------------------------------------------------------ run folders


def test_a_folder_holding_another_run_is_refused(tmp_path):
    from captioning.training.run_folder import RunFolderError, check_out_dir, choose_out_dir, take_folder

    run = tmp_path / "run"
    run.mkdir()
    check_out_dir(run)  # empty: fine
    (run / "config.yaml").write_text("seed: 7\n")
    (run / "last.ckpt").write_bytes(b"ckpt")
    with pytest.raises(RunFolderError) as info:
        check_out_dir(run)
    message = str(info.value)
    assert "holds another run (config.yaml, last.ckpt)" in message and "--overwrite" in message
    assert f"--resume {run / 'last.ckpt'}" in message and "\n" not in message
    check_out_dir(run, resume=run / "last.ckpt")  # continuing the run in its own folder
    assert choose_out_dir(None, "soft", run / "last.ckpt") == run
    assert choose_out_dir(None, "hard", None).as_posix() == "runs/hard"
    with pytest.raises(RunFolderError):  # resuming another checkpoint into this run's folder
        check_out_dir(run, resume=tmp_path / "x.ckpt")
    lock = take_folder(run, overwrite=True, command="train.py --overwrite")
    try:
        assert sorted(p.name for p in run.iterdir()) == ["train.lock"]
        message = _second_process_takes(run)
        assert f"pid {os.getpid()} on " in message and "(train.py --overwrite) is training there" in message
    finally:
        lock.release()
    assert list(run.iterdir()) == []


def _second_process_takes(run) -> str:
    """Another process asking for the folder while this one holds it: -> its one-line refusal."""
    code = ("import sys; from captioning.training.run_folder import take_folder, RunFolderError\n"
            "try:\n    take_folder(sys.argv[1])\nexcept RunFolderError as e:\n    print(e); sys.exit(3)")
    proc = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 3, proc.stderr
    return proc.stdout.strip()
