"""tomesd on joint text + image attention: diffusers' SD3Transformer2DModel and FluxTransformer2DModel.

The official `tomesd` package does not support these models (it patches `BasicTransformerBlock`s; SD3's
`JointTransformerBlock` and Flux's blocks are other classes), so the reference is written here: tomesd's
matching arithmetic by hand (`_Matching`: one destination per `sy x sx` cell drawn with tomesd's own
`randint(sy * sx, (h // sy, w // sx, 1))`, cosine similarity, argsort, `scatter_reduce(mean)`; checked against
the package's `bipartite_soft_matching_random2d` first), placed on the unmodified models by forward hooks
(SD3: merge the image stream's normed input of the joint attention and the MLP, unmerge their image outputs)
and, for Flux, by an attention processor written here that merges the image rows, gathers the rotary tables by
each merged token's destination and applies them per batch row. Only the image tokens merge; the text tokens
pass through every sublayer unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
tomesd = pytest.importorskip("tomesd")

import tokenreduce  # noqa: E402
from tokenreduce.errors import TokenReduceError  # noqa: E402

TOL = 2e-5  # float32; merged tokens are summed in another order than the reference's


class _Matching:
    """tomesd's bipartite matching on one block input `x [B, N, C]` over an `h x w` grid, by hand: `merge`,
    `unmerge` and `positions [B, N - r]` (the token each merged slot stands for: its destination)."""

    def __init__(self, x, h, w, sx, sy, r, gen):
        b, n, _ = x.shape
        hsy, wsx = h // sy, w // sx
        if x.shape[0] % 2 == 0 and gen is not None:
            choice = torch.randint(sy * sx, size=(hsy, wsx, 1), generator=gen)
        else:
            choice = torch.zeros(hsy, wsx, 1, dtype=torch.long)
        is_dst = torch.zeros(h, w, dtype=torch.bool)
        for i in range(hsy):
            for j in range(wsx):
                c = int(choice[i, j, 0])
                is_dst[i * sy + c // sx, j * sx + c % sx] = True
        self.dst_pos = is_dst.flatten().nonzero().squeeze(1)
        self.src_pos = (~is_dst.flatten()).nonzero().squeeze(1)
        m = x / x.norm(dim=-1, keepdim=True)
        scores = m[:, self.src_pos] @ m[:, self.dst_pos].transpose(1, 2)
        best, self.best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        self.merged, self.unmerged = order[:, :r], order[:, r:]
        self.b, self.n, self.r = b, n, r
        kept = self.src_pos[self.unmerged]
        self.positions = torch.cat([kept, self.dst_pos.expand(b, -1)], dim=1)

    def merge(self, t):
        out = []
        for i in range(self.b):
            src, dst = t[i, self.src_pos], t[i, self.dst_pos]
            into = self.best_dst[i, self.merged[i]]
            dst = dst.scatter_reduce(0, into[:, None].expand(-1, t.shape[-1]), src[self.merged[i]], reduce="mean")
            out.append(torch.cat([src[self.unmerged[i]], dst]))
        return torch.stack(out)

    def unmerge(self, t):
        out = t.new_zeros(self.b, self.n, t.shape[-1])
        u = self.unmerged.shape[1]
        for i in range(self.b):
            out[i, self.dst_pos] = t[i, u:]
            out[i, self.src_pos[self.unmerged[i]]] = t[i, :u]
            out[i, self.src_pos[self.merged[i]]] = t[i, u + self.best_dst[i, self.merged[i]]]
        return out


def test_hand_matching_equals_the_official_one():
    """The reference above is tomesd's: same draws, same merged-then-unmerged tokens as the package's function."""
    x = torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(0))
    for seed in (0, 1):
        mine = _Matching(x, 4, 6, 2, 2, 9, torch.Generator().manual_seed(seed))
        merge, unmerge = tomesd.merge.bipartite_soft_matching_random2d(
            x, 6, 4, 2, 2, 9, no_rand=False, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(mine.unmerge(mine.merge(x)), unmerge(merge(x)), atol=1e-6)
        assert mine.merge(x).shape == (2, 15, 8)
        # a merged slot stands for its destination: unmerged, each destination gets its own slot back
        assert torch.equal(mine.unmerge(mine.positions[..., None].float())[:, mine.dst_pos, 0],
                           mine.dst_pos.float().expand(2, -1))


# ------------------------------------------------------------------------------------------------------ SD3


def _sd3(layers=2):
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6, out_channels=4,
        pos_embed_max_size=8).eval()


def _sd3_inputs(batch=2, t=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g),), {
        "encoder_hidden_states": torch.randn(batch, 5, 12, generator=g),
        "pooled_projections": torch.randn(batch, 6, generator=g), "timestep": torch.full((batch,), t)}


def _sd3_reference(model, args, kwargs, *, ratio, seed, merge_mlp):
    """SD3 with the hand matching hooked in: per JointTransformerBlock, the image stream's normed input of the
    joint attention (and of the MLP) merged, their image outputs unmerged; the text stream untouched."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    h = w = args[0].shape[-1] // model.config.patch_size
    state = {}

    def plan(block, a, kw):
        x = kw["hidden_states"]
        state["m"] = _Matching(x, h, w, 2, 2, int(x.shape[1] * ratio), gen)

    def merge_attn(module, a, kw):
        return a, {**kw, "hidden_states": state["m"].merge(kw["hidden_states"])}

    def unmerge_attn(module, a, kw, out):
        return (state["m"].unmerge(out[0]), *out[1:])

    for blk in model.transformer_blocks:
        blk.register_forward_pre_hook(plan, with_kwargs=True)
        blk.attn.register_forward_pre_hook(merge_attn, with_kwargs=True)
        blk.attn.register_forward_hook(unmerge_attn, with_kwargs=True)
        if merge_mlp:
            blk.ff.register_forward_pre_hook(lambda mod, a: (state["m"].merge(a[0]),))
            blk.ff.register_forward_hook(lambda mod, a, out: state["m"].unmerge(out))
    with torch.no_grad():
        return model(*args, **kwargs).sample


