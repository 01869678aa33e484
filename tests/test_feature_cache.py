"""The frozen-encoder feature cache (captioning/data/feature_cache.py) on a tiny synthetic set:
built once with its sizes stated, read memory-mapped, the same loss as running the encoder,
refused when anything that made it has changed, and training from it end to end."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from conftest import random_captions
from captioning.config import ConfigError, build_config
from captioning.console import CommandFailed
from captioning.data import feature_cache
from captioning.data.datamodule import CaptionDataModule
from captioning.data.feature_cache import FeatureCacheError, attach_feature_cache, size_report
from captioning.losses import caption_loss
from captioning.training.module import CaptioningModule

REPO = Path(__file__).resolve().parents[1]
from captioning.training import run as train  # (captioning train)
from test_training import tiny_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FROZEN = "model.encoder.fine_tune_from=null"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def tiny(data_root: Path, cache: Path | None, *overrides: str):
    extra = [f"data.root={data_root}", FROZEN] + ([f"data.feature_cache={cache}"] if cache else [])
    return build_config(REPO / "configs" / "tiny.yaml", extra + list(overrides))


def data_and_module(cfg, seed: int = 0) -> tuple[CaptionDataModule, CaptioningModule]:
    """As scripts/train.py builds them: data first (the vocabulary), then the seeded model."""
    pl.seed_everything(seed, verbose=False)
    data = CaptionDataModule(cfg.data)
    data.prepare_data()
    data.setup("fit")
    return data, CaptioningModule.create(cfg, data.vocab)


def attach(cfg, data, module, logs: list[str] | None = None):
    log = logs.append if logs is not None else (lambda _: None)
    return attach_feature_cache(data, cfg, module.model.encoder, log=log, progress=False)


def test_cache_is_built_once_with_sizes_stated(tmp_path, data_root):
    cfg = tiny(data_root, tmp_path / "cache")
    data, module = data_and_module(cfg)
    logs: list[str] = []
    attach(cfg, data, module, logs)
    report = logs[0]
    assert "4x4x128 fp16 = 4 KiB per image" in report
    assert "train 32 images = 128 KiB" in report and "val 8 images" in report and "test 8 images" in report
    assert "COCO's 123,287 images" in report
    assert sum("computing" in line for line in logs) == 3  # train, val, test
    for split, n in (("train", 32), ("val", 8), ("test", 8)):
        array = np.load(tmp_path / "cache" / f"{split}.npy", mmap_mode="r")
        assert array.shape == (n, 16, 128) and array.dtype == np.float16
        meta = json.loads((tmp_path / "cache" / f"{split}.json").read_text())
        assert meta["image_ids"] == [r.image_id for r in data.load_split(split)]
        assert {"encoder", "encoder_weights_sha256", "image_size", "preprocessing", "split"} <= set(meta["fingerprint"])
    assert not list((tmp_path / "cache").glob("*.lock")) and not list((tmp_path / "cache").glob("*partial*"))

    batch = next(iter(data.train_dataloader()))  # the loaders now serve grids
    assert batch["images"].shape == (8, 16, 128) and batch["images"].dtype == torch.float16
    assert batch["captions"].shape[0] == 8 * cfg.data.captions_per_image

    stamp = os.stat(tmp_path / "cache" / "train.npy").st_mtime_ns
    data2, module2 = data_and_module(cfg)
    logs2: list[str] = []
    attach(cfg, data2, module2, logs2)  # a second run reuses it
    assert not any("computing" in line for line in logs2)
    assert os.stat(tmp_path / "cache" / "train.npy").st_mtime_ns == stamp


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_loss_from_the_cache_equals_the_encoders(tmp_path, data_root, attention):
    cfg = tiny(data_root, tmp_path / "cache", f"model.attention={attention}")
    data, module = data_and_module(cfg)
    images = torch.stack([data.images("train")[i] for i in range(4)])  # before attaching: pixels
    attach(cfg, data, module)
    grids = torch.stack([data.images("train")[i] for i in range(4)])  # after: fp16 grids
    model = module.model.eval()  # no dropout, the frozen encoder's batch-norm statistics
    captions = random_captions(8, len(data.vocab), seed=1)  # k = 2 captions per image
    losses = []
    with torch.no_grad():
        features, _ = model.encode(images)
        torch.testing.assert_close(grids.float(), features, rtol=2e-3, atol=2e-3)  # fp16 rounding only
        for inputs in (images, grids):
            out = model(inputs, captions, mode="expected")
            losses.append(caption_loss(cfg.loss, out, captions[:, 1:], terms=model.mechanism.loss_terms,
                                       baseline=torch.zeros(())).loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-4)


def test_changed_encoder_or_preprocessing_is_refused(tmp_path, data_root, monkeypatch):
    cache = tmp_path / "cache"
    cfg = tiny(data_root, cache)
    attach(cfg, *data_and_module(cfg))

    data, other_weights = data_and_module(cfg, seed=1)  # random weights from another seed
    with pytest.raises(FeatureCacheError) as err:
        attach(cfg, data, other_weights)
    message = str(err.value)
    assert "encoder_weights_sha256" in message and "delete" in message and "\n" not in message

    monkeypatch.setattr(feature_cache, "preprocessing_hash", lambda: "changed")
    with pytest.raises(FeatureCacheError, match="preprocessing"):
        attach(cfg, *data_and_module(cfg))
    monkeypatch.undo()

    coarser = tiny(data_root, cache, "model.encoder.grid_size=2")
    with pytest.raises(FeatureCacheError, match="encoder.grid_size"):
        attach(coarser, *data_and_module(coarser))

    attach(cfg, *data_and_module(cfg))  # the original setup still opens it


def test_other_images_are_refused(tmp_path, data_root):
    cache = tmp_path / "cache"
    cfg = tiny(data_root, cache)
    attach(cfg, *data_and_module(cfg))
    other = tiny(tmp_path / "other-data", cache, "data.synthetic.seed=5")  # the same ids, other pictures
    with pytest.raises(FeatureCacheError, match="split.images_sha256"):
        attach(other, *data_and_module(other))


@pytest.mark.parametrize("damage", [b"[1, 2]", b"\xff\xfe\x00{", b"{not json"])
def test_a_damaged_split_record_is_a_one_line_error(tmp_path, data_root, damage):
    cache = tmp_path / "cache"
    cfg = tiny(data_root, cache)
    attach(cfg, *data_and_module(cfg))
    (cache / "train.json").write_bytes(damage)
    with pytest.raises(FeatureCacheError, match="train.json is unreadable .*: delete .* to rebuild it") as err:
        attach(cfg, *data_and_module(cfg))
    assert "\n" not in str(err.value)


def test_no_room_is_refused_before_building(tmp_path, data_root, monkeypatch):
    cfg = tiny(data_root, tmp_path / "cache")
    free = type("Usage", (), {"free": 1000})()
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda _: free)
    with pytest.raises(FeatureCacheError, match="needs 192 KiB but .* has 1000 B free"):
        attach(cfg, *data_and_module(cfg))
    assert not list((tmp_path / "cache").glob("*.npy"))


def test_a_dead_builders_lock_is_taken_over(tmp_path, data_root):
    cache = tmp_path / "cache"
    cache.mkdir()
    import socket
    import subprocess

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (cache / "train.lock").write_text(f"{socket.gethostname()} {int(dead.stdout)}")
    cfg = tiny(data_root, cache)
    attach(cfg, *data_and_module(cfg))
    assert (cache / "train.json").is_file() and not (cache / "train.lock").exists()


def test_cached_split_pickles_without_its_mapping(tmp_path, data_root):
    cfg = tiny(data_root, tmp_path / "cache")
    data, module = data_and_module(cfg)
    cache = attach(cfg, data, module)
    split = cache.split("val")
    first = split[0]
    blob = pickle.dumps(split)  # what a DataLoader worker receives
    assert len(blob) < 1000
    torch.testing.assert_close(pickle.loads(blob)[0], first)
    with pytest.raises(FeatureCacheError, match="no 'extra' split"):
        cache.split("extra")


def test_size_report_for_coco_sizes():
    report = size_report(14, 2048, {"train": 82_783})
    assert "14x14x2048 fp16 = 784 KiB per image" in report  # the "about 800 KB"
    assert "train 82,783 images = 61.9 GiB" in report
    assert "COCO's 123,287 images at this size = 92.2 GiB" in report
    assert "grid_size 7: 23.0 GiB" in report and "512 channels, as VGG's conv5: 23.0 GiB" in report


def test_feature_cache_needs_a_frozen_encoder(tmp_path, data_root):
    with pytest.raises(ConfigError, match="fine_tune_from=null"):
        build_config(REPO / "configs" / "tiny.yaml", [f"data.feature_cache={tmp_path}"])
    with pytest.raises(CommandFailed, match="needs a frozen encoder"):
        train.run(tiny_args(tmp_path, data_root, "--feature-cache", str(tmp_path / "cache"), "--fast-dev-run"))


def test_train_script_trains_from_the_cache(tmp_path, data_root):
    cache = tmp_path / "cache"
    result = train.run(tiny_args(tmp_path / "run", data_root, "--feature-cache", str(cache), "--set", FROZEN,
                                  "--max-epochs", "1"))
    assert result["global_step"] == 4  # 32 images / batch 8
    assert result["num_images"] == 8 and "bleu_4" in result["metrics"]  # test split decoded from cached grids
    assert all((cache / f"{split}.json").is_file() for split in ("train", "val", "test"))
    ckpt = torch.load(tmp_path / "run" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["config"]["data"]["feature_cache"] == str(cache)
    assert any(k.startswith("model.encoder.stages") for k in ckpt["state_dict"])  # captions new images alone


def test_prepared_folder_trains_from_the_cache(tmp_path, data_root):
    """The COCO path: a folder from scripts/prepare_data.py, its training loader serving grids."""
    from captioning.data import run as prepare_data  # captioning prepare

    data, _ = data_and_module(tiny(data_root, None))  # the tiny synthetic set, generated
    source = data.root
    captions = [f"{s}={source / 'annotations' / f'captions_{s}.json'}" for s in ("train", "val", "test")]
    prepare_data.run(["--format", "coco", "--captions", *captions, "--images", str(source), "--image-size", "32",
                       "--out", str(tmp_path / "prepared")])
    cfg = tiny(data_root, tmp_path / "cache", "data.dataset=prepared", f"data.root={tmp_path / 'prepared'}")
    data, module = data_and_module(cfg)
    attach(cfg, data, module)
    batch = next(iter(data.train_dataloader()))
    assert batch["images"].shape == (8, 16, 128) and batch["images"].dtype == torch.float16
    first = data.source.folder.train_dataset(data.vocab, 1, 8).images[0]  # the store's own pixels, for comparison
    with torch.no_grad():
        expected, _ = module.model.eval().encode(first[None])
    torch.testing.assert_close(data.images("train")[0].float(), expected[0], rtol=2e-3, atol=2e-3)
