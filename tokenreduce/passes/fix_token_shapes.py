"""Re-propagate shapes after a reduction and fix the shape arguments that baked in the token count.

Captured graphs carry the token count as constants in `view`/`reshape`/`expand`/`slice` arguments
(`reshape(qkv, [B, 197, 3, H, d])`). After a reduction those are wrong. This pass walks the graph in
order with fake tensors, and wherever an op's input shape differs from the one recorded at capture it
rewrites the op's shape argument *from the reduced tensor*: the dimensions that changed are found by
comparing the new input shape with the captured one (never by searching for ints equal to N, which breaks
when N equals another size), mapped through the op (contiguous dimension groups for view/reshape,
right-alignment for expand), and written as `-1` (or the new static size when `-1` is taken). A rewritten
`view` becomes a `reshape` (the same view where one is possible; a copy where the reduced graph's producer
has other strides than at capture).

Every node's `meta["val"]` is refreshed; the captured value is kept in `meta["tokenreduce_orig_val"]`.

Propagation runs under `torch.no_grad()`, as capture does, whatever the caller's grad mode: under grad mode
some composite ops pick another kernel on fake tensors whose outputs have other strides (SDPA on CPU: the
math path instead of the fused one), so a `view` that was valid at capture fails (Data2Vec-vision).

Refuses (TokenReduceError naming the node and module): an op that fails on the reduced shapes (e.g. a
constant-size tensor broadcast against the tokens), and a reshape that splits a token-carrying dimension
into several.
"""

from __future__ import annotations

import operator
import sys
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import disable_fake_tensor_cache

from tokenreduce.errors import TokenReduceError
from tokenreduce.ir.graph import args_of, module_path, same_dim
from tokenreduce.passes.common import PassContext, PassResult

aten = torch.ops.aten
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
EXPANDS = {aten.expand.default}
SLICES = {aten.slice.Tensor}


class TokenShapeError(TokenReduceError):
    """A node that cannot follow a changed token count (`node`: its name in the graph), so the blocks whose
    reduction reaches it cannot be reduced."""

    def __init__(self, message: str, node: fx.Node) -> None:
        super().__init__(message)
        self.node = node.name


def _hint(s: Any) -> int:
    if isinstance(s, torch.SymInt):
        return int(s.node.hint) if s.node.hint is not None else int(s.node.expr)
    return int(s)


def _groups(old_in: list[int], old_out: list[int]) -> list[tuple[list[int], list[int]]]:
    """Contiguous dimension groups with equal products (the view's dimension correspondence)."""
    groups, i, j = [], 0, 0
    while i < len(old_in) or j < len(old_out):
        gi, go = [], []
        pi, po = 1, 1
        if i < len(old_in):
            gi.append(i); pi *= old_in[i]; i += 1  # noqa: E702
        if j < len(old_out):
            go.append(j); po *= old_out[j]; j += 1  # noqa: E702
        while pi != po:
            if pi < po and i < len(old_in):
                gi.append(i); pi *= old_in[i]; i += 1  # noqa: E702
            elif j < len(old_out):
                go.append(j); po *= old_out[j]; j += 1  # noqa: E702
            else:
                break
        # size-1 dims at a group's end belong to it
        while i < len(old_in) and old_in[i] == 1 and (j >= len(old_out) or old_out[j] != 1):
            gi.append(i); i += 1  # noqa: E702
        groups.append((gi, go))
    return groups


def _fix_view(node: fx.Node, old_in: torch.Size, new_in: torch.Size, old_out: torch.Size) -> bool:
    changed = {d for d in range(len(old_in)) if not same_dim(old_in[d], new_in[d])}
    if not changed:
        return False
    shape_arg = list(args_of(node)[1])
    groups = _groups([_hint(s) for s in old_in], [_hint(s) for s in old_out])
    token_out: dict[int, Any] = {}
    for gi, go in groups:
        if not changed & set(gi):
            continue
        if len(gi) == 1 and len(go) == 2 and go[0] == 0 and _hint(new_in[gi[0]]) % _hint(old_out[0]) == 0:
            # [B*N', ...] -> [B, N', ...]: batch and tokens flattened together and split back (GPT-2's Conv1D,
            # `view(-1, C)` -> addmm -> view); the batch axis leads and keeps its size, the token axis follows
            token_out[go[1]] = new_in[gi[0]] // old_out[0]
            continue
        if len(go) != 1:
            raise TokenShapeError(
                f"{node.name} ({'/'.join(module_path(node)[-1:])}) reshapes a token dimension into several "
                "dimensions (a token grid, e.g. for a convolution); tokenreduce cannot follow the token axis "
                "through it", node)
        new_size: Any = 1
        for d in gi:
            new_size = new_size * new_in[d]
        token_out[go[0]] = new_size
    if not token_out:
        return False
    new_arg = list(shape_arg)
    for d in token_out:
        new_arg[d] = -1
    def inferred() -> int:
        return sum(1 for v in new_arg if isinstance(v, int) and v == -1)

    if inferred() > 1:
        for d, v in enumerate(new_arg):
            if isinstance(v, int) and v == -1 and d not in token_out:
                new_arg[d] = old_out[d] if isinstance(old_out[d], int) else shape_arg[d]
        # one -1 at most: write static token sizes (last first) until one is left; a symbolic -1 that
        # stays (the folded batch of `view(B, H, N, d) -> [-1, N, d]`) takes it
        for d in reversed([d for d in token_out if isinstance(token_out[d], int)]):
            if inferred() <= 1:
                break
            new_arg[d] = token_out[d]
    if sum(1 for v in new_arg if isinstance(v, int) and v == -1) > 1:
        raise TokenShapeError(f"{node.name}: cannot express the reduced shape of this reshape", node)
    node.args = (args_of(node)[0], new_arg, *args_of(node)[2:])
    if node.target is not aten.reshape.default:
        # the captured `view` was valid for the captured strides; the reduced graph may run its producer on
        # another kernel (SDPA under grad mode with the size bias picks the math path on CPU, whose output
        # is laid out differently), and `reshape` is the same view wherever a view is possible
        node.target = aten.reshape.default
    return True


