"""Training logs: --logger tensorboard (TensorBoard event files beside the CSV log) and the
attention heatmaps of fixed validation images written at every validation."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from captioning.training.run import run
from captioning.training.trainer import build_loggers

REPO = Path(__file__).resolve().parents[1]


def test_tensorboard_logger_and_attention_heatmaps(tmp_path):
    pytest.importorskip("tensorboard", reason="--logger tensorboard needs the tensorboard extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run(["--config", str(REPO / "configs" / "tiny.yaml"), "--max-epochs", "2", "--out-dir", str(out),
         "--set", f"data.root={tmp_path / 'data'}", "--no-progress", "--no-test", "--logger", "tensorboard"])
    figures = sorted(p.name for p in (out / "attention").iterdir())
    steps = sorted({name.split("_")[0] for name in figures})
    assert len(steps) == 2 and len(figures) == 8  # 4 fixed validation images at each of 2 validations
    with (out / "logs" / "metrics.csv").open() as f:
        assert any(row.get("val/bleu_4") for row in csv.DictReader(f))  # the CSV log is kept
    events = EventAccumulator(str(out / "logs" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "val/bleu_4" in events.Tags()["scalars"]
    images = [tag for tag in events.Tags()["images"] if tag.startswith("attention/")]
    assert len(images) == 4 and all(len(events.Images(tag)) == 2 for tag in images)


def test_unknown_logger_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="unknown logger 'wandb'; choose csv or tensorboard"):
        build_loggers(tmp_path, "wandb")
