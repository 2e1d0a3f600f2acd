"""Trace a module with torch.fx into a list of batched graph nodes in execution (topological) order.

Known modules (``executor.make_layer``) are leaves; other modules are traced through. A module whose
forward torch.fx cannot trace (data-dependent control flow, direct parameter use, ...) becomes one
opaque node run per task (``layers.Generic``), and the graph is traced again around it; a function
call the graph has no batched layer for is wrapped alike when it takes one tensor. Every such node
carries ``why``, reported through metafast.fallback and listed by ``describe()``.
"""
import operator
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import layers as L
from . import layers as G

GRAPH_INPUT = -1  # the index of the model's input among node inputs


class GraphNode:
    """One batched layer: ``inputs`` are indices of earlier nodes (or GRAPH_INPUT); node i's output is
    value i. ``why`` says why a node runs per task (None when it is batched)."""

    __slots__ = ("name", "layer", "inputs", "why", "consumers")

    def __init__(self, name: str, layer: L.Layer, inputs: List[int], why: Optional[str] = None):
        self.name, self.layer, self.inputs, self.why = name, layer, list(inputs), why
        self.consumers = 0


class Untraceable(Exception):
    """The model as a whole cannot become a graph (the message says why)."""


class _Tracer(fx.Tracer):
    def __init__(self, is_known: Callable[[nn.Module], bool], opaque: Set[str]):
        super().__init__()
        self.is_known, self.opaque = is_known, opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opaque or self.is_known(m):
            return True
        return super().is_leaf_module(m, qualname)


class _Call(nn.Module):
    """A one-tensor function call of the traced forward as a module (for the per-task fallback)."""

    def __init__(self, fn, args, kwargs, pos: int, what: str):
        super().__init__()
        self.fn, self.args, self.kwargs, self.pos, self.what = fn, list(args), dict(kwargs), pos, what

    def forward(self, x):
        args = list(self.args)
        args[self.pos] = x
        if isinstance(self.fn, str):
            return getattr(args[0], self.fn)(*args[1:], **self.kwargs)
        return self.fn(*args, **self.kwargs)

    def extra_repr(self):
        return self.what


def _trace(root: nn.Module, is_known, opaque: Set[str]) -> fx.Graph:
    graph = _Tracer(is_known, opaque).trace(root)
    gm = fx.GraphModule(root, graph)  # dead-code elimination asks the owning module about purity
    gm.graph.eliminate_dead_code()
    return gm.graph


def _find_untraceable(root: nn.Module, is_known, opaque: Set[str]) -> Optional[str]:
    """The qualified name of the deepest submodule that torch.fx cannot trace on its own."""
    def visit(m: nn.Module, prefix: str) -> Optional[str]:
        for name, child in m.named_children():
            q = f"{prefix}{name}"
            if q in opaque or is_known(child) or fx.Tracer().is_leaf_module(child, q):
                continue
            try:
                _Tracer(is_known, set()).trace(child)
            except Exception:  # noqa: BLE001 - any tracing failure makes the child opaque (reported by the caller)
                return visit(child, q + ".") or q
            found = visit(child, q + ".")
            if found:
                return found
        return None

    return visit(root, "")


def _owner(target: str) -> str:
    return target.rsplit(".", 1)[0] if "." in target else ""


def trace_graph(root: nn.Module, is_known, make_layer, slots_of) -> Tuple[List[GraphNode], List[str]]:
    """(nodes, fallback notes) of ``root``. ``make_layer(module, slots)`` builds a batched layer (a
    ``layers.Generic`` when it has none); ``slots_of(module)`` are a module's parameter slots.
    Raises Untraceable when the root's own forward cannot be traced."""
    opaque: Dict[str, str] = {}
    for _ in range(64):
        try:
            graph = _trace(root, is_known, set(opaque))
        except Exception as e:  # noqa: BLE001 - torch.fx raises many types; each is turned into a message
            culprit = _find_untraceable(root, is_known, set(opaque))
            if culprit is None:
                raise Untraceable(f"torch.fx cannot trace {type(root).__name__}.forward ({type(e).__name__}: {e})")
            opaque[culprit] = f"torch.fx cannot trace it ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            continue
        # a forward reading parameters directly (get_attr) runs its module per task
        owners = {_owner(n.target) for n in graph.nodes if n.op == "get_attr"}
        if "" in owners:
            raise Untraceable(f"{type(root).__name__}.forward uses its own parameters or buffers directly")
        new = {o for o in owners if o not in opaque}
        if not new:
            break
        for o in new:
            opaque[o] = "its forward uses its parameters or buffers directly"
    else:
        raise Untraceable("tracing did not settle")
    return _build(root, graph, opaque, make_layer, slots_of, _dropout_modes(root, graph, is_known, set(opaque)))


