"""Tests for captioning.visualization (paper-style per-word attention figures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from captioning.visualization import (
    attention_figure,
    figure_layout,
    figure_size,
    save_attention_figure,
)

WORDS_20 = ("a group of people standing around a kitchen counter preparing food "
            "while a small dog watches them from the floor").split()


def _shapes_image(size: int = 128) -> Image.Image:
    img = Image.new("RGB", (size, size), (90, 140, 90))
    draw = ImageDraw.Draw(img)
    s = size / 128
    draw.ellipse([10 * s, 10 * s, 50 * s, 50 * s], fill=(220, 40, 40))
    draw.rectangle([75 * s, 15 * s, 115 * s, 55 * s], fill=(40, 60, 220))
    return img


def _maps(n: int, grid: int = 14, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    maps = rng.random((n, grid, grid))
    return maps / maps.sum(axis=(1, 2), keepdims=True)


def _panel(figure: Image.Image, index: int, num_words: int, panel_size: int, columns: int, aspect: float = 1.0):
    """Pixels of panel ``index`` (0 = the image, k = word k) as a float array."""
    layout = figure_layout(num_words, panel_size, columns, aspect)
    w, h = layout["panel_w"], layout["panel_h"]
    row, col = divmod(index, layout["cols"])
    x0 = layout["pad"] + col * (w + layout["pad"])
    y0 = layout["title_h"] + row * (layout["strip"] + h + layout["pad"]) + layout["strip"]
    return np.asarray(figure.crop((x0, y0, x0 + w, y0 + h)), dtype=np.float64)


# ------------------------------------------------------------------------------- geometry


def test_figure_size_formula():
    assert len(WORDS_20) == 20
    # 21 panels in 5 columns -> 5 rows; strip 28, pad 7 at panel_size 224.
    assert figure_size(20) == (7 + 5 * (224 + 7), 56 + 5 * (28 + 224 + 7)) == (1162, 1351)
    # Fewer panels than columns: the grid shrinks to the panels present.
    layout = figure_layout(2, panel_size=100, columns=5)
    assert (layout["cols"], layout["rows"], layout["strip"], layout["pad"]) == (3, 1, 16, 3)
    assert figure_size(2, panel_size=100, columns=5) == (3 + 3 * 103, 32 + (16 + 100 + 3))
    assert figure_size(0) == (7 + 231, 56 + 259)
    bad_args = (
        {"num_words": -1}, {"num_words": 3, "panel_size": 8}, {"num_words": 3, "columns": 0},
        {"num_words": 3, "aspect": 0}, {"num_words": 3, "aspect": float("nan")},
    )
    for bad in bad_args:
        with pytest.raises(ValueError):
            figure_size(**bad)


def test_twenty_word_figure_has_exact_size_and_title():
    caption = " ".join(WORDS_20)
    fig = attention_figure(_shapes_image(), WORDS_20, _maps(20), title=caption)
    assert fig.mode == "RGB"
    assert fig.size == figure_size(20)
    # The title strip holds dark text pixels.
    title = np.asarray(fig.crop((0, 0, fig.width, figure_layout(20)["title_h"])).convert("L"))
    assert title.min() < 100


def test_long_words_and_titles_keep_the_size():
    words = ["pneumonoultramicroscopicsilicovolcanoconiosis", "x"]
    fig = attention_figure(_shapes_image(), words, _maps(2), title="word " * 80, panel_size=64)
    assert fig.size == figure_size(2, panel_size=64)


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("smooth", [True, False])
def test_attention_in_one_corner_brightens_that_corner(smooth):
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    attention = np.zeros((2, 7, 7))
    attention[0, 0, 0] = 1.0  # word 1: top-left cell
    attention[1, 6, 6] = 1.0  # word 2: bottom-right cell
    fig = attention_figure(
        image, ["top", "bottom"], attention, panel_size=112, columns=3, smooth=smooth
    )
    q = 112 // 4
    first = _panel(fig, 1, 2, 112, 3)
    assert first[:q, :q].mean() > first[-q:, -q:].mean() + 40
    second = _panel(fig, 2, 2, 112, 3)
    assert second[-q:, -q:].mean() > second[:q, :q].mean() + 40
    # The image panel is the image itself.
    assert np.allclose(_panel(fig, 0, 2, 112, 3), 128)


def test_uniform_map_is_brighter_than_zero_map():
    image = Image.new("RGB", (32, 32), (120, 120, 120))
    attention = np.stack([np.full((5, 5), 0.04), np.zeros((5, 5))])
    fig = attention_figure(image, ["all", "none"], attention, panel_size=64)
    assert _panel(fig, 1, 2, 64, 5).mean() > _panel(fig, 2, 2, 64, 5).mean() + 60


def test_torch_tensor_and_numpy_array_give_identical_figures():
    maps = _maps(4, grid=7, seed=3)
    words = ["two", "red", "round", "things"]
    from_numpy = attention_figure(_shapes_image(), words, maps, title="t")
    tensor = torch.tensor(maps, dtype=torch.float32, requires_grad=True) * 1.0
    from_torch = attention_figure(_shapes_image(), words, tensor, title="t")
    assert np.array_equal(np.asarray(from_numpy), np.asarray(from_torch))
    half = attention_figure(_shapes_image(), words, torch.tensor(maps).to(torch.bfloat16))
    assert half.size == figure_size(4)


def test_tiny_and_non_rgb_images_are_fine():
    tiny = _shapes_image(64)
    fig = attention_figure(tiny, ["a", "red", "circle"], _maps(3), title="a red circle")
    assert fig.size == figure_size(3)
    # The upscaled image panel keeps the red circle in its top-left quarter.
    panel = _panel(fig, 0, 3, 224, 5)
    assert panel[40:60, 40:60, 0].mean() > 180 and panel[40:60, 40:60, 1].mean() < 80
    gray = attention_figure(tiny.convert("L"), ["a"], _maps(1), panel_size=32)
    rgba = attention_figure(tiny.convert("RGBA"), ["a"], _maps(1), panel_size=32)
    assert gray.mode == rgba.mode == "RGB"


def test_a_600x400_photo_keeps_its_shape_and_its_attention_lands_where_the_model_looked():
    """The model sees the photo squashed to a square; the figure shows it as it is (3:2), with the
    grid stretched over it: a cell of the right-hand column lights the photo's right-hand side."""
    photo = Image.new("RGB", (600, 400), (128, 128, 128))
    ImageDraw.Draw(photo).rectangle([450, 0, 599, 399], fill=(200, 40, 40))  # the right quarter is red
    attention = np.zeros((1, 4, 4))
    attention[0, :, 3] = 0.25  # the right-hand column of the grid
    fig = attention_figure(photo, ["red"], attention, panel_size=224, smooth=False)
    layout = figure_layout(1, 224, aspect=1.5)
    assert (layout["panel_w"], layout["panel_h"]) == (224, 149)  # 3:2, the longer side 224
    assert fig.size == figure_size(1, aspect=1.5) == (7 + 2 * (224 + 7), 56 + 28 + 149 + 7)
    image = _panel(fig, 0, 1, 224, 5, aspect=1.5)
    assert image.shape[:2] == (149, 224)
    assert image[:, -40:, 0].mean() > 190 and image[:, :150, 0].mean() < 140  # the red quarter stays right
    lit = _panel(fig, 1, 1, 224, 5, aspect=1.5).mean(axis=2)
    assert lit[:, -50:].mean() > lit[:, :160].mean() + 40
    tall = attention_figure(photo.rotate(90, expand=True), ["red"], attention, panel_size=224)
    assert tall.size == figure_size(1, aspect=400 / 600)
    assert figure_layout(1, 224, aspect=400 / 600)["panel_w"] == 149


