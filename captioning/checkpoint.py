"""Loading a trained model from its checkpoint alone: config, vocabulary and weights.

Checkpoints are Lightning's files (``best.ckpt``, ``last.ckpt``) holding plain types only:
``hyper_parameters = {"config": nested dict, "vocab": [words]}`` and ``state_dict`` with the
model's weights under ``model.``. No class of ours is pickled, so any later version of this
package that reads the same config keys can load them.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from captioning import provenance
from captioning.config import Config, ConfigError, checked, merge
from captioning.console import one_line
from captioning.model_folder import (FOLDER_FILES, FOLDER_FORMAT, FOLDER_FORMAT_VERSION,  # noqa: F401
                                     STALE_AFTER_SAVE, CheckpointError, read_folder_meta, run_record,
                                     vocab_fingerprint)
from captioning.models import ShowAttendTell
from captioning.vocab import Vocabulary


class LoadedModel(NamedTuple):
    model: ShowAttendTell
    config: Config
    vocab: Vocabulary


def checkpoint_training_data(ckpt: dict, cfg: Config, vocab: Vocabulary) -> dict:
    """What the checkpoint's model was trained on (captioning/provenance.py): its record, or one
    inferred from its config for a checkpoint written before the record was kept."""
    return provenance.checked(ckpt["hyper_parameters"].get("training_data"), cfg, len(vocab))


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
    words = hp.get("vocab")
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
        raise CheckpointError(f"{path} is damaged: it holds no vocabulary (a list of words), got {type(words).__name__}")
    try:
        cfg = checked(hp["config"], f"{path} holds a damaged or incompatible config")
    except ConfigError as err:
        raise CheckpointError(err) from None
    try:
        vocab = Vocabulary(list(words))
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} holds a damaged vocabulary: {err}") from None
    return at_workdir(cfg, ckpt.get("workdir")), vocab


def at_workdir(cfg: Config, workdir: str | None) -> Config:
    """``cfg`` with its relative data paths (data.root, data.feature_cache) made absolute against
    ``workdir``, the folder the training ran in (recorded in every checkpoint by
    captioning/training/trainer.py RunPlace): a command run from another folder then reads the
    run's own data instead of looking for it, or generating it, where it stands. Without a
    ``workdir`` (a checkpoint written before it was recorded) the paths stay as they are.

    The recorded folder is only read from: a path is moved there only when what it names exists
    there already (for the synthetic dataset, its generated folder). Otherwise it stays relative
    to where the command runs, so the data is generated or looked for here, never written into a
    folder the checkpoint names, which may be someone else's."""
    if not isinstance(workdir, str) or not workdir:
        return cfg
    data = cfg.data
    paths = {"root": data.root, "feature_cache": data.feature_cache}
    changed = {key: str(Path(workdir) / value) for key, value in paths.items()
               if value is not None and not Path(value).is_absolute() and _present(Path(workdir) / value, key, cfg)}
    return replace(cfg, data=replace(data, **changed)) if changed else cfg


