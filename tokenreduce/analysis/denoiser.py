"""Graph analysis of a diffusion denoiser: its transformer blocks as sublayers that can run on merged tokens.

A denoiser (a diffusers UNet's `BasicTransformerBlock`s, a DiT/PixArt transformer) keeps its full token grid
between blocks: convolutions, up/down-sampling and the output read every position. Token merging for these
models (ToMe for SD) therefore happens *inside* a block: each sublayer -- self-attention, optionally
cross-attention and the MLP -- reads merged tokens and its output is unmerged (every original token takes its
group's value) before the residual add. This file finds, in the ATen graph, what that rewrite needs:

* a **sublayer** is a residual branch `h' = h + branch(h)`: its `merge_at` is the tensor its first projections
  read (the norm of `h`, with AdaLN's scale/shift when the block modulates it: DiT), its `readers` are those
  projections, and `residual_add` the add that closes it;
* a **block** is one self-attention sublayer followed by at most one cross-attention sublayer (k/v computed
  from outside the token stream: text embeddings) and one MLP sublayer; its input `x_in` (the hidden states
  before the first norm, `[B, N, C]`) is what tomesd matches tokens on;
* the **timestep input**: the graph input reaching a `sin`/`cos` (the sinusoidal timestep embedding), from
  which per-step destinations are derived (`methods/tomesd.py`, `per_step`);
* the **token grid** of a block: from the model's first 4-D input `[B, C, H, W]` (the latent `sample`), with
  tomesd's own arithmetic: `downsample = ceil(sqrt(H * W // N))`, grid `ceil(H / ds) x ceil(W / ds)`, which
  must hold exactly N tokens; for a packed latent `[B, N, C]` (Flux) the grid is not in the graph and the
  method's options give it (`packed_tokens`);
* **joint text + image attention** (SD3, Flux; `analysis/denoiser_joint.py`): only the image tokens merge. A
  double-stream block's sublayer is the image stream's (its `JointSpan` says where the image sits in the joint
  sequence, which cuts after the attention move and which rotary tables must follow the merge); a
  single-stream block's input is `cat([text, image])` (`x_offset`), its attention and parallel MLP are two
  sublayers unmerged before the `cat` that joins them.

Structure is read from the graph (attention spellings of `analysis/attention.py`, projections, residual adds);
module names only name blocks. Per block it records a skip reason instead of failing: no residual add closing
the self-attention, a grid that does not hold the block's tokens, a symbolic token count, a joint attention
whose image part cannot be told apart. Refuses (raises): a graph with neither a 4-D latent nor a 3-D packed
one, and a graph with no self-attention at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx

from tokenreduce.analysis.attention import Attention, find_attention
from tokenreduce.analysis.blocks import adds_after
from tokenreduce.analysis.denoiser_joint import (
    JointSpan,
    attention_free_reach,
    cuts_after,
    joint_cat,
    parallel_join,
    part_lengths,
    projection_of,
    side_positions,
)
from tokenreduce.analysis.encoder import ModelAnalysis
from tokenreduce.errors import TokenReduceError
from tokenreduce.ir import patterns as P
from tokenreduce.ir.graph import (
    ancestor_linear,
    args_of,
    is_projection,
    module_path,
    nodes_between,
    projection_input,
    reach,
    shape,
    static_dim,
)

SUBLAYER_KINDS = ("attn", "crossattn", "mlp")


@dataclass
class Sublayer:
    """One residual branch of a block that can run on merged tokens.

    kind: "attn" (self-attention), "crossattn" (queries from the tokens, keys/values from outside) or "mlp".
    merge_at: the `[B, N, C]` tensor the sublayer's first projections read (merged before them).
    readers: the nodes inside the sublayer that read `merge_at` (rewired to the merged tensor).
    residual_add: `h + branch`; `branch` is the operand computed by the sublayer (unmerged before the add).
    """

    kind: str
    merge_at: fx.Node
    readers: tuple[fx.Node, ...]
    residual_add: fx.Node  # where the branch rejoins full tokens: the residual add, or a parallel block's join
    branch: fx.Node
    name: str = ""
    offset: int = 0  # the image rows of merge_at start here (Flux single-stream: after the text); 0 otherwise
    joint: JointSpan | None = None  # joint text + image attention: the image part, cuts, rotary tables


@dataclass
class DenoiserBlock:
    """A transformer block of a denoiser: self-attention, then optional cross-attention and MLP sublayers."""

    index: int
    name: str
    x_in: fx.Node | None = None  # block input [B, N, C]: the matching metric
    num_tokens: int = 0
    grid: tuple[int, int] = (0, 0)  # (h, w) tokens; (0, 0) for a packed latent (the method's options give it)
    downsample: int = 0  # tomesd's: ceil(sqrt(H * W // N)) against the model's image input
    x_offset: int = 0  # the image rows of x_in start here (Flux single-stream blocks: after the text tokens)
    joint: str = ""  # "" (image tokens only), "double" (joint attention, own streams) or "single" (one stream)
    sublayers: dict[str, Sublayer] = field(default_factory=dict)
    skip_reason: str | None = None
    # a single-stream block's attention and MLP as one sublayer (merged once, unmerged after the shared output
    # projection and gate, which are per token / per sample): what runs when both merge
    fused: Sublayer | None = None

    @property
    def reducible(self) -> bool:
        return self.skip_reason is None


@dataclass
class DenoiserAnalysis(ModelAnalysis):
    """`ModelAnalysis` for reports (no protected tokens) plus the denoiser's blocks and image size."""

    dblocks: list[DenoiserBlock] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)  # (H, W) of the 4-D image input; (0, 0) for a packed latent
    packed_tokens: int = 0  # N of a packed latent input [B, N, C] (Flux), whose grid the options must give
    timestep: fx.Node | None = None  # the graph input feeding a sinusoidal embedding (sin/cos), if one does


