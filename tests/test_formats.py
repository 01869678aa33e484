"""Readers of the source caption formats (captioning/data/formats.py), on tiny files made here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioning.data.coco import AnnotationError
from captioning.data.formats import (DUPLICATE_FILE, DUPLICATE_ID, EMPTY_CAPTION, NO_CAPTIONS, NOT_IN_SPLIT,
                                     NOT_UTF8, OUTSIDE_IMAGES, TWO_SPLITS, UNKNOWN_IMAGE, assign_splits, default_flickr8k_lists,
                                     detect_format, normalize_caption, pool_instances, read_coco, read_flickr8k,
                                     read_karpathy)


def karpathy_entry(image_id: int, split: str, captions: list[str], folder: str = "val2014") -> dict:
    return {"filepath": folder, "filename": f"COCO_{image_id:012d}.jpg", "imgid": image_id - 1, "cocoid": image_id,
            "split": split, "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": image_id - 1} for c in captions]}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def reasons(dataset) -> dict[str, int]:
    out: dict[str, int] = {}
    for skip in dataset.skipped:
        out[skip.reason] = out.get(skip.reason, 0) + 1
    return out


# ------------------------------------------------------------------------------------ captions


@pytest.mark.parametrize("text, expected, changed", [
    ("A dog  runs.\n", "A dog runs.", False),
    ("Caf\u00e9 na\u00efve r\u00e9sum\u00e9", "Cafe naive resume", True),
    ("\u201cquoted\u201d \u2019tis \u2014 fine", "\"quoted\" 'tis - fine", True),
    ("\ufb01sh on a \uff54able", "fish on a table", True),  # ligature, full-width letter
    ("a dog \u6771\u4eac near", "a dog near", True),  # other scripts: replaced by spaces
    ("\u00a0 \u3000 ", "", True),  # non-breaking and ideographic spaces only
])
def test_normalize_caption(text, expected, changed):
    assert normalize_caption(text) == (expected, changed)
    assert normalize_caption(text)[0].isascii()


# ------------------------------------------------------------------------------------ karpathy


def test_karpathy_reads_splits_ids_paths_and_skips(tmp_path):
    entries = [
        karpathy_entry(10, "train", ["A cat on a mat.", "   ", "...", "Caf\u00e9 cat"]),
        karpathy_entry(11, "restval", ["a dog"]),
        karpathy_entry(12, "val", ["a bird"], folder="train2014"),
        karpathy_entry(13, "test", ["", "\t"]),  # no usable caption at all
    ]
    path = write_json(tmp_path / "dataset_coco.json", {"images": entries, "dataset": "coco"})
    data = read_karpathy(path, tmp_path)
    by_id = {img.image_id: img for img in data.images}
    assert sorted(by_id) == [10, 11, 12]  # cocoid, not imgid
    assert by_id[10].captions == ["A cat on a mat.", "Cafe cat"]
    assert by_id[11].split == "train" and by_id[12].split == "val"  # restval joins train
    assert by_id[12].path == tmp_path / "train2014" / "COCO_000000000012.jpg"
    assert by_id[12].file_name == "train2014/COCO_000000000012.jpg"
    assert reasons(data) == {EMPTY_CAPTION: 4, NO_CAPTIONS: 1}
    assert data.normalised_captions == 1
    assert detect_format(path) == "karpathy"
    marked = tmp_path / "dataset_bom.json"  # saved by an editor that writes a UTF-8 byte-order mark
    marked.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert detect_format(marked) == "karpathy"


def test_karpathy_flickr_uses_imgid_and_no_filepath(tmp_path):
    entries = [{"filename": f"{i}.jpg", "imgid": i, "split": "train", "sentences": [{"tokens": ["a", "dog"]}]}
               for i in range(3)]
    data = read_karpathy(write_json(tmp_path / "dataset_flickr8k.json", {"images": entries}), tmp_path / "imgs")
    assert [(img.image_id, img.path, img.captions) for img in data.images] == [
        (i, tmp_path / "imgs" / f"{i}.jpg", ["a dog"]) for i in range(3)]


def test_duplicate_ids_and_files_are_skipped_not_guessed(tmp_path):
    a = karpathy_entry(1, "train", ["one"])
    b = dict(karpathy_entry(1, "train", ["other"]), filename="OTHER.jpg")  # id 1 for two files
    c = karpathy_entry(2, "train", ["two"])
    d = dict(karpathy_entry(3, "train", ["three"]), filename=c["filename"])  # one file, ids 2 and 3
    e = karpathy_entry(4, "train", ["four"])
    e2 = karpathy_entry(4, "test", ["four again"])  # same id and file in two splits
    f = karpathy_entry(5, "train", ["five"])
    f2 = karpathy_entry(5, "train", ["five more"])  # exact repeat: merged
    data = read_karpathy(write_json(tmp_path / "d.json", {"images": [a, b, c, d, e, e2, f, f2]}), tmp_path)
    assert [(img.image_id, img.captions) for img in data.images] == [(5, ["five", "five more"])]
    assert reasons(data) == {DUPLICATE_ID: 2, DUPLICATE_FILE: 2, TWO_SPLITS: 1}


@pytest.mark.parametrize("content, message", [
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}, "use --format coco"),
    ({"pictures": []}, "is not a Karpathy split file"),
    ({"images": [{"filename": "a.jpg", "split": "train"}]}, "images[0] lacks"),
    ({"images": [dict(karpathy_entry(1, "train", ["x"]), split="dev")]}, "has split 'dev'"),
])
def test_karpathy_wrong_schema_is_one_line_naming_the_file(tmp_path, content, message):
    path = write_json(tmp_path / "bad.json", content)
    with pytest.raises(AnnotationError) as err:
        read_karpathy(path, tmp_path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_not_json_is_one_line(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text('{"images": [')  # truncated download
    with pytest.raises(AnnotationError, match="is not valid JSON"):
        read_karpathy(path, tmp_path)


# ------------------------------------------------------------------------------------ coco


def coco_file(path: Path, images: list[tuple[int, str]], captions: list[tuple[int, str]]) -> Path:
    return write_json(path, {"images": [{"id": i, "file_name": f} for i, f in images],
                             "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(captions)]})


def test_coco_pooled_files_find_images_in_their_tag_folder_and_seeded_split(tmp_path):
    (tmp_path / "train2014").mkdir()
    (tmp_path / "val2014").mkdir()
    for i in range(1, 11):
        folder = "train2014" if i <= 6 else "val2014"
        (tmp_path / folder / f"COCO_{i}.jpg").write_bytes(b"x")
    train = coco_file(tmp_path / "captions_train2014.json", [(i, f"COCO_{i}.jpg") for i in range(1, 7)],
                      [(i, f"caption {i}") for i in range(1, 7)] + [(99, "orphan")])
    val = coco_file(tmp_path / "captions_val2014.json", [(i, f"COCO_{i}.jpg") for i in range(7, 11)],
                    [(i, f"caption {i}") for i in range(7, 11)] + [(7, " ")])
    data = read_coco([(None, train), (None, val)], tmp_path)
    assert {img.image_id: img.file_name for img in data.images}[8] == "val2014/COCO_8.jpg"
    assert all(img.path.is_file() for img in data.images)
    assert reasons(data) == {UNKNOWN_IMAGE: 1, EMPTY_CAPTION: 1}
    assign_splits(data, None, seed=3, val_size=2, test_size=3)
    splits = {img.image_id: img.split for img in data.images}
    assert sorted(splits.values()).count("val") == 2 and sorted(splits.values()).count("test") == 3
    again = read_coco([(None, train), (None, val)], tmp_path)
    assign_splits(again, None, seed=3, val_size=2, test_size=3)
    assert {img.image_id: img.split for img in again.images} == splits  # seeded: reproducible
    with pytest.raises(AnnotationError, match="leaves no training image"):
        assign_splits(again, None, seed=0, val_size=5, test_size=5)


def test_coco_split_lists_by_id_rest_to_train(tmp_path):
    path = coco_file(tmp_path / "captions.json", [(i, f"{i}.jpg") for i in range(1, 7)], [(i, "a cat") for i in range(1, 7)])
    (tmp_path / "val.txt").write_text("1\n2\n")
    (tmp_path / "test.txt").write_text("3.jpg\n2\n")  # 2 is in val and test: skipped
    data = read_coco([(None, path)], tmp_path)
    assign_splits(data, {"val": tmp_path / "val.txt", "test": tmp_path / "test.txt"}, 0, 0, 0)
    assert {img.image_id: img.split for img in data.images} == {1: "val", 3: "test", 4: "train", 5: "train", 6: "train"}
    assert reasons(data) == {TWO_SPLITS: 1}


def test_coco_per_split_files_and_instances_file_mistaken_for_captions(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.jpg").write_bytes(b"x")
    train = coco_file(tmp_path / "captions_train.json", [(1, "a.jpg")], [(1, "a cat")])
    data = read_coco([("train", train)], tmp_path)
    assert data.images[0].path == tmp_path / "train" / "a.jpg" and data.images[0].split == "train"
    instances = write_json(tmp_path / "instances_train2014.json", {
        "images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "cat"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]})
    with pytest.raises(AnnotationError, match="pass it with --instances") as err:
        read_coco([(None, instances)], tmp_path)
    assert str(instances) in str(err.value)
    with pytest.raises(AnnotationError, match="pass it with --captions"):
        pool_instances([train])
    categories, annotations, images = pool_instances([instances])
    assert categories == [{"id": 1, "name": "cat"}] and annotations[0]["bbox"] == [0, 0, 1, 1] and 1 in images


def test_coco_annotations_without_ids_are_indexed(tmp_path):
    path = write_json(tmp_path / "mine.json", {"images": [{"id": 5, "file_name": "x.jpg"}],
                                               "annotations": [{"image_id": 5, "caption": "a"}, {"image_id": 5, "caption": "b"}]})
    assert read_coco([(None, path)], tmp_path).images[0].captions == ["a", "b"]


# ------------------------------------------------------------------------------------ flickr8k


def test_flickr8k_token_file_and_default_lists(tmp_path):
    lines = ["b.jpg#0\tA dog runs .", "a.jpg#0\tA cat .", "a.jpg#1\t  ", "a.jpg#1\tdup number", "c.jpg#0\ta bird",
             "d.jpg#0\tnot listed anywhere", ""]
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("\n".join(lines))
    for name, content in (("train", "a.jpg\n"), ("dev", "b.jpg\n"), ("test", "c.jpg\n")):
        (tmp_path / f"Flickr_8k.{name}Images.txt").write_text(content)
    data = read_flickr8k(token, tmp_path / "Flicker8k_Dataset")
    assert [(img.image_id, img.file_name) for img in data.images] == [(0, "a.jpg"), (1, "b.jpg"), (2, "c.jpg"), (3, "d.jpg")]
    assert data.images[0].captions == ["A cat ."]
    assign_splits(data, default_flickr8k_lists(token), 0, 0, 0)
    assert {img.file_name: img.split for img in data.images} == {"a.jpg": "train", "b.jpg": "val", "c.jpg": "test"}
    assert reasons(data) == {EMPTY_CAPTION: 1, DUPLICATE_FILE: 1, NOT_IN_SPLIT: 1}
    assert detect_format(token) == "flickr8k"


def test_flickr8k_wrong_line_names_file_and_line(tmp_path):
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("a.jpg#0\tfine\na.jpg a caption without number or tab\n")
    with pytest.raises(AnnotationError, match=r"line 2 is not") as err:
        read_flickr8k(token, tmp_path)
    assert str(token) in str(err.value)


def test_flickr8k_bytes_that_are_not_utf8_are_a_counted_skip_not_mangled(tmp_path):
    token = tmp_path / "Flickr8k.token.txt"
    token.write_bytes(b"a.jpg#0\tcaf\xe9 au lait\nb.jpg#0\ta dog in caf\xc3\xa9 light\n")  # Latin-1, then UTF-8
    data = read_flickr8k(token, tmp_path)
    assert [(img.file_name, img.captions) for img in data.images] == [("b.jpg", ["a dog in cafe light"])]
    assert reasons(data) == {NOT_UTF8: 1}
    assert "line 1: byte 0xe9" in data.skipped[0].item and "UTF-8" in data.skipped[0].item


def test_image_paths_that_leave_the_images_folder_are_skipped_never_opened(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("../secret.jpg#0\ta cat\n/etc/passwd#0\ta dog\nok.jpg#0\ta bird\nsub/../../x.jpg#0\ta fish\n")
    data = read_flickr8k(token, images)
    assert [img.file_name for img in data.images] == ["ok.jpg"] and reasons(data) == {OUTSIDE_IMAGES: 3}
    entries = [karpathy_entry(1, "train", ["a cat"], folder="../.."), karpathy_entry(2, "train", ["a dog"])]
    entries[1]["filename"] = "/etc/hostname"
    entries.append(karpathy_entry(3, "val", ["a bird"]))
    data = read_karpathy(write_json(tmp_path / "dataset_coco.json", {"images": entries}), images)
    assert [img.image_id for img in data.images] == [3] and reasons(data) == {OUTSIDE_IMAGES: 2}
    coco = coco_file(tmp_path / "captions_x.json", [(1, "../../etc/hostname"), (2, "b.jpg")], [(1, "a"), (2, "b c")])
    data = read_coco([(None, coco)], images)
    assert [img.image_id for img in data.images] == [2] and reasons(data) == {OUTSIDE_IMAGES: 1}


def test_detect_format_refuses_unknown_files(tmp_path):
    csv = tmp_path / "captions.csv"
    csv.write_text("image,caption\na.jpg,a cat\n")
    with pytest.raises(AnnotationError, match="cannot tell the format"):
        detect_format(csv)
    with pytest.raises(AnnotationError, match="cannot tell the format"):
        detect_format(write_json(tmp_path / "x.json", {"something": 1}))
