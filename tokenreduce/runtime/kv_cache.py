"""A Hugging Face KV cache that holds only the tokens a pruned prefill kept, so `generate()` continues.

After FastV / PyramidDrop / GemFilter, layer l's cache holds `M_l <= N` prompt tokens (layers before the
first pruning stage hold all N). Decoding must still see the *logical* sequence: new tokens get position
`N, N+1, ...` (rotary), and the 2-D attention mask the user passes (left padding) is over the N prompt
tokens plus the generated ones. `PrunedLayer` therefore reports the logical length to transformers
(`get_seq_length`, `get_mask_sizes`), stores keys/values physically compacted, and remembers the logical
position of every stored key.

The masks transformers builds are then logical (`[B, 1, q, N + t]`); the `tokenreduce_<impl>` attention
function (registered with `transformers.AttentionInterface`, an official extension point, so no model
code is patched) gathers each layer's columns by its stored positions, then calls the model's own
attention implementation `<impl>`: the stock SDPA function, or for "eager" the `eager_attention_forward`
of the model's own modeling module (Gemma 2's applies the logit soft-cap there, which SDPA cannot). The
mask builder is the one `<impl>` uses (bool for SDPA, additive float for eager), so sliding-window layers
get their band over *logical* positions and a kept token's window is measured in original positions. It
is active only inside `ReducedCache.activate(model)`, which switches the model's attention implementation
and restores it afterwards. Decoding steps are never reduced again.

Refuses: `crop` (speculative / assisted decoding would need per-layer logical bookkeeping); attention
implementations other than "sdpa" and "eager" (flash / flex attention take no 4-D mask to gather). Batch
reordering (`reorder_cache`, `batch_select_indices`, `batch_repeat_interleave`) keeps positions in step.

The cache is handed to the model under the keyword its transformers version takes (`cache_kwargs`):
`cache` since transformers renamed `past_key_values` (which now warns on every call).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask

from tokenreduce.errors import TokenReduceError

ATTENTION_PREFIX = "tokenreduce_"
# The model's attention implementation -> the mask builder transformers pairs with it.
_MASKS: dict[str, Callable[..., Any]] = {"sdpa": sdpa_mask, "eager": eager_mask}
_ACTIVE: contextvars.ContextVar[ReducedCache | None] = contextvars.ContextVar("tokenreduce_cache", default=None)


class PrunedLayer(DynamicLayer):
    """One layer's cache: physically `[B, H_kv, M, d]`, logically `length` tokens long."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, length: int) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.positions = positions  # [B, M] logical position of every stored key
        self.length = length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):  # type: ignore[override]
        q = key_states.shape[-2]
        new = torch.arange(self.length, self.length + q, device=self.positions.device)
        self.positions = torch.cat([self.positions, new.expand(self.positions.shape[0], q)], dim=-1)
        self.length += q
        assert self.keys is not None and self.values is not None  # filled at construction
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # type: ignore[override]
        return self.length + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise TokenReduceError("a pruned KV cache cannot be cropped (speculative/assisted decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.positions = self.positions[indices, ...]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))


class ReducedCache(DynamicCache):
    """The KV cache of a pruned prefill (see the module docstring)."""

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                 positions: Sequence[torch.Tensor], length: int) -> None:
        layers = [PrunedLayer(k, v, p, length) for k, v, p in zip(keys, values, positions)]
        Cache.__init__(self, layers=layers)  # type: ignore[arg-type]
        self.pruned_layers = layers
        self.prompt_length = length

    @property
    def kept_tokens(self) -> list[int]:
        """Prompt tokens each layer holds (per row they are equal by construction)."""
        return [int((layer.positions[0] < self.prompt_length).sum()) for layer in self.pruned_layers]

    @contextlib.contextmanager
    def activate(self, model: torch.nn.Module) -> Iterator[None]:
        """Decode with this cache: switch `model` to the `tokenreduce_<impl>` attention for the duration."""
        config = model.config
        configs = [config] + [getattr(config, n) for n in ("text_config",) if getattr(config, n, None) is not None]
        before = [c._attn_implementation for c in configs]  # noqa: SLF001 - transformers' documented switch
        for c, impl in zip(configs, before):
            c._attn_implementation = register(impl)  # noqa: SLF001
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            for c, b in zip(configs, before):
                c._attn_implementation = b  # noqa: SLF001


def _gather_columns(module: torch.nn.Module, key: torch.Tensor, attention_mask: torch.Tensor | None
                    ) -> torch.Tensor | None:
    """The logical mask `[B, 1|H, q, N + t]` restricted to the keys layer `module.layer_idx` stores."""
    cache = _ACTIVE.get()
    if attention_mask is None or cache is None or attention_mask.shape[-1] == key.shape[-2]:
        return attention_mask
    layer = cache.pruned_layers[module.layer_idx]  # type: ignore[index]
    pos = layer.positions  # [B, M]
    if pos.shape[-1] != key.shape[-2]:
        raise TokenReduceError(f"layer {module.layer_idx}: cache positions ({pos.shape[-1]}) do not match "
                               f"its keys ({key.shape[-2]})")
    b, h, q, _ = attention_mask.shape
    idx = pos[:, None, None, :].expand(max(b, pos.shape[0]), h, q, pos.shape[-1])
    return attention_mask.expand(idx.shape[0], h, q, attention_mask.shape[-1]).gather(-1, idx)


def _sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          attention_mask: torch.Tensor | None, **kwargs):  # type: ignore[no-untyped-def]
    return sdpa_attention_forward(module, query, key, value, _gather_columns(module, key, attention_mask), **kwargs)


def _eager(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, **kwargs):  # type: ignore[no-untyped-def]
    """The eager attention of the module's own modeling file (soft-cap, scaling, sinks as the model does)."""
    owner = sys.modules.get(type(module).__module__)
    fn = getattr(owner, "eager_attention_forward", None)
    if fn is None:
        raise TokenReduceError(f"{type(module).__name__}: its modeling module has no eager_attention_forward to "
                               "decode with; load the model with attn_implementation='sdpa'")
    return fn(module, query, key, value, _gather_columns(module, key, attention_mask), **kwargs)


_FUNCTIONS: dict[str, Callable[..., Any]] = {"sdpa": _sdpa, "eager": _eager}


def cache_kwargs(model: torch.nn.Module, cache: Cache) -> dict[str, Any]:
    """`{keyword: cache}` for `model(...)` and `model.generate(...)`: `cache` where the model's forward
    takes it (transformers >= 5.2x deprecates `past_key_values` with a warning per call), else the old name."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def register(impl: str | None) -> str:
    """Register `tokenreduce_<impl>` (attention + its mask builder) with transformers; returns the name.
    `impl` is the model's attention implementation ("sdpa" or "eager"; None is transformers' default, eager)."""
    impl = impl or "eager"
    if impl.startswith(ATTENTION_PREFIX):
        raise TokenReduceError("a pruned cache is already active on this model (nested ReducedCache.activate)")
    if impl not in _FUNCTIONS:
        raise TokenReduceError(f"decoding after a pruned prefill needs attn_implementation 'sdpa' or 'eager', the "
                               f"model uses {impl!r} (its masks cannot be gathered by kept positions); load the "
                               "model with attn_implementation='sdpa'")
    name = ATTENTION_PREFIX + impl
    AttentionInterface.register(name, _FUNCTIONS[impl])
    AttentionMaskInterface.register(name, _MASKS[impl])
    return name
