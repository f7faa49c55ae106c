"""Graph analysis: find the transformer blocks of an ATen graph and say what can be reduced.

Input is the ATen training-IR graph from `compiler/capture.py` (torch.export, or a dynamo graph re-exported), with
`meta["val"]` on every node. The analysis is declarative: attention is found from the spellings in
`ir/patterns.py` (`analysis/attention.py`: SDPA and explicit attention with its score modifiers); a block is the
attention plus its residual add (`analysis/blocks.py`: pre-LN, post-LN, sandwich / post-attention norms); the
block input is the tensor the q projection reads (or its norm reads); the token axis is the query-length axis of
attention mapped back onto the block input. Module-stack metadata names blocks in reports; it is never used to
decide structure.

Protected tokens are found from how the token sequence is built: leading positions concatenated from
parameters only (CLS, distillation, register tokens) before the first block that has a block input (reducible
or not: a model whose blocks are all skipped still has its CLS token). Text models built from an embedding
lookup protect their first token ([CLS]/BOS) by default.

Refuses (with a `TokenReduceError` naming what was looked for, and any softmax that looked like attention
but did not match, with where the match stopped): graphs without any attention. Per block it records a skip
reason instead of failing (see `analysis/blocks.py`).

The dataclasses and matchers live in `analysis/attention.py` and `analysis/blocks.py`; they are re-exported
here, where passes and `analysis/decoder.py` import them from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from tokenreduce.analysis.attention import (
    Attention,
    ScoreMod,
    attention_near_misses,
    find_attention,
    is_causal,
    mask_is_causal,
)
from tokenreduce.analysis.blocks import Block, SideInput, analyse_block
from tokenreduce.errors import TokenReduceError
from tokenreduce.ir import patterns as P
from tokenreduce.ir.graph import args_of, shape, static_dim

__all__ = ["Attention", "Block", "ModelAnalysis", "ScoreMod", "SideInput", "analyse", "analyse_block",
           "find_attention", "is_causal", "mask_is_causal"]


@dataclass
class ModelAnalysis:
    blocks: list[Block]
    num_protected: int
    protected_reason: str
    text_model: bool
    # softmax nodes that looked like attention but were not matched, with where matching stopped (those
    # attentions are in no block: reports should show them next to the blocks)
    unmatched: list[str] = field(default_factory=list)


def _user_input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    dep: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            dep.add(node)
        elif node.op in ("call_function", "call_method", "call_module"):
            if node.target in P.SHAPE_ONLY:
                continue  # reads only sizes (dynamic batch): not a dependence on input values
            if any(isinstance(a, fx.Node) and a in dep for a in node.all_input_nodes):
                dep.add(node)
    return dep


def _structural_prefix(node: object, dep: set[fx.Node], depth: int = 0) -> int:
    """Number of leading token positions of `node` ([B, N, C]) that do not depend on the user input."""
    if not isinstance(node, fx.Node) or depth > 40:
        return 0
    s = shape(node)
    n = static_dim(s[1]) if s is not None and len(s) >= 2 else None
    if node not in dep:
        return n or 0
    t = node.target
    if t in P.CAT:
        dim = args_of(node)[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim not in (1, -2):
            return 0
        total = 0
        for part in args_of(node)[0]:
            ps = shape(part)
            plen = static_dim(ps[1]) if ps is not None else None
            pre = _structural_prefix(part, dep, depth + 1)
            total += pre
            if plen is None or pre < plen:
                break
        return total
    if t in P.SLICE and args_of(node)[1] in (1, -2):
        start = args_of(node)[2] if len(node.args) > 2 else 0
        start = start or 0
        inner = _structural_prefix(args_of(node)[0], dep, depth + 1)
        length = n or 0
        return max(0, min(inner - start, length))
    if t in P.PER_TOKEN:
        tensor_args = [a for a in node.args if isinstance(a, fx.Node) and a in dep]
        if not tensor_args:
            return n or 0
        return min(_structural_prefix(a, dep, depth + 1) for a in tensor_args)
    return 0


def _is_text_model(x0: fx.Node) -> bool:
    """True when the first block's tokens come from an embedding lookup of a user input (token ids)."""
    seen, stack = set(), [x0]
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if node.target in P.EMBEDDING and isinstance(args_of(node)[1], fx.Node) and args_of(node)[1].op == "placeholder":
            return True
        if len(seen) > 200:
            break
        stack.extend(node.all_input_nodes)
    return False


def analyse(gm: fx.GraphModule, protected_tokens: int | None = None) -> ModelAnalysis:
    """Find blocks, their layout and token axis, and the protected tokens."""
    attentions = find_attention(gm)
    if not attentions:
        looked = ("looked for attention as scaled_dot_product_attention "
                  f"({', '.join(s.origin for s in P.SDPA_SPELLINGS.values())}) and as matmul -> softmax -> matmul")
        misses = attention_near_misses(gm)
        if misses:
            raise TokenReduceError(
                f"no transformer blocks recognised: {looked}; attention-like ops were seen but not matched: "
                + "; ".join(misses) + ". This attention spelling is not supported yet; the model's SDPA attention "
                "implementation (transformers attn_implementation='sdpa', timm fused_attn) may be recognised")
        raise TokenReduceError(f"no transformer blocks found: {looked}; the model has neither (and no softmax over "
                               "the last axis of a >= 3-D tensor)")
    blocks = [analyse_block(i, a) for i, a in enumerate(attentions)]
    first = next((b for b in blocks if b.reducible), None) or next((b for b in blocks if b.x_in is not None), None)
    text = False
    if protected_tokens is not None:
        num_protected, why = protected_tokens, "set by the user"
    elif first is None:
        num_protected, why = 0, "no block with a [B, N, C] input found"
    else:
        assert first.x_in is not None
        dep = _user_input_dependent(gm)
        num_protected = _structural_prefix(first.x_in, dep)
        text = _is_text_model(first.x_in)
        if num_protected:
            why = f"{num_protected} leading token(s) built from parameters (CLS / distillation / registers)"
        elif text:
            num_protected, why = 1, "first token of a text model ([CLS]/BOS)"
        else:
            why = "no CLS/register tokens in front of the sequence"
    return ModelAnalysis(blocks=blocks, num_protected=num_protected, protected_reason=why, text_model=text,
                         unmatched=attention_near_misses(gm, limit=1000))
