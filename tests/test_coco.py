"""captioning.data.coco: the one home of COCO captions, instances and results files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioning.data import coco
from captioning.data.coco import (AnnotationError, ResultsError, load_coco_captions, load_results, read_boxes,
                                  read_instances, write_results)
from captioning.data.datamodule import CaptionDataModule
from captioning.data.formats import read_coco


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _instances() -> dict:
    return {"images": [{"id": 1, "width": 64, "height": 48}, {"id": 2, "width": 10, "height": 10}],
            "categories": [{"id": 3, "name": "dog"}, {"id": 4, "name": "cat"}],
            "annotations": [{"id": 9, "image_id": 1, "category_id": 4, "bbox": [5, 6, 7, 8]},
                            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "segmentation": []}]}


def test_one_caption_normalisation_for_the_folder_reader_and_preparation(tmp_path):
    # The COCO-folder reader (training, evaluation references) and preparation clean text the same way.
    raw = "  A caf\u00e9  with a \u201cbig\u201d  dog\u2014outside  "
    path = _write(tmp_path / "captions_val.json", {"images": [{"id": 1, "file_name": "a.jpg"}],
                                                    "annotations": [{"id": 1, "image_id": 1, "caption": raw},
                                                                    {"id": 2, "image_id": 1, "caption": " \u00a0 "}]})
    (tmp_path / "a.jpg").write_bytes(b"x")
    folder = load_coco_captions(path, tmp_path)[0].captions
    prepared = read_coco([(None, path)], tmp_path).images[0].captions
    assert folder == tuple(prepared) == ('A cafe with a "big" dog-outside',)


def test_read_boxes_orders_by_annotation_id_and_keeps_images_without_boxes(tmp_path):
    path = _write(tmp_path / "instances_val.json", _instances())
    assert read_boxes(path) == {1: [("dog", [1.0, 2.0, 3.0, 4.0]), ("cat", [5.0, 6.0, 7.0, 8.0])], 2: []}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("categories"), "not a COCO instances file"),
    (lambda d: d["annotations"][0].update(category_id=99), "not in 'categories'"),
    (lambda d: d["annotations"][0].update(image_id=77), "not in 'images'"),
    (lambda d: d["annotations"][0].pop("bbox"), "'bbox'"),
    (lambda d: d.update(annotations=[{"image_id": 1, "caption": "a dog"}]), "pass it with --captions"),
    # Values, checked without sizes too (preparation reads the file so, and stores what it accepts).
    (lambda d: d["annotations"][1].update(bbox=[1, 2, None, 4]), "annotations[1]"),
    (lambda d: d["annotations"][1].update(image_id=[1]), "annotations[1]"),
    (lambda d: d["images"][1].update(width=0), "images[1]"),
    (lambda d: d["categories"][0].update(name=None), "categories[0]"),
])
def test_instances_errors_are_one_line_and_name_the_file(tmp_path, change, message):
    data = _instances()
    change(data)
    path = _write(tmp_path / "instances_x.json", data)
    with pytest.raises(AnnotationError) as err:
        read_instances(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_instances_sizes_are_required_only_when_asked(tmp_path):
    data = _instances()
    del data["images"][1]["width"]
    path = _write(tmp_path / "instances_x.json", data)
    assert set(read_instances(path).imgs) == {1, 2}
    with pytest.raises(ValueError, match="'width' and 'height'"):
        read_instances(path, ValueError, sizes=True)


def test_results_round_trip_sorted_and_atomic(tmp_path):
    path = tmp_path / "predictions.json"
    write_results(path, {5: "a dog", 2: "a cat"})
    assert [e["image_id"] for e in json.loads(path.read_text())] == [2, 5]
    assert load_results(path) == {2: "a cat", 5: "a dog"}
    assert not list(tmp_path.glob("*.tmp"))
    _write(path, [{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}])
    with pytest.raises(ResultsError, match="more than once"):
        load_results(path)


def test_every_module_shares_one_splits_constant():
    from captioning.data import datamodule, feature_cache, formats, prepare

    assert coco.SPLITS == ("train", "val", "test")
    assert all(m.SPLITS is coco.SPLITS for m in (datamodule, feature_cache, formats, prepare))


def test_datamodule_boxes_come_from_the_one_reader(tmp_path):
    from captioning.config import DataConfig

    (tmp_path / "annotations").mkdir()
    _write(tmp_path / "annotations" / "instances_val.json", _instances())
    dm = CaptionDataModule(DataConfig(dataset="coco", root=str(tmp_path)), None)
    assert dm.boxes("val") == read_boxes(tmp_path / "annotations" / "instances_val.json")
    assert dm.boxes("test") is None
