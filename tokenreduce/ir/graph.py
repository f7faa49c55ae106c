"""Typed access to FX nodes, graph walks, node creation, and the builder passes and methods emit through.

Everything here works on any ATen FX graph with `meta["val"]` fake values (what `compiler/capture.py`
produces). Nothing here knows what a transformer block or a method is.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import fx

from tokenreduce.ir import patterns as P

T = TypeVar("T")


def args_of(node: fx.Node) -> tuple[Any, ...]:
    """`node.args` typed for reading: graph arguments are heterogeneous (nodes, ints, lists, dtypes)."""
    return tuple(node.args)


def val(node: object) -> object:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape(node: object) -> tuple[int, ...] | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def static_dim(dim: object) -> int | None:
    return dim if isinstance(dim, int) else None


def same_dim(a: Any, b: Any) -> bool:
    """Two sizes are the same dimension: equal ints, or the same symbol (a symbolic batch)."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return str(a) == str(b)
    return bool(a == b)


def module_path(node: fx.Node) -> list[str]:
    """Module paths from the node's nn_module_stack, outermost first, with dynamo's prefix removed."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for entry in stack.values():
        path = entry[0] if isinstance(entry, tuple) else str(entry)
        for prefix in ("L['self'].", "L['self']", "L__self__."):
            if path.startswith(prefix):
                path = path[len(prefix):]
        out.append(path)
    return [p for p in out if p]


def const_scalar(a: object) -> float | None:
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    return None



def reaches_matmul(node: object, depth: int = 6) -> fx.Node | None:
    while isinstance(node, fx.Node) and depth > 0:
        if node.target in P.MATMUL:
            return node
        if node.target in P.SCALE_MUL | P.SCALE_DIV | P.ADD:
            node = args_of(node)[0]
            depth -= 1
            continue
        return None
    return None



def ancestors(node: fx.Node, limit: int = 200) -> list[fx.Node]:
    """`node` and the nodes it is computed from, at most `limit` of them (nearest first)."""
    return list(reach([node], "all_input_nodes", limit))


def descendants(roots: list[fx.Node]) -> set[fx.Node]:
    """The roots and every node computed from them."""
    return set(reach(roots, "users", None))


def nodes_between(sources: list[fx.Node], targets: list[fx.Node]) -> set[fx.Node]:
    """Nodes on some path from a source to a target (both ends included)."""
    up = reach(targets, "all_input_nodes", None)
    return {n for n in descendants(sources) if n in up}


def reach(roots: list[fx.Node], edges: str, limit: int | None) -> dict[fx.Node, None]:
    """Nodes reachable from `roots` along `edges` ("users" or "all_input_nodes"), in visit order."""
    seen: dict[fx.Node, None] = {}
    stack = list(roots)
    while stack and (limit is None or len(seen) < limit):
        n = stack.pop()
        if n in seen:
            continue
        seen[n] = None
        stack.extend(getattr(n, edges))
    return seen



def _is_parameter(node: object) -> bool:
    """A module parameter/buffer, possibly transposed or cast (`get_attr`, `t(get_attr)`, ...)."""
    for _ in range(4):
        if not isinstance(node, fx.Node):
            return False
        if node.op == "get_attr":
            return True
        if node.op != "call_function" or node.target not in P.TRANSPOSE | P.PERMUTE | P.LOGIT_LAYOUT:
            return False
        node = args_of(node)[0]
    return False


def is_projection(node: object) -> bool:
    """`linear`, or a matrix product of an activation with a 2-D parameter (`addmm(b, x, W)`, `mm`, `matmul`)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in P.PROJECTION_OPERANDS:
        return False
    if node.target in P.LINEAR:
        return True
    _, w_pos = P.PROJECTION_OPERANDS[node.target]
    w = args_of(node)[w_pos] if len(node.args) > w_pos else None
    ws = shape(w)
    return ws is not None and len(ws) == 2 and _is_parameter(w)


def projection_input(proj: fx.Node) -> fx.Node | None:
    """The activation a projection reads, looked through flattening views to the `[B, N, C]` tensor (GPT-2's
    Conv1D reads `x.view(-1, C)`)."""
    node = args_of(proj)[P.PROJECTION_OPERANDS[proj.target][0]]
    while isinstance(node, fx.Node) and len(shape(node) or ()) < 3 and node.target in P.FLATTEN:
        node = args_of(node)[0]
    return node if isinstance(node, fx.Node) else None


def ancestor_linear(node: object, limit: int = 12) -> fx.Node | None:
    """The nearest projection (`is_projection`) above `node`, searched breadth-first over all inputs so the
    q/k path may pass through q/k norms, rotary (`q * cos + rotate_half(q) * sin`, partial rotary `cat`),
    fused-qkv splits (`unbind`, `split`, `chunk`, `slice`) and casts. It never looks past another projection,
    an attention op or a parameter; at most `max(limit, 24)` steps deep."""
    if not isinstance(node, fx.Node):
        return None
    return search_up(node, max(limit, 24), lambda n: n if is_projection(n) else None,
                     lambda n: n.target in P.SOFTMAX or n.target in P.SDPA_SPELLINGS)


