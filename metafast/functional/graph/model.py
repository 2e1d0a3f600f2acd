"""A module graph (residual sums, concat, custom blocks) run as batched layers over T tasks.

``GraphModel`` is the engine BatchedModel becomes for a model that is not a plain chain: the same
interface (forward over a range of nodes with a tape, backward to the per-task gradient of the
adapted weights, R-operator Hessian-vector products for the exact reverse), over a DAG of nodes in
execution order. Gradients and R-gradients reaching a value from several consumers add up.

A range [start, stop) of nodes that ends before the last one returns its live values (``Live``) in
place of a tensor; BatchedMAML passes that back as the next range's input (ANIL's shared body).

In-place forms (ReLU/LeakyReLU overwriting x, gy, R(x), R(gy)) run only on a tensor no other node
reads: a value with one consumer, freshly made by its producer.
"""
from typing import Dict, List, Optional

import torch

from ... import fallback as _fallback
from .. import layers as L
from ..executor import BatchedModel, is_known, loss_rgrad, make_layer
from ..flat import FlatParams
from .trace import GRAPH_INPUT, GraphNode, Untraceable, trace_graph


class Live:
    """Values of a graph range that later nodes read: {value index: (tensor, layout)}."""

    __slots__ = ("values",)

    def __init__(self, values: Dict[int, tuple]):
        self.values = values


class GraphTape:
    """What a forward over nodes [start, stop) recorded: per node (index, ws, batched, saved, conversions),
    and which values depend on the adapted weights (``active``)."""

    __slots__ = ("entries", "active", "out")

    def __init__(self):
        self.entries, self.active, self.out = [], set(), None

    def __len__(self):
        return len(self.entries)


CHANNELS_LAST = False  # channels_last CPU maps: faster convolutions alone, slower meta-step (bench/NOTES.md)


def _convert(x, src: str, dst: str, T: int):
    if dst != "g":
        return L.to_tn(x, T)
    if CHANNELS_LAST and x.dim() == 5 and x.device.type == "cpu":
        return to_g_channels_last(x, T)
    return L.to_g(x, T)


def to_g_channels_last(x: torch.Tensor, T: int) -> torch.Tensor:
    """[T, N, C, H, W] -> [N, T*C, H, W] in channels_last memory (one copy). oneDNN convolves channels_last
    maps without reordering them (about 1.3-1.6x faster grouped convolutions forward and backward at
    ResNet-12's shapes, 2 threads), and every layer after keeps the format (see bench/NOTES.md)."""
    t, n, c, h, w = x.shape
    y = torch.empty((n, h, w, t, c), dtype=x.dtype, device=x.device)
    y.copy_(x.permute(1, 3, 4, 0, 2))
    return y.view(n, h, w, t * c).permute(0, 3, 1, 2)


def _new(t: torch.Tensor, *others) -> bool:
    """t has storage of its own (not a view of, or the same tensor as, any of ``others``)."""
    p = t.untyped_storage().data_ptr()
    return all(o is None or o.untyped_storage().data_ptr() != p for o in others)