def image_input(gm: fx.GraphModule) -> tuple[fx.Node, int, int, int]:
    """The latent input: `(node, H, W, 0)` for the first 4-D graph input `[B, C, H, W]` (the latent `sample` /
    `hidden_states`), else `(node, 0, 0, N)` for a packed latent, the first 3-D input `[B, N, C]` (Flux's
    `hidden_states`, which diffusers takes first): its grid is not in the graph, the method's options give it."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        s = shape(node)
        if s is not None and len(s) == 4:
            h, w = static_dim(s[2]), static_dim(s[3])
            if h is not None and w is not None:
                return node, h, w, 0
    for node in placeholders:
        s = shape(node)
        if s is not None and len(s) == 3 and static_dim(s[1]) is not None:
            return node, 0, 0, int(s[1])
    raise TokenReduceError(
        "tomesd needs the token grid of each block, read from the denoiser's 4-D image input [B, C, H, W] (the "
        "latent `sample`) or given for a packed latent [B, N, C] (Flux); this graph has neither input with static "
        "sizes", setting="method")


def timestep_input(gm: fx.GraphModule, image: fx.Node) -> fx.Node | None:
    """The graph input (other than the image) whose values reach a `sin`/`cos`: the diffusion timestep of a
    sinusoidal timestep embedding (diffusers' `Timesteps`, DiT's AdaLN embedding). None when there is none."""
    trig = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.ops.aten.sin.default,
                                                                                   torch.ops.aten.cos.default)]
    if not trig:
        return None
    feeding = set(reach(trig, "all_input_nodes", None))
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node is not image and node in feeding:
            return node
    return None


def _residual_close(start: fx.Node, merge_at: fx.Node, limit: int = 60) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """The first add after `start` (breadth first, not through another attention) whose other operand `h` is
    not computed from `start` and is what `merge_at` is computed from by norm/modulation ops only (no
    projection, no attention between them): `(add, h, branch)`."""
    adds, seen = adds_after(start, limit)
    for add in adds:
        ops = [a for a in args_of(add)[:2] if isinstance(a, fx.Node)]
        if len(ops) != 2:
            continue
        for h, branch in ((ops[0], ops[1]), (ops[1], ops[0])):
            if h in seen or branch not in seen:
                continue
            path = nodes_between([h], [merge_at])
            if not path or len(path) > 40:
                continue
            # `h` itself may be a projection (a linear `proj_in` feeding a block's first layer: SD 2.x, SDXL)
            if any(is_projection(n) or n.target in P.SDPA_SPELLINGS or n.target in P.SOFTMAX for n in path - {h}):
                continue
            return add, h, branch
    return None


def _first_projections(h: fx.Node, branch: fx.Node) -> list[fx.Node]:
    """Projections on the way from `h` to `branch` that read a tensor computed from `h` without another
    projection in between (the first layer of an MLP)."""
    region = nodes_between([h], [branch])
    projs = [n for n in region if is_projection(n)]
    first = []
    for p in projs:
        inp = projection_input(p)
        if inp is None:
            continue
        if not any(is_projection(n) for n in nodes_between([h], [inp])):
            first.append(p)
    return first


def _readers(merge_at: fx.Node, branch: fx.Node) -> tuple[fx.Node, ...]:
    """The users of `merge_at` on its way to the residual branch `branch` (`Sublayer.readers`)."""
    inside = nodes_between([merge_at], [branch])
    return tuple(u for u in merge_at.users if u in inside)


def _name(nodes: list[fx.Node]) -> str:
    """The deepest module path shared by the nodes' module stacks ("down_blocks.0.attentions.0.transformer_blocks.0")."""
    paths = [module_path(n) for n in nodes]
    if not paths or not paths[0]:
        return ""
    common = ""
    for p in paths[0]:
        if all(p in other for other in paths[1:]):
            common = p
    return common


