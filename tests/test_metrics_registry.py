"""The scorer table of captioning.evaluation.metrics: a score defined here, as a user would add
one (one class, one registration), is accepted, computed, reported and shown like a built-in."""

from __future__ import annotations

import json
import logging

import pytest

from captioning.evaluation import metrics as M
from captioning.evaluation.metrics import Scorer, format_metrics_table, register_scorer, score_captions, score_details

REFERENCES = {1: ["a dog runs on the beach"], 2: ["two cats sleep on a bed"], 3: ["a red bus"]}
PREDICTIONS = {1: "a dog runs", 2: "Two cats, sleeping on a red bed.", 3: ""}


class Length(Scorer):
    """Words per hypothesis (after tokenisation), and the corpus mean."""

    name, keys, labels, aliases = "length", ("length", "longest"), ("words per caption", "longest caption"), ("len",)

    def compute(self, gts, res, **options):
        each = [len(res[i][0].split()) for i in gts]
        return [sum(each) / len(each), max(each)], [each, each]


class Broken(Scorer):
    name, keys, labels, fallible = "broken", ("broken",), ("Broken",), True

    def compute(self, gts, res, **options):
        raise RuntimeError("out of paper")


class OnJava(Scorer):
    name, keys, labels, java = "onjava", ("onjava",), ("OnJava",), "a jar"

    def compute(self, gts, res, **options):
        return [1.0], [[1.0] * len(gts)]


@pytest.fixture
def registered(monkeypatch):
    """Length, Broken and OnJava registered for one test; the table is restored afterwards."""
    monkeypatch.setattr(M, "SCORERS", dict(M.SCORERS))
    for cls in (Length, Broken, OnJava):
        assert register_scorer(cls) is cls
    yield


def test_a_registered_scorer_is_computed_and_reported_after_the_built_in_ones(registered):
    report = score_details(PREDICTIONS, REFERENCES, metrics=("len", "bleu"), tokenizer="simple")
    assert list(report.scores) == ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "length", "longest"]
    assert report.per_image["length"] == (3.0, 7.0, 0.0)  # "two cats sleeping on a red bed"
    assert report.scores["length"] == pytest.approx(10 / 3) and report.scores["longest"] == 7.0
    assert report.skipped == {}
    assert score_captions(PREDICTIONS, REFERENCES, metrics="length", tokenizer="simple") == {
        "length": pytest.approx(10 / 3), "longest": 7.0}
    table = format_metrics_table({"longest": 0.07, "length": 0.05, "bleu_4": 0.1})
    rows = [line for line in table.splitlines() if line[:1].isalpha()][2:]
    assert [row.rsplit(None, 1)[0] for row in rows] == ["BLEU-4", "words per caption", "longest caption"]


def test_metric_names_are_validated_against_the_table(registered):
    with pytest.raises(ValueError, match=r"unknown metric 'lenght'; choose from \[.*'length'.*\]"):
        score_captions(PREDICTIONS, REFERENCES, metrics=("lenght",), tokenizer="simple")
    with pytest.raises(ValueError, match="metrics is empty: ask for at least one of bleu, .*, length"):
        score_captions(PREDICTIONS, REFERENCES, metrics=(), tokenizer="simple")
    with pytest.raises(ValueError, match="a scorer named 'length' is already registered"):
        register_scorer(Length)


def test_a_failing_or_unavailable_scorer_is_skipped_with_its_reason(registered, monkeypatch, caplog):
    monkeypatch.setattr(M, "java_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger=M.__name__):
        report = score_details(PREDICTIONS, REFERENCES, metrics=("broken", "onjava", "cider"), tokenizer="simple")
    assert list(report.scores) == ["cider"]
    assert report.skipped == {"broken": "Broken failed: RuntimeError: out of paper",
                              "onjava": "needs Java (a jar) and no working 'java' is on PATH"}
    assert [r.getMessage() for r in caplog.records] == ["Broken skipped: Broken failed: RuntimeError: out of paper"]


def test_a_scorer_that_is_not_fallible_raises(registered, monkeypatch):
    monkeypatch.setattr(Broken, "fallible", False)
    with pytest.raises(RuntimeError, match="out of paper"):
        score_captions(PREDICTIONS, REFERENCES, metrics=("broken",), tokenizer="simple")


def test_the_built_in_table():
    assert list(M.SCORERS) == ["bleu", "meteor", "rouge", "cider", "spice"]
    assert M.METRIC_KEYS == ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice")
    assert M.METRIC_GROUPS["bleu"] == ("bleu_1", "bleu_2", "bleu_3", "bleu_4")


def test_evaluate_takes_a_registered_metric_by_name(registered, tmp_path, capsys):
    """``captioning evaluate --metrics`` offers the table's names, so a score registered outside the
    package is asked for by name like a built-in (here on a results file: no model involved)."""
    from captioning.data.coco import write_results
    from captioning.evaluation import run as evaluate

    annotations, results = tmp_path / "captions.json", tmp_path / "results.json"
    annotations.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in REFERENCES],
        "annotations": [{"id": i, "image_id": i, "caption": refs[0]} for i, refs in REFERENCES.items()]}))
    write_results(results, {i: caption or "nothing" for i, caption in PREDICTIONS.items()})
    written = evaluate.run(["--results", str(results), "--annotations", str(annotations), "--metrics", "length",
                            "--tokenizer", "simple"])
    assert written["metrics"] == {"length": pytest.approx(100 * 11 / 3), "longest": 700.0}  # 3, 7 and 1 words
    assert json.loads((tmp_path / "eval" / "metrics_results.json").read_text())["metrics"] == written["metrics"]
    assert "words per caption" in capsys.readouterr().out
