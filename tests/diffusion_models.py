"""Tiny diffusers denoisers shared by the diffusion tests (imported as `diffusion_models`: `tests/conftest.py`
puts the tests directory on `sys.path`).

`sd_unet()` is the SD-1.x layout at its smallest: one cross-attention level at 16 x 16 latents (256 tokens,
where tomesd merges with `max_downsample=1`) and one plain level, so one test compile takes seconds.
"""

from __future__ import annotations

import torch


def sd_unet() -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
