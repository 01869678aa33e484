"""Attention heatmaps of the first validation images at every validation, to watch attention form:
``<run>/attention/step<global step>_<i>.png`` in the paper's Figure 3 layout
(captioning/visualization.py), and with TensorBoard on, images ``attention/<i>`` at the step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn

from captioning.data.transforms import ImageLoadError, load_image, preprocess

#: Validation images drawn at every validation.
NUM_IMAGES = 4


class AttentionHeatmaps(pl.Callback):
    def __init__(self, out_dir: str | Path) -> None:
        self.folder = Path(out_dir) / "attention"
        self._images: list | None = None  # (name, PIL image) of the fixed validation images

    def _load(self, trainer: pl.Trainer) -> list:
        if self._images is None:
            self._images = []
            data = trainer.datamodule
            records = data.load_split("val")[:NUM_IMAGES] if data is not None else []
            for record in records:
                try:
                    self._images.append((Path(record.path).stem, load_image(record.path)))
                except ImageLoadError as err:  # e.g. a prepared folder whose source files moved
                    rank_zero_warn(f"attention heatmaps: skipping a validation image ({err})")
        return self._images

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._load(trainer):
            return
        from captioning.visualization import attention_figure

        cfg, model = module.cfg, module.model
        images = torch.stack([preprocess(img, cfg.data.image_size) for _, img in self._images]).to(module.device)
        was_training = model.training
        model.eval()
        try:
            pools = module.search(images, module.decode_options("val"))
        finally:
            model.train(was_training)
        g = cfg.model.encoder.grid_size
        step = trainer.global_step
        self.folder.mkdir(parents=True, exist_ok=True)
        tensorboard = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        for i, (name, img) in enumerate(self._images):
            best = pools[i][0]
            words = module.vocab.decode(best.tokens)
            maps = best.alphas[:len(words)].float().cpu().reshape(len(words), g, g).numpy()
            figure = attention_figure(img, words, maps, title=f"step {step}: {' '.join(words)}", panel_size=128)
            figure.save(self.folder / f"step{step:07d}_{i}.png", format="PNG")
            if tensorboard is not None:
                tensorboard.add_image(f"attention/{i}_{name}", np.asarray(figure), step, dataformats="HWC")
