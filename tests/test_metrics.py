"""Tests for captioning.evaluation.metrics (official COCO caption metrics wrapper).

METEOR starts a JVM (~7 s), so it is exercised once, in a module-scoped fixture.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from captioning.evaluation import metrics as M
from captioning.evaluation.metrics import (
    METRIC_KEYS,
    ScoreReport,
    format_metrics_table,
    java_available,
    score_captions,
    score_details,
    simple_tokenize,
)

needs_java = pytest.mark.skipif(not java_available(), reason="java not available")

REFERENCES = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave.",
        "Someone surfing in the ocean."],
    2: ["Two dogs play with a frisbee in the park.", "Dogs playing in the grass.",
        "Two dogs running on a field."],
    3: ["A plate of food with broccoli and rice.", "A meal on a white plate.",
        "Broccoli, rice and chicken on a plate."],
    4: ["A red double decker bus driving down a street.", "A bus on a city street.",
        "The big red bus is parked by the curb."],
}
PREDICTIONS = {
    1: "A man riding a wave on a surfboard.",
    2: "",  # empty hypothesis must not crash any scorer
    3: "a plate of food with broccoli",
    4: "A red bus driving down the street",
}


def _java_children() -> list[str]:
    """Command lines of live java processes whose parent is this test process (Linux only)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            state = stat.rsplit(")", 1)[1].split()[0]
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and state != "Z" and "java" in cmd:
            found.append(cmd)
    return found


@pytest.fixture(scope="module")
def full_report() -> ScoreReport:
    """All default metrics (incl. METEOR when Java exists) on a set containing an empty caption."""
    return score_details(PREDICTIONS, REFERENCES)


# ----------------------------------------------------------------------------- basic behaviour


def test_identical_captions_score_perfect_bleu_and_positive_cider():
    refs = {
        1: ["a man riding a wave on a surfboard"],
        2: ["two dogs play with a frisbee in the park"],
        3: ["a plate of food with broccoli and rice"],
    }
    preds = {k: v[0] for k, v in refs.items()}
    scores = score_captions(preds, refs, metrics=("bleu", "cider"))
    assert scores["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert scores["cider"] > 0


def test_returns_only_metric_keys_on_0_1_scale(full_report):
    scores = score_captions(PREDICTIONS, REFERENCES, metrics=("bleu", "rouge", "cider"))
    assert list(scores) == ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"]
    assert all(isinstance(v, float) for v in scores.values())
    assert all(0.0 <= scores[k] <= 1.0 for k in scores if k != "cider")
    assert set(full_report.scores) <= set(METRIC_KEYS)
    assert list(full_report.scores) == [k for k in METRIC_KEYS if k in full_report.scores]


def test_report_records_tokenizer_images_and_per_image(full_report):
    assert full_report.tokenizer == ("ptb" if java_available() else "simple")
    assert full_report.num_images == 4
    assert full_report.image_ids == (1, 2, 3, 4)
    for key, values in full_report.per_image.items():
        assert len(values) == 4, key
    # The empty hypothesis (image 2) scores 0 everywhere.
    assert full_report.per_image["bleu_1"][1] == pytest.approx(0.0, abs=1e-6)
    assert full_report.per_image["rouge_l"][1] == 0.0
    assert full_report.per_image["cider"][1] == 0.0
    assert any("tokenizer" in line for line in full_report.notes())


def test_empty_hypothesis_does_not_crash(full_report):
    for key in ("bleu_1", "bleu_4", "rouge_l", "cider"):
        assert key in full_report.scores
    if java_available():
        assert "meteor" in full_report.scores
        assert full_report.per_image["meteor"][1] == 0.0
    only_empty = score_captions({1: "", 2: "   "}, {1: ["a dog"], 2: ["a cat on a mat"]},
                                metrics=("bleu", "rouge", "cider"))
    assert only_empty["bleu_1"] == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------ equality with pycocoevalcap direct


def _direct_scores(gts: dict, res: dict) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu_{n + 1}": bleu[n] for n in range(4)}, "rouge_l": rouge, "cider": cider}


@needs_java
def test_matches_pycocoevalcap_called_directly_with_ptb():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    preds = {k: v for k, v in PREDICTIONS.items() if v}
    refs = {k: REFERENCES[k] for k in preds}
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in preds.items()})
    expected = _direct_scores(gts, res)

    report = score_details(preds, refs, metrics=("bleu", "rouge", "cider"), tokenizer="ptb")
    assert report.tokenizer == "ptb"
    assert set(report.scores) == set(expected)
    for key, value in expected.items():
        assert report.scores[key] == pytest.approx(value, abs=1e-12), key


