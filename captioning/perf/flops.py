"""Analytic matrix-multiply FLOPs of the decoder's teacher-forced training step (and of decoding).

Only matrix products count (``2 * m * n * k`` each, as ``torch.utils.flop_counter`` counts): >98%
of the arithmetic at COCO sizes; the tanh, softmax and sums around them are memory-bound.

The count is of **useful** work, what the maths of one caption needs: ``W a`` and ``h_0, c_0`` once
per *image* (shared by its captions), the per-step work and the output layer for real tokens only
(words + ``<end>``). What a step *executes* is measured instead (``torch.utils.flop_counter``,
``captioning benchmark``'s ``executed_flop_per_step``): the fused pass of captioning/fast.py runs
exactly the useful products (tests/test_benchmark.py), the reference loop of decoder.py (the one
``torch.compile`` compiles) every caption for every padded step. FLOP/s use the useful count, so
that paths are compared on the same work.

Backward costs two products per forward product, one per operand gradient, except where an operand
needs none: with a frozen encoder (or random inputs, as in the benchmark) the annotations ``a`` are
constants, so ``W a``, ``init_h/c(mean a)`` and ``alpha @ a`` need only their other operand's.
"""

from __future__ import annotations

from dataclasses import dataclass

from captioning.console import InvalidValue
from captioning.config import DecoderConfig


@dataclass(frozen=True)
class DecoderFlops:
    """Forward matmul FLOPs of the decoder's parts, and their backward multipliers."""

    per_image: float  # W a projection, mean(a), init_h + init_c, forward
    per_image_backward: float
    per_step: float  # one caption, one time step of the recurrence: U h, score, context, gate, LSTM
    per_step_backward: float
    per_token_output: float  # hoisted out of the recurrence: LSTM's W_ih E y, deep output; forward
    per_token_output_backward: float
    projection_training: float = 0.0  # the W a part of per_image + per_image_backward

    def training(self, images: int, steps: float) -> float:
        """Forward + backward FLOPs of ``images`` image sides and ``steps`` caption-steps (a token each)."""
        return (images * (self.per_image + self.per_image_backward)
                + steps * (self.per_step + self.per_step_backward)
                + steps * (self.per_token_output + self.per_token_output_backward))

    def forward_only(self, images: int, steps: float) -> float:
        return images * self.per_image + steps * self.per_step + steps * self.per_token_output


def decoder_flops(
    cfg: DecoderConfig,
    num_locations: int,
    feature_dim: int,
    vocab_size: int,
    mode: str = "expected",
    features_need_grad: bool = False,
) -> DecoderFlops:
    """Matmul FLOPs of :class:`captioning.models.decoder.Decoder` with an f_att score, as written.
    ``mode``: "expected" (soft, or hard's expected context) computes ``alpha @ a``; "sample"/"argmax"
    gathers one location. ``features_need_grad``: a fine-tuned encoder (``a`` needs a gradient too)."""
    L, D, V = num_locations, feature_dim, vocab_size
    m, n, A = cfg.embed_dim, cfg.hidden_dim, cfg.attention_dim
    a_grad = 2.0 if features_need_grad else 1.0  # backward products per forward product touching a

    # Image side (paper Sec. 4.2: W a_i does not depend on t).
    key_dim = n if cfg.score == "bilinear" else A
    projection = 2.0 * L * D * key_dim + (cfg.attention_layers - 1) * 2.0 * L * A * A  # + capgen's extra layers
    init = 2 * (2.0 * D * n)  # init_h and init_c of mean(a)
    mean = 2.0 * L * D  # mean(a) as the product mask^T a (no backward unless a needs a gradient)
    per_image = projection + init + mean

    # Per step: f_att's query side, the score, the context, the gate, the LSTM cell.
    query = 0.0 if cfg.score == "bilinear" else 2.0 * n * A  # U h
    score = 2.0 * L * key_dim  # additive: v^T tanh(.) over L; dot/bilinear: keys @ q
    context = 2.0 * L * D if mode == "expected" else 0.0  # alpha @ a
    gate = {"scalar": 2.0 * n, "vector": 2.0 * n * D, "none": 0.0}[cfg.gate]
    lstm_z = 2.0 * D * 4 * n  # W_ih[:, m:] z
    step_other = query + score + gate + lstm_z + 2.0 * n * 4 * n  # ... + W_hh h
    per_step = step_other + context
    per_step_backward = 2 * step_other + a_grad * context  # d alpha (and d a when fine-tuned)

    # W_ih[:, :m] E y for all steps at once; L_h h, L_z z, L_o (...)
    output = 2.0 * m * 4 * n + 2.0 * n * m + 2.0 * D * m + 2.0 * m * V
    output_backward = 2 * output
    if context == 0.0 and cfg.gate == "none" and not features_need_grad:
        # z = a_s is then a constant: W_ih[:, m:] and L_z need no d z
        per_step_backward -= lstm_z
        output_backward -= 2.0 * D * m
    return DecoderFlops(
        per_image=per_image,
        per_image_backward=a_grad * (projection + init) + (a_grad - 1.0) * mean,
        per_step=per_step,
        per_step_backward=per_step_backward,
        per_token_output=output,
        per_token_output_backward=output_backward,
        projection_training=(1.0 + a_grad) * projection,
    )


def training_step_flops(flops: DecoderFlops, caption_tokens: list[int], captions_per_image: int = 1) -> float:
    """Useful forward + backward FLOPs of one minibatch. ``caption_tokens``: per caption row, its
    real target tokens (words + <end>); rows i*k .. i*k+k-1 share image i."""
    rows = len(caption_tokens)
    if rows % captions_per_image:
        raise InvalidValue(f"{rows} captions is not a multiple of captions_per_image={captions_per_image}")
    return flops.training(rows // captions_per_image, float(sum(caption_tokens)))
