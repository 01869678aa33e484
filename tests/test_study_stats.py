"""Welch's t-test of the study report, against values computed with scipy.stats (1.16):
``ttest_ind(a, b, equal_var=False)`` and ``2 * t.sf(t, df)``."""

from __future__ import annotations

import math

import pytest

from captioning.study.stats import paired_p, t_two_sided_p, welch

CASES = [  # a, b, t, df, p
    ([70.3, 71.9, 68.8], [62.1, 61.2, 63.0], 7.9553343360502415, 3.2106134153293286, 0.003228286199159664),
    ([1, 2, 3, 4], [2, 3, 4, 5, 9], -1.5329420047912072, 5.961500363618126, 0.17649567015309295),
    ([57.7, 58.1, 56.9], [64.8, 65.0, 64.6], -19.48717526990498, 2.423707440100893, 0.001007763342384964),
    ([10.0, 10.5], [10.2, 10.1, 10.3], 0.19487094073849198, 1.107935380791764, 0.8750373812360648),
]


@pytest.mark.parametrize("a, b, t, df, p", CASES)
def test_welch_matches_scipy(a, b, t, df, p):
    result = welch(a, b)
    assert result.t == pytest.approx(t, rel=1e-9)
    assert result.df == pytest.approx(df, rel=1e-9)
    assert result.p == pytest.approx(p, rel=1e-7)
    assert result.difference == pytest.approx(sum(a) / len(a) - sum(b) / len(b))


@pytest.mark.parametrize("t, df, p", [(2.0, 3.5, 0.12613852257591343), (10.0, 1.2, 0.042075954299879016),
                                      (0.3, 40, 0.7657307167710191), (0.0, 4, 1.0)])
def test_t_distribution_tail(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, rel=1e-7)


def test_paired_p_is_the_t_test_of_the_mean_difference():
    # 1, 2, 6: mean 3, sd sqrt(7), t = sqrt(27 / 7) on 2 degrees of freedom, where the two-sided
    # p is exactly 1 - t / sqrt(2 + t^2) = 1 - sqrt(27 / 41)
    assert paired_p([1.0, 2.0, 6.0]) == pytest.approx(1 - math.sqrt(27 / 41), rel=1e-9)
    assert paired_p([-1.0, -2.0, -6.0]) == pytest.approx(paired_p([1.0, 2.0, 6.0]), rel=1e-12)


def test_welch_needs_two_values_a_side_and_some_spread():
    assert welch([1.0], [2.0, 3.0]) is None
    assert welch([1.0, 1.0], [2.0, 2.0]) is None


def test_report_tests_each_diagnostic_arm_against_the_arm_it_varies():
    """Beside none and soft, the report's table holds 'hard-arctic-le0 vs hard-arctic' (the entropy term
    alone) and 'hard-frozen vs hard-arctic-frozen' (the strength on a frozen encoder), each Welch's test
    of the two arms' values; an arm whose reference was not trained gets no row."""
    from captioning.study.report import _significance_text

    values = {"none": [60.0, 61.0, 62.0], "soft": [70.0, 71.5, 69.0], "hard-arctic": [57.4, 58.2, 56.7],
              "hard-arctic-le0": [56.1, 58.0, 56.9], "hard-arctic-frozen": [68.0, 70.7, 66.9],
              "hard-frozen": [73.7, 74.1, 72.7], "hard-loo": [68.7, 63.4, 65.3]}
    table = {arm: {key: {"values": v} for key in ("bleu_4", "cider", "caption_accuracy")} for arm, v in values.items()}
    text = "\n".join(_significance_text({"arms": list(values), "table": table}))
    row = next(line for line in text.splitlines() if line.startswith("| hard-arctic-le0 vs hard-arctic |"))
    result = welch(values["hard-arctic-le0"], values["hard-arctic"])
    assert f"{result.difference:+.1f} (t = {result.t:.2f}, df = {result.df:.1f}, p = {result.p:.3f})" in row
    assert "| hard-frozen vs hard-arctic-frozen |" in text and "| hard-arctic vs hard |" not in text
    assert "hard-frozen vs none-frozen" not in text and "hard-loo vs hard |" not in text  # not trained here
    assert "| hard-loo vs soft |" in text and "| soft vs none |" in text


def test_arms_with_one_run_are_named_once_not_tested():
    from captioning.study.report import _significance_text

    values = {"none": [60.0, 61.0, 62.0], "soft": [70.0, 71.5, 69.0], "hard": [64.0, 66.0, 65.0],
              "hard-arctic": [57.4], "hard-loo": [68.7]}
    table = {arm: {key: {"values": v} for key in ("bleu_4", "cider", "caption_accuracy")} for arm, v in values.items()}
    text = "\n".join(_significance_text({"arms": list(values), "table": table}))
    assert "Not tested (one run): hard-arctic, hard-loo;" in text
    assert "hard-arctic vs" not in text and "hard-loo vs" not in text and "| hard vs soft |" in text
