"""Speed, as a guest of the paper's maths: the same teacher-forced pass and decoding scores as
captioning/models/, rearranged to run faster (``model.decoder.fast``, on by default).

Nothing in captioning/models/ imports this file. It is attached from outside, once, where the
work is set up: the training module takes ``training_pass(model)`` for its teacher-forced pass
(captioning/training/module.py), and a search takes ``decoding_step(model.decoder)`` for its
steps (captioning/decoding.py). Each gives the fast form only for modules it knows
exactly (``supports``: type equality, not isinstance) and otherwise says so in one log line and
leaves the reference maths to run: a subclass that overrides a forward, a new score function or
the no-attention control runs its own code. tests/test_models.py holds the fast forms to the
reference: the same loss, the same gradients up to float rounding, the same dropout masks, under
fp32 and bf16 autocast. What each trick buys is measured in docs/performance.md.

1. **Live rows, packed.** Captions run longest first and step t computes only the rows still
   inside their caption; padded steps are skipped, not computed and masked, and the output layer
   runs on the real tokens only. The LSTM's product with the word embedding runs once for all
   real tokens; every product of h_{t-1} (attention query U h, gate f_beta h, LSTM W_hh h) is one
   matrix product per step.
2. **The additive score differentiated by hand** (``UnrolledAdditiveScore``) a few images at a
   time in one reused buffer, with tanh written through the sigmoid: v^T tanh(x) + b =
   2 (v^T sigmoid(2x) + b) - sum(v) - b, a per-row constant that the softmax over locations cancels.

Without gradients (greedy and beam decoding), the search's scores come from ``inference_scores``:

3. **The additive map through exponentials of the keys**: sigmoid(k + q) = 1 / (1 + e^-q / e^k),
   with e^k computed once per keys tensor (kept while the tensor lives and is unchanged) and e^-q
   once per step on the [B, A] query, so the [N, g, L, A] map costs a division-add and a
   reciprocal per element, a few images at a time in one buffer.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from captioning.models.attention import (AdditiveScore, BilinearScore, DotScore, HardAttention, ScaledDotScore,
                                         SoftAttention, grouped)
from captioning.models.captioner import ShowAttendTell
from captioning.models.decoder import Decoder, DecoderOutput, StepOutput
from captioning.vocab import Vocabulary

log = logging.getLogger(__name__)

# The additive score's [g, L, A] map is computed for this many elements at a time in one reused
# buffer, which then stays in cache instead of streaming a [B, L, A] tensor through memory.
SCORE_CHUNK_ELEMENTS = 2**20
# Inference: the exponential form runs while every key and query lies within this bound (then e^k
# and e^-q are normal floats and the result is exact to a few ulps); beyond it the sigmoid runs.
EXP_FORM_BOUND = 80.0

_MECHANISMS = (SoftAttention, HardAttention)
_SCORES = (AdditiveScore, DotScore, ScaledDotScore, BilinearScore)


def unknown_modules(decoder: nn.Module) -> list[str]:
    """The modules of ``decoder`` the fused training pass re-arranges but does not know exactly
    (their type names); empty where it runs."""
    if type(decoder) is not Decoder:
        return [type(decoder).__name__]
    parts = {"decoder.attention": decoder.attention, "decoder.lstm": decoder.lstm, "decoder.dropout": decoder.dropout,
             "decoder.L_h": decoder.L_h, "decoder.L_z": decoder.L_z, "decoder.L_o": decoder.L_o}
    known = {"decoder.attention": _MECHANISMS, "decoder.lstm": (nn.LSTMCell,), "decoder.dropout": (nn.Dropout,)}
    if decoder.gate is not None:
        parts["decoder.gate"] = decoder.gate
    if type(decoder.attention) in _MECHANISMS:
        parts["decoder.attention.score"], known["decoder.attention.score"] = decoder.attention.score, _SCORES
    return [f"{name} ({type(module).__name__})" for name, module in parts.items()
            if type(module) not in known.get(name, (nn.Linear,))]


def supports(decoder: nn.Module) -> bool:
    """True where every module the fused training pass re-arranges is exactly one it knows."""
    return not unknown_modules(decoder)


def supports_inference(decoder: nn.Module) -> bool:
    """True where decoding's additive score can take ``inference_scores``."""
    return (type(decoder) is Decoder and type(decoder.attention) in _MECHANISMS
            and type(decoder.attention.score) is AdditiveScore)


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    log.warning(message)