class GraphModel(BatchedModel):
    def __init__(self, module, flat: FlatParams, head_only: bool = False):
        self.flat = flat
        slots_by_id = flat.offsets()

        def slots_of(m):
            return [slots_by_id[id(p)] for p in m.parameters()]

        try:
            nodes, notes = trace_graph(module, is_known, make_layer, slots_of)
        except Untraceable as e:
            # the whole model runs per task: one opaque node
            nodes = [GraphNode(type(module).__name__, L.Generic(module, slots_of(module), loop=True), [GRAPH_INPUT],
                               why=str(e))]
            notes = [f"{type(module).__name__}: {e}; the whole model runs per task (vmap or a loop)"]
        for note in notes:
            _fallback.fallback("graph_node", f"BatchedMAML: {note}", stacklevel=4)
        self.nodes: List[GraphNode] = nodes
        self.layers = [n.layer for n in nodes]
        used = sorted(s.offset for layer in self.layers for s in layer.slots)
        if used != [s.offset for s in flat.slots]:
            missing = [s.name for s in flat.slots if s.offset not in used]
            raise ValueError("model: each parameter must belong to exactly one layer of the traced graph; "
                             f"not used by its forward: {missing}")
        with_params = [i for i, layer in enumerate(self.layers) if layer.slots]
        self.adapt_from = with_params[-1] if head_only else with_params[0]
        self._slot_sizes = [s.numel for s in flat.slots]
        self._slot_index = {s.offset: i for i, s in enumerate(flat.slots)}
        adapted = sorted(self._slot_index[s.offset] for layer in self.layers[self.adapt_from:] for s in layer.slots)
        if adapted != list(range(len(flat.slots) - len(adapted), len(flat.slots))):
            raise ValueError("model: the adapted layers (from node "
                             f"{nodes[self.adapt_from].name} on, in execution order) must own the last parameters "
                             "in registration order; register the head last")
        self._first_adapted_slot = adapted[0]
        self.adapt_offset = flat.slots[adapted[0]].offset
        self.adapted_numel = flat.numel - self.adapt_offset
        self.local_autograd = any(layer.local_autograd for layer in self.layers[self.adapt_from:])
        # the last node index that reads each value (values read after a range's end stay live)
        self._last_use = {}
        for i, node in enumerate(nodes):
            for j in node.inputs:
                self._last_use[j] = i

    def describe(self) -> List[str]:
        lines = []
        for i, (node, layer) in enumerate(zip(self.nodes, self.layers)):
            mark = "* " if i >= self.adapt_from and layer.slots else "  "
            args = ", ".join("input" if j == GRAPH_INPUT else self.nodes[j].name for j in node.inputs)
            line = f"{mark}{node.name} = {layer!r}({args})"
            if node.why:
                how = "local autograd" if isinstance(layer, L.Stateless) else "per task"
                line += f"  [{how}: {node.why}]"
            lines.append(line)
        return lines

    # -- forward ---------------------------------------------------------------------------------
    def _layout_for(self, layer, layouts):
        if layer.layout != "any":
            return layer.layout
        return layouts[0]

    def forward(self, start: int, stop: int, theta, fast, x, layout: str, rc: L.RunCtx, record: bool):
        T = rc.T
        parts = self._split(theta, fast, start, stop)
        env = dict(x.values) if isinstance(x, Live) else {GRAPH_INPUT: (x, layout)}
        no_grad = not torch.is_grad_enabled()
        tape = GraphTape()
        active = tape.active
        for i in range(start, stop):
            node = self.nodes[i]
            layer = node.layer
            ins = [env[j] for j in node.inputs]
            want = self._layout_for(layer, [lay for _, lay in ins])
            xs, convs = [], []
            for v, lay in ins:
                if lay != want:
                    xs.append(_convert(v, lay, want, T))
                    convs.append((lay, want))
                else:
                    xs.append(v)
                    convs.append(None)
            ws, batched = self._weights(layer, parts, T)
            if layer.multi:
                y, saved = layer.forward(ws, batched, xs, rc)
            else:
                j = node.inputs[0]
                own = (no_grad and j != GRAPH_INPUT and j >= start and convs[0] is None
                       and self.nodes[j].consumers == 1 and self.layers[j].fresh_output)
                if own and layer.forward_in_place is not None:
                    y, saved = layer.forward_in_place(xs[0])
                else:
                    y, saved = layer.forward(ws, batched, xs[0], rc)
            env[i] = (y, layer.out_layout(want))
            for j in node.inputs:  # drop values no later node reads (the tape keeps what layers saved)
                if self._last_use.get(j, -1) == i and j in env:
                    del env[j]
            if record:
                if (layer.slots and i >= self.adapt_from) or any(j in active for j in node.inputs):
                    active.add(i)
                tape.entries.append((i, ws, batched, saved, convs))
        if stop == len(self.nodes):
            y, lay = env[stop - 1]
            tape.out = stop - 1
            return y, lay, tape
        return Live(env), None, tape

    # -- backward --------------------------------------------------------------------------------
    def _piece_index(self, layer) -> int:
        return self._slot_index[layer.slots[0].offset] - self._first_adapted_slot

    def _pieces(self, found: Dict[int, torch.Tensor]) -> List[torch.Tensor]:
        n = len(self._slot_sizes) - self._first_adapted_slot
        missing = [k for k in range(n) if k not in found]
        if missing:
            raise RuntimeError(f"graph backward: no gradient for adapted parameters {missing} (a tape that does "
                               "not cover the adapted nodes)")
        return [found[k] for k in range(n)]

    def _propagate(self, node, layer, grads, gxs, gy, need, convs, acc, found, no_grad: bool, T: int):
        """One node's reverse step: its weight grads into ``found`` (by piece index), its input grads,
        back in each input's layout, added up at each input value in ``acc``. An input grad is owned
        (may be overwritten by the producer's in-place forms) when it is new and the value's only one."""
        if grads:
            k = self._piece_index(layer)
            for n, gw in enumerate(grads):
                found[k + n] = gw.reshape(T, -1)
        for j, gx, nd, conv in zip(node.inputs, gxs, need, convs):
            if not nd:
                continue
            if conv is not None:
                gx = _convert(gx, conv[1], conv[0], T)
            own = _new(gx, gy) and self.nodes[j].consumers == 1
            if j in acc:
                prev, prev_own = acc[j]
                acc[j] = (prev.add_(gx) if (prev_own and no_grad) else prev + gx, True)
            else:
                acc[j] = (gx, own)

    def backward(self, tape: GraphTape, gy, out_layout: str, rc: L.RunCtx, record_gy: bool = False,
                 flat: bool = True, input_grad: bool = False):
        T = rc.T
        key = self.head_input()[0] if input_grad else None
        if out_layout == "g":
            gy = L.to_g(gy, T)
        acc = {tape.out: (gy, False)}
        found, gys = {}, {}
        no_grad = not torch.is_grad_enabled()
        active = tape.active
        for i, ws, batched, saved, convs in reversed(tape.entries):
            if i not in active:
                continue
            node, layer = self.nodes[i], self.layers[i]
            g, own = acc.pop(i)
            gys[i] = g
            need = [j in active or (input_grad and j == key) for j in node.inputs]
            if layer.multi:
                gxs, grads = layer.backward(ws, batched, saved, g, need, rc)
            else:
                if own and no_grad and layer.backward_in_place is not None:
                    gx, grads = layer.backward_in_place(saved, g)
                else:
                    gx, grads = layer.backward(ws, batched, saved, g, need[0], rc)
                gxs = [gx]
            self._propagate(node, layer, grads, gxs, g, need, convs, acc, found, no_grad, T)
        pieces = self._pieces(found)
        out = pieces if not flat else pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        if input_grad:
            out = (out, acc.pop(key)[0])
        return (out, gys) if record_gy else out

    # -- exact second-order reverse --------------------------------------------------------------
    def supports_rop(self) -> bool:
        return self.adapt_from == 0 and all(hasattr(layer, "rforward") for layer in self.layers)

    def hvp(self, tape: GraphTape, gys, out, out_layout: str, target, loss, direction, rc: L.RunCtx,
            scale: float = 1.0, input_grad: bool = False):
        key = self.head_input()[0] if input_grad else None
        acc_dtype, low = direction[0].dtype, out.dtype
        parts = [d.to(low) for d in direction]
        T = rc.T
        active = tape.active

        def rws_of(i, layer):
            if not layer.slots or i < self.adapt_from:
                return []
            k = self._piece_index(layer)
            return [parts[k + n].reshape(T, *s.shape) for n, s in enumerate(layer.slots)]

        # R-forward: R(y) of every active value; each is owned by its one consumer when it is new
        rx: Dict[int, tuple] = {}
        rsaved, rws_all = {}, {}
        for i, ws, batched, saved, convs in tape.entries:
            if i not in active:
                continue
            node, layer = self.nodes[i], self.layers[i]
            rws = rws_of(i, layer)
            rws_all[i] = rws
            rxs, owns = [], []
            for j, conv in zip(node.inputs, convs):
                r = rx.get(j)
                if r is None:
                    rxs.append(None)
                    owns.append(False)
                    continue
                t, own = r
                if conv is not None:
                    t = _convert(t, *conv, T)
                rxs.append(t)
                owns.append(own)
                if self._last_use.get(j) == i:
                    del rx[j]
            if layer.multi:
                ry, rs = layer.rforward(ws, batched, saved, rxs, rws, rc)
            else:
                r0 = rxs[0]
                if r0 is not None and layer.rop_in_place and not owns[0]:
                    r0 = r0.clone()
                ry, rs = layer.rforward(ws, batched, saved, r0, rws, rc)
            rx[i] = (ry, node.consumers == 1 and _new(ry, *rxs))
            rsaved[i] = rs
        rgy = loss_rgrad(loss, out, target, self.output(rx[tape.out][0], out_layout, T), out_layout, acc_dtype,
                         scale, T)
        # R-backward, accumulating R(gy) at fan-out
        acc = {tape.out: (rgy, True)}
        no_grad = not torch.is_grad_enabled()
        found = {}
        for i, ws, batched, saved, convs in reversed(tape.entries):
            if i not in active:
                continue
            node, layer = self.nodes[i], self.layers[i]
            r, own = acc.pop(i)
            need = [j in active or (input_grad and j == key) for j in node.inputs]
            if layer.multi:
                rgxs, grads = layer.rbackward(ws, batched, saved, gys[i], r, rsaved[i], rws_all[i], need, rc)
            else:
                if layer.rop_in_place and not own:
                    r = r.clone()
                rgx, grads = layer.rbackward(ws, batched, saved, gys[i], r, rsaved[i], rws_all[i], need[0], rc)
                rgxs = [rgx]
            self._propagate(node, layer, grads, rgxs, r, need, convs, acc, found, no_grad, T)
        pieces = self._pieces(found)
        if input_grad:
            return pieces, acc.pop(key)[0]
        if low == acc_dtype:
            return pieces
        return [h.to(acc_dtype) / scale if scale != 1 else h.to(acc_dtype) for h in pieces]

    def head_input(self):
        """(key, why): ANIL's head [adapt_from, n) must read exactly one value of the body, and every node of
        it must depend on the head's weights (the gradient tape then reaches that value through the head);
        key False and the reason otherwise."""
        a = self.adapt_from
        outside = sorted({j for node in self.nodes[a:] for j in node.inputs if j < a})
        if len(outside) != 1 or outside[0] == GRAPH_INPUT:
            names = ["input" if j == GRAPH_INPUT else self.nodes[j].name for j in outside]
            return False, f"the adapted nodes read {len(outside)} values of the body ({', '.join(names)}), not one"
        active = {a}
        for i in range(a + 1, len(self.nodes)):
            if any(j in active for j in self.nodes[i].inputs):
                active.add(i)
            else:
                return False, f"node {self.nodes[i].name} after the head does not depend on it"
        return outside[0], ""
