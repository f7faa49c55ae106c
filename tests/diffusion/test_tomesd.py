"""tomesd as a graph pass: outputs equal the official `tomesd` package's on the same weights.

Oracles: `tomesd.apply_patch` on a copy of a random-init SD-layout `UNet2DConditionModel` (the package patches
diffusers' `BasicTransformerBlock`), and for `DiTTransformer2DModel` (whose AdaLN-Zero blocks the package's
patched forward cannot run in diffusers 0.42) the package's own matching function
`tomesd.merge.bipartite_soft_matching_random2d` placed with hooks exactly where `tomesd/patch.py` places it:
merge the block's normed input before a sublayer, unmerge its output before the residual add (the AdaLN gate
is per sample, so it commutes with the unmerge). Both draw the random destinations from a generator seeded
like ours (`torch.manual_seed(s)` forks into tomesd's generator; `rand_seed=s` seeds ours).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusion_models import sd_unet  # noqa: E402

tomesd = pytest.importorskip("tomesd")

import tokenreduce  # noqa: E402
from tokenreduce.errors import TokenReduceError  # noqa: E402

TOL = 2e-5  # float32; the merged tokens are summed in another order than tomesd's


@pytest.fixture(scope="module")
def unet():
    return sd_unet()


@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 10])), \
        {"encoder_hidden_states": torch.randn(2, 7, 32, generator=g)}


def _tomesd_unet(model, args, kwargs, seed, **options):
    ref = tomesd.apply_patch(copy.deepcopy(model), **options)
    torch.manual_seed(seed)  # tomesd forks its generator from the global one at its first merge
    with torch.no_grad():
        return ref(*args, **kwargs).sample


def _ours(model, args, kwargs, **settings):
    red = tokenreduce.compile(model, args, kwargs, method="tomesd", inner="eager", count_model_flops=False,
                              **settings)
    with torch.no_grad():
        return red, red(*args, **kwargs).sample


@pytest.mark.parametrize("options", [
    dict(ratio=0.5, use_rand=False),
    dict(ratio=0.3, max_downsample=2, merge_crossattn=True, merge_mlp=True),
], ids=["r0.5-topleft-attn", "r0.3-random-all-sublayers-ds2"])
def test_unet_equals_tomesd(unet, unet_inputs, options):
    args, kwargs = unet_inputs
    red, got = _ours(unet, args, kwargs, rand_seed=7, **options)
    want = _tomesd_unet(unet, args, kwargs, 7, **options)
    with torch.no_grad():
        full = unet(*args, **kwargs).sample
    effect = (want - full).abs().max().item()
    assert effect > 1e-3  # the merge changes the output, so parity is not the unreduced model twice
    assert (got - want).abs().max().item() < TOL
    merged = [b for b in red.report.blocks if b.action != "-"]
    ds = options.get("max_downsample", 1)
    assert [b.tokens_in for b in merged] == [n for n in (256, 64, 256, 256) if math.isqrt(256 // n) <= ds]
    assert all(b.tokens_out == b.tokens_in - int(b.tokens_in * options["ratio"]) for b in merged)
    # the graph: per merged block one apply (on N - r tokens) and one unmerge (back to N) per merged sublayer
    nodes = list(red.graph_module.graph.nodes)
    applies = [n for n in nodes if n.target is torch.ops.tokenreduce.apply_plan.default]
    unmerges = [n for n in nodes if getattr(n.target, "__name__", "") == "unmerge"]
    per_block = 1 + options.get("merge_crossattn", False) + options.get("merge_mlp", False)
    assert len(applies) == len(unmerges) == per_block * len(merged)
    assert sorted(n.meta["val"][0].shape[1] for n in applies) == sorted(b.tokens_out for b in merged for _ in
                                                                           range(per_block))
    assert sorted(n.meta["val"].shape[1] for n in unmerges) == sorted(b.tokens_in for b in merged for _ in
                                                                        range(per_block))
    assert got.shape == args[0].shape
    if options.get("use_rand", True):  # another seed draws other destinations: the comparison can fail
        other = _tomesd_unet(unet, args, kwargs, 8, **options)
        assert (got - other).abs().max().item() > 100 * TOL


def _dit(num_classes=10):
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=num_classes, norm_num_groups=8).eval()


def _dit_reference(model, args, kwargs, *, ratio, sx, sy, seed, merge_mlp, merge_crossattn=False):
    """The official matching at the official places, with hooks on a copy of the DiT / PixArt model."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    h = w = args[0].shape[-1] // model.config.patch_size
    current = {}

    def plan(block, inputs):
        x = inputs[0]
        r = int(x.shape[1] * ratio)
        no_rand = x.shape[0] % 2 == 1
        current["m"], current["u"] = tomesd.merge.bipartite_soft_matching_random2d(
            x, w, h, sx, sy, r, no_rand=no_rand, generator=gen)

    def merge(module, inputs):
        return (current["m"](inputs[0]), *inputs[1:])

    def unmerge(module, inputs, output):
        return current["u"](output)

    for blk in model.transformer_blocks:
        blk.register_forward_pre_hook(plan)
        subs = [blk.attn1] + ([blk.attn2] if merge_crossattn else []) + ([blk.ff] if merge_mlp else [])
        for sub in subs:
            sub.register_forward_pre_hook(merge)
            sub.register_forward_hook(unmerge)
    with torch.no_grad():
        return model(*args, **kwargs).sample


