"""Find attention in an ATen graph: the fused SDPA spellings and explicit `q @ k^T -> ... -> softmax -> @ v`,
with everything done to the logits in between recorded as score modifiers.

Explicit attention is matched by walking up from a softmax over the last axis to the `q @ k^T` product
through the declarative op sets of `ir/patterns.py`: scale (`mul`/`div` by a constant, also a 0-d constant
tensor such as DeBERTa's `sqrt(d * 3)`, on the logits, on q or on k^T), additive terms (`add`/`add_`: masks,
relative-position biases, DeBERTa's c2p/p2c terms), `masked_fill`, soft-capping (`tanh(x / c) * c`, Gemma 2),
talking heads (CaiT: `permute -> linear over the head axis -> permute` before and after softmax), views
between the `[B*H, N, N]` (`bmm`) and `[B, H, N, N]` spellings, and casts. Then forward from softmax through
dropout/casts/views (and talking heads) to `probs @ v`.

Also read here: causality (SDPA's `is_causal`, or a mask built by comparing position ranges) and
sliding-window/local attention (`Attention.window`): the position-only part of the mask is evaluated and
recognised as a band `|i - j| < window`.

A softmax that is not matched is not silently ignored: `attention_near_misses` says which node it was and
where the match stopped, so the refusal for a model "without attention" names what it did see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from tokenreduce.ir import patterns as P
from tokenreduce.ir.graph import (
    ancestors,
    args_of,
    constant_scalar,
    evaluate_constant,
    nodes_between,
    shape,
    static_dim,
)


@dataclass
class ScoreMod:
    """One thing done to the attention logits between q @ k^T and softmax (in graph order).

    kind: "scale" (value = the factor), "softcap" (value = c in `tanh(x / c) * c`), "bias" (an additive
    term that is not a mask: relative-position bias, disentangled c2p/p2c terms; operand = the tensor
    added), "mask" (an additive mask; operand = the mask), "masked_fill" (operand = the boolean condition,
    value = the fill value), "talking-heads" (a linear over the head axis; operand = its weight; nodes =
    permute, linear, permute; also recorded when it follows softmax, with `after_softmax`).
    `nodes` are the ops that apply it (for SDPA: the SDPA node itself).
    """

    kind: str
    nodes: tuple[fx.Node, ...]
    operand: fx.Node | None = None
    value: float | None = None
    after_softmax: bool = False


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
    output: fx.Node  # the attention result [B, H, N, d] (or [B*H, N, d] for bmm attention)
    mask_add: fx.Node | None = None  # explicit: the add that applies the mask
    spelling: str = ""
    score_mods: list[ScoreMod] = field(default_factory=list)  # logits -> softmax, in order
    softcap: float | None = None  # c of `tanh(logits / c) * c` when the logits are soft-capped
    window: int | None = None  # sliding-window / local attention: a query i sees keys j with |i - j| < window
    heads: int | None = None  # query heads; for [B*H, N, d] (bmm) operands read from the [B, H, N, d] view above


# ----------------------------------------------------------------------------------------------- finding
def find_attention(gm: fx.GraphModule) -> list[Attention]:
    found: list[Attention] = []
    windows: dict[fx.Node, int | None] = {}  # mask node -> window (layers share masks)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in P.SDPA_SPELLINGS:
            att = _match_sdpa(node, P.SDPA_SPELLINGS[node.target])
        elif node.target in P.SOFTMAX:
            m = _match_explicit(node)
            if isinstance(m, str):
                continue
            att = m
        else:
            continue
        att.window = attention_window(att, windows)
        att.heads = query_heads(att.q)
        found.append(att)
    return found


def attention_near_misses(gm: fx.GraphModule, limit: int = 3) -> list[str]:
    """Softmax nodes over the last axis of a >= 3-D tensor (what attention probabilities look like) that
    were not matched as attention, each with where the match stopped."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in P.SOFTMAX:
            s = shape(node)
            if s is None or len(s) < 3:
                continue
            m = _match_explicit(node)
            if isinstance(m, str):
                out.append(f"softmax `{node.name}` over a {list(s)} tensor: {m}")
    return out[:limit]


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
        mods.append(ScoreMod(additive_kind(mask), (node,), operand=mask))
    return Attention("sdpa", node, q, k, v, float(scale), mask, causal, output, spelling=sp.origin, score_mods=mods)