class FusedTrainingPass:
    """``model``'s teacher-forced pass with gradients, fused: called as the model is
    (``ShowAttendTell.forward``'s arguments) -> DecoderOutput with ``token_nll`` instead of logits.
    ``additive_by_hand=False`` leaves trick 2 out (autograd's way, to measure what it buys)."""

    def __init__(self, model: ShowAttendTell, additive_by_hand: bool = True) -> None:
        self.model, self.additive_by_hand = model, additive_by_hand

    def __call__(self, images: torch.Tensor, captions: torch.Tensor, *, image_mask: torch.Tensor | None = None,
                 mode: str = "expected", sample_mask: torch.Tensor | None = None) -> DecoderOutput:
        x = self.model.teacher_forcing(images, captions, image_mask=image_mask, sample_mask=sample_mask)
        return teacher_forced(self.model.decoder, captions, features=x.features, mask=x.mask, keys=x.keys,
                              rows=x.rows, mode=mode, sample_mask=x.sample_mask, additive_by_hand=self.additive_by_hand)


def training_pass(model: ShowAttendTell) -> FusedTrainingPass | None:
    """The fused pass for ``model``, or None (the model's own loop runs) where the pass does not
    know one of its modules: that is said once, in a log line naming them."""
    unknown = unknown_modules(model.decoder)
    if unknown:
        _say_once(f"fast path: training runs the reference loop of captioning/models/decoder.py: the fused pass "
                  f"does not know {', '.join(unknown)}")
        return None
    return FusedTrainingPass(model)


def decoding_step(decoder: Decoder):
    """``decoder.step`` for a search's steps with f_att's scores in trick 3's form, or None (the
    decoder's own step runs) where the decoder's score is not the additive one this file knows; a
    mechanism with a score it does not know is said once, in a log line."""
    if not supports_inference(decoder):
        score = getattr(decoder.attention, "score", None)
        if score is not None and type(score) not in _SCORES:
            _say_once(f"fast path: decoding computes the scores of {type(score).__name__} by its own forward")
        return None

    def step(prev_words, state, features, keys, mask, *, mode="expected", sample_mask=None) -> StepOutput:
        emb = decoder.embedding(prev_words)  # (B, m)
        scores = inference_scores(decoder.attention.score, keys, state.h)  # (B, L)
        attended = decoder.attention.attend(features, mask, scores, mode=mode, sample_mask=sample_mask)
        state, attended = decoder.lstm_step(emb, state, decoder.gated(state.h, attended))
        return StepOutput(decoder.deep_output(emb, state.h, attended.context), state, attended)

    return step


