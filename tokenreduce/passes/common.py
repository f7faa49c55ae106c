"""What every pass shares: the pass context, the result record, and node helpers."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from tokenreduce.compiler.analysis import ModelAnalysis
from tokenreduce.compiler.planner import BlockPlan
from tokenreduce.compiler.settings import Settings


@dataclass
class PassResult:
    name: str
    changed: bool
    rewrites: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class TokenState:
    """Graph nodes holding the token state after the latest reduction (see docs/design.md)."""

    size: fx.Node | None = None  # [B, N] tokens represented by each slot
    valid: fx.Node | None = None  # [B, N] bool key validity (None: no padding)
    rep: fx.Node | None = None  # [B, N] original token each slot stands for
    source: fx.Node | None = None  # [B, N0] original position -> slot (only when unmerging)
    epoch: int = 0  # number of reductions so far


@dataclass
class PassContext:
    settings: Settings
    analysis: ModelAnalysis
    plans: list[BlockPlan]
    original_tokens: int
    state: TokenState = field(default_factory=TokenState)


def call(graph: fx.Graph, target: Any, args: tuple[Any, ...], like: fx.Node | None = None) -> fx.Node:
    """Create a call_function node, copying module-stack / stack-trace metadata from `like`."""
    node = graph.call_function(target, args)
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    node.meta["tokenreduce"] = True
    return node


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
        raise RuntimeError("graph has a cycle after the decoder rewrite")  # a bug in this pass
    prev = graph._root  # noqa: SLF001 - fx keeps nodes in a linked list behind this sentinel
    for n in order:
        if n.prev is not prev:
            prev.append(n)
        prev = n