def _ours(model, args, kwargs, flops=False, **settings):
    red = tokenreduce.compile(model, args, kwargs, method="tomesd", inner="eager", count_model_flops=flops,
                              **settings)
    with torch.no_grad():
        return red, red(*args, **kwargs).sample


@pytest.mark.parametrize("merge_mlp", [False, True], ids=["attn", "attn+mlp"])
def test_sd3_equals_hand_reference(merge_mlp):
    model = _sd3()
    args, kwargs = _sd3_inputs()
    red, got = _ours(model, args, kwargs, flops=merge_mlp, ratio=0.5, max_downsample=2, rand_seed=3,
                     merge_mlp=merge_mlp)
    want = _sd3_reference(model, args, kwargs, ratio=0.5, seed=3, merge_mlp=merge_mlp)
    with torch.no_grad():
        full = model(*args, **kwargs).sample
    assert (want - full).abs().max().item() > 1e-3  # the merge changes the output
    assert (got - want).abs().max().item() < TOL
    subs = "attn, mlp" if merge_mlp else "attn"
    assert [(b.tokens_in, b.tokens_out, b.action) for b in red.report.blocks] == [(16, 8, f"tomesd r=8 ({subs})")] * 2
    if merge_mlp:  # attention counted: the merged sublayers are most of these blocks' FLOPs
        assert 0.5 < red.report.flops_ratio < 0.75
    # only the image part of the joint sequence shrank: the attention runs on 8 image + 5 text tokens
    sdpa = [n for n in red.graph_module.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert [n.meta["val"].shape[-2] for n in sdpa] == [13, 13]
    other = _sd3_reference(model, args, kwargs, ratio=0.5, seed=4, merge_mlp=merge_mlp)
    assert (got - other).abs().max().item() > 100 * TOL  # another draw: the comparison can fail


def test_sd3_ratio_zero_is_the_unreduced_model():
    model = _sd3()
    args, kwargs = _sd3_inputs()
    red, got = _ours(model, args, kwargs, ratio=0.0, max_downsample=2)
    with torch.no_grad():
        full = model(*args, **kwargs).sample
    assert torch.equal(got, full)
    assert all(b.tokens_out == b.tokens_in for b in red.report.blocks)
    assert not any(n.target is torch.ops.tokenreduce.apply_plan.default for n in red.graph_module.graph.nodes)


def test_sd3_backend_compiles_once_for_two_steps_and_exports(tmp_path):
    """One graph through torch.compile(backend="tokenreduce") for two timesteps (per_step destinations follow
    the timestep); tokenreduce.compile's graph exports to ONNX and onnxruntime agrees with it."""
    pytest.importorskip("onnxruntime")
    options = {"method": "tomesd", "max_downsample": 2, "rand_seed": 2, "per_step": True, "inner": "eager"}
    args, kw10 = _sd3_inputs(t=10)
    _, kw700 = _sd3_inputs(t=700)
    backend_once_for_two_steps_then_onnx(_sd3(), options, args, [kw10, kw700], tmp_path / "sd3.onnx")


def backend_once_for_two_steps_then_onnx(model, options, args, kws, path):  # type: ignore[no-untyped-def]
    """torch.compile(model, backend="tokenreduce") builds one graph for both steps' kwargs `kws` and agrees at each
    with tokenreduce.compile's graph (built at the first), which differs from the plain model at each; that graph
    exports to ONNX at `path` (dynamic batch) and onnxruntime agrees with it."""
    from tokenreduce.targets.onnx import export_onnx

    torch._dynamo.reset()
    before = tokenreduce.backend_stats().builds
    compiled = torch.compile(model, backend="tokenreduce", options=options)
    red = tokenreduce.compile(model, args, kws[0], count_model_flops=False, **options)
    with torch.no_grad():
        for kw in kws:
            via_backend = compiled(*args, **kw).sample
            direct = red(*args, **kw).sample
            assert (via_backend - direct).abs().max().item() < 1e-5
            assert (direct - model(*args, **kw).sample).abs().max().item() > 1e-3
    assert tokenreduce.backend_stats().builds == before + 1  # no recompile for the second step
    ex = export_onnx(red, path)
    assert ex.verified and not ex.problems and ex.max_abs_diff < 1e-4


# ------------------------------------------------------------------------------------------------------ Flux


def _flux(layers=1, single=2):
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=layers, num_single_layers=single, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6, axes_dims_rope=(2, 2, 4)).eval()