def _present(path: Path, key: str, cfg: Config) -> bool:
    """Whether the data that ``path`` (data.``key`` resolved in the recorded folder) names is there."""
    if key == "root" and cfg.data.dataset == "synthetic":
        from captioning.data.synthetic.write import dataset_dir

        try:
            return dataset_dir(path, cfg.data.synthetic).is_dir()
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
    """A checkpoint to continue training from needs the loop's state, not only the weights."""
    missing = [k for k in ("optimizer_states", "loops") if not ckpt.get(k)]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed: it holds weights only (no {' or '.join(missing)}); "
                              "resume from a last.ckpt or best.ckpt written by training")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model in eval mode from a checkpoint file alone."""
    return load_checkpoint_and_data(path, map_location)[0]


def load_checkpoint_and_data(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[LoadedModel, dict]:
    """:func:`load_checkpoint`, and what the model was trained on (:func:`checkpoint_training_data`)."""
    ckpt = read_checkpoint(path)
    cfg, vocab = checkpoint_config(ckpt, path)
    # The weights come from the checkpoint: never fetch ImageNet weights just to overwrite them.
    cfg = merge(cfg, {"model": {"encoder": {"weights": "none"}}})
    model = ShowAttendTell(cfg.model, len(vocab))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    check_state_dict(model.state_dict(), state, path)
    model.load_state_dict(state)
    return LoadedModel(model.to(map_location).eval(), cfg, vocab), checkpoint_training_data(ckpt, cfg, vocab)


# ================================================================================ model folders
#
# A model folder is what ``Captioner.save_pretrained`` writes and ``Captioner.from_pretrained``
# (and the ONNX export) reads: plain files that need neither Lightning nor the training code.
#
#   config.json        {"format", "format_version", "vocab_size", "vocab_sha256", "config",
#                       "training_data" (captioning/provenance.py), "run"?}
#   vocab.json         the vocabulary, a list of words (ids are positions)
#   model.safetensors  the model's weights (ShowAttendTell's state_dict), no pickle
#   README.md          a model card: architecture, test scores, how it was made, how to load it
#
# config.json and vocab.json are read and checked without torch (captioning/model_folder.py).


def save_model_folder(folder: str | Path, model: ShowAttendTell, cfg: Config, vocab: Vocabulary,
                      card: str, run: dict | None = None, training_data: dict | None = None,
                      also: Callable[[Path], None] | None = None) -> Path:
    """Write a model folder (see above); ``card`` is the README.md text, ``run`` what the training
    run said of the model (config.json "run"), ``training_data`` what it was trained on (default:
    inferred from ``cfg``, captioning/provenance.py); ``also`` writes more files (the ONNX graphs)
    into the new folder before it is put in place. Only a new or empty folder, or a model folder,
    is written (a file of yours in it is kept): anything else raises CheckpointError and is left as
    it was. The folder is written whole beside ``folder`` and then swapped in
    (captioning/files.py replacing_folder), so ``folder`` holds the old model, intact, until the
    new one is complete: a kill, a full disk or a failed export never leaves it half-old, half-new."""
    import json

    from safetensors.torch import save_file

    from captioning.config import to_dict
    from captioning.files import ForeignFolderError, new_file_mode, replacing_folder

    folder = Path(folder)
    meta = {"format": FOLDER_FORMAT, "format_version": FOLDER_FORMAT_VERSION, "vocab_size": len(vocab),
            "vocab_sha256": vocab_fingerprint(vocab), "config": to_dict(cfg),
            "training_data": provenance.checked(training_data, cfg, len(vocab))}
    if run_record(run):
        meta["run"] = run_record(run)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    try:
        with replacing_folder(folder, "model", [*FOLDER_FILES, *STALE_AFTER_SAVE], what="write the model") as new:
            save_file(state, str(new / "model.safetensors"), metadata={"format": FOLDER_FORMAT})
            os.chmod(new / "model.safetensors", new_file_mode())  # safetensors makes it owner-only; a model is shared
            (new / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
            (new / "vocab.json").write_text(json.dumps(vocab.words, indent=0) + "\n")
            (new / "README.md").write_text(card)
            if also is not None:
                also(new)
    except ForeignFolderError as err:
        raise CheckpointError(err) from None
    return folder


def load_model_folder(folder: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model in eval mode from a model folder (see above)."""
    return load_model_folder_and_data(folder, map_location)[0]


def load_model_folder_and_data(folder: str | Path,
                               map_location: str | torch.device = "cpu") -> tuple[LoadedModel, dict]:
    """:func:`load_model_folder`, and what the model was trained on (config.json "training_data",
    or inferred from its config for a folder written before it was kept)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    meta, cfg, vocab = read_folder_meta(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; a model folder holds {', '.join(FOLDER_FILES)}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        reason = one_line(err)
        raise CheckpointError(f"{weights} is damaged ({reason}); copy the folder again") from None
    cfg = merge(cfg, {"model": {"encoder": {"weights": "none"}}})  # the weights come from the folder
    model = ShowAttendTell(cfg.model, len(vocab))
    embedding = state.get("decoder.embedding.weight")
    if embedding is not None and embedding.shape[0] != len(vocab):
        raise CheckpointError(f"{weights} was saved for {embedding.shape[0]} words but vocab.json holds "
                              f"{len(vocab)}; copy the folder's files together")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{weights}: weights do not match config.json ({str(err).splitlines()[0]})") from None
    trained_on = provenance.checked(meta.get("training_data"), cfg, len(vocab))
    return LoadedModel(model.to(map_location).eval(), cfg, vocab), trained_on


def read_run_metrics(source: str | Path) -> dict | None:
    """What the training run said of a model (scores on the test split, the command): the
    metrics.json beside a checkpoint, or a model folder's config.json "run"; None if neither."""
    import json

    source = Path(source)
    path = source / "config.json" if source.is_dir() else source.parent / "metrics.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if source.is_dir():
        data = data.get("run") if isinstance(data, dict) else None
    return data if isinstance(data, dict) else None


