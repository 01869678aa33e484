"""The quality targets of the default synthetic training (docs/training.md; slow: ~10 minutes each).

Run with `make test-slow` (CI leaves them out: see .ci/run). These assert quality, not speed:
the time each run took is recorded in metrics.json and printed, never asserted.
"""

from __future__ import annotations

import pytest

from captioning.training import run as train

# attention -> (minimum test BLEU-4, minimum caption accuracy), as docs/training.md states them.
# The hard target is for the REINFORCE and entropy terms averaged over captions: at the authors'
# strength (the default, loss.hard_reduction "sum") the entropy bonus holds the attention near
# uniform on this budget (docs/study.md), and no target is set for it.
TARGETS = {"soft": (0.90, 0.80), "hard": (0.85, 0.65)}
EXTRA = {"soft": [], "hard": ["--set", "loss.hard_reduction=mean"]}


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_default_training_reaches_targets(tmp_path, attention):
    result = train.run(["--attention", attention, "--out-dir", str(tmp_path / attention),
                         "--no-progress", "--set", f"data.root={tmp_path / 'data'}", *EXTRA[attention]])
    metrics = result["metrics"]
    print(f"{attention}: BLEU-4 {metrics['bleu_4']:.3f}, caption accuracy {metrics['caption_accuracy']:.3f}, "
          f"{result['total_seconds']} s, peak RSS {result['peak_rss_mib']} MiB")
    assert result["num_images"] == 500
    bleu_4, accuracy = TARGETS[attention]
    assert metrics["bleu_4"] >= bleu_4
    assert metrics["caption_accuracy"] >= accuracy
