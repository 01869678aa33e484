"""The authors' Adam (``optimizers.py`` of kelvinxu/arctic-captions), for ``optim.adam_bias_correction: false``.

capgen writes Adam's decay rates as their complements, ``b1 = 0.1`` and ``b2 = 0.001``, and keeps
the bias-correction formula written for the usual rates, so its correction is about none::

    m_t = 0.1 g + 0.9 m                    v_t = 0.001 g^2 + 0.999 v
    lr_t = lr sqrt(1 - 0.001^t) / (1 - 0.1^t)
    p  <- p - lr_t m_t / (sqrt(v_t) + 1e-8)

Its first updates are 3.5 to 6.6 times torch Adam's, and the two agree within 5% only after
about 3,000 updates. Epsilon is added to sqrt(v_t) uncorrected, where torch's Adam adds it to the
corrected sqrt(v_t / (1 - beta2^t)): a rescaled learning rate alone cannot give capgen's update, so
this optimiser writes it out.
"""

from __future__ import annotations

import math

import torch


class CapgenAdam(torch.optim.Optimizer):
    """capgen's Adam update; ``lr`` per parameter group (capgen hard-codes 2e-4), ``weight_decay``
    added to the gradient as torch's Adam does (capgen has none: its ``decay_c`` is a cost term)."""

    def __init__(self, params, lr: float = 2e-4, b1: float = 0.1, b2: float = 0.001, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "b1": b1, "b2": b2, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["b1"], group["b2"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if group["weight_decay"] == 0 else p.grad + group["weight_decay"] * p
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["m"], state["v"]
                m.mul_(1.0 - b1).add_(g, alpha=b1)  # m_t = b1 g + (1 - b1) m
                v.mul_(1.0 - b2).addcmul_(g, g, value=b2)  # v_t = b2 g^2 + (1 - b2) v
                lr_t = group["lr"] * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-lr_t)
        return loss
