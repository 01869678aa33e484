"""Captioning images with a trained checkpoint, from Python.

    from captioning import Captioner

    captioner = Captioner.from_checkpoint("runs/soft/best.ckpt")
    for cap in captioner.caption(["cat.jpg", "dog.png"]):
        print(cap.source, cap.text, cap.score)   # cap.attention: [len(cap.words), grid, grid]

The checkpoint alone is enough: it holds the config (image size, decoding settings) and the
vocabulary. ``save_pretrained(DIR)`` writes a model folder (config.json, vocab.json,
model.safetensors, a README.md model card) that ``Captioner.from_pretrained(DIR)`` loads without
Lightning or the training code.

Decoding options (one search, captioning/search.py), as keywords or as one
:class:`~captioning.search.DecodeOptions`::

    captioner.caption("cat.jpg", beam_size=5, n_best=3)[0].alternatives   # the 2nd and 3rd best
    captioner.caption("cat.jpg", temperature=0.8, top_k=10, seed=0)        # a sampled caption
    captioner.caption("cat.jpg", min_len=5, no_unk=True)                   # >= 5 words, no <unk>
    options = captioner.options(beam_size=5)                               # checked once, reused
    captioner.caption(["a.jpg", "b.jpg"], options)

Images are paths, PIL images, NumPy arrays [H, W, 3] of uint8 (RGB) or torch tensors [3, H, W]
(uint8, or float in [0, 1], as torchvision gives them); each goes through training's preprocessing
(captioning/data/transforms.py), and they are decoded in batches.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from PIL import Image

from captioning.checkpoint import load_checkpoint_and_data
from captioning.model_folder import load_model_folder_and_data, model_card, read_run_metrics, save_model_folder
from captioning.config import HARD_MODES, Config
from captioning.data.transforms import preprocess
from captioning.device import resolve_device
from captioning.decoding import ModelSearch, ModelStep
from captioning.engine import Caption, CaptionEngine
from captioning.models import ShowAttendTell
from captioning.search import DecodeOptions, Hypothesis
from captioning.vocab import Vocabulary

__all__ = ["Caption", "Captioner", "DecodeOptions", "ImageInput", "HARD_MODES", "resolve_device"]

ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


class Captioner(CaptionEngine):
    """A trained model in eval mode, its config and vocabulary: the PyTorch engine of the front end
    of captioning/engine.py (options, images, batching, captions)."""

    stack = staticmethod(torch.stack)

    def __init__(self, model: ShowAttendTell, config: Config, vocab: Vocabulary,
                 device: str | torch.device | None = None, source: str | Path | None = None,
                 training_data: dict | None = None) -> None:
        self.source = None if source is None else str(source)  # the checkpoint or folder it came from
        super().__init__(config, vocab, training_data, model.mechanism.test_modes)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.steps = ModelSearch(self.model, fast=config.model.decoder.fast)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None) -> "Captioner":
        """Load a checkpoint written by captioning train (best.ckpt / last.ckpt) onto ``device`` (None:
        cuda if available, else cpu). Raises CheckpointError (a missing or invalid checkpoint) or
        ValueError (an unavailable device)."""
        dev = resolve_device(device)  # before reading the file: an unavailable device fails fast
        loaded, trained_on = load_checkpoint_and_data(path, map_location=dev)
        return cls(loaded.model, loaded.config, loaded.vocab, dev, source=path, training_data=trained_on)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | None = None) -> "Captioner":
        """Load a model folder written by :meth:`save_pretrained` or ``captioning export``, without
        Lightning. Raises CheckpointError for a missing or damaged file, or a vocab.json not the weights' own."""
        dev = resolve_device(device)
        loaded, trained_on = load_model_folder_and_data(folder, map_location=dev)
        return cls(loaded.model, loaded.config, loaded.vocab, dev, source=folder, training_data=trained_on)

    @classmethod
    def load(cls, source: str | Path, device: str | None = None) -> "Captioner":
        """:meth:`from_pretrained` for a model folder, :meth:`from_checkpoint` for anything else:
        what every command's ``--checkpoint`` accepts."""
        load = cls.from_pretrained if Path(source).is_dir() else cls.from_checkpoint
        return load(source, device)

    def __repr__(self) -> str:
        enc = self.config.model.encoder
        params = sum(p.numel() for p in self.model.parameters())
        return (f"Captioner(source={self.source!r}, attention={self.config.model.attention!r}, "
                f"encoder='{enc.backbone} up to {enc.stage or 'the last stage'}, {self.grid_size}x{self.grid_size} "
                f"grid', image_size={self.image_size}, words={len(self.vocab)}, parameters={params}, "
                f"device='{self.device}', trained_on='{self.trained_on}')")

    def save_pretrained(self, folder: str | Path, command: str | None = None,
                        also: Callable[[Path], None] | None = None) -> Path:
        """Write this model as a folder (config.json, vocab.json, model.safetensors, a README.md card
        with the run's test scores and ``command``, what made it: default, the Python calls that did).
        Only a new or empty folder, or a model folder, is written into (else CheckpointError); it is
        written whole, then swapped in. ``also`` writes more files into it first (the ONNX graphs)."""
        if command is None:
            command = self._save_calls(folder)
        metrics = read_run_metrics(self.source) if self.source is not None else None
        card = model_card(self.model, self.config, self.vocab, command, self.source, metrics, self.training_data)
        return save_model_folder(folder, self.model, self.config, self.vocab, card, run=metrics,
                                 training_data=self.training_data, also=also)

    def _save_calls(self, folder: str | Path) -> str:
        """What a card records when Python, not a command, wrote the folder: the calls, as code."""
        if self.source is None:
            load = "captioner = Captioner(model, config, vocab)"
        else:
            how = "from_pretrained" if Path(self.source).is_dir() else "from_checkpoint"
            load = f"captioner = Captioner.{how}({self.source!r})"
        lines = ["from captioning import Captioner", "", load, f"captioner.save_pretrained({str(folder)!r})"]
        script = sys.argv[0] if sys.argv else ""
        if script not in ("", "-", "-c") and Path(script).is_file():  # not an interactive session or `python -c`
            lines.append(f"# run by: python {' '.join(shlex.quote(a) for a in sys.argv)}")
        return "\n".join(lines)

    def preprocess(self, image) -> torch.Tensor:
        """An image (see :meth:`open`) -> the normalised tensor [3, S, S] (CPU), as training preprocesses it."""
        return preprocess(self.open(image), self.image_size)

    @torch.no_grad()
    def search(self, images: torch.Tensor, options: DecodeOptions,
               seed: int | None = None) -> list[list[Hypothesis]]:
        """The front end's search on this captioner's device, torch's generator seeded by ``seed`` and
        left as it was after."""
        self.model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [],
                                   enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            return super().search(images.to(self.device), options)

    def decoder_step(self, images: torch.Tensor, options: DecodeOptions, seed: int | None = None) -> ModelStep:
        """The model's decoder step over these images' annotations (captioning/decoding.py)."""
        features, mask = self.model.encode(images)
        return self.steps.step(features, mask, options.hard_mode or "expected")
