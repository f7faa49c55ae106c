"""Replace each `torch.ops.tokenreduce.*` node by a call to its pure-torch reference implementation.

Used by targets that must see only standard ops (ONNX; TensorRT through ONNX): re-tracing the graph then
expands the references into ATen ops that have ONNX translations. The references are written export-safe
(no scatter for slot assignment, sums + counts instead of means, constant k for top-k), so the expansion
is static-shaped. Runtime targets (eager, inductor) keep the named ops, where GPU kernels plug in.
"""

from __future__ import annotations

import torch
from torch import fx

from tokenreduce.kernels import decoder_ops as _decoder_ops  # noqa: F401  (registers tokenreduce::keep_plan)
from tokenreduce.kernels import reference
from tokenreduce.kernels.triton import reference as kernel_reference
from tokenreduce.methods import decoder, evit, tome
from tokenreduce.passes.common import PassResult

REFERENCES = {
    torch.ops.tokenreduce.tome_plan.default: tome.bipartite_plan,
    torch.ops.tokenreduce.topk_plan.default: evit.topk_plan,
    torch.ops.tokenreduce.query_row_scores.default: reference.query_row_scores,
    torch.ops.tokenreduce.apply_plan.default: reference.apply_plan,
    torch.ops.tokenreduce.keep_plan.default: decoder.keep_plan,
    # SDPA + the one-row score (the fused op exists only on GPU graphs; see passes/fuse_attention_scores.py)
    torch.ops.tokenreduce.attention_with_scores.default: kernel_reference.attention_with_row_scores,
}


def inline_reference_ops(gm: fx.GraphModule, ctx: object = None) -> PassResult:
    result = PassResult("inline_reference_ops", changed=False)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in REFERENCES:
            node.target = REFERENCES[node.target]
            result.rewrites += 1
    if result.rewrites:
        result.changed = True
        gm.recompile()
    return result
