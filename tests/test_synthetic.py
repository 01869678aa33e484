"""The synthetic dataset: determinism, COCO formats, atomic generation, and the caption checker."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from captioning.config import SyntheticConfig
from captioning.data import synthetic as syn
from captioning.data.synthetic import (
    COLOURS,
    SHAPES,
    SIZES,
    VOCABULARY,
    SceneObject,
    canonical_caption,
    dataset_dir,
    generate_synthetic,
    load_scenes,
    make_scene,
    reference_captions,
    render_scene,
)
from captioning.data.synthetic import language, scenes, write
from captioning.evaluation.caption_check import caption_accuracy, check_caption, explain_caption

TINY = SyntheticConfig(seed=0, num_train=40, num_val=10, num_test=10, image_size=64, captions_per_image=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn"), TINY, progress=False)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _references(folder: Path, split: str) -> dict[int, list[str]]:
    data = json.loads((folder / "annotations" / f"captions_{split}.json").read_text())
    refs: dict[int, list[str]] = {img["id"]: [] for img in data["images"]}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        refs[ann["image_id"]].append(ann["caption"])
    return refs


def obj(size: str, colour: str, shape: str, x: float, y: float) -> SceneObject:
    side = 10.0 if size == "small" else 20.0
    return SceneObject(size, colour, shape, (x, y, side, side))


# --------------------------------------------------------------------------- generation


def test_folder_name_and_layout(tiny):
    assert tiny == dataset_dir(tiny.parent, TINY)
    assert tiny.name == f"synthetic-v{syn.GENERATOR_VERSION}-seed0-n40-10-10-s64-c5"
    assert syn.GENERATOR_VERSION == 8
    for split in ("train", "val", "test"):
        assert (tiny / split).is_dir()
        assert (tiny / "annotations" / f"captions_{split}.json").is_file()
        assert (tiny / "annotations" / f"instances_{split}.json").is_file()
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert manifest["config"] == {
        "seed": 0, "num_train": 40, "num_val": 10, "num_test": 10, "image_size": 64, "captions_per_image": 5
    }
    assert manifest["splits"]["train"]["images"] == 40
    assert manifest["splits"]["val"]["captions"] == 50
    assert manifest["vocabulary"] == list(VOCABULARY)


def test_deterministic(tiny, tmp_path):
    again = generate_synthetic(tmp_path / "again", TINY, progress=False)
    assert _files(again) == _files(tiny)  # JSON files and JPEG bytes
    other = generate_synthetic(tmp_path / "other", SyntheticConfig(seed=1, num_train=40, num_val=10, num_test=10),
                               progress=False)
    a, b = _files(tiny), _files(other)
    assert a["annotations/captions_train.json"] != b["annotations/captions_train.json"]
    assert a["train/SYN_train_000000000001.jpg"] != b["train/SYN_train_000000000001.jpg"]


def test_references_are_true_distinct_and_canonical_first(tiny):
    for split in ("train", "val", "test"):
        scenes = load_scenes(tiny / "annotations" / f"instances_{split}.json")
        refs = _references(tiny, split)
        assert set(refs) == set(scenes)
        for image_id, captions in refs.items():
            objects = scenes[image_id]
            assert len(captions) == TINY.captions_per_image
            assert len(set(captions)) == len(captions)
            assert captions[0] == canonical_caption(objects)
            for caption in captions:
                assert explain_caption(caption, objects) is None, (caption, objects)
                assert set(caption.split()) <= set(VOCABULARY)
                assert caption == caption.strip() and "  " not in caption


def test_coco_files_load_and_images_match(tiny):
    ids_per_split = {}
    for split in ("train", "val", "test"):
        captions = COCO(str(tiny / "annotations" / f"captions_{split}.json"))
        instances = COCO(str(tiny / "annotations" / f"instances_{split}.json"))
        assert sorted(captions.getImgIds()) == sorted(instances.getImgIds())
        assert [c["name"] for c in instances.loadCats(instances.getCatIds())] == ["circle", "square", "triangle"]
        ids_per_split[split] = set(captions.getImgIds())
        assert len(captions.getAnnIds()) == len(ids_per_split[split]) * TINY.captions_per_image
        for img in captions.loadImgs(captions.getImgIds()):
            assert img["file_name"] == f"SYN_{split}_{img['id']:012d}.jpg"
            with Image.open(tiny / split / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) == (64, 64)
                assert im.mode == "RGB"
            anns = instances.loadAnns(instances.getAnnIds(imgIds=[img["id"]]))
            assert 1 <= len(anns) <= 3
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert all(isinstance(v, float) for v in ann["bbox"])
                assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
                assert ann["iscrowd"] == 0 and ann["area"] > 0 and len(ann["segmentation"][0]) >= 6
                assert ann["attributes"]["size"] in SIZES and ann["attributes"]["colour"] in COLOURS
    assert sum(len(v) for v in ids_per_split.values()) == len(set.union(*ids_per_split.values())) == 60
    assert ids_per_split["train"] == set(range(1, 41))


def _gap_ok(a: SceneObject, b: SceneObject) -> bool:
    ax, ay, aw, ah = a.bbox
    bx, by, bw, bh = b.bbox
    return bx >= ax + aw + 2 or ax >= bx + bw + 2 or by >= ay + ah + 2 or ay >= by + bh + 2


def test_scene_statistics():
    rng = random.Random(123)
    counts, sizes, colours, shapes, duplicates = Counter(), Counter(), Counter(), Counter(), 0
    for _ in range(300):
        objects = make_scene(rng, 64)
        counts[len(objects)] += 1
        for o in objects:
            sizes[o.size] += 1
            colours[o.colour] += 1
            shapes[o.shape] += 1
            x, y, w, h = o.bbox
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
            assert w == h and (9 <= w <= 11 if o.size == "small" else 19 <= w <= 21)
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                assert _gap_ok(a, b)
        duplicates += len({o.key for o in objects}) < len(objects)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 60
    assert set(sizes) == set(SIZES) and set(colours) == set(COLOURS) and set(shapes) == set(SHAPES)
    assert 15 <= duplicates <= 100


def _leftmost_xs(objects: list[SceneObject]) -> list[float]:
    """Sorted centre x of each group's leftmost member (groups: same size, colour and shape)."""
    lefts: dict[tuple[str, str, str], float] = {}
    for o in objects:
        lefts[o.key] = min(lefts.get(o.key, o.cx), o.cx)
    return sorted(lefts.values())


