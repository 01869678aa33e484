"""Decode the same test images with every run: side-by-side attention figures and entropy per word.

Decoding uses the study's decoder settings (beam size, max length; a hard model attends with the
expected alpha, its default), through the same :class:`captioning.api.Captioner` the caption CLI
uses. For every run, the first ``ENTROPY_IMAGES`` test images give the mean attention entropy at
each word position; the first ``count`` of them, decoded by the first soft and the first hard run,
are drawn side by side, one paper-style panel per word (:mod:`captioning.visualization`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from captioning.study.runs import Plan, Run, StudyError

ENTROPY_IMAGES = 100  # test images per run for the entropy-by-word-position curve
PANEL = 112  # pixels per panel in the attention figures
COLUMNS = 4
GAP = 24  # pixels between the soft and the hard figure


def _entropy(maps: np.ndarray) -> np.ndarray:
    """[words, gh, gw] attention maps -> [words] entropy in nats (0 log 0 = 0)."""
    flat = maps.reshape(maps.shape[0], -1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(flat > 0, flat * np.log(flat), 0.0)
    return -terms.sum(axis=1)


def _side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (left.width + GAP + right.width, max(left.height, right.height)), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + GAP, 0))
    return canvas


def first_test_images(run: Run, limit: int) -> list[tuple[int, Path]]:
    """(image id, path) of the first ``limit`` test images of the run's dataset (from its checkpoint)."""
    from captioning.checkpoint import CheckpointError, checkpoint_config, read_checkpoint
    from captioning.data.coco import AnnotationError
    from captioning.data.datamodule import CaptionDataModule
    from captioning.data.sources import source_for

    try:
        cfg, vocab = checkpoint_config(read_checkpoint(run.checkpoint), run.checkpoint)
        source_for(cfg.data).check_trained()  # never generate the run's synthetic set in the current folder
        data = CaptionDataModule(cfg.data, vocab)
        data.prepare_data()
        records = data.load_split("test")
    except (CheckpointError, AnnotationError, ValueError, OSError) as err:
        raise StudyError(f"cannot read the test split of {run.checkpoint}'s dataset: {err}") from None
    return [(r.image_id, Path(r.path)) for r in records[:limit]]


def decode_examples(plan: Plan, count: int, log=print) -> dict:
    """-> {"images", "entropy_by_position": {run: [...]}, "examples": [...]}; writes figures/attention_*.png."""
    from captioning.api import Captioner
    from captioning.data.transforms import load_image
    from captioning.visualization import attention_figure

    figures = plan.out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    images = first_test_images(plan.runs[0], max(ENTROPY_IMAGES, count))
    paths = [p for _, p in images]
    by_position: dict[str, list[float]] = {}
    per_step: dict[str, float] = {}
    shown: dict[str, tuple[str, list]] = {}
    grid_locations = None
    for run in plan.runs:
        captioner = Captioner.from_checkpoint(run.checkpoint)
        # The same decoding for every run: hard attention with the expected context.
        options = captioner.options(beam_size=plan.beam_size, max_len=plan.max_len, hard_mode="expected")
        captions = captioner.caption(paths, options, batch_size=50)
        grid_locations = captioner.grid_size ** 2
        entropies = [_entropy(c.attention) for c in captions if c.words]
        longest = max((len(e) for e in entropies), default=0)
        by_position[run.name] = [float(np.mean([e[t] for e in entropies if len(e) > t])) for t in range(longest)]
        per_step[run.name] = float(np.mean(np.concatenate(entropies))) if entropies else None
        if run.attention not in shown:
            shown[run.attention] = (run.name, captions[:count])
        log(f"compare: decoded {len(paths)} test images with {run.name}")

    examples = []
    if {"soft", "hard"} <= set(shown):
        for i, (image_id, path) in enumerate(images[:count]):
            image = load_image(path)  # as the captioner read it: EXIF orientation, alpha on white
            panels = []
            entry = {"image_id": image_id, "image": str(path)}
            for attention in ("soft", "hard"):
                name, caps = shown[attention]
                cap = caps[i]
                title = f"{attention} ({name}): {cap.text}"
                panels.append(attention_figure(image, cap.words, cap.attention, title=title, panel_size=PANEL,
                                               columns=COLUMNS))
                entry[attention] = {"run": name, "caption": cap.text, "words": cap.words}
            out = figures / f"attention_{image_id}.png"
            _side_by_side(*panels).save(out, format="PNG")
            entry["figure"] = f"figures/{out.name}"
            examples.append(entry)
    return {"images": len(paths), "locations": grid_locations,
            "uniform_entropy": math.log(grid_locations) if grid_locations else None,
            "decode": {"beam_size": plan.beam_size, "max_len": plan.max_len, "hard_mode": "expected"},
            "entropy_by_position": by_position, "entropy_per_word": per_step, "examples": examples}
