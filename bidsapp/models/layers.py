"""Layers shared by the networks."""

from __future__ import annotations

import torch
from torch import nn


class _FixedOrderPointwise:
    """Inference of a 1x1 convolution as a channel-by-channel multiply-add, in a fixed order.

    oneDNN splits this small reduction over threads differently for each thread count, so a network's
    output (and every volume after it) changed in its last bits with ``--omp-nthreads``. Element-wise
    operations do not: this gives the one-thread convolution's numbers on any thread count. Training
    (gradients on) keeps the library's convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        w = self.weight.flatten(1)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (self.bias.view(shape) if self.bias is not None else x.new_zeros(shape)).expand(
            x.shape[0], w.shape[0], *x.shape[2:])
        for c in range(w.shape[1]):
            y = y + x[:, c:c + 1] * w[:, c].view(shape)
        return y


class PointwiseConv3d(_FixedOrderPointwise, nn.Conv3d):
    """``nn.Conv3d(cin, cout, 1)`` whose inference does not depend on the thread count."""

    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__(cin, cout, 1, bias=bias)


class PointwiseConv2d(_FixedOrderPointwise, nn.Conv2d):
    """``nn.Conv2d(cin, cout, 1)`` whose inference does not depend on the thread count."""

    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__(cin, cout, 1, bias=bias)


def fixed_order(conv: nn.Module) -> nn.Module:
    """A trained 1x1 ``nn.Conv2d``/``nn.Conv3d`` as its :class:`PointwiseConv2d`/``3d`` (same weights);
    anything else unchanged."""
    kinds = {nn.Conv2d: PointwiseConv2d, nn.Conv3d: PointwiseConv3d}
    kind = kinds.get(type(conv))
    if kind is None or any(k != 1 for k in conv.kernel_size) or conv.groups != 1:
        return conv
    out = kind(conv.in_channels, conv.out_channels, bias=conv.bias is not None).to(conv.weight.device)
    out.load_state_dict(conv.state_dict())
    return out.train(conv.training)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = float(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient times ``-scale`` backward (Ganin & Lempitsky 2015): a domain head read
    through it learns to tell the domains apart while the features under it learn not to let it."""
    return _ReverseGradient.apply(x, scale)
