"""A model folder's description files, read and checked without torch, so that the PyTorch
loader (captioning/checkpoint.py) and the ONNX engine (captioning/export/runtime.py) check a
folder the same way:

    config.json   {"format", "format_version", "vocab_size", "vocab_sha256", "config", "training_data"
                   (captioning/provenance.py), "run"?}
    vocab.json    the vocabulary, a list of words (ids are positions)
    onnx.json     (ONNX exports only) {"encoder", "step", "attention", "hard_mode", "opset", "image_size",
                  "sha256": {file: digest} of the graphs and of the files they were exported from
                  (config.json, vocab.json, model.safetensors), "shapes": {"encoder"|"step":
                  {"inputs"|"outputs": {name: [dim, ...]}}} with "?" for a free dimension}

``run`` (optional) is what the training run's metrics.json said of the model (its test scores and
the command that trained it), so that a model card written again from the folder keeps them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from captioning.console import CaptioningError
from captioning.config import Config, ConfigError, checked
from captioning.vocab import Vocabulary


class CheckpointError(CaptioningError, ValueError):
    """A checkpoint or model folder is missing, damaged, or from an incompatible version."""


FOLDER_FORMAT = "show-attend-tell"
FOLDER_FORMAT_VERSION = 1
FOLDER_FILES = ("config.json", "vocab.json", "model.safetensors", "README.md")
#: Files derived from the weights (the ONNX export's), removed when new weights are saved.
STALE_AFTER_SAVE = ("onnx.json", "encoder.onnx", "step.onnx")
#: What the training run's metrics.json may pass on to a model folder (config.json "run").
RUN_KEYS = ("command", "metrics", "num_images", "epochs", "global_step", "train_seconds")


def vocab_fingerprint(vocab: Vocabulary) -> str:
    """sha256 of the words in order: ties a vocab.json to the weights it was saved with."""
    return hashlib.sha256(json.dumps(vocab.words).encode()).hexdigest()


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a model folder holds {', '.join(FOLDER_FILES)}")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0]
        raise CheckpointError(f"{path} is damaged (not JSON: {reason}); copy the folder again") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None


def read_folder_meta(folder: str | Path) -> tuple[dict, Config, Vocabulary]:
    """config.json and vocab.json of a model folder -> (meta, config, vocabulary), checked against
    each other and the config validated. Raises CheckpointError (one line) for a missing, damaged,
    out-of-range or mismatched file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist (write one with Captioner.save_pretrained "
                              "or 'captioning export')")
    meta, words = _read_json(folder / "config.json"), _read_json(folder / "vocab.json")
    if not isinstance(meta, dict) or meta.get("format") != FOLDER_FORMAT or "config" not in meta:
        raise CheckpointError(f"{folder / 'config.json'} is not a show-attend-tell model folder's config")
    if meta.get("format_version") != FOLDER_FORMAT_VERSION:
        raise CheckpointError(f"{folder} has model folder format version {meta.get('format_version')!r}; "
                              f"this version reads {FOLDER_FORMAT_VERSION}")
    try:
        cfg = checked(meta["config"], f"{folder / 'config.json'} holds a damaged or incompatible config")
    except ConfigError as err:
        raise CheckpointError(err) from None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise CheckpointError(f"{folder / 'vocab.json'} is not a list of words; copy the folder again")
    try:
        vocab = Vocabulary(words)
    except ValueError as err:
        raise CheckpointError(f"{folder / 'vocab.json'} is damaged: {err}") from None
    if len(vocab) != meta.get("vocab_size") or vocab_fingerprint(vocab) != meta.get("vocab_sha256"):
        raise CheckpointError(f"{folder / 'vocab.json'} ({len(vocab)} words) is not the vocabulary this model was "
                              f"saved with ({meta.get('vocab_size')} words); copy the folder's files together")
    return meta, cfg, vocab


def read_onnx_meta(folder: str | Path, cfg: Config) -> dict:
    """onnx.json of an exported folder, checked against the folder's config (attention, image size)
    and naming graph files inside the folder. Raises CheckpointError (one line)."""
    folder = Path(folder)
    path = folder / "onnx.json"
    meta = _read_json(path)
    fix = "export it again with 'captioning export --format onnx'"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a mapping of what the graphs are; {fix}")
    for key, kind in (("encoder", str), ("step", str), ("attention", str), ("image_size", int)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"{path} lacks '{key}' ({kind.__name__}); {fix}")
    for key in ("encoder", "step"):
        if Path(meta[key]).name != meta[key] or meta[key] in ("", ".", ".."):
            raise CheckpointError(f"{path}: '{key}' must name a file in the folder, got {meta[key]!r}; {fix}")
    if meta["attention"] != cfg.model.attention or meta["image_size"] != cfg.data.image_size:
        raise CheckpointError(f"{path} describes {meta['attention']} attention at {meta['image_size']} pixels, but "
                              f"config.json a {cfg.model.attention} attention model at {cfg.data.image_size}; {fix}")
    if cfg.model.attention == "hard" and meta.get("hard_mode") not in ("expected", "argmax"):
        raise CheckpointError(f"{path}: 'hard_mode' is {meta.get('hard_mode')!r}, not expected or argmax; {fix}")
    digests, shapes = meta.get("sha256"), meta.get("shapes")
    if not isinstance(digests, dict) or not isinstance(shapes, dict):
        raise CheckpointError(f"{path} records no fingerprints of the graphs and weights (an older export); {fix}")
    # The graphs carry their own copy of the weights: a graph, config or weights file from another
    # model would otherwise caption with that model's weights, or fail inside onnxruntime.
    for name in ONNX_FINGERPRINTED + (meta["encoder"], meta["step"]):
        if digests.get(name) != file_sha256(folder / name):
            raise CheckpointError(f"{folder / name} is not the file the ONNX graphs were exported with (its "
                                  f"fingerprint differs from onnx.json's): copy the folder's files together, or {fix}")
    return meta


#: The files of a model folder whose fingerprints onnx.json records, beside the graphs'.
ONNX_FINGERPRINTED = ("config.json", "vocab.json", "model.safetensors")


def file_sha256(path: Path) -> str | None:
    """The sha256 of a regular file's bytes, or None when it is missing or not a regular file."""
    from captioning.files import open_regular

    try:
        fd = open_regular(path)
    except OSError:
        return None
    digest = hashlib.sha256()
    with open(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_graph_shapes(path: Path, recorded: Any, found: dict, fix: str) -> None:
    """Refuse (CheckpointError) a graph whose inputs and outputs are not the ones onnx.json
    recorded at export. ``found``: {"inputs"|"outputs": {name: [dim, ...]}}, "?" for a free dim."""
    if recorded != found:
        raise CheckpointError(f"{path}'s inputs and outputs are not the ones recorded in onnx.json at export "
                              f"({_shape_text(found)} instead of {_shape_text(recorded)}); {fix}")


def _shape_text(shapes: Any) -> str:
    if not isinstance(shapes, dict):
        return repr(shapes)[:80]
    return "; ".join(f"{k} {v}" for k, v in shapes.items())[:200]


def run_record(metrics: dict | None) -> dict | None:
    """The part of a training run's metrics.json that a model folder keeps (config.json "run")."""
    if not isinstance(metrics, dict):
        return None
    record = {key: metrics[key] for key in RUN_KEYS if key in metrics}
    return record or None