def _flux_inputs(batch=2, h=4, w=6, t=0.5, seed=1):
    """Packed latents [B, h * w, C] in Flux's row-major order, with its position ids (0, row, column)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return (torch.randn(batch, h * w, 8, generator=g),), {
        "encoder_hidden_states": torch.randn(batch, 5, 12, generator=g),
        "pooled_projections": torch.randn(batch, 6, generator=g), "timestep": torch.full((batch,), t),
        "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(5, 3)}


def _rotate(x, cos, sin):
    """Flux's rotary embedding on `x [B, T, H, d]` with per-row tables `[B, T, d]` (pairs (2i, 2i + 1))."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class _MergedFluxAttention:
    """Flux's attention written out, with the image rows merged: the image part of the joint sequence runs on
    merged tokens, the rotary tables' image rows are gathered by each merged token's destination position, and
    the image output is unmerged. `state["m"]` is the block's matching; `text` the number of text tokens."""

    def __init__(self, state, text, gather=True):
        self.state, self.text, self.gather = state, text, gather

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        m, L = self.state["m"], self.text
        if encoder_hidden_states is None:  # single-stream: hidden_states is [text; image]
            txt, img = hidden_states[:, :L], hidden_states[:, L:]
        else:
            txt, img = encoder_hidden_states, hidden_states
        img = m.merge(img)

        def heads(t):
            return t.unflatten(-1, (-1, attn.head_dim))

        q, k, v = heads(attn.to_q(img)), heads(attn.to_k(img)), heads(attn.to_v(img))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is None:
            tq, tk, tv = heads(attn.to_q(txt)), heads(attn.to_k(txt)), heads(attn.to_v(txt))
            tq, tk = attn.norm_q(tq), attn.norm_k(tk)
        else:
            tq, tk, tv = heads(attn.add_q_proj(txt)), heads(attn.add_k_proj(txt)), heads(attn.add_v_proj(txt))
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
        b = q.shape[0]
        if self.gather:
            tables = [torch.cat([t[:L].expand(b, -1, -1), t[L:][m.positions]], dim=1) for t in image_rotary_emb]
        else:  # a wrong reference: merged tokens at the first rows' positions (shows the gather matters)
            tables = [t[:q.shape[1]].expand(b, -1, -1) for t in image_rotary_emb]
        q, k = _rotate(q, *tables), _rotate(k, *tables)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2)
        txt_out, img_out = out[:, :L], out[:, L:]
        if encoder_hidden_states is None:
            return torch.cat([txt_out, m.unmerge(img_out)], dim=1)
        return m.unmerge(attn.to_out[0](img_out)), attn.to_add_out(txt_out)