@pytest.mark.parametrize("batch,merge_mlp", [(2, True), (1, False)], ids=["b2-random-attn-mlp", "b1-topleft-attn"])
def test_dit_equals_official_matching(batch, merge_mlp):
    model = _dit()
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(batch, 4, 8, 8, generator=g),)
    kwargs = {"timestep": torch.full((batch,), 10), "class_labels": torch.arange(batch)}
    red, got = _ours(model, args, kwargs, ratio=0.5, max_downsample=2, rand_seed=5, merge_mlp=merge_mlp)
    want = _dit_reference(model, args, kwargs, ratio=0.5, sx=2, sy=2, seed=5, merge_mlp=merge_mlp)
    with torch.no_grad():
        full = model(*args, **kwargs).sample
    assert (want - full).abs().max().item() > 1e-3
    assert (got - want).abs().max().item() < TOL
    assert [b.tokens_out for b in red.report.blocks] == [8, 8]


def test_pixart_equals_official_matching():
    """PixArt (AdaLN-single; its cross-attention reads the residual stream without a norm): all three sublayers."""
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=12, norm_num_groups=8,
        use_additional_conditions=False).eval()
    g = torch.Generator().manual_seed(4)
    args = (torch.randn(2, 4, 8, 8, generator=g),)
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, 12, generator=g), "timestep": torch.tensor([10, 10])}
    settings = dict(ratio=0.5, max_downsample=2, rand_seed=6, merge_crossattn=True, merge_mlp=True)
    red, got = _ours(model, args, kwargs, **settings)
    want = _dit_reference(model, args, kwargs, ratio=0.5, sx=2, sy=2, seed=6, merge_mlp=True, merge_crossattn=True)
    with torch.no_grad():
        full = model(*args, **kwargs).sample
    assert (want - full).abs().max().item() > 1e-3
    assert (got - want).abs().max().item() < TOL
    assert [b.action for b in red.report.blocks] == ["tomesd r=8 (attn, crossattn, mlp)"] * 2


