"""Loading a trained model from its checkpoint alone: config, vocabulary and weights.

Checkpoints are Lightning's files (``best.ckpt``, ``last.ckpt``) holding plain types only:
``hyper_parameters = {"config": nested dict, "vocab": [words]}`` and ``state_dict`` with the
model's weights under ``model.`` (and the REINFORCE baseline's). No class of ours is pickled
(``torch.load(path, weights_only=True)`` reads them), so any later version of this package that
reads the same config keys can load them.
"""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from captioning import provenance
from captioning.config import Config, checked, merge
from captioning.model_folder import CheckpointError, LoadedModel
from captioning.models import ShowAttendTell
from captioning.vocab import Vocabulary


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give a file in it, such as {path / 'best.ckpt'}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file (a pipe, socket or device)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # bytes that are no pickle of ours at all, or cut short
            raise CheckpointError(f"{path} is not a readable checkpoint: not a PyTorch file, or truncated") from None
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
    if not isinstance(hp.get("config"), dict):
        raise CheckpointError(f"{path} is damaged: its config is {type(hp.get('config')).__name__}, not a mapping")
    cfg = checked(hp["config"], path, CheckpointError)
    try:
        vocab = Vocabulary(hp.get("vocab"))
    except ValueError as err:
        raise CheckpointError(f"{path} holds a damaged vocabulary: {err}") from None
    return at_workdir(cfg, ckpt.get("workdir")), vocab


def at_workdir(cfg: Config, workdir: str | None) -> Config:
    """``cfg`` with its relative data paths (data.root, data.feature_cache) made absolute against
    ``workdir``, the folder the training ran in (captioning/training/trainer.py RunPlace), so that a
    command run elsewhere reads the run's own data. A path moves there only when what it names
    exists there (:func:`_present`): the recorded folder, maybe someone else's, is never written
    into. Without a ``workdir`` (an older checkpoint) the paths stay as they are."""
    if not isinstance(workdir, str) or not workdir:
        return cfg
    data = cfg.data
    paths = {"root": data.root, "feature_cache": data.feature_cache}
    changed = {key: str(Path(workdir) / value) for key, value in paths.items()
               if value is not None and not Path(value).is_absolute() and _present(Path(workdir) / value, key, cfg)}
    return replace(cfg, data=replace(data, **changed)) if changed else cfg


def _present(path: Path, key: str, cfg: Config) -> bool:
    """Whether the data that ``path`` (data.``key`` resolved in the recorded folder) names is there:
    for data.root, the dataset's folder under it (SOURCES: the synthetic set's generated one)."""
    if key == "root":
        from captioning.data.sources import source_for

        try:
            path = source_for(cfg.data).folder_at(path)
        except (OSError, ValueError):
            return False
    return path.exists()


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, Any], path: str | Path) -> None:
    """Raise CheckpointError naming the first key that is missing, unexpected or of another shape."""
    for key, value in expected.items():
        if key not in found:
            raise CheckpointError(f"{path}: weights do not match the model: '{key}' is missing")
        shape = tuple(getattr(found[key], "shape", ()))
        if not isinstance(found[key], torch.Tensor) or shape != tuple(value.shape):
            raise CheckpointError(f"{path}: weights do not match the model: '{key}' has shape {shape}, "
                                  f"the model's is {tuple(value.shape)}")
    extra = [key for key in found if key not in expected]
    if extra:
        raise CheckpointError(f"{path}: weights do not match the model: unexpected '{extra[0]}'")


def check_resumable(ckpt: dict, path: str | Path) -> None:
    """A checkpoint to continue training from needs the loop's state, not only the weights, and that
    state of the types and keys Lightning restores it from (else CheckpointError, one line)."""
    missing = [k for k in ("optimizer_states", "loops") if not ckpt.get(k)]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed: it holds weights only (no {' or '.join(missing)}); "
                              "resume from a last.ckpt or best.ckpt written by training")
    damage = _training_state_damage(ckpt)
    if damage is not None:
        raise CheckpointError(f"{path} cannot be resumed: its training state is damaged ({damage}); "
                              "resume from another checkpoint")


def _training_state_damage(ckpt: dict) -> str | None:
    """What in a checkpoint's training state is not as Lightning writes it (and would trace back as it
    is restored), named in a few words; None when nothing is."""
    for key in ("epoch", "global_step"):
        value = ckpt.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{key} is a {type(value).__name__}, not a count"
        if value < 0:
            return f"{key} is {value}"
    optimizers = ckpt["optimizer_states"]
    if not isinstance(optimizers, list):
        return f"optimizer_states is a {type(optimizers).__name__}, not a list"
    for i, state in enumerate(optimizers):
        moments = state.get("state") if isinstance(state, dict) else None
        groups = state.get("param_groups") if isinstance(state, dict) else None
        if not isinstance(moments, dict) or not all(isinstance(value, dict) for value in moments.values()) \
                or not isinstance(groups, list) \
                or not all(isinstance(group, dict) and isinstance(group.get("params"), list) for group in groups):
            return f"optimizer_states[{i}] is not an optimiser's state and parameter groups"
    schedulers = ckpt.get("lr_schedulers", [])
    if not isinstance(schedulers, list) or not all(isinstance(state, dict) for state in schedulers):
        return "lr_schedulers is not a list of states"
    loops = ckpt["loops"]
    fit_loop = loops.get("fit_loop") if isinstance(loops, dict) else None
    if not isinstance(fit_loop, dict) or not all(isinstance(value, dict) for value in fit_loop.values()):
        return "loops has no fit_loop state, or a damaged one"
    callbacks = ckpt.get("callbacks", {})
    if not isinstance(callbacks, dict) or not all(isinstance(state, dict) for state in callbacks.values()):
        return "callbacks is not a mapping of states"
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model in eval mode from a checkpoint file alone."""
    return load_checkpoint_and_data(path, map_location)[0]


def load_checkpoint_and_data(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[LoadedModel, dict]:
    """:func:`load_checkpoint`, and what the model was trained on (captioning/provenance.py)."""
    ckpt = read_checkpoint(path)
    cfg, vocab = checkpoint_config(ckpt, path)
    # The weights come from the checkpoint: never fetch ImageNet weights just to overwrite them.
    cfg = merge(cfg, {"model": {"encoder": {"weights": "none"}}})
    model = ShowAttendTell(cfg.model, len(vocab))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    check_state_dict(model.state_dict(), state, path)
    model.load_state_dict(state)
    trained_on = provenance.checked(ckpt["hyper_parameters"].get("training_data"), cfg, len(vocab))
    return LoadedModel(model.to(map_location).eval(), cfg, vocab), trained_on
