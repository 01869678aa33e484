"""Training objectives for soft (Sec. 4.2, Eq. 14) and hard (Sec. 4.1, Eq. 12) attention.

Normalisation (docs/faithfulness.md derives it from the authors' code): the NLL is summed over each
caption's real steps, then averaged over the minibatch's captions -- the paper's 1/N sum_n of Eq.
12 and the authors' ``cost.mean()``. The doubly stochastic term, lambda * sum_i (1 - sum_t
alpha_ti)^2 per caption, is averaged the same way (Eq. 14). The authors' code writes
``alpha_c * ((1 - sum_t alpha)^2).sum(0).mean()``, a mean over locations: its per-caption lambda is
alpha_c * B / L (0.33 at alpha_c = 1, B = 64, L = 196), as configs/coco_*.yaml set it.

Hard attention's REINFORCE and entropy terms: Eq. 12 puts 1/N over all three terms, and
``loss.hard_reduction: mean`` (the default) averages them like the NLL. The authors' code injects
``(C_n - b) / 10 * s / alpha + lambda_e (log alpha + 1)`` as the gradient on every alpha with no
1/B, so each caption's terms are B times (captions per optimiser step) what Eq. 12 gives:
``hard_reduction: sum`` reproduces that, the batch means times ``captions_per_step`` (every DDP rank).

The cost C_n is the caption's mean NLL per real token. capgen's ``masked_cost.mean(0)`` is a mean
over the padded length, but its iterator (``homogeneous_data.py``) batches captions of one length,
so there is no padding; over a random batch's padded length C_n would depend on the other captions.

Deviation on purpose: the authors apply the REINFORCE and entropy gradients to padded steps and
locations too; we mask padded steps (they carry no word).
"""

from __future__ import annotations

from typing import Collection, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from captioning.console import InvalidValue
from captioning.config import LossConfig
from captioning.models.decoder import DecoderOutput
from captioning.vocab import Vocabulary


class LossTerms(NamedTuple):
    loss: torch.Tensor  # scalar to backpropagate
    nll: torch.Tensor  # scalar, mean over captions of the summed token NLL
    token_nll: torch.Tensor  # scalar, mean NLL per real token (for logs and the baseline)
    doubly_stochastic: torch.Tensor  # scalar, mean over captions (before lambda)
    reinforce: torch.Tensor  # scalar surrogate (0 for soft attention)
    entropy: torch.Tensor  # scalar, mean over captions of sum_t H(alpha_t)
    # Per caption [B], detached, for monitoring (CaptioningModule logs the training signal).
    nll_per_caption: torch.Tensor  # summed token NLL
    entropy_per_caption: torch.Tensor  # sum_t H(alpha_t) over real steps
    # REINFORCE cost C_n [B], detached: the caption's mean NLL per real token (the authors'
    # masked_cost.mean(0) on a length-bucketed minibatch). The baseline tracks the mean of this.
    cost: torch.Tensor
    # C_n - b [B], detached, for the captions whose locations were sampled (b: the moving average,
    # or the leave-one-out mean with loss.samples > 1); empty where nothing was sampled.
    advantage: torch.Tensor


