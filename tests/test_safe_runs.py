"""Validation at the door: configs, checkpoints and data that would train on garbage or trace back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from conftest import make_config
from test_files import small_disk  # noqa: F401 (a fixture)
from captioning.checkpoint import CheckpointError, check_resumable, load_checkpoint
from captioning.config import ConfigError, build_config, flatten, load_yaml, to_dict
from captioning.console import CommandFailed
from captioning.training import run as train
from captioning.files import MARKER, folder_kind, mark_folder
from captioning.training.module import CaptioningModule
from captioning.training.run_folder import RunFolderError, check_out_dir, choose_out_dir, take_folder

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
    missing = "holds a damaged vocabulary: a vocabulary is a list of words, not a NoneType"
    assert missing in _error(_save(module, tmp_path / "a.ckpt", hyper_parameters={**hp, "vocab": None}))
    assert missing in _error(_save(module, tmp_path / "b.ckpt", hyper_parameters={"config": hp["config"]}))
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
    """Item 1 (a second run overwrote the first) and item 2 (two live trainings mixed their files)."""
    run = tmp_path / "run"
    run.mkdir()
    check_out_dir(run)  # empty: fine, and marked as a run folder
    assert folder_kind(run) == "run"
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
        assert sorted(p.name for p in run.iterdir()) == sorted([MARKER, "train.lock"])
        message = _second_process_takes(run)
        assert f"pid {os.getpid()} on " in message and "(train.py --overwrite) is training there" in message
    finally:
        lock.release()
    assert [p.name for p in run.iterdir()] == [MARKER]


def test_a_checkpoint_under_epochs_belongs_to_its_run_folder(tmp_path):
    """--resume RUN/epochs/epoch0.ckpt --out-dir RUN --overwrite removed that very checkpoint and the
    run, then traced back; without --out-dir its folder was taken to be RUN/epochs."""
    run = tmp_path / "run"
    (run / "epochs").mkdir(parents=True)
    (run / "eval").mkdir()
    mark_folder(run, "run")
    for name in ("last.ckpt", "epochs/epoch0.ckpt", "eval/copy.ckpt"):
        (run / name).write_bytes(b"ckpt")
    before = _files(run)
    epoch = run / "epochs" / "epoch0.ckpt"
    assert choose_out_dir(None, "soft", epoch) == run
    take_folder(run, resume=epoch).release()  # continuing the run in its own folder
    assert _files(run) == before
    for resume in (epoch, run / "last.ckpt"):  # --overwrite would be ignored: refused
        with pytest.raises(RunFolderError) as info:
            take_folder(run, overwrite=True, resume=resume)
        assert "--overwrite" in str(info.value) and "continues" in str(info.value)
    with pytest.raises(RunFolderError, match="--overwrite would remove .*copy.ckpt, the checkpoint resumed"):
        take_folder(run, overwrite=True, resume=run / "eval" / "copy.ckpt")
    assert _files(run) == before and not (run / "train.lock").exists()


def _second_process_takes(run) -> str:
    """Another process asking for the folder while this one holds it: -> its one-line refusal."""
    code = ("import sys; from captioning.training.run_folder import take_folder, RunFolderError\n"
            "try:\n    take_folder(sys.argv[1])\nexcept RunFolderError as e:\n    print(e); sys.exit(3)")
    proc = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 3, proc.stderr
    return proc.stdout.strip()


# ------------------------------------------------------------------------------ the workflows

REPO = Path(__file__).resolve().parents[1]


def tiny_args(out: Path | None, data_root: Path, *extra: str) -> list[str]:
    """configs/tiny.yaml as --set overrides (--resume refuses --config), constant learning rate so a
    resumed run's schedule is the uninterrupted run's."""
    settings = flatten(load_yaml(REPO / "configs" / "tiny.yaml"))
    settings.update({"data.root": str(data_root), "optim.schedule": "constant"})
    args = (["--out-dir", str(out)] if out is not None else []) + ["--no-progress"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, data_root) -> Path:
    """A finished one-epoch run folder (read-only for the tests: copy it to change it)."""
    out = tmp_path_factory.mktemp("runs") / "one"
    train.run(tiny_args(out, data_root, "--max-epochs", "1", "--no-test"))
    return out


def test_resume_continues_in_its_own_folder_bit_exactly(tmp_path, data_root, monkeypatch):
    """Item 1 and 10: --resume without --out-dir writes into the checkpoint's folder (not runs/soft),
    and restores the random generators: 1 epoch + 1 resumed = 2 epochs in one go. (All three
    trainings here, with the same thread count: a different one changes float sums.)"""
    run = tmp_path / "run"
    train.run(tiny_args(run, data_root, "--max-epochs", "1", "--no-test"))
    monkeypatch.chdir(tmp_path)
    train.run(["--resume", str(run / "last.ckpt"), "--max-epochs", "2", "--no-progress", "--no-test"])
    assert not (tmp_path / "runs").exists()
    resumed = torch.load(run / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 1
    train.run(tiny_args(tmp_path / "full", data_root, "--max-epochs", "2", "--no-test"))
    full = torch.load(tmp_path / "full" / "last.ckpt", weights_only=True)
    assert full["global_step"] == resumed["global_step"]
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_a_fresh_run_refuses_a_folder_holding_a_run(tmp_path, data_root, one_epoch, capsys):
    """Item 1: a second run into the same folder overwrote it silently. The one run-folder refusal
    tested through train (the others are tested on run_folder's functions): train consults the
    check, and a refused start ends with one line (status 1)."""
    before = _files(one_epoch)
    assert train.main(tiny_args(one_epoch, data_root, "--max-epochs", "1")) == 1
    message = capsys.readouterr().err.splitlines()[-1]
    assert message.startswith("error: ") and "holds another run" in message and "--overwrite" in message
    assert _files(one_epoch) == before


def test_overwrite_refuses_a_folder_the_project_did_not_write(tmp_path):
    """A folder of a user's own files (no run ever there) is not "another run": even with
    --overwrite it is refused, and every file stays as it was."""
    out = tmp_path / "mine"
    (out / "logs").mkdir(parents=True)
    (out / "config.yaml").write_text("my: settings\n")
    (out / "logs" / "important.txt").write_text("keep me")
    before = _files(out)
    for overwrite in (False, True):
        with pytest.raises(RunFolderError) as info:
            take_folder(out, overwrite=overwrite)
        message = str(info.value)
        assert "not empty and was not written by show-attend-tell" in message and "\n" not in message
        assert _files(out) == before and sorted(p.name for p in out.iterdir()) == ["config.yaml", "logs"]


def test_overwrite_removes_only_what_a_training_writes(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    mark_folder(run, "run")
    for name in ("best.ckpt", "last.ckpt", "metrics.json", "notes.txt"):
        (run / name).write_text(name)
    (run / "logs" / "metrics.csv").write_text("step\n")
    take_folder(run, overwrite=True).release()
    assert sorted(p.name for p in run.iterdir()) == sorted([MARKER, "notes.txt"])


def test_a_start_refused_at_any_point_does_not_block_the_fixed_command(tmp_path, data_root, monkeypatch):
    """A config refused only once the trainer was built left config.yaml behind, and the fixed
    command was then refused as "another run"."""
    out = tmp_path / "run"
    with pytest.raises(CommandFailed, match="'train.accelerator' is 'tpu', not one of"):
        train.run(tiny_args(out, data_root, "--max-epochs", "1", "--no-test", "--set", "train.accelerator=tpu"))
    from captioning.training import trainer  # the run imports build_trainer from it when it starts

    def refuse(*args, **kwargs):
        raise MisconfigurationException("no such device here")

    with monkeypatch.context() as patch:  # refused after config.yaml was written
        patch.setattr(trainer, "build_trainer", refuse)
        with pytest.raises(CommandFailed, match="no such device here"):
            train.run(tiny_args(out, data_root, "--max-epochs", "1", "--no-test"))
    assert (out / "config.yaml").is_file()
    train.run(tiny_args(out, data_root, "--max-epochs", "1", "--no-test"))  # the same command, once fixed
    assert (out / "last.ckpt").is_file()


def test_zero_training_batches_is_refused_not_a_success(tmp_path, data_root):
    with pytest.raises(CommandFailed, match="'train.limit_train_batches' must be positive"):
        train.run(tiny_args(tmp_path / "run", data_root, "--set", "train.limit_train_batches=0"))
    assert not (tmp_path / "run").exists()


def test_an_empty_test_split_is_skipped_not_faked(tmp_path, data_root, capsys):
    """Item 4: metrics.json claimed validation results were the test split's."""
    out = tmp_path / "run"
    result = train.run(tiny_args(out, data_root, "--max-epochs", "1", "--set", "data.synthetic.num_test=0"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"] == "skipped (the test split is empty)" and "split" not in metrics
    assert not (out / "test_predictions.json").exists()
    assert "test split not scored: the test split is empty" in capsys.readouterr().out and "metrics" not in result


@pytest.mark.parametrize("extra, message", [
    (["--set", "optim.lr=nan"], "'optim.lr' must be a finite number"),
    (["--set", "optim.lr=-1"], "'optim.lr' must be positive"),
])
def test_invalid_learning_rates_are_refused_before_anything_is_written(tmp_path, data_root, extra, message):
    """Item 5: lr=nan trained on NaN losses and wrote checkpoints, exit 0."""
    with pytest.raises(CommandFailed, match=message):
        train.run(tiny_args(tmp_path / "run", data_root, *extra))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_max_epochs_below_one_is_refused(tmp_path, data_root, epochs, capsys):
    with pytest.raises(SystemExit) as info:
        train.run(tiny_args(tmp_path / "run", data_root, "--max-epochs", epochs))
    assert info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_root, monkeypatch, capsys):
    """Item 5: NaN losses were trained on and checkpointed with exit 0."""
    from captioning.training.module import CaptioningModule

    real_step = CaptioningModule.training_step

    def diverge_in_epoch_two(self, batch, batch_idx):
        loss = real_step(self, batch, batch_idx)
        return loss * float("nan") if self.current_epoch == 1 else loss

    monkeypatch.setattr(CaptioningModule, "training_step", diverge_in_epoch_two)
    out = tmp_path / "run"
    assert train.main(tiny_args(out, data_root, "--max-epochs", "3")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the training loss is nan at step") and "holds 1 finished epoch(s)" in err
    last = torch.load(out / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0
    assert all(bool(torch.isfinite(v).all()) for v in last["state_dict"].values() if v.is_floating_point())
    assert not (out / "metrics.json").exists() and not (out / "train.lock").exists()


def _as_from_a_terminal() -> None:
    """A child's SIGINT as a terminal's Ctrl-C meets it. A shell starts background jobs with SIGINT
    ignored, and Python leaves an ignored SIGINT ignored: run under `nohup make test &`, the child
    would never see the signal these tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signal_name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_sigterm_and_sigint_exit_non_zero_saying_how_to_resume(tmp_path, data_root, signal_name, status):
    """Item 6: SIGTERM exited 0, so `train && evaluate` carried on."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "captioning", "train",
                             *tiny_args(out, data_root, "--max-epochs", "100")],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_terminal)
    deadline = time.monotonic() + 300
    while not (out / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(getattr(signal, signal_name))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err[-2000:]
    assert "Traceback" not in err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"error: stopped by {signal_name}: {out / 'last.ckpt'} holds ")
    assert f"continue with: captioning train --resume {out / 'last.ckpt'}" in last_line
    assert torch.load(out / "last.ckpt", weights_only=True)["epoch"] >= 0
    assert not (out / "train.lock").exists()


def test_a_failed_resume_leaves_the_run_folder_as_it_was(tmp_path, one_epoch, module):
    """Item 8: a shape-mismatched resume overwrote config.yaml and dropped metrics.csv rows."""
    before = _files(one_epoch)
    with pytest.raises(CommandFailed) as info:
        train.run(["--resume", str(one_epoch / "last.ckpt"), "--set", "model.decoder.hidden_dim=64", "--no-progress"])
    assert "weights do not match the model: 'model.decoder." in str(info.value)
    assert _files(one_epoch) == before
    weights_only = _save(module, tmp_path / "weights.ckpt")
    with pytest.raises(CommandFailed, match="cannot be resumed: it holds weights only"):
        train.run(["--resume", str(weights_only), "--no-progress"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.ckpt"]


def test_a_resume_refused_by_lightning_leaves_config_yaml_as_it_was(one_epoch):
    """config.yaml was rewritten before the trainer restored the checkpoint, so a resume that then
    failed left the folder saying it had run with the refused settings. (Lightning's logger rewrites
    logs/hparams.yaml as it starts: captioning/training/trainer.py.)"""
    names = ("config.yaml", "logs/metrics.csv", "last.ckpt", "best.ckpt")
    before = {name: (one_epoch / name).read_bytes() for name in names}
    with pytest.raises(CommandFailed, match="limit_val_batches"):
        train.run(["--resume", str(one_epoch / "last.ckpt"), "--max-epochs", "2", "--set",
                   "train.limit_val_batches=0.01", "--no-progress", "--no-test"])
    assert {name: (one_epoch / name).read_bytes() for name in names} == before


def test_metrics_json_names_only_a_checkpoint_of_its_own_folder(tmp_path, one_epoch):
    """A resume into a new folder with no epoch left scored the other folder's best.ckpt and named
    NEW/best.ckpt, which does not exist. (A run that never validates is refused by its config.)"""
    new = tmp_path / "new"
    train.run(["--resume", str(one_epoch / "last.ckpt"), "--out-dir", str(new), "--no-progress"])
    assert json.loads((new / "metrics.json").read_text())["checkpoint"] is None and not list(new.glob("*.ckpt"))


def test_a_run_not_scored_leaves_no_earlier_test_predictions(tmp_path, capsys):
    """A resume in place with --no-test kept the earlier weights' test_predictions.json beside a
    metrics.json saying the test split was not scored."""
    run = tmp_path / "run"
    run.mkdir()
    mark_folder(run, "run")
    (run / "test_predictions.json").write_text("[]")
    (run / "notes.txt").write_text("mine")
    train.write_outputs(run, None, {"attention": "soft"}, skipped="--no-test")
    assert json.loads((run / "metrics.json").read_text())["test"] == "skipped (--no-test)"
    assert sorted(p.name for p in run.iterdir()) == sorted([MARKER, "metrics.json", "notes.txt"])


@pytest.mark.parametrize("override", ["optim.adam_bias_correction=false", "optim.lr=0.0004",
                                      "model.encoder.fine_tune_from=null"])
def test_a_resume_refuses_settings_its_optimiser_state_decides(tmp_path, one_epoch, override, capsys):
    """The restored optimiser state traced back (another Adam, other trained parameters) or silently
    kept its own learning rates over --set."""
    before = _files(one_epoch)
    argv = ["--resume", str(one_epoch / "last.ckpt"), "--out-dir", str(tmp_path / "new"), "--max-epochs", "2",
            "--set", override, "--no-progress", "--no-test"]
    assert train.main(argv) == 1
    message = capsys.readouterr().err.strip()
    key = override.split("=")[0]
    assert message.startswith(f"error: --resume cannot change {key} (") and "\n" not in message
    assert _files(one_epoch) == before and not (tmp_path / "new").exists()


def test_evaluate_checks_its_folder_before_decoding(tmp_path, one_epoch, capsys):
    """Item 9: evaluate decoded and scored the whole split, then failed to write with a traceback."""
    from captioning.evaluation import run as evaluate

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert evaluate.main(["--checkpoint", str(one_epoch / "best.ckpt"), "--split", "val", "--metrics", "bleu",
                          "--out-dir", str(blocker / "eval")]) == 2
    out, err = capsys.readouterr()
    assert "decoded" not in out
    assert err.strip() .splitlines()[-1].startswith(f"error: cannot write results into {blocker / 'eval'}")


def _example(tmp_path: Path, **kwargs) -> tuple[Path, Path]:
    from captioning.data.examples import write_example_dataset

    return write_example_dataset(tmp_path / "source", 20, image_size=24, **kwargs)


def test_prepare_refuses_a_wrong_images_folder_and_warns_without_a_test_split(tmp_path, capsys):
    """Item 7 (a wrong --images gave an empty 'complete' dataset) and item 4 (no test split, no word)."""
    from captioning.data import run as prepare

    captions, images = _example(tmp_path, test=0)
    assert prepare.main(["--captions", str(captions), "--images", str(tmp_path), "--out", str(tmp_path / "p"),
                         "--image-size", "16", "--no-progress"]) == 2
    assert "no image file of the dataset is in" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    prepare.run(["--captions", str(captions), "--images", str(images), "--out", str(tmp_path / "p"),
                 "--image-size", "16", "--no-progress"])
    assert "warning: the source has no test split" in capsys.readouterr().err


def test_a_fixed_image_is_decoded_again_on_a_resumed_preparation(tmp_path, monkeypatch, capsys):
    """Item 10: an image unreadable in an interrupted run stayed 'unreadable' after being fixed."""
    from captioning.data import prepare as prepare_module
    from captioning.data import run as prepare

    captions, images = _example(tmp_path)
    good = (images / "images" / "img_5.jpg").read_bytes()
    (images / "images" / "img_5.jpg").write_bytes(b"not a jpeg")
    args = ["--captions", str(captions), "--images", str(images), "--out", str(tmp_path / "p"),
            "--image-size", "16", "--chunk-size", "4", "--no-progress", "--workers", "1"]
    monkeypatch.setattr(prepare_module, "_histogram", lambda lengths: (_ for _ in ()).throw(KeyboardInterrupt))
    assert prepare.main(args) == 130 and (tmp_path / "p.partial").is_dir()  # interrupted after decoding
    assert capsys.readouterr().err == (f"error: interrupted (Ctrl-C); {tmp_path / 'p'}.partial keeps the finished "
                                       "chunks: run the same command again to resume\n")
    monkeypatch.undo()
    (images / "images" / "img_5.jpg").write_bytes(good)
    manifest = prepare.run(args)
    assert manifest["summary"]["skipped"] == {}


def test_caption_output_is_one_line_per_image_and_notes_tiny_images(tmp_path, one_epoch, capsys):
    """Item 10: a file name with a newline split its TSV record; a 1x1 image got no note."""
    from PIL import Image

    from captioning.caption import run as caption

    odd = tmp_path / "two\nlines.png"
    Image.new("RGB", (40, 40), "red").save(odd)
    Image.new("RGB", (1, 1), "blue").save(tmp_path / "dot.png")
    assert caption.main(["--checkpoint", str(one_epoch / "best.ckpt"), str(odd), str(tmp_path / "dot.png")]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().split("\n")
    assert len(lines) == 2 and lines[0].startswith(str(tmp_path / "two\\nlines.png") + "\t")
    assert "dot.png is 1x1 pixels" in err


def test_a_full_disk_during_training_is_one_line_naming_the_folder(small_disk, data_root, capsys):
    """Item 3: a full disk left truncated checkpoints and a traceback."""
    folder, _ = small_disk
    out = folder / "run"
    assert train.main(tiny_args(out, data_root, "--max-epochs", "1")) == 1
    message = capsys.readouterr().err.splitlines()[-1]
    assert message.startswith(f"error: cannot write into {out}: no space left on the device") and "\n" not in message
    left = sorted(p.name for p in out.iterdir())
    assert "best.ckpt" not in left and "last.ckpt" not in left and "train.lock" not in left
    assert not [name for name in left if name.startswith(".tmp-")]


def test_a_full_disk_at_the_results_says_how_to_score_again(tmp_path, data_root, monkeypatch):
    from captioning.files import FileWriteError

    def full(path, *args, **kwargs):
        raise FileWriteError(28, f"cannot write into {Path(path).parent}: no space left on the device")

    monkeypatch.setattr(train, "atomic_write_json", full)
    out = tmp_path / "run"
    with pytest.raises(CommandFailed) as info:
        train.run(tiny_args(out, data_root, "--max-epochs", "1", "--no-test"))
    message = str(info.value)
    assert "no space left on the device" in message and "\n" not in message
    assert f"captioning evaluate --checkpoint {out / 'best.ckpt'} --split test' computes the test scores" in message


def test_random_bytes_are_not_said_to_hold_pickled_objects(tmp_path):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "is not a readable checkpoint" in str(info.value) and "pickled" not in str(info.value)
    torch.save({"args": __import__("argparse").Namespace(a=1)}, path)  # a class: refused by weights_only
    with pytest.raises(CheckpointError, match="holds pickled objects"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------ Ctrl-C

INTERRUPTED_IMPORT = r"""
import importlib.abc, runpy, sys
class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pytorch_lightning":
            raise KeyboardInterrupt  # what Ctrl-C raises while Lightning is being imported
sys.meta_path.insert(0, CtrlC())
entry, sys.argv = sys.argv[1], sys.argv[1:]
if entry == "cli":
    from captioning.cli import main
    sys.exit(main(sys.argv[1:]))
runpy.run_path(entry, run_name="__main__")
"""


@pytest.mark.parametrize("entry", ["cli", "scripts/train.py"])
def test_ctrl_c_during_the_imports_is_one_line_and_status_130(tmp_path, entry):
    """Ctrl-C during the seconds of imports printed a 35-line KeyboardInterrupt traceback."""
    args = (["train"] if entry == "cli" else []) + ["--out-dir", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT, entry, *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 130 and proc.stderr == "error: interrupted (Ctrl-C)\n", proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_ctrl_c_at_any_moment_of_a_start_is_one_line(tmp_path, data_root):
    """Interrupted in the middle of importing torch, a process aborted in C++ ("terminate called
    after throwing ... KeyboardInterrupt"); in numpy's, it failed later with a RecursionError.

    What a Ctrl-C meets depends only on where the main thread is: inside an import (any module:
    console._interrupt sees an importlib frame and sends the signal again until it lands outside),
    past the imports but before fit (train.run's KeyboardInterrupt), or in fit (run_guarded; also
    test_sigterm_and_sigint_exit_non_zero_saying_how_to_resume). So three starts: 0.5 s and 1.5 s
    after the launch (torch's C extensions, then numpy's or Lightning's imports, on any machine
    that takes seconds to import them; earlier, a busy machine may not have reached the package's
    code), and once the run folder is marked (train marks it after every import: the data, the
    model, the trainer, on a fast machine the first steps)."""
    for i, when in enumerate((0.5, 1.5, MARKER)):
        out = tmp_path / f"run{i}"
        marker = out / MARKER
        proc = subprocess.Popen([sys.executable, "-m", "captioning", "train", *tiny_args(out, data_root)],
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_terminal)
        deadline = time.monotonic() + (when if isinstance(when, float) else 300)
        while proc.poll() is None and time.monotonic() < deadline and not (when == MARKER and marker.exists()):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 130, (when, err[-2000:])
        # Still starting: "interrupted (Ctrl-C)"; already training (a fast machine): "stopped by SIGINT".
        assert "Traceback" not in err, (when, err[-2000:])
        assert lines[-1].startswith(("error: interrupted", "error: stopped by SIGINT")), (when, err[-2000:])