def _dropout_modes(root: nn.Module, graph: fx.Graph, is_known, opaque: Set[str]) -> Dict[str, bool]:
    """Node name -> whether that F.dropout call follows its module's mode (``training=self.training``):
    its traced flag flips when the model is traced again in the other mode. Calls whose flag stays are
    constants (F.dropout's default training=True drops in eval mode too)."""
    calls = _dropout_flags(graph)
    if not calls:
        return {}
    modes = {m: m.training for m in root.modules()}
    try:
        root.train(not root.training)
        other = _dropout_flags(_trace(root, is_known, opaque))
    except Exception:  # noqa: BLE001 - a forward that traces in one mode only: its calls keep the traced flag
        other = {}
    finally:
        for m, mode in modes.items():
            m.training = mode
    return {name: name in other and other[name] != flag for name, flag in calls.items()}


def _const(a) -> bool:
    return isinstance(a, (int, float, bool, str, type(None))) or (
        isinstance(a, (tuple, list)) and all(_const(x) for x in a))


_ACT_FUNCS = {
    F.relu: lambda a, k: nn.ReLU(), torch.relu: lambda a, k: nn.ReLU(),
    torch.tanh: lambda a, k: nn.Tanh(), F.tanh: lambda a, k: nn.Tanh(),
    torch.sigmoid: lambda a, k: nn.Sigmoid(), F.sigmoid: lambda a, k: nn.Sigmoid(),
    F.leaky_relu: lambda a, k: nn.LeakyReLU(*a, **k), F.elu: lambda a, k: nn.ELU(*a, **k),
    F.gelu: lambda a, k: nn.GELU(**k), F.silu: lambda a, k: nn.SiLU(),
}
_ACT_METHODS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def _dropout_flags(graph: fx.Graph) -> Dict[str, object]:
    """Node name -> the traced ``training`` argument of each F.dropout call (F.dropout's default: True)."""
    return {n.name: n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True)
            for n in graph.nodes if n.op == "call_function" and n.target is F.dropout}


def _build(root, graph: fx.Graph, opaque: Dict[str, str], make_layer, slots_of, dropout_modes: Dict[str, bool]):
    modules = dict(root.named_modules())
    index: Dict[fx.Node, int] = {}
    alias: Dict[fx.Node, int] = {}  # nodes that pass their input through (Identity, eval Dropout)
    sizes: Set[fx.Node] = set()  # x.size(0) / x.shape[0] proxies (only used to flatten)
    nodes: List[GraphNode] = []
    notes: List[str] = []
    used_params: Dict[str, str] = {}

    def ref(a):
        if a in alias:
            return alias[a]
        if a not in index:
            raise Untraceable(f"node {a.name} ({a.op} {a.target}) is not a tensor the batched graph holds")
        return index[a]

    def add(n: fx.Node, layer, inputs, why=None, name=None):
        """Node ``n``'s value is the new layer's output (``name``: when one fx node becomes several layers)."""
        if why is not None:
            how = ("it runs batched with a local autograd backward and no R-operators (no exact reverse)"
                   if isinstance(layer, L.Stateless) else "it runs per task (vmap or a loop)")
            notes.append(f"{n.name}: {why}; {how}")
        inputs = [ref(i) for i in inputs]
        index[n] = len(nodes)
        nodes.append(GraphNode(name or n.name, layer, inputs, why))

    def fallback_call(n, fn, what):
        tensors = [i for i, a in enumerate(n.args) if isinstance(a, fx.Node)]
        if len(tensors) != 1 or any(isinstance(v, fx.Node) for v in n.kwargs.values()):
            raise Untraceable(f"node {n.name} ({what}) takes several tensors and has no batched layer")
        pos = tensors[0]
        args = [None if i == pos else a for i, a in enumerate(n.args)]
        if not all(_const(a) for i, a in enumerate(args) if i != pos):
            raise Untraceable(f"node {n.name} ({what}) has non-constant arguments")
        mod = _Call(fn, args, n.kwargs, pos, what)
        add(n, L.Generic(mod, []), [n.args[pos]], why=f"no batched layer for {what}")

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise Untraceable(f"{type(root).__name__}.forward takes {len(placeholders)} inputs (one tensor expected)")
    alias[placeholders[0]] = GRAPH_INPUT
    out = None
    for n in graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            out = n.args[0]
            break
        if n.op == "call_module":
            m = modules[n.target]
            tensor_args = [a for a in n.args if isinstance(a, fx.Node)]
            if len(n.args) != 1 or n.kwargs or len(tensor_args) != 1:
                raise Untraceable(f"module {n.target} ({type(m).__name__}) is called with {len(n.args)} arguments "
                                  "(one tensor expected)")
            slots = slots_of(m)
            for s in slots:
                if s.name in used_params:
                    raise ValueError(f"model: parameter {s.name} is used by {used_params[s.name]} and {n.target}; "
                                     "parameters shared between layers are not supported by BatchedMAML")
                used_params[s.name] = n.target
            layer = L.Generic(m, slots, loop=True) if n.target in opaque else make_layer(m, slots)
            if layer is None:
                alias[n] = ref(n.args[0])
                continue
            why = None
            if isinstance(layer, L.Generic) or isinstance(layer, L.Stateless):
                why = opaque.get(n.target) or f"no batched layer for {type(m).__name__}"
            add(n, layer, [n.args[0]], why)
            continue
        if n.op == "call_function" and n.target is F.dropout and n.args and isinstance(n.args[0], fx.Node):
            drop = _functional_dropout(n, root, modules, dropout_modes.get(n.name, False))
            if drop is None:
                alias[n] = ref(n.args[0])
            else:
                add(n, G.Dropout(drop), [n.args[0]])
            continue
        if n.op == "call_function" or n.op == "call_method":
            _function(n, add, alias, sizes, ref, fallback_call)
            continue
        raise Untraceable(f"node {n.name}: {n.op} {n.target} is not supported")
    if not isinstance(out, fx.Node) or out in sizes or ref(out) == GRAPH_INPUT:
        raise Untraceable(f"{type(root).__name__}.forward must return one tensor computed from its input")
    if ref(out) != len(nodes) - 1:
        raise Untraceable(f"{type(root).__name__}.forward returns a value that is not its last computed one")
    for node in nodes:
        for i in node.inputs:
            if i != GRAPH_INPUT:
                nodes[i].consumers += 1
    return nodes, notes


