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
from captioning.losses import per_token_nll
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
    """At padded steps (targets == <pad>) the values are not the model's: alphas, log_probs and
    token_nll are 0 there and the logits arbitrary (the fused pass does not run those steps);
    losses mask them. A pass asked for ``return_logits=False`` gives token_nll and no logits."""

    logits: torch.Tensor | None  # [B, T, V] for targets captions[:, 1:]; None with return_logits=False
    alphas: torch.Tensor  # [B, T, L]
    log_probs: torch.Tensor | None  # [B, T] log p(s_t) of sampled locations (hard, "sample"/"argmax")
    mask: torch.Tensor  # [B, L] bool, the real annotation locations
    token_nll: torch.Tensor | None = None  # [B, T] -log p(captions[:, 1:]) (return_logits=False)


def _padded_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, m] -> (x in the autocast dtype, x W^T + b as [N, V + pad]): the product taken with W
    and b padded by zero rows to a multiple of 8 words. At COCO's 9,490 words the unpadded product
    ran at 2/3 of the padded one's speed on the project's CPU (MKL), and GPUs' matrix units want
    multiples of 8 too. The first V columns are the logits (no copy of W where V is a multiple of 8)."""
    pad = -weight.shape[0] % 8
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x = x.to(dtype)
    with torch.autocast(device, enabled=False):
        w, b = weight.to(dtype), bias.to(dtype)
        if pad:  # cat, not F.pad: F.pad zero-fills the whole [V + pad, m] result before copying W into it
            w = torch.cat([w, w.new_zeros(pad, w.shape[1])])
            b = torch.cat([b, b.new_zeros(pad)])
        return x, torch.addmm(b, x, w.t())


class _PaddedOutput(torch.autograd.Function):
    """x [N, m] -> x W^T + b [N, V] with the forward product padded (``_padded_logits``), then the
    first V columns copied out contiguous. The gradients are taken unpadded (those products run at
    full speed either way), so no zero-filled padded gradient is ever made. Same values."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x, logits = _padded_logits(x, weight, bias)
        ctx.save_for_backward(x, weight)
        return logits[:, : weight.shape[0]].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)
        dx = grad.mm(weight.to(x.dtype)) if ctx.needs_input_grad[0] else None
        dw = grad.t().mm(x).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = grad.sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db


# On the CPU the output NLL's elementwise work runs on this many logits at a time (1 MiB of fp32),
# so that its temporaries stay in cache instead of streaming [N, V] tensors through memory. On a
# GPU it runs on all rows at once (chunks would only add kernel launches).
NLL_CHUNK_ELEMENTS = 2**18


