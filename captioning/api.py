"""Captioning images with a trained checkpoint, from Python.

    from captioning import Captioner

    captioner = Captioner.from_checkpoint("runs/soft/best.ckpt")
    for cap in captioner.caption(["cat.jpg", "dog.png"]):
        print(cap.source, cap.text, cap.score)   # cap.attention: [len(cap.words), grid, grid]

The checkpoint alone is enough: it holds the config (image size, decoding settings) and the
vocabulary. Images go through the one preprocessing path training uses
(:func:`captioning.data.transforms.load_image` / :func:`~captioning.data.transforms.to_rgb`, then
:func:`~captioning.data.transforms.preprocess`), and are decoded in batches (greedy, or beam search with ``beam_size`` > 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image

from captioning.checkpoint import load_checkpoint
from captioning.config import Config
from captioning.data.transforms import load_image, preprocess, to_rgb
from captioning.device import resolve_device
from captioning.decoding import HARD_MODES, decode, decode_settings
from captioning.models import ShowAttendTell
from captioning.vocab import Vocabulary

__all__ = ["Caption", "Captioner", "ImageInput", "HARD_MODES", "resolve_device"]

ImageInput = Union[str, Path, Image.Image]

#: How a hard-attention model may attend at test time (see DecodeConfig.hard_mode).

PIL_SOURCE = "<PIL image>"

@dataclass
class Caption:
    text: str  # the words joined by single spaces
    words: list[str]  # generated words, <end> excluded
    score: float  # sum of log p(word) over the words and <end>
    attention: np.ndarray  # [len(words), gh, gw] float32: each word's attention map
    source: str  # the image's path, or "<PIL image>"


def source_name(image: ImageInput) -> str:
    return PIL_SOURCE if isinstance(image, Image.Image) else str(image)


class Captioner:
    """A trained model in eval mode plus what it needs to caption images: config and vocabulary."""

    def __init__(self, model: ShowAttendTell, config: Config, vocab: Vocabulary,
                 device: str | torch.device | None = None) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.config = config
        self.vocab = vocab
        self.image_size = config.data.image_size
        self.grid_size = config.model.encoder.grid_size
        self.hard = config.model.attention == "hard"

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None) -> "Captioner":
        """Load a checkpoint written by captioning train (best.ckpt / last.ckpt).

        ``device`` None: cuda if available, else cpu. Raises CheckpointError for a missing or
        invalid checkpoint and ValueError for an unavailable device.
        """
        dev = resolve_device(device)  # before reading the file: an unavailable device fails fast
        loaded = load_checkpoint(path, map_location=dev)
        return cls(loaded.model, loaded.config, loaded.vocab, dev)

    # ------------------------------------------------------------------------------ settings

    def decode_settings(self, max_len: int | None = None, hard_mode: str | None = None,
                        beam_size: int | None = None) -> dict:
        """The decoding settings a call with these overrides uses (validated); see
        :func:`captioning.decoding.decode_settings`."""
        return decode_settings(self.config, max_len, hard_mode, beam_size)

    @property
    def settings(self) -> dict:
        """Decoding settings used by default: method, max_len, hard_mode (None for soft), attention."""
        return self.decode_settings()

    # ------------------------------------------------------------------------------ images

    @staticmethod
    def open(image: ImageInput) -> Image.Image:
        """A path or PIL image -> RGB PIL image with EXIF orientation applied.

        Raises ImageLoadError (a ValueError) naming the file if it cannot be read.
        """
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, (str, Path)):
            return load_image(image)
        raise TypeError(f"an image must be a path or a PIL.Image.Image, got {type(image).__name__}")

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """A path or PIL image -> the normalised tensor [3, S, S] fed to the model (CPU).

        Exactly the training pipeline: load_image / to_rgb, then preprocess(img, data.image_size).
        """
        return preprocess(self.open(image), self.image_size)

    # ------------------------------------------------------------------------------ decoding

    @torch.no_grad()
    def caption_tensors(self, images: torch.Tensor, sources: Sequence[str] | None = None,
                        max_len: int | None = None, hard_mode: str | None = None,
                        beam_size: int | None = None) -> list[Caption]:
        """Decode a batch of preprocessed images [B, 3, S, S] (from :meth:`preprocess`)."""
        settings = self.decode_settings(max_len, hard_mode, beam_size)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        sources = list(sources) if sources is not None else [PIL_SOURCE] * images.shape[0]
        if len(sources) != images.shape[0]:
            raise ValueError(f"{len(sources)} sources for {images.shape[0]} images")
        if images.shape[0] == 0:
            return []
        self.model.eval()
        decoded = decode(self.model, images.to(self.device), beam_size=settings["beam_size"],
                         max_len=settings["max_len"], mode=settings["hard_mode"] or "expected",
                         length_penalty=self.config.decode.length_penalty)
        tokens = decoded.tokens.cpu()
        lengths = decoded.lengths.cpu().tolist()
        scores = decoded.scores.float().cpu().tolist()
        alphas = decoded.alphas.float().cpu()
        g = self.grid_size
        if alphas.shape[-1] != g * g:
            raise RuntimeError(f"attention has {alphas.shape[-1]} locations, expected a {g}x{g} grid")
        out = []
        for i, source in enumerate(sources):
            n = lengths[i]
            words = self.vocab.decode(tokens[i, :n])
            attention = alphas[i, :n].reshape(n, g, g).numpy().astype(np.float32, copy=True)
            out.append(Caption(" ".join(words), words, float(scores[i]), attention, source))
        return out

    def caption(
        self,
        images: Sequence[ImageInput] | ImageInput,
        batch_size: int = 32,
        max_len: int | None = None,
        hard_mode: str | None = None,
        beam_size: int | None = None,
    ) -> list[Caption]:
        """Caption image files and/or PIL images, in order, ``batch_size`` at a time.

        A single path or image gives a list of one. Raises ImageLoadError naming the first file
        that cannot be read, ValueError for bad settings.
        """
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        images = list(images)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.decode_settings(max_len, hard_mode, beam_size)  # fail before reading any image
        results: list[Caption] = []
        for chunk in _chunks(images, batch_size):
            batch = torch.stack([self.preprocess(image) for image in chunk])
            results += self.caption_tensors(batch, [source_name(image) for image in chunk], max_len, hard_mode,
                                            beam_size)
        return results


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
