"""A weight used by a matrix product at every step of an unrolled loop, with its gradient taken
once, as one large product, instead of once per step.

Autograd differentiates ``x_t @ W^T`` step by step: at every step it computes ``g_t^T x_t`` (a
product with only B rows inside, slow on a CPU) and adds it into ``W``'s gradient (a full pass
over ``W``). cuDNN's RNNs avoid this by stacking the steps; an attention LSTM cannot use them, so
:class:`SharedWeight` does the same by hand:

* ``_Share`` hands ``W`` (cast once to the autocast dtype, if any) to every step product and
  computes ``dW = [g_1; ...; g_T]^T [x_1; ...; x_T]`` in its backward, which autograd runs only
  after every step's backward (each step product is one of its consumers).
* ``_StepProduct`` computes ``x_t @ W^T``; its backward returns ``dx_t`` and hands ``(x_t, g_t)``
  to the shared weight instead of returning a weight gradient.

The gradient reaches the parameter through the normal autograd graph, so hooks (DDP's bucketing
included), gradient clipping and optimizers see nothing unusual. Same sums, other order: equal to
the step-by-step gradient up to float rounding (tests/test_models.py checks).
"""

from __future__ import annotations

import torch


class SharedWeight:
    """``W`` for one unrolled loop: call it on each step's input ``x`` [B_t, in] -> ``x @ W^T``."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x_t, g_t), filled by backward
        device = weight.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        self.weight = _Share.apply(weight, self, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _StepProduct.apply(x, self.weight, self)


class _Share(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, owner: SharedWeight, dtype: torch.dtype) -> torch.Tensor:
        ctx.owner, ctx.weight_dtype = owner, weight.dtype
        ctx.set_materialize_grads(False)  # the step products return no gradient for it: None, not zeros
        return weight.to(dtype) if dtype != weight.dtype else weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        pairs, ctx.owner.pairs = ctx.owner.pairs, []
        if pairs:
            xs = torch.cat([x for x, _ in pairs])
            gs = torch.cat([g for _, g in pairs])
            dw = gs.t().mm(xs).to(ctx.weight_dtype)
            grad = dw if grad is None else dw + grad.to(ctx.weight_dtype)
        return grad, None, None


class _StepProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, owner: SharedWeight) -> torch.Tensor:
        x_in = x.to(weight.dtype)
        ctx.save_for_backward(x_in, weight)
        ctx.owner, ctx.x_dtype = owner, x.dtype
        # (W x^T)^T rather than x W^T: with few rows (B_t) and a large W, MKL runs the product
        # with W as the left operand up to 2x faster on the project's CPU (same sums). Not so
        # for dx below, where g W is the fast form (W^T g^T was 20x slower at 5-10 rows).
        return weight.mm(x_in.t()).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_in, weight = ctx.saved_tensors
        ctx.owner.pairs.append((x_in, grad))
        dx = grad.mm(weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return dx, None, None
