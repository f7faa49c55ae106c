"""tomesd's per-call random stream (`rand_stream="call"`): a whole denoising loop equals the official package's.

The official `tomesd` package forks torch's global generator at the first merging call and draws new random
destinations in every merging block of every call with an even batch. With `rand_stream="call"` the draws are a
graph input (`tomesd_draws`) that `ReducedModule` and the Dynamo backend fill per call the same way, so after
`torch.manual_seed(s)` a multi-step loop gives the package's outputs step by step, from one compiled graph.

Oracles: `tomesd.apply_patch` on a copy of a random-init SD-layout `UNet2DConditionModel`; for the DiT (whose
AdaLN-Zero blocks the package's patched forward cannot run) the package's `bipartite_soft_matching_random2d`
placed by hooks where `tomesd/patch.py` places it, with a generator forked from the global one at the first
call, as `tomesd.utils.init_generator` does.
"""

from __future__ import annotations

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusion_models import sd_unet  # noqa: E402

tomesd = pytest.importorskip("tomesd")

import tokenreduce  # noqa: E402
from tokenreduce.compiler import backend  # noqa: E402
from tokenreduce.errors import TokenReduceError  # noqa: E402

TOL = 2e-5  # float32; merged tokens are summed in another order than tomesd's
TIMESTEPS = (999, 500, 10)


@pytest.fixture(scope="module")
def unet():
    return sd_unet()


@pytest.fixture(scope="module")
def text():
    return torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))


def _loop(call, text, seed):
    """Three denoising steps from a seeded latent (the latent's draw moves the global generator before the first
    merge, as a pipeline's does); every step's output."""
    torch.manual_seed(seed)
    latent = torch.randn(2, 4, 16, 16)
    outs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            out = call(latent, torch.tensor([t, t]), encoder_hidden_states=text).sample
            outs.append(out)
            latent = latent - 0.1 * out
    return outs


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


OPTIONS = [dict(ratio=0.5), dict(ratio=0.3, max_downsample=2, merge_crossattn=True, merge_mlp=True)]


