"""The flat meta-parameter buffer as one differentiable [P] tensor: a helper the ops share, not an op.

BatchedMAML keeps every parameter of a model as a view into one flat buffer (metafast/functional/flat.py);
an op that takes θ as [P] (fused_inner_loop) sees the buffer itself, and its gradient must reach the
parameters, which are the autograd leaves.
"""
import torch

__all__ = ["ThetaView"]


class ThetaView(torch.autograd.Function):
    """θ = the flat buffer itself (zero-copy); backward splits the gradient into per-parameter views."""

    @staticmethod
    def forward(ctx, buffer, *params):
        ctx.shapes = [p.shape for p in params]
        return buffer.view(-1)

    @staticmethod
    def backward(ctx, grad):
        pieces = grad.split([s.numel() for s in ctx.shapes])  # one op for all the views
        return (None, *[g.view(s) for g, s in zip(pieces, ctx.shapes)])
