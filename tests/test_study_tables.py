"""The study's raw results (docs/results/) and the tables built from them: the docs agree with the
committed records, the statistics are right, and a record that is not one is refused."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from captioning.study import tables
from captioning.study.runs import StudyError
from captioning.study.stats import detectable_difference, holm, mean_interval, t_quantile, welch_interval


@pytest.mark.parametrize("doc", tables.DOCS, ids=lambda d: d.name)
def test_every_table_in_the_docs_equals_what_the_committed_results_give(doc):
    text = doc.read_text()
    assert tables.render(text) == text, (f"{doc.name} disagrees with docs/results: "
                                         "run python -m captioning.study.tables")


def test_the_docs_hold_the_study_blocks():
    """Each block of the study is somewhere in the docs, so none can silently go missing."""
    found = {m["name"] for doc in tables.DOCS for m in tables.BLOCK.finditer(doc.read_text())}
    assert found == set(tables.BLOCKS)


# ------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("q, df, expected", [(0.975, 2, 4.302652729749464), (0.975, 9, 2.2621571627409915),
                                             (0.8, 5, 0.9195437), (0.975, 1e7, 1.959963984540054)])
def test_t_quantile(q, df, expected):
    """Values of scipy.stats.t.ppf (to the digits given)."""
    assert t_quantile(q, df) == pytest.approx(expected, rel=1e-5)


def test_welch_interval_is_the_difference_plus_minus_t_times_its_standard_error():
    a, b = [91.3, 91.9, 86.3, 90.1], [93.3, 92.4, 94.1]
    result = welch_interval(a, b)
    se = math.sqrt(statistics.variance(a) / 4 + statistics.variance(b) / 3)
    assert result.difference == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
    assert result.high - result.difference == pytest.approx(t_quantile(0.975, result.df) * se)
    assert result.difference - result.low == pytest.approx(result.high - result.difference)
    # The interval excludes 0 exactly when the test rejects at 0.05.
    assert (result.low > 0 or result.high < 0) == (result.p < 0.05)
    assert welch_interval([1.0], [2.0, 3.0]) is None


def test_holm_multiplies_by_the_rank_and_keeps_the_order():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.9, 0.9]) == [1.0, 1.0]
    assert holm([0.6, 0.01]) == pytest.approx([0.6, 0.02])
    assert holm([]) == []


def test_mean_interval_and_detectable_difference():
    low, high = mean_interval([1.0, 2.0, 3.0])
    assert (low + high) / 2 == pytest.approx(2.0)
    assert high - 2.0 == pytest.approx(t_quantile(0.975, 2) * 1.0 / math.sqrt(3))
    assert mean_interval([1.0]) is None
    # More seeds detect smaller differences; equal spreads at n = 10 give about 1.3 sd.
    three, ten = detectable_difference(1.0, 1.0, 3, 3), detectable_difference(1.0, 1.0, 10, 10)
    assert three > ten
    assert ten == pytest.approx(1.33, abs=0.03)


# ------------------------------------------------------------------------------ tables from records


def _record(arm, seed, bleu, accuracy, cider=800.0, best=5, last=5, last_bleu=None, entropy=3.0):
    record = {"format": 1, "study": "default", "name": f"{arm}-seed{seed}", "arm": arm, "seed": seed,
              "attention": arm.split("-")[0], "overrides": [], "threads": 1,
              "test": {"expected": {"bleu_4": bleu, "caption_accuracy": accuracy, "cider": cider}},
              "selection": {"rule": "validation BLEU-4 (greedy)", "best_epoch": best, "last_epoch": last},
              "signal": {"attention_entropy": {"early": 4.0, "late": entropy}}}
    if last_bleu is not None:
        record["test_last"] = {"bleu_4": last_bleu}
    return record


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    (folder / "default").mkdir(parents=True)
    values = {"none": [85.0, 86.0, 85.5], "soft": [90.0, 91.0, 86.0], "hard": [93.0, 94.0, 93.5]}
    for arm, bleus in values.items():
        for seed, bleu in enumerate(bleus):
            last_bleu = bleu + 1.0 if (arm, seed) == ("soft", 2) else None
            record = _record(arm, seed, bleu, bleu - 2.0, best=3 if last_bleu else 5, last_bleu=last_bleu)
            (folder / "default" / f"{arm}-seed{seed}.json").write_text(json.dumps(record))
    return folder, values


def test_per_seed_table_lists_each_record_and_the_means(results):
    folder, values = results
    text = tables.main_per_seed(folder)
    assert "| 2 | 85.5 / 83.5 | 86.0 / 84.0 | 93.5 / 91.5 |" in text
    soft = values["soft"]
    assert f"{statistics.fmean(soft):.1f} ± {statistics.stdev(soft):.1f}" in text


def test_differences_are_corrected_as_one_family(results):
    folder, values = results
    text = tables.main_differences(folder)
    rows = [line for line in text.splitlines() if line.startswith("| hard - soft | BLEU-4")]
    interval = welch_interval(values["hard"], values["soft"])
    assert rows and f"{interval.difference:+.1f} [{interval.low:+.1f}, {interval.high:+.1f}]" in rows[0]
    # 9 tests (3 comparisons x 3 metrics): Holm's p is at least the raw p and at most 9 times it.
    p_raw, p_holm = rows[0].split(" | ")[4:6]
    assert float(p_raw) <= float(p_holm) <= min(1.0, 9 * float(p_raw)) + 1e-3


def test_selection_table_counts_the_runs_that_chose_an_earlier_epoch(results):
    folder, _ = results
    row = next(line for line in tables.selection(folder).splitlines() if line.startswith("| soft"))
    assert "| soft | 3 | 1 | 4, 6, 6 |" in row
    # one of three runs 1.0 better at its last epoch: changes 0, 0, 1; mean 0.33, sd 0.577, t(2) = 4.303;
    # paired t = 1.0 on 2 degrees of freedom: p = 1 - 1 / sqrt(3) = 0.423, alone in its family
    assert row.endswith("| +0.33 [-1.10, +1.77] | 0.423 | 0.423 |")


def test_a_run_that_chose_an_earlier_epoch_needs_its_last_epoch_scored(results):
    folder, _ = results
    path = folder / "default" / "soft-seed2.json"
    record = json.loads(path.read_text())
    del record["test_last"]
    path.write_text(json.dumps(record))
    with pytest.raises(StudyError, match="no test_last"):
        tables.selection(folder)


def test_render_rewrites_only_the_blocks(results):
    folder, _ = results
    doc = "intro\n<!-- results: readme -->\nstale\n<!-- /results -->\nafter\n"
    out = tables.render(doc, folder)
    assert out.startswith("intro\n<!-- results: readme -->\n| attention |") and out.endswith("<!-- /results -->\nafter\n")
    assert tables.render(out, folder) == out
    with pytest.raises(StudyError, match="unknown results block 'nope'"):
        tables.render("<!-- results: nope -->\n<!-- /results -->", folder)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not a results record"),
    (json.dumps({"format": 1, "arm": "soft"}), "missing study, seed, test"),
    (json.dumps({"format": 99, "study": "default", "arm": "soft", "seed": 0, "test": {}}), "of format 1"),
    (json.dumps([1, 2]), "missing study, arm, seed, test"),
])
def test_a_damaged_record_is_one_line_naming_it(tmp_path, content, message):
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "soft-seed0.json").write_text(content)
    with pytest.raises(StudyError, match=message):
        tables.load("default", tmp_path)


def test_check_reports_a_stale_doc_and_rebuild_fixes_it(results, tmp_path, monkeypatch, capsys):
    folder, _ = results
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- results: readme -->\nold\n<!-- /results -->\n")
    monkeypatch.setattr(tables, "DOCS", (doc,))
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    assert tables.main(["--check", "--results", str(folder)]) == 1
    assert "doc.md" in capsys.readouterr().err
    assert tables.main(["--results", str(folder)]) == 0
    assert tables.main(["--check", "--results", str(folder)]) == 0


def test_a_results_folder_that_is_not_there_is_refused_and_no_doc_rebuilt(tmp_path, monkeypatch, capsys):
    from captioning.console import guarded

    doc = tmp_path / "doc.md"
    doc.write_text("<!-- results: readme -->\nkept\n<!-- /results -->\n")
    monkeypatch.setattr(tables, "DOCS", (doc,))
    assert guarded(lambda: tables.main(["--results", str(tmp_path / "typo")])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --results ") and "typo is not a folder" in err and err.count("\n") == 1
    assert "kept" in doc.read_text()


def test_missing_names_the_designs_runs_without_a_record(results, capsys):
    folder, _ = results
    assert tables.main(["--missing", "default", "--results", str(folder)]) == 0
    missing = capsys.readouterr().out.split()
    assert "soft-seed1" not in missing and "soft-seed3" in missing and "hard-arctic-capgen-optim-seed1" in missing
    assert len(missing) == sum(tables.DESIGN["default"].values()) - 9


def test_export_never_replaces_a_file_that_is_not_a_record_of_the_same_run(tmp_path):
    from captioning.study import results
    from captioning.study.runs import Plan, plan_training_runs

    runs = plan_training_runs(tmp_path / "study", 1, ["soft"])
    plan = Plan(tmp_path / "study", runs, None, [], {}, 3, 30, ["bleu"], "captioning compare")
    dest = tmp_path / "results"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    (dest / "soft-seed0.json").write_text('{"my": "data"}')
    with pytest.raises(StudyError, match="soft-seed0.json is not a results record of run soft-seed0"):
        results.export(plan, dest, log=lambda line: None)
    assert (dest / "soft-seed0.json").read_text() == '{"my": "data"}'
    (dest / "soft-seed0.json").write_text(json.dumps(_record("soft", 0, 90.0, 88.0) | {"name": "soft-seed0"}))
    lines = []
    assert results.export(plan, dest, log=lines.append) == []  # not trained: named, nothing written
    assert "not finished yet: soft-seed0" in lines[0] and (dest / "notes.txt").read_text() == "mine"
