"""Preparation end to end (captioning/data/prepare.py, store.py, scripts/prepare_data.py).

Tiny datasets are written here in every source format with real JPEG/PNG files, including every
kind of bad record. Images of good records have an average colour that encodes their id and
captions that name it (captioning/data/examples.py), so a caption paired with the wrong image
shows in both the pixels and the words.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.config import DataConfig
from captioning.data import prepare as prepare_module
from captioning.data.datamodule import CaptionDataModule, ImageSource, benchmark_loader
from captioning.data.examples import example_captions, example_image, id_colour, write_example_dataset
from captioning.data.formats import (EMPTY_CAPTION, FORMATS, Format, SourceDataset, SourceImage, assign_splits,
                                     read_karpathy, register)
from captioning.data.prepare import (MISSING_FILE, NO_TRAINING_CAPTION, UNREADABLE, PrepareError, PrepareOptions,
                                     prepare)
from captioning.data.store import PreparedDataError, PreparedFolder
from captioning.files import MARKER, mark_folder
from captioning.data.transforms import unnormalize
from captioning.vocab import tokenize

REPO = Path(__file__).resolve().parents[1]
from captioning.data import run as prepare_data  # (captioning prepare)

SIZE = 32
GOOD_TRAIN, GOOD_VAL, GOOD_TEST = range(1, 21), range(21, 25), range(25, 29)


def _jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def write_bad_images(folder: Path) -> dict[str, str]:
    """Every awkward kind of file; -> {kind: file name}. Ids 101.. in the dataset below."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = example_image(7, 40)
    files = {}
    files["grayscale"] = "gray.jpg"
    rgb.convert("L").save(folder / "gray.jpg", quality=95)
    files["cmyk"] = "cmyk.jpg"
    rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    files["rgba"] = "rgba.png"
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(folder / "rgba.png")
    files["palette"] = "palette.png"
    rgb.quantize(16).save(folder / "palette.png")
    files["16-bit"] = "deep.png"
    deep = (np.linspace(0, 65535, 40 * 40).reshape(40, 40)).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")  # mode I;16
    files["exif"] = "rotated.jpg"
    wide = Image.new("RGB", (48, 24), (200, 30, 30))
    wide.paste((30, 30, 200), (0, 0, 12, 24))  # blue band on the left before rotation
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    (folder / "rotated.jpg").write_bytes(_jpeg_bytes(wide, exif=exif.tobytes()))
    files["truncated"] = "truncated.jpg"
    whole = _jpeg_bytes(example_image(8, 64))
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    files["corrupt"] = "corrupt.jpg"
    (folder / "corrupt.jpg").write_bytes(b"this is not a JPEG at all" * 10)
    files["missing"] = "missing.jpg"
    return files


