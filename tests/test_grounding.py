"""Grounding scores (captioning/evaluation/grounding.py) on hand-made attention maps and boxes,
the words-to-classes lists, and reading boxes from a COCO instances file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from captioning.evaluation.grounding import (COCO_PHRASES, COCO_SYNONYMS, Instances, InstancesError, NamedWord,
                                             boxes_to_grid, cell_coverage, centre_inside, load_instances,
                                             matcher_for, named_words, score_grounding, score_word)

COCO_80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


def peaked(gh: int, gw: int, r: int, c: int, peak: float = 0.5) -> np.ndarray:
    """A map with `peak` on cell (r, c) and the rest spread evenly."""
    a = np.full((gh, gw), (1 - peak) / (gh * gw - 1))
    a[r, c] = peak
    return a


# ------------------------------------------------------------------------------ geometry


def test_boxes_scale_by_grid_over_width_and_height():
    # A 64 x 48 image on a 4 x 4 grid: cells are 16 x 12 pixels (the resize does not keep aspect).
    grid = boxes_to_grid([(16, 12, 32, 24)], 64, 48, 4, 4)
    assert grid.tolist() == [[1.0, 1.0, 3.0, 3.0]]
    assert cell_coverage(grid, 4, 4).tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    uniform = np.full((4, 4), 1 / 16)
    assert score_word(uniform, grid).mass == pytest.approx(0.25)


def test_box_on_cell_borders_covers_exactly_its_cells():
    grid = np.array([[1.0, 0.0, 3.0, 1.0]])  # columns 1-2 of row 0, edges on cell borders
    cover = cell_coverage(grid, 4, 4)
    assert cover[0].tolist() == [0, 1, 1, 0] and cover[1:].sum() == 0
    assert centre_inside(grid, 4, 4)[0].tolist() == [False, True, True, False]


def test_centre_on_a_box_edge_left_is_inside_right_is_outside():
    grid = np.array([[1.5, 0.0, 2.5, 4.0]])  # vertical band from the centre of column 1 to that of column 2
    assert cell_coverage(grid, 4, 4)[:, 1:3].tolist() == [[0.5, 0.5]] * 4
    assert score_word(peaked(4, 4, 2, 1), grid).pointing == 1.0  # centre x 1.5 == left edge: inside
    assert score_word(peaked(4, 4, 2, 2), grid).pointing == 0.0  # centre x 2.5 == right edge: outside


def test_overlapping_boxes_are_counted_once_and_outside_parts_clipped():
    grid = np.array([[1.5, 1.5, 2.5, 2.5], [2.0, 2.0, 3.0, 3.0], [3.5, 3.5, 9.0, 9.0]])
    cover = cell_coverage(grid, 4, 4)
    assert cover[1, 1] == 0.25 and cover[1, 2] == 0.25 and cover[2, 1] == 0.25
    assert cover[2, 2] == 1.0  # a quarter from the first box, all of it from the second: union 1
    assert cover[3, 3] == 0.25 and cover.max() <= 1.0
    uniform = np.full((4, 4), 1 / 16)
    assert score_word(uniform, grid).mass == pytest.approx(cover.sum() / 16)


def test_pointing_game_and_mass_on_a_hand_made_map():
    a = np.zeros((4, 4))
    a[1, 2], a[3, 0] = 0.6, 0.4  # maximum at row 1, column 2
    hit = np.array([[2.0, 1.0, 3.0, 2.0]])  # exactly cell (1, 2)
    miss = np.array([[0.0, 3.0, 1.0, 4.0]])  # exactly cell (3, 0)
    assert score_word(a, hit) == (1.0, pytest.approx(0.6))
    assert score_word(a, miss) == (0.0, pytest.approx(0.4))
    # Weights that do not sum to 1 are normalised.
    assert score_word(a * 3, miss).mass == pytest.approx(0.4)


def test_hard_modes_score_the_attention_the_decoder_used():
    a = np.zeros((4, 4))
    a[1, 2], a[3, 0] = 0.6, 0.4
    box = np.array([[0.0, 3.0, 2.0, 4.0]])  # cells (3, 0) and (3, 1)
    # argmax: a one-hot on (1, 2), outside the box.
    assert score_word(a, box, "argmax") == (0.0, 0.0)
    assert score_word(a, np.array([[2.0, 1.0, 2.75, 2.0]]), "argmax") == (1.0, 0.75)  # the cell's cover
    # sample: expectation over the draw; hits with probability 0.4.
    assert score_word(a, box, "sample") == (pytest.approx(0.4), pytest.approx(0.4))
    assert score_word(a, box, "expected") == (0.0, pytest.approx(0.4))
    with pytest.raises(ValueError, match="mode"):
        score_word(a, box, "soft")


def test_ties_take_the_first_maximum_in_row_major_order():
    uniform = np.full((2, 2), 0.25)
    assert score_word(uniform, np.array([[0.0, 0.0, 1.0, 1.0]])).pointing == 1.0
    assert score_word(uniform, np.array([[1.0, 1.0, 2.0, 2.0]])).pointing == 0.0


@pytest.mark.parametrize("bad", [np.zeros((2, 2)), np.array([[0.5, -0.1], [0.3, 0.3]]), np.ones(4),
                                 np.array([[np.nan, 1.0], [0.0, 0.0]])])
def test_invalid_attention_maps_are_refused(bad):
    with pytest.raises(ValueError, match="attention"):
        score_word(bad, np.array([[0.0, 0.0, 1.0, 1.0]]))


# ------------------------------------------------------------------------------ a split


def _item(word: str, category: str, attention: np.ndarray, index: int = 0) -> NamedWord:
    return NamedWord(index, word, category, attention)


def test_split_averages_over_words_and_over_images():
    # 64x64 images, 4x4 grids (16 px cells); image 1: two hits, image 2: one miss.
    instances = Instances("mem", ("circle", "square"), {1: (64.0, 64.0), 2: (64.0, 64.0)},
                          {1: {"circle": [(0, 0, 16, 16)], "square": [(48, 48, 16, 16)]},
                           2: {"circle": [(0, 0, 16, 16)]}})
    named = {
        1: [_item("circle", "circle", peaked(4, 4, 0, 0)), _item("square", "square", peaked(4, 4, 3, 3), 3)],
        2: [_item("circles", "circle", peaked(4, 4, 2, 2))],
    }
    report = score_grounding(named, instances)
    assert report.words == 3 and report.images == 2 and report.absent_words == 0
    assert report.pointing_game == pytest.approx(2 / 3)  # over words
    assert report.pointing_game_per_image == pytest.approx(0.5)  # (1 + 0) / 2 over images
    assert report.mass_in_box == pytest.approx((0.5 + 0.5 + 0.5 / 15) / 3)
    assert report.per_category["circle"]["words"] == 2
    # A uniform map on the same words: every box is one of 16 cells.
    assert report.chance_pointing_game == pytest.approx(1 / 16) and report.chance_mass_in_box == pytest.approx(1 / 16)
    metrics = report.metrics()
    assert set(metrics) >= {"pointing_game", "mass_in_box", "grounding_words"} and metrics["grounding_words"] == 3
    assert "mean over scored words" in report.describe()["averaged"]
    assert report.describe(scale=100.0)["per_category"]["square"]["pointing_game"] == pytest.approx(100.0)


def test_word_naming_an_absent_class_is_excluded_and_counted():
    instances = Instances("mem", ("circle", "triangle"), {1: (64.0, 64.0), 2: (64.0, 64.0)},
                          {1: {"circle": [(0, 0, 16, 16)]}, 2: {}})
    named = {1: [_item("circle", "circle", peaked(4, 4, 0, 0)), _item("triangle", "triangle", peaked(4, 4, 0, 0), 4)],
             2: [_item("circle", "circle", peaked(4, 4, 0, 0))],
             3: [_item("circle", "circle", peaked(4, 4, 0, 0))]}  # image 3 has no entry in the file
    report = score_grounding(named, instances)
    assert report.words == 1 and report.pointing_game == 1.0
    assert report.absent_words == 2 and report.images_without_boxes == 1
    assert any("2 naming words excluded" in line for line in report.notes())


def test_no_naming_words_gives_none_not_zero():
    instances = Instances("mem", ("circle",), {1: (64.0, 64.0)}, {1: {"circle": [(0, 0, 16, 16)]}})
    report = score_grounding({1: []}, instances)
    assert report.words == 0 and report.images == 0
    for key in ("pointing_game", "mass_in_box", "pointing_game_per_image", "mass_in_box_per_image"):
        assert report.metrics()[key] is None
    assert "n/a" in report.notes()[0]


def test_named_words_keep_each_word_attention():
    matcher = matcher_for(["circle", "square", "triangle"])
    attention = np.stack([peaked(2, 2, i % 2, i // 2) for i in range(4)]).astype(np.float32)
    found = named_words(["two", "red", "circles", "and"], attention, matcher)
    assert [(n.index, n.word, n.category) for n in found] == [(2, "circles", "circle")]
    assert np.array_equal(found[0].attention, attention[2])
    with pytest.raises(ValueError, match="attention"):
        named_words(["a", "circle"], attention, matcher)


# ------------------------------------------------------------------------------ words to classes


def test_synthetic_shape_nouns_singular_and_plural():
    matcher = matcher_for(["circle", "square", "triangle"])
    assert matcher.name == "synthetic shapes"
    words = "a small red circle to the left of two large blue squares and a triangle".split()
    assert matcher.match(words) == [(3, "circle"), (11, "square"), (14, "triangle")]


def test_coco_synonyms():
    matcher = matcher_for(COCO_80)
    assert matcher.name == "COCO synonyms"
    m = dict((w, c) for w, c in ((w, matcher.words.get(w)) for w in
                                 ("man", "woman", "people", "person", "boy", "bike", "bikes", "dogs", "puppy",
                                  "plane", "tv", "sofa", "fridge", "oranges", "orange", "glass")))
    assert m["man"] == m["woman"] == m["people"] == m["person"] == m["boy"] == "person"
    assert m["bike"] == m["bikes"] == "bicycle" and m["dogs"] == m["puppy"] == "dog"
    assert m["plane"] == "airplane" and m["tv"] == "tv" and m["sofa"] == "couch" and m["fridge"] == "refrigerator"
    assert m["oranges"] == "orange" and m["orange"] is None and m["glass"] is None  # colour, windows
    # Two-word names: the head noun is scored and the first word is not matched on its own.
    words = "a man eating a hot dog next to a dog and a teddy bear on a dining table".split()
    assert matcher.match(words) == [(1, "person"), (5, "hot dog"), (9, "dog"),
                                    (13, "teddy bear"), (17, "dining table")]
    assert matcher.match(["a", "stop", "sign", "and", "traffic", "lights"]) == [(2, "stop sign"), (5, "traffic light")]


def test_coco_lists_name_only_the_80_categories_and_no_word_twice():
    assert set(COCO_SYNONYMS) == set(COCO_80)
    assert set(COCO_PHRASES.values()) <= set(COCO_80)
    seen: dict[str, str] = {}
    for category, words in COCO_SYNONYMS.items():
        for word in words:
            assert seen.setdefault(word, category) == category, f"{word!r} names {seen[word]} and {category}"


def test_a_subset_of_coco_and_other_datasets():
    matcher = matcher_for(["person", "dog"])  # e.g. a filtered instances file
    assert matcher.match("a man and his dog on a bike".split()) == [(1, "person"), (4, "dog")]
    other = matcher_for(["lamp", "ice cream"])
    assert other.name == "category names"
    assert other.match("two lamps and an ice cream".split()) == [(1, "lamp"), (5, "ice cream")]


# ------------------------------------------------------------------------------ instances files


def _instances(tmp_path, **extra) -> dict:
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 640, "height": 480},
                   {"id": 8, "file_name": "b.jpg", "width": 320, "height": 320}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 18, "bbox": [10, 20, 100, 50], "iscrowd": 0},
                        {"id": 2, "image_id": 7, "category_id": 18, "bbox": [300, 200, 50, 50], "iscrowd": 1},
                        {"id": 3, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }
    data.update(extra)
    return data


def test_load_instances_reads_boxes_sizes_and_categories(tmp_path):
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(_instances(tmp_path)))
    inst = load_instances(path)
    assert inst.categories == ("person", "dog")
    assert inst.sizes == {7: (640.0, 480.0), 8: (320.0, 320.0)}
    assert inst.boxes[7]["dog"] == [(10.0, 20.0, 100.0, 50.0), (300.0, 200.0, 50.0, 50.0)]  # crowd kept
    assert inst.boxes[8] == {}
    assert inst.matcher().words["puppies"] == "dog"


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    ({"images": [], "annotations": []}, "not a COCO instances file"),
    ({"images": [{"id": 1}], "annotations": [], "categories": []}, "'width' and 'height'"),
    ({"images": [], "annotations": [{"image_id": 1, "caption": "a dog"}], "categories": []}, "captions file"),
    ("unknown category", "not in 'categories'"),
    (lambda d: d["annotations"][1].update(bbox=["x", 1, 2, 3]), "annotations[1]"),
    (lambda d: d["annotations"][1].update(bbox=[0, None, 2, 3]), "annotations[1]"),
    (lambda d: d["annotations"][1].update(bbox=[0, 0, -2, 3]), "annotations[1]"),
    (lambda d: d["annotations"][1].update(image_id=[7]), "annotations[1]"),
    (lambda d: d["annotations"][1].update(category_id="18"), "annotations[1]"),
    (lambda d: d["images"][1].update(width=None), "images[1]"),
    (lambda d: d["images"][1].update(width=0), "images[1]"),
    (lambda d: d["images"][1].update(height=float("nan")), "images[1]"),
    (lambda d: d["images"][1].update(id=[8]), "images[1]"),
    (lambda d: d["categories"][1].pop("name"), "categories[1]"),
    (lambda d: d["categories"][1].update(name=None), "categories[1]"),
    (lambda d: d["categories"].append("dog"), "categories[2]"),
])
def test_malformed_instances_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "instances_test.json"
    if content == "unknown category":
        data = _instances(tmp_path)
        data["annotations"][0]["category_id"] = 99
        path.write_text(json.dumps(data))
    elif callable(content):  # one bad value in an otherwise good file
        data = _instances(tmp_path)
        content(data)
        path.write_text(json.dumps(data))
    elif isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_text(json.dumps(content))
    with pytest.raises(InstancesError) as err:
        load_instances(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------ word kinds


def test_synthetic_attribute_words_are_the_run_before_the_noun():
    matcher = matcher_for(["circle", "square", "triangle"])
    words = "two large red circles to the left of a square".split()
    attention = np.stack([peaked(2, 2, i % 2, (i // 2) % 2) for i in range(len(words))]).astype(np.float32)
    found = named_words(words, attention, matcher)
    assert [n.word for n in found] == ["circles", "square"]
    assert len(found[0].attribute_maps) == 2  # "large", "red"; not the count "two"
    assert np.array_equal(found[0].attribute_maps[0], attention[1])
    assert found[1].attribute_maps == ()  # "a square": no attribute word
    assert matcher_for(["person", "dog"]).attributes == frozenset()  # COCO: nouns only


def test_grounding_per_word_kind_with_its_uniform_reference():
    """The soft model's pattern: the attribute words look at the object, the noun looks away."""
    # 64x64 image, 4x4 grid; the circle fills cell (0, 0).
    instances = Instances("mem", ("circle",), {1: (64.0, 64.0)}, {1: {"circle": [(0, 0, 16, 16)]}})
    on, off = peaked(4, 4, 0, 0, 0.7), peaked(4, 4, 3, 3, 0.7)
    item = NamedWord(3, "circle", "circle", off, (on, on))  # "a large red circle"
    report = score_grounding({1: [item]}, instances)
    metrics = report.metrics()
    assert metrics["pointing_game"] == 0.0 and metrics["mass_in_box"] == pytest.approx(0.3 / 15)
    assert metrics["pointing_game_attribute"] == 1.0 and metrics["mass_in_box_attribute"] == pytest.approx(0.7)
    assert metrics["grounding_words_attribute"] == 2 and metrics["grounding_words_phrase"] == 1
    # The phrase: the mean of the three maps, scored as one map.
    phrase = (2 * on + off) / 3
    assert metrics["pointing_game_phrase"] == 1.0
    assert metrics["mass_in_box_phrase"] == pytest.approx(float(phrase[0, 0]))
    for suffix in ("", "_attribute", "_phrase"):  # the same boxes: a uniform map scores 1/16 for each kind
        assert metrics[f"uniform_pointing_game{suffix}"] == pytest.approx(1 / 16)
        assert metrics[f"uniform_mass_in_box{suffix}"] == pytest.approx(1 / 16)
    assert any("attribute words (2)" in line for line in report.notes())


def test_argmax_phrase_map_counts_the_attended_cells():
    instances = Instances("mem", ("circle",), {1: (64.0, 64.0)}, {1: {"circle": [(0, 0, 16, 16)]}})
    on, off = peaked(4, 4, 0, 0, 0.4), peaked(4, 4, 3, 3, 0.4)
    report = score_grounding({1: [NamedWord(2, "circle", "circle", off, (on, on))]}, instances, mode="argmax")
    metrics = report.metrics()
    # One-hot maps: two of three steps attended the circle's cell.
    assert metrics["pointing_game_phrase"] == 1.0 and metrics["mass_in_box_phrase"] == pytest.approx(2 / 3)
    assert metrics["mass_in_box_attribute"] == 1.0 and metrics["mass_in_box"] == 0.0