def test_masked_cells_and_rectangular_grids():
    maps = _maps(2, grid=6)[:, :, :4].copy()  # 6 x 4 grid
    maps[:, :, -1] = 0.0  # padded cells
    fig = attention_figure(_shapes_image(), ["a", "b"], maps)
    assert fig.size == figure_size(2)


def test_save_writes_png_creating_parents(tmp_path):
    path = tmp_path / "nested" / "dir" / "figure.png"
    out = save_attention_figure(path, _shapes_image(), ["a", "red", "circle"], _maps(3),
                                title="a red circle", panel_size=96)
    assert out == path and path.is_file()
    with Image.open(path) as reopened:
        assert reopened.format == "PNG"
        assert reopened.size == figure_size(3, panel_size=96)


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "words, attention, message",
    [
        (["a", "b"], np.ones((3, 4, 4)), "3 attention maps for 2 words"),
        (["a", "b"], np.ones((2, 16)), r"shape \[num_words, gh, gw\]"),
        (["a"], np.ones((1, 2, 4, 4)), r"shape \[num_words, gh, gw\]"),
        (["a"], -np.ones((1, 4, 4)), "non-negative"),
        (["a"], np.full((1, 4, 4), np.nan), "non-finite"),
        (["a"], np.full((1, 4, 4), np.inf), "non-finite"),
        (["a"], np.ones((1, 0, 4)), "non-empty"),
        ("ab", np.ones((2, 4, 4)), "not a single string"),
        ([1, 2], np.ones((2, 4, 4)), "string"),
    ],
)
def test_invalid_inputs_raise_value_error(words, attention, message):
    with pytest.raises(ValueError, match=message):
        attention_figure(_shapes_image(), words, attention)


def test_invalid_image_and_layout_arguments():
    with pytest.raises(TypeError, match="PIL"):
        attention_figure(np.zeros((8, 8, 3)), ["a"], np.ones((1, 2, 2)))
    with pytest.raises(ValueError, match="panel_size"):
        attention_figure(_shapes_image(), ["a"], np.ones((1, 2, 2)), panel_size=4)
    with pytest.raises(ValueError, match="columns"):
        attention_figure(_shapes_image(), ["a"], np.ones((1, 2, 2)), columns=0)
