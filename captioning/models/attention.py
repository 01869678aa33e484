"""Attention over the annotation grid: f_att scores, then a soft or a hard context (Sec. 4).

Score functions e_ti = f_att(a_i, h_{t-1}) all split into an image-side part computed ONCE per
image (``project``) and a cheap per-step part (``forward``): the paper's W a_i does not depend on t.
The per-step part splits again into a linear map of h (``query``; its matrix is ``query_weight``,
None where the query is h itself) and the rest (``from_query``), so the teacher-forced loop can fuse
every product of h_{t-1} into one (captioning/models/decoder.py).

Both mechanisms share one interface::

    attend(features [N, L, D], keys [N, L, K], mask [N, L] bool, h [B, n], mode, sample_mask)
        -> Attended(context [B, D], alpha [B, L], log_prob [B] or None, location [B] or None)

with B = g * N: rows i*g .. i*g+g-1 of h all attend over image i (g = 1 in training; g = the beam
size in beam search, so an image's beams share one copy of its annotations and the context is a
[g, L] x [L, D] product per image instead of g reads of the grid).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


# Inference only: the additive score's [g, L, A] map is computed for this many elements at a time
# (a few images), so it stays in cache instead of streaming a fresh [B, L, A] tensor through memory.
SCORE_CHUNK_ELEMENTS = 2**20


def _grouped(scores: torch.Tensor, images: int) -> torch.Tensor:
    """[N*g, ...] -> [N, g, ...]: the rows of each image together."""
    g, rem = divmod(scores.shape[0], images)
    if rem or g == 0:
        raise ValueError(f"{scores.shape[0]} attention rows for {images} images: need the same number per image")
    return scores.view(images, g, *scores.shape[1:])


def _masked(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """scores [N*g, L] -> [N, g, L] with -inf where mask [N, L] is False."""
    return _grouped(scores, mask.shape[0]).masked_fill(~mask[:, None], float("-inf"))


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over locations where masked-out positions get exactly 0. scores [N*g, L], mask [N, L]."""
    return _masked(scores, mask).softmax(dim=-1).view(scores.shape)


def masked_log_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked(scores, mask).log_softmax(dim=-1).view(scores.shape)


