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

Images are paths, PIL images, NumPy arrays [H, W, 3] of uint8 (RGB, as PIL and imageio give them)
or torch tensors [3, H, W] (uint8, or float in [0, 1], as torchvision's ``read_image`` and
``to_tensor`` give them); each goes through the one preprocessing path training uses
(:func:`captioning.data.transforms.load_image` / :func:`~captioning.data.transforms.to_rgb`, then
:func:`~captioning.data.transforms.preprocess`), and are decoded in batches.
"""

from __future__ import annotations

import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image

from captioning import provenance
from captioning.checkpoint import (load_checkpoint_and_data, load_model_folder_and_data, model_card,
                                   read_run_metrics, save_model_folder)
from captioning.config import HARD_MODES, Config
from captioning.data.transforms import load_image, preprocess, to_rgb
from captioning.device import resolve_device
from captioning.decoding import ModelSearch
from captioning.models import ShowAttendTell
from captioning.search import DecodeOptions, Hypothesis
from captioning.vocab import Vocabulary

__all__ = ["Caption", "Captioner", "DecodeOptions", "ImageInput", "HARD_MODES", "resolve_device"]

ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]

PIL_SOURCE = "<PIL image>"
ARRAY_SOURCE = "<array>"
TENSOR_SOURCE = "<tensor>"

@dataclass
class Caption:
    text: str  # the words joined by single spaces
    words: list[str]  # generated words, <end> excluded
    score: float  # sum of log p(word) over the words and <end>
    attention: np.ndarray  # [len(words), gh, gw] float32: each word's attention map
    source: str  # the image's path, or "<PIL image>", "<array>", "<tensor>"
    ended: bool = True  # False if the caption reached max_len words without <end>
    # Hard attention, "argmax" or "sample" mode, greedy or sampled decoding: the grid cell (row-major
    # index) each word looked at. None otherwise.
    locations: list[int] | None = None
    # With n_best > 1: the 2nd, 3rd, ... best captions of the same image (each without alternatives).
    alternatives: list["Caption"] = field(default_factory=list)


def source_name(image: ImageInput) -> str:
    if isinstance(image, Image.Image):
        return PIL_SOURCE
    if isinstance(image, np.ndarray):
        return ARRAY_SOURCE
    if isinstance(image, torch.Tensor):
        return TENSOR_SOURCE
    return str(image)


def array_image(image: np.ndarray | torch.Tensor) -> Image.Image:
    """A NumPy array [H, W, 3] of uint8 (RGB) or a tensor [3, H, W] (uint8, or float in [0, 1])
    -> PIL image. Anything else raises ValueError in one line, naming the shape and dtype it got."""
    if isinstance(image, torch.Tensor):
        got = f"a tensor of shape {tuple(image.shape)} and dtype {str(image.dtype).replace('torch.', '')}"
        if image.ndim != 3 or image.shape[0] != 3 or not (image.dtype == torch.uint8 or image.is_floating_point()):
            raise ValueError(f"an image tensor must be [3, H, W], uint8 or float in [0, 1]; got {got} "
                             "(a batch: pass its images as a list; [H, W, 3]: permute(2, 0, 1))")
        if image.is_floating_point():
            if image.numel() and not bool(((image >= 0) & (image <= 1)).all()):
                raise ValueError(f"a float image tensor must hold values in [0, 1]; got {got} with values "
                                 f"from {float(image.min()):g} to {float(image.max()):g} (divide by 255)")
            image = (image * 255).round().to(torch.uint8)
        array = image.detach().cpu().permute(1, 2, 0).contiguous().numpy()  # [3, H, W] -> [H, W, 3]
    else:
        array = image
        got = f"an array of shape {array.shape} and dtype {array.dtype}"
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"an image array must be [H, W, 3] of uint8 (RGB); got {got} "
                             "(floats in [0, 1]: (a * 255).astype(np.uint8); grey: np.stack([a] * 3, axis=-1))")
    if min(array.shape[:2]) < 1:
        raise ValueError(f"an image must have at least one pixel; got {got}")
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


class Captioner:
    """A trained model in eval mode plus what it needs to caption images: config and vocabulary."""

    def __init__(self, model: ShowAttendTell, config: Config, vocab: Vocabulary,
                 device: str | torch.device | None = None, source: str | Path | None = None,
                 training_data: dict | None = None) -> None:
        self.source = None if source is None else str(source)  # the checkpoint or folder it came from
        # What the model was trained on (captioning/provenance.py): all it can describe.
        self.training_data = provenance.checked(training_data, config, len(vocab))
        self._noted = False  # the synthetic note is given once per captioner
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.config = config
        self.vocab = vocab
        self.image_size = config.data.image_size
        self.grid_size = config.model.encoder.grid_size
        self.modes = self.model.mechanism.test_modes  # the test-time attention modes it offers
        self.search = ModelSearch(self.model, fast=config.model.decoder.fast)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None) -> "Captioner":
        """Load a checkpoint written by captioning train (best.ckpt / last.ckpt).

        ``device`` None: cuda if available, else cpu. Raises CheckpointError for a missing or
        invalid checkpoint and ValueError for an unavailable device.
        """
        dev = resolve_device(device)  # before reading the file: an unavailable device fails fast
        loaded, trained_on = load_checkpoint_and_data(path, map_location=dev)
        return cls(loaded.model, loaded.config, loaded.vocab, dev, source=path, training_data=trained_on)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | None = None) -> "Captioner":
        """Load a model folder written by :meth:`save_pretrained` (or ``captioning export``).

        Needs neither Lightning nor the training code. Raises CheckpointError (one line) for a
        missing folder or file, a damaged file, or a vocab.json that is not the weights' own.
        """
        dev = resolve_device(device)
        loaded, trained_on = load_model_folder_and_data(folder, map_location=dev)
        return cls(loaded.model, loaded.config, loaded.vocab, dev, source=folder, training_data=trained_on)

    def __repr__(self) -> str:
        enc = self.config.model.encoder
        params = sum(p.numel() for p in self.model.parameters())
        return (f"Captioner(source={self.source!r}, attention={self.config.model.attention!r}, "
                f"encoder='{enc.backbone} up to {enc.stage or 'the last stage'}, {self.grid_size}x{self.grid_size} "
                f"grid', image_size={self.image_size}, words={len(self.vocab)}, parameters={params}, "
                f"device='{self.device}', trained_on='{provenance.describe(self.training_data)}')")

    @property
    def trained_on(self) -> str:
        """What the model was trained on, in one phrase (captioning/provenance.py describe)."""
        return provenance.describe(self.training_data)

    def note_for(self, sources: Sequence[str]) -> str | None:
        """The one-line note owed before captioning ``sources`` (paths, or "<array>" and the like),
        once per captioner: a model trained on the synthetic set says that it describes every
        image as coloured shapes when an image is not from that set. None when nothing is owed."""
        found = None if self._noted else provenance.note(self.training_data, list(sources))
        self._noted = self._noted or found is not None
        return found

    def save_pretrained(self, folder: str | Path, command: str | None = None,
                        also: Callable[[Path], None] | None = None) -> Path:
        """Write this model as a folder: config.json, vocab.json, model.safetensors and a README.md
        model card, with the test scores of the training run (its metrics.json beside the checkpoint,
        or what the model folder it was loaded from kept of it) and ``command``, what made the folder
        (default: the Python calls that loaded and saved this model, and the script that ran them).
        Only a new or empty folder, or a model folder, is written into: anything else raises
        CheckpointError and is left as it was. The folder is written whole, then swapped in: the
        old one stays intact until then. ``also`` writes more files into the new folder first
        (``captioning export``: the ONNX graphs)."""
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

    # ------------------------------------------------------------------------------ settings

    def options(self, options: DecodeOptions | None = None, **overrides) -> DecodeOptions:
        """The decoding options of a call, validated: ``options`` as given, or the checkpoint's
        decoding defaults (config ``decode``) with keyword ``overrides``: beam_size, max_len,
        hard_mode, n_best, temperature, top_k, min_len, no_unk (:class:`~captioning.search.DecodeOptions`).
        Raises ValueError naming the problem."""
        return DecodeOptions.for_model(self.config.decode, self.modes, self.config.model.attention, options,
                                       **overrides)

    def record(self, options: DecodeOptions) -> dict:
        """How this model decodes with ``options``, as results files record it: method, beam size,
        max_len, hard_mode (None for soft), attention, and the options."""
        return options.record(self.config.model.attention)

    @property
    def settings(self) -> dict:
        """:meth:`record` of the default options."""
        return self.record(self.options())

    # ------------------------------------------------------------------------------ images

    @staticmethod
    def open(image: ImageInput) -> Image.Image:
        """A path, PIL image, array or tensor (see the module's docstring) -> RGB PIL image, with
        EXIF orientation applied to a file.

        Raises ImageLoadError (a ValueError) naming the file if it cannot be read, ValueError for
        an array or tensor of another shape or dtype.
        """
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, (str, Path)):
            return load_image(image)
        if isinstance(image, (np.ndarray, torch.Tensor)):
            return array_image(image)
        raise TypeError(f"an image must be a path, a PIL.Image.Image, a NumPy array [H, W, 3] of uint8 or a "
                        f"tensor [3, H, W]; got {type(image).__name__}")

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """An image (see :meth:`open`) -> the normalised tensor [3, S, S] fed to the model (CPU).

        Exactly the training pipeline: load_image / to_rgb, then preprocess(img, data.image_size).
        """
        return preprocess(self.open(image), self.image_size)

    # ------------------------------------------------------------------------------ decoding

    @torch.no_grad()
    def caption_tensors(self, images: torch.Tensor, sources: Sequence[str] | None = None,
                        options: DecodeOptions | None = None, *, seed: int | None = None) -> list[Caption]:
        """Decode a batch of preprocessed images [B, 3, S, S] (from :meth:`preprocess`) with
        ``options`` (default: :meth:`options`); ``seed`` makes sampling (words, and hard attention's
        "sample" mode) repeatable."""
        options = self.options(options)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        sources = list(sources) if sources is not None else [PIL_SOURCE] * images.shape[0]
        if len(sources) != images.shape[0]:
            raise ValueError(f"{len(sources)} sources for {images.shape[0]} images")
        if images.shape[0] == 0:
            return []
        self.model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [],
                                   enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            pools = self.search(images.to(self.device), options)
        out = []
        for source, pool in zip(sources, pools):
            best, *rest = [self._caption(h, source) for h in pool]
            best.alternatives = rest
            out.append(best)
        return out

    def _caption(self, hyp: Hypothesis, source: str) -> Caption:
        g, n = self.grid_size, len(hyp.tokens)
        alphas = hyp.alphas.float().cpu()
        if alphas.shape[-1] != g * g:
            raise RuntimeError(f"attention has {alphas.shape[-1]} locations, expected a {g}x{g} grid")
        words = self.vocab.decode(hyp.tokens)
        attention = alphas[:n].reshape(n, g, g).numpy().astype(np.float32, copy=True)
        return Caption(" ".join(words), words, float(hyp.score), attention, source, bool(hyp.ended),
                       locations=hyp.locations)

    def caption(self, images: Sequence[ImageInput] | ImageInput, options: DecodeOptions | None = None, *,
                batch_size: int = 32, seed: int | None = None, **overrides) -> list[Caption]:
        """Caption images (paths, PIL images, arrays [H, W, 3] uint8, tensors [3, H, W]), in order,
        ``batch_size`` at a time.

        A single path or image gives a list of one; a list of them, a list as long. A model trained
        on the synthetic set warns once (UserWarning) when an image is not from that set: it
        describes every image as coloured shapes. ``options``: a DecodeOptions, or the keyword
        ``overrides`` of :meth:`options` (``n_best`` > 1 fills each caption's ``alternatives``; a
        ``temperature`` or ``top_k`` samples; ``min_len`` forbids <end> before that many words;
        ``no_unk`` never emits <unk>); ``seed`` makes sampling repeatable. Raises ImageLoadError
        naming the first file that cannot be read, ValueError for bad settings.
        """
        if isinstance(images, (str, Path, Image.Image, np.ndarray, torch.Tensor)):
            images = [images]  # one image; a batch is passed as a list of them
        images = list(images)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        options = self.options(options, **overrides)  # fails before reading any image
        note = self.note_for([source_name(image) for image in images])
        if note is not None:
            warnings.warn(note, UserWarning, stacklevel=2)
        results: list[Caption] = []
        for i, chunk in enumerate(_chunks(images, batch_size)):
            batch = torch.stack([self.preprocess(image) for image in chunk])
            results += self.caption_tensors(batch, [source_name(image) for image in chunk], options,
                                            seed=None if seed is None else seed + i)
        return results


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
