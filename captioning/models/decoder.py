"""The LSTM decoder of Sec. 3.1.2: one word per step, attending over the annotations each time.

    h_0, c_0      = tanh(f_init,h(mean a)), tanh(f_init,c(mean a))
    alpha_t, z_t  = attention(a, h_{t-1});   z_t <- beta_t * z_t,  beta_t = sigmoid(f_beta(h_{t-1}))
    h_t, c_t      = LSTM([E y_{t-1}; z_t], h_{t-1}, c_t-1)
    p(y_t)        ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t))          (deep output, Eq. 7)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from captioning.config import DecoderConfig
from captioning.models.attention import AdditiveScore, Attended, UnrolledAdditiveScore, build_attention, build_score
from captioning.models.deferred import SharedWeight
from captioning.vocab import Vocabulary


class DecoderState(NamedTuple):
    h: torch.Tensor  # [B, n]
    c: torch.Tensor  # [B, n]


class StepOutput(NamedTuple):
    logits: torch.Tensor  # [B, V]
    state: DecoderState
    attended: Attended  # context here is the gated z_t


class DecoderOutput(NamedTuple):
    """At padded steps (targets == <pad>) the values are not the model's: alphas and log_probs are
    0 there and the logits arbitrary (the fused pass does not run those steps); losses mask them."""

    logits: torch.Tensor  # [B, T, V] for targets captions[:, 1:]
    alphas: torch.Tensor  # [B, T, L]
    log_probs: torch.Tensor | None  # [B, T] log p(s_t) of sampled locations (hard, "sample"/"argmax")
    mask: torch.Tensor  # [B, L] bool, the real annotation locations


class _PaddedOutput(torch.autograd.Function):
    """x [N, m] -> x W^T + b [N, V], the forward product taken with W and b padded by zero rows to a
    multiple of 8 words (then the first V columns, copied out contiguous): at COCO's 9,490 words
    the unpadded product ran at 2/3 of the padded one's speed on the project's CPU (MKL), and GPUs'
    matrix units want multiples of 8 too. The gradients are taken unpadded (those products run at
    full speed either way), so no zero-filled padded gradient is ever made. Same values."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        V = weight.shape[0]
        pad = -V % 8
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x = x.to(dtype)
        ctx.save_for_backward(x, weight)
        with torch.autocast(device, enabled=False):
            w, b = F.pad(weight.to(dtype), (0, 0, 0, pad)), F.pad(bias.to(dtype), (0, pad))
            return torch.addmm(b, x, w.t())[:, :V].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)
        dx = grad.mm(weight.to(x.dtype)) if ctx.needs_input_grad[0] else None
        dw = grad.t().mm(x).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = grad.sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, vocab_size: int, feature_dim: int, attention: str) -> None:
        super().__init__()
        m, n, D = cfg.embed_dim, cfg.hidden_dim, feature_dim
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, m)
        self.init_h = nn.Linear(D, n)
        self.init_c = nn.Linear(D, n)
        self.attention = build_attention(attention, build_score(cfg.score, D, n, cfg.attention_dim))
        # Sec. 4.2.1: a SCALAR gate beta_t; "vector" (one gate per channel) is a common variant.
        self.gate = {"scalar": nn.Linear(n, 1), "vector": nn.Linear(n, D), "none": None}[cfg.gate]
        self.lstm = nn.LSTMCell(m + D, n)
        # Deep output (Eq. 7). The paper writes no nonlinearity inside L_o(...); the authors' code
        # adds a tanh. We follow the paper.
        self.L_h = nn.Linear(n, m)
        self.L_z = nn.Linear(D, m)
        self.L_o = nn.Linear(m, vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)
        # Teacher forcing with gradients takes _fused_pass; captioning/perf/compile.py turns it
        # off (the compiled paths are the plain loop's).
        self.fused = True

    # -- per image --------------------------------------------------------------------------
    def init_state(self, features: torch.Tensor, mask: torch.Tensor) -> DecoderState:
        """features [B, L, D], mask [B, L] -> h_0, c_0 from the mean of the real annotations."""
        weights = mask.to(features.dtype)[:, None, :]  # (B, 1, L)
        mean = torch.bmm(weights, features).squeeze(1) / weights.sum(2).clamp_min(1.0)  # (B, D)
        return DecoderState(torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The image-side attention projection, computed once per image: [B, L, D] -> [B, L, K]."""
        return self.attention.project(features)

    # -- per step ---------------------------------------------------------------------------
    def step(
        self,
        prev_words: torch.Tensor,
        state: DecoderState,
        features: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor,
        mode: str = "expected",
        sample_mask: torch.Tensor | None = None,
    ) -> StepOutput:
        """One word: prev_words [B] long -> logits [B, V] for the next word."""
        emb = self.embedding(prev_words)  # (B, m)
        attended = self._attend(state.h, features, keys, mask, mode, sample_mask)
        h, c = self.lstm(torch.cat([emb, attended.context], dim=1), state)  # (B, n)
        logits = self.L_o(self.dropout(emb + self.L_h(h) + self.L_z(attended.context)))  # (B, V)
        return StepOutput(logits, DecoderState(h, c), attended)

    def _attend(self, h, features, keys, mask, mode, sample_mask) -> Attended:
        attended = self.attention(features, keys, mask, h, mode, sample_mask)
        if self.gate is None:
            return attended
        beta = torch.sigmoid(self.gate(h))  # (B, 1) scalar gate or (B, D) vector gate
        return attended._replace(context=beta * attended.context)

    # -- teacher forcing --------------------------------------------------------------------
    def forward(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        captions: torch.Tensor,
        mode: str = "expected",
        sample_mask: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Teacher-forced pass. captions [B, T+1] = <start> w_1 ... <end> <pad>...; predicts
        captions[:, 1:]; padding is masked in the loss. ``sample_mask``: [B], per caption.

        ``rows`` [B] long: caption b belongs to image ``rows[b]`` of ``features`` / ``mask`` /
        ``keys`` [N, ...] (several captions per image share the image's projection ``W a`` and
        ``h_0, c_0``, computed once per image). None: one image per caption, in order.
        """
        if keys is None:  # the caller may pass project(features), computed once per image
            keys = self.project(features)  # (N, L, K)
        state = self.init_state(features, mask)  # (N, n): once per image
        emb = self.embedding(captions[:, :-1])  # (B, T, m)
        if self.fused and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._fused_pass(features, mask, keys, state, rows, emb, captions, mode, sample_mask)
        if rows is None:
            rows = torch.arange(captions.shape[0], device=captions.device)
        features, mask, keys = features[rows], mask[rows], keys[rows]
        state = DecoderState(state.h[rows], state.c[rows])
        hs, zs, alphas, log_probs = [], [], [], []
        for t in range(emb.shape[1]):
            attended = self._attend(state.h, features, keys, mask, mode, sample_mask)
            state = DecoderState(*self.lstm(torch.cat([emb[:, t], attended.context], dim=1), state))
            hs.append(state.h)
            zs.append(attended.context)
            alphas.append(attended.alpha)
            if attended.log_prob is not None:
                log_probs.append(attended.log_prob)
        h_all, z_all = torch.stack(hs, 1), torch.stack(zs, 1)  # (B, T, n), (B, T, D)
        log_p = torch.stack(log_probs, 1) if log_probs else None
        return DecoderOutput(self._output(emb, h_all, z_all), torch.stack(alphas, 1), log_p, mask)

    def _output(self, emb: torch.Tensor, h_all: torch.Tensor, z_all: torch.Tensor) -> torch.Tensor:
        """The output layer does not feed back, so it runs once on all steps (one large matmul);
        its forward product runs with the vocabulary padded to a multiple of 8 words
        (``_PaddedOutput``)."""
        x = self.dropout(emb + self.L_h(h_all) + self.L_z(z_all))
        if -self.L_o.out_features % 8 == 0 or torch.compiler.is_compiling():
            return self.L_o(x)  # (B, T, V)
        logits = _PaddedOutput.apply(x.reshape(-1, x.shape[-1]), self.L_o.weight, self.L_o.bias)
        return logits.view(*x.shape[:-1], -1)  # (B, T, V)

    def _fused_pass(self, features, mask, keys, state, rows, emb, captions, mode, sample_mask) -> DecoderOutput:
        """The teacher-forced loop arranged for speed; the same maths as the loop in ``forward``
        (the reference, used when compiling and without gradients; a test holds them equal):

        * captions run longest first and step t computes only the rows still inside their
          caption (padded steps are skipped, not computed and masked); a batch that comes longest
          first with one caption per image (``collate_train`` sorts it so) is used as it is, with
          no copy of its grids into another order and none of the outputs back;
        * the LSTM's input product with the word embedding (``W_ih[:, :m] E y``) runs once for
          all steps; every product of h_{t-1} (attention query U h, gate f_beta h, LSTM W_hh h)
          is one matrix product per step, and z_t's (W_ih[:, m:] z) another;
        * the weights of those per-step products get their gradients once, over all steps
          (captioning/models/deferred.py), not step by step;
        * the additive score's map is differentiated by hand in reused buffers
          (``UnrolledAdditiveScore``), its keys' gradient summed over the steps in one buffer.
        """
        B, T, m = emb.shape
        lengths = (captions[:, 1:] != Vocabulary.pad_id).sum(1)  # real target tokens per caption
        live = (lengths[:, None] > torch.arange(T, device=lengths.device)).sum(0).tolist()  # rows per step
        in_order = rows is None and bool((lengths[1:] <= lengths[:-1]).all())  # already longest first
        h, c = state.h, state.c
        if in_order:
            unsort = None
        else:
            order = lengths.argsort(descending=True, stable=True)
            unsort = order.argsort()  # caption order from longest-first order
            image = order if rows is None else rows[order]
            features, mask, keys = features[image], mask[image], keys[image]
            h, c = h[image], c[image]
            if sample_mask is not None:
                sample_mask = sample_mask[order]
        full_mask = mask
        lstm, score = self.lstm, self.attention.score
        of_e, of_z = lstm.weight_ih.split([m, lstm.weight_ih.shape[1] - m], dim=1)  # W_ih = [W_e W_z]
        # Step-major, one tensor per step: a slice of a [B, T, 4n] tensor would cost backward a
        # zero-filled [B, T, 4n] gradient at every step.
        sorted_emb = emb if in_order else emb[order]
        pre = F.linear(sorted_emb.transpose(0, 1), of_e, lstm.bias_ih + lstm.bias_hh).unbind(0)  # T x (B, 4n)
        h_weights = [w for w in (score.query_weight, None if self.gate is None else self.gate.weight) if w is not None]
        splits = [w.shape[0] for w in h_weights] + [lstm.weight_hh.shape[0]]
        of_h = SharedWeight(torch.cat([*h_weights, lstm.weight_hh]))  # every product of h_{t-1}
        of_z = SharedWeight(of_z)
        unrolled = UnrolledAdditiveScore(score, keys) if isinstance(score, AdditiveScore) else None
        hs, zs, alphas, log_probs = [], [], [], []
        for t in range(T):
            n = live[t]
            if n == 0:
                break
            if n < h.shape[0]:  # captions ended: drop their rows (sliced once, not at every step)
                h, c, features, mask, keys = h[:n], c[:n], features[:n], mask[:n], keys[:n]
                sample_mask = None if sample_mask is None else sample_mask[:n]
            parts = list(of_h(h).split(splits, dim=1))
            recurrent = parts.pop()  # W_hh h
            query = parts.pop(0) if score.query_weight is not None else h
            scores = unrolled(query) if unrolled is not None else score.from_query(keys, query)
            attended = self.attention.attend(features, mask, scores, mode, sample_mask)
            z = attended.context
            if self.gate is not None:
                z = torch.sigmoid(parts.pop(0) + self.gate.bias) * z
            gates = pre[t][:n] + recurrent + of_z(z)
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

        log_p = None
        if log_probs:
            log_p = caption_order(stack([lp[:, None] for lp in log_probs]).squeeze(-1))
        logits = self._output(emb, caption_order(stack(hs)), caption_order(stack(zs)))
        return DecoderOutput(logits, caption_order(stack(alphas)), log_p, caption_order(full_mask))