def expected_context(alpha: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """sum_i alpha_i a_i: alpha [N*g, L], features [N, L, D] -> [N*g, D]."""
    return torch.bmm(_grouped(alpha, features.shape[0]), features).view(alpha.shape[0], -1)


def _query_products(keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """keys [N, L, A] . query [N*g, A] -> [N*g, L] (dot-product scores, grouped per image)."""
    return torch.bmm(keys, _grouped(query, keys.shape[0]).transpose(1, 2)).transpose(1, 2).reshape(query.shape[0], -1)


# ----------------------------------------------------------------------------- score functions


class AdditiveScore(nn.Module):
    """The paper's f_att: e = v^T tanh(W a + U h) (Bahdanau-style MLP)."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.W = nn.Linear(feature_dim, attention_dim)
        self.U = nn.Linear(hidden_dim, attention_dim, bias=False)
        self.v = nn.Linear(attention_dim, 1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.W(features).mul_(2.0)  # (B, L, A): the keys are 2 (W a + b_W), see from_query

    @property
    def query_weight(self) -> torch.Tensor:
        return self.U.weight

    def forward(self, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.from_query(keys, self.U(h))

    def from_query(self, keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """keys [N, L, A] from ``project``, query U h [N*g, A] -> scores [N*g, L].

        Scores equal to v^T tanh(W a + U h) + b plus sum(v) + b, a constant that every
        softmax over locations (the only use of scores) cancels: tanh(z) = 2 sigmoid(2z) - 1, so
        v^T tanh(z) + 2b + sum(v) = 2 (v^T sigmoid(2z) + b). PyTorch's CPU tanh is several times
        slower than its sigmoid, and this [B, L, A] map is the decoder's largest elementwise op
        (measured: the COCO-size training step 10% faster). The factor 2 inside is applied to the
        keys once per image (``project``) and to the [B, A] query, never to the [B, L, A] map.
        Same parameters, same alphas."""
        N, L, A = keys.shape
        q = _grouped(query * 2.0, N)[:, :, None, :]  # (N, g, 1, A)
        per_image = q.shape[1] * L * A
        if torch.is_grad_enabled() or N * per_image <= SCORE_CHUNK_ELEMENTS:
            return self._scores(keys, q).view(query.shape[0], L)
        n = max(1, SCORE_CHUNK_ELEMENTS // per_image)  # images per chunk (inference on big batches)
        return torch.cat([self._scores(keys[i:i + n], q[i:i + n]) for i in range(0, N, n)]).view(query.shape[0], L)

    def _scores(self, keys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        z = (keys[:, None] + q).sigmoid_()  # (N, g, L, A); in place: the sum is not kept for backward
        return self.v(z).squeeze(-1).mul_(2.0)  # (N, g, L); b (doubled) cancels in the softmax too


class DotScore(nn.Module):
    """e = (W a)^T (U h), optionally divided by sqrt(A) (scaled dot product)."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int, scaled: bool) -> None:
        super().__init__()
        self.W = nn.Linear(feature_dim, attention_dim, bias=False)
        self.U = nn.Linear(hidden_dim, attention_dim, bias=False)
        self.scale = 1.0 / math.sqrt(attention_dim) if scaled else 1.0

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.W(features) * self.scale  # (B, L, A)

    @property
    def query_weight(self) -> torch.Tensor:
        return self.U.weight

    def forward(self, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.from_query(keys, self.U(h))

    def from_query(self, keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return _query_products(keys, query)  # (N*g, L)


class BilinearScore(nn.Module):
    """e = a^T M h (Luong's "general" score); M a is the per-image part."""

    def __init__(self, feature_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.M = nn.Linear(feature_dim, hidden_dim, bias=False)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.M(features)  # (B, L, n)

    query_weight = None  # the query is h itself

    def forward(self, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.from_query(keys, h)

    def from_query(self, keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return _query_products(keys, query)  # (N*g, L)


def build_score(kind: str, feature_dim: int, hidden_dim: int, attention_dim: int) -> nn.Module:
    if kind == "additive":
        return AdditiveScore(feature_dim, hidden_dim, attention_dim)
    if kind in ("dot", "scaled_dot"):
        return DotScore(feature_dim, hidden_dim, attention_dim, scaled=kind == "scaled_dot")
    if kind == "bilinear":
        return BilinearScore(feature_dim, hidden_dim)
    raise ValueError(f"unknown attention score '{kind}'; choose additive, dot, scaled_dot or bilinear")


# ----------------------------------------------------------------------------- mechanisms


class Attended(NamedTuple):
    context: torch.Tensor  # [B, D] z_t before the gate
    alpha: torch.Tensor  # [B, L] attention weights (exact zeros where masked)
    log_prob: torch.Tensor | None  # [B] log p(s_t | a) of the sampled location; 0 where not sampled
    location: torch.Tensor | None  # [B] long, the chosen location; -1 where the expectation was used


class SoftAttention(nn.Module):
    """Deterministic soft attention: z = sum_i alpha_i a_i (Sec. 4.2)."""

    def __init__(self, score: nn.Module) -> None:
        super().__init__()
        self.score = score

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.score.project(features)

    def forward(
        self,
        features: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor,
        h: torch.Tensor,
        mode: str = "expected",
        sample_mask: torch.Tensor | None = None,
    ) -> Attended:
        return self.attend(features, mask, self.score(keys, h), mode, sample_mask)

    def attend(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        scores: torch.Tensor,
        mode: str = "expected",
        sample_mask: torch.Tensor | None = None,
    ) -> Attended:
        """The mechanism itself, from scores [N*g, L] already computed."""
        if mode != "expected":
            raise ValueError(f"soft attention has no '{mode}' mode; only hard attention samples")
        alpha = masked_softmax(scores, mask)  # (B, L)
        return Attended(expected_context(alpha, features), alpha, None, None)


class HardAttention(SoftAttention):
    """Stochastic hard attention: s_t ~ Multinoulli(alpha_t), z = a_{s_t} (Sec. 4.1).

    mode "sample": images whose ``sample_mask`` entry is True draw a location; the others use the
    expected context sum_i alpha_i a_i (the paper's 0.5 substitution, decided by the caller).
    mode "expected": every image uses the expected context (the authors' default at test time).
    mode "argmax": every image takes its single most likely location.
    """

    def attend(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        scores: torch.Tensor,
        mode: str = "expected",
        sample_mask: torch.Tensor | None = None,
    ) -> Attended:
        log_alpha = masked_log_softmax(scores, mask)  # (B, L)
        alpha = log_alpha.exp()
        B = scores.shape[0]
        if mode == "expected":
            return Attended(expected_context(alpha, features), alpha, None, None)
        if mode == "argmax":
            location = alpha.argmax(dim=-1)  # (B,)
        elif mode == "sample":
            location = torch.multinomial(alpha.detach(), 1).squeeze(1)  # (B,)
        else:
            raise ValueError(f"unknown hard attention mode '{mode}'; choose sample, expected or argmax")
        rows = torch.arange(B, device=features.device)
        sampled_context = features[rows // (B // features.shape[0]), location]  # (B, D)
        log_prob = log_alpha[rows, location]  # (B,)
        if mode == "sample" and sample_mask is not None:
            keep = sample_mask[:, None]
            context = torch.where(keep, sampled_context, expected_context(alpha, features))
            log_prob = torch.where(sample_mask, log_prob, torch.zeros_like(log_prob))
            location = torch.where(sample_mask, location, torch.full_like(location, -1))
            return Attended(context, alpha, log_prob, location)
        return Attended(sampled_context, alpha, log_prob, location)


def build_attention(kind: str, score: nn.Module) -> SoftAttention:
    if kind == "soft":
        return SoftAttention(score)
    if kind == "hard":
        return HardAttention(score)
    raise ValueError(f"unknown attention '{kind}'; choose soft or hard")
