"""The one captioning front end of both engines: decoding options and their record, image
loading, batching and the :class:`Caption` objects.

An engine (:class:`captioning.api.Captioner`, :class:`captioning.export.runtime.OnnxCaptioner`)
supplies only ``preprocess`` (an image -> its [3, S, S] input), ``stack`` and ``decoder_step``
(captioning.search.Step over a batch of images); the search is captioning/search.py's.

No torch import here, so that the ONNX engine runs without it: tensors are recognised through
``sys.modules`` (:func:`is_tensor`), as one can exist only once torch is imported.
"""

from __future__ import annotations

import numbers
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from captioning import provenance
from captioning.console import InvalidType, InvalidValue, OperationFailed
from captioning.config import Config
from captioning.data.transforms import load_image, to_rgb
from captioning.search import DecodeOptions, Hypothesis, search
from captioning.vocab import Vocabulary

#: The seeds both engines take alike (and the demo's query): torch's generator takes up to 2**64 - 1
#: and negatives, NumPy's no negatives.
SEED_RANGE = (0, 2**32 - 1)

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


def is_tensor(x: Any) -> bool:
    """A torch tensor, told without importing torch."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def source_name(image: Any) -> str:
    if isinstance(image, Image.Image):
        return PIL_SOURCE
    if isinstance(image, np.ndarray):
        return ARRAY_SOURCE
    return TENSOR_SOURCE if is_tensor(image) else str(image)


def array_image(image: Any) -> Image.Image:
    """An array [H, W, 3] of uint8 (RGB) or a tensor [3, H, W] (uint8, or float in [0, 1]) -> PIL
    image; anything else raises ValueError naming the shape and dtype it got."""
    if is_tensor(image):
        import torch  # already imported: the image is a tensor

        got = f"a tensor of shape {tuple(image.shape)} and dtype {str(image.dtype).replace('torch.', '')}"
        if image.ndim != 3 or image.shape[0] != 3 or not (image.dtype == torch.uint8 or image.is_floating_point()):
            raise InvalidValue(f"an image tensor must be [3, H, W], uint8 or float in [0, 1]; got {got} "
                               "(a batch: pass its images as a list; [H, W, 3]: permute(2, 0, 1))")
        if image.is_floating_point():
            if image.numel() and not bool(((image >= 0) & (image <= 1)).all()):
                raise InvalidValue(f"a float image tensor must hold values in [0, 1]; got {got} with values "
                                   f"from {float(image.min()):g} to {float(image.max()):g} (divide by 255)")
            image = (image * 255).round().to(torch.uint8)
        array = image.detach().cpu().permute(1, 2, 0).contiguous().numpy()  # [3, H, W] -> [H, W, 3]
    else:
        array = image
        got = f"an array of shape {array.shape} and dtype {array.dtype}"
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise InvalidValue(f"an image array must be [H, W, 3] of uint8 (RGB); got {got} "
                               "(floats in [0, 1]: (a * 255).astype(np.uint8); grey: np.stack([a] * 3, axis=-1))")
    if min(array.shape[:2]) < 1:
        raise InvalidValue(f"an image must have at least one pixel; got {got}")
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def checked_seed(seed: Any) -> int | None:
    """``seed`` checked: None, or a whole number in SEED_RANGE (returned as an int); anything else
    raises InvalidValue."""
    low, high = SEED_RANGE
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not low <= seed <= high:
        raise InvalidValue(f"seed must be a whole number from {low} to {high}, got {seed!r}")
    return int(seed)


def batch_seed(seed: int | None, batch: int) -> int | None:
    """The seed of the ``batch``-th batch of a call seeded by ``seed``: seed + batch, wrapped into
    SEED_RANGE, so that each batch draws its own words."""
    return None if seed is None else (seed + batch) % (SEED_RANGE[1] + 1)


class CaptionEngine:
    """A model's config, vocabulary, test-time attention ``modes`` and training data; captions
    images with the engine's ``decoder_step``."""

    record_engine: dict = {}  # what results record of the engine itself, before the options
    stack = staticmethod(np.stack)  # preprocessed images -> one batch

    def __init__(self, config: Config, vocab: Vocabulary, training_data: dict | None,
                 modes: Sequence[str]) -> None:
        self.config, self.vocab, self.modes = config, vocab, tuple(modes)
        # What the model was trained on (captioning/provenance.py): all it can describe.
        self.training_data = provenance.checked(training_data, config, len(vocab))
        self._noted = False  # the synthetic note is given once per engine
        self.image_size = config.data.image_size
        self.grid_size = config.model.encoder.grid_size

    @property
    def trained_on(self) -> str:
        """What the model was trained on, in one phrase."""
        return provenance.describe(self.training_data)

    def note_for(self, sources: Sequence[str]) -> str | None:
        """The one-line note owed, once per engine, before captioning ``sources`` (paths, "<array>"
        ...): a synthetic-set model describes any other image as coloured shapes. None if none is owed."""
        found = None if self._noted else provenance.note(self.training_data, list(sources))
        self._noted = self._noted or found is not None
        return found

    # ------------------------------------------------------------------------------ settings

    def options(self, options: DecodeOptions | None = None, **overrides) -> DecodeOptions:
        """A call's decoding options (DecodeOptions.for_model): ``options`` as given, or the config's
        ``decode`` defaults with keyword ``overrides`` (beam_size, max_len, hard_mode, n_best,
        temperature, top_k, min_len, no_unk). Raises ValueError."""
        return DecodeOptions.for_model(self.config.decode, self.modes, self.config.model.attention, options,
                                       **overrides)

    def record(self, options: DecodeOptions) -> dict:
        """How this model decodes with ``options``, as results files and ``--json`` lines record it."""
        return {**self.record_engine, **options.record(self.config.model.attention)}

    @property
    def settings(self) -> dict:
        """:meth:`record` of the default options."""
        return self.record(self.options())

    # ------------------------------------------------------------------------------ images

    @staticmethod
    def open(image: Any) -> Image.Image:
        """A path (EXIF orientation applied), PIL image, array or tensor -> RGB PIL image. Raises
        ImageLoadError (a ValueError) naming an unreadable file, ValueError for a bad array or tensor."""
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, (str, Path)):
            return load_image(image)
        if isinstance(image, np.ndarray) or is_tensor(image):
            return array_image(image)
        raise InvalidType(f"an image must be a path, a PIL.Image.Image, a NumPy array [H, W, 3] of uint8 or a "
                          f"tensor [3, H, W]; got {type(image).__name__}")

    # ------------------------------------------------------------------------------ decoding

    def search(self, images: Any, options: DecodeOptions, seed: int | None = None) -> list[list[Hypothesis]]:
        """Preprocessed images [B, 3, S, S] -> per image, up to ``options.n_best`` hypotheses, best
        first (captioning.search.search); ``seed`` makes sampling repeatable."""
        return search(self.decoder_step(images, options, seed), images.shape[0], options)

    def caption_tensors(self, images: Any, sources: Sequence[str] | None = None,
                        options: DecodeOptions | None = None, *, seed: int | None = None) -> list[Caption]:
        """Decode preprocessed images [B, 3, S, S] with ``options`` (default: :meth:`options`);
        ``seed`` (see SEED_RANGE) makes sampling (words, and hard attention's "sample" mode) repeatable."""
        options = self.options(options)
        seed = checked_seed(seed)
        if images.ndim != 4 or images.shape[1] != 3:
            raise InvalidValue(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        sources = list(sources) if sources is not None else [PIL_SOURCE] * images.shape[0]
        if len(sources) != images.shape[0]:
            raise InvalidValue(f"{len(sources)} sources for {images.shape[0]} images")
        if images.shape[0] == 0:
            return []
        out = []
        for source, pool in zip(sources, self.search(images, options, seed)):
            best, *rest = [self._caption(h, source) for h in pool]
            best.alternatives = rest
            out.append(best)
        return out

    def _caption(self, hyp: Hypothesis, source: str) -> Caption:
        g, n = self.grid_size, len(hyp.tokens)
        alphas = hyp.alphas.float().cpu().numpy() if is_tensor(hyp.alphas) else hyp.alphas
        if alphas.shape[-1] != g * g:
            raise OperationFailed(f"attention has {alphas.shape[-1]} locations, expected a {g}x{g} grid")
        words = self.vocab.decode(hyp.tokens)
        attention = alphas[:n].reshape(n, g, g).astype(np.float32, copy=True)
        return Caption(" ".join(words), words, float(hyp.score), attention, source, bool(hyp.ended),
                       locations=hyp.locations)

    def caption(self, images: Any, options: DecodeOptions | None = None, *,
                batch_size: int = 32, seed: int | None = None, **overrides) -> list[Caption]:
        """Caption one image or a list of them (paths, PIL images, arrays [H, W, 3] uint8, tensors
        [3, H, W]) -> one Caption each, in order, decoded ``batch_size`` at a time, with the options
        of :meth:`options` (``n_best`` > 1 fills ``alternatives``). :meth:`note_for`'s note is a
        UserWarning. Raises ImageLoadError naming the first unreadable file, ValueError for bad settings."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray)) or is_tensor(images):
            images = [images]  # one image; a batch is passed as a list of them
        images = list(images)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidValue(f"batch_size must be a positive integer, got {batch_size!r}")
        options = self.options(options, **overrides)  # fails before reading any image
        seed = checked_seed(seed)
        sources = [source_name(image) for image in images]
        note = self.note_for(sources)
        if note is not None:
            warnings.warn(note, UserWarning, stacklevel=2)
        results: list[Caption] = []
        for i, start in enumerate(range(0, len(images), batch_size)):
            batch = self.stack([self.preprocess(image) for image in images[start:start + batch_size]])
            results += self.caption_tensors(batch, sources[start:start + batch_size], options,
                                            seed=batch_seed(seed, i))
        return results