@pytest.mark.parametrize("image_size, n", [(64, 500), (16, 100), (32, 100), (50, 100), (128, 100)])
def test_groups_are_clearly_ordered(image_size, n):
    """Different groups' leftmost members are >= the margin apart in x; relations are clear too."""
    margin = 0.1 * image_size
    rng = random.Random(image_size)
    counts, relations = Counter(), Counter()
    for _ in range(n):
        objects = make_scene(rng, image_size)
        counts[len(objects)] += 1
        xs = _leftmost_xs(objects)
        assert all(b - a >= margin for a, b in zip(xs, xs[1:])), objects
        for o in objects:
            x, y, w, h = o.bbox
            assert 0 <= x and 0 <= y and x + w <= image_size and y + h <= image_size
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                assert _gap_ok(a, b)
        canonical = canonical_caption(objects)
        if len(objects) == 2 and len(xs) == 2:
            a, b = objects
            dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
            assert " to the left of " in canonical and dx >= margin, (canonical, objects)
            relations["x"] += 1
            relations["y"] += dy >= margin  # the pool then also offers above/below
        if len(xs) >= 2 and len(xs) == len(objects):  # every group one object: the order is stated
            ordered = [o.key for o in sorted(objects, key=lambda o: o.cx)]
            nps = [language.noun_phrase_text(key, 1) for key in ordered]
            body = " ".join(nps[:-1]) + " and " + nps[-1]
            assert f"from left to right {body}" in language.caption_pool(objects, image_size)
        assert check_caption(canonical, objects)
    assert set(counts) == {1, 2, 3}
    if n >= 500:  # the rejection keeps the object counts about uniform
        assert min(counts.values()) > n // 4
    assert relations["x"] > 0 and (relations["y"] > 0 or n < 200)


