"""Compile a module into batched layers and run them over T tasks with flat fast weights.

``BatchedModel`` is the engine under BatchedMAML: a forward over any range of layers that records
what the hand-written backward needs (a "tape"), and a backward that returns the per-task gradient
of all adapted parameters as ONE [T, Pa] tensor in flat-buffer order, ready for the fused inner update.
"""
from typing import List, Optional

import torch
from torch import nn

from . import layers as L
from .flat import FlatParams

from .graph import layers as G

_ELEMENTWISE = (nn.Softplus, nn.ReLU6, nn.Hardtanh, nn.Mish, nn.Hardswish, nn.AlphaDropout)
_POOLING = (nn.AdaptiveMaxPool2d,)
_SKIP = (nn.Identity,)
# the modules whose batched layer has R-operators (the exact reverse covers them; tests check this list
# against make_layer); in a traced graph also residual add/sub, concat, scalar mul/div and functional
# max/avg pooling and spatial means
EXACT_MODULES = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.ReLU, nn.LeakyReLU, nn.ELU,
                 nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten,
                 nn.Dropout)
_SMOOTH = {nn.ELU: G.ELU, nn.GELU: G.GELU, nn.SiLU: G.SiLU}


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def make_layer(m: nn.Module, slots) -> Optional[L.Layer]:
    """The batched layer of a module (None: it passes its input through); ``L.Generic`` runs
    anything else per task."""
    if isinstance(m, _SKIP) or (isinstance(m, nn.Dropout) and m.p == 0):
        return None
    if type(m) is nn.Linear:
        return L.Linear(m, slots)
    if type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        return L.Conv2d(m, slots)
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return L.BatchNorm(m, slots)
    if type(m) is nn.ReLU:
        return L.ReLU(m)
    if type(m) is nn.LeakyReLU:
        return G.LeakyReLU(m)
    if type(m) in _SMOOTH:
        return _SMOOTH[type(m)](m)
    if type(m) is nn.Tanh:
        return L.Tanh(m)
    if type(m) is nn.Sigmoid:
        return L.Sigmoid(m)
    if type(m) is nn.MaxPool2d and not m.return_indices:
        return L.MaxPool2d(m)
    if type(m) is nn.AvgPool2d:
        return G.AvgPool2d(m)
    if type(m) is nn.AdaptiveAvgPool2d:
        return G.AdaptiveAvgPool2d(m)
    if type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
        return L.Flatten(m)
    if type(m) is nn.LayerNorm:
        return G.LayerNorm(m, slots)
    if type(m) is nn.Dropout:
        return G.Dropout(m)
    if not slots and type(m) in _ELEMENTWISE:
        return L.Stateless(m, layout="any")
    if not slots and type(m) in _POOLING + (nn.Dropout2d,):
        return L.Stateless(m, layout="g")
    return L.Generic(m, slots)


_make_layer = make_layer


def is_known(m: nn.Module) -> bool:
    """Whether the graph tracer keeps ``m`` as one leaf (a batched layer or a torch.nn module)."""
    return not isinstance(m, nn.Sequential) and type(m).__module__.startswith("torch.nn")


def _needs_graph(module: nn.Module) -> bool:
    """A model with a module the chain would run per task whose own forward a graph may batch."""
    def visit(m):
        if _is_plain_sequential(m):
            return any(visit(c) for c in m)
        return not is_known(m)

    return visit(module)


def loss_rgrad(loss, out, target, rout, out_layout: str, acc, scale: float, T: int):
    """R(d loss / d out) along R(out), in the layout the tape ended in. With a tape in lower precision than
    ``acc`` (mixed precision) it is computed in ``acc`` and scaled by the inner loss scale."""
    if out.dtype != acc:
        rgy = loss.rgrad(out.to(acc), target, rout.to(acc))
        rgy = (rgy * scale if scale != 1 else rgy).to(out.dtype)
    else:
        rgy = loss.rgrad(out, target, rout)
    return L.to_g(rgy, T) if out_layout == "g" else rgy