def test_refusals():
    model = _dit()
    args = (torch.randn(2, 4, 8, 8),)
    kwargs = {"timestep": torch.full((2,), 10), "class_labels": torch.arange(2)}
    # a patch-2 DiT's tokens are 2x coarser than its latent: tomesd's max_downsample=1 merges nowhere
    with pytest.raises(TokenReduceError, match="exceeds max_downsample=1; the finest is 2") as e:
        tokenreduce.compile(model, args, kwargs, method="tomesd", inner="eager", count_model_flops=False)
    assert e.value.setting == "max_downsample" and e.value.hint == "max_downsample=2"
    # 4 x 4 tokens in 2 x 2 cells: 4 destinations and 12 sources; int(16 * 0.85) = 13 sources cannot merge
    with pytest.raises(TokenReduceError, match="largest valid ratio for these blocks is 0.75") as e:
        tokenreduce.compile(model, args, kwargs, method="tomesd", ratio=0.85, max_downsample=2, inner="eager",
                            count_model_flops=False)
    assert e.value.setting == "ratio"
    for bad, setting in [({"ratio": 1.0}, "ratio"), ({"sx": 1, "sy": 1}, "sx"), ({"unmerge": True}, "unmerge"),
                         ({"merge_attn": False}, "merge_attn"), ({"rand_seed": -1}, "rand_seed"),
                         ({"protected_tokens": 1}, "protected_tokens")]:
        with pytest.raises(TokenReduceError) as e:
            tokenreduce.compile(model, args, kwargs, method="tomesd", **bad)
        assert e.value.setting == setting


@pytest.mark.parametrize("per_step", [False, True], ids=["drawn-at-compile", "per-step"])
def test_dit_exports_to_onnx(tmp_path, per_step):
    """Static shapes (TopK with constant k; the odd-batch rule and the per-step destinations are integer
    arithmetic on the batch size and the timestep) and onnxruntime agrees with eager."""
    pytest.importorskip("onnxruntime")
    from tokenreduce.targets.onnx import export_onnx

    model = _dit()
    args = (torch.randn(2, 4, 8, 8),)
    kwargs = {"timestep": torch.full((2,), 10), "class_labels": torch.arange(2)}
    red = tokenreduce.compile(model, args, kwargs, method="tomesd", max_downsample=2, rand_seed=1, per_step=per_step,
                              inner="eager", count_model_flops=False)
    ex = export_onnx(red, tmp_path / "dit_tomesd.onnx")
    assert ex.verified and not ex.problems and ex.max_abs_diff < 1e-4
    assert ex.op_counts.get("TopK", 0) == 3 * 2  # per merged block: the permutation's inverse, the ranking, its inverse


def _step_choices(t: float, salt: int, cells: int, per_cell: int) -> list[int]:
    """`per_step` destinations as specified (methods/tomesd.py, `step_choice`), in plain Python integers."""
    p = 2_147_483_647
    ti = int(torch.tensor(float(t), dtype=torch.float32).item() * 1000) % p
    out = []
    for j in range(cells):
        v = (ti * 7919 + j * 104_729 + salt) % p + 1
        for _ in range(3):
            v = v * 48_271 % p
        out.append(v // 65_536 % per_cell)
    return out


def test_dit_per_step_destinations_follow_the_timestep(monkeypatch):
    """One compiled graph; every call derives its destinations from the timestep input. Reference: the official
    matching at the official places, fed those destinations where it would draw random ones."""
    model = _dit()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    labels = torch.arange(2)
    red = tokenreduce.compile(model, (x,), {"timestep": torch.full((2,), 10), "class_labels": labels},
                              method="tomesd", max_downsample=2, rand_seed=5, per_step=True, inner="eager",
                              count_model_flops=False)
    gen = torch.Generator().manual_seed(5)
    salts = [int(torch.randint(2_147_483_647, (1,), generator=gen)) for _ in model.transformer_blocks]
    choices = []
    for t in (10, 500):
        kwargs = {"timestep": torch.full((2,), t), "class_labels": labels}
        with torch.no_grad():
            got = red(x, **kwargs).sample
        step = [_step_choices(t, s, 4, 4) for s in salts]
        choices.append(step)
        drawn = iter([torch.tensor(c).reshape(2, 2, 1) for c in step])
        with monkeypatch.context() as mp:
            mp.setattr(torch, "randint", lambda *a, _drawn=drawn, **k: next(_drawn))
            want = _dit_reference(model, (x,), kwargs, ratio=0.5, sx=2, sy=2, seed=0, merge_mlp=False)
        assert (got - want).abs().max().item() < TOL
    assert choices[0] != choices[1]  # another step, other destinations, same graph


class _Adapter(torch.nn.Module):
    """What a diffusers pipeline reads of its denoiser besides calling it: `config`, `dtype`, `device`."""

    def __init__(self, reduced, like):
        super().__init__()
        self.reduced, self.config, self._dtype = reduced, like.config, like.dtype

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, *args, **kwargs):
        return self.reduced(*args, **kwargs)