def entry(image_id: int, split: str, filename: str, captions: list[str]) -> dict:
    return {"filepath": "images", "filename": filename, "imgid": image_id, "cocoid": image_id, "split": split,
            "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}


def make_karpathy_dataset(root: Path) -> Path:
    """28 good images (train 20 / val 4 / test 4) plus one of every bad kind; -> dataset json."""
    images = root / "images"
    images.mkdir(parents=True)
    entries = []
    for ids, split in ((GOOD_TRAIN, "train"), (GOOD_VAL, "val"), (GOOD_TEST, "test")):
        for i in ids:
            example_image(i, 48).save(images / f"img_{i}.jpg", quality=95)
            captions = example_captions(i, 3)
            if i == 3:
                captions += ["", "   \t ", "?!"]  # empty, whitespace, no word: skipped with a reason
            if i == 4:
                captions += ["a caf\u00e9 \u201cdog\u201d in image 4 \u2014 na\u00efve"]  # non-ASCII: normalised
            entries.append(entry(i, split, f"img_{i}.jpg", captions))
    for n, (kind, name) in enumerate(write_bad_images(images).items()):
        entries.append(entry(101 + n, "train", name, [f"a {kind.replace('-', ' ')} picture in image {101 + n}"]))
    # Duplicate id: id 200 names two different files -> both skipped.
    example_image(200, 48).save(images / "dup_a.jpg")
    example_image(201, 48).save(images / "dup_b.jpg")
    entries += [entry(200, "train", "dup_a.jpg", ["image 200 a"]), entry(200, "train", "dup_b.jpg", ["image 200 b"])]
    path = root / "dataset_example.json"
    path.write_text(json.dumps({"images": entries, "dataset": "example"}))
    return path


OPTIONS = dict(image_size=SIZE, min_word_count=1, max_len=8, workers=1, chunk_size=4, progress=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("source")
    make_karpathy_dataset(root)
    return root


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "example"
    manifest = prepare(read_karpathy(source / "dataset_example.json", source), out, PrepareOptions(**OPTIONS))
    return out, manifest


def data_module(root: Path, **overrides) -> CaptionDataModule:
    cfg = DataConfig(**{"dataset": "prepared", "root": str(root), "image_size": SIZE, "batch_size": 4,
                        "captions_per_image": 2, "max_caption_len": 8, **overrides})
    dm = CaptionDataModule(cfg)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------ contents


def test_bad_records_are_skipped_or_converted_with_reasons(prepared):
    out, manifest = prepared
    summary = manifest["summary"]
    assert summary["skipped"] == {EMPTY_CAPTION: 3, MISSING_FILE: 1, UNREADABLE: 2, "duplicate image id": 2}
    skipped = json.loads((out / "skipped.json").read_text())
    assert {s["item"].split(":")[0] for s in skipped if s["reason"] == UNREADABLE} == {"images/truncated.jpg",
                                                                                        "images/corrupt.jpg"}
    assert summary["converted"] == {"grayscale": 1, "CMYK": 1, "alpha": 1, "palette": 1, "16-bit": 1, "EXIF-rotated": 1}
    assert summary["normalised_non_ascii_captions"] == 1
    counts = manifest["counts"]
    assert (counts["train"]["images"], counts["val"]["images"], counts["test"]["images"]) == (26, 4, 4)
    refs = data_module(out).references("train")
    assert 'a cafe "dog" in image 4 - naive' in refs[4]
    assert all(c.strip() for cs in refs.values() for c in cs)
    # The manifest describes the folder: sources with checksums, options, versions, file formats.
    source_file = manifest["source"]["files"][0]
    assert source_file["role"] == "captions" and len(source_file["sha256"]) == 64 and source_file["bytes"] > 0
    assert manifest["options"]["image_size"] == SIZE and "numpy" in manifest["versions"]
    assert set(manifest["files"]) >= {"images_{split}.npy", "tokens_{split}.npy", "vocab.json"}
    assert not (out.parent / "example.partial").exists()


def test_store_gives_the_same_tensors_as_the_image_files(prepared):
    """Every stored image, the converted kinds included, equals the file path's preprocessing."""
    out, _ = prepared
    dm = data_module(out)
    for split in ("train", "val"):
        records = dm.load_split(split)
        from_files = ImageSource(records, SIZE, cache=False)
        from_store = dm.images(split)
        for i in range(len(records)):
            assert torch.equal(from_store[i], from_files[i]), records[i].path
    rotated = next(i for i, r in enumerate(dm.load_split("train")) if r.path.name == "rotated.jpg")
    pixels = dm.images("train").pixels(rotated)  # 48x24 rotated to 24x48: the blue band is on top
    assert pixels[1, SIZE // 2, 2] > 150 and pixels[-2, SIZE // 2, 0] > 150


def test_round_trip_and_pairing_through_the_loader(prepared):
    """decode(encode(caption)) is the caption's words; with 2 DataLoader workers and shuffling,
    every image's pixels and captions name the image id the batch reports."""
    out, _ = prepared
    dm = data_module(out, num_workers=2)
    folder = PreparedFolder(out)
    part = folder.split("train")
    for i, record in enumerate(part.records):
        decoded = [" ".join(dm.vocab.decode(ids)) for ids in part.encoded(i)]
        assert decoded == [" ".join(tokenize(c)[:8]) for c in record.captions]
    seen = set()
    for batch in dm.train_dataloader():
        images = unnormalize(batch["images"]) * 255
        k = batch["captions"].shape[0] // batch["images"].shape[0]
        for b, image_id in enumerate(batch["image_ids"].tolist()):
            seen.add(image_id)
            for row in batch["captions"][b * k:(b + 1) * k]:
                assert str(image_id) in dm.vocab.decode(row), (image_id, dm.vocab.decode(row))
            if image_id in GOOD_TRAIN:
                mean = images[b].mean(dim=(1, 2))
                assert torch.allclose(mean, torch.tensor(id_colour(image_id), dtype=torch.float), atol=4), image_id
    assert seen == set(GOOD_TRAIN) | {101, 102, 103, 104, 105, 106}
    refs = dm.references("val")
    assert set(refs) == set(GOOD_VAL) and all(str(i) in c for i, cs in refs.items() for c in cs)


def test_vocabulary_from_train_only_and_unknown_rate(prepared):
    out, manifest = prepared
    vocab = PreparedFolder(out).vocab
    assert vocab.words[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert "20" in vocab.index and "21" not in vocab.index  # "21" only appears in val captions
    assert manifest["summary"]["unknown_token_percent"]["train"] == 0
    assert manifest["summary"]["unknown_token_percent"]["val"] > 0


def test_long_captions_truncate_or_drop(source, tmp_path):
    base = read_karpathy(source / "dataset_example.json", source)
    out = tmp_path / "drop"
    manifest = prepare(base, out, PrepareOptions(**{**OPTIONS, "max_len": 6, "long_captions": "drop"}))
    lengths = np.load(out / "lengths_train.npy")
    captions = json.loads((out / "captions_train.json").read_text())["annotations"]
    for n, ann in zip(lengths, captions):  # rows align with annotations; long ones have length 0
        assert (n == 0) == (len(tokenize(ann["caption"])) > 6)
    assert manifest["counts"]["train"]["training_captions"] == int((lengths > 0).sum()) < len(captions)
    assert manifest["counts"]["train"]["longer_than_max_len"] == len(captions) - int((lengths > 0).sum())
    # "a 16 bit picture in image 105" has 7 words: the image has no training caption left.
    assert manifest["summary"]["skipped"][NO_TRAINING_CAPTION] == 1
    assert 105 not in {r.image_id for r in PreparedFolder(out).records("train")}
    truncated = tmp_path / "truncate"
    prepare(base, truncated, PrepareOptions(**{**OPTIONS, "max_len": 3}))
    assert (np.load(truncated / "lengths_train.npy") == 3 + 2).all()  # <start> 3 words <end>
    with pytest.raises(PrepareError, match="no training caption.*--max-len"):
        prepare(base, tmp_path / "none", PrepareOptions(**{**OPTIONS, "max_len": 4, "long_captions": "drop"}))


def test_strict_fails_on_the_first_skip_and_leaves_no_folder(source, tmp_path):
    with pytest.raises(PrepareError, match=f"--strict: {EMPTY_CAPTION}: images/img_3.jpg"):
        prepare(read_karpathy(source / "dataset_example.json", source), tmp_path / "s",
                PrepareOptions(**{**OPTIONS, "strict": True}))
    assert not (tmp_path / "s").exists()
    dataset = read_karpathy(source / "dataset_example.json", source)
    dataset.skipped.clear()
    with pytest.raises(PrepareError, match="--strict: unreadable image: cannot read image .*truncated.jpg: image file is truncated"):
        prepare(dataset, tmp_path / "s", PrepareOptions(**{**OPTIONS, "strict": True}))
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------ atomic, resume


def _folder_contents(root: Path) -> dict[str, bytes]:
    # The marker names its own folder and a random id: the one file that differs by design.
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.name not in ("manifest.json", MARKER)}


def test_interrupted_preparation_resumes_only_the_unfinished_chunks(source, prepared, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    calls = []
    real = prepare_module._decode_chunk

    def interrupted(task):
        calls.append(task[:2])
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return real(task)

    monkeypatch.setattr(prepare_module, "_decode_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(read_karpathy(source / "dataset_example.json", source), out, PrepareOptions(**OPTIONS))
    partial = tmp_path / "resumed.partial"
    assert not out.exists() and len(list((partial / "chunks").glob("*.json"))) == 2
    with pytest.raises(PreparedDataError, match="did not finish.*run the same"):
        PreparedFolder(out)

    calls.clear()
    monkeypatch.setattr(prepare_module, "_decode_chunk", lambda task: (calls.append(task[:2]), real(task))[1])
    prepare(read_karpathy(source / "dataset_example.json", source), out, PrepareOptions(**OPTIONS))
    rows = [c["store_rows"] for c in prepared[1]["counts"].values()]  # decoded candidates per split
    total_chunks = sum(-(-n // 4) for n in rows)
    assert len(calls) == total_chunks - 2
    assert not partial.exists()
    assert _folder_contents(out) == _folder_contents(prepared[0])  # identical to the uninterrupted run


def test_changed_options_start_over_and_existing_folder_needs_overwrite(source, tmp_path, monkeypatch):
    out = tmp_path / "p"
    dataset = read_karpathy(source / "dataset_example.json", source)
    partial = tmp_path / "p.partial"
    (partial / "chunks").mkdir(parents=True)
    mark_folder(partial, "prepared", name_as=out)  # OUT.partial/ is marked for the folder it becomes
    (partial / "plan.json").write_text("{}")  # a partial run with other options
    (partial / "chunks" / "train-000000.json").write_text("[]")
    prepare(dataset, out, PrepareOptions(**OPTIONS))
    assert PreparedFolder(out).split("train").records  # redone, not the stale marker's empty chunk
    with pytest.raises(PrepareError, match="already a prepared folder.*--overwrite"):
        prepare(dataset, out, PrepareOptions(**OPTIONS))
    prepare(dataset, out, PrepareOptions(**{**OPTIONS, "overwrite": True, "image_size": 16}))
    assert PreparedFolder(out).image_size == 16 and not list(tmp_path.glob("p.old-*"))
    (tmp_path / "notprepared").mkdir()
    (tmp_path / "notprepared" / "precious.txt").write_text("x")
    with pytest.raises(PrepareError, match="not empty and was not written by show-attend-tell"):
        prepare(dataset, tmp_path / "notprepared", PrepareOptions(**{**OPTIONS, "overwrite": True}))
    assert (tmp_path / "notprepared" / "precious.txt").read_text() == "x"


def test_image_size_and_vocabulary_mismatch_are_one_line_errors(prepared):
    out, _ = prepared
    with pytest.raises(PreparedDataError, match=f"stores {SIZE}x{SIZE} images but data.image_size is 64"):
        CaptionDataModule(DataConfig(dataset="prepared", root=str(out), image_size=64)).setup("fit")
    from captioning.vocab import Vocabulary

    other = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "cat"])
    with pytest.raises(PreparedDataError, match="vocabulary"):
        CaptionDataModule(DataConfig(dataset="prepared", root=str(out), image_size=SIZE), other).setup("fit")
    with pytest.raises(PreparedDataError, match="not a prepared folder"):
        CaptionDataModule(DataConfig(dataset="prepared", root=str(out.parent), image_size=SIZE)).setup("fit")


@pytest.mark.parametrize("stored", [["<pad>", "<start>"], {"vocab": []},
                                    {"words": ["<pad>", "<start>", "<end>", "<unk>", 7]}])
def test_a_damaged_vocabulary_file_is_a_one_line_error(prepared, tmp_path, stored):
    out, _ = prepared
    copy = shutil.copytree(out, tmp_path / "copy")
    (copy / "vocab.json").write_text(json.dumps(stored))
    with pytest.raises(PreparedDataError, match="vocab.json is damaged .*: prepare the folder again") as err:
        PreparedFolder(copy).vocab
    assert "\n" not in str(err.value)


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("damage", [
    lambda d: _edit_json(d / "captions_train.json", lambda c: c["annotations"][0].update(image_id=99999)),
    lambda d: _edit_json(d / "captions_train.json", lambda c: c["annotations"][0].update(image_id=[1])),
    lambda d: _edit_json(d / "captions_train.json", lambda c: c["images"][0].pop("row")),
    lambda d: _edit_json(d / "captions_train.json", lambda c: c["images"][0].update(row=10 ** 6)),
    lambda d: _edit_json(d / "captions_train.json", lambda c: c.update(images={})),
    lambda d: _edit_json(d / "manifest.json", lambda m: m.pop("options")),
    lambda d: _edit_json(d / "manifest.json", lambda m: m["source"].pop("images_root")),
    lambda d: _truncate(d / "images_train.npy"),
    lambda d: _truncate(d / "tokens_train.npy"),
    lambda d: _truncate(d / "lengths_train.npy"),
    lambda d: (d / "lengths_train.npy").unlink(),
])
def test_a_damaged_prepared_folder_is_a_one_line_error(prepared, tmp_path, damage):
    out, _ = prepared
    copy = shutil.copytree(out, tmp_path / "copy")
    damage(copy)
    with pytest.raises(PreparedDataError, match="prepare it again") as err:
        PreparedFolder(copy).images("train").pixels(0)
    assert "\n" not in str(err.value) and str(copy) in str(err.value)


# ------------------------------------------------------------------------------------ CLI, formats


@pytest.mark.parametrize("fmt", ["karpathy", "coco", "flickr8k"])
def test_cli_prepares_each_format_with_two_processes(tmp_path, fmt, capsys):
    captions, images = write_example_dataset(tmp_path / "src", 12, image_size=40, fmt=fmt, val=2, test=2, noise=0)
    args = ["--captions", str(captions), "--images", str(images), "--out", str(tmp_path / "out"), "--image-size",
            "16", "--min-word-count", "1", "--workers", "2", "--chunk-size", "3", "--no-progress"]
    if fmt == "coco":
        args += ["--val-size", "2", "--test-size", "2"]
    manifest = prepare_data.run(args)
    assert manifest["source"]["format"] == fmt  # told apart by content (--format auto)
    assert sum(c["images"] for c in manifest["counts"].values()) == 12
    folder = PreparedFolder(tmp_path / "out")
    assert "prepared" in capsys.readouterr().out
    for split in ("train", "val", "test"):
        part = folder.split(split)
        images_ = folder.images(split)
        for i, record in enumerate(part.records):
            image_id = record.image_id if fmt != "flickr8k" else int(record.path.stem.split("_")[1])
            assert all(f"image {image_id}" in c for c in record.captions)
            assert np.abs(images_.pixels(i).reshape(-1, 3).mean(0) - id_colour(image_id)).max() < 3


def test_cli_wrong_schema_is_one_line_exit_2(tmp_path, capsys):
    captions, images = write_example_dataset(tmp_path / "src", 4, image_size=16, fmt="karpathy", val=1, test=1)
    assert prepare_data.main(["--format", "coco", "--captions", str(captions), "--images", str(images), "--out",
                              str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress lines
    assert err.startswith("error: ") and str(captions) in err and "use --format karpathy" in err
    assert prepare_data.main(["--captions", str(captions), "--images", str(tmp_path / "nowhere"), "--out", "x"]) == 2
    assert "images folder" in capsys.readouterr().err


def test_instances_numbered_differently_from_the_captions_are_refused(tmp_path, capsys):
    # Without 'cocoid' on every entry the Karpathy ids are 'imgid' (0-based here), but the instances file is
    # keyed by cocoid: matched by id alone, img_2's boxes would land on img_1's row.
    captions, images = write_example_dataset(tmp_path / "src", 6, image_size=16, fmt="karpathy", val=1, test=1)
    data = json.loads(captions.read_text())
    del data["images"][3]["cocoid"]
    captions.write_text(json.dumps(data))
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"img_{i}.jpg", "width": 16, "height": 16} for i in range(1, 7)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, i, i]} for i in range(1, 7)],
        "categories": [{"id": 1, "name": "dog"}]}))
    argv = ["--format", "karpathy", "--captions", str(captions), "--images", str(images), "--instances",
            str(instances), "--out", str(tmp_path / "out"), "--image-size", "16", "--min-word-count", "1",
            "--workers", "1", "--no-progress"]
    assert prepare_data.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(instances) in err and "img_2.jpg" in err
    assert not (tmp_path / "out").exists()
    data["images"][3]["cocoid"] = 4  # ids from one numbering: the boxes are each image's own
    captions.write_text(json.dumps(data))
    assert prepare_data.main(argv) == 0
    stored = json.loads((tmp_path / "out" / "instances_train.json").read_text())
    assert {a["image_id"]: a["bbox"][2] for a in stored["annotations"]} == {i: i for i in range(3, 7)}


