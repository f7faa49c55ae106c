"""Replace each `torch.ops.tokenreduce.*` node by a call to its pure-torch reference implementation.

Used by targets that must see only standard ops (ONNX; TensorRT through ONNX): re-tracing the graph then
expands the references into ATen ops that have ONNX translations. The references are written export-safe
(no scatter for slot assignment, sums + counts instead of means, constant k for top-k), so the expansion
is static-shaped. Runtime targets (eager, inductor) keep the named ops, where GPU kernels plug in.
"""

from __future__ import annotations

from torch import fx

from tokenreduce.kernels.references import REFERENCES
from tokenreduce.methods import registry
from tokenreduce.passes.common import PassResult


def references() -> dict[object, object]:
    """Every custom op -> its pure-torch implementation: the shared ops' (`kernels/ops.py`) plus each
    registered method's own."""
    table = dict(REFERENCES)
    for method in registry.METHODS.values():
        table.update(method.references())
    return table


def inline_reference_ops(gm: fx.GraphModule, ctx: object = None) -> PassResult:
    result = PassResult("inline_reference_ops", changed=False)
    table = references()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in table:
            node.target = table[node.target]
            result.rewrites += 1
    if result.rewrites:
        result.changed = True
        gm.recompile()
    return result