def from_activations(term: fx.Node) -> bool:
    """`term` is computed from a projection or matrix product (hence from the hidden states)."""
    return any(a.target in P.PROJECTION_OPERANDS or a.target in P.MATMUL for a in ancestors(term, 400))


def additive_kind(term: fx.Node) -> str:
    """"mask" for a term computed from graph inputs (the attention mask), positions and constants only;
    "bias" when it depends on a parameter or on the hidden states (relative-position biases, c2p/p2c)."""
    v = term.meta.get("val")
    if isinstance(v, torch.Tensor) and v.dtype == torch.bool:
        return "mask"
    for a in ancestors(term, 400):
        if a.op == "get_attr":
            av = a.meta.get("val")
            if av is None:
                continue  # a constant without a recorded value (lifted scalars)
            if isinstance(av, torch.Tensor) and av.numel() > 1 and av.is_floating_point():
                return "bias"
        if a.target in P.LINEAR or a.target in P.MATMUL:
            return "bias"
    return "mask"


# ----------------------------------------------------------------------------------------------- explicit
def _scalar_operand(node: fx.Node) -> tuple[fx.Node | None, float | None]:
    """For `mul`/`div` with one constant operand: (the other operand, the factor applied to it)."""
    a = args_of(node)[0]
    b = args_of(node)[1] if len(node.args) > 1 else None
    cb = constant_scalar(b)
    if cb is not None and isinstance(a, fx.Node):
        if node.target in P.SCALE_DIV:
            return a, (1.0 / cb if cb else None)
        return a, cb
    ca = constant_scalar(a)
    if ca is not None and isinstance(b, fx.Node) and node.target in P.SCALE_MUL:
        return b, ca
    return None, None


def _talking_heads(node: fx.Node) -> tuple[fx.Node, ScoreMod] | None:
    """`permute -> linear over the head axis -> permute` (CaiT); returns (the input, the mod)."""
    if node.target not in P.PERMUTE:
        return None
    lin = args_of(node)[0]
    if not isinstance(lin, fx.Node) or lin.target not in P.LINEAR:
        return None
    inner = args_of(lin)[0]
    w = args_of(lin)[1]
    ws = shape(w)
    if not isinstance(inner, fx.Node) or inner.target not in P.PERMUTE or ws is None or len(ws) != 2 or ws[0] != ws[1]:
        return None
    return args_of(inner)[0], ScoreMod("talking-heads", (inner, lin, node), operand=w)  # type: ignore[arg-type]


def _strip_scales(node: object, mods: list[ScoreMod]) -> object:
    """Walk up through at most three constant scalings of an attention operand, recording each in `mods`."""
    for _ in range(3):
        if not isinstance(node, fx.Node) or node.target not in P.SCALE_MUL | P.SCALE_DIV:
            break
        inner, c = _scalar_operand(node)
        if inner is None or c is None:
            break
        mods.append(ScoreMod("scale", (node,), value=c))
        node = inner
    return node


def _qk_operands(mm: fx.Node) -> tuple[fx.Node, fx.Node, list[ScoreMod]] | str:
    """q, k and any scale applied to q or to k^T, for a `q @ k^T` product."""
    mods: list[ScoreMod] = []
    q = _strip_scales(args_of(mm)[0], mods)
    kt = _strip_scales(args_of(mm)[1], mods)
    if not isinstance(q, fx.Node) or not isinstance(kt, fx.Node):
        return f"the product `{mm.name}` before softmax has a constant operand"
    if kt.target in P.TRANSPOSE:
        return q, args_of(kt)[0], mods
    if kt.target in P.PERMUTE:
        dims = list(args_of(kt)[1])
        nd = len(dims)
        if [d % nd for d in dims[-2:]] == [nd - 1, nd - 2]:
            return q, args_of(kt)[0], mods
    return f"the product `{mm.name}` before softmax does not multiply by a transposed key (its second operand is " \
           f"`{kt.name}` = {getattr(kt.target, '__name__', kt.target)})"


