"""Shared fixtures: tiny, seeded models of every family the compiler claims to handle.

`tests/reference.py` (the independent eager ToMe/EViT implementation) is imported as `reference`: this
file puts the tests directory on `sys.path` (pytest runs with `--import-mode=importlib`, so test
directories are not packages).

Every model is built from a config (no downloads), seeded, in eval mode, and small enough that one
`tokenreduce.compile(..., inner="eager")` takes about a second on 2 CPU cores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

SEED = 0
TOL = 1e-4  # parity tolerance against the reference (float32)


def _seeded(fn):
    torch.manual_seed(SEED)
    model = fn()
    return model.eval()


# ---------------------------------------------------------------------------------------------- timm
def make_timm_vit(img_size: int = 32, class_token: bool = True, global_pool: str = "token",
                  fused_attn: bool = True, depth: int = 4, embed_dim: int = 64, num_heads: int = 2,
                  patch_size: int = 8, **kw):
    from timm.models.vision_transformer import VisionTransformer

    def build():
        m = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads, num_classes=5, class_token=class_token,
                              global_pool=global_pool, **kw)
        if not fused_attn:
            for blk in m.blocks:
                blk.attn.fused_attn = False
        return m

    return _seeded(build)


@pytest.fixture(scope="session")
def timm_vit():
    """timm ViT with a CLS token: 32x32 images, 8x8 patches -> 16 patches + CLS = 17 tokens."""
    return make_timm_vit()


@pytest.fixture(scope="session")
def timm_vit64():
    """timm ViT with CLS on 64x64 images: 64 patches + CLS = 65 tokens (room for several merges)."""
    return make_timm_vit(img_size=64)


@pytest.fixture(scope="session")
def timm_vit_explicit():
    """timm ViT with fused_attn=False: attention as matmul -> softmax -> matmul in the graph."""
    return make_timm_vit(img_size=64, fused_attn=False)


@pytest.fixture(scope="session")
def timm_deit_distilled():
    """Distilled DeiT (CLS + distillation token = 2 protected) with a tiny config."""
    from timm.models.deit import VisionTransformerDistilled

    return _seeded(lambda: VisionTransformerDistilled(img_size=64, patch_size=8, embed_dim=64, depth=4,
                                                      num_heads=2, num_classes=5))


@pytest.fixture(scope="session")
def timm_vit_nocls():
    """timm ViT without a CLS token, average pooling."""
    return make_timm_vit(img_size=64, class_token=False, global_pool="avg")


def images(batch: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


# ---------------------------------------------------------------------------------------------- transformers
def _hf_vision_kw(**kw):
    base = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
                image_size=32, patch_size=8)
    base.update(kw)
    return base


@pytest.fixture(scope="session")
def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(**_hf_vision_kw(num_labels=5))
    return _seeded(lambda: ViTForImageClassification(cfg))


@pytest.fixture(scope="session")
def hf_vit_eager():
    """HF ViT with eager (explicit matmul-softmax-matmul) attention."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(**_hf_vision_kw(num_labels=5))
    cfg._attn_implementation = "eager"
    return _seeded(lambda: ViTForImageClassification(cfg))


@pytest.fixture(scope="session")
def dinov2():
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(**_hf_vision_kw())
    return _seeded(lambda: Dinov2Model(cfg))


@pytest.fixture(scope="session")
def dinov2_registers():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(**_hf_vision_kw(num_register_tokens=4))
    return _seeded(lambda: Dinov2WithRegistersModel(cfg))


@pytest.fixture(scope="session")
def clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(**_hf_vision_kw())
    return _seeded(lambda: CLIPVisionModel(cfg))


BERT_LEN = 16
BERT_LENGTHS = (16, 11, 7, 13)  # valid tokens per row of the padded batch (row 0 is unpadded)


@pytest.fixture(scope="session")
def bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    return _seeded(lambda: BertModel(cfg, add_pooling_layer=False))


def bert_batch(lengths=BERT_LENGTHS, seq_len: int = BERT_LEN, seed: int = 2):
    """A right-padded batch: ids [B, L] (0 = [PAD]) and attention_mask [B, L]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (len(lengths), seq_len), generator=g)
    ids[:, 0] = 1  # [CLS]-like first token
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.fixture(scope="session")
def bert_inputs():
    return bert_batch()


# ---------------------------------------------------------------------------------------------- VLMs
@pytest.fixture(scope="module")
def llava():
    """`decoder_reference.tiny_llava()`, built once per test module (the VLM method tests in tests/decoders)."""
    from decoder_reference import tiny_llava

    return tiny_llava()


@pytest.fixture(scope="module")
def llava_prompt():
    """`decoder_reference.llava_prompt()`: (ids, mask, pixel values) for the `llava` fixture's model."""
    from decoder_reference import llava_prompt as make

    return make()


def output_tensor(out):
    """The first tensor of a model output (logits / last_hidden_state), whatever container it is in."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
        return out.last_hidden_state
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(type(out))

