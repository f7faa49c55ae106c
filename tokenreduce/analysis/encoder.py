"""Graph analysis: find the transformer blocks of an ATen graph and say what can be reduced.

Input is the ATen training-IR graph from `compiler/capture.py` (torch.export, or a dynamo graph re-exported), with
`meta["val"]` on every node. The analysis is declarative: attention is found from the spellings in
`ir/patterns.py`; a block is the attention plus its residual add (pre-LN: `x + attn(norm(x))`; post-LN:
`norm(x + attn(x))`); the block input is the tensor the q projection reads; the token axis is the
query-length axis of attention mapped back onto the block input. Module-stack metadata names blocks in
reports; it is never used to decide structure.

Protected tokens are found from how the token sequence is built: leading positions concatenated from
parameters only (CLS, distillation, register tokens) before the first block. Text models built from an
embedding lookup protect their first token ([CLS]/BOS) by default.

Refuses (with a `TokenReduceError` naming what was looked for): graphs without any attention. Per block
it records a skip reason instead of failing: cross-attention, causal attention, a token axis that is not
axis 1 of a `[B, N, C]` hidden state, no residual add after attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from tokenreduce.errors import TokenReduceError
from tokenreduce.ir import patterns as P
from tokenreduce.ir.graph import (
    ancestor_linear,
    ancestors,
    args_of,
    const_scalar,
    descendants,
    module_path,
    nodes_between,
    reaches_matmul,
    shape,
    static_dim,
)


@dataclass
class ScoreMod:
    """One thing done to the attention logits between q @ k^T and softmax (in graph order).

    kind: "scale" (value = the factor), "softcap" (value = c in `tanh(x / c) * c`), "bias" (an additive
    term that is not a mask: relative-position bias, disentangled c2p/p2c terms; operand = the tensor
    added), "mask" (an additive mask; operand = the mask), "masked_fill" (operand = the boolean condition,
    value = the fill value), "talking-heads" (a linear over the head axis; operand = its weight).
    `nodes` are the ops that apply it (for SDPA: the SDPA node itself).
    """

    kind: str
    nodes: tuple[fx.Node, ...]
    operand: fx.Node | None = None
    value: float | None = None


@dataclass
class SideInput:
    """A tensor entering a block's q/k/v path or its attention logits from outside the hidden-state stream
    that carries the token axis/axes (`axes`, negative indices): rotary cos/sin ("rotary", (-2,)), relative
    position biases / index matrices ("relative-bias", (-2, -1)), position ids ("positions", (-1,)).
    A pass reducing tokens gathers it along `axes` by the representatives' original positions; `users`
    are the nodes of this block that read it (rewire those, not other blocks' uses)."""

    node: fx.Node
    axes: tuple[int, ...]
    kind: str
    users: tuple[fx.Node, ...] = ()


@dataclass
class Attention:
    """One attention op with its operands located in the graph."""

    kind: str  # "sdpa" or "explicit"
    node: fx.Node  # the sdpa node, or the softmax node of explicit attention
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    mask: fx.Node | None
    is_causal: bool
    output: fx.Node  # the attention result [B, H, N, d]
    mask_add: fx.Node | None = None  # explicit: the add that applies the mask
    spelling: str = ""
    score_mods: list[ScoreMod] = field(default_factory=list)  # logits -> softmax, in order
    softcap: float | None = None  # c of `tanh(logits / c) * c` when the logits are soft-capped
    window: int | None = None  # sliding-window / local attention size; None for global attention


@dataclass
class Block:
    """A transformer block as the rewrite passes need it."""

    index: int
    name: str
    attention: Attention
    x_in: fx.Node | None = None  # block input hidden states [B, N, C]
    residual_add: fx.Node | None = None  # h = x + attn(...)
    reduce_at: fx.Node | None = None  # node whose output is reduced (h, or norm1(h) for post-LN)
    layout: str = "?"  # "pre-ln" | "post-ln"
    num_tokens: int = 0
    skip_reason: str | None = None
    side_inputs: list[SideInput] = field(default_factory=list)
    qkv_path: set[fx.Node] = field(default_factory=set)  # nodes from the q/k/v projections to the attention

    @property
    def reducible(self) -> bool:
        return self.skip_reason is None


@dataclass
class ModelAnalysis:
    blocks: list[Block]
    num_protected: int
    protected_reason: str
    text_model: bool


# ----------------------------------------------------------------------------------------------- attention
def find_attention(gm: fx.GraphModule) -> list[Attention]:
    found: list[Attention] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in P.SDPA_SPELLINGS:
            found.append(_match_sdpa(node, P.SDPA_SPELLINGS[node.target]))
        elif node.target in P.SOFTMAX:
            att = _match_explicit(node)
            if att is not None:
                found.append(att)
    return found


def _match_sdpa(node: fx.Node, sp: P.SdpaSpelling) -> Attention:
    q, k, v = args_of(node)[0], args_of(node)[1], args_of(node)[2]
    mask = None
    if sp.mask_pos is not None and len(node.args) > sp.mask_pos:
        mask = args_of(node)[sp.mask_pos]
    if sp.mask_kw and sp.mask_kw in node.kwargs:
        mask = node.kwargs[sp.mask_kw]
    causal = bool(args_of(node)[sp.causal_pos]) if sp.causal_pos is not None and len(node.args) > sp.causal_pos else False
    causal = bool(node.kwargs.get("is_causal", causal))
    scale: Any = node.kwargs.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(shape(q)[-1])  # type: ignore[index]
    output = node
    if sp.tuple_output:
        outs = [u for u in node.users if u.target is P.GETITEM and args_of(u)[1] == 0]
        output = outs[0] if outs else node
    mask = mask if isinstance(mask, fx.Node) else None
    mods = [ScoreMod("scale", (node,), value=float(scale))]
    if mask is not None:
        mods.append(ScoreMod("mask", (node,), operand=mask))
    return Attention("sdpa", node, q, k, v, float(scale), mask, causal, output, spelling=sp.origin, score_mods=mods)


def _match_explicit(softmax: fx.Node) -> Attention | None:
    """matmul(q, k^T) -> (mul/div scale | add mask)* -> softmax(-1) -> dropout* -> matmul(., v)."""
    dim = args_of(softmax)[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim", -1)
    sm_shape = shape(softmax)
    if sm_shape is None or len(sm_shape) < 3 or dim not in (-1, len(sm_shape) - 1):
        return None
    scale, mask, mask_add = 1.0, None, None
    mods: list[ScoreMod] = []  # collected walking up from softmax: reversed at the end
    node = args_of(softmax)[0]
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return None
        if node.target in P.MATMUL:
            break
        if node.target in P.ADD:
            a, b = args_of(node)[0], args_of(node)[1]
            mask_add = node
            if reaches_matmul(a):
                mask, node = b, a
            elif reaches_matmul(b):
                mask, node = a, b
            else:
                return None
            if isinstance(mask, fx.Node):
                mods.append(ScoreMod("mask", (mask_add,), operand=mask))
            continue
        if node.target in P.SCALE_MUL | P.SCALE_DIV:
            c = const_scalar(args_of(node)[1])
            if c is None:
                return None
            scale = scale * c if node.target in P.SCALE_MUL else scale / c
            mods.append(ScoreMod("scale", (node,), value=c if node.target in P.SCALE_MUL else 1.0 / c))
            node = args_of(node)[0]
            continue
        return None
    else:
        return None
    qk = node
    a_op, bt = args_of(qk)[0], args_of(qk)[1]
    if not isinstance(bt, fx.Node) or bt.target not in P.TRANSPOSE:
        return None
    k = args_of(bt)[0]
    q = a_op
    if isinstance(q, fx.Node) and q.target in P.SCALE_MUL | P.SCALE_DIV and const_scalar(args_of(q)[1]) is not None:
        c = const_scalar(args_of(q)[1])
        scale = scale * c if q.target in P.SCALE_MUL else scale / c  # type: ignore[operator]
        mods.append(ScoreMod("scale", (q,), value=c if q.target in P.SCALE_MUL else 1.0 / c))  # type: ignore[operator]
        q = args_of(q)[0]
    # follow softmax -> dropout* -> matmul(p, v)
    p = softmax
    for _ in range(4):
        users = [u for u in p.users if u.op == "call_function"]
        mm = [u for u in users if u.target in P.MATMUL and args_of(u)[0] is p]
        if mm:
            out = mm[0]
            return Attention("explicit", softmax, q, k, args_of(out)[1], scale,
                             mask if isinstance(mask, fx.Node) else None, False, out,
                             mask_add=mask_add if isinstance(mask, fx.Node) else None,
                             spelling="matmul-softmax-matmul (eager attention)", score_mods=mods[::-1])
        drops = [u for u in users if u.target in P.DROPOUT]
        if not drops:
            return None
        p = drops[0]
    return None


# ----------------------------------------------------------------------------------------------- causality
_COMPARE = {torch.ops.aten.le.Tensor, torch.ops.aten.lt.Tensor, torch.ops.aten.ge.Tensor, torch.ops.aten.gt.Tensor}
_TRIANGLE = {torch.ops.aten.tril.default, torch.ops.aten.triu.default}


def _index_only(node: fx.Node) -> bool:
    """True when `node` is computed from `arange`s and constants only (a position range, not data)."""
    anc = ancestors(node, 60)
    return any(a.target is torch.ops.aten.arange.default or a.target is torch.ops.aten.arange.start for a in anc) and not any(
        a.op == "placeholder" for a in anc)


def mask_is_causal(mask: fx.Node | None) -> bool:
    if mask is None:
        return False
    for a in ancestors(mask):
        if a.target in _TRIANGLE:
            return True
        if a.target in _COMPARE:
            x, y = args_of(a)[0], args_of(a)[1]
            if isinstance(x, fx.Node) and isinstance(y, fx.Node) and _index_only(x) and _index_only(y):
                return True
    return False


def is_causal(att: Attention) -> bool:
    return att.is_causal or mask_is_causal(att.mask)


# ----------------------------------------------------------------------------------------------- blocks
def _forward_to_add(start: fx.Node, limit: int = 12) -> fx.Node | None:
    node = start
    for _ in range(limit):
        users = [u for u in node.users if u.op == "call_function"]
        if len(users) != 1:
            return None
        u = users[0]
        if u.target in P.ADD and isinstance(args_of(u)[0], fx.Node) and isinstance(args_of(u)[1], fx.Node):
            return u
        if u.target not in P.ATTN_OUT_CHAIN:
            return None
        node = u
    return None


def _mlp_residual_add(point: fx.Node) -> fx.Node | None:
    """The later add that uses `point` directly as its residual operand."""
    adds = [u for u in point.users if u.target in P.ADD]
    return adds[-1] if adds else None


def _decomposed_norm_input(src: fx.Node, add: fx.Node, depth: int = 12) -> fx.Node | None:
    """The residual operand of `add` when `src` is a norm of it written as elementwise ops (no layer_norm
    node): an ancestor of `src` within `depth` steps whose shape equals `src`'s."""
    residuals = [a for a in args_of(add)[:2] if isinstance(a, fx.Node)]
    frontier, seen = [src], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a in residuals and shape(a) == shape(src):
                    return a
                if a not in seen and a.op == "call_function" and a.target not in P.LINEAR:
                    seen.add(a)
                    nxt.append(a)
        frontier = nxt
    return None


def _common_prefix(a: list[str], b: list[str]) -> str:
    common = ""
    for x in a:
        if x in b:
            common = x
    return common


def analyse_block(index: int, att: Attention) -> Block:
    blk = Block(index=index, name=f"block{index}", attention=att)
    qs, ks = shape(att.q), shape(att.k)
    if qs is None or ks is None or len(qs) != 4:
        blk.skip_reason = "attention operands are not [B, H, N, d] tensors"
        return blk
    n = qs[-2]
    blk.num_tokens = static_dim(n) or 0
    if static_dim(n) is None:
        blk.skip_reason = "token count is symbolic; tokenreduce needs a static token count"
        return blk
    if ks[-2] != n:
        blk.skip_reason = f"cross-attention ({n} queries over {ks[-2]} keys); only self-attention is reduced"
        return blk
    if att.is_causal or mask_is_causal(att.mask):
        blk.skip_reason = "causal attention (decoder); encoder methods (ToMe/EViT) need bidirectional attention"
        return blk
    lin = ancestor_linear(att.q)
    if lin is None:
        blk.skip_reason = "no linear projection found above the attention query"
        return blk
    src = args_of(lin)[0]
    add = _forward_to_add(att.output)
    if add is None or not isinstance(src, fx.Node):
        blk.skip_reason = "no residual add (x + attention) after the attention output"
        return blk
    # pre-LN: the residual is the norm's input; post-LN: the residual is what the projection reads
    # (in BERT that is the previous block's final norm, so "reads a norm" alone does not decide).
    if src.target in P.LAYER_NORM and args_of(src)[0] in add.args:
        pre_ln, x_in = True, args_of(src)[0]
    elif src in add.args:
        pre_ln, x_in = False, src
    elif (r := _decomposed_norm_input(src, add)) is not None:
        pre_ln, x_in = True, r  # RMSNorm spelled out (Llama: x * rsqrt(mean(x^2) + eps) * w)
    else:
        blk.skip_reason = "the residual add after attention does not add the block input"
        return blk
    xs = shape(x_in)
    if xs is None or len(xs) != 3 or xs[1] != n:
        blk.skip_reason = f"block input has shape {xs}; expected [B, {n}, C] with tokens on axis 1"
        return blk
    blk.x_in, blk.residual_add = x_in, add
    _find_side_inputs(blk)
    if pre_ln:
        blk.layout, blk.reduce_at = "pre-ln", add
    else:
        norms = [u for u in add.users if u.target in P.LAYER_NORM]
        if len(add.users) != 1 or not norms:
            blk.skip_reason = "post-LN block without a norm after the attention residual"
            return blk
        blk.layout, blk.reduce_at = "post-ln", norms[0]
    mlp_add = _mlp_residual_add(blk.reduce_at)
    name = _common_prefix(module_path(att.node), module_path(mlp_add) if mlp_add is not None else module_path(add))
    if name:
        blk.name = name
    return blk


def _find_side_inputs(blk: Block) -> None:
    """Tensors entering the q/k/v paths from outside the hidden-state stream that carry the token axis
    (rotary cos/sin: `q * cos + rotate_half(q) * sin`), and non-mask logit biases with two token axes."""
    att, n = blk.attention, blk.num_tokens
    assert blk.x_in is not None
    stream = descendants([blk.x_in])
    side: dict[fx.Node, list[fx.Node]] = {}
    for operand in (att.q, att.k, att.v):
        proj = ancestor_linear(operand, 16)
        if proj is None:
            continue
        path = nodes_between([proj], [operand])
        blk.qkv_path |= path
        for node in path:
            for inp in node.all_input_nodes:
                if inp not in stream and inp.op == "call_function" and isinstance(inp.meta.get("val"), torch.Tensor):
                    side.setdefault(inp, []).append(node)
    for inp, users in side.items():
        s = shape(inp)
        if s is not None and len(s) >= 2 and s[-2] == n:
            blk.side_inputs.append(SideInput(inp, (-2,), "rotary", tuple(users)))


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
        raise TokenReduceError(
            "no transformer blocks found: looked for attention as scaled_dot_product_attention "
            f"({', '.join(s.origin for s in P.SDPA_SPELLINGS.values())}) and as matmul -> softmax -> matmul; "
            "the model has neither"
        )
    blocks = [analyse_block(i, a) for i, a in enumerate(attentions)]
    first = next((b for b in blocks if b.reducible), None)
    text = False
    if protected_tokens is not None:
        num_protected, why = protected_tokens, "set by the user"
    elif first is None:
        num_protected, why = 0, "no reducible block"
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
    return ModelAnalysis(blocks=blocks, num_protected=num_protected, protected_reason=why, text_model=text)