def per_token_nll(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> -log p(target) [B, T] in fp32, 0 at padding."""
    # Rows of V contiguous: a [B, V, T] transpose would make log-softmax stride over T.
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape) * (targets != pad_id)


def caption_nll(
    logits: torch.Tensor | None, targets: torch.Tensor, pad_id: int, token_nll: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V], targets [B, T] -> (per-caption summed NLL [B], token mask [B, T] bool).

    ``token_nll`` [B, T]: the per-token NLL a pass computed itself (the fused pass of
    captioning/fast.py); then ``logits`` may be None."""
    token_mask = targets != pad_id
    if token_nll is None:
        if logits is None:
            raise InvalidValue("caption_nll needs the logits or the decoder's token_nll")
        token_nll = per_token_nll(logits, targets, pad_id)
    return (token_nll.float() * token_mask).sum(1), token_mask


def doubly_stochastic_penalty(alphas: torch.Tensor, token_mask: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 14: sum_i (1 - sum_t alpha_ti)^2 over real steps and real locations -> [B]."""
    coverage = (alphas * token_mask[:, :, None]).sum(1)  # (B, L)
    return (((1.0 - coverage) ** 2) * feature_mask).sum(1)


def attention_entropy(alphas: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """sum_t H(alpha_t) over real steps -> [B] (0 log 0 = 0)."""
    per_step = -torch.special.xlogy(alphas, alphas).sum(-1)  # (B, T)
    return (per_step * token_mask).sum(1)


class ReinforceBaseline(nn.Module):
    """The moving-average baseline b of Sec. 4.1, as the authors' code keeps it: a buffer, saved in
    checkpoints; ``update`` gets the same (all-reduced) value on every DDP rank, so b stays identical."""

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("value", torch.zeros(()))

    @torch.no_grad()
    def update(self, mean_cost: torch.Tensor) -> None:
        # b <- 0.9 b + 0.1 * mean_n C_n (the authors' masked_cost.mean()): the very cost that b is
        # subtracted from; starts at 0; applied after the step that used the old b.
        self.value.mul_(self.decay).add_((1.0 - self.decay) * mean_cost.detach().to(self.value))


def reinforce_cost(nll_per_caption: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """C_n = the caption's summed NLL [B] / its real tokens (token_mask [B, T]) -> [B], detached: one
    sentence-level cost, the authors' ``masked_cost.mean(0)`` over captions of one length."""
    return (nll_per_caption / token_mask.sum(1).clamp_min(1)).detach()


def leave_one_out_baseline(cost: torch.Tensor, samples: int) -> torch.Tensor:
    """cost [B*K] (the K draws of caption n in rows n*K .. n*K+K-1) -> for each draw, the mean cost
    of the caption's other K - 1 draws [B*K]: a baseline independent of the draw it is for."""
    per_caption = cost.view(-1, samples)  # (B, K)
    others = (per_caption.sum(1, keepdim=True) - per_caption) / (samples - 1)
    return others.reshape(-1)


#: The terms a mechanism may add to the NLL (``Mechanism.loss_terms``, captioning/models/attention.py).
TERMS = ("doubly_stochastic", "reinforce", "entropy")


def caption_loss(
    cfg: LossConfig,
    out: DecoderOutput,
    targets: torch.Tensor,
    *,
    terms: Collection[str],
    baseline: torch.Tensor | None = None,
    captions_per_step: int | None = None,
    samples: int = 1,
    sampled: torch.Tensor | None = None,
) -> LossTerms:
    """All terms of one minibatch: the NLL and the mechanism's ``terms`` (its ``loss_terms``: Eq.
    14's "doubly_stochastic"; Eq. 12's "reinforce" and "entropy").

    ``out``: a teacher-forced pass over targets [B, T] (captions[:, 1:]): logits [B, T, V] or the
    fused pass's token_nll [B, T]; alphas [B, T, L]; mask [B, L] bool; with sampled locations,
    log_probs [B, T] (0 where the expected context was used). ``baseline``: REINFORCE's scalar b.
    ``captions_per_step`` (None: rows / ``samples``): the optimiser step's captions on every rank,
    the REINFORCE and entropy factor of ``hard_reduction == "sum"``. ``samples`` K > 1: rows n*K ..
    n*K+K-1 are draws of caption n, each with the other K - 1's mean cost as its baseline.
    ``sampled`` [B] bool: the rows whose locations were sampled (None: all), for the advantage."""
    unknown = set(terms) - set(TERMS)
    if unknown:
        raise InvalidValue(f"unknown loss terms {sorted(unknown)}; the losses are {', '.join(TERMS)}")
    nll_per_caption, token_mask = caption_nll(out.logits, targets, Vocabulary.pad_id, out.token_nll)
    nll = nll_per_caption.mean()
    token_nll = nll_per_caption.sum() / token_mask.sum().clamp_min(1)
    penalty = doubly_stochastic_penalty(out.alphas.float(), token_mask, out.mask).mean()
    entropy_per_caption = attention_entropy(out.alphas.float(), token_mask)
    entropy = entropy_per_caption.mean()
    cost = reinforce_cost(nll_per_caption, token_mask)  # (B,)
    monitored = (nll_per_caption.detach(), entropy_per_caption.detach(), cost)
    loss, reinforce, advantage = nll, nll.new_zeros(()), cost[:0]
    if "doubly_stochastic" in terms:
        loss = loss + cfg.doubly_stochastic * penalty
    # Hard attention (Eq. 12 with the authors' choices, capgen.py). Surrogate whose gradient is
    # lambda_r (C_n - b) d log p(s|a)/dW, i.e. lambda_r (log p(y|s,a) - b') d log p(s|a)/dW; its
    # gradient on alpha is the authors' known gradient (C_n - b)/10 * s/alpha (times the scale).
    # Hard attention adds no doubly stochastic term: in the authors' code the known gradient on
    # alpha replaces it, so it has no effect in hard mode (it is still logged).
    scale = float(captions_per_step or targets.shape[0] // samples) if cfg.hard_reduction == "sum" else 1.0
    if "reinforce" in terms and out.log_probs is not None:
        if samples > 1:
            b = leave_one_out_baseline(cost, samples)  # (B,)
        elif baseline is None:
            raise InvalidValue("hard attention with sampled locations needs the REINFORCE baseline")
        else:
            b = baseline.detach()
        advantage = cost - b  # (B,)
        # The mean over rows is the mean over captions of the mean over their K draws.
        reinforce = scale * (cfg.reward_scale * advantage * (out.log_probs * token_mask).sum(1)).mean()
        loss = loss + reinforce
        advantage = advantage if sampled is None else advantage[sampled]
    if "entropy" in terms:
        # Entropy bonus: minimise lambda_e * sum alpha log alpha, i.e. maximise attention entropy.
        loss = loss - scale * cfg.entropy * entropy
    return LossTerms(loss, nll, token_nll, penalty, reinforce, entropy, *monitored, advantage)