def _flux_reference(model, args, kwargs, *, grid, ratio, seed, merge_mlp, gather=True):
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    text = kwargs["encoder_hidden_states"].shape[1]
    state = {}

    def plan(block, a, kw):  # the block's image stream input (single-stream blocks get it before their cat)
        x = kw["hidden_states"]
        state["m"] = _Matching(x, h, w, 2, 2, int(x.shape[1] * ratio), gen)

    def rows(fn):
        def apply(t):
            return torch.cat([t[:, :text], fn(t[:, text:])], dim=1)
        return apply

    for blk in [*model.transformer_blocks, *model.single_transformer_blocks]:
        blk.register_forward_pre_hook(plan, with_kwargs=True)
        blk.attn.set_processor(_MergedFluxAttention(state, text, gather))
        if merge_mlp:
            mlp = blk.ff if hasattr(blk, "ff") else blk.proj_mlp
            merge, unmerge = (lambda t: state["m"].merge(t)), (lambda t: state["m"].unmerge(t))
            if mlp is not getattr(blk, "ff", None):  # single-stream: the MLP reads [text; image]
                merge, unmerge = rows(merge), rows(unmerge)
            mlp.register_forward_pre_hook(lambda mod, a, _m=merge: (_m(a[0]),))
            mlp.register_forward_hook(lambda mod, a, out, _u=unmerge: _u(out))
    with torch.no_grad():
        return model(*args, **kwargs).sample


@pytest.mark.parametrize("merge_mlp", [False, True], ids=["attn", "attn+mlp"])
def test_flux_equals_hand_reference(merge_mlp):
    model = _flux()
    args, kwargs = _flux_inputs()
    red, got = _ours(model, args, kwargs, flops=merge_mlp, ratio=0.5, rand_seed=3, grid_h=4, grid_w=6,
                     merge_mlp=merge_mlp)
    want = _flux_reference(model, args, kwargs, grid=(4, 6), ratio=0.5, seed=3, merge_mlp=merge_mlp)
    with torch.no_grad():
        full = model(*args, **kwargs).sample
    assert (want - full).abs().max().item() > 1e-3
    assert (got - want).abs().max().item() < TOL
    subs = "attn, mlp" if merge_mlp else "attn"
    assert [b.name for b in red.report.blocks] == ["transformer_blocks.0", "single_transformer_blocks.0",
                                                   "single_transformer_blocks.1"]
    assert all((b.tokens_in, b.tokens_out, b.action) == (24, 12, f"tomesd r=12 ({subs})") for b in red.report.blocks)
    if merge_mlp:  # the text tokens, the single-stream proj_out and the embedders stay at full count
        assert 0.5 < red.report.flops_ratio < 0.8
    # the rotary tables follow the merge: gathered per batch row for the 5 text + 12 merged image tokens
    nodes = list(red.graph_module.graph.nodes)
    gathers = [n for n in nodes if getattr(n.target, "__name__", "") == "gather_positions"]
    assert gathers and all(tuple(n.meta["val"].shape) == (2, 17, 1, 8) for n in gathers)
    # one merge per merged sublayer; a single-stream block with both merged is merged once and unmerged after
    # its shared proj_out, which then runs on the 5 text + 12 merged tokens
    applies = [n for n in nodes if n.target is torch.ops.tokenreduce.apply_plan.default]
    assert len(applies) == (2 + 1 + 1 if merge_mlp else 1 + 1 + 1)
    proj_out = [n for n in nodes if n.target is torch.ops.aten.linear.default and n.meta["val"].shape[-1] == 16
                and n.args[0].meta["val"].shape[-1] == 16 + 64]  # cat([attention, mlp]) -> dim
    assert [n.meta["val"].shape[1] for n in proj_out] == [17 if merge_mlp else 29] * 2
    # without the rotary gather (merged tokens at the first image rows' positions) the outputs differ
    wrong = _flux_reference(model, args, kwargs, grid=(4, 6), ratio=0.5, seed=3, merge_mlp=merge_mlp, gather=False)
    assert (got - wrong).abs().max().item() > 100 * TOL