_CARD_METRICS = (("bleu_1", "BLEU-1"), ("bleu_2", "BLEU-2"), ("bleu_3", "BLEU-3"), ("bleu_4", "BLEU-4"),
                 ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr"), ("spice", "SPICE"))


#: Metric ids of the card's metadata (the names model hubs use), for the scores a card can show.
_HUB_METRICS = {"bleu_1": "bleu", "bleu_2": "bleu", "bleu_3": "bleu", "bleu_4": "bleu", "meteor": "meteor",
                "rouge_l": "rouge", "cider": "cider", "spice": "spice"}


def card_metadata(cfg: Config, metrics: dict | None = None) -> list[str]:
    """The card's YAML front matter, the metadata header model hubs read (library_name,
    pipeline_tag, license, tags, datasets, metrics). ``metrics``: the run's metrics.json; its
    test scores name the metrics, else the ones training scores. Values are JSON strings, which
    YAML reads as they are."""
    import json

    data = cfg.data
    dataset = {"synthetic": "show-attend-tell-synthetic", "coco": "coco"}.get(data.dataset) or Path(data.root).name
    scores = (metrics or {}).get("metrics")
    keys = [k for k in scores if k in _HUB_METRICS] if isinstance(scores, dict) else []
    hub_metrics = list(dict.fromkeys(_HUB_METRICS[k] for k in keys or ("bleu_4", "meteor", "rouge_l", "cider")))
    tags = ["image-captioning", "show-attend-tell", f"{cfg.model.attention}-attention", "pytorch"]

    def items(values: list[str]) -> list[str]:
        return [f"- {json.dumps(v)}" for v in values]

    return ["---", "library_name: show-attend-tell", "pipeline_tag: image-to-text", "license: mit",
            "tags:", *items(tags), "datasets:", *items([dataset]), "metrics:", *items(hub_metrics), "---", ""]


def model_card(model: ShowAttendTell, cfg: Config, vocab: Vocabulary, command: str,
               source: str | None = None, metrics: dict | None = None, training_data: dict | None = None) -> str:
    """README.md of a model folder: the metadata header (card_metadata), what the model is, what
    it was trained on, its intended use and limitations, its test scores (from the training run's
    metrics.json, when there is one), the command that made the folder, and how to load it, with
    PyTorch and with ONNX Runtime."""
    trained_on = provenance.checked(training_data, cfg, len(vocab))
    enc, dec = cfg.model.encoder, cfg.model.decoder
    params = sum(p.numel() for p in model.parameters())
    lines = [
        *card_metadata(cfg, metrics),
        f"# Show, Attend and Tell: {cfg.model.attention} attention",
        "",
        "An image captioning model (Xu et al., 2015), saved by `Captioner.save_pretrained`.",
        "",
        "| | |", "|---|---|",
        f"| attention | {cfg.model.attention} ({dec.score} score, {dec.gate} gate) |",
        f"| encoder | {enc.backbone} up to {enc.stage or 'the last stage'}, {enc.grid_size}x{enc.grid_size} grid |",
        f"| decoder | LSTM {dec.hidden_dim}, embedding {dec.embed_dim}, attention {dec.attention_dim} |",
        f"| vocabulary | {len(vocab)} words |",
        f"| parameters | {params:,} |",
        f"| images | {cfg.data.image_size}x{cfg.data.image_size}, dataset `{cfg.data.dataset}` |",
        f"| decoding | beam {cfg.decode.beam_size}, at most {cfg.decode.max_len} words"
        + (f", hard mode {cfg.decode.hard_mode}" if model.mechanism.test_modes else "") + " |",
        f"| training data | {provenance.describe(trained_on)} |",
        "",
        *_intended_use(trained_on, metrics),
    ]
    scores = (metrics or {}).get("metrics")
    if isinstance(scores, dict) and scores:
        n = metrics.get("num_images")
        lines += [f"## Test split scores (x100{f', {n} images' if n else ''})", "", "| metric | score |", "|---|---|"]
        for key, name in _CARD_METRICS:
            if isinstance(scores.get(key), (int, float)):
                lines.append(f"| {name} | {100 * scores[key]:.2f} |")
        lines.append("")
    else:
        lines += ["## Test split scores", "", "Not scored: no test scores in a metrics.json beside the checkpoint.", ""]
    lines += ["## How it was made", ""]
    if isinstance((metrics or {}).get("command"), str):
        lines += ["Trained with:", "", "```", metrics["command"], "```", ""]
    if metrics and metrics.get("global_step") is not None:
        lines += [f"{metrics.get('epochs')} epochs, {metrics.get('global_step')} steps, "
                  f"{metrics.get('train_seconds')} s of training.", ""]
    if source:
        lines += [f"From the checkpoint `{Path(source).name}`, written into this folder by:", ""]
    else:
        lines += ["Written into this folder by:", ""]
    lines += ["```", command, "```", "",
              "## Use", "", "```python", "from captioning import Captioner", "",
              "captioner = Captioner.from_pretrained(\"THIS_FOLDER\")",
              "print(captioner.caption(\"photo.jpg\")[0].text)", "```", "",
              "With ONNX Runtime, without PyTorch (`pip install 'show-attend-tell[export]'`): export the "
              "graphs into the folder once, then caption with them:", "",
              "```bash", "captioning export --checkpoint THIS_FOLDER --out THIS_FOLDER-onnx --format onnx",
              "captioning caption --engine onnx --model THIS_FOLDER-onnx photo.jpg", "```", "",
              "```python", "from captioning.export.runtime import OnnxCaptioner", "",
              "engine = OnnxCaptioner(\"THIS_FOLDER-onnx\")",
              "print(engine.caption(\"photo.jpg\")[0].text)", "```", ""]
    return "\n".join(lines)


def _intended_use(trained_on: dict, metrics: dict | None) -> list[str]:
    """The card's "Intended use" and "Limitations": what the model was trained on, what it
    cannot do, and its measured scores with the command that measured them."""
    lines = ["## Intended use", ""]
    if provenance.is_synthetic(trained_on):
        lines += ["Research and teaching: a small model of the paper's soft or hard attention on the built-in "
                  "synthetic set of coloured shapes, to see where each word looks and to compare the two "
                  "mechanisms. It is not a captioner of photographs.", "",
                  "## Limitations", "",
                  f"- Trained on {provenance.describe(trained_on)} only: every image it is given, a photo of a "
                  "cat included, is described as coloured shapes (\"a large yellow square to the left of ...\").",
                  f"- It can say only its {trained_on.get('vocab_size')} words: colours, sizes, shapes and "
                  "places. It knows no objects, people, scenes or actions of the real world."]
    else:
        lines += [f"Captioning images like those it was trained on ({provenance.describe(trained_on)}).", "",
                  "## Limitations", "",
                  f"- It can say only the {trained_on.get('vocab_size')} words of its training captions, and "
                  "describes images unlike its training data poorly.",
                  "- Captions carry the biases of the training captions; do not use them for decisions about "
                  "people."]
    lines.append(f"- Images are resized to a square at the model's input size: fine detail and the aspect "
                 "of long panoramas are lost.")
    scores = (metrics or {}).get("metrics")
    bleu = scores.get("bleu_4") if isinstance(scores, dict) else None
    if isinstance(bleu, (int, float)):
        n = (metrics or {}).get("num_images")
        measured = f"- Measured: BLEU-4 {100 * bleu:.1f} on the test split{f' ({n} images)' if n else ''} of its " \
                   "training data, the only data it was scored on"
        command = (metrics or {}).get("command")
        lines.append(measured + (f", by `{command}` (all scores below)." if isinstance(command, str) else "."))
    else:
        lines.append("- Measured: not scored (no test scores in a metrics.json beside the checkpoint).")
    return lines + [""]