def _nll_chunk_rows(x: torch.Tensor, vocab_size: int) -> int:
    return max(1, NLL_CHUNK_ELEMENTS // vocab_size) if x.device.type == "cpu" else max(1, x.shape[0])


class _OutputNLL(torch.autograd.Function):
    """x [N, m], targets [N] -> -log softmax(x W^T + b)[targets] [N] in fp32: the output layer and
    the cross-entropy in one, as the fused training pass uses it (rows = real tokens only).

    Against ``_PaddedOutput`` + ``F.cross_entropy`` it makes no contiguous copy of the logits, no
    [N, V] log-softmax, no zero-filled [N, V] gradient to scatter into: forward keeps the padded
    logits and log-sum-exp per row; backward writes (softmax - onehot) * g a few rows at a time
    (``NLL_CHUNK_ELEMENTS``, on the CPU) into one [N, V] buffer, then takes the three products
    unpadded. Same values up to float rounding (tests)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x, logits = _padded_logits(x, weight, bias)
        V = weight.shape[0]
        rows = _nll_chunk_rows(x, V)
        lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for i in range(0, x.shape[0], rows):
            torch.logsumexp(logits[i:i + rows, :V].float(), dim=1, out=lse[i:i + rows])
        picked = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(x, weight, logits, lse, targets)
        return lse - picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, logits, lse, targets = ctx.saved_tensors
        V = weight.shape[0]
        rows = _nll_chunk_rows(x, V)
        d = logits.new_empty(x.shape[0], V)  # d loss / d logits
        db = torch.zeros(V, dtype=torch.float32, device=x.device)
        g = grad.float()
        for i in range(0, x.shape[0], rows):
            j = min(x.shape[0], i + rows)
            p = torch.exp(logits[i:j, :V].float() - lse[i:j, None]).mul_(g[i:j, None])  # softmax * g
            p[torch.arange(j - i, device=p.device), targets[i:j]] -= g[i:j]  # - onehot * g
            db += p.sum(0)
            d[i:j] = p
        dx = d.mm(weight.to(d.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = d.t().mm(x).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, db.to(weight.dtype) if ctx.needs_input_grad[2] else None, None


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, vocab_size: int, feature_dim: int, attention: str) -> None:
        super().__init__()
        m, n, D = cfg.embed_dim, cfg.hidden_dim, feature_dim
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, m)
        self.init_h = nn.Linear(D, n)
        self.init_c = nn.Linear(D, n)
        # attention "none" (the control) builds no f_att: its context is the mean annotation.
        score = None if attention == "none" else build_score(cfg.score, D, n, cfg.attention_dim)
        self.attention = build_attention(attention, score)
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
        return_logits: bool = True,
    ) -> DecoderOutput:
        """Teacher-forced pass. captions [B, T+1] = <start> w_1 ... <end> <pad>...; predicts
        captions[:, 1:]; padding is masked in the loss. ``sample_mask``: [B], per caption.

        ``rows`` [B] long: caption b belongs to image ``rows[b]`` of ``features`` / ``mask`` /
        ``keys`` [N, ...] (several captions per image share the image's projection ``W a`` and
        ``h_0, c_0``, computed once per image). None: one image per caption, in order.

        ``return_logits=False`` (training: all a loss needs): the output carries ``token_nll``
        [B, T], the NLL of each target word, instead of the [B, T, V] logits; with gradients the
        fused pass then runs the output layer on the real tokens only, fused with the
        cross-entropy (``_OutputNLL``), and never forms the logits.
        """
        if keys is None:  # the caller may pass project(features), computed once per image
            keys = self.project(features)  # (N, L, K)
        state = self.init_state(features, mask)  # (N, n): once per image
        emb = self.embedding(captions[:, :-1])  # (B, T, m)
        fused = self.fused and self.attention.score is not None  # the control has no f_att to fuse
        if fused and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._fused_pass(features, mask, keys, state, rows, emb, captions, mode, sample_mask, return_logits)
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
        logits, alpha_all = self._output(emb, h_all, z_all), torch.stack(alphas, 1)
        if return_logits:
            return DecoderOutput(logits, alpha_all, log_p, mask)
        return DecoderOutput(None, alpha_all, log_p, mask, per_token_nll(logits, captions[:, 1:], Vocabulary.pad_id))

    def _output(self, emb: torch.Tensor, h_all: torch.Tensor, z_all: torch.Tensor) -> torch.Tensor:
        """The output layer does not feed back, so it runs once on all steps (one large matmul);
        its forward product runs with the vocabulary padded to a multiple of 8 words
        (``_PaddedOutput``)."""
        x = self.dropout(emb + self.L_h(h_all) + self.L_z(z_all))
        if -self.L_o.out_features % 8 == 0 or torch.compiler.is_compiling():
            return self.L_o(x)  # (B, T, V)
        logits = _PaddedOutput.apply(x.reshape(-1, x.shape[-1]), self.L_o.weight, self.L_o.bias)
        return logits.view(*x.shape[:-1], -1)  # (B, T, V)

    def _fused_pass(self, features, mask, keys, state, rows, emb, captions, mode, sample_mask,
                    return_logits: bool = True) -> DecoderOutput:
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
          (``UnrolledAdditiveScore``), its keys' gradient summed over the steps in one buffer;
        * with ``return_logits=False`` the output layer and the cross-entropy run on the real
          tokens only, packed step-major as the loop made them (``_packed_nll``).
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
        # The real tokens packed step-major: step t's n_t live rows (longest first), then step t+1's.
        # index[r]: packed row r's place in the [B*T] batch, caption order.
        steps = sum(1 for n in live if n)
        # (built on the CPU from the counts, then moved: no device syncs, no launch per step)
        row = torch.cat([torch.arange(n) for n in live[:steps]]).to(emb.device)
        step = torch.repeat_interleave(torch.arange(steps), torch.tensor(live[:steps])).to(emb.device)
        index = (row if in_order else order[row]) * T + step
        packed_emb = emb.reshape(B * T, m)[index]  # (R, m)
        # One product for all real tokens, then a view per step: backward then writes one [R, 4n]
        # gradient (a slice of a padded [B, T, 4n] tensor per step would cost a zero-filled one each).
        pre = F.linear(packed_emb, of_e, lstm.bias_ih + lstm.bias_hh).split(live[:steps])  # steps x (n_t, 4n)
        h_weights = [w for w in (score.query_weight, None if self.gate is None else self.gate.weight) if w is not None]
        splits = [w.shape[0] for w in h_weights] + [lstm.weight_hh.shape[0]]
        of_h = SharedWeight(torch.cat([*h_weights, lstm.weight_hh]))  # every product of h_{t-1}
        of_z = SharedWeight(of_z)
        unrolled = UnrolledAdditiveScore(score, keys) if isinstance(score, AdditiveScore) else None
        hs, zs, alphas, log_probs = [], [], [], []
        for t in range(steps):
            n = live[t]
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
            gates = pre[t] + recurrent + of_z(z)
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
        alphas, full_mask = caption_order(stack(alphas)), caption_order(full_mask)
        if not return_logits:
            token_nll = self._packed_nll(packed_emb, torch.cat(hs), torch.cat(zs), index, captions)
            return DecoderOutput(None, alphas, log_p, full_mask, token_nll)
        logits = self._output(emb, caption_order(stack(hs)), caption_order(stack(zs)))
        return DecoderOutput(logits, alphas, log_p, full_mask)

    def _packed_nll(self, emb, h, z, index, captions) -> torch.Tensor:
        """The output layer and NLL of the fused pass, on the real tokens only -> token_nll [B, T].

        emb, h, z: [R, ...], the real tokens packed; ``index`` [R]: their places in the [B*T]
        batch (caption order). The dropout mask is drawn for the padded [B, T, m] batch, as
        ``_output`` draws it (the same random numbers, so the same masks as the plain loop), and
        the packed rows taken from it."""
        B, T = captions.shape[0], captions.shape[1] - 1
        x = emb + self.L_h(h) + self.L_z(z)  # (R, m)
        if self.dropout.training and self.dropout.p > 0:
            p = self.dropout.p
            noise = torch.empty((B * T, x.shape[1]), dtype=x.dtype, device=x.device).bernoulli_(1 - p).div_(1 - p)
            x = x * noise[index]
        nll = _OutputNLL.apply(x, self.L_o.weight, self.L_o.bias, captions[:, 1:].reshape(-1)[index])
        return nll.new_zeros(B * T).index_copy(0, index, nll).view(B, T)