def _fix_expand(node: fx.Node, old_in: torch.Size, new_in: torch.Size, old_out: torch.Size) -> bool:
    changed = [d for d in range(len(old_in)) if not same_dim(old_in[d], new_in[d])]
    if not changed:
        return False
    sizes = list(args_of(node)[1])
    off = len(sizes) - len(old_in)
    for d in changed:
        sizes[d + off] = -1
    node.args = (args_of(node)[0], sizes, *args_of(node)[2:])
    return True


def _fix_slice(node: fx.Node, old_in: torch.Size, new_in: torch.Size) -> bool:
    args = list(args_of(node)) + [None] * (5 - len(node.args))
    dim = args[1] if args[1] is not None else 0
    dim = dim % len(old_in)
    if same_dim(old_in[dim], new_in[dim]):
        return False
    end = args[3]
    if isinstance(end, int) and end >= _hint(old_in[dim]):
        args[3] = sys.maxsize
        node.args = tuple(a for a in args[: max(4, len(node.args))])
        return True
    return False


def _map(a: Any, env: dict[fx.Node, Any]) -> Any:
    return fx.node.map_arg(a, lambda n: env[n])


def fix_token_shapes(gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
    result = PassResult("fix_token_shapes", changed=False)
    graph = gm.graph
    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if fake_mode is None:
        raise TokenReduceError("captured graph has no fake values; capture it with tokenreduce.compiler.capture")
    env: dict[fx.Node, Any] = {}
    # FakeTensorMode's dispatch cache does not pay here: the reduced blocks all run on different token
    # counts, so entries are rarely hit again, and building one costs as much as the op (half the pass)
    with fake_mode, disable_fake_tensor_cache(fake_mode), torch.no_grad():
        for node in graph.nodes:
            if node.op == "placeholder":
                env[node] = node.meta.get("val")
                continue
            if node.op == "get_attr":
                attr = operator.attrgetter(node.target)(gm)
                env[node] = fake_mode.from_tensor(attr, static_shapes=True) if isinstance(attr, torch.Tensor) else attr
                continue
            if node.op == "call_module":
                env[node] = None  # export's input guard; inputs are unchanged
                continue
            if node.op == "output":
                continue
            old = node.meta.get("val")
            if "tokenreduce_orig_val" not in node.meta and old is not None:
                node.meta["tokenreduce_orig_val"] = old
            orig = node.meta.get("tokenreduce_orig_val")
            first = args_of(node)[0] if node.args else None
            if isinstance(first, fx.Node) and isinstance(orig, torch.Tensor):
                old_in = first.meta.get("tokenreduce_orig_val", first.meta.get("val"))
                new_in = env.get(first)
                if isinstance(old_in, torch.Tensor) and isinstance(new_in, torch.Tensor):
                    fixed = False
                    if node.target in VIEWS:
                        fixed = _fix_view(node, old_in.shape, new_in.shape, orig.shape)
                    elif node.target in EXPANDS:
                        fixed = _fix_expand(node, old_in.shape, new_in.shape, orig.shape)
                    elif node.target in SLICES:
                        fixed = _fix_slice(node, old_in.shape, new_in.shape)
                    if fixed:
                        result.rewrites += 1
            args, kwargs = _map(node.args, env), _map(node.kwargs, env)
            try:
                out = node.target(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - re-raised with the node that failed
                where = module_path(node)
                raise TokenShapeError(
                    f"after token reduction, {node.name} ({node.target}) in {where[-1] if where else 'the model'} "
                    f"fails on the reduced shapes: {str(exc).splitlines()[0]}", node) from exc
            env[node] = out
            node.meta["val"] = out
    result.changed = result.rewrites > 0
    if result.changed:
        gm.recompile()
    return result