def _walk_logits(node: object, budget: int = 24) -> tuple[fx.Node, fx.Node, fx.Node, list[ScoreMod]] | str:
    """From softmax's input up to `q @ k^T`: (matmul, q, k, mods in graph order) or why not."""
    mods: list[ScoreMod] = []  # collected from softmax upwards
    for _ in range(budget):
        if not isinstance(node, fx.Node):
            return "the logits are a constant"
        t = node.target
        if t in P.MATMUL:
            qk = _qk_operands(node)
            if isinstance(qk, str):
                return qk
            q, k, qk_mods = qk
            return node, q, k, qk_mods + mods[::-1]
        if t in P.LOGIT_LAYOUT:
            node = args_of(node)[0]
            continue
        if t in P.SCALE_MUL | P.SCALE_DIV:
            a = args_of(node)[0]
            c = constant_scalar(args_of(node)[1]) if len(node.args) > 1 else None
            if t in P.SCALE_MUL and isinstance(a, fx.Node) and a.target in P.TANH and c is not None:
                inner = args_of(a)[0]
                inner_in, inner_c = _scalar_operand(inner) if isinstance(inner, fx.Node) and inner.target in \
                    P.SCALE_MUL | P.SCALE_DIV else (None, None)
                if inner_in is None or inner_c is None or not math.isclose(inner_c * c, 1.0, rel_tol=1e-5):
                    return f"the logits pass through tanh (`{a.name}`) without the soft-cap form tanh(x / c) * c"
                mods.append(ScoreMod("softcap", (inner, a, node), value=c))  # type: ignore[arg-type]
                node = inner_in
                continue
            other, factor = _scalar_operand(node)
            if other is None or factor is None:
                return f"the logits are multiplied by `{node.name}`, which is not a constant"
            mods.append(ScoreMod("scale", (node,), value=factor))
            node = other
            continue
        if t in P.ADD:
            a, b = args_of(node)[0], args_of(node)[1]
            ra = _walk_logits(a, budget - 1)
            main, term, res = (a, b, ra) if not isinstance(ra, str) else (b, a, _walk_logits(b, budget - 1))
            if isinstance(res, str):
                return f"neither operand of the add `{node.name}` on the logits leads to q @ k^T ({ra})"
            if not isinstance(term, fx.Node):
                node = main
                continue
            mm, q, k, below = res
            return mm, q, k, below + [ScoreMod(additive_kind(term), (node,), operand=term)] + mods[::-1]
        if t in P.MASKED_FILL:
            cond = args_of(node)[1]
            fill = const_value(args_of(node)[2]) if len(node.args) > 2 else None
            mods.append(ScoreMod("masked_fill", (node,), operand=cond if isinstance(cond, fx.Node) else None,
                                 value=fill))
            node = args_of(node)[0]
            continue
        th = _talking_heads(node)
        if th is not None:
            node, mod = th
            mods.append(mod)
            continue
        if t in P.TANH:
            return f"the logits pass through tanh (`{node.name}`) without the soft-cap form tanh(x / c) * c"
        return f"`{node.name}` ({getattr(t, '__name__', t)}) between the logits and softmax is not a recognised " \
               "score modifier (scale, add, masked_fill, soft-cap, talking heads, view/cast)"
    return "no q @ k^T product within reach of the softmax input"


def const_value(a: object) -> float | None:
    return constant_scalar(a)


def _probs_to_value(softmax: fx.Node) -> tuple[fx.Node, list[ScoreMod]] | str:
    """softmax -> (dropout, casts, views, talking heads, masked_fill)* -> probs @ v."""
    p: fx.Node = softmax
    mods: list[ScoreMod] = []
    for _ in range(8):
        users = [u for u in p.users if u.op == "call_function" and u.target is not torch.ops.aten._assert_tensor_metadata.default]
        mm = [u for u in users if u.target in P.MATMUL and args_of(u)[0] is p]
        if mm:
            return mm[0], mods
        if len(users) != 1:
            return f"the probabilities `{p.name}` are used by {len(users)} ops and none is a product with v"
        u = users[0]
        if u.target in P.DROPOUT or u.target in P.LOGIT_LAYOUT or u.target in P.MASKED_FILL:
            p = u
            continue
        if u.target in P.PERMUTE:
            lin = [w for w in u.users if w.target in P.LINEAR]
            back = [w for w in lin[0].users if w.target in P.PERMUTE] if len(lin) == 1 else []
            th = _talking_heads(back[0]) if len(back) == 1 else None
            if th is not None:
                mod = th[1]
                mod.after_softmax = True
                mods.append(mod)
                p = back[0]
                continue
        return f"the probabilities go to `{u.name}` ({getattr(u.target, '__name__', u.target)}), not to a product with v"
    return "no product with v within reach of the softmax"


