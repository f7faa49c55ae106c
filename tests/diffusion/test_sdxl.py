"""tomesd on an SDXL-layout UNet: outputs equal the official `tomesd` package's on the same weights and seed.

The SDXL layout differs from SD 1.x in what the graph analysis and the grid arithmetic must cope with: the first
(finest) level is a plain `DownBlock2D` with no attention, so the finest transformer blocks are 2x coarser than
the latent and tomesd needs `max_downsample=2` to merge anywhere (with the default 1 we refuse, naming it);
`transformer_layers_per_block > 1` stacks several `BasicTransformerBlock`s in one `Transformer2DModel`, whose
first block reads the linear `proj_in` (`use_linear_projection=True`) directly; the `text_time` additional
conditioning (pooled text embeddings and six size/crop ids) enters through `added_cond_kwargs`. Tiny random-init
model (16 x 16 latent, batch 2, a guidance batch); the oracle is `tomesd.apply_patch` on a copy of it.
"""

from __future__ import annotations

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
tomesd = pytest.importorskip("tomesd")

import tokenreduce  # noqa: E402
from tokenreduce.errors import TokenReduceError  # noqa: E402

TOL = 2e-5  # float32; the merged tokens are summed in another order than tomesd's
SIDE = 16  # latent side: levels at 16 x 16 (no attention), 8 x 8 (2 transformer layers), 4 x 4 (1 layer)


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(0)
    text_dim, time_dim, pooled = 24, 8, 24
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIDE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 1), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + 6 * time_dim, cross_attention_dim=text_dim,
        norm_num_groups=8).eval()
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 4, SIDE, SIDE, generator=g), torch.tensor([10, 10]))
    px = 8.0 * SIDE
    kwargs = {"encoder_hidden_states": torch.randn(2, 7, text_dim, generator=g),
              "added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, generator=g),
                                    "time_ids": torch.tensor([[px, px, 0.0, 0.0, px, px]] * 2)}}
    with torch.no_grad():
        full = unet(*args, **kwargs).sample
    return unet, args, kwargs, full


def _tomesd(model, args, kwargs, seed, **options):
    ref = tomesd.apply_patch(copy.deepcopy(model), **options)
    torch.manual_seed(seed)  # tomesd forks its generator from the global one at its first merge
    with torch.no_grad():
        return ref(*args, **kwargs).sample


# transformer blocks of the tiny SDXL layout: 2 per attention at 8 x 8 (64 tokens: down level 1 and its two up
# attentions), 1 per attention at 4 x 4 (16 tokens: down level 2, the mid block, its two up attentions)
FINE = [f"{p}.transformer_blocks.{i}" for p in ("down_blocks.1.attentions.0", "up_blocks.1.attentions.0",
                                                 "up_blocks.1.attentions.1") for i in range(2)]
COARSE = [f"{p}.transformer_blocks.0" for p in ("down_blocks.2.attentions.0", "mid_block.attentions.0",
                                                "up_blocks.0.attentions.0", "up_blocks.0.attentions.1")]


@pytest.mark.parametrize("options,merged", [
    (dict(ratio=0.5, max_downsample=2), FINE),
    (dict(ratio=0.3, max_downsample=4, use_rand=False, merge_crossattn=True, merge_mlp=True), FINE + COARSE),
], ids=["r0.5-random-attn-ds2", "r0.3-topleft-all-sublayers-ds4"])
def test_sdxl_unet_equals_tomesd(sdxl, options, merged):
    unet, args, kwargs, full = sdxl
    red = tokenreduce.compile(unet, args, kwargs, method="tomesd", inner="eager", count_model_flops=False,
                              rand_seed=7, **options)
    with torch.no_grad():
        got = red(*args, **kwargs).sample
    want = _tomesd(unet, args, kwargs, 7, **options)
    assert (want - full).abs().max().item() > 1e-3  # the merge changes the output: parity is not full vs full
    assert (got - want).abs().max().item() < TOL
    assert got.shape == args[0].shape
    # every transformer block of the listed levels merges, the first of each stack too (it reads proj_in)
    done = {b.name: (b.tokens_in, b.tokens_out) for b in red.report.blocks if b.action != "-"}
    assert sorted(done) == sorted(merged)
    for name, (n_in, n_out) in done.items():
        assert n_in == (64 if name in FINE else 16)
        assert n_out == n_in - int(n_in * options["ratio"])
    if options.get("use_rand", True):  # another seed draws other destinations: the comparison can fail
        other = _tomesd(unet, args, kwargs, 8, **options)
        assert (got - other).abs().max().item() > 100 * TOL


def test_sdxl_default_max_downsample_is_refused(sdxl):
    """The finest attention level is 2x coarser than the latent: tomesd's default merges nowhere (the package
    silently does nothing); we refuse and name the setting that works."""
    unet, args, kwargs, _ = sdxl
    with pytest.raises(TokenReduceError, match="exceeds max_downsample=1; the finest is 2") as e:
        tokenreduce.compile(unet, args, kwargs, method="tomesd", inner="eager", count_model_flops=False)
    assert e.value.setting == "max_downsample" and e.value.hint == "max_downsample=2"
