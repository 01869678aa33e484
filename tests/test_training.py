"""The training entry point end to end, with tiny settings on the synthetic dataset (CPU)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
from captioning.training import run as train  # (captioning train)

from captioning.checkpoint import load_checkpoint  # noqa: E402
from captioning.config import flatten, load_yaml  # noqa: E402
from captioning.console import CommandFailed  # noqa: E402
from captioning.files import MARKER  # noqa: E402


def tiny_args(tmp: Path, data_root: Path, *extra: str) -> list[str]:
    """configs/tiny.yaml as --set overrides (so --resume, which refuses --config, can use it too)."""
    settings = flatten(load_yaml(REPO / "configs" / "tiny.yaml"))
    settings["data.root"] = str(data_root)
    args = ["--out-dir", str(tmp), "--no-progress"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


# Soft's smoke run scores the test split; hard's skips it (--no-test: METEOR's Java start is most
# of a fast_dev_run), as hard_run below scores a hard model's test split and checks its metric keys.
@pytest.mark.parametrize("attention, scored", [pytest.param("soft", True, id="soft"),
                                               pytest.param("hard", False, id="hard")])
def test_fast_dev_run(tmp_path, data_root, attention, scored):
    result = train.run(tiny_args(tmp_path, data_root, "--attention", attention, "--fast-dev-run",
                                 *([] if scored else ["--no-test"])))
    assert result["attention"] == attention and result["global_step"] == 1  # one training batch
    if scored:
        assert {"bleu_1", "bleu_4", "caption_accuracy"} <= set(result["metrics"])
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "metrics.json").is_file()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])  # 16-mixed: bf16-mixed on a CPU
def test_mixed_precision_trains_with_gradient_clipping(tmp_path, data_root, precision):
    """Lightning cannot clip the gradients of a fused optimizer under mixed precision, and the
    default config clips: the step runs on the unfused Adam."""
    result = train.run(tiny_args(tmp_path, data_root, "--fast-dev-run", "--no-test",
                                 "--set", f"train.precision={precision}", "--set", "optim.grad_clip=5.0"))
    assert result["global_step"] == 1


def test_no_test_skips_the_test_split(tmp_path, data_root):
    """--no-test (scripts/compare.py scores with evaluate.py instead): no test metrics, no predictions."""
    result = train.run(tiny_args(tmp_path, data_root, "--attention", "soft", "--fast-dev-run", "--no-test"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test"].startswith("skipped") and "metrics" not in metrics and "train_seconds" in metrics
    assert "metrics" not in result and not (tmp_path / "test_predictions.json").exists()


def test_every_epoch_is_saved_between_validations(tmp_path, data_root):
    """train.val_every=2 over 3 epochs: last.ckpt and epochs/ still hold every epoch (docs/resume.md)."""
    train.run(tiny_args(tmp_path, data_root, "--max-epochs", "3", "--no-test", "--set", "train.val_every=2",
                        "--set", "train.save_every_epoch=true", "--set", "train.limit_train_batches=1"))
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "epochs").iterdir()) == [f"epoch{i}.ckpt" for i in range(3)]
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["epoch"] == 1  # the one validated epoch


@pytest.fixture(scope="module")
def hard_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("hard")
    result = train.run(tiny_args(out, data_root, "--attention", "hard", "--max-epochs", "2"))
    return out, result


def test_outputs_describe_themselves(hard_run):
    out, result = hard_run
    for name in ("best.ckpt", "last.ckpt", "config.yaml", "metrics.json", "test_predictions.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scale"] == "0-1" and metrics["split"] == "test"
    assert metrics["num_images"] == 8  # every test image decoded once
    assert {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "caption_accuracy"} <= set(metrics["metrics"])
    assert all(0.0 <= metrics["metrics"][k] <= 1.0 for k in ("bleu_4", "caption_accuracy"))
    predictions = json.loads((out / "test_predictions.json").read_text())
    assert sorted(p["image_id"] for p in predictions) == sorted(set(p["image_id"] for p in predictions))
    # Plain types only: loadable without our classes, and carries config + vocabulary + weights.
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["config"]["model"]["attention"] == "hard"
    assert ckpt["hyper_parameters"]["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert "baseline.value" in ckpt["state_dict"]
    model, cfg, vocab = load_checkpoint(out / "best.ckpt")
    assert cfg.model.attention == "hard" and len(vocab) == model.decoder.vocab_size
    # What the model was trained on, as counted when it trained (captioning/provenance.py).
    trained_on = ckpt["hyper_parameters"]["training_data"]
    assert trained_on["name"].startswith("synthetic-v") and trained_on["name"].endswith("-n32-8-8-s32-c5")
    assert trained_on == {"dataset": "synthetic", "name": trained_on["name"], "vocab_size": len(vocab),
                          "train_images": 32}  # configs/tiny.yaml: 32 training scenes


def test_validation_logs_cider_and_selects_on_bleu_4(hard_run):
    """Every validation scores CIDEr-D with the same scorer; best.ckpt still follows val/bleu_4."""
    import csv

    out, _ = hard_run
    rows = [r for r in csv.DictReader((out / "logs" / "metrics.csv").open()) if r.get("val/bleu_4")]
    assert len(rows) == 2 and all(r.get("val/cider") not in (None, "") for r in rows)
    assert all(float(r["val/cider"]) >= 0.0 for r in rows)
    ckpt = torch.load(out / "best.ckpt", map_location="cpu", weights_only=True)
    states = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint") and v.get("best_model_path")]
    best = [s for s in states if s["best_model_path"].endswith("best.ckpt")]
    assert len(best) == 1 and best[0]["monitor"] == "val/bleu_4"


def test_training_signal_is_logged(hard_run):
    """What scripts/compare.py plots: entropy, baseline, REINFORCE signal (NaN where nothing was
    sampled, never a stale repeat) and wall time per validation."""
    import csv
    import math

    out, _ = hard_run
    with (out / "logs" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r.get("train/sampled")]
    assert {float(r["train/sampled"]) for r in train_rows} == {0.0, 1.0}  # both kinds of minibatch occurred
    for r in train_rows:
        assert 0.0 < float(r["train/attention_entropy"]) <= math.log(16) + 1e-5  # 4x4 grid
        var, sq, mean = (float(r[f"train/reinforce_signal_{k}"]) for k in ("var", "sq", "mean"))
        if float(r["train/sampled"]) == 0.0:
            assert math.isnan(var) and math.isnan(sq)
        else:
            assert var >= 0.0 and sq == pytest.approx(var + mean ** 2, rel=1e-4, abs=1e-7)
    elapsed = [float(r["val/elapsed_s"]) for r in rows if r.get("val/elapsed_s")]
    assert len(elapsed) == 2 and 0.0 < elapsed[0] < elapsed[1]


def test_baseline_moves_during_hard_training(hard_run):
    out, _ = hard_run
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    # b starts at 0 and is pulled towards the (positive) token NLL at every step.
    assert float(ckpt["state_dict"]["baseline.value"]) > 0.1


def test_resume_continues_from_the_same_step(hard_run, tmp_path, data_root):
    out, _ = hard_run
    before = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    steps_per_epoch = before["global_step"] // 2
    resumed = tmp_path / "resumed"
    # --no-test: this checks the training state carried over; hard_run checks the test scoring.
    result = train.run(tiny_args(resumed, data_root, "--resume", str(out / "last.ckpt"), "--max-epochs", "3",
                                 "--no-test"))
    after = torch.load(resumed / "last.ckpt", map_location="cpu", weights_only=True)
    assert result["attention"] == "hard"  # the config came from the checkpoint
    assert after["global_step"] == before["global_step"] + steps_per_epoch
    assert after["epoch"] == 2
    # Adam's state was restored, not restarted: its step count kept counting.
    step_before = before["optimizer_states"][0]["state"][0]["step"]
    step_after = after["optimizer_states"][0]["state"][0]["step"]
    assert float(step_after) == float(step_before) + steps_per_epoch
    # The baseline continued from its saved value (a restart from 0 would sit far lower).
    b0 = float(before["state_dict"]["baseline.value"])
    b1 = float(after["state_dict"]["baseline.value"])
    assert abs(b1 - b0) < 0.5 * b0


def test_resume_in_the_same_folder_keeps_the_earlier_log(hard_run, tmp_path, data_root):
    """Lightning's CSVLogger deletes metrics.csv on start; a resumed run must keep its history."""
    out, _ = hard_run
    again = tmp_path / "again"
    shutil.copytree(out, again)
    # A copied run folder is not taken as the run's (its marker names the original): give the copy
    # the marker the run's own folder would carry, its real path and the id the checkpoints record.
    marker = json.loads((out / MARKER).read_text())
    (again / MARKER).write_text(json.dumps({**marker, "folder": os.path.realpath(again)}))
    epochs_before = _val_epochs(again / "logs" / "metrics.csv")
    assert epochs_before == [0, 1]
    train.run(tiny_args(again, data_root, "--resume", str(again / "last.ckpt"), "--max-epochs", "3", "--no-test"))
    assert _val_epochs(again / "logs" / "metrics.csv") == [0, 1, 2]


