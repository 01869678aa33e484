"""Paper-style per-word attention figures (Xu et al., 2015, Figs. 2-3), drawn with PIL and numpy.

A figure is a grid of panels of the photo's own shape: the input image (labelled ``<image>``),
then the image lit by each generated word's attention map, the word written above it; an optional
title (typically the caption) in a strip on top.

A word panel, for its map ``a`` of shape ``[gh, gw]``: (1) ``a`` is upsampled to the panel,
bilinearly and then Gaussian-blurred (sigma :data:`SMOOTH_SIGMA_CELLS` grid cells) when
``smooth=True``, like the paper's ``pyramid_expand`` figures, nearest-neighbour (visible cells)
otherwise; (2) normalised by its maximum to ``a_norm`` in [0, 1] (a uniform map lights the whole
image, an all-zero map leaves it dark); (3) ``dark = image * (0.25 + 0.75 * a_norm)``, brightened
towards white where attended: ``dark + (255 - dark) * 0.3 * a_norm``.

The model sees the image resized to a square (captioning/data/transforms.py), so its grid covers
the whole photo; the figure draws the photo with its aspect ratio kept (longer side resized,
bicubic, to the panel size; tiny images upscaled) and stretches the grid over it.

Geometry (integers; :func:`figure_layout`), for ``n`` words, ``P = panel_size`` and the photo's
``aspect`` = width / height::

    panel_w = P if aspect >= 1 else max(1, round(P * aspect))   # the photo's shape, longer side P
    panel_h = P if aspect <= 1 else max(1, round(P / aspect))
    strip   = max(16, round(P / 8))        # height of each word label strip (28 for P=224)
    title_h = 2 * strip                    # title strip on top, always reserved (2 text lines)
    pad     = max(2, P // 32)              # gap around panels (7 for P=224)
    cols    = min(columns, n + 1)          # n + 1 panels: the image, then one per word
    rows    = ceil((n + 1) / cols)
    width   = pad + cols * (panel_w + pad)
    height  = title_h + rows * (strip + panel_h + pad)

e.g. 20 words of a square photo at the defaults: 5 columns x 5 rows, 1162 x 1351 pixels.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from captioning.console import InvalidType, InvalidValue
from captioning.files import atomic_path

__all__ = ["SMOOTH_SIGMA_CELLS", "attention_figure", "figure_layout", "figure_size", "save_attention_figure"]

#: Gaussian blur sigma, in attention-grid cells, applied after bilinear upsampling (smooth=True).
SMOOTH_SIGMA_CELLS = 0.6
#: Brightness kept where attention is 0 (the rest of the image is dimmed to this fraction).
DARKEN_FLOOR = 0.25
#: How far attended pixels are pushed towards white (0 = not at all, 1 = pure white).
HIGHLIGHT = 0.3

_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)
_IMAGE_LABEL = "<image>"


# ------------------------------------------------------------------------------------ geometry


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def figure_layout(num_words: int, panel_size: int = 224, columns: int = 5, aspect: float = 1.0) -> dict[str, int]:
    """All layout numbers of a figure (the module docstring's formulas): panel_w, panel_h, strip,
    title_h, pad, cols, rows, width, height. ``aspect``: the photo's width / height."""
    if not _is_int(num_words) or num_words < 0:
        raise InvalidValue(f"num_words must be a non-negative integer, got {num_words!r}")
    if not _is_int(panel_size) or panel_size < 16:
        raise InvalidValue(f"panel_size must be an integer >= 16, got {panel_size!r}")
    if not _is_int(columns) or columns < 1:
        raise InvalidValue(f"columns must be a positive integer, got {columns!r}")
    if isinstance(aspect, bool) or not isinstance(aspect, (int, float)) or not 0 < aspect < math.inf:
        raise InvalidValue(f"aspect (width / height) must be a positive number, got {aspect!r}")
    panel_size, columns, num_words = int(panel_size), int(columns), int(num_words)
    panel_w = panel_size if aspect >= 1 else max(1, round(panel_size * aspect))
    panel_h = panel_size if aspect <= 1 else max(1, round(panel_size / aspect))
    strip = max(16, round(panel_size / 8))
    pad = max(2, panel_size // 32)
    panels = num_words + 1
    cols = min(columns, panels)
    rows = math.ceil(panels / cols)
    return {"panel_w": panel_w, "panel_h": panel_h, "strip": strip, "title_h": 2 * strip, "pad": pad, "cols": cols,
            "rows": rows, "width": pad + cols * (panel_w + pad), "height": 2 * strip + rows * (strip + panel_h + pad)}


def figure_size(num_words: int, panel_size: int = 224, columns: int = 5, aspect: float = 1.0) -> tuple[int, int]:
    """``(width, height)`` in pixels of :func:`attention_figure` for ``num_words`` words of a photo
    whose width / height is ``aspect`` (:func:`figure_layout`); ``figure_size(20) == (1162, 1351)``."""
    layout = figure_layout(num_words, panel_size, columns, aspect)
    return layout["width"], layout["height"]


# ------------------------------------------------------------------------------------- fonts


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at ``size`` px; the fixed bitmap font if that fails."""
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # no FreeType, or an old Pillow without the size argument
        return ImageFont.load_default()


def _fit_line(draw, text: str, max_width: int, size: int, min_size: int):
    """Largest font in [min_size, size] fitting ``text`` in ``max_width``, else truncate."""
    for s in range(size, min_size - 1, -1):
        font = _font(s)
        if draw.textlength(text, font=font) <= max_width:
            return text, font
    font = _font(min_size)
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "...", font


def _wrap(draw, text: str, font, max_width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if current and draw.textlength(candidate, font=font) > max_width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def _fit_title(draw, text: str, max_width: int, size: int, min_size: int):
    """Wrap ``text`` into at most two lines, shrinking the font (then truncating) to fit."""
    for s in range(size, min_size - 1, -1):
        font = _font(s)
        lines = _wrap(draw, text, font, max_width)
        if len(lines) <= 2 and all(draw.textlength(ln, font=font) <= max_width for ln in lines):
            return lines, font
    font = _font(min_size)
    lines = _wrap(draw, text, font, max_width)
    first = lines[0] if lines else ""
    if draw.textlength(first, font=font) > max_width:
        first, font = _fit_line(draw, first, max_width, min_size, min_size)
    rest = " ".join(lines[1:])
    if not rest:
        return [first], font
    second, _ = _fit_line(draw, rest, max_width, min_size, min_size)
    return [first, second], font


def _draw_centered(draw, text: str, font, box: tuple[int, int, int, int]) -> None:
    """Draw ``text`` centred in ``box = (x0, y0, x1, y1)`` (on a common baseline for all words)."""
    x0, y0, x1, y1 = box
    if isinstance(font, ImageFont.FreeTypeFont):
        # anchor "mm": middle between ascender and descender, independent of the letters used.
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), text, fill=_TEXT, font=font, anchor="mm")
        return
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = x0 + (x1 - x0 - (right - left)) / 2 - left
    y = y0 + (y1 - y0 - (bottom - top)) / 2 - top
    draw.text((x, y), text, fill=_TEXT, font=font)


# ---------------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=16)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """``[n, n]`` matrix ``B`` with ``B @ x`` = 1-D Gaussian blur of ``x`` (symmetric borders)."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(np.eye(n), ((radius, radius), (0, 0)), mode="symmetric")
    matrix = np.stack([np.convolve(padded[:, j], kernel, mode="valid") for j in range(n)], axis=1)
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=16)
def _upsample_matrix(cells: int, size: int, smooth: bool, sigma: float) -> np.ndarray:
    """``[size, cells]`` matrix ``U`` of 1-D upsampling (and blur if ``smooth``): PIL's filters are
    separable, so the 2-D map is ``U_h @ map @ U_w.T``, and the (separable) blur folded into ``U``
    makes smoothing two tiny matrix products instead of two full-resolution convolutions."""
    resample = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    basis = Image.fromarray(np.eye(cells, dtype=np.float32))
    matrix = np.asarray(basis.resize((cells, size), resample), dtype=np.float64)  # [size, cells]
    if smooth and sigma > 0:
        matrix = _blur_matrix(size, sigma) @ matrix
    matrix = np.ascontiguousarray(matrix)
    matrix.setflags(write=False)
    return matrix


def _upsample_map(amap: np.ndarray, height: int, width: int, smooth: bool) -> np.ndarray:
    """One ``[gh, gw]`` map upsampled to ``[height, width]`` (smooth: bilinear, then a Gaussian blur of
    ``SMOOTH_SIGMA_CELLS`` cells, mirrored borders; else nearest) and divided by its maximum."""
    gh, gw = amap.shape
    rows = _upsample_matrix(gh, height, smooth, SMOOTH_SIGMA_CELLS * height / gh if smooth else 0.0)
    cols = _upsample_matrix(gw, width, smooth, SMOOTH_SIGMA_CELLS * width / gw if smooth else 0.0)
    # einsum, not @: small products through a multi-threaded BLAS can be ~50x slower on few cores.
    up = np.einsum("ik,jk->ij", np.einsum("ik,kl->il", rows, amap), cols)
    up = np.clip(up, 0.0, None)
    peak = float(up.max())
    return up / peak if peak > 0.0 else np.zeros_like(up)


def _shade(base: np.ndarray, a_norm: np.ndarray) -> Image.Image:
    """Light ``base`` (float RGB, 0-255) by ``a_norm`` in [0, 1]: attended bright, rest dimmed."""
    a = a_norm[..., None]
    dark = base * (DARKEN_FLOOR + (1.0 - DARKEN_FLOOR) * a)
    lit = dark + (255.0 - dark) * HIGHLIGHT * a
    return Image.fromarray(np.clip(lit + 0.5, 0, 255).astype(np.uint8))


def _as_maps(attention: Any, num_words: int) -> np.ndarray:
    if hasattr(attention, "detach") and hasattr(attention, "cpu"):  # torch.Tensor (duck-typed)
        attention = attention.detach().cpu().float().numpy()
    try:
        maps = np.asarray(attention, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidValue("attention must be a numeric array of shape [num_words, gh, gw], "
                           f"got {type(attention).__name__}") from None
    if maps.ndim != 3:
        raise InvalidValue("attention must have shape [num_words, gh, gw] (one 2-D map per word), "
                           f"got shape {tuple(maps.shape)}")
    if maps.shape[0] != num_words:
        raise InvalidValue(f"got {maps.shape[0]} attention maps for {num_words} words; need one map per word")
    if maps.shape[1] == 0 or maps.shape[2] == 0:
        raise InvalidValue(f"attention maps must be non-empty 2-D grids, got shape {tuple(maps.shape)}")
    if not np.all(np.isfinite(maps)):
        raise InvalidValue("attention contains non-finite values (nan or inf)")
    if maps.size and maps.min() < 0:
        raise InvalidValue(f"attention must be non-negative, found a minimum of {maps.min():.4g}")
    return maps


def attention_figure(image: Image.Image, words: Sequence[str], attention: Any, title: str | None = None,
                     panel_size: int = 224, columns: int = 5, smooth: bool = True) -> Image.Image:
    """The paper-style grid: ``image`` (any size and mode), then one panel per generated word of
    ``words`` (``<end>`` excluded), lit by its map of ``attention``, a numpy array or torch tensor
    ``[len(words), gh, gw]`` of non-negative finite weights (need not sum to 1). ``title`` (e.g. the
    caption) is wrapped to at most two lines above the grid (font shrunk, then truncated with
    "..."); ``panel_size`` is each panel's longer side (>= 16), ``columns`` the panels per row (the
    image counts); ``smooth`` False draws the blocky grid.

    Returns an RGB image of exactly ``figure_size(len(words), panel_size, columns, image.width /
    image.height)``. Raises TypeError for an ``image`` that is not a PIL image, ValueError (one
    line) for words that are not a sequence of strings, attention not one map per word, negative or
    non-finite weights, a bad ``panel_size`` or ``columns``.
    """
    if not isinstance(image, Image.Image):
        raise InvalidType(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise InvalidValue(f"image is empty ({image.width}x{image.height})")
    if isinstance(words, (str, bytes)) or not isinstance(words, Sequence):
        raise InvalidValue("words must be a sequence of word strings (not a single string)")
    if not all(isinstance(w, str) for w in words):
        raise InvalidValue("every word must be a string")
    layout = figure_layout(len(words), panel_size, columns, image.width / image.height)
    maps = _as_maps(attention, len(words))

    W, H = layout["panel_w"], layout["panel_h"]
    strip, pad, cols = layout["strip"], layout["pad"], layout["cols"]
    figure = Image.new("RGB", (layout["width"], layout["height"]), _BACKGROUND)
    draw = ImageDraw.Draw(figure)

    word_size = max(10, round(strip * 0.72))
    min_size = max(8, round(strip * 0.45))
    if title:
        text = " ".join(str(title).split())
        width = layout["width"] - 2 * pad
        lines, font = _fit_title(draw, text, width, round(strip * 0.78), min_size)
        line_h = layout["title_h"] / 2
        top = (layout["title_h"] - line_h * len(lines)) / 2
        for i, line in enumerate(lines):
            y0 = round(top + i * line_h)
            _draw_centered(draw, line, font, (pad, y0, layout["width"] - pad, round(y0 + line_h)))

    base_img = image.convert("RGB")
    if base_img.size != (W, H):
        base_img = base_img.resize((W, H), Image.Resampling.BICUBIC)
    base = np.asarray(base_img, dtype=np.float64)

    labels = [_IMAGE_LABEL] + [" ".join(w.split()) for w in words]
    for index, label in enumerate(labels):
        row, col = divmod(index, cols)
        x0 = pad + col * (W + pad)
        y0 = layout["title_h"] + row * (strip + H + pad)
        panel = base_img if index == 0 else _shade(base, _upsample_map(maps[index - 1], H, W, smooth))
        figure.paste(panel, (x0, y0 + strip))
        if label:
            text, font = _fit_line(draw, label, W, word_size, min_size)
            _draw_centered(draw, text, font, (x0, y0, x0 + W, y0 + strip))
    return figure


def save_attention_figure(path: str | Path, image: Image.Image, words: Sequence[str], attention: Any,
                          **kwargs: Any) -> Path:
    """Write :func:`attention_figure` (``kwargs`` passed on) to ``path`` as PNG whatever the suffix,
    parent folders created; -> ``path``."""
    path = Path(path)
    figure = attention_figure(image, words, attention, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.save(tmp, format="PNG")
    return path