def test_a_split_or_a_captions_file_given_twice_is_refused(tmp_path, capsys):
    # A dict of splits kept the last train=, and one file read twice doubled every reference.
    captions, images = write_example_dataset(tmp_path / "src", 6, image_size=16, fmt="coco", val=1, test=1)
    other = shutil.copy(captions, tmp_path / "other.json")
    base = ["--images", str(images), "--out", str(tmp_path / "out"), "--image-size", "16", "--no-progress"]
    for given, words in [
            (["--captions", f"train={captions}", f"train={other}"], ["--captions", "train", "twice"]),
            (["--captions", str(captions), "--splits", f"val={captions}", f"val={other}"], ["--splits", "val", "twice"]),
            (["--captions", str(captions), str(captions.parent / ".." / "src" / captions.name)],
             ["--captions", str(captions), "twice"])]:
        assert prepare_data.main(["--format", "coco", *given, *base]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, words", [
    (["--make-example", "EX", "--out", "OUT", "--captions", "foo"], ["--captions", "--make-example"]),
    (["--make-example", "EX", "--json", "j.json"], ["--json", "--make-example"]),
    (["--benchmark", "OUT", "--make-example", "EX"], ["--benchmark", "--make-example"]),
    (["--benchmark", "OUT", "--out", "OUT2"], ["--out", "--benchmark"]),
    (["--benchmark", "OUT", "--num-images", "4"], ["--num-images", "--benchmark"]),
    (["--captions", "c.json", "--images", ".", "--out", "OUT", "--json", "j.json"], ["--json", "--benchmark"]),
    (["--captions", "c.json", "--images", ".", "--out", "OUT", "--num-images", "3"], ["--num-images", "--make-example"]),
    (["--captions", "c.json", "--images", ".", "--out", "OUT", "--seconds", "3"], ["--seconds", "--benchmark"]),
    (["--captions", "c.json", "--images", ".", "--out", "OUT", "--compare-files"], ["--compare-files"]),
    (["--make-example", "EX", "--num-images", "-3"], ["--num-images", "positive"]),
    (["--make-example", "EX", "--example-size", "0"], ["--example-size", "positive"]),
    (["--captions", "c.json", "--images", ".", "--out", "OUT", "--test-size", "-2"], ["--test-size", "-2"]),
    (["--benchmark", "OUT", "--captions-per-image", "0"], ["--captions-per-image", "positive"]),
    (["--benchmark", "OUT", "--seconds", "0"], ["--seconds", "positive"]),
    (["--benchmark", "OUT", "--seconds", "nan"], ["--seconds", "positive"]),
    (["--benchmark", "OUT", "--workers", "0", "-1"], ["--workers", ">= 0"]),
])
def test_options_a_mode_ignores_and_out_of_range_values_are_refused(tmp_path, capsys, argv, words):
    argv = [str(tmp_path / a) if a in ("EX", "OUT", "OUT2") else a for a in argv]
    try:
        status = prepare_data.main(argv)
    except SystemExit as exit_:  # argparse's own error line names the option
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert all(w in err for w in words), err
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("out", [".", "/", "..", "sub/.."])
def test_an_out_without_a_folder_name_is_refused(tmp_path, capsys, monkeypatch, out):
    captions, images = write_example_dataset(tmp_path / "src", 4, image_size=16, fmt="karpathy", val=1, test=1)
    monkeypatch.chdir(tmp_path / "src")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert prepare_data.main(["--captions", str(captions), "--images", str(images), "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "\n" not in err and "name" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


class CsvFormat(Format):
    """A format the package does not know: 'image,caption' rows under that header, split by seed."""

    name, help = "csv", "image,caption rows"

    def detect(self, head, data):
        return data is None and head.startswith("image,caption\n")

    def read(self, files, lists, args):
        (_, path), = files
        by_name: dict[str, list[str]] = {}
        for name, caption in list(csv.reader(path.open(encoding="utf-8")))[1:]:
            by_name.setdefault(name, []).append(caption)
        dataset = SourceDataset("csv", args.images, [], [("captions", path)])
        dataset.images = [SourceImage(i, args.images / name, name, None, caps)
                          for i, (name, caps) in enumerate(sorted(by_name.items()))]
        assign_splits(dataset, lists, args.split_seed, args.val_size, args.test_size)
        return dataset


@pytest.fixture
def csv_format():
    register(CsvFormat)
    yield FORMATS["csv"]
    del FORMATS["csv"]


def test_a_format_class_defined_outside_the_package_prepares_a_folder_that_loads(csv_format, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    rows = ["image,caption"]
    for i in range(1, 9):
        example_image(i, 24, noise=0).save(images / f"img_{i}.jpg", quality=95)
        rows += [f"img_{i}.jpg,{caption}" for caption in example_captions(i, 2)]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert prepare_data.main(["--captions", str(tmp_path / "captions.csv"), "--images", str(images), "--out", str(out),
                              "--image-size", "16", "--min-word-count", "1", "--val-size", "2", "--test-size", "2",
                              "--workers", "1", "--no-progress"]) == 0  # --format auto: told apart by detect
    assert json.loads((out / "manifest.json").read_text())["source"]["format"] == "csv"
    data = CaptionDataModule(DataConfig(dataset="prepared", root=str(out), image_size=16, cache_images=False))
    data.setup()
    assert [len(data.load_split(s)) for s in ("train", "val", "test")] == [4, 2, 2]
    for split in ("train", "val", "test"):
        for i, record in enumerate(data.load_split(split)):
            image_id = int(record.path.stem.split("_")[1])
            assert list(record.captions) == example_captions(image_id, 2)
            assert np.abs(data.images(split).pixels(i).reshape(-1, 3).mean(0) - id_colour(image_id)).max() < 3
    assert next(iter(data.train_dataloader()))["images"].shape[1:] == (3, 16, 16)


def test_benchmark_measures_the_loader(prepared):
    out, _ = prepared
    rows = benchmark_loader(out, [0], batch_size=8, seconds=0.2, progress=False)
    assert rows[0]["images"] > 0 and rows[0]["images_per_s"] > 0 and rows[0]["image_size"] == SIZE
    files = benchmark_loader(out, [0], batch_size=8, seconds=0.2, source="files", progress=False)
    assert files[0]["source"] == "files" and files[0]["images"] > 0


def test_benchmark_json_never_replaces_a_file_it_did_not_write(prepared, tmp_path, capsys):
    out, _ = prepared
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    link = tmp_path / "link.json"
    link.symlink_to(notes)
    bench = ["--benchmark", str(out), "--workers", "0", "--seconds", "0.1"]
    for given, words in [(notes, ["notes.txt", "not a loader benchmark"]), (link, ["link.json", "link"]),
                         (tmp_path, ["folder"]), (tmp_path / "nowhere" / "b.json", ["nowhere", "does not exist"])]:
        assert prepare_data.main([*bench, "--json", str(given)]) == 2
        err = capsys.readouterr()
        assert "images/s" not in err.out  # refused before measuring
        line = err.err.strip()
        assert line.startswith("error: --json") and "\n" not in line and all(w in line for w in words), line
    assert notes.read_text() == "mine" and link.is_symlink() and not (tmp_path / "nowhere").exists()
    ours = tmp_path / "bench.json"
    for _ in range(2):  # its own result is replaced
        assert prepare_data.main([*bench, "--json", str(ours)]) == 0
        assert json.loads(ours.read_text())[0]["images_per_s"] > 0


# ------------------------------------------------------------------------------------ training


def test_train_and_evaluate_on_a_prepared_synthetic_folder(tmp_path, one_thread):
    """The synthetic set (COCO files + instances) prepared, trained on with --data for a few
    steps, then evaluated from the checkpoint; boxes and tensors agree with the original."""
    from captioning.training import run as train

    from captioning.config import SyntheticConfig
    from captioning.data.synthetic import dataset_dir, generate_synthetic

    synth_cfg = SyntheticConfig(num_train=16, num_val=4, num_test=4, image_size=32)
    generate_synthetic(tmp_path / "data", synth_cfg, progress=False)
    root = dataset_dir(tmp_path / "data", synth_cfg)
    ann = root / "annotations"
    prepare_data.run(["--format", "coco", "--captions", *(f"{s}=" + str(ann / f"captions_{s}.json") for s in ("train", "val", "test")),
                       "--images", str(root), "--instances", *(str(ann / f"instances_{s}.json") for s in ("train", "val", "test")),
                       "--out", str(tmp_path / "prep"), "--image-size", "32", "--min-word-count", "1", "--workers", "1",
                       "--no-progress"])
    synth = CaptionDataModule(DataConfig(root=str(tmp_path / "data"), image_size=32, synthetic=synth_cfg))
    prep = CaptionDataModule(DataConfig(dataset="prepared", root=str(tmp_path / "prep"), image_size=32))
    assert prep.boxes("val") == synth.boxes("val") and prep.boxes("val")  # {id: [(name, [x, y, w, h])]}
    assert prep.references("test") == synth.references("test")
    assert all(torch.equal(a, b) for a, b in zip(prep.images("val"), synth.images("val")))

    out = tmp_path / "run"
    result = train.run(["--data", str(tmp_path / "prep"), "--out-dir", str(out), "--no-progress", "--max-epochs", "1",
                         "--set", "data.image_size=32", "--set", "data.batch_size=8", "--set", "model.encoder.grid_size=4",
                         "--set", "model.decoder.embed_dim=16", "--set", "model.decoder.hidden_dim=32",
                         "--set", "model.decoder.attention_dim=16", "--no-test"])  # evaluate.py scores below
    assert result["global_step"] == 2 and (out / "best.ckpt").is_file()
    from captioning.evaluation import run as evaluate

    metrics = evaluate.run(["--checkpoint", str(out / "best.ckpt"), "--split", "val", "--metrics", "bleu",
                             "--tokenizer", "simple", "--beam-size", "1", "--device", "cpu"])
    assert metrics["num_images"] == 4 and "bleu_4" in metrics["metrics"]
    from captioning.caption.run import main as caption_main

    # Captioning a split reads the source files the folder was prepared from.
    assert caption_main(["--checkpoint", str(out / "best.ckpt"), "--from-split", "test", "--limit", "2",
                         "--beam-size", "1", "--device", "cpu"]) == 0


def test_coco_configs_hold_the_papers_settings():
    from captioning.config import build_config, to_dict

    soft, hard, resnet = (build_config(REPO / "configs" / f"{name}.yaml")
                          for name in ("coco_soft", "coco_hard", "coco_resnet101_soft"))
    enc = soft.model.encoder
    assert (enc.backbone, enc.stage, enc.grid_size, enc.weights, enc.fine_tune_from) == ("vgg19", "conv5", 14, "imagenet", None)
    # lambda: the authors' alpha_c = 1 as it acts per caption, alpha_c * B / L = 64 / 196
    assert (soft.optim.lr, soft.optim.schedule, soft.loss.doubly_stochastic) == (2e-4, "constant", 0.3265)
    assert soft.data.batch_size * soft.data.captions_per_image == 64 and soft.data.image_size == 224
    assert soft.data.dataset == "prepared"
    differ = lambda a, b: {k for k, v in _flat(to_dict(a)).items() if _flat(to_dict(b))[k] != v}  # noqa: E731
    assert differ(soft, hard) == {"model.attention"}
    # 448 px: ResNet-101's layer4 (stride 32) is then a native 14x14 grid, stored in its own folder
    assert differ(soft, resnet) == {"model.encoder.backbone", "model.encoder.stage", "data.image_size", "data.root"}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out
