"""The whole model: encoder + attention decoder, built from a ModelConfig and a vocabulary size."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from captioning.console import InvalidValue
from captioning.config import ModelConfig
from captioning.models.attention import Mechanism
from captioning.models.decoder import Decoder, DecoderOutput
from captioning.models.encoder import Encoder


class TeacherForcing(NamedTuple):
    """What a teacher-forced pass needs beyond the captions, prepared once per image."""

    features: torch.Tensor  # [N, L, D] annotations of the N images
    mask: torch.Tensor  # [N, L] bool, the real locations
    keys: torch.Tensor  # [N, L, K] the attention's image side W a
    rows: torch.Tensor | None  # [B] long: the image of each caption; None: caption b is image b's
    sample_mask: torch.Tensor | None  # [B] bool per caption: which sample locations (hard attention)


class ShowAttendTell(nn.Module):
    """images [B, 3, H, W] -> annotation grid [B, L, D] -> word distributions, one per step.

    ``attention_kind`` ("soft", "hard" or "none") names the mechanism, picked once, at construction:
    the model holds only the modules that mechanism uses. ``mechanism`` is that module: ask it what
    the mechanism does (captioning/models/attention.py).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.attention_kind = cfg.attention  # its name, as the config and the records say it
        self.encoder = Encoder(cfg.encoder)
        self.decoder = Decoder(cfg.decoder, vocab_size, self.encoder.out_channels, cfg.attention)

    @property
    def mechanism(self) -> Mechanism:
        return self.decoder.attention

    def encode(
        self, images: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> features [B, L, D], feature mask [B, L] bool.

        ``images`` may instead be annotation grids [B, L, D] that this (frozen) encoder computed
        earlier -- the feature cache, captioning/data/feature_cache.py: they pass through in the
        decoder's dtype, every location real (cached images are square, never padded).
        """
        if images.dim() == 3:
            features = images.to(self.decoder.init_h.weight.dtype)
            return features, torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        return self.encoder(images, image_mask)

    def teacher_forcing(
        self,
        images: torch.Tensor,
        captions: torch.Tensor,
        *,
        image_mask: torch.Tensor | None = None,
        sample_mask: torch.Tensor | None = None,
    ) -> TeacherForcing:
        """The per-image inputs of a teacher-forced pass over captions [B*k, T+1], k per image
        (rows i*k .. i*k+k-1 belong to image i): the image is encoded once, and its projection
        ``W a`` computed once, for its k captions. ``sample_mask`` per image or per caption."""
        features, mask = self.encode(images, image_mask)
        k, rem = divmod(captions.shape[0], images.shape[0])
        if rem or k == 0:
            raise InvalidValue(f"{captions.shape[0]} captions for {images.shape[0]} images: need k per image")
        keys = self.decoder.project(features)  # (B, L, K): W a once per image, not once per caption
        rows = None  # one caption per image: caption b is image b's
        if k > 1:
            rows = torch.arange(images.shape[0], device=captions.device).repeat_interleave(k)  # caption -> image
            if sample_mask is not None and sample_mask.shape[0] == images.shape[0]:
                sample_mask = sample_mask[rows]  # per image -> per caption
        return TeacherForcing(features, mask, keys, rows, sample_mask)

    def forward(
        self,
        images: torch.Tensor,
        captions: torch.Tensor,
        *,
        image_mask: torch.Tensor | None = None,
        mode: str = "expected",
        sample_mask: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Teacher-forced pass: captions [B*k, T+1] (<start> ... <end> <pad>) -> logits [B*k, T, V]
        (k captions per image, see ``teacher_forcing``), by the reference loop of decoder.py."""
        x = self.teacher_forcing(images, captions, image_mask=image_mask, sample_mask=sample_mask)
        return self.decoder(x.features, x.mask, captions, mode=mode, sample_mask=x.sample_mask, keys=x.keys,
                            rows=x.rows)
