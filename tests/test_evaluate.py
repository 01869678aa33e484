"""scripts/evaluate.py: grounding in the metrics JSON, the 0-100 scale, scoring another system's
results file, and decoding over 2 CPU processes. Tiny untrained checkpoints built in-process."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from captioning import Captioner
from captioning.evaluation import run as evaluate_script  # captioning evaluate (scripts/evaluate.py)
from captioning.evaluation.grounding import load_instances, named_words, score_grounding
from conftest import HARD, first_test_shape

FAST = ["--metrics", "bleu", "cider", "--tokenizer", "simple"]  # no Java: seconds, not tens of seconds


@pytest.fixture(scope="module")
def tiny(untrained):
    """Soft and hard attention; every caption names the shape of the first test object."""
    soft, hard = untrained(prefer_word=first_test_shape), untrained(*HARD, prefer_word=first_test_shape)
    return SimpleNamespace(data=soft.data, ckpt=soft.ckpt, hard_ckpt=hard.ckpt,
                           test_ids=sorted(r.image_id for r in soft.data.load_split("test")))


def run(capsys, *args: str) -> tuple[dict, str, str]:
    results = evaluate_script.run([str(a) for a in args])
    out, err = capsys.readouterr()
    return results, out, err


def fails(capsys, *args: str) -> str:
    """Runs evaluate expecting exit status 2 and exactly one error line; returns that line."""
    assert evaluate_script.main([str(a) for a in args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


# ------------------------------------------------------------------------------ checkpoint mode


def test_grounding_keys_in_the_metrics_json_on_the_0_100_scale(tiny, capsys, tmp_path):
    results, out, _ = run(capsys, "--checkpoint", tiny.ckpt, "--split", "test", "--beam-size", "1",
                          "--out-dir", tmp_path, *FAST)
    saved = json.loads((tmp_path / "metrics_test.json").read_text())
    assert saved["scale"] == "0-100" and results["scale"] == "0-100"
    metrics = saved["metrics"]
    assert {"bleu_4", "cider", "caption_accuracy", "pointing_game", "mass_in_box", "grounding_words"} <= set(metrics)
    assert metrics["grounding_words"] > 0  # every caption repeats a shape noun
    for key in ("pointing_game", "mass_in_box", "pointing_game_per_image", "mass_in_box_per_image", "bleu_1"):
        assert 0.0 <= metrics[key] <= 100.0
    grounding = saved["grounding"]
    assert grounding["mode"] == "expected" and grounding["words_to_classes"] == "synthetic shapes"
    assert grounding["words"] == metrics["grounding_words"]
    assert "0-100" in out and "pointing game (mean over words)" in out and "grounding words (count)" in out
    # It leads with a summary: the caption metrics, then grounding by word kind beside the uniform
    # map's score on the same words; the full table follows.
    lines = out.splitlines()
    assert lines[0].startswith("decoded: ")
    lines = lines[1:]  # the scores begin here
    captioner = Captioner.from_checkpoint(tiny.ckpt, device="cpu")
    assert lines[0] == f"summary: test split, {len(tiny.data.load_split('test'))} images; the model was trained " \
                       f"on {captioner.trained_on}"
    assert lines[1] == (f"  captions (x100): BLEU-4 {metrics['bleu_4']:.2f}, CIDEr {metrics['cider']:.2f}, "
                        f"caption accuracy {metrics['caption_accuracy']:.2f}")
    assert lines[3] == (f"    object nouns ({metrics['grounding_words']} words): pointing game "
                        f"{metrics['pointing_game']:.2f} vs {metrics['uniform_pointing_game']:.2f}, mass in box "
                        f"{metrics['mass_in_box']:.2f} vs {metrics['uniform_mass_in_box']:.2f}")
    assert [line.split(" (")[0].strip() for line in lines[3:6]] == ["object nouns", "attribute words",
                                                                    "whole object phrase"]
    assert lines.index("the full table:") == 6
    assert saved["training_data"] == captioner.training_data

    # The same numbers from the public pieces: the API's captions and attention, the split's boxes.
    captioner = Captioner.from_checkpoint(tiny.ckpt, device="cpu")
    instances = load_instances(tiny.data.root / "annotations" / "instances_test.json")
    records = tiny.data.load_split("test")
    captions = captioner.caption([r.path for r in records], beam_size=1)
    named = {r.image_id: named_words(c.words, c.attention, instances.matcher()) for r, c in zip(records, captions)}
    direct = score_grounding(named, instances)
    assert metrics["grounding_words"] == direct.words
    assert metrics["pointing_game"] == pytest.approx(100 * direct.pointing_game)
    assert metrics["mass_in_box"] == pytest.approx(100 * direct.mass_in_box)
    # The official metrics moved to 0-100 as well.
    from captioning.evaluation.evaluator import evaluate_predictions

    predictions = {p["image_id"]: p["caption"] for p in json.loads((tmp_path / "predictions_test.json").read_text())}
    values, _ = evaluate_predictions(predictions, tiny.data.references("test"), None, ["bleu", "cider"], "simple")
    assert metrics["cider"] == pytest.approx(100 * values["cider"])
    assert metrics["bleu_1"] == pytest.approx(100 * values["bleu_1"])


def test_hard_attention_scores_and_records_the_decode_mode(tiny, capsys, tmp_path):
    results, out, _ = run(capsys, "--checkpoint", tiny.hard_ckpt, "--hard-mode", "argmax", "--out-dir", tmp_path, *FAST)
    assert results["decode"]["hard_mode"] == "argmax" and results["grounding"]["mode"] == "argmax"
    assert "one-hot on argmax alpha" in results["grounding"]["attention"]
    # A one-hot map's mass is the cover of its single cell, and a hit has its centre inside a box.
    assert results["metrics"]["grounding_words"] > 0


def test_instances_of_another_split_are_refused(tiny, capsys, tmp_path):
    line = fails(capsys, "--checkpoint", tiny.ckpt, "--split", "test", "--out-dir", tmp_path,
                 "--instances", tiny.data.root / "annotations" / "instances_val.json", *FAST)
    assert "instances_val.json holds none of the 8 images of the test split" in line and "--instances" in line


def test_devices_2_scores_each_image_once_and_matches_one_process(tiny, capsys, tmp_path, one_thread):
    # Batch size 1 and one thread in both runs: each image is decoded by the same arithmetic.
    common = ["--checkpoint", tiny.ckpt, "--split", "test", "--batch-size", "1", *FAST]
    single, out1, _ = run(capsys, *common, "--out-dir", tmp_path / "one")
    double, out2, err2 = run(capsys, *common, "--out-dir", tmp_path / "two", "--devices", "2")
    predictions = json.loads((tmp_path / "two" / "predictions_test.json").read_text())
    assert [p["image_id"] for p in predictions] == tiny.test_ids  # each image exactly once
    assert predictions == json.loads((tmp_path / "one" / "predictions_test.json").read_text())
    assert double["num_images"] == single["num_images"] == len(tiny.test_ids) and double["devices"] == 2
    # Same captions, so the same corpus metrics; grounding sums attention floats, whose last bits
    # may differ between processes.
    assert double["metrics"].keys() == single["metrics"].keys()
    for key, value in single["metrics"].items():  # None: a word kind with no word to score
        assert double["metrics"][key] == (value if value is None else pytest.approx(value, rel=1e-6, abs=1e-9)), key
    assert f"decoded: {len(tiny.test_ids)} images, one caption each (the test split has {len(tiny.test_ids)})" in out2
    assert "2 cpu processes" in err2


# ------------------------------------------------------------------------------ results mode


def _captions_file(path: Path, captions: dict[int, list[str]]) -> Path:
    path.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in captions],
        "annotations": [{"id": 100 * i + n, "image_id": i, "caption": c}
                        for i, refs in captions.items() for n, c in enumerate(refs)],
    }))
    return path


REFS = {1: ["a man riding a wave on a surfboard", "a surfer on a big wave"],
        2: ["two dogs play with a frisbee in the park", "dogs playing in the grass"],
        3: ["a red double decker bus driving down a street", "a bus on a city street"]}


@pytest.fixture
def files(tmp_path):
    annotations = _captions_file(tmp_path / "captions_val.json", REFS)

    def results(entries, name: str = "results.json") -> Path:
        path = tmp_path / name
        path.write_text(entries if isinstance(entries, str) else json.dumps(entries))
        return path

    return SimpleNamespace(annotations=annotations, results=results, tmp=tmp_path)


def test_results_file_scored_against_a_captions_file(files, capsys):
    results_file = files.results([{"image_id": i, "caption": refs[0], "score": 0.5} for i, refs in REFS.items()])
    results, out, _ = run(capsys, "--results", results_file, "--annotations", files.annotations, *FAST)
    saved = json.loads((files.tmp / "eval" / "metrics_results.json").read_text())  # not beside the user's files
    assert saved["metrics"] == results["metrics"]
    assert saved["scale"] == "0-100" and saved["num_images"] == 3 and saved["num_annotated_images"] == 3
    assert saved["metrics"]["bleu_4"] == pytest.approx(100.0, abs=1e-3)  # identical to a reference
    assert saved["metrics"]["cider"] > 100.0  # CIDEr-D x100
    assert "images scored: 3" in out and "0-100" in out and "grounding: not computed" in out


def test_results_covering_part_of_the_annotations_warn_and_count(files, capsys):
    results_file = files.results([{"image_id": 2, "caption": "two dogs in a park"}])
    results, out, err = run(capsys, "--results", results_file, "--annotations", files.annotations, *FAST)
    assert results["num_images"] == 1 and results["num_annotated_images"] == 3
    assert "images scored: 1" in out and "covers 1 of the 3 images" in err


@pytest.mark.parametrize("entries, message", [
    (None, "does not exist"),
    ("[{\"image_id\": 1,", "is not valid JSON"),
    ({"image_id": 1, "caption": "a dog"}, "must be a JSON list"),
    ({"images": [], "annotations": []}, "pass it as --annotations"),
    ([], "empty list"),
    ([{"image_id": 1}], "entry 0 is not an object with 'image_id' and 'caption'"),
    ([{"image_id": 1, "caption": "a"}, {"image_id": "2", "caption": "b"}], "entry 1 has image_id '2'"),
    ([{"image_id": True, "caption": "a"}], "image ids must be integers"),
    ([{"image_id": 1, "caption": ["a", "dog"]}], "captions must be strings"),
    ([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}], "1 image id(s) occur more than once (1 (2x))"),
    ([{"image_id": 1, "caption": "a"}, {"image_id": 9, "caption": "b"}], "1 image id(s) of"),
])
def test_malformed_results_files_are_one_line_errors(files, capsys, entries, message):
    path = files.tmp / "missing.json" if entries is None else files.results(entries)
    line = fails(capsys, "--results", path, "--annotations", files.annotations, *FAST)
    assert message in line and str(path) in line


@pytest.mark.parametrize("content, message", [
    ("[]", "is not a COCO captions file"),
    (json.dumps({"images": [], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}), "instances_*.json"),
    ("{", "is not valid JSON"),
    (json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": {"0": {"image_id": 1}}}),
     "is not a COCO captions file"),
    (json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [{"image_id": 1}]}),
     "annotations[0] needs an 'image_id' (a number) and a 'caption'"),
    (json.dumps({"images": [{"file_name": "1.jpg"}], "annotations": [{"image_id": 1, "caption": "a"}]}),
     "images[0] needs an 'id'"),
    (json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [{"image_id": 1, "caption": 5}]}),
     "holds no image with a non-empty caption"),
    (json.dumps({"images": [{"id": [1], "file_name": "1.jpg"}], "annotations": []}), "images[0] needs an 'id'"),
])
def test_malformed_annotations_files_are_one_line_errors(files, capsys, content, message):
    bad = files.tmp / "captions_bad.json"
    bad.write_text(content)
    line = fails(capsys, "--results", files.results([{"image_id": 1, "caption": "a"}]), "--annotations", bad, *FAST)
    assert message in line and "captions_bad.json" in line


@pytest.mark.parametrize("args, message", [
    ([], "give --checkpoint CKPT"),
    (["--results", "r.json"], "--results needs --annotations"),
    (["--annotations", "a.json", "--checkpoint", "c.ckpt"], "--annotations goes with --results"),
    (["--results", "r.json", "--checkpoint", "c.ckpt"], "are alternatives"),
    (["--results", "r.json", "--annotations", "a.json", "--beam-size", "3"], "--beam-size applies to --checkpoint only"),
    (["--results", "r.json", "--annotations", "a.json", "--devices", "2"], "--devices applies to --checkpoint only"),
    (["--results", "r.json", "--annotations", "a.json", "--min-len", "3"], "--min-len applies to --checkpoint only"),
    (["--results", "r.json", "--annotations", "a.json", "--no-unk"], "--no-unk applies to --checkpoint only"),
    (["--results", "r.json", "--annotations", "a.json", "--split", "val"], "--split applies to --checkpoint only"),
])
def test_wrong_combinations_of_options(capsys, args, message):
    assert message in fails(capsys, *args)


def test_devices_2_decodes_a_model_folder_like_its_checkpoint(tiny, capsys, tmp_path, one_thread):
    """Each process loads what --checkpoint names: a model folder as well as a .ckpt file."""
    folder = Captioner.from_checkpoint(tiny.ckpt).save_pretrained(tmp_path / "model")
    common = ["--split", "test", "--batch-size", "1", *FAST]
    run(capsys, "--checkpoint", tiny.ckpt, *common, "--out-dir", tmp_path / "ckpt")
    run(capsys, "--checkpoint", folder, *common, "--out-dir", tmp_path / "folder", "--devices", "2")
    read = lambda name: json.loads((tmp_path / name / "predictions_test.json").read_text())  # noqa: E731
    assert read("folder") == read("ckpt")