def teacher_forced(decoder: Decoder, captions: torch.Tensor, *, features: torch.Tensor, mask: torch.Tensor,
                   keys: torch.Tensor, rows: torch.Tensor | None, mode: str = "expected",
                   sample_mask: torch.Tensor | None = None, logits: bool = False,
                   additive_by_hand: bool = True) -> DecoderOutput:
    """``Decoder.forward``'s teacher-forced pass, fused, from the per-image inputs (features, mask
    and keys [N, ...], ``rows`` [B] the image of each caption or None) -> DecoderOutput with zeros
    at padded steps: ``token_nll`` [B, T], or with ``logits`` the logits [B, T, V]. The additive
    score runs by hand (trick 2) unless ``additive_by_hand`` is False."""
    state = decoder.init_state(features, mask)  # (N, n): once per image
    emb = decoder.embedding(captions[:, :-1])  # (B, T, m)
    B, T, m = emb.shape
    lengths = (captions[:, 1:] != Vocabulary.pad_id).sum(1)  # real target tokens per caption
    live = (lengths[:, None] > torch.arange(T, device=lengths.device)).sum(0).tolist()  # rows per step
    in_order = rows is None and bool((lengths[1:] <= lengths[:-1]).all())  # already longest first
    h, c = state.h, state.c
    unsort = None
    if not in_order:
        order = lengths.argsort(descending=True, stable=True)
        unsort = order.argsort()  # caption order from longest-first order
        image = order if rows is None else rows[order]
        features, mask, keys = features[image], mask[image], keys[image]
        h, c = h[image], c[image]
        if sample_mask is not None:
            sample_mask = sample_mask[order]
    full_mask = mask
    lstm, score, gate = decoder.lstm, decoder.attention.score, decoder.gate
    of_e, of_z = lstm.weight_ih.split([m, lstm.weight_ih.shape[1] - m], dim=1)  # W_ih = [W_e W_z]
    # The real tokens packed step-major: step t's n_t live rows (longest first), then step t+1's.
    # index[r]: packed row r's place in the [B*T] batch, caption order. Built on the CPU from the
    # counts, then moved: no device sync and no launch per step.
    steps = sum(1 for n in live if n)
    row = torch.cat([torch.arange(n) for n in live[:steps]]).to(emb.device)
    step = torch.repeat_interleave(torch.arange(steps), torch.tensor(live[:steps])).to(emb.device)
    index = (row if in_order else order[row]) * T + step
    packed_emb = emb.reshape(B * T, m)[index]  # (R, m)
    # One product for all real tokens, then a view per step: backward writes one [R, 4n] gradient.
    pre = F.linear(packed_emb, of_e, lstm.bias_ih + lstm.bias_hh).split(live[:steps])  # steps x (n_t, 4n)
    query_weight = None if type(score) is BilinearScore else score.U.weight  # Bilinear's query is h
    h_weights = [w for w in (query_weight, None if gate is None else gate.weight) if w is not None]
    splits = [w.shape[0] for w in h_weights] + [lstm.weight_hh.shape[0]]
    of_h = torch.cat([*h_weights, lstm.weight_hh])  # every product of h_{t-1}
    # scores_of(keys_t, query_t) [n_t, L] at each step (keys_t: the first n_t images of keys)
    by_hand = additive_by_hand and type(score) is AdditiveScore
    scores_of = UnrolledAdditiveScore(score, keys) if by_hand else score.from_query
    hs, zs, alphas, log_probs = [], [], [], []
    for t in range(steps):
        n = live[t]
        if n < h.shape[0]:  # captions ended: drop their rows (sliced once, not at every step)
            h, c, features, mask, keys = h[:n], c[:n], features[:n], mask[:n], keys[:n]
            sample_mask = None if sample_mask is None else sample_mask[:n]
        parts = list(F.linear(h, of_h).split(splits, dim=1))
        recurrent = parts.pop()  # W_hh h
        query = parts.pop(0) if query_weight is not None else h
        attended = decoder.attention.attend(features, mask, scores_of(keys, query), mode=mode, sample_mask=sample_mask)
        z = attended.context
        if gate is not None:
            z = torch.sigmoid(parts.pop(0) + gate.bias) * z  # beta_t z_t
        gates = pre[t] + recurrent + F.linear(z, of_z)
        i, f, g, o = gates.chunk(4, dim=1)  # nn.LSTMCell's gate order
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
        zs.append(z)
        alphas.append(attended.alpha)
        if attended.log_prob is not None:
            log_probs.append(attended.log_prob)

    def stack(parts: list[torch.Tensor]) -> torch.Tensor:  # (B, T, ...) 0 past the end
        padded = [F.pad(p, (0, 0) * (p.dim() - 1) + (0, B - p.shape[0])) for p in parts]
        padded += [padded[0].new_zeros(padded[0].shape)] * (T - len(padded))
        return torch.stack(padded, 1)

    def caption_order(x: torch.Tensor) -> torch.Tensor:  # from longest-first order
        return x if unsort is None else x[unsort]

    log_p = caption_order(stack([lp[:, None] for lp in log_probs]).squeeze(-1)) if log_probs else None
    alphas, full_mask = caption_order(stack(alphas)), caption_order(full_mask)
    if not logits:
        token_nll = _packed_nll(decoder, packed_emb, torch.cat(hs), torch.cat(zs), index, captions)
        return DecoderOutput(None, alphas, log_p, full_mask, token_nll)
    return DecoderOutput(decoder.deep_output(emb, caption_order(stack(hs)), caption_order(stack(zs))), alphas, log_p,
                         full_mask)


