"""The LightningModule: it orchestrates (steps, losses, logging, optimisers) and does no model maths.
Its checkpoints hold plain types only (their layout: captioning/checkpoint.py)."""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
import torch

from captioning import fast
from captioning.config import Config, from_dict, to_dict
from captioning.console import OperationFailed, one_line
from captioning.decoding import ModelSearch
from captioning.evaluation.evaluator import decode_batch, evaluate_predictions, gather_by_image_id, score_record
from captioning.evaluation.metrics import DEFAULT_METRICS
from captioning.losses import LossTerms, ReinforceBaseline, caption_loss, per_token_nll
from captioning.models import ShowAttendTell
from captioning.models.attention import Mechanism, TrainingPlan
from captioning.perf.compile import compile_model
from captioning.search import DecodeOptions
from captioning.training.optimizers import CapgenAdam
from captioning.vocab import Vocabulary

# Every validation scores BLEU (val/bleu_4 selects checkpoints) and CIDEr-D, both cheap beside
# decoding; METEOR runs a JVM, so it is test-only (docs/training.md, the cost of each).
VAL_METRICS = ("bleu", "cider")


class CaptioningModule(pl.LightningModule):
    def __init__(self, config: dict, vocab: list[str], training_data: dict | None = None) -> None:
        super().__init__()
        # Plain types only, so checkpoints need none of our classes to load. training_data: what
        # the model was trained on (captioning/provenance.py), so that every command can say it.
        hparams = {"config": config, "vocab": vocab}
        if training_data is not None:
            hparams["training_data"] = training_data
        self.save_hyperparameters(hparams)
        self.cfg: Config = from_dict(config)
        self.vocab = Vocabulary(vocab)
        self.model = ShowAttendTell(self.cfg.model, len(self.vocab))
        # Optional torch.compile (train.compile); lazy, and the parameter names stay the same.
        compile_model(self.model, self.cfg.train.compile, self.cfg.train.compile_mode)
        # model.decoder.fast (captioning/fast.py): the fused teacher-forced pass (None: the model's
        # loop) and decoding's additive-score form; compiled runs keep the reference maths.
        fast_path = self.cfg.model.decoder.fast and self.cfg.train.compile == "none"
        self.fused = fast.training_pass(self.model) if fast_path else None
        self.search = ModelSearch(self.model, fast=fast_path)
        # Built only for a mechanism whose training adds REINFORCE: the others have no baseline.
        self.baseline = (ReinforceBaseline(self.cfg.loss.baseline_decay) if "reinforce" in self.mechanism.loss_terms
                         else None)
        self._predictions: dict[int, str] = {}
        self._val_nll: list[torch.Tensor] = []  # [sum, count] of the reference NLL (train.monitor "nll")
        self.eval_results: dict | None = None  # filled on rank 0 after validation/test
        self._fit_started: float | None = None  # perf_counter at fit start, for val/elapsed_s

    @property
    def mechanism(self) -> Mechanism:
        """The attention mechanism: what it samples, which loss terms it adds, its test-time modes."""
        return self.model.mechanism

    @classmethod
    def create(cls, cfg: Config, vocab: Vocabulary, training_data: dict | None = None) -> "CaptioningModule":
        return cls(to_dict(cfg), list(vocab.words), training_data)

    # ------------------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()
        if self.trainer.ckpt_path is not None and self.trainer.world_size == 1:
            return  # resumed: the checkpoint's generators were restored (training/trainer.py RNGState)
        # Same seed on every rank gave identical initial weights; from here each rank draws its
        # own dropout masks and attention samples.
        torch.manual_seed(self.cfg.train.seed * 1009 + 1 + self.global_rank)

    def training_loss(self, batch: dict, plan: TrainingPlan | None = None) -> tuple[LossTerms, TrainingPlan]:
        """The training step's forward and loss (also what captioning/perf/benchmark.py times).
        ``plan``: what the step samples; None lets the mechanism decide, as training does
        (captioning/study/variance.py fixes it to measure the estimator)."""
        images, captions = batch["images"], batch["captions"]
        # What this step samples (the mechanism decides; a minibatch draw is the same on every rank).
        if plan is None:
            plan = self.mechanism.training_plan(self.cfg.loss, images.shape[0],
                                                self.cfg.train.seed * 7919 + self.global_step, self.device)
        # Captions of the whole optimiser step: hard attention's REINFORCE and entropy terms are
        # scaled by it (loss.hard_reduction "sum", the authors' strength; losses.py).
        world = self.trainer.world_size if self._trainer is not None else 1
        captions_per_step = captions.shape[0] * world
        if plan.samples > 1:  # K draws of each caption: rows n*K .. n*K+K-1, all of the same image
            captions = captions.repeat_interleave(plan.samples, 0)  # (B*K, T+1)
        teacher_forced = self.model if self.fused is None else self.fused
        out = teacher_forced(images, captions, mode=plan.mode, sample_mask=plan.sample_mask)
        sampled = None
        if plan.sample_mask is not None:  # per image -> per row
            sampled = plan.sample_mask.repeat_interleave(captions.shape[0] // plan.sample_mask.shape[0])
        terms = caption_loss(self.cfg.loss, out, captions[:, 1:], terms=self.mechanism.loss_terms,
                             baseline=None if self.baseline is None else self.baseline.value,
                             captions_per_step=captions_per_step, samples=plan.samples, sampled=sampled)
        return terms, plan

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        captions = batch["captions"]
        terms, plan = self.training_loss(batch)
        n = captions.shape[0]
        self.log("train/loss", terms.loss, prog_bar=True, batch_size=n)
        self.log("train/token_nll", terms.token_nll, prog_bar=True, batch_size=n)
        self.log_dict({"train/nll": terms.nll, "train/doubly_stochastic": terms.doubly_stochastic,
                       "train/entropy": terms.entropy}, batch_size=n)
        self._log_training_signal(terms, captions, plan)
        if self.baseline is not None:
            self.log_dict({"train/reinforce": terms.reinforce, "train/baseline": self.baseline.value,
                           "train/sampled": float(plan.mode == "sample")}, batch_size=n)
            # The step uses the old b; b is then moved towards the mean cost C_n of the global
            # minibatch (all-reduced), the quantity it is subtracted from, so every rank holds the same b.
            cost = terms.cost.mean()
            if self._trainer is not None:
                cost = self.trainer.strategy.reduce(cost, reduce_op="mean")
            self.baseline.update(cost)
        return terms.loss

    @torch.no_grad()
    def _log_training_signal(self, terms: LossTerms, captions: torch.Tensor, plan: TrainingPlan) -> None:
        """What the soft-vs-hard study (captioning compare) plots; monitoring only, no gradient.
        train/attention_entropy: mean H(alpha_t) in nats over real (caption, step) pairs. Hard
        attention, over the captions of steps that sampled: s_n = lambda_r (C_n - b) multiplies
        d log p(s_n|a)/dW (C_n, b as in losses.caption_loss); logged are mean C_n (reinforce_cost),
        mean s_n, its population variance, mean s_n^2 = var + mean^2 (the estimator's variance
        scales with it) and mean (lambda_r C_n)^2 (the same without a baseline)."""
        n = captions.shape[0]
        tokens = (captions[:, 1:] != self.vocab.pad_id).sum()
        draws = terms.entropy_per_caption.shape[0] // n  # loss.samples rows per caption when sampled
        # From the per-caption values caption_loss computed: nothing is recomputed here.
        per_step = terms.entropy_per_caption.sum() / (tokens * draws).clamp_min(1)
        self.log("train/attention_entropy", per_step, batch_size=n)
        if self.baseline is None:  # no REINFORCE term: no signal to log
            return
        cost = terms.cost  # (N,) the C_n of caption_loss
        if plan.mode != "sample":
            cost = cost[:0]  # expected-context step: no REINFORCE term
        elif plan.sample_mask is not None:  # per-image substitution: only the sampled images' captions
            cost = cost[plan.sample_mask.repeat_interleave(cost.shape[0] // plan.sample_mask.shape[0])]
        signal = self.cfg.loss.reward_scale * terms.advantage  # (N_sampled,) lambda_r (C_n - b)
        # NaN where nothing was sampled: Lightning would otherwise repeat the last value in the log.
        nan = torch.full((), float("nan"), device=cost.device)
        empty = cost.numel() == 0
        self.log_dict({"train/reinforce_cost": nan if empty else cost.mean(),
                       "train/reinforce_signal_mean": nan if empty else signal.mean(),
                       "train/reinforce_signal_var": nan if empty else signal.var(unbiased=False),
                       "train/reinforce_signal_sq": nan if empty else (signal ** 2).mean(),
                       "train/reinforce_signal_sq_no_baseline":
                           nan if empty else ((self.cfg.loss.reward_scale * cost) ** 2).mean()},
                      batch_size=max(1, int(cost.numel())))

    def configure_optimizers(self):
        encoder = [p for p in self.model.encoder.parameters() if p.requires_grad]
        groups = [{"params": list(self.model.decoder.parameters()), "lr": self.cfg.optim.lr, "name": "decoder"}]
        if encoder:
            groups.append({"params": encoder, "lr": self.cfg.optim.encoder_lr, "name": "encoder"})
        # fused: one kernel for all parameters, on CPU and GPU (docs/performance.md). Not where
        # gradients are clipped under mixed precision (16 and bf16 alike): Lightning's mixed-precision
        # plugin refuses to clip the gradients of an optimizer that may unscale them itself.
        mixed = self._trainer is not None and self.trainer.precision.endswith("-mixed")
        fused = not (mixed and self.cfg.optim.grad_clip > 0)
        if self.cfg.optim.adam_bias_correction:
            optimizer = torch.optim.Adam(groups, weight_decay=self.cfg.optim.weight_decay, fused=fused)
        else:  # the authors' update, bias correction about none (captioning/training/optimizers.py)
            optimizer = CapgenAdam(groups, weight_decay=self.cfg.optim.weight_decay)
        if self.cfg.optim.schedule == "constant":
            return optimizer
        total = max(1, self.trainer.estimated_stepping_batches)

        def cosine(step: int) -> float:  # decays to 5% of lr over the run
            return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------ evaluation
    def _decode_batch(self, batch: dict, split: str) -> None:
        pools = self.search(batch["images"], self.decode_options(split))
        for image_id, pool in zip(batch["image_ids"].tolist(), pools):
            self._predictions[image_id] = " ".join(self.vocab.decode(pool[0].tokens))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._decode_batch(batch, "val")
        if "captions" in batch:  # train.monitor "nll": the datamodule adds the references
            nll = self._reference_nll(batch)
            self._val_nll[0] += nll.sum()
            self._val_nll[1] += nll.numel()

    def _reference_nll(self, batch: dict) -> torch.Tensor:
        """Teacher-forced NLL of every reference caption of the batch's images, summed over its
        tokens -> [N] (capgen's ``pred_probs``; a hard model attends with the expected context).
        batch["captions"] [N, T+1], batch["caption_rows"] [N]: the image of each caption."""
        features, mask = self.model.encode(batch["images"])
        keys = self.model.decoder.project(features)  # once per image
        captions = batch["captions"]
        out = self.model.decoder(features, mask, captions, keys=keys, rows=batch["caption_rows"])
        return per_token_nll(out.logits, captions[:, 1:], self.vocab.pad_id).sum(1)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._decode_batch(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._predictions = {}
        self._val_nll = [torch.zeros((), device=self.device), torch.zeros((), device=self.device)]

    def on_test_epoch_start(self) -> None:
        self._predictions = {}

    def on_validation_epoch_end(self) -> None:
        self._score("val", VAL_METRICS)
        if self.cfg.train.monitor == "nll" and not self.trainer.sanity_checking:
            # Mean over every rank's reference captions (DDP's sampler may repeat a few images).
            total, count = (self.trainer.strategy.reduce(v, reduce_op="sum") for v in self._val_nll)
            self.log("val/nll", total / count, prog_bar=True, rank_zero_only=False)
        if self._fit_started is not None and not self.trainer.sanity_checking:
            # Wall time from the start of fit to the end of this validation (learning curves vs time).
            self.log("val/elapsed_s", time.perf_counter() - self._fit_started, rank_zero_only=False)

    def on_test_epoch_end(self) -> None:
        self._score("test", DEFAULT_METRICS)

    def decode_options(self, split: str) -> DecodeOptions:
        """Validation decodes greedily (cheap, every epoch); the test split with the config's beam."""
        return DecodeOptions.for_model(self.cfg.decode, self.mechanism.test_modes, self.cfg.model.attention,
                                       beam_size=1 if split == "val" else None)

    def _score(self, split: str, metrics: tuple[str, ...]) -> None:
        if self.trainer.sanity_checking:
            return
        # All ranks' predictions, de-duplicated by image id (DistributedSampler pads with repeats).
        predictions = gather_by_image_id(self._predictions)[0]
        values: dict[str, float] = {}
        if self.global_rank == 0:
            dm = self.trainer.datamodule
            refs = dm.references(split)
            limited = self.trainer.limit_val_batches != 1.0 if split == "val" else self.trainer.limit_test_batches != 1.0
            if limited or self.trainer.fast_dev_run:  # a partial pass scores what it decoded
                refs = {i: refs[i] for i in predictions}
            elif set(predictions) != set(refs):
                raise OperationFailed(f"{split}: decoded {len(predictions)} images but the split has {len(refs)}")
            scenes = dm.scenes(split)
            start = time.perf_counter()
            values, report = evaluate_predictions(predictions, refs, scenes, metrics)
            self.eval_results = {
                "split": split, **score_record(values, report, len(predictions), percent=False),
                "decode": self.decode_options(split).record(self.cfg.model.attention),
                "predictions": predictions, "scoring_seconds": time.perf_counter() - start,
            }
        values = self.trainer.strategy.broadcast(values, src=0)
        for key, value in values.items():
            self.log(f"{split}/{key}", float(value), prog_bar=key in ("bleu_4", "caption_accuracy"), rank_zero_only=False)


class SplitDecoding(pl.LightningModule):
    """``captioning evaluate --devices N``: each of N processes decodes every N-th image of the split
    with ``Trainer.predict``; the captions are gathered by image id (gather_by_image_id) and process
    0 writes them, with the first error of any process, to ``out_path``. An error travels through
    the gather, so no process is left waiting in it for one that failed."""

    def __init__(self, checkpoint: str, data, split: str, options: DecodeOptions, matcher, out_path: str) -> None:
        super().__init__()
        self.checkpoint, self.data, self.split, self.options = checkpoint, data, split, options
        self.matcher, self.out_path, self.decoded, self.error = matcher, out_path, {}, None

    def __setstate__(self, state: dict) -> None:
        # Unpickled in each spawned process before Lightning starts there: as quiet as the first.
        from captioning.training.trainer import silence_lightning

        super().__setstate__(state)
        silence_lightning()

    def _failed(self, err: Exception) -> None:
        self.error = self.error or f"rank {self.global_rank}: {type(err).__name__}: {one_line(err)}"

    def setup(self, stage: str) -> None:
        from captioning.api import Captioner

        try:
            self.captioner = Captioner.load(self.checkpoint, device=self.trainer.strategy.root_device)
        except Exception as err:  # reported by the first process, in one line
            self._failed(err)

    def predict_dataloader(self):
        from torch.utils.data import DataLoader, Subset

        from captioning.progress import Progress

        loader = self.data.eval_dataloader(self.split)  # one item per image of the split
        rank, world = self.global_rank, self.trainer.world_size
        shard = Subset(loader.dataset, range(rank, len(loader.dataset), world))
        self.bar = Progress(len(shard), f"evaluate {self.split} (rank 0 of {world}, its shard)", enabled=rank == 0)
        return self._guarded(DataLoader(shard, batch_size=loader.batch_size, shuffle=False,
                                        collate_fn=loader.collate_fn, num_workers=loader.num_workers))

    def _guarded(self, batches):
        """The batches until one cannot be loaded (an unreadable image): that error is kept."""
        try:
            yield from batches
        except Exception as err:
            self._failed(err)

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        if self.error is None:
            try:
                self.decoded.update(decode_batch(self.captioner, batch, self.options, self.matcher))
            except Exception as err:
                self._failed(err)
        self.bar.update(len(batch["image_ids"]))

    def on_predict_epoch_end(self) -> None:
        import pickle
        from pathlib import Path

        import torch.distributed as dist

        self.bar.close()
        errors = [None] * self.trainer.world_size
        dist.all_gather_object(errors, self.error)
        gathered = gather_by_image_id(self.decoded)
        if self.global_rank == 0:  # whole or not at all: renamed into place once written
            part = Path(self.out_path + ".part")
            part.write_bytes(pickle.dumps((next(filter(None, errors), None), gathered)))
            part.replace(self.out_path)
