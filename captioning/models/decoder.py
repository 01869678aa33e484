"""The LSTM decoder of Sec. 3.1.2: one word per step, attending over the annotations each time.

    h_0, c_0      = tanh(f_init,h(mean a)), tanh(f_init,c(mean a))
    alpha_t, z_t  = attention(a, h_{t-1});   z_t <- beta_t * z_t,  beta_t = sigmoid(f_beta(h_{t-1}))
    h_t, c_t      = LSTM([E y_{t-1}; z_t], h_{t-1}, c_t-1)
    p(y_t)        ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t))          (deep output, Eq. 7)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from captioning.config import DecoderConfig
from captioning.models.attention import Attended, build_attention, build_score


class DecoderState(NamedTuple):
    h: torch.Tensor  # [B, n]
    c: torch.Tensor  # [B, n]


class StepOutput(NamedTuple):
    logits: torch.Tensor  # [B, V]
    state: DecoderState
    attended: Attended  # context here is the gated z_t


class DecoderOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V] for targets captions[:, 1:]
    alphas: torch.Tensor  # [B, T, L]
    log_probs: torch.Tensor | None  # [B, T] log p(s_t) of sampled locations (hard, mode "sample")
    mask: torch.Tensor  # [B, L] bool, the real annotation locations


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

    # -- per image --------------------------------------------------------------------------
    def init_state(self, features: torch.Tensor, mask: torch.Tensor) -> DecoderState:
        """features [B, L, D], mask [B, L] -> h_0, c_0 from the mean of the real annotations."""
        weights = mask.to(features.dtype)[:, :, None]  # (B, L, 1)
        mean = (features * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)
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
    ) -> DecoderOutput:
        """Teacher-forced pass. captions [B, T+1] = <start> w_1 ... <end> <pad>...; predicts
        captions[:, 1:]. Steps run to the longest caption; padding is masked in the loss.
        ``keys``: ``project(features)`` when the caller already has it (several captions per image)."""
        B, T = captions.shape[0], captions.shape[1] - 1
        if keys is None:  # the caller may pass project(features), computed once per image
            keys = self.project(features)  # (B, L, K)
        state = self.init_state(features, mask)
        emb = self.embedding(captions[:, :-1])  # (B, T, m)
        hs, zs, alphas, log_probs = [], [], [], []
        for t in range(T):
            attended = self._attend(state.h, features, keys, mask, mode, sample_mask)
            state = DecoderState(*self.lstm(torch.cat([emb[:, t], attended.context], dim=1), state))
            hs.append(state.h)
            zs.append(attended.context)
            alphas.append(attended.alpha)
            if attended.log_prob is not None:
                log_probs.append(attended.log_prob)
        # The output layer does not feed back, so it runs once on all steps (one large matmul).
        h_all, z_all = torch.stack(hs, 1), torch.stack(zs, 1)  # (B, T, n), (B, T, D)
        logits = self.L_o(self.dropout(emb + self.L_h(h_all) + self.L_z(z_all)))  # (B, T, V)
        return DecoderOutput(
            logits, torch.stack(alphas, 1), torch.stack(log_probs, 1) if log_probs else None, mask
        )
