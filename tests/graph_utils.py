"""Small helpers the structural tests share: find nodes in a rewritten graph and say which block they
belong to, from the graph alone (node targets and module-stack metadata), not from package internals."""

from __future__ import annotations

import re

import torch
from torch import fx

TR_OPS = ("tome_plan", "topk_plan", "query_row_scores", "apply_plan")
SDPA = torch.ops.aten.scaled_dot_product_attention.default
_BLOCK_RE = re.compile(r"(?:blocks|layers?)\.(\d+)")


def tr_op(name: str):
    return getattr(torch.ops.tokenreduce, name).default


def nodes_of(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def tr_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    targets = {tr_op(n) for n in TR_OPS}
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def block_index(node: fx.Node) -> int | None:
    """Index of the transformer block a node was traced in, from its innermost module path."""
    stack = node.meta.get("nn_module_stack") or {}
    for entry in reversed(list(stack.values())):
        path = entry[0] if isinstance(entry, tuple) else str(entry)
        m = _BLOCK_RE.search(path)
        if m:
            return int(m.group(1))
    return None


def sdpa_mask(node: fx.Node):
    if len(node.args) > 3:
        return node.args[3]
    return node.kwargs.get("attn_mask")


def downstream(gm: fx.GraphModule, start: fx.Node) -> list[fx.Node]:
    """Nodes after `start` in graph order."""
    out, seen = [], False
    for n in gm.graph.nodes:
        if seen:
            out.append(n)
        if n is start:
            seen = True
    return out