def _match_explicit(softmax: fx.Node) -> Attention | str:
    """matmul(q, k^T) -> score modifiers -> softmax(-1) -> dropout* -> matmul(., v), or why not."""
    dim = args_of(softmax)[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim", -1)
    sm_shape = shape(softmax)
    if sm_shape is None or len(sm_shape) < 3:
        return "not over a >= 3-D tensor"
    if dim not in (-1, len(sm_shape) - 1):
        return f"softmax over axis {dim}, not the last (key) axis"
    up = _walk_logits(args_of(softmax)[0])
    if isinstance(up, str):
        return up
    _, q, k, mods = up
    down = _probs_to_value(softmax)
    if isinstance(down, str):
        return down
    out, after = down
    mods = mods + after
    scale = 1.0
    for m in mods:
        if m.kind == "scale" and m.value is not None:
            scale *= m.value
    # Attention.mask: the additive term nearest softmax that is not computed from activations (a mask, or a
    # position bias gathered like one); DeBERTa's c2p/p2c terms are recomputed from reduced q/k instead.
    additive = [m for m in mods if m.kind in ("mask", "bias") and m.operand is not None and
                not from_activations(m.operand)]
    chosen = additive[-1] if additive else None
    softcaps = [m.value for m in mods if m.kind == "softcap"]
    qs = shape(q)
    spelling = "matmul-softmax-matmul (eager attention)" if qs is None or len(qs) == 4 else \
        "bmm-softmax-bmm on [B*H, N, d] (eager attention)"
    return Attention("explicit", softmax, q, k, args_of(out)[1], scale, chosen.operand if chosen else None, False, out,
                     mask_add=chosen.nodes[0] if chosen else None, spelling=spelling, score_mods=mods,
                     softcap=softcaps[0] if softcaps else None)


def query_heads(q: fx.Node) -> int | None:
    """Heads of a [B, H, N, d] query; for [B*H, N, d] the H of the [B, H, N, d] tensor it is a view of."""
    qs = shape(q)
    if qs is None:
        return None
    if len(qs) == 4:
        return static_dim(qs[1])
    node: object = q
    for _ in range(6):
        if not isinstance(node, fx.Node) or node.target not in P.LOGIT_LAYOUT | P.PERMUTE | P.TRANSPOSE:
            return None
        node = args_of(node)[0]
        s = shape(node)
        if s is not None and len(s) == 4 and s[-2:] == qs[-2:] and static_dim(s[0] * s[1]) == static_dim(qs[0]):
            return static_dim(s[1])
    return None


# ----------------------------------------------------------------------------------------------- causality
_TRIANGLE = {torch.ops.aten.tril.default, torch.ops.aten.triu.default}
_COMPARE_T = {torch.ops.aten.le.Tensor, torch.ops.aten.lt.Tensor, torch.ops.aten.ge.Tensor, torch.ops.aten.gt.Tensor}


def index_only(node: fx.Node) -> bool:
    """True when `node` is computed from `arange`s and constants only (a position range, not data)."""
    anc = ancestors(node, 60)
    return any(a.target is torch.ops.aten.arange.default or a.target is torch.ops.aten.arange.start for a in anc) and not any(
        a.op == "placeholder" for a in anc)


def _looked_up(part: fx.Node, term: fx.Node) -> bool:
    """`part` reaches `term` as a value used to index or compute integers (T5's relative-position buckets:
    `(i - j > 0).long() * buckets -> embedding`), not as a mask that hides keys."""
    for node in nodes_between([part], [term]):
        v = node.meta.get("val")
        if node.target in P.LOOKUP or (isinstance(v, torch.Tensor) and not v.is_floating_point() and
                                       v.dtype != torch.bool):
            return True
    return False


def position_parts(term: fx.Node, n: int) -> list[torch.Tensor]:
    """The position-only boolean parts of a mask (computed from `arange`s and constants, not from the user's
    padding mask; the largest such [.., n, n] nodes), evaluated as `allowed[i, j]` [n, n] matrices. Polarity
    comes from the diagonal: a query always sees itself (a part that is True on the diagonal is "allowed",
    one that is False there is "hidden" and is inverted)."""
    parts = []
    for a in ancestors(term, 400):
        v = a.meta.get("val")
        if not (isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.dim() >= 2 and
                tuple(v.shape[-2:]) == (n, n) and index_only(a)):
            continue
        if any(isinstance(u.meta.get("val"), torch.Tensor) and u.meta["val"].dtype == torch.bool and index_only(u)
               and tuple(u.meta["val"].shape[-2:]) == (n, n) for u in a.users):
            continue  # not the largest position-only part
        if _looked_up(a, term):
            continue
        value = evaluate_constant(a, 200)
        if value is None:
            continue
        mat = value.reshape(-1, n, n)[0].bool()
        diag = mat.diagonal()
        if bool(diag.all()):
            parts.append(mat)
        elif not bool(diag.any()):
            parts.append(~mat)
    return parts


def mask_is_causal(mask: fx.Node | None) -> bool:
    """The mask hides every later key: read from its evaluated position-only parts where there are some
    (so a bidirectional band built from two position comparisons is not mistaken for causal), else from
    its construction (`tril`/`triu`, or a comparison of two position ranges)."""
    if mask is None:
        return False
    ms = shape(mask)
    n = static_dim(ms[-1]) if ms is not None and len(ms) >= 2 and ms[-1] == ms[-2] else None
    if n is not None and n > 1:
        parts = position_parts(mask, n)
        if parts:
            later = torch.ones(n, n, dtype=torch.bool).triu(1)
            return any(not bool(p[later].any()) for p in parts)
    for a in ancestors(mask):
        if a.target in _TRIANGLE:
            return True
        if a.target in _COMPARE_T:
            x, y = args_of(a)[0], args_of(a)[1]
            if isinstance(x, fx.Node) and isinstance(y, fx.Node) and index_only(x) and index_only(y):
                return True
    return False


def is_causal(att: Attention) -> bool:
    return att.is_causal or mask_is_causal(att.mask)


def _mask_operands(att: Attention) -> list[fx.Node]:
    """Masks only: a relative-position bias's bucketing compares distances too, but does not hide keys."""
    out = [m.operand for m in att.score_mods if m.kind in ("mask", "masked_fill") and m.operand is not None]
    return [o for o in out if isinstance(o, fx.Node)]


def _run(v: torch.Tensor) -> int:
    """Length of the leading run of True in a 1-D boolean tensor, or -1 when True appears after it."""
    run = int(v.long().cumprod(0).sum())
    return run if not bool(v[run:].any()) else -1


def _band(allowed: torch.Tensor) -> int | None:
    """For a boolean [N, N] `allowed[i, j]`: the window w when it is exactly a band |i - j| < w, symmetric or
    intersected with j <= i (causal), w < N; else None. O(N^2) compare once, then the first row and column."""
    n = allowed.shape[-1]
    if not bool((allowed[1:, 1:] == allowed[:-1, :-1]).all()):
        return None  # not a function of i - j
    below, above = _run(allowed[:, 0]), _run(allowed[0, :])  # reach towards earlier / later keys
    if below < 1 or above < 1:
        return None
    if above == 1 and below < n:
        return below  # causal sliding window
    if above == below and below < n:
        return below  # bidirectional local attention
    return None


def attention_window(att: Attention, cache: dict[fx.Node, int | None] | None = None) -> int | None:
    """Sliding-window/local attention read from the mask: the position-only boolean parts of the mask
    (computed from `arange`s and constants, not from the user's padding mask) are evaluated and recognised
    as a band |i - j| < w (Gemma 2/3, Mistral/Qwen2 sliding window, ModernBERT local layers)."""
    qs = shape(att.q)
    n = static_dim(qs[-2]) if qs is not None and len(qs) >= 2 else None
    if n is None or n < 2:
        return None
    windows: list[int] = []
    cache = {} if cache is None else cache
    for term in _mask_operands(att):
        if term in cache:
            known = cache[term]
            if known is not None:
                windows.append(known)
            continue
        cache[term] = None
        for allowed in position_parts(term, n):
            w = _band(allowed)
            if w is not None:
                windows.append(w)
                prev = cache[term]
                cache[term] = w if prev is None else min(w, prev)
    return min(windows) if windows else None