def test_flux_ratio_zero_and_grid_refusals():
    model = _flux(single=1)
    args, kwargs = _flux_inputs()
    red, got = _ours(model, args, kwargs, ratio=0.0, grid_h=4, grid_w=6)
    with torch.no_grad():
        assert torch.equal(got, model(*args, **kwargs).sample)
    # the packed latent has no grid in the graph: refused, naming the options
    with pytest.raises(TokenReduceError, match=r"packed latent \[B, 24, C\] \(Flux\) whose grid is not in the "
                                               r"graph: give grid_h and grid_w") as e:
        tokenreduce.compile(model, args, kwargs, method="tomesd", inner="eager", count_model_flops=False)
    assert e.value.setting == "grid_h" and e.value.hint is None  # 24 tokens: no square to suggest
    sq_args, sq_kwargs = _flux_inputs(h=4, w=4)
    with pytest.raises(TokenReduceError, match="give grid_h and grid_w") as e:
        tokenreduce.compile(model, sq_args, sq_kwargs, method="tomesd", inner="eager", count_model_flops=False)
    assert e.value.hint == "grid_h=4, grid_w=4"
    with pytest.raises(TokenReduceError, match=r"grid_h=5 x grid_w=5 = 25 tokens, but the packed latent holds 24"):
        tokenreduce.compile(model, args, kwargs, method="tomesd", grid_h=5, grid_w=5, inner="eager",
                            count_model_flops=False)
    with pytest.raises(TokenReduceError, match="give both grid_h and grid_w") as e:
        tokenreduce.compile(model, args, kwargs, method="tomesd", grid_h=4, inner="eager", count_model_flops=False)
    assert e.value.setting == "grid_h"
    # a model with a 4-D latent reads its grid from it: the options are refused there
    with pytest.raises(TokenReduceError, match="grid_h/grid_w apply to packed-latent transformers"):
        tokenreduce.compile(_sd3(1), *_sd3_inputs(), method="tomesd", max_downsample=2, grid_h=4, grid_w=4,
                            inner="eager", count_model_flops=False)
    # ratio above what 2 x 2 cells allow on a 4 x 6 grid (6 destinations, 18 sources: 0.75)
    with pytest.raises(TokenReduceError, match="largest valid ratio for these blocks is 0.75"):
        tokenreduce.compile(model, args, kwargs, method="tomesd", ratio=0.8, grid_h=4, grid_w=6, inner="eager",
                            count_model_flops=False)


def test_flux_backend_once_for_two_steps_and_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    options = {"method": "tomesd", "grid_h": 4, "grid_w": 6, "rand_seed": 1, "per_step": True, "inner": "eager"}
    args, kw_a = _flux_inputs(t=0.9)
    _, kw_b = _flux_inputs(t=0.2)
    # dynamic batch: only inputs whose leading dim is the batch get the batch dim (img_ids/txt_ids [N, 3] have none)
    backend_once_for_two_steps_then_onnx(_flux(single=1), options, args, [kw_a, kw_b], tmp_path / "flux.onnx")


class _JointToy(torch.nn.Module):
    """A denoiser with one joint [image; text] attention whose output is cut back into the image rows either by
    a slice (which tomesd moves with the merge) or by an index_select (a cut the analysis cannot move)."""

    def __init__(self, cut: str):
        super().__init__()
        torch.manual_seed(0)
        self.cut = cut
        self.patch, self.text = torch.nn.Conv2d(4, 16, 1), torch.nn.Linear(12, 16)
        self.norm, self.norm_text = torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)
        self.qkv, self.qkv_text = torch.nn.Linear(16, 48), torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 16)

    def forward(self, sample, text):
        b, _, h, w = sample.shape
        x = self.patch(sample).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        tq, tk, tv = self.qkv_text(self.norm_text(self.text(text))).chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(*(torch.cat(p, 1).unflatten(-1, (2, 8)).transpose(1, 2)
                                             for p in ((q, tq), (k, tk), (v, tv))))
        o = o.transpose(1, 2).flatten(2)
        img = o[:, :h * w] if self.cut == "slice" else o.index_select(1, torch.arange(h * w))
        x = x + self.out(img)
        return x.transpose(1, 2).reshape(b, 16, h, w)


def test_joint_attention_without_a_movable_cut_is_refused():
    args = (torch.randn(2, 4, 4, 4), torch.randn(2, 5, 12))
    red = tokenreduce.compile(_JointToy("slice").eval(), args, method="tomesd", inner="eager", count_model_flops=False)
    assert [(b.tokens_in, b.tokens_out) for b in red.report.blocks] == [(16, 8)]
    with torch.no_grad():
        assert red(*args).shape == (2, 16, 4, 4)
    with pytest.raises(TokenReduceError, match=r"joint attention `scaled_dot_product_attention`: no slice or split of "
                                               r"its output at the end of the image part \(rows 0..15 of 21\)"):
        tokenreduce.compile(_JointToy("index").eval(), args, method="tomesd", inner="eager", count_model_flops=False)
