"""Shared small fixtures: a tiny config (random encoder weights, never a download), a tiny
vocabulary, helpers that build image and caption batches, and untrained checkpoints on a small
synthetic set (``untrained``), built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import pytest

# make test runs one pytest-xdist worker per core: each worker, and every process a test
# starts, computes on one thread, as two workers with a thread per core each would oversubscribe
# the CPU. Set before torch is imported, which reads it once.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from captioning.config import Config, merge
from captioning.vocab import SPECIALS, Vocabulary

REPO = Path(__file__).resolve().parents[1]

TINY_WORDS = ("a", "red", "blue", "green", "circle", "square", "triangle", "left", "right", "of")

# Small everywhere: 32x32 images, resnet18 cut at layer2 (stride 8 -> a 4x4 grid, D = 128).
TINY_OVERRIDES: dict[str, Any] = {
    "model": {
        "encoder": {"backbone": "resnet18", "stage": "layer2", "grid_size": 4, "weights": "none",
                    "fine_tune_from": "stem"},
        "decoder": {"embed_dim": 16, "hidden_dim": 32, "attention_dim": 16, "dropout": 0.0},
    },
    "data": {"image_size": 32, "batch_size": 4, "captions_per_image": 1, "max_caption_len": 8},
    "decode": {"max_len": 8},
}


def make_config(**dotted: Any) -> Config:
    """The tiny config with extra ``section__key=value`` style overrides, e.g.
    ``make_config(model__attention="hard", model__decoder__score="dot")``."""
    updates: dict[str, Any] = {}
    for key, value in dotted.items():
        node = updates
        parts = key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return merge(merge(Config(), TINY_OVERRIDES), updates)


def make_captions(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Word-id rows (without specials) -> [N, T+1] long: <start> w.. <end> <pad>..."""
    T1 = max(len(r) for r in rows) + 2
    out = torch.full((len(rows), T1), Vocabulary.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        seq = [Vocabulary.start_id, *r, Vocabulary.end_id]
        out[i, : len(seq)] = torch.tensor(seq)
    return out


def random_captions(n: int, vocab_size: int, min_len: int = 2, max_len: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (), generator=gen))
        rows.append(torch.randint(4, vocab_size, (length,), generator=gen).tolist())
    return make_captions(rows)


def random_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def greedy_decode(model, images: torch.Tensor, image_mask: torch.Tensor | None = None, max_len: int = 30,
                  mode: str = "expected"):
    """The greedy caption of each image (pixels, or annotation grids [B, L, D]) as padded tensors
    (captioning.decoding.Decoded): the search of captioning/search.py over the model's step."""
    from captioning.decoding import ModelSearch, best_captions
    from captioning.search import DecodeOptions

    return best_captions(ModelSearch(model)(images, DecodeOptions(max_len=max_len, hard_mode=mode), image_mask))


def save_untrained_checkpoint(cfg: Config, vocab: Vocabulary, path: Path, prefer_word: str | None = None,
                              seed: int = 0) -> Path:
    """An untrained model saved as Lightning's ModelCheckpoint saves it (as far as loading is
    concerned). ``prefer_word``: push the output layer towards this word, so that every caption
    contains it (e.g. a shape noun, which gives grounding words to score)."""
    from captioning.training.module import CaptioningModule

    torch.manual_seed(seed)
    module = CaptioningModule.create(cfg, vocab)
    if prefer_word is not None:
        with torch.no_grad():
            module.model.decoder.L_o.bias[vocab.index[prefer_word]] += 20.0
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


# The untrained checkpoints' settings: a 20/8/8-image synthetic set, captions of at most 5 words,
# and, over the defaults (not over a config file), a smaller decoder.
UNTRAINED = ("data.synthetic.num_train=20", "data.synthetic.num_val=8", "data.synthetic.num_test=8",
             "decode.max_len=5")
SMALL_DECODER = ("model.decoder.embed_dim=32", "model.decoder.hidden_dim=64", "model.decoder.attention_dim=32")
TINY_YAML = REPO / "configs" / "tiny.yaml"
HARD = ("model.attention=hard", "decode.hard_mode=argmax")


def first_test_shape(data) -> str:
    """The shape of the first test object: present in at least one test image (a ``prefer_word``
    that gives grounding words to score)."""
    return next(iter(data.scenes("test").values()))[0].shape


@pytest.fixture(scope="session")
def untrained(tmp_path_factory) -> Callable[..., SimpleNamespace]:
    """``untrained(*overrides, config=None, prefer_word=None, seed=0)``: an untrained checkpoint
    (see save_untrained_checkpoint; ``prefer_word`` a word or a function of the data module) of
    the defaults + SMALL_DECODER, or of ``config`` (a YAML file), + UNTRAINED + ``overrides``, on
    its synthetic set under one data root; each variant is built once per session.
    -> SimpleNamespace(cfg, data, ckpt, test_paths). Shared: read it, and copy it (``own_copy``)
    to change it or to write beside it."""
    from captioning.config import build_config
    from captioning.data.datamodule import CaptionDataModule

    root = tmp_path_factory.mktemp("untrained")
    made: dict[tuple, SimpleNamespace] = {}

    def make(*overrides: str, config: Path | None = None, prefer_word: str | Callable | None = None,
             seed: int = 0) -> SimpleNamespace:
        key = (overrides, config, prefer_word, seed)
        if key not in made:
            small = SMALL_DECODER if config is None else ()
            cfg = build_config(config, [f"data.root={root / 'data'}", *small, *UNTRAINED, *overrides])
            data = CaptionDataModule(cfg.data)
            data.prepare_data()
            data.setup("fit")
            word = prefer_word(data) if callable(prefer_word) else prefer_word
            ckpt = save_untrained_checkpoint(cfg, data.vocab, root / f"run{len(made)}" / "best.ckpt", word, seed)
            made[key] = SimpleNamespace(cfg=cfg, data=data, ckpt=ckpt,
                                        test_paths=[Path(r.path) for r in data.load_split("test")])
        return made[key]

    return make


def own_copy(ckpt: Path, folder: Path) -> Path:
    """``ckpt`` copied to ``folder``/best.ckpt, for a test that changes it or writes beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(ckpt, folder / "best.ckpt"))


@pytest.fixture
def seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """These tensors are tiny: one intra-op thread is faster, and far faster on a shared, busy CPU
    (oversubscribed OpenMP threads made a 4 s overfit run take 55 s). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config() -> Config:
    return make_config()


@pytest.fixture
def tiny_vocab() -> Vocabulary:
    return Vocabulary(list(SPECIALS) + list(TINY_WORDS))
