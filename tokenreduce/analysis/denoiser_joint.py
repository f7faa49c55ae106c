"""Joint text + image attention in diffusion transformers (SD3's MMDiT, Flux): where the image tokens sit.

`analysis/denoiser.py` finds the blocks of a denoiser whose image tokens tomesd merges. Two families attend
over text and image tokens *together*, and only the image tokens may merge (the text stream keeps its tokens;
tomesd's grid of destinations exists only for the image):

* **double-stream blocks** (`SD3Transformer2DModel`'s `JointTransformerBlock`, Flux's `FluxTransformerBlock`):
  each stream has its own norm and q/k/v projections; the projected heads are concatenated along the token
  axis (`[image; text]` in SD3, `[text; image]` in Flux), one attention runs over the joint sequence, and its
  output is cut back into the two streams (`slice`, `split_with_sizes`) before each stream's output projection
  and residual add. Merging the image stream's normed input shortens the image part of the joint sequence; the
  cuts after the attention must then move (`JointSpan.splits`).
* **single-stream blocks** (Flux's `FluxSingleTransformerBlock`): the block input is `cat([text, image])` and
  attention and MLP run in parallel from one norm; only the image rows (`JointSpan.offset` on) merge.

Per-token side inputs along the joint sequence (Flux's rotary `cos`/`sin` tables, `[1, L + N, 1, d]` after its
unsqueezes) must follow the merge: `JointSpan.positions` names them and the axis, and the pass gathers their
image rows by each slot's representative token (a merged token takes its destination's position).

Which part is the image: the part whose stream is computed from the latent input without passing through an
attention (the text stream meets the image only inside the joint attention); for a single-stream block whose
input concatenates slices of the previous single-stream block's output, the previous block's layout says which
slice is the image. Anything else is not recognised (the block is skipped with a reason by the caller).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import fx

from tokenreduce.ir import patterns as P
from tokenreduce.ir.graph import args_of, is_projection, nodes_between, search_up, shape, static_dim

aten = torch.ops.aten
CATS = {aten.cat.default}
SLICES = {aten.slice.Tensor}
SPLITS = {aten.split_with_sizes.default}
# ops that keep the joint token axis on the way from the attention output to the cut into streams
LAYOUT_OPS = P.TRANSPOSE | P.PERMUTE | P.FLATTEN | {aten.reshape.default, aten.view.default, aten.to.dtype,
                                                   aten.contiguous.default, aten._to_copy.default, aten.clone.default}


@dataclass
class JointSpan:
    """The image tokens inside one sublayer's joint `[text; image]` (or `[image; text]`) sequence.

    offset: first image row of the joint sequence; length: the joint sequence's captured length (text + image);
    image: its image tokens (rows offset .. offset + image - 1);
    splits: the `slice` / `split_with_sizes` nodes that cut the attention output back into streams at the image's
    boundaries; positions: per-token side inputs read along the joint sequence (rotary tables) and their axis.
    """

    offset: int
    length: int
    image: int
    splits: tuple[fx.Node, ...] = ()
    positions: tuple[tuple[fx.Node, int], ...] = ()


def attention_free_reach(image: fx.Node, attention_nodes: set[fx.Node]) -> set[fx.Node]:
    """Nodes computed from the latent input along paths that pass through no attention: the image stream and
    what is derived from it locally (the text stream of a joint block is reached only through the attention)."""
    seen: set[fx.Node] = set()
    stack = [image]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in attention_nodes or n.target in P.SDPA_SPELLINGS or n.target in P.SOFTMAX:
            continue
        stack.extend(n.users)
    return seen


def _cat_parts(cat: fx.Node) -> tuple[list[fx.Node], int] | None:
    args = args_of(cat)
    parts = args[0] if args else None
    dim = args[1] if len(args) > 1 else 0
    if not isinstance(parts, (list, tuple)) or len(parts) < 2 or not all(isinstance(p, fx.Node) for p in parts):
        return None
    out = shape(cat)
    if out is None or not isinstance(dim, int):
        return None
    return list(parts), dim % len(out)


def joint_cat(q: fx.Node, tokens: int, limit: int = 40) -> tuple[fx.Node, list[fx.Node], int] | None:
    """The `cat` above an attention's query that joins two or more projected streams along the token axis
    (`tokens` long): `(cat, parts, dim)`. Searched upwards, never past a projection or an attention."""
    def match(n: fx.Node) -> tuple[fx.Node, list[fx.Node], int] | None:
        found = _cat_parts(n) if n.target in CATS else None
        out = shape(n)
        if found is not None and out is not None and static_dim(out[found[1]]) == tokens and \
                all(_has_projection_above(p) for p in found[0]):
            return n, found[0], found[1]
        return None

    return search_up(q, limit, match,
                     lambda n: is_projection(n) or n.target in P.SDPA_SPELLINGS or n.target in P.SOFTMAX)


def _has_projection_above(node: fx.Node, limit: int = 12) -> fx.Node | None:
    """The projection a head tensor comes from, through layout ops and per-head norms (first input only)."""
    for _ in range(limit):
        if is_projection(node):
            return node
        ins = node.all_input_nodes
        if node.op != "call_function" or not ins:
            return None
        node = ins[0]
    return None


def projection_of(part: fx.Node) -> fx.Node | None:
    """The q/k/v projection a part of a joint cat is computed from."""
    return _has_projection_above(part)


def part_lengths(parts: list[fx.Node], dim: int) -> list[int] | None:
    sizes = [shape(p) for p in parts]
    if any(s is None or static_dim(s[dim]) is None for s in sizes):
        return None
    return [int(s[dim]) for s in sizes]  # type: ignore[index]


def cuts_after(output: fx.Node, length: int, limit: int = 12) -> list[fx.Node]:
    """The `slice` / `split_with_sizes` nodes that cut the joint sequence (`length` long on some axis) after the
    attention output, reached through layout ops only (transpose, reshape, flatten, casts)."""
    def follow(u: fx.Node) -> bool:
        return u.target not in SLICES | SPLITS and u.target in LAYOUT_OPS and \
            length in [static_dim(d) for d in (shape(u) or ())]

    return [u for u in _users_breadth_first(output, limit, follow) if u.target in SLICES | SPLITS]


def _users_breadth_first(start: fx.Node, limit: int, follow: Callable[[fx.Node], bool]) -> Iterator[fx.Node]:
    """Each node reached from `start` along `users`, once, level by level, at most `limit` levels deep; the walk
    goes on past a node only where `follow(node)`."""
    frontier, seen = [start], {start}
    for _ in range(limit):
        nxt: list[fx.Node] = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                yield u
                if follow(u):
                    nxt.append(u)
        if not nxt:
            return
        frontier = nxt


def side_positions(merge_at: fx.Node, ends: list[fx.Node], length: int) -> tuple[tuple[fx.Node, int], ...]:
    """Tensors read on the way from `merge_at` to the attention's q/k/v that come from outside the token stream
    and carry the joint sequence (`length` long) on an axis the stream tensor has too: rotary tables."""
    region = nodes_between([merge_at], ends)
    found: dict[tuple[fx.Node, int], None] = {}
    for u in region:
        su = shape(u)
        if su is None or u.op != "call_function" or u is merge_at:
            continue
        for a in u.all_input_nodes:
            sa = shape(a)
            if a in region or sa is None or a.op == "get_attr" or len(sa) != len(su):
                continue
            for d in range(len(sa)):
                if static_dim(sa[d]) == length and static_dim(su[d]) == length:
                    found[(a, d)] = None
    return tuple(found)


def parallel_join(output: fx.Node, others: list[fx.Node], limit: int = 12) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """A block that runs its attention and an MLP in parallel from one norm (Flux's single-stream block joins
    them with `cat([attn, mlp], -1)` before one output projection): `(join, attention branch, mlp branch)`, the
    first node after the attention output that also reads what the other readers of the norm compute."""
    other_side: set[fx.Node] = set()
    for o in others:
        stack = [o]
        while stack:
            n = stack.pop()
            if n in other_side or len(other_side) > 400:
                continue
            other_side.add(n)
            stack.extend(n.users)
    reached = {output}
    for u in _users_breadth_first(output, limit, lambda u: True):
        reached.add(u)
        ins = [a for a in u.all_input_nodes]
        mine = [a for a in ins if a in reached]
        theirs = [a for a in ins if a in other_side and a not in reached]
        if mine and theirs:
            return u, mine[0], theirs[0]
    return None
