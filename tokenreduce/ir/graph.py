"""Typed access to FX nodes, graph walks, node creation, and the builder passes and methods emit through.

Everything here works on any ATen FX graph with `meta["val"]` fake values (what `compiler/capture.py`
produces). Nothing here knows what a transformer block or a method is.
"""

from __future__ import annotations

import heapq
from typing import Any

import torch
from torch import fx

from tokenreduce.ir import patterns as P


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



def ancestor_linear(node: object, limit: int = 12) -> fx.Node | None:
    """First `linear` on the first-argument chain above `node` (q -> reshape/permute/unbind -> linear)."""
    for _ in range(limit):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        if node.target in P.LINEAR:
            return node
        node = args_of(node)[0]
    return None


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
