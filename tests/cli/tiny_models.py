"""Tiny models for the command-line tests, loaded through the `module:function` source.

Each CLI test runs `tokenreduce` in a subprocess; a real ViT would take minutes per call on 2 cores, so
the tests point the CLI at these factories (`tiny_models:vit`, with `tests/cli` on PYTHONPATH). They
also serve as an example of the `module:function` contract: return `(model, example_inputs)` with the
inputs as a tuple (positional) or a dict (keyword), optionally taking `batch` and other arguments that
`--model-arg KEY=VALUE` / `--batch` pass in.
"""

from __future__ import annotations

import torch


def vit(batch: int = 2, image_size: int = 32, depth: int = 4) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """timm ViT with a CLS token: 32x32 images, 8x8 patches -> 16 patches + CLS = 17 tokens, 4 blocks."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=image_size, patch_size=8, embed_dim=64, depth=depth, num_heads=2,
                              num_classes=5).eval()
    return model, (torch.randn(batch, 3, image_size, image_size),)


def bert(batch: int = 2, seq_len: int = 16) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A 2-block BERT encoder called with keyword inputs (input_ids, attention_mask)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(5, 100, (batch, seq_len))
    return model, {"input_ids": ids, "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}


def mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """No attention anywhere: tokenreduce must refuse it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).eval()
    return model, (torch.randn(2, 16),)


def not_a_model() -> str:
    """Breaks the module:function contract."""
    return "model"