def _attention_sublayer(att: Attention, kind: str) -> tuple[Sublayer | None, str]:
    qlin = ancestor_linear(att.q)
    if qlin is None:
        return None, f"no projection above the attention query `{att.q.name}`"
    merge_at = projection_input(qlin)
    if merge_at is None:
        return None, f"the query projection `{qlin.name}` reads no [B, N, C] tensor"
    found = _residual_close(att.output, merge_at)
    if found is None:
        return None, (f"no residual add after the attention output `{att.output.name}` whose other operand the "
                      f"query projection's input `{merge_at.name}` is a norm of")
    add, h, branch = found
    return Sublayer(kind, merge_at, _readers(merge_at, branch), add, branch, _name([att.node, add])), ""


def _mlp_sublayer(h: fx.Node, attention_nodes: set[fx.Node]) -> Sublayer | None:
    """The residual branch `h + mlp(norm(h))` right after `h`, if it holds no attention."""
    for add in h.users:
        if add.target not in P.ADD:
            continue
        ops = [a for a in args_of(add)[:2] if isinstance(a, fx.Node)]
        if len(ops) != 2 or h not in ops:
            continue
        branch = ops[1] if ops[0] is h else ops[0]
        region = nodes_between([h], [branch])
        if not region or any(n in attention_nodes for n in region):
            continue
        first = _first_projections(h, branch)
        inputs = {projection_input(p) for p in first}
        if not first or len(inputs) != 1:
            continue
        merge_at = inputs.pop()
        assert merge_at is not None
        return Sublayer("mlp", merge_at, _readers(merge_at, branch), add, branch, _name([*first, add]))
    return None