def _val_epochs(path: Path) -> list[int]:
    with path.open(newline="") as f:
        return [int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("val/bleu_4")]


def test_unknown_config_key_fails_naming_it(tmp_path, data_root, capsys):
    with pytest.raises(CommandFailed) as err:
        train.run(tiny_args(tmp_path, data_root, "--set", "model.decoder.hiden_dim=8"))
    assert "model.decoder.hiden_dim" in str(err.value) and err.value.exit_status == 1
    assert train.main(tiny_args(tmp_path, data_root, "--set", "optim.lr=fast")) == 1
    assert "optim.lr" in capsys.readouterr().err


def test_config_file_holds_differences(tmp_path, data_root):
    config = tmp_path / "small.yaml"
    config.write_text("model:\n  decoder:\n    dropout: 0.1\n")
    # --no-test: config.yaml is written before training starts; scoring the test split adds nothing here.
    train.run(tiny_args(tmp_path / "run", data_root, "--config", str(config), "--fast-dev-run", "--no-test"))
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "dropout: 0.1" in saved


def test_ddp_two_cpu_processes(tmp_path, data_root):
    """Two CPU processes (gloo): every test image scored exactly once after gathering."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--devices", "2", "--attention", "hard",
           "--max-epochs", "1", "--set", "train.accelerator=cpu",
           *tiny_args(tmp_path, data_root)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_images"] == 8
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    # 32 images, 8 per device, 2 devices: 2 steps per epoch.
    assert ckpt["global_step"] == 2
