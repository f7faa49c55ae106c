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
  must hold exactly N tokens.

Structure is read from the graph (attention spellings of `analysis/attention.py`, projections, residual adds);
module names only name blocks. Per block it records a skip reason instead of failing: no residual add closing
the self-attention, a grid that does not hold the block's tokens, a symbolic token count. Refuses (raises): a
graph without a 4-D image input (packed-latent transformers such as Flux take `[B, N, C]` tokens and no grid is
known) and a graph with no self-attention at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx

from tokenreduce.analysis.attention import Attention, find_attention
from tokenreduce.analysis.blocks import adds_after
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
    residual_add: fx.Node
    branch: fx.Node
    name: str = ""


@dataclass
class DenoiserBlock:
    """A transformer block of a denoiser: self-attention, then optional cross-attention and MLP sublayers."""

    index: int
    name: str
    x_in: fx.Node | None = None  # block input [B, N, C]: the matching metric
    num_tokens: int = 0
    grid: tuple[int, int] = (0, 0)  # (h, w) tokens
    downsample: int = 0  # tomesd's: ceil(sqrt(H * W // N)) against the model's image input
    sublayers: dict[str, Sublayer] = field(default_factory=dict)
    skip_reason: str | None = None

    @property
    def reducible(self) -> bool:
        return self.skip_reason is None


@dataclass
class DenoiserAnalysis(ModelAnalysis):
    """`ModelAnalysis` for reports (no protected tokens) plus the denoiser's blocks and image size."""

    dblocks: list[DenoiserBlock] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)  # (H, W) of the 4-D image input
    timestep: fx.Node | None = None  # the graph input feeding a sinusoidal embedding (sin/cos), if one does


def image_input(gm: fx.GraphModule) -> tuple[fx.Node, int, int]:
    """The first 4-D graph input `[B, C, H, W]` (the latent `sample` / `hidden_states`) and its H, W."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        s = shape(node)
        if s is not None and len(s) == 4:
            h, w = static_dim(s[2]), static_dim(s[3])
            if h is not None and w is not None:
                return node, h, w
    raise TokenReduceError(
        "tomesd needs the token grid of each block, read from the denoiser's 4-D image input [B, C, H, W] "
        "(the latent `sample`); this graph has no 4-D input with a static height and width (a packed-latent "
        "transformer such as Flux takes [B, N, C] tokens)", setting="method")


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
            if any(is_projection(n) or n.target in P.SDPA_SPELLINGS or n.target in P.SOFTMAX for n in path):
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
    inside = nodes_between([merge_at], [branch])
    readers = tuple(u for u in merge_at.users if u in inside)
    return Sublayer(kind, merge_at, readers, add, branch, _name([att.node, add])), ""


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
        inside = nodes_between([merge_at], [branch])
        readers = tuple(u for u in merge_at.users if u in inside)
        return Sublayer("mlp", merge_at, readers, add, branch, _name([*first, add]))
    return None


def analyse_denoiser(gm: fx.GraphModule) -> DenoiserAnalysis:
    """Find the denoiser's transformer blocks, their sublayers and token grids."""
    image, height, width = image_input(gm)
    attentions = find_attention(gm)
    attention_nodes = {a.node for a in attentions}
    selfs, crosses = [], {}
    for att in attentions:
        qs, ks = shape(att.q), shape(att.k)
        if qs is None or ks is None or len(qs) not in (3, 4):
            continue
        if ks[-2] == qs[-2] and ancestor_linear(att.k) is not None and ancestor_linear(att.q) is not None and \
                projection_input(ancestor_linear(att.k)) is projection_input(ancestor_linear(att.q)):  # type: ignore[arg-type]
            selfs.append(att)
        else:
            crosses[att.node] = att
    if not selfs:
        raise TokenReduceError("no self-attention found in the denoiser graph (looked for attention whose queries, "
                               "keys and values are projected from one tensor); tomesd merges tokens of "
                               "self-attention blocks", setting="method")
    blocks: list[DenoiserBlock] = []
    for i, att in enumerate(selfs):
        blk = DenoiserBlock(index=i, name=f"block{i}")
        blocks.append(blk)
        n = static_dim(shape(att.q)[-2])  # type: ignore[index]
        if n is None:
            blk.skip_reason = "token count is symbolic; tomesd needs a static token count"
            continue
        blk.num_tokens = n
        sub, why = _attention_sublayer(att, "attn")
        if sub is None:
            blk.skip_reason = why
            continue
        blk.name = sub.name.removesuffix(".attn1") or blk.name
        # the block input: the stream the self-attention's residual add closes over
        h = sub.residual_add
        x_in = [a for a in args_of(h)[:2] if a is not sub.branch][0]
        xs = shape(x_in)
        if xs is None or len(xs) != 3 or xs[1] != n:
            blk.skip_reason = f"block input has shape {xs}; expected [B, {n}, C] with tokens on axis 1"
            continue
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
        ds = int(math.ceil(math.sqrt(height * width // n))) if n else 0
        blk.downsample = ds
        gh, gw = int(math.ceil(height / ds)), int(math.ceil(width / ds))
        blk.grid = (gh, gw)
        if gh * gw != n:
            blk.skip_reason = (f"its {n} tokens are not a {gh} x {gw} grid (the image input is {height} x {width}, "
                               f"downsample {ds}); tomesd picks destinations on the 2-D token grid")
    return DenoiserAnalysis(blocks=[], num_protected=0, protected_reason="denoiser: every token can merge",
                            text_model=False, dblocks=blocks, image_size=(height, width),
                            timestep=timestep_input(gm, image))
