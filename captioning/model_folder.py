"""Model folders: what ``Captioner.save_pretrained`` writes and ``Captioner.from_pretrained`` and
the ONNX engine (captioning/export/runtime.py) read. The description files are checked without
torch, so both check a folder the same way; torch is imported only for the weights.

    config.json        {"format", "format_version", "vocab_size", "vocab_sha256", "config",
                        "training_data" (captioning/provenance.py), "run"?}
    vocab.json         the vocabulary, a list of words (ids are positions)
    model.safetensors  the model's weights (ShowAttendTell's state_dict), no pickle
    README.md          a model card: architecture, test scores, how it was made, how to load it
    onnx.json          (ONNX exports only) {"encoder", "step", "attention", "hard_mode", "opset", "image_size",
                  "sha256": {file: digest} of the graphs and of the files they were exported from
                  (config.json, vocab.json, model.safetensors), "shapes": {"encoder"|"step":
                  {"inputs"|"outputs": {name: [dim, ...]}}} with "?" for a free dimension}

``run`` (optional) is what the training run's metrics.json said of the model (its test scores and
the command that trained it), so that a model card written again from the folder keeps them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from captioning import provenance
from captioning.console import CaptioningError, one_line
from captioning.config import Config, checked, merge, to_dict
from captioning.files import ForeignFolderError, new_file_mode, open_regular, replacing_folder
from captioning.vocab import Vocabulary

if TYPE_CHECKING:
    import torch

    from captioning.models import ShowAttendTell


class CheckpointError(CaptioningError, ValueError):
    """A checkpoint or model folder is missing, damaged, or from an incompatible version."""


class LoadedModel(NamedTuple):
    model: ShowAttendTell
    config: Config
    vocab: Vocabulary


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
    ckpts = [name for name in ("best.ckpt", "last.ckpt") if (folder / name).is_file()]
    if ckpts and not (folder / "config.json").exists():  # a training run's folder, given for its checkpoint
        raise CheckpointError(f"{folder} is a training run's folder, not a model folder: give its checkpoint, "
                              f"{folder / ckpts[0]}")
    meta, words = _read_json(folder / "config.json"), _read_json(folder / "vocab.json")
    if not isinstance(meta, dict) or meta.get("format") != FOLDER_FORMAT or "config" not in meta:
        raise CheckpointError(f"{folder / 'config.json'} is not a show-attend-tell model folder's config")
    if meta.get("format_version") != FOLDER_FORMAT_VERSION:
        raise CheckpointError(f"{folder} has model folder format version {meta.get('format_version')!r}; "
                              f"this version reads {FOLDER_FORMAT_VERSION}")
    cfg = checked(meta["config"], folder / "config.json", CheckpointError)
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


def save_model_folder(folder: str | Path, model: ShowAttendTell, cfg: Config, vocab: Vocabulary,
                      card: str, run: dict | None = None, training_data: dict | None = None,
                      also: Callable[[Path], None] | None = None) -> Path:
    """Write a model folder; ``card`` is the README.md text, ``run`` what the training run said of
    the model (config.json "run"), ``training_data`` what it was trained on (default: inferred
    from ``cfg``, captioning/provenance.py); ``also`` writes more files (the ONNX graphs) into the
    new folder. Only a new or empty folder, or a model folder, is written (a file of yours in it is
    kept), whole, then swapped in (captioning/files.py replacing_folder); anything else raises
    CheckpointError."""
    from safetensors.torch import save_file

    folder = Path(folder)
    meta = {"format": FOLDER_FORMAT, "format_version": FOLDER_FORMAT_VERSION, "vocab_size": len(vocab),
            "vocab_sha256": vocab_fingerprint(vocab), "config": to_dict(cfg),
            "training_data": provenance.checked(training_data, cfg, len(vocab))}
    if record := run_record(run):
        meta["run"] = record
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


def load_model_folder_and_data(folder: str | Path,
                               map_location: str | torch.device = "cpu") -> tuple[LoadedModel, dict]:
    """The model in eval mode, and what it was trained on (config.json "training_data", or
    inferred from its config for a folder written before it was kept)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from captioning.models import ShowAttendTell

    folder = Path(folder)
    meta, cfg, vocab = read_folder_meta(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; a model folder holds {', '.join(FOLDER_FILES)}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is damaged ({one_line(err)}); copy the folder again") from None
    cfg = merge(cfg, {"model": {"encoder": {"weights": "none"}}})  # the weights come from the folder
    model = ShowAttendTell(cfg.model, len(vocab))
    embedding = state.get("decoder.embedding.weight")
    if embedding is not None and embedding.shape[0] != len(vocab):
        raise CheckpointError(f"{weights} was saved for {embedding.shape[0]} words but vocab.json holds "
                              f"{len(vocab)}; copy the folder's files together")
    from captioning.checkpoint import check_state_dict  # here: checkpoint.py imports this module

    check_state_dict(model.state_dict(), state, weights)  # names the first key that differs
    model.load_state_dict(state)
    trained_on = provenance.checked(meta.get("training_data"), cfg, len(vocab))
    return LoadedModel(model.to(map_location).eval(), cfg, vocab), trained_on


def read_run_metrics(source: str | Path) -> dict | None:
    """What the training run said of a model (scores on the test split, the command): the
    metrics.json beside a checkpoint, or a model folder's config.json "run"; None if neither."""
    source = Path(source)
    path = source / "config.json" if source.is_dir() else source.parent / "metrics.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if source.is_dir():
        data = data.get("run") if isinstance(data, dict) else None
    return data if isinstance(data, dict) else None


#: The scores a card shows: metric id -> (its name in the table, its metadata id as model hubs name it).
_CARD_METRICS = {"bleu_1": ("BLEU-1", "bleu"), "bleu_2": ("BLEU-2", "bleu"), "bleu_3": ("BLEU-3", "bleu"),
                 "bleu_4": ("BLEU-4", "bleu"), "meteor": ("METEOR", "meteor"), "rouge_l": ("ROUGE-L", "rouge"),
                 "cider": ("CIDEr", "cider"), "spice": ("SPICE", "spice")}


def card_metadata(cfg: Config, metrics: dict | None = None) -> list[str]:
    """The card's YAML front matter that model hubs read. ``metrics``: the run's metrics.json; its
    test scores name the metrics, else the ones training scores. Values are JSON strings (valid YAML)."""
    from captioning.data.sources import source_for

    dataset = source_for(cfg.data).hub_name or Path(cfg.data.root).name
    scores = (metrics or {}).get("metrics")
    keys = [k for k in scores if k in _CARD_METRICS] if isinstance(scores, dict) else []
    hub_metrics = list(dict.fromkeys(_CARD_METRICS[k][1] for k in keys or ("bleu_4", "meteor", "rouge_l", "cider")))
    tags = ["image-captioning", "show-attend-tell", f"{cfg.model.attention}-attention", "pytorch"]

    def items(values: list[str]) -> list[str]:
        return [f"- {json.dumps(v)}" for v in values]

    return ["---", "library_name: show-attend-tell", "pipeline_tag: image-to-text", "license: mit",
            "tags:", *items(tags), "datasets:", *items([dataset]), "metrics:", *items(hub_metrics), "---", ""]


def model_card(model: ShowAttendTell, cfg: Config, vocab: Vocabulary, command: str,
               source: str | None = None, metrics: dict | None = None, training_data: dict | None = None) -> str:
    """README.md of a model folder: metadata (card_metadata), what the model is and was trained on,
    its intended use and limits, test scores (``metrics``, the run's metrics.json), the command that
    made the folder, and how to load it with PyTorch and ONNX Runtime."""
    trained_on = provenance.checked(training_data, cfg, len(vocab))
    enc, dec = cfg.model.encoder, cfg.model.decoder
    params = sum(p.numel() for p in model.parameters())
    lines = [
        *card_metadata(cfg, metrics),
        f"# Show, Attend and Tell: {cfg.model.attention} attention", "",
        "An image captioning model (Xu et al., 2015), saved by `Captioner.save_pretrained`.", "",
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
        for key, (name, _) in _CARD_METRICS.items():
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
    lines.append("- Images are resized to a square at the model's input size: fine detail and the aspect "
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