def _joint_attention(att: Attention, image_side: set[fx.Node]) -> tuple[Sublayer | None, str] | None:
    """A double-stream joint attention (SD3, Flux): the image part's sublayer, or None when the query is not a
    concatenation of projected streams."""
    qs = shape(att.q)
    tokens = static_dim(qs[-2]) if qs is not None and len(qs) >= 3 else None
    if tokens is None:
        return None
    found = joint_cat(att.q, tokens)
    if found is None:
        return None
    cat, parts, dim = found
    lengths = part_lengths(parts, dim)
    projs = [projection_of(p) for p in parts]
    inputs = [projection_input(p) if p is not None else None for p in projs]
    image = [i for i, x in enumerate(inputs) if x is not None and x in image_side]
    if lengths is None or len(image) != 1:
        return None, (f"joint attention `{att.node.name}`: cannot tell which part of its {len(parts)}-part query "
                      "is the image (exactly one must be computed from the latent without another attention)")
    i = image[0]
    merge_at = inputs[i]
    assert merge_at is not None
    offset, length = sum(lengths[:i]), sum(lengths)
    closed = _residual_close(att.output, merge_at)
    if closed is None:
        return None, (f"joint attention `{att.node.name}`: no residual add after it whose other operand the image "
                      f"stream's normed input `{merge_at.name}` is computed from")
    add, h, branch = closed
    cuts = tuple(c for c in cuts_after(att.output, length) if _cuts_image(c, offset, lengths[i], length))
    if not any(_cuts_at(c, offset + lengths[i], offset) for c in cuts):
        return None, (f"joint attention `{att.node.name}`: no slice or split of its output at the end of the image "
                      f"part (rows {offset}..{offset + lengths[i] - 1} of {length}) to move with the merge")
    ends = [n for n in (att.q, att.k, att.v) if isinstance(n, fx.Node)]
    span = JointSpan(offset, length, lengths[i], cuts, side_positions(merge_at, ends, length))
    return Sublayer("attn", merge_at, _readers(merge_at, branch), add, branch, _name([att.node, add]), 0, span), ""


def _cuts_at(cut: fx.Node, end: int, offset: int) -> bool:
    """The cut separates the image part's end (`end`) from what follows: a slice bound there, or a split whose
    piece starting at `offset` ends there."""
    if cut.target is torch.ops.aten.slice.Tensor:
        return end in [a for a in args_of(cut)[2:4] if isinstance(a, int)]
    sizes, start = args_of(cut)[1], 0
    for size in sizes if isinstance(sizes, (list, tuple)) else ():
        if start == offset and isinstance(size, int) and start + size == end:
            return True
        start += size if isinstance(size, int) else 0
    return False


def _cuts_image(cut: fx.Node, offset: int, n: int, length: int) -> bool:
    """A slice or split of the joint sequence (`length` long on its axis) at the image part's boundary."""
    src = args_of(cut)[0]
    s = shape(src)
    if s is None:
        return False
    if cut.target in (torch.ops.aten.slice.Tensor,):
        dim = args_of(cut)[1] if len(cut.args) > 1 else 0
        if static_dim(s[dim]) != length:
            return False
        bounds = [a for a in args_of(cut)[2:4] if isinstance(a, int)]
        return any(b in (offset, offset + n) for b in bounds)
    sizes = args_of(cut)[1]
    dim = args_of(cut)[2] if len(cut.args) > 2 else 0
    return static_dim(s[dim]) == length and isinstance(sizes, (list, tuple)) and sum(sizes) == length


