"""Welch's t-test of the study report, against values computed with scipy.stats (1.16):
``ttest_ind(a, b, equal_var=False)`` and ``2 * t.sf(t, df)``."""

from __future__ import annotations

import pytest

from captioning.study.stats import t_two_sided_p, welch

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


def test_welch_needs_two_values_a_side_and_some_spread():
    assert welch([1.0], [2.0, 3.0]) is None
    assert welch([1.0, 1.0], [2.0, 2.0]) is None
