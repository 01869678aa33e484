"""The LSTM decoder of Sec. 3.1.2: one word per step, attending over the annotations each time.

    h_0, c_0      = tanh(f_init,h(mean a)), tanh(f_init,c(mean a))
    alpha_t, z_t  = attention(a, h_{t-1});   z_t <- beta_t * z_t,  beta_t = sigmoid(f_beta(h_{t-1}))
    h_t, c_t      = LSTM([E y_{t-1}; z_t], h_{t-1}, c_{t-1})
    p(y_t)        ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t))          (deep output, Eq. 7)

``step`` is one word, ``forward``'s loop is teacher forcing: this file is what runs, unless a
caller chose captioning/fast.py's arrangement of the same maths for speed (the training module
and a search choose it once, where they are built).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from captioning.config import DecoderConfig
from captioning.models.attention import AdditiveScore, Attended, Mechanism, build_attention


class DecoderState(NamedTuple):
    h: torch.Tensor  # [B, n]
    c: torch.Tensor  # [B, n]


class StepOutput(NamedTuple):
    logits: torch.Tensor  # [B, V]
    state: DecoderState
    attended: Attended  # context here is the gated z_t


class DecoderOutput(NamedTuple):
    """At padded steps (targets == <pad>) the values are not the model's: losses mask them (the
    fused pass of captioning/fast.py does not run those steps and leaves alphas, log_probs and
    token_nll 0 there). That pass gives token_nll instead of logits."""

    logits: torch.Tensor | None  # [B, T, V] for targets captions[:, 1:]; None from the fused pass
    alphas: torch.Tensor  # [B, T, L]
    log_probs: torch.Tensor | None  # [B, T] log p(s_t) of sampled locations (hard, "sample"/"argmax")
    mask: torch.Tensor  # [B, L] bool, the real annotation locations
    token_nll: torch.Tensor | None = None  # [B, T] -log p(captions[:, 1:]), from the fused pass


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, vocab_size: int, feature_dim: int, attention: str) -> None:
        super().__init__()
        m, n, D = cfg.embed_dim, cfg.hidden_dim, feature_dim
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, m)
        self.init_h = nn.Linear(D, n)
        self.init_c = nn.Linear(D, n)
        self.attention: Mechanism = build_attention(attention, cfg, D)  # with its f_att, if it has one
        # Sec. 4.2.1: a SCALAR gate beta_t; "vector" (one gate per channel) is a common variant.
        self.gate = {"scalar": nn.Linear(n, 1), "vector": nn.Linear(n, D), "none": None}[cfg.gate]
        self.lstm = nn.LSTMCell(m + D, n)
        # Deep output (Eq. 7). The paper writes no nonlinearity inside L_o(...); the authors' code
        # adds a tanh. We follow the paper.
        self.L_h = nn.Linear(n, m)
        self.L_z = nn.Linear(D, m)
        self.L_o = nn.Linear(m, vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.init == "arctic":
            arctic_init_(self)

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
    def attend(self, h, features, keys, mask, *, mode="expected", sample_mask=None) -> Attended:
        """alpha_t and the gated context beta_t * z_t from h_{t-1} (Sec. 4.2.1)."""
        return self.gated(h, self.attention(features, keys, mask, h, mode=mode, sample_mask=sample_mask))

    def gated(self, h: torch.Tensor, attended: Attended) -> Attended:
        """The context scaled by the gate beta_t = sigmoid(f_beta(h_{t-1})) (Sec. 4.2.1), where there is one."""
        if self.gate is None:
            return attended
        beta = torch.sigmoid(self.gate(h))  # (B, 1) scalar gate or (B, D) vector gate
        return attended._replace(context=beta * attended.context)

    def recur(self, emb, state, features, keys, mask, *, mode="expected", sample_mask=None):
        """One step of the recurrence: (E y_{t-1} [B, m], h_{t-1}, c_{t-1}) -> ((h_t, c_t), attended)."""
        return self.lstm_step(emb, state, self.attend(state.h, features, keys, mask, mode=mode, sample_mask=sample_mask))

    def lstm_step(self, emb: torch.Tensor, state: DecoderState, attended: Attended):
        """Eq. 1-3: the LSTM's input is [E y_{t-1}; z_hat_t] -> ((h_t, c_t), attended)."""
        h, c = self.lstm(torch.cat([emb, attended.context], dim=1), state)  # (B, n)
        return DecoderState(h, c), attended

    def readout(self, emb: torch.Tensor, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The argument of L_o in Eq. 7: E y_{t-1} + L_h h_t + L_z z_t, [..., m]."""
        return emb + self.L_h(h) + self.L_z(z)

    def deep_output(self, emb: torch.Tensor, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Eq. 7: the logits L_o(E y_{t-1} + L_h h_t + L_z z_t), with dropout on L_o's input."""
        return self.L_o(self.dropout(self.readout(emb, h, z)))

    def step(
        self,
        prev_words: torch.Tensor,
        state: DecoderState,
        features: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor,
        *,
        mode: str = "expected",
        sample_mask: torch.Tensor | None = None,
    ) -> StepOutput:
        """One word: prev_words [B] long -> logits [B, V] for the next word."""
        emb = self.embedding(prev_words)  # (B, m)
        state, attended = self.recur(emb, state, features, keys, mask, mode=mode, sample_mask=sample_mask)
        return StepOutput(self.deep_output(emb, state.h, attended.context), state, attended)

    # -- teacher forcing --------------------------------------------------------------------
    def forward(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        captions: torch.Tensor,
        *,
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
        if rows is not None:
            features, mask, keys = features[rows], mask[rows], keys[rows]
            state = DecoderState(state.h[rows], state.c[rows])
        hs, zs, alphas, log_probs = [], [], [], []
        for t in range(emb.shape[1]):
            state, attended = self.recur(emb[:, t], state, features, keys, mask, mode=mode, sample_mask=sample_mask)
            hs.append(state.h)
            zs.append(attended.context)
            alphas.append(attended.alpha)
            if attended.log_prob is not None:
                log_probs.append(attended.log_prob)
        # The output layer does not feed back: it runs once on all steps (one large matmul).
        logits = self.deep_output(emb, torch.stack(hs, 1), torch.stack(zs, 1))  # (B, T, V)
        log_p = torch.stack(log_probs, 1) if log_probs else None  # (B, T)
        return DecoderOutput(logits, torch.stack(alphas, 1), log_p, mask)


# ----------------------------------------------------------------------------- initialisation


def _norm_weight_(weight: torch.Tensor, ortho: bool = True) -> None:
    """capgen.py's ``norm_weight(nin, nout, scale=0.01, ortho=True)``: an orthogonal matrix when it
    is square (and ``ortho``), else N(0, 0.01^2) entries. ``weight`` may be a view (a block)."""
    new = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    if ortho and weight.shape[0] == weight.shape[1]:
        nn.init.orthogonal_(new)
    else:
        nn.init.normal_(new, 0.0, 0.01)
    weight.copy_(new)


@torch.no_grad()
def arctic_init_(decoder: Decoder) -> None:
    """The authors' initialisation (capgen.py ``init_params`` and the ``param_init_*`` functions),
    in place (``model.decoder.init: arctic``):

    * every weight matrix as ``norm_weight``: N(0, 0.01) unless square, then orthogonal -- the
      embedding (``Wemb``), f_init (``ff_state``, ``ff_memory``), the LSTM's word and context
      inputs (``W``, ``Wc``), the attention's query side (``Wd_att``), v (``U_att``), the gate
      (``W_sel``), the deep output (``ff_logit_lstm``, ``ff_logit_ctx``, ``ff_logit``);
    * the attention's image side W is N(0, 0.01) even when square (``norm_weight(dimctx,
      ortho=False)`` for ``Wc_att``); its extra layers orthogonal (``ortho_weight`` for ``W_att_i``);
    * the LSTM's recurrent matrix orthogonal per gate (``U = [ortho_weight(dim)] * 4``);
    * every bias 0.
    """
    for module in decoder.modules():
        if isinstance(module, nn.Linear):
            _norm_weight_(module.weight)
            if module.bias is not None:
                module.bias.zero_()
    _norm_weight_(decoder.embedding.weight)
    score = getattr(decoder.attention, "score", None)
    if isinstance(score, AdditiveScore):
        _norm_weight_(score.W.weight, ortho=False)
        for layer in score.W_deep:
            _norm_weight_(layer.weight)  # square: orthogonal
    lstm, m = decoder.lstm, decoder.embedding.embedding_dim
    for word_block, hidden_block in zip(lstm.weight_ih[:, :m].chunk(4), lstm.weight_hh.chunk(4)):
        _norm_weight_(word_block)  # capgen's W: one norm_weight(dim_word, dim) per gate
        _norm_weight_(hidden_block)  # square: orthogonal
    _norm_weight_(lstm.weight_ih[:, m:])  # Wc = norm_weight(dimctx, 4 * dim): never square
    lstm.bias_ih.zero_()
    lstm.bias_hh.zero_()
