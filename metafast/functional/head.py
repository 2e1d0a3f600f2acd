"""ANIL's adapted head as an engine of its own, so that MetaStep's exact reverse runs it with a meta-learned body.

The body (every layer before the head, shared by all tasks) runs once on the support and once on the query
set, with autograd: h_s = body(x_s), h_q = body(x_q) (its BatchNorm with per-task batch statistics, as
everywhere in the executor). MetaStep runs the head's inner loop and query loss on h_s, h_q through
:class:`HeadEngine`, and its backward returns, besides the head's meta-gradient,

    hbar_q = dL_q/dh_q                                   (the query pass's input gradient)
    hbar_s = -sum_k d/dh_s <grad_W L_s(W_k, h_s), lr_k Wbar_{k+1}>   (second order; 0 for first order)

the second being the R-operator of the head's input gradient along lr_k Wbar_{k+1} (the mixed second
derivative, one extra output of the Hessian-vector product the reverse takes anyway). Autograd carries both
into the body's parameters, which therefore need only first derivatives: no R-operator, and any layer the
executor runs (per-task fallbacks included) may be in the body. With memory="low" or "min" the body is
checkpointed too (:func:`checkpointed_body_features`): its activations are rebuilt in the backward, one task
chunk at a time, so the peak no longer holds every chunk's body.
"""
import torch
import torch.utils.checkpoint

from .graph.model import Live
from .layers import RunCtx, to_tn


class HeadEngine:
    """Layers [adapt_from, n) of an ANIL engine with MetaStep's engine interface: ``theta`` is the adapted part
    [Pa] of θ, the input the body's features ``h`` [T, N, ...] (:func:`body_features`), and backward/hvp take
    ``input_grad`` (the features' gradient, [T, N, ...] too)."""

    layout = "tn"

    def __init__(self, engine):
        key, why = engine.head_input()
        if key is False:
            raise ValueError(f"anil=True: the head cannot run on the body's features: {why}")
        self.engine, self.key = engine, key
        self.start = engine.adapt_from
        self.layers = engine.layers[self.start:]
        self._body = [None] * engine.first_adapted_slot  # the body's θ pieces: not read by the head

    def slot_sizes(self):
        return self.engine.slot_sizes()

    def forward(self, start: int, stop: int, theta, fast, h, layout: str, rc: RunCtx, record: bool):
        parts = self._body + list(theta.split(self.engine.slot_sizes()))
        if self.key is not None:  # a module graph: the head node reads the body's value by its index
            h = Live({self.key: (h, self.layout)})
        return self.engine.forward(self.start + start, self.start + stop, parts, fast, h, self.layout, rc, record)

    def backward(self, *args, **kwargs):
        return self.engine.backward(*args, **kwargs)

    def hvp(self, *args, **kwargs):
        return self.engine.hvp(*args, **kwargs)

    def output(self, x, layout: str, T: int):
        return self.engine.output(x, layout, T)


def body_features(engine, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The body's output [T, N, ...] on x [T, N, ...] at θ (shared weights), recorded by autograd when it
    records; of a module graph, the one value the head reads (``engine.head_input()``). In the task-major
    layout whatever layout the body ended in, so that MetaStep reads the task count off its first dim."""
    T = x.shape[0]
    h, layout, _ = engine.forward(0, engine.adapt_from, theta, None, x, "tn", RunCtx(T, create_graph=False),
                                  record=False)
    if isinstance(h, Live):
        h, layout = h.values[engine.head_input()[0]]
    return to_tn(h, T) if layout == "g" else h


def checkpointed_body_features(engine, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:func:`body_features` whose activations are not kept: autograd recomputes the body when the backward
    reaches it (torch.utils.checkpoint), so one task chunk's body is alive at a time (memory="low" or "min"). The body's
    own Dropout generators are rewound for the recomputation, which therefore draws the forward's masks."""
    gens = [layer.gen for layer in engine.layers[:engine.adapt_from] if getattr(layer, "gen", None) is not None]
    states = [g.get_state() for g in gens]
    ran = []

    def run(theta, x):
        if not ran:  # the forward: draws as usual
            ran.append(True)
            return body_features(engine, theta, x)
        now = [g.get_state() for g in gens]
        for g, s in zip(gens, states):
            g.set_state(s)
        try:
            return body_features(engine, theta, x)
        finally:
            for g, s in zip(gens, now):
                g.set_state(s)

    return torch.utils.checkpoint.checkpoint(run, theta, x, use_reentrant=False)
