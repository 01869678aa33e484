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
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


# The additive score's [g, L, A] map is computed for this many elements at a time (a few images)
# in one reused buffer, so it stays in cache instead of streaming a [B, L, A] tensor through
# memory: in decoding, and in the fused teacher-forced pass (``UnrolledAdditiveScore``).
SCORE_CHUNK_ELEMENTS = 2**20
# Inference only: the additive score takes sigmoid(k + q) = 1 / (1 + e^-q / e^k) while every key and
# query lies within this bound (then e^k and e^-q are normal floats and the result is exact to a few
# ulps); otherwise it takes the sigmoid itself.
EXP_FORM_BOUND = 80.0


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
        # (B, L, A): the keys are 2 (W a + b_W), see from_query; the factor goes on the weights
        # (exact: a power of two), not on the [B, L, A] keys and their gradient.
        return F.linear(features, self.W.weight * 2.0, self.W.bias * 2.0)

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
        if torch.is_grad_enabled():
            z = (keys[:, None] + q).sigmoid_()  # (N, g, L, A); in place: the sum is not kept for backward
            return self.v(z).squeeze(-1).mul_(2.0).view(query.shape[0], L)  # b (doubled) cancels too
        return self._inference_scores(keys, q).view(query.shape[0], L)

    def _inference_scores(self, keys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Without gradients (decoding): the same scores, a few images at a time in one reused
        buffer, with sigmoid(k + q) = 1 / (1 + e^-q / e^k). The exponentials run on the keys
        [N, L, A] (once per keys tensor, kept while it lives and is unchanged) and on the query
        [N, g, A], not on the [N, g, L, A] map, whose elements then cost a division-add and a
        reciprocal: measured 4.5x faster than add + sigmoid at beam-search sizes (100 images x 5
        beams x 196 x 512). Where a key or the query is beyond ``EXP_FORM_BOUND`` the sigmoid runs."""
        N, g, _, A = q.shape
        L = keys.shape[1]
        q = q.to(keys.dtype)  # the map, and the scores, in the keys' dtype (bf16 under autocast)
        exp_k = _exp_keys(keys)
        exp_neg_q = _exp_neg_query(q, exp_k)
        n = min(N, max(1, SCORE_CHUNK_ELEMENTS // (g * L * A)))  # images per chunk
        scores = keys.new_empty(N, g, L)
        z = keys.new_empty(n, g, L, A)
        v = self.v.weight.view(A, 1).to(keys.dtype)
        for i in range(0, N, n):
            j = min(N, i + n)
            zi = _sigmoid_of_sum(keys[i:j, None], q[i:j], exp_k, exp_neg_q, i, z[: j - i])
            torch.mm(zi.view(-1, A), v, out=scores[i:j].view(-1, 1))
        return scores.add_(self.v.bias.to(keys.dtype)).mul_(2.0)  # as the gradient path: 2 (v^T sigmoid + b)


# e^k of each keys tensor in use for decoding, [N, 1, L, A] (None where a key is beyond the bound),
# computed at its first step and dropped with the tensor; a changed tensor (its version) recomputes,
# and so does every call on an inference-mode tensor (it has no version).
_EXP_KEYS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _exp_keys(keys: torch.Tensor) -> torch.Tensor | None:
    if keys.is_inference():  # no version counter to tell a changed tensor: computed at every call
        return _exp_form_keys(keys)
    cached = _EXP_KEYS.get(keys)
    if cached is not None and cached[0] == keys._version:
        return cached[1]
    exp_k = _exp_form_keys(keys)
    _EXP_KEYS[keys] = (keys._version, exp_k)
    return exp_k


def _exp_form_keys(keys: torch.Tensor) -> torch.Tensor | None:
    """e^k as [N, 1, L, A] for keys [N, L, A], or None where a key is beyond ``EXP_FORM_BOUND``."""
    lo, hi = torch.aminmax(keys)
    return keys[:, None].exp() if max(-float(lo), float(hi)) <= EXP_FORM_BOUND else None


def _exp_neg_query(q: torch.Tensor, exp_k: torch.Tensor | None) -> torch.Tensor | None:
    """e^-q where the exponential form applies (e^k exists and q is within the bound), else None."""
    return torch.exp(-q) if exp_k is not None and float(q.abs().amax()) <= EXP_FORM_BOUND else None


def _sigmoid_of_sum(keys, q, exp_k, exp_neg_q, start: int, out: torch.Tensor) -> torch.Tensor:
    """sigmoid(k + q) into ``out`` for images start .. start+n of keys [n, 1, L, A] and q [n, g, 1, A]
    (already sliced); exp_k is every image's, exp_neg_q None for the sigmoid itself."""
    n = keys.shape[0]
    if exp_neg_q is None:
        return torch.add(keys, q, out=out).sigmoid_()
    torch.addcdiv(out.new_ones(()), exp_neg_q[start:start + n], exp_k[start:start + n], out=out)
    return out.reciprocal_()  # 1 / (1 + e^-q / e^k)


class UnrolledAdditiveScore:
    """The additive score over one teacher-forced loop, differentiated by hand (the fused pass of
    captioning/models/decoder.py). Call it at each step on the query U h_{t-1} [n, A] of the first
    n images (the live rows, longest caption first) -> scores [n, L], as ``from_query`` gives.

    Autograd would keep every step's [n, L, A] map z = sigmoid(k + q) and, in backward, write its
    gradient three times (through v, the sigmoid and the add) into fresh memory and add it into the
    keys' gradient; at COCO sizes that was a quarter of the training step, most of it memory
    traffic. Here the map is never kept: every step, forward and backward, computes it a few
    images at a time (``SCORE_CHUNK_ELEMENTS``) in one small buffer that stays in cache. Backward
    recomputes z from what the step kept (q and e^-q, [n, A]), then s = z (1 - z) in place,
    dq = 2 v * (de^T s), and sums de_t s_t over the steps in one buffer that is multiplied by v
    once, after every step's backward (as captioning/models/deferred.py does for weights). The map
    takes the exponential form of ``_inference_scores`` where keys and query lie within
    ``EXP_FORM_BOUND``, the sigmoid otherwise. Same sums, other order: equal to autograd's loss and
    gradients up to float rounding (tests)."""

    def __init__(self, score: AdditiveScore, keys: torch.Tensor) -> None:
        N, L, A = keys.shape
        self.v = score.v
        self.exp_k = _exp_form_keys(keys.detach())  # [N, 1, L, A] or None
        self.chunk = min(N, max(1, SCORE_CHUNK_ELEMENTS // (L * A)))  # images per piece of the map
        self.map = keys.new_empty(self.chunk, L, A)  # z of a few images at a time, then s
        self.acc: torch.Tensor | None = None  # sum_t de_t s_t over the steps, filled by backward
        self.keys = _ShareKeys.apply(keys, self)

    def __call__(self, query: torch.Tensor) -> torch.Tensor:
        return _AdditiveStep.apply(self.keys, query, self.v.weight, self.v.bias, self)

    def pieces(self, keys: torch.Tensor, q: torch.Tensor, exp_neg_q: torch.Tensor | None):
        """For each few images i..j of the first n: (i, j, sigmoid(k + q) [j - i, L, A] in the buffer)."""
        n, A = q.shape
        grouped = None if exp_neg_q is None else exp_neg_q[:, None, None, :]
        for i in range(0, n, self.chunk):
            j = min(n, i + self.chunk)
            z = self.map[: j - i]
            _sigmoid_of_sum(keys[i:j, None], q[i:j, None, None, :], self.exp_k, grouped, i, z.view(j - i, 1, -1, A))
            yield i, j, z


class _ShareKeys(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keys: torch.Tensor, owner: UnrolledAdditiveScore) -> torch.Tensor:
        ctx.owner = owner
        ctx.set_materialize_grads(False)  # the steps return no gradient for it: None, not zeros
        return keys.view_as(keys)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        owner = ctx.owner
        acc, owner.acc = owner.acc, None
        if acc is not None:
            dk = acc.mul_(owner.v.weight.view(-1).to(acc.dtype))  # (N, L, A): times v once
            grad = dk if grad is None else dk + grad
        return grad, None


class _AdditiveStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keys, query, v_weight, v_bias, owner: UnrolledAdditiveScore):
        n, A = query.shape
        q = (query * 2.0).to(keys.dtype).contiguous()  # the keys carry the factor 2 already (``project``)
        exp_neg_q = _exp_neg_query(q, owner.exp_k)  # (n, A): with q, all that backward needs to rebuild z
        ctx.owner, ctx.query_dtype = owner, query.dtype
        ctx.save_for_backward(keys, q, exp_neg_q, v_weight)
        v = v_weight.to(keys.dtype).t()  # (A, 1)
        scores = keys.new_empty(n, keys.shape[1])
        for i, j, z in owner.pieces(keys, q, exp_neg_q):
            torch.mm(z.view(-1, A), v, out=scores[i:j].view(-1, 1))
        return scores.add_(v_bias.to(keys.dtype)).mul_(2.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        keys, q, exp_neg_q, v_weight = ctx.saved_tensors
        owner = ctx.owner
        n, A = q.shape
        de = (grad * 2.0).to(keys.dtype)  # (n, L): the gradient of v^T z
        dv_weight = de.new_zeros(1, A)
        dquery = de.new_empty(n, 1, A)
        if owner.acc is None:  # the first backward to run (the last step's): a buffer for every image
            owner.acc = torch.zeros_like(keys, memory_format=torch.contiguous_format)
        for i, j, z in owner.pieces(keys, q, exp_neg_q):  # z recomputed, piece by piece
            torch.addmm(dv_weight, de[i:j].reshape(1, -1), z.view(-1, A), out=dv_weight)
            s = z.addcmul_(z, z, value=-1.0)  # z (1 - z), in place
            torch.bmm(de[i:j, None, :], s, out=dquery[i:j])
            owner.acc[i:j].addcmul_(s, de[i:j, :, None])
        v = v_weight.view(A).to(keys.dtype)
        dquery = dquery.view(n, A).mul_(v).mul_(2.0).to(ctx.query_dtype)
        return None, dquery, dv_weight.to(v_weight.dtype), de.sum().view(1).to(v_weight.dtype), None


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


class NoAttention(nn.Module):
    """The no-attention control ("Show and Tell" with this decoder): z_t = mean of the real
    annotations at every step, alpha_t uniform over them. It has no f_att and no parameters, so
    the same decoder with the same budget shows what attention itself adds."""

    score = None  # no f_att: the decoder takes its plain teacher-forced loop

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, :, :0]  # (B, L, 0): no image-side projection to keep

    def forward(
        self,
        features: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor,
        h: torch.Tensor,
        mode: str = "expected",
        sample_mask: torch.Tensor | None = None,
    ) -> Attended:
        if mode != "expected":
            raise ValueError(f"attention 'none' has no '{mode}' mode; only hard attention samples")
        valid = mask.to(features.dtype)  # (N, L)
        uniform = valid / valid.sum(1, keepdim=True).clamp_min(1.0)  # 1/L_valid, 0 elsewhere
        alpha = uniform.repeat_interleave(h.shape[0] // mask.shape[0], dim=0)  # (N*g, L)
        return Attended(expected_context(alpha, features), alpha, None, None)


def build_attention(kind: str, score: nn.Module | None) -> nn.Module:
    if kind == "soft":
        return SoftAttention(score)
    if kind == "hard":
        return HardAttention(score)
    if kind == "none":
        return NoAttention()
    raise ValueError(f"unknown attention '{kind}'; choose soft, hard or none")
