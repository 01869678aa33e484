"""Training logs: --logger tensorboard (TensorBoard event files beside the CSV log) and the
attention heatmaps of fixed validation images written at every validation."""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path

import pytest

from captioning.training.run import run
from captioning.training.trainer import Trainer, build_loggers

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



def test_dependency_noise_is_dropped_only_while_the_trainer_is_built_and_runs(tmp_path, caplog):
    """Lightning's advert is not logged when the Trainer is built; inside the Trainer's filter a
    warning of the user's own code still shows, and outside it the same messages show again."""
    from captioning.training.trainer import _quiet_dependencies

    lightning = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    advert = "💡 Tip: For seamless cloud logging, try installing [litlogger](https://pypi.org/project/litlogger/)"
    with caplog.at_level(logging.INFO, lightning.name):
        Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    assert caplog.records and not [r for r in caplog.records if "litlogger" in r.getMessage()]

    caplog.clear()
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO, lightning.name):
        warnings.simplefilter("always")
        with _quiet_dependencies():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn(f"Checkpoint directory {tmp_path} exists and is not empty.")
            warnings.warn("the user's own warning")
            lightning.info(advert)
        warnings.warn(f"Checkpoint directory {tmp_path} exists and is not empty.")
        lightning.info(advert)
    assert [str(w.message) for w in seen] == ["the user's own warning",
                                             f"Checkpoint directory {tmp_path} exists and is not empty."]
    assert [r.getMessage() for r in caplog.records] == [advert]
