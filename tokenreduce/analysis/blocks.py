"""A transformer block around one attention op: its input hidden state, residual add, layout, and the side
inputs that carry the token axis into its attention.

The q projection is the nearest projection above the attention query (`ir/graph.ancestor_linear`: through
q/k norms, rotary — full, partial `cat([q_rot, q_pass])`, multi-axis — fused-qkv splits, casts; `linear`,
`addmm`/`mm` with a parameter). The residual add is the first add after the attention output whose other
operand is the block input: the tensor the projection reads (post-LN, no pre-norm) or the input of the norm
it reads (pre-LN; the norm as an op or spelled out, RMSNorm). A norm between the attention output and the add
(Gemma 2/3 and OLMo2 "sandwich"/post-attention norms) is allowed and recorded in the layout.

Layouts: "pre-ln" (x + attn(norm(x))), "parallel" (x + attn(norm(x)) + mlp(norm'(x)), GPT-NeoX), "sandwich" (x + norm(attn(norm(x)))), "post-attn-norm"
(x + norm(attn(x)), OLMo2), "no-pre-norm" (x + attn(x) not followed by a norm op alone, ModernBERT layer 0),
"post-ln" (norm(x + attn(x)), BERT).

Per block it records a skip reason instead of failing, naming the construct: attention operands that are not
[B, H, N, d] / [B*H, N, d], a symbolic token count, cross-attention (with spatial-reduction and class-attention
spelled out), causal attention, no projection above the query, no residual add, a block input that is not
[B, N, C] with tokens on axis 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from tokenreduce.analysis.attention import Attention, mask_is_causal
from tokenreduce.ir import patterns as P
from tokenreduce.ir.graph import (
    ancestor_linear,
    ancestors,
    args_of,
    descendants,
    module_path,
    nodes_between,
    projection_input,
    reach,
    shape,
    static_dim,
)


@dataclass
class SideInput:
    """A tensor entering a block's q/k/v path or its attention logits from outside the hidden-state stream
    that carries the token axis/axes (`axes`, negative indices): rotary cos/sin ("rotary", (-2,)), relative
    position biases / index matrices ("relative-bias", (-2, -1)). (Position ids enter blocks only through
    rotary tables in every recognised family; the contract's kind "positions" is not emitted.)
    A pass reducing tokens gathers it along `axes` by the representatives' original positions; `users`
    are the nodes of this block that read it (rewire those, not other blocks' uses). Index j along an axis
    is token j + `offset` (EVA-02 applies rotary to the patch tokens only: offset 1 after the CLS token).
    A bias that is the attention's mask operand (`Attention.mask`) is not repeated here."""

    node: fx.Node
    axes: tuple[int, ...]
    kind: str
    users: tuple[fx.Node, ...] = ()
    offset: int = 0


@dataclass
class Block:
    """A transformer block as the rewrite passes need it."""

    index: int
    name: str
    attention: Attention
    x_in: fx.Node | None = None  # block input hidden states [B, N, C]
    residual_add: fx.Node | None = None  # h = x + attn(...)
    reduce_at: fx.Node | None = None  # node whose output is reduced (h, or norm1(h) for post-LN)
    layout: str = "?"  # "pre-ln" | "sandwich" | "post-attn-norm" | "no-pre-norm" | "post-ln"
    num_tokens: int = 0
    skip_reason: str | None = None
    side_inputs: list[SideInput] = field(default_factory=list)
    qkv_path: set[fx.Node] = field(default_factory=set)  # nodes from the q/k/v projections to the attention
    projections: tuple[fx.Node | None, fx.Node | None, fx.Node | None] = (None, None, None)  # q, k, v (fused: same)

    @property
    def reducible(self) -> bool:
        return self.skip_reason is None


# ----------------------------------------------------------------------------------------------- residual
def _is_norm_of(src: fx.Node, r: fx.Node, depth: int = 14) -> bool:
    """`src` is a normalisation of `r`: a norm op reading `r`, or elementwise ops over `r` that include a
    norm statistic (rsqrt / var_mean; RMSNorm spelled out) within `depth` steps."""
    if src.target in P.LAYER_NORM:
        return args_of(src)[0] is r
    frontier, seen, stats = [src], {src}, False
    found = False
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n.target in P.NORM_STATS:
                stats = True
            for a in n.all_input_nodes:
                if a is r:
                    found = True
                elif a not in seen and a.op == "call_function" and a.target not in P.PROJECTION_OPERANDS and \
                        a.target not in P.SOFTMAX:
                    seen.add(a)
                    nxt.append(a)
        frontier = nxt
    return found and (stats or any(n.target in P.NORM_STATS for n in seen))


def _parallel_branch(att: Attention, branch: fx.Node) -> fx.Node | None:
    """The MLP output when the residual add's branch is `attn_out + mlp_out` (a parallel block)."""
    if branch.target not in P.ADD:
        return None
    from_attention = descendants([att.output])
    sides = [a for a in args_of(branch)[:2] if isinstance(a, fx.Node)]
    other = [a for a in sides if a not in from_attention]
    if len(sides) == 2 and len(other) == 1 and any(a.target in P.PROJECTION_OPERANDS for a in ancestors(other[0], 12)):
        return other[0]
    return None


def _has_norm(nodes: set[fx.Node]) -> bool:
    return any(n.target in P.LAYER_NORM or n.target in P.NORM_STATS for n in nodes)


def adds_after(start: fx.Node, limit: int) -> tuple[list[fx.Node], set[fx.Node]]:
    """The adds reached from `start` breadth first (at most `limit` levels), in the order met, without going
    through another attention (softmax or SDPA): the candidates for the residual add that closes a sublayer;
    and every node reached (`start` included), to tell an add's branch operand from its residual one."""
    frontier, seen = [start], {start}
    order: list[fx.Node] = []
    for _ in range(limit):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen or u.op != "call_function" or u.target in P.SOFTMAX or u.target in P.SDPA_SPELLINGS:
                    continue
                seen.add(u)
                nxt.append(u)
                if u.target in P.ADD:
                    order.append(u)
        if not nxt:
            break
        frontier = nxt
    return order, seen


def _residual_add(att: Attention, src: fx.Node, limit: int = 40) -> tuple[fx.Node, fx.Node] | None:
    """The first add after the attention output whose other operand is the block input: (add, x_in)."""
    order, seen = adds_after(att.output, limit)
    for add in order:
        a, b = args_of(add)[0], args_of(add)[1]
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            continue
        for r, branch_side in ((a, b), (b, a)):
            if r in seen or branch_side not in seen:
                continue
            if r is src or _is_norm_of(src, r):
                return add, r
    return None


# ----------------------------------------------------------------------------------------------- cross-attn
def _cross_reason(att: Attention, n: object, m: object) -> str:
    kp = ancestor_linear(att.k)
    kin = projection_input(kp) if kp is not None else None
    if kin is not None and any(a.target in P.SPATIAL_REDUCE for a in ancestors(kin, 30)):
        return (f"spatial-reduction attention ({n} queries over {m} keys computed from a downsampled copy of the "
                "tokens, PVT-style); token reduction would change the keys' spatial grid, so it is not reduced")
    if n == 1:
        return (f"class attention / attention pooling (1 query over {m} keys: a class token or a learned probe "
                "attending to the tokens, CaiT class blocks, SigLIP's MAP head); only self-attention is reduced")
    return f"cross-attention ({n} queries over {m} keys); only self-attention is reduced"


# ----------------------------------------------------------------------------------------------- block
def analyse_block(index: int, att: Attention, causal_ok: bool = False) -> Block:
    """The block around `att`. Causal attention is a skip reason (the encoder methods need bidirectional
    attention) unless `causal_ok` (decoder analysis)."""
    blk = Block(index=index, name=f"block{index}", attention=att)
    qs, ks = shape(att.q), shape(att.k)
    if qs is None or ks is None or len(qs) not in (3, 4):
        blk.skip_reason = f"attention operands have shape {qs}; expected [B, H, N, d] or [B*H, N, d] tensors"
        return blk
    n = qs[-2]
    blk.num_tokens = static_dim(n) or 0
    if static_dim(n) is None:
        blk.skip_reason = "token count is symbolic; tokenreduce needs a static token count"
        return blk
    if ks[-2] != n:
        blk.skip_reason = _cross_reason(att, n, ks[-2])
        return blk
    if not causal_ok and (att.is_causal or mask_is_causal(att.mask)):
        blk.skip_reason = "causal attention (decoder); encoder methods (ToMe/EViT) need bidirectional attention"
        return blk
    lin = ancestor_linear(att.q)
    if lin is None:
        blk.skip_reason = (f"no projection (linear, addmm, mm or matmul with a parameter) found above the attention "
                           f"query `{att.q.name}` within 24 ops")
        return blk
    src = projection_input(lin)
    found = _residual_add(att, src) if src is not None else None
    if found is None or src is None:
        blk.skip_reason = (f"no residual add after the attention output `{att.output.name}` that adds the input of "
                           f"the query projection `{lin.name}` (or the tensor its norm reads)")
        return blk
    add, x_in = found
    xs = shape(x_in)
    if xs is None or len(xs) != 3 or xs[1] != n:
        blk.skip_reason = f"block input has shape {xs}; expected [B, {n}, C] with tokens on axis 1"
        return blk
    branch = [a for a in args_of(add)[:2] if a is not x_in]
    post_attn_norm = bool(branch) and isinstance(branch[0], fx.Node) and _has_norm(nodes_between([att.output], [branch[0]]))
    parallel = _parallel_branch(att, branch[0]) if branch and isinstance(branch[0], fx.Node) else None
    blk.x_in, blk.residual_add = x_in, add
    pre_norm = src is not x_in
    norms_after = [u for u in add.users if u.target in P.LAYER_NORM]
    if parallel is not None:  # x + attn(norm(x)) + mlp(norm'(x)) (GPT-NeoX, GPT-J, Phi-2): one add ends the block
        blk.layout, blk.reduce_at = "parallel", add
    elif pre_norm:
        blk.layout, blk.reduce_at = ("sandwich" if post_attn_norm else "pre-ln"), add
    elif len(add.users) == 1 and norms_after:
        blk.layout, blk.reduce_at = "post-ln", norms_after[0]
    elif post_attn_norm:
        blk.layout, blk.reduce_at = "post-attn-norm", add
    else:
        blk.layout, blk.reduce_at = "no-pre-norm", add
    _find_side_inputs(blk)
    mlp_add = [u for u in blk.reduce_at.users if u.target in P.ADD]
    other = parallel if parallel is not None else (mlp_add[-1] if mlp_add else add)
    name = _common_prefix(module_path(att.node), module_path(other))
    if name:
        blk.name = name
    return blk


def _common_prefix(a: list[str], b: list[str]) -> str:
    common = ""
    for x in a:
        if x in b:
            common = x
    return common


# ----------------------------------------------------------------------------------------------- side inputs
def _token_offset(consumer: fx.Node, m: int, n: int, stream: set[fx.Node]) -> int | None:
    """Where rows of a side input with `m` rows start among the `n` tokens, from the slice of the token axis
    the consumer's in-stream operand went through (0 when m == n)."""
    if m == n:
        return 0
    frontier = [a for a in consumer.all_input_nodes if a in stream]
    for _ in range(8):
        nxt: list[fx.Node] = []
        for node in frontier:
            if node.target in P.SLICE:
                s_in, s_out = shape(args_of(node)[0]), shape(node)
                dim = args_of(node)[1]
                if s_in is not None and s_out is not None and isinstance(dim, int) and s_in[dim] == n and s_out[dim] == m:
                    start = args_of(node)[2] if len(node.args) > 2 else 0
                    return int(start or 0)
            nxt.extend(a for a in node.all_input_nodes if a in stream)
        frontier = nxt
    return None


def _inside(node: fx.Node, stream: set[fx.Node], before: set[fx.Node], limit: int = 400) -> list[fx.Node]:
    """Ancestors of `node` computed inside this block (from the block input on, not before it)."""
    out: list[fx.Node] = []
    stack, seen = [node], {node}
    while stack and len(out) < limit:
        n = stack.pop()
        if n not in stream or n in before:
            continue
        out.append(n)
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return out


def _tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _find_side_inputs(blk: Block) -> None:
    """Tensors entering the q/k/v paths from outside the hidden-state stream with the token axis at -2 (rotary
    cos/sin: `q * cos + rotate_half(q) * sin`), and logit biases with two token axes. Position ids reach the
    blocks of every recognised family only through such tables, so kind "positions" is not emitted."""
    att, n = blk.attention, blk.num_tokens
    assert blk.x_in is not None
    stream = descendants([blk.x_in])
    before = set(reach([blk.x_in], "all_input_nodes", None))
    seen: set[fx.Node] = set()
    projs = tuple(ancestor_linear(o, 16) for o in (att.q, att.k, att.v))
    blk.projections = projs  # type: ignore[assignment]
    users: dict[fx.Node, list[fx.Node]] = {}  # outside tensor -> its readers on the q, k and v paths
    for operand, proj in zip((att.q, att.k, att.v), projs):
        if proj is None:
            continue
        path = nodes_between([proj], [operand])
        blk.qkv_path |= path
        for node in path:
            if node is proj:
                continue  # its weight and bias are not per-token (a [C, C] weight looks like one when N == C)
            for inp in node.all_input_nodes:
                if inp not in stream and _tensor(inp) and node not in users.get(inp, []):
                    users.setdefault(inp, []).append(node)
    for inp, us in users.items():
        s, us_shape = shape(inp), shape(us[0])
        if s is None or us_shape is None or len(s) < 2 or len(us_shape) < 2:
            continue
        m = static_dim(s[-2])
        if m is None or m != us_shape[-2] or m > n:
            continue
        offset = _token_offset(us[0], m, n, stream)
        if offset is None:
            continue
        seen.add(inp)
        blk.side_inputs.append(SideInput(inp, (-2,), "rotary", tuple(us), offset))
    for mod in att.score_mods:
        if mod.kind != "bias" or mod.operand is None or mod.operand is att.mask:
            continue
        if mod.operand not in stream:
            frontier = {mod.operand: list(mod.nodes)}
        else:  # computed from q/k (DeBERTa c2p/p2c): the position index matrices it gathers with
            region = _inside(mod.operand, stream, before)
            frontier = {}
            for node in region:
                for inp in node.all_input_nodes:
                    if inp not in stream and _tensor(inp):
                        frontier.setdefault(inp, []).append(node)
        for inp, us in frontier.items():
            s = shape(inp)
            if inp in seen or s is None or len(s) < 2 or tuple(s[-2:]) != (n, n):
                continue
            seen.add(inp)
            blk.side_inputs.append(SideInput(inp, (-2, -1), "relative-bias", tuple(us)))
