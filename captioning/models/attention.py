"""Attention over the annotation grid: f_att scores, then a soft or a hard context (Sec. 4).

A score function e_ti = f_att(a_i, h_{t-1}) has an image-side part computed ONCE per image
(``project``: the paper's W a_i does not depend on t) and a per-step part (``forward``). Every
mechanism shares one interface::

    attention(features [N, L, D], keys [N, L, K], mask [N, L] bool, h [B, n], mode, sample_mask)
        -> Attended(context [B, D], alpha [B, L], log_prob [B] or None, location [B] or None)

with B = g * N: rows i*g .. i*g+g-1 of h all attend over image i (g = 1 in training; g = the beam
size in beam search, so an image's beams share one copy of its annotations and the context is a
[g, L] x [L, D] product per image instead of g reads of the grid).

A mechanism is also what the rest of the project asks about attention, instead of comparing its
name: what a training step samples (``training_plan``), which loss terms it adds (``loss_terms``,
computed by captioning/losses.py), which test-time modes it offers (``test_modes``) and which of
them a graph of fixed weights can run (``exportable_modes``). ``MECHANISMS`` and ``SCORES`` map
the config's names to the classes; a new score is one class here and its name in config.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from captioning.console import InvalidValue
from captioning.config import HARD_MODES, DecoderConfig, LossConfig


def grouped(x: torch.Tensor, images: int) -> torch.Tensor:
    """[N*g, ...] -> [N, g, ...]: the rows of each image together."""
    g, rem = x.shape[0] // images, x.shape[0] % images  # not divmod: torch.export traces // and %
    if rem or g == 0:
        raise InvalidValue(f"{x.shape[0]} attention rows for {images} images: need the same number per image")
    return x.view(images, g, *x.shape[1:])


def _masked(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """scores [N*g, L] -> [N, g, L] with -inf where mask [N, L] is False."""
    return grouped(scores, mask.shape[0]).masked_fill(~mask[:, None], float("-inf"))


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """alpha_ti = exp(e_ti) / sum_k exp(e_tk) over the real locations (Eq. 5); exactly 0 elsewhere.
    scores [N*g, L], mask [N, L]."""
    return _masked(scores, mask).softmax(dim=-1).view(scores.shape)


def masked_log_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked(scores, mask).log_softmax(dim=-1).view(scores.shape)


def expected_context(alpha: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """z_t = sum_i alpha_ti a_i (Eq. 13): alpha [N*g, L], features [N, L, D] -> [N*g, D]."""
    return torch.bmm(grouped(alpha, features.shape[0]), features).view(alpha.shape[0], -1)


def _query_products(keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """keys [N, L, A] . query [N*g, A] -> [N*g, L] (dot-product scores, grouped per image)."""
    return torch.bmm(keys, grouped(query, keys.shape[0]).transpose(1, 2)).transpose(1, 2).reshape(query.shape[0], -1)


# ----------------------------------------------------------------------------- score functions


class Score(nn.Module):
    """f_att: ``project(features [N, L, D]) -> keys [N, L, K]`` once per image, then
    ``forward(keys, h [N*g, n]) -> e [N*g, L]`` per step (``from_query`` when the query side,
    e.g. U h, was computed elsewhere)."""

    @classmethod
    def build(cls, feature_dim: int, hidden_dim: int, attention_dim: int, layers: int = 1) -> "Score":
        if layers != 1:
            raise InvalidValue(f"model.decoder.attention_layers={layers} needs the additive score, not {cls.__name__}")
        return cls(feature_dim, hidden_dim, attention_dim)


class AdditiveScore(Score):
    """The paper's f_att (Sec. 4, after Bahdanau et al.): e_ti = v^T tanh(W a_i + U h_{t-1}) + b.

    ``layers`` > 1 puts extra layers on the image side, as capgen.py's ``n_layers_att`` does
    (its COCO setting is 2): ``pctx_ = tanh(dot(pctx_, W_att_1) + b_att_1)`` after
    ``pctx_ = dot(context, Wc_att) + b_att``, so the keys become tanh(W_2 (W a + b) + b_2); the
    per-step part is unchanged.
    """

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int, layers: int = 1) -> None:
        super().__init__()
        if layers < 1:
            raise InvalidValue(f"the additive score needs at least 1 image-side layer, got {layers}")
        self.W = nn.Linear(feature_dim, attention_dim)
        # capgen's W_att_1 .. W_att_{n-1}; an empty list (the paper's form) has no parameters.
        self.W_deep = nn.ModuleList(nn.Linear(attention_dim, attention_dim) for _ in range(layers - 1))
        self.U = nn.Linear(hidden_dim, attention_dim, bias=False)
        self.v = nn.Linear(attention_dim, 1)

    @classmethod
    def build(cls, feature_dim: int, hidden_dim: int, attention_dim: int, layers: int = 1) -> "AdditiveScore":
        return cls(feature_dim, hidden_dim, attention_dim, layers)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """W a_i, once per image: [N, L, D] -> keys [N, L, A]."""
        keys = self.W(features)
        for layer in self.W_deep:
            keys = torch.tanh(layer(keys))
        return keys

    def forward(self, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.from_query(keys, self.U(h))

    def from_query(self, keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """keys W a [N, L, A], query U h [N*g, A] -> e = v^T tanh(W a + U h) + b [N*g, L]."""
        N, L, A = keys.shape
        q = grouped(query, N)[:, :, None, :]  # (N, g, 1, A)
        e = self.v(torch.tanh(keys[:, None] + q))  # (N, g, L, 1)
        return e.view(query.shape[0], L)


class DotScore(Score):
    """e = (W a)^T (U h)."""

    scaled = False

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.W = nn.Linear(feature_dim, attention_dim, bias=False)
        self.U = nn.Linear(hidden_dim, attention_dim, bias=False)
        self.scale = 1.0 / math.sqrt(attention_dim) if self.scaled else 1.0

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.W(features) * self.scale  # (N, L, A)

    def forward(self, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.from_query(keys, self.U(h))

    def from_query(self, keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return _query_products(keys, query)  # (N*g, L)


class ScaledDotScore(DotScore):
    """e = (W a)^T (U h) / sqrt(A) (the scaled dot product)."""

    scaled = True


class BilinearScore(Score):
    """e = a^T M h (Luong's "general" score); M a is the per-image part."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int | None = None) -> None:
        super().__init__()  # attention_dim unused: the query is h itself
        self.M = nn.Linear(feature_dim, hidden_dim, bias=False)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.M(features)  # (N, L, n)

    def forward(self, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.from_query(keys, h)

    def from_query(self, keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return _query_products(keys, query)  # (N*g, L): the query is h itself


#: model.decoder.score -> its class (config.py's DecoderConfig.score lists the same names).
SCORES: dict[str, type[Score]] = {"additive": AdditiveScore, "dot": DotScore, "scaled_dot": ScaledDotScore,
                                  "bilinear": BilinearScore}


def build_score(kind: str, feature_dim: int, hidden_dim: int, attention_dim: int, layers: int = 1) -> Score:
    if kind not in SCORES:
        raise InvalidValue(f"unknown attention score '{kind}'; choose {', '.join(SCORES)}")
    return SCORES[kind].build(feature_dim, hidden_dim, attention_dim, layers)


# ----------------------------------------------------------------------------- mechanisms


class Attended(NamedTuple):
    context: torch.Tensor  # [B, D] z_t before the gate
    alpha: torch.Tensor  # [B, L] attention weights (exact zeros where masked)
    log_prob: torch.Tensor | None  # [B] log p(s_t | a) of the sampled location; 0 where not sampled
    location: torch.Tensor | None  # [B] long, the chosen location; -1 where the expectation was used


class TrainingPlan(NamedTuple):
    """What one training step samples (``Mechanism.training_plan``)."""

    mode: str  # how the teacher-forced pass attends: "expected", or "sample" (hard attention)
    sample_mask: torch.Tensor | None  # [images] bool: which images sample (None: all, in "sample")
    samples: int  # location sequences drawn per caption (loss.samples where it samples, else 1)


class Mechanism(nn.Module):
    """What every mechanism answers, so that no caller compares its name; and, for a mechanism
    with a score f_att, its two halves: ``project`` (W a_i, once per image) and ``forward`` (the
    step's scores e_t, handed to the mechanism's ``attend``)."""

    #: The attention modes it offers at test time, the first the default; empty: it has no choice
    #: to make (it always attends in the one way it has).
    test_modes: tuple[str, ...] = ()
    #: Those a graph of fixed weights reproduces (ONNX export).
    exportable_modes: tuple[str, ...] = ()
    #: The terms its training adds to the caption NLL, by captioning/losses.py's names: Eq. 14's
    #: "doubly_stochastic" penalty; Eq. 12's "reinforce" (with a baseline) and "entropy" bonus.
    loss_terms: tuple[str, ...] = ("doubly_stochastic",)

    @classmethod
    def build(cls, cfg: DecoderConfig, feature_dim: int) -> "Mechanism":
        """The mechanism with its score f_att as ``cfg`` describes it."""
        return cls(build_score(cfg.score, feature_dim, cfg.hidden_dim, cfg.attention_dim, cfg.attention_layers))

    def __init__(self, score: Score | None = None) -> None:
        super().__init__()
        self.score = score  # f_att; None where the mechanism has none (NoAttention)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.score.project(features)

    def forward(
        self,
        features: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor,
        h: torch.Tensor,
        *,
        mode: str = "expected",
        sample_mask: torch.Tensor | None = None,
    ) -> Attended:
        return self.attend(features, mask, self.score(keys, h), mode=mode, sample_mask=sample_mask)

    def training_plan(self, cfg: LossConfig, images: int, step_seed: int, device: torch.device) -> TrainingPlan:
        """What a training step of ``images`` images samples (``step_seed``: the same on every
        DDP rank for one optimiser step): a deterministic mechanism samples nothing."""
        return TrainingPlan("expected", None, 1)


class SoftAttention(Mechanism):
    """Deterministic soft attention: z = sum_i alpha_i a_i (Sec. 4.2)."""

    def attend(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        scores: torch.Tensor,
        *,
        mode: str = "expected",
        sample_mask: torch.Tensor | None = None,
    ) -> Attended:
        """The mechanism itself, from scores [N*g, L] already computed."""
        if mode != "expected":
            raise InvalidValue(f"soft attention has no '{mode}' mode; only hard attention samples")
        alpha = masked_softmax(scores, mask)  # (B, L)
        return Attended(expected_context(alpha, features), alpha, None, None)


class HardAttention(Mechanism):
    """Stochastic hard attention: s_t ~ Multinoulli(alpha_t), z = a_{s_t} (Sec. 4.1).

    mode "sample": images whose ``sample_mask`` entry is True draw a location; the others use the
    expected context sum_i alpha_i a_i (the paper's 0.5 substitution, ``training_plan``).
    mode "expected": every image uses the expected context (the authors' default at test time).
    mode "argmax": every image takes its single most likely location.
    """

    test_modes = HARD_MODES
    # "sample" draws random locations inside the step, which a graph of fixed weights cannot.
    exportable_modes = ("expected", "argmax")
    # Eq. 12: the REINFORCE term replaces the doubly stochastic one (in the authors' code the
    # known gradient on alpha takes its place; losses.py still logs it).
    loss_terms = ("reinforce", "entropy")

    def training_plan(self, cfg: LossConfig, images: int, step_seed: int, device: torch.device) -> TrainingPlan:
        """With probability ``cfg.expected_context_prob`` the expected context instead of a sampled
        location (Sec. 4.1): one draw per minibatch, the same on every rank (the authors' code,
        ``cfg.substitution`` "minibatch"), or one per image ("image", the paper's text)."""
        p = cfg.expected_context_prob
        if cfg.substitution == "minibatch":
            use_expected = torch.rand((), generator=torch.Generator().manual_seed(step_seed)).item() < p
            return TrainingPlan("expected", None, 1) if use_expected else TrainingPlan("sample", None, cfg.samples)
        return TrainingPlan("sample", torch.rand(images, device=device) >= p, cfg.samples)

    def attend(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        scores: torch.Tensor,
        *,
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
            raise InvalidValue(f"unknown hard attention mode '{mode}'; choose {', '.join(HARD_MODES)}")
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


class NoAttention(Mechanism):
    """The no-attention control ("Show and Tell" with the same decoder): z_t is the mean of the
    real annotations, the same at every step. alpha_t is uniform over the real locations (1/L_valid,
    0 elsewhere), so heatmaps and grounding code run unchanged (and score what a uniform map scores;
    its doubly stochastic penalty is a constant). There is no f_att and so no parameter here."""

    @classmethod
    def build(cls, cfg: DecoderConfig, feature_dim: int) -> "NoAttention":
        return cls()

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features.new_empty(*features.shape[:2], 0)  # no keys: nothing depends on the image side

    def forward(
        self,
        features: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor,
        h: torch.Tensor,
        *,
        mode: str = "expected",
        sample_mask: torch.Tensor | None = None,
    ) -> Attended:
        if mode != "expected":
            raise InvalidValue(f"attention 'none' has no '{mode}' mode; only hard attention samples")
        N, L = mask.shape
        g = grouped(h, N).shape[1]  # rows per image
        uniform = mask.to(features.dtype) / mask.sum(1, keepdim=True).clamp_min(1)  # (N, L)
        alpha = uniform[:, None].expand(N, g, L).reshape(N * g, L)  # (B, L)
        return Attended(expected_context(alpha, features), alpha, None, None)


#: model.attention -> its class (config.py's ModelConfig.attention lists the same names).
MECHANISMS: dict[str, type[Mechanism]] = {"soft": SoftAttention, "hard": HardAttention, "none": NoAttention}


def build_attention(kind: str, cfg: DecoderConfig, feature_dim: int) -> Mechanism:
    if kind not in MECHANISMS:
        raise InvalidValue(f"unknown attention '{kind}'; choose {', '.join(MECHANISMS)}")
    return MECHANISMS[kind].build(cfg, feature_dim)
