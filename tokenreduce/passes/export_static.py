"""Two rewrites that make a captured VLM prefill static for ONNX, applied by the ONNX target only.

A LLaVA-style prefill scatters the projected image features into the text embeddings at the placeholder
tokens, after checking that the counts agree (transformers' `get_placeholder_mask`:
`torch_compilable_check(n_image_tokens * C == image_features.numel())`). Captured, that is:

* `masked_scatter(embeds, mask, features)`, which the ONNX exporter lowers through `NonZero` (a
  data-dependent shape), and
* `_is_all_true(cond) -> item -> sym_ite -> _assert_scalar`, a host-side assertion on a tensor value, for
  which the exporter has no function (`aten._is_all_true`).

`static_masked_scatter` replaces the scatter by its static form: the source element for each true mask
position is found by a running count (`cumsum(mask) - 1`, the order `masked_scatter` consumes its source in),
gathered, and selected with `where`; every shape is known at export time and the numbers are identical.

`checks_as_nan` keeps the check without a host assertion: the assertion chain is removed and every floating
graph output becomes `where(all(cond), output, nan)`. A prompt whose placeholder count does not match the
image features (which transformers refuses with an error) gives NaN outputs from the exported file instead of
logits computed from misplaced features. Only chains whose every use is scalar bookkeeping
(`item`, `sym_ite`, comparisons, `_assert_scalar`) are rewritten; any other use of the checked value is left
for the exporter to refuse by name.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from tokenreduce.passes.common import PassResult

aten = torch.ops.aten

_SCALAR_BOOKKEEPING = {aten.item.default, torch.sym_ite, aten._assert_scalar.default, operator.ge, operator.le,
                       operator.eq, operator.ne, operator.gt, operator.lt, operator.not_, torch.sym_not}


def masked_scatter_static(x: torch.Tensor, mask: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`x.masked_scatter(mask, source)` without data-dependent shapes: the i-th true position (row-major) takes
    `source.flatten()[i]`. Index clamped into the source, so a mask with more true positions than source
    elements reads the last one where `masked_scatter` raises (the placeholder check, `checks_as_nan`,
    covers that case in a captured VLM)."""
    flat = mask.expand_as(x).reshape(-1)
    index = (torch.cumsum(flat.to(torch.int64), 0) - 1).clamp(0, source.numel() - 1)
    values = source.reshape(-1).index_select(0, index)
    return torch.where(flat, values, x.reshape(-1)).view(x.shape)


def static_masked_scatter(gm: fx.GraphModule) -> PassResult:
    result = PassResult("static_masked_scatter", changed=False)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.masked_scatter.default:
            node.target = masked_scatter_static
            result.rewrites += 1
    if result.rewrites:
        result.changed = True
        gm.recompile()
    return result


def _assertion_chain(root: fx.Node) -> list[fx.Node] | None:
    """Every node downstream of `root` if all of them are scalar bookkeeping ending in assertions, else None."""
    chain: list[fx.Node] = []
    stack = list(root.users)
    while stack:
        node = stack.pop()
        if node in chain:
            continue
        if node.op != "call_function" or node.target not in _SCALAR_BOOKKEEPING:
            return None
        chain.append(node)
        stack.extend(node.users)
    return chain


def checks_as_nan(gm: fx.GraphModule) -> PassResult:
    result = PassResult("checks_as_nan", changed=False)
    graph = gm.graph
    conditions: list[fx.Node] = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten._is_all_true.default:
            continue
        chain = _assertion_chain(node)
        if chain is None:
            continue
        for dead in sorted(chain, key=order.__getitem__, reverse=True):  # users before their inputs
            graph.erase_node(dead)
        conditions.append(node.args[0])
        graph.erase_node(node)
        result.rewrites += 1
    if not conditions:
        return result
    output = graph.output_node()
    with graph.inserting_before(output):
        oks = [graph.call_function(aten.all.default, (c,)) for c in conditions]
        ok = oks[0]
        for other in oks[1:]:
            ok = graph.call_function(aten.logical_and.default, (ok, other))

        def poison(value: Any) -> Any:
            if isinstance(value, fx.Node):
                val = value.meta.get("val")
                if isinstance(val, torch.Tensor) and val.dtype.is_floating_point:
                    return graph.call_function(aten.where.ScalarOther, (ok, value, float("nan")))
            return value

        output.args = (fx.node.map_aggregate(output.args[0], poison),)
    result.changed = True
    gm.recompile()
    return result