def _image_rows(x_in: fx.Node, image_side: set[fx.Node], layouts: dict[fx.Node, tuple[int, int]]
                ) -> tuple[int, int] | None:
    """`(offset, n)` of the image rows of a single-stream block's input `cat([text, image], 1)`, or None when
    `x_in` is not such a concatenation."""
    if x_in.target is not torch.ops.aten.cat.default:
        return None
    args = args_of(x_in)
    parts, dim = args[0], (args[1] if len(args) > 1 else 0)
    xs = shape(x_in)
    if xs is None or not isinstance(parts, (list, tuple)) or len(parts) < 2 or dim % len(xs) != 1:
        return None
    lengths = part_lengths(list(parts), 1)
    if lengths is None:
        return None

    def is_image(p: fx.Node) -> bool | None:
        if p.target is torch.ops.aten.slice.Tensor and args_of(p)[0] in layouts and args_of(p)[1] in (1, -2):
            off, n = layouts[args_of(p)[0]]  # a slice of the previous single-stream block's output
            start = args_of(p)[2] if len(p.args) > 2 else 0
            return start == off
        return None

    marks = [is_image(p) for p in parts]
    if any(m is None for m in marks):  # the first single-stream block: the streams themselves
        marks = [p in image_side for p in parts]
    image = [i for i, m in enumerate(marks) if m]
    if len(image) != 1:
        return None
    return sum(lengths[:image[0]]), lengths[image[0]]


def _single_stream(att: Attention, sub: Sublayer, offset: int, n_img: int, tokens: int) -> list[Sublayer] | str:
    """Flux's single-stream block: attention and MLP read one norm in parallel and meet in a `cat` before one
    output projection. Two sublayers (attn: q/k/v; mlp: the other readers), each unmerged before the join."""
    attn_side = nodes_between([sub.merge_at], [att.output])
    attn_readers = tuple(r for r in sub.readers if r in attn_side)
    others = [r for r in sub.readers if r not in attn_side]
    ends = [n for n in (att.q, att.k, att.v) if isinstance(n, fx.Node)]
    span = JointSpan(offset, tokens, n_img, (), side_positions(sub.merge_at, ends, tokens))
    if not others:
        return [Sublayer("attn", sub.merge_at, attn_readers, sub.residual_add, sub.branch, sub.name, offset, span)]
    join = parallel_join(att.output, others)
    if join is None:
        return (f"the norm `{sub.merge_at.name}` feeds the attention and other projections "
                f"({', '.join(o.name for o in others)}) that meet it nowhere before the residual add")
    node, attn_branch, mlp_branch = join
    return [Sublayer("attn", sub.merge_at, attn_readers, node, attn_branch, sub.name, offset, span),
            Sublayer("mlp", sub.merge_at, tuple(others), node, mlp_branch, sub.name, offset,
                     JointSpan(offset, tokens, n_img))]