@pytest.mark.parametrize("options", OPTIONS, ids=["r0.5-attn", "r0.3-ds2-all-sublayers"])
def test_unet_loop_equals_tomesd_stream(unet, text, options):
    want = _loop(tomesd.apply_patch(copy.deepcopy(unet), **options), text, seed=3)
    example = ((torch.randn(2, 4, 16, 16), torch.tensor([1, 1])), {"encoder_hidden_states": text})
    red = tokenreduce.compile(unet, *example, method="tomesd", rand_stream="call", inner="eager",
                              count_model_flops=False, **options)
    got = _loop(red, text, seed=3)
    assert _max_diff(got, want) < TOL
    if options != OPTIONS[0]:
        return
    # the merge matters, and so does the stream: one draw for every step (rand_stream="compile") drifts away from
    # tomesd after the first step, as another seed does from the start
    full = _loop(unet, text, seed=3)
    assert min((w - f).abs().max().item() for w, f in zip(want, full)) > 1e-3
    torch.manual_seed(3)
    torch.randn(2, 4, 16, 16)  # compiling forks the global generator where the loop's first call does
    fixed = tokenreduce.compile(unet, *example, method="tomesd", inner="eager", count_model_flops=False, **options)
    drift = [(f - w).abs().max().item() for f, w in zip(_loop(fixed, text, seed=3), want)]
    assert drift[0] < TOL and min(drift[1:]) > 100 * TOL
    red.call_inputs["tomesd_draws"].reset()
    assert _max_diff(_loop(red, text, seed=4), want) > 100 * TOL
    # the stream forks the global generator without moving it (tomesd's `init_generator`)
    red.call_inputs["tomesd_draws"].reset()
    torch.manual_seed(3)
    latent = torch.randn(2, 4, 16, 16)
    state = torch.get_rng_state()
    with torch.no_grad():
        red(latent, torch.tensor([5, 5]), encoder_hidden_states=text)
    assert torch.equal(torch.get_rng_state(), state)
    # one graph input holds the draws: per merging block, its (h // 2) * (w // 2) cells
    cells = sum((b.tokens_in // 4) for b in red.report.blocks if b.action != "-")
    draws = [n for n in red.graph_module.graph.nodes if n.op == "placeholder" and n.name == "tomesd_draws"]
    assert len(draws) == 1 and tuple(draws[0].meta["val"].shape) == (cells,)
    assert any("tomesd_draws" in note for note in red.report.notes)


def test_backend_loop_equals_tomesd_stream_one_graph(unet, text):
    """torch.compile(backend="tokenreduce") feeds the draws per call: tomesd's outputs, one graph, one build."""
    options = dict(ratio=0.5, max_downsample=2)
    want = _loop(tomesd.apply_patch(copy.deepcopy(unet), **options), text, seed=5)
    torch._dynamo.reset()
    before = backend.stats()
    compiled = torch.compile(unet, backend="tokenreduce",
                             options={"method": "tomesd", "rand_stream": "call", "inner": "eager", **options})
    got = _loop(compiled, text, seed=5)
    after = backend.stats()
    assert _max_diff(got, want) < TOL
    assert (after.graphs - before.graphs, after.builds - before.builds) == (1, 1)
    assert "tomesd r=" in str(after.last_report.blocks)
    torch._dynamo.reset()


def _dit():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8).eval()


def _dit_official(model, ratio, merge_mlp):
    """The DiT with the official matching hooked in where tomesd places it, drawing from one generator that is
    forked from torch's global one at the first call (tomesd's `init_generator`) and kept across calls."""
    model = copy.deepcopy(model)
    h = w = model.config.sample_size // model.config.patch_size
    current = {}

    def plan(block, inputs):
        x = inputs[0]
        if "gen" not in current:
            current["gen"] = torch.Generator().set_state(torch.get_rng_state())
        current["m"], current["u"] = tomesd.merge.bipartite_soft_matching_random2d(
            x, w, h, 2, 2, int(x.shape[1] * ratio), no_rand=x.shape[0] % 2 == 1, generator=current["gen"])

    for blk in model.transformer_blocks:
        blk.register_forward_pre_hook(plan)
        for sub in [blk.attn1] + ([blk.ff] if merge_mlp else []):
            sub.register_forward_pre_hook(lambda m, inputs: (current["m"](inputs[0]), *inputs[1:]))
            sub.register_forward_hook(lambda m, inputs, out: current["u"](out))
    return model


def _dit_calls(call, seed, batches=(2, 1, 2, 2)):
    """Calls at these batch sizes (an odd batch draws nothing: the stream must not move there)."""
    torch.manual_seed(seed)
    outs = []
    with torch.no_grad():
        for i, b in enumerate(batches):
            x = torch.randn(b, 4, 8, 8)
            outs.append(call(x, timestep=torch.full((b,), 100 * i + 1), class_labels=torch.arange(b)).sample)
    return outs


def test_dit_stream_across_batch_sizes():
    """One dynamic-batch graph; odd batches use the top-left destinations and draw nothing, as tomesd."""
    model = _dit()
    want = _dit_calls(_dit_official(model, 0.5, merge_mlp=True), seed=11)
    example = ((torch.randn(2, 4, 8, 8),), {"timestep": torch.full((2,), 1), "class_labels": torch.arange(2)})
    red = tokenreduce.compile(model, *example, method="tomesd", max_downsample=2, merge_mlp=True,
                              rand_stream="call", inner="eager", count_model_flops=False)
    got = _dit_calls(red, seed=11)
    assert _max_diff(got, want) < TOL
    assert _max_diff(_dit_calls(red, seed=12), want) > 100 * TOL  # another seed: other destinations
    # rand_seed seeds the stream instead of forking: the same as seeding the global generator before the first call
    seeded = tokenreduce.compile(model, *example, method="tomesd", max_downsample=2, merge_mlp=True,
                                 rand_stream="call", rand_seed=11, inner="eager", count_model_flops=False)
    torch.manual_seed(11)
    with torch.no_grad():
        x = torch.randn(2, 4, 8, 8)
        kw = {"timestep": torch.full((2,), 1), "class_labels": torch.arange(2)}
        torch.manual_seed(11)
        ref = _dit_official(model, 0.5, merge_mlp=True)(x, **kw).sample
        assert (seeded(x, **kw).sample - ref).abs().max().item() < TOL


def test_dit_onnx_takes_the_draws_as_an_input(tmp_path):
    """The exported file has a `tomesd_draws` input; fed the stream's draws, onnxruntime gives the official
    matching's outputs call after call."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from tokenreduce.targets.onnx import export_onnx

    model = _dit()
    example = ((torch.randn(2, 4, 8, 8),), {"timestep": torch.full((2,), 1), "class_labels": torch.arange(2)})
    red = tokenreduce.compile(model, *example, method="tomesd", max_downsample=2, rand_stream="call", inner="eager",
                              count_model_flops=False)
    ex = export_onnx(red, tmp_path / "dit_stream.onnx")
    assert ex.verified and not ex.problems and ex.max_abs_diff < 1e-4
    assert ex.input_names == ["hidden_states", "timestep", "class_labels", "tomesd_draws"]
    sess = ort.InferenceSession(str(ex.path), providers=["CPUExecutionProvider"])
    stream = red.call_inputs["tomesd_draws"]
    want = _dit_calls(_dit_official(model, 0.5, merge_mlp=False), seed=4, batches=(2, 2, 3))
    torch.manual_seed(4)
    for i, (b, w) in enumerate(zip((2, 2, 3), want)):
        x = torch.randn(b, 4, 8, 8)
        feeds = {"hidden_states": x.numpy(), "timestep": torch.full((b,), 100 * i + 1).numpy(),
                 "class_labels": torch.arange(b).numpy(), "tomesd_draws": stream(b, x.device).numpy()}
        got = torch.from_numpy(sess.run(None, feeds)[0])
        assert (got - w).abs().max().item() < 1e-4
    # random draws fed at an odd batch are ignored (top-left), as tomesd ignores use_rand there
    x, kw = torch.randn(1, 4, 8, 8), {"timestep": torch.full((1,), 3), "class_labels": torch.arange(1)}
    with torch.no_grad():
        a = red(x, **kw, tomesd_draws=torch.ones(stream.size, dtype=torch.int64)).sample
        b = red(x, **kw, tomesd_draws=torch.zeros(stream.size, dtype=torch.int64)).sample
    assert torch.equal(a, b)


@pytest.mark.parametrize("options,match", [
    (dict(rand_stream="call", use_rand=False), "use_rand=False"),
    (dict(rand_stream="call", per_step=True), "choose one"),
    (dict(rand_stream="step"), "'compile' or 'call'"),
])
def test_refusals(options, match):
    model = _dit()
    example = ((torch.randn(2, 4, 8, 8),), {"timestep": torch.full((2,), 1), "class_labels": torch.arange(2)})
    with pytest.raises(TokenReduceError, match=match) as err:
        tokenreduce.compile(model, *example, method="tomesd", max_downsample=2, inner="eager", count_model_flops=False,
                            **options)
    assert err.value.setting == "rand_stream"
