"""Make a prefill graph return what a KV cache needs, so decoding can continue after a pruned prefill.

The captured prefill returns only logits (captured with `use_cache=False`, which keeps the graph free
of cache objects). This pass makes the graph return, flat and in order:

    (logits, k_0 .. k_{L-1}, v_0 .. v_{L-1}, kept_0 .. kept_{L-1})

where `k_l`, `v_l` are the block's keys/values as transformers caches them (`[B, H_kv, M_l, d]`, after
rotary, before `repeat_kv`) and `kept_l [B, M_l]` the original positions of the tokens block l saw
(`None` for blocks before the first pruning stage: all positions). It also switches the graph to plain
positional calling (the exported pytree signature no longer describes the outputs).

Refuses (TokenReduceError): a decoder block whose cached keys/values could not be located.
"""

from __future__ import annotations

from torch import fx

from tokenreduce.errors import TokenReduceError
from tokenreduce.passes.common import DecoderContext, PassResult


def emit_kv_cache(gm: fx.GraphModule, ctx: DecoderContext) -> PassResult:
    result = PassResult("emit_kv_cache", changed=True)
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    logits = out.args[0]
    while isinstance(logits, (tuple, list)):
        logits = logits[0]
    ks, vs = [], []
    for db in ctx.analysis.blocks:
        if db.kv is None:
            raise TokenReduceError(f"{db.block.name}: could not locate the keys/values a KV cache stores "
                                   "(expected [B, H_kv, N, d] before the attention's layout ops)")
        ks.append(db.kv[0])
        vs.append(db.kv[1])
    kept = list(ctx.kept) if ctx.kept else [None] * len(ks)
    out.args = ((logits, tuple(ks), tuple(vs), tuple(kept)),)
    graph._codegen = fx.graph.CodeGen()  # noqa: SLF001 - plain positional inputs/outputs
    # torch.export's unlifted module checks calls against the exported input tree (which no longer
    # includes the added `span` input); the graph's own placeholders now define the signature.
    gm._forward_pre_hooks.clear()  # noqa: SLF001
    result.rewrites = len(ks)
    return result