def _scalar(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _function(n: fx.Node, add, alias, sizes, ref, fallback_call):
    t, args, kw = n.target, n.args, n.kwargs
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    what = f"{n.op} {name}"
    if t in (operator.add, torch.add, operator.sub, torch.sub, "add", "sub") and len(args) == 2 and (
            not kw or set(kw) == {"alpha"}):
        a, b = args
        alpha = kw.get("alpha", 1)
        sign = -1 if t in (operator.sub, torch.sub, "sub") else 1
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            add(n, G.Add([1, sign * alpha], what=n.name), [a, b])
            return
    if t in (operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div") and len(args) == 2 and not kw:
        a, b = args
        div = t in (operator.truediv, torch.div, "div")
        if isinstance(a, fx.Node) and _scalar(b):
            add(n, G.Scale(1 / b if div else b, what=f"{n.name}: x {'/' if div else '*'} {b}"), [a])
            return
        if isinstance(b, fx.Node) and _scalar(a) and not div:
            add(n, G.Scale(a, what=f"{n.name}: {a} * x"), [b])
            return
    if t in (torch.cat, torch.concat) or (t == "cat"):
        seq = args[0] if args else kw.get("tensors")
        dim = args[1] if len(args) > 1 else kw.get("dim", 0)
        if isinstance(seq, (list, tuple)) and all(isinstance(a, fx.Node) for a in seq) and isinstance(dim, int):
            if dim == 0:
                raise Untraceable(f"node {n.name}: torch.cat along the batch dim mixes samples of a task")
            add(n, G.Cat(dim, what=n.name), list(seq))
            return
    if t in (torch.flatten, "flatten") and isinstance(args[0], fx.Node):
        start = args[1] if len(args) > 1 else kw.get("start_dim", 0 if t is torch.flatten else 0)
        end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
        if start == 1 and end == -1:
            add(n, L.Flatten(nn.Flatten()), [args[0]])
            return
    if t in ("view", "reshape") and isinstance(args[0], fx.Node) and len(args) == 3 and args[2] == -1 \
            and args[1] in sizes:
        add(n, L.Flatten(nn.Flatten()), [args[0]])
        return
    if (t == "size" and len(args) == 2 and args[1] == 0) or (
            t is operator.getitem and args[1] == 0 and isinstance(args[0], fx.Node) and args[0] in sizes):
        sizes.add(n)
        return
    if t == "size" and len(args) == 1 or (t is getattr and args[1] == "shape"):
        sizes.add(n)  # x.size() / x.shape: usable through [0] only
        return
    if t in _POOL_FUNCS and args and isinstance(args[0], fx.Node):
        module = _pool_module(t, args[1:], kw)
        if module is not None:
            add(n, _layer_of(module), [args[0]])
            return
    if t in (torch.mean, "mean") and args and isinstance(args[0], fx.Node):
        spatial = _spatial_mean(args[1:], kw)
        if spatial is not None:  # the mean over H, W of an [N, C, H, W] map: adaptive average pooling to 1x1
            add(n, _layer_of(nn.AdaptiveAvgPool2d(1)), [args[0]])
            if not spatial:  # keepdim=False drops the two 1-sized dims: [N, C, 1, 1] -> [N, C]
                add(n, L.Flatten(nn.Flatten()), [n], name=f"{n.name}_flatten")
            return
    if t in _ACT_FUNCS and isinstance(args[0], fx.Node):
        if "inplace" in kw:
            kw = {k: v for k, v in kw.items() if k != "inplace"}
        extra = [a for a in args[1:] if not isinstance(a, bool)]
        add(n, _layer_of(_ACT_FUNCS[t](extra, kw)), [args[0]])
        return
    if t in _ACT_METHODS and len(args) == 1:
        add(n, _layer_of(_ACT_METHODS[t]()), [args[0]])
        return
    if t in ("contiguous", "clone") and len(args) == 1:
        alias[n] = ref(args[0])
        return
    if t is torch.dropout:
        raise Untraceable(f"node {n.name}: torch.dropout (use nn.Dropout or F.dropout, which the graph batches)")
    fallback_call(n, t, what)


# functional poolings as the modules the executor batches: (module class, the function's argument names after
# the input, in its order); max_pool2d's return_indices=True has no batched layer (its output is a pair)
_POOL_FUNCS = {
    F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                  "divisor_override")),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
}