def test_make_scene_is_deterministic_and_always_ends(monkeypatch):
    first = [make_scene(random.Random(f"scene-{i}"), 64) for i in range(50)]
    assert first == [make_scene(random.Random(f"scene-{i}"), 64) for i in range(50)]
    # No placement ever accepted: bounded retries, then the one-object fallback.
    calls = Counter()

    def never(objects, image_size):
        calls["check"] += 1
        return False

    monkeypatch.setattr(scenes, "_clearly_ordered", never)
    for seed in range(3):
        objects = make_scene(random.Random(seed), 64)
        assert len(objects) == 1 and objects == make_scene(random.Random(seed), 64)
        x, y, w, h = objects[0].bbox
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
    assert calls["check"] == 6 * scenes.MAX_PLACEMENTS * scenes.MAX_SCENE_DRAWS


def test_render_is_deterministic_and_draws_the_colours():
    objects = [obj("large", "red", "square", 4, 4), obj("large", "blue", "circle", 40, 40)]
    a = render_scene(objects, 64, random.Random(5))
    b = render_scene(objects, 64, random.Random(5))
    assert a.tobytes() == b.tobytes() and a.size == (64, 64)
    red = a.getpixel((14, 14))
    blue = a.getpixel((50, 50))
    assert red[0] > 180 and red[1] < 80 and red[2] < 80
    assert blue[2] > 180 and blue[0] < 80


# --------------------------------------------------------------------------- the checker

TWO = [obj("small", "red", "circle", 5, 5), obj("large", "blue", "square", 40, 30)]  # red: left, above
THREE = [
    obj("small", "red", "circle", 5, 40),
    obj("small", "red", "circle", 25, 5),
    obj("large", "green", "triangle", 40, 30),
]
ROW = [  # left to right = bottom to top
    obj("small", "red", "circle", 2, 50),
    obj("small", "blue", "square", 25, 30),
    obj("large", "yellow", "triangle", 40, 2),
]


def test_canonical_captions():
    assert canonical_caption([TWO[0]]) == "a small red circle"
    # dx = 40, dy = 30: the x relation, leftmost first
    assert canonical_caption(TWO) == "a small red circle to the left of a large blue square"
    # dx = 5 < dy = 48: still the x relation, which placement keeps clear of ties
    tall = [obj("small", "red", "circle", 30, 50), obj("small", "blue", "square", 25, 2)]
    assert canonical_caption(tall) == "a small blue square to the left of a small red circle"
    stacked = [obj("small", "red", "circle", 25, 50), obj("small", "blue", "square", 25, 2)]
    assert canonical_caption(stacked) == "a small blue square above a small red circle"
    assert canonical_caption(THREE) == "two small red circles and a large green triangle"
    assert canonical_caption(ROW) == "a small red circle a small blue square and a large yellow triangle"
    assert canonical_caption([obj("small", "red", "circle", 5, 5), obj("small", "red", "circle", 40, 40)]) == (
        "two small red circles"
    )


@pytest.mark.parametrize(
    "caption",
    [
        "a small red circle to the left of a large blue square",
        "a large blue square to the right of a small red circle",
        "a small red circle above a large blue square",
        "a large blue square below a small red circle",
        "a large blue square and a small red circle",
        "there is a large blue square and a small red circle",
        "this image shows a small red circle to the left of a large blue square",
        "the image shows a small red circle above a large blue square",
        "from left to right a small red circle and a large blue square",
        "from top to bottom a small red circle and a large blue square",
        "  A Small RED circle   to the left of a large blue square ",
    ],
)
def test_true_captions_pass(caption):
    assert check_caption(caption, TWO), explain_caption(caption, TWO)