@needs_java
def test_the_java_tokenizer_scores_without_printing_its_token_count(capfd):
    """The Java PTBTokenizer writes 'PTBTokenizer tokenized N tokens at ...' to standard error on
    every call; scoring collects it instead."""
    from captioning.evaluation import metrics

    metrics._PTB_CACHE.clear()
    assert metrics._ptb_tokenize_strings(["A man, riding a horse.", "two dogs"]) == ["a man riding a horse", "two dogs"]
    captured = capfd.readouterr()
    assert "PTBTokenizer" not in captured.err + captured.out


@needs_java
def test_a_failing_java_tokenizer_is_one_error_with_its_last_line(monkeypatch):
    from pycocoevalcap.tokenizer import ptbtokenizer

    from captioning.evaluation import metrics

    metrics._PTB_CACHE.clear()
    monkeypatch.setattr(ptbtokenizer, "STANFORD_CORENLP_3_4_1_JAR", "no-such.jar")
    with pytest.raises(RuntimeError, match=r"the Java PTBTokenizer failed \(exit status 1\): .*ClassNotFoundException"):
        metrics._ptb_tokenize_strings(["a sentence never tokenised before"])


@needs_java
def test_ptb_tokenisation_equals_pycocoevalcaps_own_call():
    """The Java tokenizer run here gives what pycocoevalcap's PTBTokenizer gives, line for line,
    also on non-ASCII text, characters PTB cannot tokenise and empty captions (last one included)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = ["A man, riding a horse.", "", "café naïve résumé", "日本の 犬", "a “quoted” word — dash…",
                "emoji \U0001f436 dog", "I can't, I'm here.", "A man (in red) [x] {y}", "rock 'n' roll", ""]
    expected = PTBTokenizer().tokenize({0: [{"caption": c} for c in captions]})[0]
    M._PTB_CACHE.clear()
    assert M._ptb_tokenize_strings(captions) == expected


def test_matches_pycocoevalcap_called_directly_with_simple_tokenizer():
    gts = {k: [simple_tokenize(c) for c in v] for k, v in REFERENCES.items()}
    res = {k: [simple_tokenize(v)] for k, v in PREDICTIONS.items()}
    expected = _direct_scores(gts, res)
    scores = score_captions(PREDICTIONS, REFERENCES, metrics=("bleu", "rouge", "cider"),
                            tokenizer="simple")
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, abs=1e-12), key


@needs_java
def test_simple_tokenizer_equals_ptb_on_plain_captions():
    refs = {
        1: ["a man riding a wave on top of a surfboard", "a surfer rides a big wave"],
        2: ["two dogs play with a frisbee in the park", "dogs playing in the grass"],
        3: ["a plate of food with broccoli and rice", "a meal on a white plate"],
    }
    preds = {1: "a man riding a big wave", 2: "two dogs playing in a park", 3: "a white plate"}
    ptb = score_captions(preds, refs, metrics=("bleu",), tokenizer="ptb")
    simple = score_captions(preds, refs, metrics=("bleu",), tokenizer="simple")
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4"):
        assert simple[key] == pytest.approx(ptb[key], abs=1e-12)


@needs_java
def test_simple_tokenize_matches_ptb_on_common_punctuation():
    captions = [
        "A man riding a wave on top of a surfboard.",
        "A dog's toy, on the floor!",
        "They don't like it -- really...",
        "A black-and-white photo of 3.5 cats; nice: yes?",
        "\"Quoted\" words 'single' and `back`",
        "A man (in red) [x] {y}",
        "dog,cat & 100% of a $5 bill",
        "I can't, I'm here and U.S. flags cannot fly.",
    ]
    assert M._ptb_tokenize_strings(captions) == [simple_tokenize(c) for c in captions]


@needs_java
def test_line_breaks_inside_captions_do_not_misalign_ptb():
    # PTBTokenizer splits its output on newlines; a raw "\r" would shift every later caption.
    refs = {1: ["a dog running on the beach"], 2: ["two cats sleeping on a bed"]}
    preds = {1: "a dog\rrunning on the\x0cbeach", 2: "two cats sleeping\u2028on a bed"}
    scores = score_captions(preds, refs, metrics=("bleu",), tokenizer="ptb")
    assert scores["bleu_4"] == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------- validation


def test_mismatched_ids_raise_value_error_naming_examples():
    refs = {1: ["a"], 2: ["b"], 3: ["c"]}
    missing = r"2 image id\(s\) have references but no prediction \(e\.g\. 2, 3\)"
    with pytest.raises(ValueError, match=missing):
        score_captions({1: "a"}, refs, metrics=("bleu",))
    extra = r"1 predicted image id\(s\) have no references \(e\.g\. 9\)"
    with pytest.raises(ValueError, match=extra):
        score_captions({1: "a", 2: "b", 3: "c", 9: "x"}, refs, metrics=("bleu",))


@pytest.mark.parametrize(
    "preds, refs, message",
    [
        ({}, {}, "empty"),
        ({1: "a"}, {1: "a dog"}, "sequence of caption strings"),
        ({1: "a"}, {1: []}, "no reference captions"),
        ({1: ["a"]}, {1: ["a"]}, "one caption string"),
        ({1: "a"}, {1: ["a", 3]}, "must be strings"),
    ],
)
def test_invalid_inputs_raise_value_error(preds, refs, message):
    with pytest.raises(ValueError, match=message):
        score_captions(preds, refs, metrics=("bleu",), tokenizer="simple")


def test_unknown_metric_or_tokenizer_raise():
    with pytest.raises(ValueError, match="unknown metric"):
        score_captions({1: "a"}, {1: ["a"]}, metrics=("blue",))
    with pytest.raises(ValueError, match="tokenizer"):
        score_captions({1: "a"}, {1: ["a"]}, metrics=("bleu",), tokenizer="nltk")


def test_metric_aliases():
    scores = score_captions({1: "a b c d e", 2: "f g"}, {1: ["a b c d e"], 2: ["f g h"]},
                            metrics=("bleu_4", "rouge_l", "CIDEr-D"), tokenizer="simple")
    assert list(scores) == ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"]


# ------------------------------------------------------------------ Java-dependent behaviour


@needs_java
def test_meteor_computed_with_java_and_process_closed(full_report):
    assert full_report.tokenizer == "ptb"
    assert "meteor" not in full_report.skipped
    assert 0.0 < full_report.scores["meteor"] < 1.0
    assert len(full_report.per_image["meteor"]) == 4
    if Path("/proc").is_dir():
        assert _java_children() == []


@needs_java
def test_meteor_watchdog_kills_a_stuck_process():
    report = score_details({1: "a dog"}, {1: ["a dog runs"]}, metrics=("meteor",),
                           meteor_timeout=0.01)
    assert report.scores == {}
    assert "did not answer" in report.skipped["meteor"]
    if Path("/proc").is_dir():
        assert _java_children() == []


def test_without_java_falls_back_to_simple_and_skips_meteor(monkeypatch, caplog):
    monkeypatch.setattr(M, "java_available", lambda: False)
    monkeypatch.setattr(M, "_WARNED_SIMPLE_FALLBACK", False)
    with caplog.at_level(logging.WARNING, logger=M.__name__):
        report = score_details(PREDICTIONS, REFERENCES)
    assert report.tokenizer == "simple"
    assert "meteor" not in report.scores
    assert "java" in report.skipped["meteor"].lower()
    assert {"bleu_4", "rouge_l", "cider"} <= set(report.scores)
    assert any("simple" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match="Java"):
        score_details(PREDICTIONS, REFERENCES, metrics=("bleu",), tokenizer="ptb")


def test_spice_never_crashes(monkeypatch):
    monkeypatch.setattr(M, "java_available", lambda: True)  # reach the SPICE branch regardless
    monkeypatch.setattr(M, "_spice_models_missing", lambda: "CoreNLP models not present")
    report = score_details(PREDICTIONS, REFERENCES, metrics=("bleu", "spice"), tokenizer="simple")
    assert "spice" not in report.scores and "models" in report.skipped["spice"]
    assert "bleu_4" in report.scores

    def boom(gts, res):
        raise RuntimeError("java.lang.OutOfMemoryError")

    monkeypatch.setattr(M, "_spice_models_missing", lambda: "")
    monkeypatch.setattr(M, "_run_spice", boom)
    report = score_details(PREDICTIONS, REFERENCES, metrics=("spice",), tokenizer="simple")
    assert report.scores == {}
    assert report.skipped["spice"].startswith("SPICE failed: RuntimeError")


# ------------------------------------------------------------------------------ table


def test_format_metrics_table_shows_x100_and_names_the_scale():
    table = format_metrics_table(
        {"cider": 0.9123, "bleu_4": 0.2441, "meteor": 0.2301, "rouge_l": 0.51},
        title="Test split",
    )
    lines = table.splitlines()
    assert lines[0] == "Test split"
    assert "scores x100 (0-100 scale)" in table
    assert "24.41" in table and "23.01" in table and "51.00" in table and "91.23" in table
    # Rows follow METRIC_KEYS order whatever the input order.
    order = [line.split()[0] for line in lines if line.split() and line.split()[0] in
             {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}]
    assert order == ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    assert "n/a" in format_metrics_table({"bleu_4": float("nan")})
    with pytest.raises(ValueError):
        format_metrics_table({"bleu_4": "high"})