def _pool_module(fn, args, kw) -> Optional[nn.Module]:
    cls, names = _POOL_FUNCS[fn]
    if len(args) > len(names) or not set(kw) <= set(names):
        return None
    given = dict(zip(names, args), **kw)
    if not all(_const(v) for v in given.values()) or given.get("return_indices"):
        return None
    return cls(**given)


def _spatial_mean(args, kw) -> Optional[bool]:
    """keepdim (True/False) when ``mean(x, dim, keepdim)`` averages dims 2 and 3 (H, W of an [N, C, H, W]
    map) and nothing else; None for any other mean (negative dims are not taken: the rank is unknown here)."""
    if len(args) > 2 or not set(kw) <= {"dim", "keepdim"}:
        return None
    given = dict(zip(("dim", "keepdim"), args), **kw)
    dim = given.get("dim")
    if not isinstance(dim, (tuple, list)) or sorted(dim) != [2, 3]:
        return None
    keepdim = given.get("keepdim", False)
    return keepdim if isinstance(keepdim, bool) else None


class FunctionalDropout:
    """``F.dropout(x, p, training=...)`` in a forward, for the batched Dropout layer: ``training`` follows the
    calling module's mode where the call passes it (``training=self.training``), else it is the traced
    constant (F.dropout's default training=True drops in eval mode too)."""

    def __init__(self, p: float, owner: nn.Module, training: bool, follows: bool):
        self.p, self.owner, self.fixed = float(p), owner, None if follows else bool(training)

    @property
    def training(self) -> bool:
        return self.owner.training if self.fixed is None else self.fixed

    def __repr__(self):
        mode = f"{type(self.owner).__name__}.training" if self.fixed is None else self.fixed
        return f"F.dropout(p={self.p}, training={mode})"


def _functional_dropout(n: fx.Node, root: nn.Module, modules, follows: bool) -> Optional[FunctionalDropout]:
    """The batched dropout of an ``F.dropout`` call (None: p = 0, or the identity for good)."""
    given = dict(zip(("p", "training", "inplace"), n.args[1:]), **n.kwargs)
    p, training = given.get("p", 0.5), given.get("training", True)
    if not (_scalar(p) and 0 <= p < 1 and isinstance(training, bool) and set(given) <= {"p", "training", "inplace"}):
        raise Untraceable(f"node {n.name}: F.dropout with p={p!r}, training={training!r} (constants expected, "
                          "0 <= p < 1)")
    if p == 0 or (not training and not follows):
        return None
    stack = n.meta.get("nn_module_stack") or {}  # innermost last; values (path, type) (older torch: key = path)
    key, val = next(reversed(stack.items())) if stack else ("", None)
    path = val[0] if isinstance(val, tuple) else key
    return FunctionalDropout(p, modules.get(path, root), training, follows)


def _layer_of(m: nn.Module) -> L.Layer:
    from ..executor import make_layer  # the executor imports this package: resolved at call time

    return make_layer(m, [])