def search_up(start: fx.Node, steps: int, found: Callable[[fx.Node], T | None],
              blocked: Callable[[fx.Node], bool]) -> T | None:
    """The first non-None `found(n)` over the `call_function` nodes at and above `start`, searched breadth-first
    over all inputs, at most `steps` levels deep; the search never goes above a node that is `blocked` (nor above
    a placeholder, parameter or constant). Each node is visited once."""
    frontier, seen = [start], {start}
    for _ in range(steps):
        nxt: list[fx.Node] = []
        for n in frontier:
            if n.op != "call_function":
                continue
            hit = found(n)
            if hit is not None:
                return hit
            if blocked(n):
                continue
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    nxt.append(a)
        if not nxt:
            return None
        frontier = nxt
    return None


def evaluate_constant(node: fx.Node, limit: int = 60) -> torch.Tensor | None:
    """The value of `node` when it is computed from constants, `arange`s and buffers only (no graph input,
    at most `limit` ancestors), evaluated on real tensors; None otherwise."""
    anc = ancestors(node, limit)
    if len(anc) >= limit or any(a.op not in ("call_function", "get_attr") for a in anc):
        return None
    gm = node.graph.owning_module
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    env: dict[fx.Node, Any] = {}
    try:
        for a in sorted(anc, key=order.__getitem__):
            if a.op == "get_attr":
                obj: Any = gm
                for part in str(a.target).split("."):
                    obj = getattr(obj, part)
                env[a] = obj.detach().clone() if isinstance(obj, torch.Tensor) else obj
                continue
            fn: Any = a.target
            args = fx.node.map_arg(a.args, lambda x: env[x])
            kwargs = fx.node.map_arg(a.kwargs, lambda x: env[x])
            with torch.no_grad():
                env[a] = fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - anything not evaluable on constants is simply not a constant
        return None
    out = env[node]
    return out if isinstance(out, torch.Tensor) else None


def constant_scalar(node: object, limit: int = 24) -> float | None:
    """A Python number, or a one-element tensor node computed from constants only (DeBERTa's scale
    `sqrt(tensor(d) * 3)`); None when it depends on an input or a parameter."""
    c = const_scalar(node)
    if c is not None or not isinstance(node, fx.Node):
        return c
    v = val(node)
    if not isinstance(v, torch.Tensor) or v.numel() != 1:
        return None
    out = evaluate_constant(node, limit)
    return float(out.item()) if out is not None and out.numel() == 1 else None


def call(graph: fx.Graph, target: Any, args: tuple[Any, ...], like: fx.Node | None = None) -> fx.Node:
    """Create a call_function node, copying module-stack / stack-trace metadata from `like`."""
    node = graph.call_function(target, args)
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    node.meta["tokenreduce"] = True
    return node


class Builder:
    """Appends nodes one after another right after `anchor`, remembering what it created.

    The one way passes and methods emit nodes: `b.add(target, args)` returns the new node; `b.is_outside`
    is the `replace_all_uses_with` filter that keeps the builder's own nodes reading the old value.
    """

    def __init__(self, graph: fx.Graph, anchor: fx.Node, like: fx.Node | None = None) -> None:
        self.graph, self.anchor = graph, anchor
        self.like = like if like is not None else anchor
        self.nodes: set[fx.Node] = set()

    def add(self, target: object, args: tuple[Any, ...]) -> fx.Node:
        with self.graph.inserting_after(self.anchor):
            node = call(self.graph, target, args, self.like)
        self.anchor = node
        self.nodes.add(node)
        return node

    def item(self, node: fx.Node, index: int) -> fx.Node:
        """`node[index]` of a tuple-returning op."""
        return self.add(P.GETITEM, (node, index))

    def is_outside(self, user: fx.Node) -> bool:
        return user not in self.nodes


def stable_toposort(graph: fx.Graph) -> None:
    """Reorder nodes so every node follows its inputs, keeping the current order wherever it is valid."""
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    indeg = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(pos[n], n.name, n) for n in nodes if indeg[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, _, n = heapq.heappop(ready)
        order.append(n)
        for u in n.users:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, (pos[u], u.name, u))
    if len(order) != len(nodes):
        raise RuntimeError("graph has a cycle after a rewrite")  # a bug in the pass that rewrote it
    prev = graph._root  # noqa: SLF001 - fx keeps nodes in a linked list behind this sentinel
    for n in order:
        if n.prev is not prev:
            prev.append(n)
        prev = n