@pytest.mark.parametrize(
    "caption, scene",
    [
        ("a small green circle to the left of a large blue square", "TWO"),  # wrong colour
        ("a large red circle to the left of a large blue square", "TWO"),  # wrong size
        ("a small red triangle to the left of a large blue square", "TWO"),  # wrong shape
        ("a small red circle", "TWO"),  # missing object
        ("a small red circle and a large blue square and a small red circle", "TWO"),  # ungrammatical
        ("a small red circle a large blue square and a small green triangle", "TWO"),  # extra object
        ("two small red circles to the left of a large blue square", "TWO"),  # wrong count
        ("two small red circles and a large blue square", "TWO"),  # wrong count
        ("a small red circle to the right of a large blue square", "TWO"),  # false relation
        ("a small red circle below a large blue square", "TWO"),  # false relation
        ("from left to right a large blue square and a small red circle", "TWO"),  # false order
        ("from top to bottom a large blue square and a small red circle", "TWO"),  # false order
        ("there is two small red circles and a large green triangle", "THREE"),  # prefix agreement
        ("there are a large green triangle and two small red circles", "THREE"),  # prefix agreement
        ("a small red circle and a large green triangle", "THREE"),  # count: one for two
        ("three small red circles and a large green triangle", "THREE"),  # count: three for two
        ("a small red circle a small red circle and a large green triangle", "THREE"),  # group split
        ("two small red circles to the left of a large green triangle", "THREE"),  # relation, 3 objects
        ("from left to right two small red circles and a large green triangle", "THREE"),  # order w/ group
        ("a small red circle to the left of a small blue square", "ROW"),  # relation with 3 objects
        ("from left to right a small blue square a small red circle and a large yellow triangle", "ROW"),
        ("from top to bottom a small red circle a small blue square and a large yellow triangle", "ROW"),
        ("a small red circle to the left of a large purple square", "TWO"),  # unknown word
        ("a small red circle to the left of a large blue square.", "TWO"),  # punctuation
        ("a small red circles to the left of a large blue square", "TWO"),  # number agreement
        ("two small red circle and a large blue square", "TWO"),  # number agreement
        ("a small red circle a large blue square", "TWO"),  # missing "and"
        ("there is from left to right a small red circle and a large blue square", "TWO"),  # prefix + order
        ("from left to right a small red circle", "TWO"),  # order of one
        ("red circle to the left of a large blue square", "TWO"),
        ("a small red circle to the left of", "TWO"),
        ("a small red circle to the left of a large blue square to the left of a small red circle", "TWO"),
        ("circle circle circle", "TWO"),
        ("xyzzy !!", "TWO"),
        ("", "TWO"),
        ("   ", "TWO"),
    ],
)
def test_wrong_captions_fail(caption, scene):
    objects = {"TWO": TWO, "THREE": THREE, "ROW": ROW}[scene]
    assert not check_caption(caption, objects)
    reason = explain_caption(caption, objects)
    assert isinstance(reason, str) and reason


def test_true_captions_of_other_scenes():
    assert check_caption("there are two small red circles and a large green triangle", THREE)
    assert check_caption("there is a large green triangle and two small red circles", THREE)
    assert check_caption("from left to right a small red circle a small blue square and a large yellow triangle", ROW)
    assert check_caption("from top to bottom a large yellow triangle a small blue square and a small red circle", ROW)
    assert check_caption("an image of a large yellow triangle a small red circle and a small blue square", ROW)


def test_relation_is_strict():
    same_x = [obj("small", "red", "circle", 10, 5), obj("small", "blue", "circle", 10, 40)]
    assert not check_caption("a small red circle to the left of a small blue circle", same_x)
    assert not check_caption("a small blue circle to the right of a small red circle", same_x)
    assert check_caption("a small red circle above a small blue circle", same_x)


def test_explain_caption_reasons():
    assert explain_caption("a small red circle to the left of a large blue square", TWO) is None
    assert "unknown word" in explain_caption("a small purple circle", TWO)
    assert "missing" in explain_caption("a small red circle", [TWO[0], THREE[2]])
    assert "not in the scene" in explain_caption("a small red circle and a large green square", [TWO[0], THREE[2]])


def test_reference_pool_and_limits():
    rng = random.Random(0)
    for _ in range(200):
        objects = make_scene(rng, 64)
        pool = language.caption_pool(objects, 64)
        assert pool[0] == canonical_caption(objects) and len(pool) == len(set(pool)) >= 5
        assert all(check_caption(c, objects) for c in pool)
        refs = reference_captions(objects, 5, random.Random(1), 64)
        assert refs[0] == pool[0] and len(set(refs)) == 5 and set(refs) <= set(pool)
    one = [TWO[0]]
    assert len(language.caption_pool(one)) == 5
    with pytest.raises(ValueError):
        reference_captions(one, 6, random.Random(0))
    with pytest.raises(ValueError):
        generate_synthetic("unused", SyntheticConfig(captions_per_image=6))


