"""Writing a model as ONNX graphs: the encoder, and one decoder step.

    captioning export --checkpoint runs/soft/best.ckpt --out exported/soft --format onnx

The folder is a model folder (captioning/model_folder.py: config.json, vocab.json,
model.safetensors, README.md) plus

    encoder.onnx  images [B, 3, S, S] -> annotations a [B, L, D], keys W a [B, L, K], h_0, c_0 [B, n]
    step.onnx     one word (Sec. 3.1.2): y_{t-1} [B] int64, h, c, a, keys
                  -> log p(y_t) [B, V], h_t, c_t, alpha_t [B, L]
                  (attention, the gate beta_t, the LSTM and the deep output of Eq. 7)
    onnx.json     what the graphs are: file names, hard attention's mode, opset, and the
                  fingerprints and shapes checked at load (captioning/model_folder.py)

The search runs in NumPy (captioning/export/runtime.py) around a graph of one step, which keeps
it readable and the graphs small. Both graphs take any batch size; every row of the step has its
own copy of the annotations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from captioning.console import CaptioningError
from captioning.model_folder import ONNX_FINGERPRINTED, STALE_AFTER_SAVE, file_sha256
from captioning.models import ShowAttendTell
from captioning.models.decoder import DecoderState

OPSET = 18
META_FILE, ENCODER_FILE, STEP_FILE = STALE_AFTER_SAVE  # removed when a folder's weights are saved again


class ExportError(CaptioningError, ValueError):
    """The model cannot be exported as asked."""


class EncoderGraph(nn.Module):
    """Everything computed once per image: the annotations, the attention keys and h_0, c_0."""

    def __init__(self, model: ShowAttendTell) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        features, mask = self.model.encode(images)
        keys = self.model.decoder.project(features)
        state = self.model.decoder.init_state(features, mask)
        return features, keys, state.h, state.c


class StepGraph(nn.Module):
    """One decoder step, as ``Decoder.step`` computes it, with log-softmax over the vocabulary."""

    def __init__(self, model: ShowAttendTell, mode: str) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.mode = mode

    def forward(self, words, h, c, features, keys):
        mask = torch.ones_like(features[:, :, 0], dtype=torch.bool)  # square images: every location is real
        out = self.decoder.step(words, DecoderState(h, c), features, keys, mask, mode=self.mode)
        return out.logits.float().log_softmax(-1), out.state.h, out.state.c, out.attended.alpha


def export_onnx(model: ShowAttendTell, image_size: int, folder: str | Path, hard_mode: str | None = None) -> Path:
    """Write encoder.onnx, step.onnx and onnx.json into ``folder`` (a model folder already).
    ``hard_mode``: one of the mechanism's ``exportable_modes`` (hard attention's "sample" draws random
    locations, which a graph cannot reproduce: ExportError); a mechanism without modes has its one way."""
    folder = Path(folder)
    mechanism = model.mechanism
    mode = None
    if mechanism.test_modes:
        mode = hard_mode or mechanism.test_modes[0]
        if mode not in mechanism.exportable_modes:
            raise ExportError(f"{model.attention_kind} attention's {mode!r} mode draws random locations and cannot be "
                              f"exported; export with hard mode {' or '.join(mechanism.exportable_modes)}")
    elif hard_mode not in (None, "expected"):
        raise ExportError(f"hard mode {hard_mode!r} needs a hard-attention model; this one uses {model.attention_kind} "
                          "attention")
    model = model.float().eval().cpu()
    images = torch.zeros(2, 3, image_size, image_size)
    # The export traces with gradients on: the teacher-forced paths are the plain tensor maths
    # (the no-grad decoding path of the additive score chooses its form from the values).
    with torch.enable_grad():
        features, keys, h, c = EncoderGraph(model)(images)
        words = torch.ones(2, dtype=torch.long)
        _export(EncoderGraph(model), (images,), folder / ENCODER_FILE, ["images"], ["features", "keys", "h", "c"])
        _export(StepGraph(model, mode or "expected"), (words, h.detach(), c.detach(), features.detach(), keys.detach()),
                folder / STEP_FILE, ["words", "h", "c", "features", "keys"], ["log_probs", "h_out", "c_out", "alpha"])
    meta = {"encoder": ENCODER_FILE, "step": STEP_FILE, "attention": model.attention_kind, "hard_mode": mode,
            "opset": OPSET, "image_size": image_size,
            # Checked at load (captioning/model_folder.py read_onnx_meta), as a checkpoint's weights are.
            "sha256": {name: file_sha256(folder / name) for name in (*ONNX_FINGERPRINTED, ENCODER_FILE, STEP_FILE)},
            "shapes": {"encoder": graph_shapes(folder / ENCODER_FILE), "step": graph_shapes(folder / STEP_FILE)}}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def graph_shapes(path: Path) -> dict:
    """{"inputs"|"outputs": {name: [dim, ...]}} of an ONNX graph file, "?" for a free dimension."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(value) -> list:
        return [d.dim_value if d.HasField("dim_value") else "?" for d in value.type.tensor_type.shape.dim]

    return {"inputs": {v.name: dims(v) for v in graph.input}, "outputs": {v.name: dims(v) for v in graph.output}}


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    """One graph whose first dimension (images or rows) is free: torch.export's exporter keeps the
    decoder's shape arithmetic (rows per image) symbolic, where the TorchScript tracer could not."""
    import warnings

    rows = torch.export.Dim("rows")
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # notes on axis names shared by every input
        program = torch.onnx.export(module.eval(), args, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=tuple({0: rows} for _ in args), opset_version=OPSET,
                                    dynamo=True, verbose=False)
    program.save(str(tmp))
    tmp.replace(path)


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str = "folder", hard_mode: str | None = None,
                      command: str | None = None) -> Path:
    """``captioning export``: a checkpoint (or a model folder) -> a model folder at ``out``, with
    the ONNX graphs when ``fmt`` is "onnx". Raises CheckpointError / ExportError (one line)."""
    from captioning.api import Captioner

    source = Path(checkpoint)
    if fmt not in ("folder", "onnx"):
        raise ExportError(f"unknown export format {fmt!r}; choose folder or onnx")
    captioner = Captioner.load(source, "cpu")
    also = None
    if fmt == "onnx":
        mode = hard_mode or (captioner.config.decode.hard_mode if captioner.modes else None)

        def also(new: Path) -> None:  # into the new folder, before it replaces the old one
            export_onnx(captioner.model, captioner.image_size, new, mode)
    return captioner.save_pretrained(out, command=command, also=also)
