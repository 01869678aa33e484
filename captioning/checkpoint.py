"""Loading a trained model from its checkpoint alone: config, vocabulary and weights.

Checkpoints are Lightning's files (``best.ckpt``, ``last.ckpt``) holding plain types only:
``hyper_parameters = {"config": nested dict, "vocab": [words]}`` and ``state_dict`` with the
model's weights under ``model.``. No class of ours is pickled, so any later version of this
package that reads the same config keys can load them.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import NamedTuple

import torch

from captioning.config import Config, ConfigError, from_dict, merge
from captioning.models import ShowAttendTell
from captioning.vocab import Vocabulary


class CheckpointError(ValueError):
    """A checkpoint is missing, not a checkpoint, or from an incompatible version."""


class LoadedModel(NamedTuple):
    model: ShowAttendTell
    config: Config
    vocab: Vocabulary


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses pickled classes: not one of ours, which hold plain types only.
        raise CheckpointError(f"{path} holds pickled objects, so it is not a show-attend-tell checkpoint") from None
    except Exception as err:  # torch.load raises many types on garbage (KeyError, EOFError, ...)
        raise CheckpointError(
            f"{path} is not a readable checkpoint: not a PyTorch file, or truncated ({type(err).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(
            f"{path} is not a show-attend-tell checkpoint (no config/vocab/state_dict); "
            "use best.ckpt or last.ckpt written by captioning train"
        )
    return ckpt


def checkpoint_config(ckpt: dict, path: str | Path = "checkpoint") -> tuple[Config, Vocabulary]:
    hp = ckpt["hyper_parameters"]
    try:
        cfg = from_dict(hp["config"])
        vocab = Vocabulary(hp["vocab"])
    except (ConfigError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path} was written by an incompatible version: {err}") from None
    return cfg, vocab


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model in eval mode from a checkpoint file alone."""
    ckpt = read_checkpoint(path)
    cfg, vocab = checkpoint_config(ckpt, path)
    # The weights come from the checkpoint: never fetch ImageNet weights just to overwrite them.
    cfg = merge(cfg, {"model": {"encoder": {"weights": "none"}}})
    model = ShowAttendTell(cfg.model, len(vocab))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match its own config ({str(err).splitlines()[0]})") from None
    return LoadedModel(model.to(map_location).eval(), cfg, vocab)
