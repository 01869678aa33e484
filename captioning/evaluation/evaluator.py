"""Scoring a set of generated captions: the official metrics, plus the synthetic set's checker."""

from __future__ import annotations

from typing import Mapping, Sequence

from captioning.evaluation.metrics import ScoreReport, score_details


def evaluate_predictions(
    predictions: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    scenes: Mapping | None = None,
    metrics: Sequence[str] = ("bleu",),
    tokenizer: str = "auto",
) -> tuple[dict[str, float], ScoreReport]:
    """-> ({metric: value on the 0-1 scale}, how it was computed).

    ``caption_accuracy`` is added when synthetic ``scenes`` are given: the fraction of captions
    the generator's own checker finds exactly true of the scene.
    """
    report = score_details(predictions, references, metrics, tokenizer)
    values = dict(report.scores)
    if scenes is not None:
        from captioning.data.synthetic import caption_accuracy

        values["caption_accuracy"] = caption_accuracy(predictions, scenes)
    return values, report