def test_dit_pipeline_end_to_end(monkeypatch):
    """A whole DiTPipeline (tiny random VAE, DDIM, classifier-free guidance: batch 4) runs with the reduced DiT,
    through `torch.compile(backend="tokenreduce")` (one graph for every step) and through `tokenreduce.compile`,
    and produces the images of the same pipeline with the official matching hooked into the DiT."""
    dit = _dit(num_classes=1000)  # the pipeline's guidance uses class 1000 as the null class
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, norm_num_groups=8, sample_size=16).eval()

    def run(denoiser):
        pipe = diffusers.DiTPipeline(transformer=denoiser, vae=vae, scheduler=diffusers.DDIMScheduler())
        pipe.set_progress_bar_config(disable=True)
        return pipe(class_labels=[1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    options = {"method": "tomesd", "max_downsample": 2, "rand_seed": 5, "inner": "eager"}
    torch._dynamo.reset()
    before = tokenreduce.backend_stats().builds
    via_backend = run(torch.compile(dit, backend="tokenreduce", options=options))
    assert tokenreduce.backend_stats().builds == before + 1  # one graph for the three steps
    example = (torch.randn(4, 4, 8, 8),), {"timestep": torch.full((4,), 10), "class_labels": torch.arange(4)}
    reduced = tokenreduce.compile(dit, *example, count_model_flops=False, **options)
    via_compile = run(_Adapter(reduced, dit))
    gen = torch.Generator().manual_seed(5)  # the compile-time draws, fed to the official matching at every call
    draws = [torch.randint(4, (2, 2, 1), generator=gen) for _ in dit.transformer_blocks]
    calls = iter(range(1000))
    with monkeypatch.context() as mp:
        mp.setattr(torch, "randint", lambda *a, **k: draws[next(calls) % len(draws)])
        hooked = copy.deepcopy(dit)
        reference = run(_HookedDiT(hooked))
    unreduced = run(dit)
    assert via_backend.shape == (2, 16, 16, 3) and abs(reference - unreduced).max() > 1e-3
    assert abs(via_backend - reference).max() < 1e-4
    assert abs(via_compile - reference).max() < 1e-4


class _HookedDiT(torch.nn.Module):
    """A DiT whose blocks run the official tomesd matching (ratio 0.5, 2 x 2 cells) on self-attention."""

    def __init__(self, dit):
        super().__init__()
        self.dit, self.config, self._dtype = dit, dit.config, dit.dtype
        h = w = dit.config.sample_size // dit.config.patch_size
        current = {}

        def plan(block, inputs):
            x = inputs[0]
            current["m"], current["u"] = tomesd.merge.bipartite_soft_matching_random2d(
                x, w, h, 2, 2, int(x.shape[1] * 0.5), no_rand=x.shape[0] % 2 == 1, generator=torch.Generator())

        for blk in dit.transformer_blocks:
            blk.register_forward_pre_hook(plan)
            blk.attn1.register_forward_pre_hook(lambda m, inputs: (current["m"](inputs[0]), *inputs[1:]))
            blk.attn1.register_forward_hook(lambda m, inputs, out: current["u"](out))

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, *args, **kwargs):
        return self.dit(*args, **kwargs)