def _packed_nll(decoder, emb, h, z, index, captions) -> torch.Tensor:
    """The deep output and NLL on the real tokens only -> token_nll [B, T] (0 at padding).

    emb, h, z: [R, ...], the real tokens packed; ``index`` [R]: their places in the [B*T] batch
    (caption order). The dropout mask is drawn for the padded [B, T, m] batch, as the reference
    loop draws it (the same random numbers, so the same masks), and the packed rows taken from it."""
    B, T = captions.shape[0], captions.shape[1] - 1
    x = decoder.readout(emb, h, z)  # (R, m)
    if decoder.dropout.training and decoder.dropout.p > 0:
        p = decoder.dropout.p
        noise = torch.empty((B * T, x.shape[1]), dtype=x.dtype, device=x.device).bernoulli_(1 - p).div_(1 - p)
        x = x * noise[index]
    nll = F.cross_entropy(decoder.L_o(x).float(), captions[:, 1:].reshape(-1)[index], reduction="none")  # (R,)
    return nll.new_zeros(B * T).index_copy(0, index, nll).view(B, T)


# ----------------------------------------------------------------------------- the additive score


class UnrolledAdditiveScore:
    """The additive score over one teacher-forced loop, differentiated by hand. Call it at each
    step with (keys, U h_{t-1}) of the first n images (the live rows) -> scores [n, L] equal to
    ``AdditiveScore.from_query``'s up to a per-row constant (module docstring, trick 2).

    Autograd would keep every step's [n, L, A] map and, in backward, write its gradient three times
    (through v, the nonlinearity and the add) into fresh memory. Here the map is never kept: every
    step, forward and backward, computes it a few images at a time (``SCORE_CHUNK_ELEMENTS``) in
    one small buffer. Backward recomputes z = sigmoid(2k + 2q) from what the step kept (q, [n, A]),
    then s = z (1 - z) in place, dq = 2 v * (de^T s), and sums de_t s_t over the steps in
    one buffer multiplied by v once, after every step's backward."""

    def __init__(self, score: AdditiveScore, keys: torch.Tensor) -> None:
        N, L, A = keys.shape
        self.v = score.v
        self.chunk = min(N, max(1, SCORE_CHUNK_ELEMENTS // (L * A)))  # images per piece of the map
        self.map = keys.new_empty(self.chunk, L, A)  # z of a few images at a time, then s
        self.acc: torch.Tensor | None = None  # sum_t de_t s_t over the steps, filled by backward
        self.keys = _ShareKeys.apply(keys * 2.0, self)  # tanh(x) = 2 sigmoid(2x) - 1

    def __call__(self, keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return _AdditiveStep.apply(self.keys, query, self.v.weight, self.v.bias, self)

    def pieces(self, keys: torch.Tensor, q: torch.Tensor):
        """For each few images i..j of the first n: (i, j, sigmoid(k + q) [j - i, L, A] in the buffer)."""
        n, A = q.shape
        for i in range(0, n, self.chunk):
            j = min(n, i + self.chunk)
            z = self.map[: j - i]
            torch.add(keys[i:j], q[i:j, None, :], out=z).sigmoid_()
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
        q = (query * 2.0).to(keys.dtype).contiguous()  # the keys carry the factor 2 already
        ctx.owner, ctx.query_dtype = owner, query.dtype
        ctx.save_for_backward(keys, q, v_weight)  # with q [n, A], backward rebuilds z
        v = v_weight.to(keys.dtype).t()  # (A, 1)
        scores = keys.new_empty(n, keys.shape[1])
        for i, j, z in owner.pieces(keys, q):
            torch.mm(z.view(-1, A), v, out=scores[i:j].view(-1, 1))
        return scores.add_(v_bias.to(keys.dtype)).mul_(2.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        keys, q, v_weight = ctx.saved_tensors
        owner = ctx.owner
        n, A = q.shape
        de = (grad * 2.0).to(keys.dtype)  # (n, L): the gradient of v^T z
        dv_weight = de.new_zeros(1, A)
        dquery = de.new_empty(n, 1, A)
        if owner.acc is None:  # the first backward to run (the last step's): a buffer for every image
            owner.acc = torch.zeros_like(keys, memory_format=torch.contiguous_format)
        for i, j, z in owner.pieces(keys, q):  # z recomputed, piece by piece
            torch.addmm(dv_weight, de[i:j].reshape(1, -1), z.view(-1, A), out=dv_weight)
            s = z.addcmul_(z, z, value=-1.0)  # z (1 - z), in place
            torch.bmm(de[i:j, None, :], s, out=dquery[i:j])
            owner.acc[i:j].addcmul_(s, de[i:j, :, None])
        v = v_weight.view(A).to(keys.dtype)
        dquery = dquery.view(n, A).mul_(v).mul_(2.0).to(ctx.query_dtype)
        return None, dquery, dv_weight.to(v_weight.dtype), de.sum().view(1).to(v_weight.dtype), None




# ----------------------------------------------------------------------------- the additive score, decoding


def inference_scores(score: AdditiveScore, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``score(keys, h)`` without gradients, up to a per-row constant (trick 3): keys [N, L, A],
    h [N*g, n] -> [N*g, L]."""
    N, L, A = keys.shape
    # An inference tensor (Lightning's validation) has no version counter to cache by.
    exp_k = _exp_form_keys(keys * 2.0) if keys.is_inference() else _cached_exp_keys(keys)
    q = grouped(score.U(h).to(keys.dtype) * 2.0, N)[:, :, None, :]  # (N, g, 1, A)
    g = q.shape[1]
    exp_neg_q = torch.exp(-q) if exp_k is not None and float(q.abs().amax()) <= EXP_FORM_BOUND else None
    n = min(N, max(1, SCORE_CHUNK_ELEMENTS // (g * L * A)))  # images per chunk
    scores = keys.new_empty(N, g, L)
    z = keys.new_empty(n, g, L, A)
    v = score.v.weight.view(A, 1).to(keys.dtype)
    for i in range(0, N, n):
        j = min(N, i + n)
        zi = z[: j - i]
        if exp_neg_q is None:
            torch.add(q[i:j], keys[i:j, None], alpha=2.0, out=zi).sigmoid_()
        else:
            torch.addcdiv(zi.new_ones(()), exp_neg_q[i:j], exp_k[i:j], out=zi).reciprocal_()  # 1 / (1 + e^-q / e^k)
        torch.mm(zi.view(-1, A), v, out=scores[i:j].view(-1, 1))
    return scores.add_(score.v.bias.to(keys.dtype)).mul_(2.0).view(N * g, L)


# e^(2k) of each keys tensor in use for decoding, [N, 1, L, A] (None where a key is beyond the
# bound), computed at its first step and dropped with the tensor; a changed tensor recomputes.
_EXP_KEYS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _cached_exp_keys(keys: torch.Tensor) -> torch.Tensor | None:
    cached = _EXP_KEYS.get(keys)
    if cached is not None and cached[0] == keys._version:
        return cached[1]
    exp_k = _exp_form_keys(keys * 2.0)
    _EXP_KEYS[keys] = (keys._version, exp_k)
    return exp_k


def _exp_form_keys(keys: torch.Tensor) -> torch.Tensor | None:
    """e^k as [N, 1, L, A] for keys [N, L, A], or None where a key is beyond ``EXP_FORM_BOUND``."""
    lo, hi = torch.aminmax(keys)
    return keys[:, None].exp() if max(-float(lo), float(hi)) <= EXP_FORM_BOUND else None