def analyse_denoiser(gm: fx.GraphModule) -> DenoiserAnalysis:
    """Find the denoiser's transformer blocks, their sublayers and token grids."""
    image, height, width, packed = image_input(gm)
    attentions = find_attention(gm)
    attention_nodes = {a.node for a in attentions}
    image_side = attention_free_reach(image, attention_nodes)
    selfs: list[tuple[Attention, tuple[Sublayer | None, str] | None]] = []
    crosses = {}
    for att in attentions:
        qs, ks = shape(att.q), shape(att.k)
        if qs is None or ks is None or len(qs) not in (3, 4):
            continue
        joint = _joint_attention(att, image_side)
        if joint is not None:
            selfs.append((att, joint))
        elif ks[-2] == qs[-2] and ancestor_linear(att.k) is not None and ancestor_linear(att.q) is not None and \
                projection_input(ancestor_linear(att.k)) is projection_input(ancestor_linear(att.q)):  # type: ignore[arg-type]
            selfs.append((att, None))
        else:
            crosses[att.node] = att
    if not selfs:
        raise TokenReduceError("no self-attention found in the denoiser graph (looked for attention whose queries, "
                               "keys and values are projected from one tensor); tomesd merges tokens of "
                               "self-attention blocks", setting="method")
    blocks: list[DenoiserBlock] = []
    layouts: dict[fx.Node, tuple[int, int]] = {}  # single-stream block outputs: (image offset, image tokens)
    for i, (att, joint) in enumerate(selfs):
        blk = DenoiserBlock(index=i, name=f"block{i}")
        blocks.append(blk)
        n = static_dim(shape(att.q)[-2])  # type: ignore[index]
        if n is None:
            blk.skip_reason = "token count is symbolic; tomesd needs a static token count"
            continue
        sub, why = joint if joint is not None else _attention_sublayer(att, "attn")
        if sub is None:
            blk.skip_reason = why
            continue
        blk.name = sub.name.removesuffix(".attn1").removesuffix(".attn") or blk.name
        # the block input: the stream the self-attention's residual add closes over
        h = sub.residual_add
        x_in = [a for a in args_of(h)[:2] if a is not sub.branch][0]
        xs = shape(x_in)
        rows = _image_rows(x_in, image_side, layouts) if joint is None else None
        if rows is not None:  # single-stream: attention (and the parallel MLP) over cat([text, image])
            off, n_img = rows
            layouts[h] = rows
            subs = _single_stream(att, sub, off, n_img, n)
            if isinstance(subs, str):
                blk.skip_reason = subs
                continue
            blk.joint, blk.x_offset, blk.x_in, blk.num_tokens = "single", off, x_in, n_img
            for s in subs:
                blk.sublayers[s.kind] = s
            if len(subs) == 2:
                blk.fused = Sublayer("attn", sub.merge_at, sub.readers, sub.residual_add, sub.branch, sub.name, off,
                                     subs[0].joint)
            _grid(blk, height, width, packed)
            continue
        if sub.joint is not None:  # double-stream: the image part of the joint sequence
            n = sub.joint.image
            blk.joint = "double"
        if xs is None or len(xs) != 3 or xs[1] != n:
            blk.skip_reason = f"block input has shape {xs}; expected [B, {n}, C] with tokens on axis 1"
            continue
        blk.num_tokens = n
        blk.x_in = x_in
        blk.sublayers["attn"] = sub
        # then at most one cross-attention and one MLP, each closing over the stream the previous one left
        for _ in range(2):
            nxt: Sublayer | None = None
            for add in h.users:
                if add.target not in P.ADD or h not in args_of(add)[:2]:
                    continue
                branch = [a for a in args_of(add)[:2] if a is not h]
                if not branch or not isinstance(branch[0], fx.Node):
                    continue
                region = nodes_between([h], [branch[0]])
                inner = [crosses[a] for a in region if a in crosses]
                if len(inner) == 1 and "crossattn" not in blk.sublayers:
                    cand, _ = _attention_sublayer(inner[0], "crossattn")
                    if cand is not None and cand.residual_add is add:
                        nxt = cand
                        break
            if nxt is None:
                nxt = _mlp_sublayer(h, attention_nodes)
            if nxt is None or nxt.kind in blk.sublayers:
                break
            blk.sublayers[nxt.kind] = nxt
            h = nxt.residual_add
            if nxt.kind == "mlp":
                break
        _grid(blk, height, width, packed)
    return DenoiserAnalysis(blocks=[], num_protected=0, protected_reason="denoiser: every token can merge",
                            text_model=False, dblocks=blocks, image_size=(height, width), packed_tokens=packed,
                            timestep=timestep_input(gm, image))


def _grid(blk: DenoiserBlock, height: int, width: int, packed: int) -> None:
    """tomesd's grid of a block against the 4-D latent; a packed latent's grid comes from the options."""
    n = blk.num_tokens
    if packed:
        if n != packed:
            blk.skip_reason = (f"its {n} image tokens are not the packed latent's {packed} tokens; tomesd merges at "
                               "the latent's own resolution")
        return
    ds = int(math.ceil(math.sqrt(height * width // n))) if n else 0
    blk.downsample = ds
    gh, gw = int(math.ceil(height / ds)), int(math.ceil(width / ds))
    blk.grid = (gh, gw)
    if gh * gw != n:
        blk.skip_reason = (f"its {n} tokens are not a {gh} x {gw} grid (the image input is {height} x {width}, "
                           f"downsample {ds}); tomesd picks destinations on the 2-D token grid")