class BatchedModel:
    """A module as a list of batched layers over one FlatParams.

    ``adapt_from`` is the index of the first adapted layer: every parameter from that layer on is
    adapted per task (the suffix [a, P) of the flat buffer); layers before it run once with shared θ.
    """

    def __new__(cls, module: nn.Module, flat: FlatParams, head_only: bool = False):
        if cls is BatchedModel and _needs_graph(module):
            from .graph.model import GraphModel  # a module graph: residual sums, concat, custom blocks

            cls = GraphModel
        return super().__new__(cls)

    def __init__(self, module: nn.Module, flat: FlatParams, head_only: bool = False):
        self.flat = flat
        slots_by_id = flat.offsets()
        self.layers: List[L.Layer] = []

        def visit(m: nn.Module):
            if _is_plain_sequential(m):
                for child in m:
                    visit(child)
                return
            slots = [slots_by_id[id(p)] for p in m.parameters()]
            layer = make_layer(m, slots)
            if layer is not None:
                self.layers.append(layer)

        visit(module)
        used = [s for layer in self.layers for s in layer.slots]
        if [s.offset for s in used] != [s.offset for s in flat.slots]:
            names = [s.name for s in used]
            raise ValueError("model: each parameter must belong to exactly one layer, in registration order "
                             f"(parameters shared between layers are not supported by BatchedMAML); got {names}")
        with_params = [i for i, layer in enumerate(self.layers) if layer.slots]
        self.adapt_from = with_params[-1] if head_only else with_params[0]
        self.adapt_offset = self.layers[self.adapt_from].slots[0].offset
        self.adapted_numel = flat.numel - self.adapt_offset
        self._slot_sizes = [s.numel for s in flat.slots]
        self._slot_index = {s.offset: i for i, s in enumerate(flat.slots)}
        self._first_adapted_slot = self._slot_index[self.adapt_offset]
        self.local_autograd = any(layer.local_autograd for layer in self.layers[self.adapt_from:])

    def describe(self) -> List[str]:
        return [("* " if i >= self.adapt_from else "  ") + repr(layer) for i, layer in enumerate(self.layers)]

    # -- execution -------------------------------------------------------------------------------
    def _weights(self, layer, parts, T):
        """A layer's weights: shared views of θ, or per-task views of the fast weights [T, Pa]."""
        if not layer.slots:
            return [], False
        theta_parts, fast_parts = parts
        first = self._slot_index[layer.slots[0].offset]
        if fast_parts is None or first < self._first_adapted_slot:
            return [theta_parts[first + i].view(s.shape) for i, s in enumerate(layer.slots)], False
        k = first - self._first_adapted_slot
        return [fast_parts[k + i].view(T, *s.shape) for i, s in enumerate(layer.slots)], True

    def _split(self, theta, fast, start: int, stop: int):
        # One split per tensor and call: per-parameter slicing would give every slice its own
        # backward that zero-fills a full-size gradient.
        need_theta = fast is None or start < self.adapt_from
        if isinstance(theta, list):  # already split per parameter (ANIL's head: None for the body's pieces)
            return theta, (fast if fast is None or isinstance(fast, list) else fast.split(self.slot_sizes(), dim=1))
        theta_parts = theta.split(self._slot_sizes) if need_theta else None
        if fast is None or isinstance(fast, list):  # a list: contiguous per-parameter pieces [T, n_i] already
            return theta_parts, fast
        return theta_parts, fast.split(self.slot_sizes(), dim=1)

    @property
    def first_adapted_slot(self) -> int:
        """Index (in the flat buffer's slot order) of the first adapted parameter: slots from it on are the
        adapted pieces, those before it the shared body (ANIL)."""
        return self._first_adapted_slot

    def slot_sizes(self) -> List[int]:
        """Sizes of the adapted parameters' pieces, in flat order."""
        return self._slot_sizes[self._first_adapted_slot:]

    def forward(self, start: int, stop: int, theta, fast, x, layout: str, rc: L.RunCtx, record: bool):
        """Run layers [start, stop) with fast weights ``fast`` (None: θ everywhere; [T, Pa]; or its pieces as
        a list). Returns (output, layout, tape)."""
        tape = []
        parts = self._split(theta, fast, start, stop)
        no_grad = not torch.is_grad_enabled()
        fresh = False  # x is the output of the layer before, run in this call, which does not keep it
        for i in range(start, stop):
            layer = self.layers[i]
            converted = None
            if layer.layout != "any" and layer.layout != layout:
                x = L.to_g(x, rc.T) if layer.layout == "g" else L.to_tn(x, rc.T)
                converted, layout = layout, layer.layout
            ws, batched = self._weights(layer, parts, rc.T)
            if fresh and no_grad and converted is None and layer.forward_in_place is not None:
                x, saved = layer.forward_in_place(x)
            else:
                x, saved = layer.forward(ws, batched, x, rc)
            fresh = layer.fresh_output
            layout = layer.out_layout(layout)
            if record:
                tape.append((layer, ws, batched, saved, converted))
        return x, layout, tape

    def backward(self, tape, gy, out_layout: str, rc: L.RunCtx, record_gy: bool = False, flat: bool = True,
                 input_grad: bool = False):
        """d(sum_t loss_t)/d(adapted weights) per task, as one [T, Pa] tensor (flat order), or with
        ``flat=False`` as its per-parameter pieces [T, n_i].

        With ``record_gy`` also returns the gradient entering each tape entry (for the R-operators).
        With ``input_grad`` returns (that, d(sum_t loss_t)/d(the tape's input), in the input's layout).
        """
        if out_layout == "g":
            gy = L.to_g(gy, rc.T)
        first = 0 if input_grad else next(k for k, entry in enumerate(tape) if entry[0].slots)
        pieces = []
        gys = [None] * len(tape)
        no_grad = not torch.is_grad_enabled()
        fresh = False  # gy is the input gradient of the layer after, which does not keep it
        for k in range(len(tape) - 1, first - 1, -1):
            layer, ws, batched, saved, converted = tape[k]
            gys[k] = gy  # a layer's backward_in_place may overwrite it: its R-backward must not read gy (ReLU's does not)
            need_gx = k > first or input_grad
            if fresh and no_grad and layer.backward_in_place is not None:
                gx, grads = layer.backward_in_place(saved, gy)
            else:
                gx, grads = layer.backward(ws, batched, saved, gy, need_gx, rc)
            pieces.extend(g.reshape(rc.T, -1) for g in reversed(grads))
            fresh = layer.fresh_grad_input and converted is None
            if need_gx:
                gy = gx
                if converted is not None:
                    gy = L.to_g(gy, rc.T) if converted == "g" else L.to_tn(gy, rc.T)
        pieces.reverse()
        g = pieces if not flat else pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        if input_grad:
            g = (g, gy)
        return (g, gys) if record_gy else g

    # -- exact second-order reverse (R-operators) ------------------------------------------------
    def supports_rop(self) -> bool:
        """Every layer has R-operators and every parameter is adapted (no ANIL)."""
        return self.adapt_from == 0 and all(hasattr(layer, "rforward") for layer in self.layers)

    def hvp(self, tape, gys, out, out_layout: str, target, loss, direction, rc: L.RunCtx,
            scale: float = 1.0, input_grad: bool = False):
        """Per-task Hessian-vector products H_t v_t of each task's support loss at the tape's weights,
        along ``direction`` (per-parameter pieces [T, n_i] of the adapted weights, in flat order): the
        R-operator (Pearlmutter) of the recorded inner gradient. Returns pieces alike.

        ``out`` is the model output in "tn" layout, ``out_layout`` the layout the tape ended in.
        A tape recorded in lower precision than ``direction`` (mixed precision) runs the layers' R-operators
        in the tape's dtype and the loss's in the direction's; ``gys`` then hold the gradient of
        ``scale`` * loss, so the loss's R-operator is scaled alike and the result divided by it.

        ``input_grad`` (ANIL's head, fp32 only): also return R(d loss / d input), the tape input's gradient
        differentiated along the direction, i.e. the mixed second derivative d/dx <d loss/dW, v>, in the
        input's layout: (pieces, that).
        """
        acc, low = direction[0].dtype, out.dtype
        parts = [d.to(low) for d in direction]
        T = rc.T

        def rws_of(layer):
            k = self._slot_index[layer.slots[0].offset] - self._first_adapted_slot
            return [parts[k + i].reshape(T, *s.shape) for i, s in enumerate(layer.slots)]

        # R-forward: each layer returns R(y) and what its R-backward needs of this pass
        rx, rsaved, rws_all = None, [], []
        for layer, ws, batched, saved, converted in tape:
            rws = rws_of(layer) if layer.slots else []
            rws_all.append(rws)
            if rx is not None and converted is not None:
                rx = L.to_g(rx, T) if layer.layout == "g" else L.to_tn(rx, T)
            r = None
            if rx is not None or rws:
                rx, r = layer.rforward(ws, batched, saved, rx, rws, rc)
            rsaved.append(r)
        rgy = loss_rgrad(loss, out, target, self.output(rx, out_layout, T), out_layout, acc, scale, T)
        first = 0 if input_grad else next(k for k, entry in enumerate(tape) if entry[0].slots)
        pieces = []
        for k in range(len(tape) - 1, first - 1, -1):
            layer, ws, batched, saved, converted = tape[k]
            need_gx = k > first or input_grad
            rgy, grads = layer.rbackward(ws, batched, saved, gys[k], rgy, rsaved[k], rws_all[k], need_gx, rc)
            pieces.extend(g.reshape(T, -1) for g in reversed(grads))
            if need_gx and converted is not None:
                rgy = L.to_g(rgy, T) if converted == "g" else L.to_tn(rgy, T)
        pieces.reverse()
        if input_grad:
            return pieces, rgy
        if low == acc:
            return pieces
        return [h.to(acc) / scale if scale != 1 else h.to(acc) for h in pieces]

    def head_input(self):
        """(key, why): the one value the adapted layers read from the shared body (None for a chain, whose
        range takes one tensor); key False, with the reason, where the head's range cannot take its input's
        gradient."""
        return None, ""

    @staticmethod
    def output(x, layout: str, T: int):
        return L.to_tn(x, T) if layout == "g" else x
