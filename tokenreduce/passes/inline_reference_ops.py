"""Replace each `torch.ops.tokenreduce.*` node by a call to its pure-torch reference implementation.

Used by targets that must see only standard ops (ONNX; TensorRT through ONNX): re-tracing the graph then
expands the references into ATen ops that have ONNX translations. The references are written export-safe
(no scatter for slot assignment, sums + counts instead of means, constant k for top-k), so the expansion
is static-shaped. Runtime targets (eager, inductor) keep the named ops, where GPU kernels plug in.

`apply_plan` gets the exported forms of `kernels/reference.py` (same numbers, cheaper in onnxruntime at
batch 1): `apply_plan_reps` when the plan that produced the slots also names each slot's representative
source (ToMe's `tome_plan`, EViT's `topk_plan`, or any plan function whose traced outputs show a
`[B, n_out]` int64 representative map), else `apply_plan_packed` (one scatter-add instead of three).
The ONNX target asks for them (`exported_apply=True`); inductor (CPU) keeps the plain reference, which it
fuses into its own loops. `benchmarks/edge_onnx.py` measures both forms in onnxruntime.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from tokenreduce.kernels import reference as ref
from tokenreduce.kernels.references import REFERENCES
from tokenreduce.methods import registry
from tokenreduce.passes.common import PassResult

tr = torch.ops.tokenreduce

REP_OUTPUT: dict[Any, int] = {tr.tome_plan.default: 1, tr.topk_plan.default: 2}
"""Plan ops whose output tuple holds the representative map, and at which index (slot is index 0)."""


def references() -> dict[object, object]:
    """Every custom op -> its pure-torch implementation: the shared ops' (`kernels/ops.py`) plus each
    registered method's own."""
    table = dict(REFERENCES)
    for method in registry.METHODS.values():
        table.update(method.references())
    return table


def inline_reference_ops(gm: fx.GraphModule, ctx: object = None, *, exported_apply: bool = False) -> PassResult:
    result = PassResult("inline_reference_ops", changed=False)
    table = references()
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        # the exported forms replace `apply_plan` only while the table holds its reference (a substituted
        # implementation, e.g. a test's deliberately wrong one, is inlined as given)
        if exported_apply and node.target is tr.apply_plan.default and table.get(node.target) is ref.apply_plan:
            rep = representatives(gm.graph, node)
            if rep is not None:
                node.target = ref.apply_plan_reps
                node.args = (*node.args[:5], rep)
            else:
                node.target = ref.apply_plan_packed
            result.rewrites += 1
        elif node.target in table:
            node.target = table[node.target]
            result.rewrites += 1
    if result.rewrites:
        result.changed = True
        gm.graph.lint()
        gm.recompile()
    return result


def representatives(graph: fx.Graph, apply: fx.Node) -> fx.Node | None:
    """The `[B, n_out]` representative map of the plan whose slots `apply` uses (a getitem node of the plan,
    added before `apply` when the graph dropped it), or None when the plan does not name one."""
    slot = apply.args[1]
    n_out = apply.args[4]
    if not (isinstance(slot, fx.Node) and slot.target is operator.getitem and slot.args[1] == 0):
        return None
    plan = slot.args[0]
    if not isinstance(plan, fx.Node):
        return None
    index = REP_OUTPUT.get(plan.target)
    if index is None:  # a method's own plan function: find the representative map by its traced shape
        vals = plan.meta.get("val")
        if not isinstance(vals, (tuple, list)):
            return None
        found = [i for i, v in enumerate(vals) if i != 0 and isinstance(v, torch.Tensor) and v.dim() == 2
                 and v.dtype == torch.int64 and isinstance(n_out, int) and v.shape[-1] == n_out]
        if len(found) != 1:
            return None
        index = found[0]
    for user in plan.users:
        if user.target is operator.getitem and user.args[1] == index:
            return user
    with graph.inserting_after(slot):
        return graph.call_function(operator.getitem, (plan, index))