def test_vocabulary_is_complete():
    words = set(VOCABULARY)
    assert len(VOCABULARY) == len(words) == 33
    assert {"there", "is", "are", "shows", "image", "this", "from", "top", "bottom", "above", "below"} <= words
    assert {"circles", "squares", "triangles", "two", "three", "and"} <= words


# --------------------------------------------------------------------------- accuracy


def test_caption_accuracy(tiny):
    scenes = load_scenes(tiny / "annotations" / "instances_val.json")
    refs = _references(tiny, "val")
    assert caption_accuracy({i: r[0] for i, r in refs.items()}, scenes) == 1.0
    assert caption_accuracy({i: r[-1] for i, r in refs.items()}, scenes) == 1.0
    wrong = {i: r[0].replace("small", "tiny") if "small" in r[0] else "a small red" for i, r in refs.items()}
    assert caption_accuracy(wrong, scenes) == 0.0
    half = dict(list({i: r[0] for i, r in refs.items()}.items())[:5]) | dict(list(wrong.items())[5:])
    assert caption_accuracy(half, scenes) == 0.5
    with pytest.raises(ValueError, match="999999"):
        caption_accuracy({999999: "a small red circle"}, scenes)


# --------------------------------------------------------------------------- atomicity


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partial_folder_and_lock(tmp_path):
    """A generator killed mid-way leaves NAME.partial/ and NAME.lock with its dead pid: taken over."""
    cfg = SyntheticConfig(num_train=6, num_val=2, num_test=2)
    final = dataset_dir(tmp_path, cfg)
    partial = tmp_path / f"{final.name}.partial"
    (partial / "annotations").mkdir(parents=True)
    (partial / "annotations" / "captions_train.json").write_text("{half written")
    lock = tmp_path / f"{final.name}.lock"
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "command": "train.py"}))
    assert generate_synthetic(tmp_path, cfg, progress=False) == final
    assert (final / "manifest.json").is_file()
    assert json.loads((final / "annotations" / "captions_train.json").read_text())["images"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_second_call_reuses_folder(tmp_path, capsys):
    cfg = SyntheticConfig(num_train=6, num_val=2, num_test=2)
    first = generate_synthetic(tmp_path, cfg, progress=True)
    assert "6" in capsys.readouterr().err  # progress goes to stderr
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    second = generate_synthetic(tmp_path, cfg, progress=True)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in second.rglob("*")} == before
    assert capsys.readouterr().err == ""  # no-op: nothing printed
    generate_synthetic(tmp_path / "quiet", cfg, progress=False)
    assert capsys.readouterr().err == ""


def test_waits_for_another_live_generator(tmp_path, monkeypatch):
    """Another live process (a DDP rank) holds the lock: we wait and use its folder, generating nothing."""
    cfg = SyntheticConfig(num_train=4, num_val=2, num_test=2)
    final = dataset_dir(tmp_path, cfg)
    lock = tmp_path / f"{final.name}.lock"
    code = ("import sys, time\nfrom captioning.files import RunLock\nRunLock(sys.argv[1], command='rank 1').acquire()\n"
            "print('held', flush=True)\ntime.sleep(60)\n")
    other = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert other.stdout.readline().strip() == "held"  # the kernel's lock, held by a live process
        real_write = write._write_dataset
        calls = []
        monkeypatch.setattr(write, "_write_dataset", lambda *a: calls.append(a))
        # The other rank finishes the folder, then ends (and its lock with it).
        finisher = threading.Timer(0.3, lambda: (real_write(final, cfg, False), other.kill()))
        finisher.start()
        assert generate_synthetic(tmp_path, cfg, progress=False) == final
        finisher.join()
    finally:
        other.kill()
        other.wait()
    assert calls == []
    assert (final / "manifest.json").is_file()


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    cfg = SyntheticConfig(num_train=4, num_val=2, num_test=2)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(write, "render_scene", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_synthetic(tmp_path, cfg, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_most_references_share_the_canonical_body():
    rng = random.Random(3)
    for _ in range(200):
        objects = make_scene(rng, 64)
        refs = reference_captions(objects, 5, rng, 64)
        canonical = canonical_caption(objects)
        assert refs[0] == canonical
        # the canonical caption behind every opening: bare and the four prefixes
        assert sum(r.endswith(canonical) for r in refs) == 5, refs
        assert all(check_caption(r, objects) for r in refs)
