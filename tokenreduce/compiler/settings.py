"""All user-facing settings in one dataclass.

The same names are used by `tokenreduce.compile(..., **settings)`, by
`torch.compile(backend="tokenreduce", options={...})` and by the command line. Fields that change the
compiled artefact are listed in `CACHE_FIELDS`; `Settings.uuid()` hashes them (inductor custom passes and
artefact caches key on it).

Validation here covers what can be checked without a model (types, ranges, method names). Checks that
need the model (r too large for a block, layer out of range) happen in the planner, with the model's
numbers in the message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenreduce.errors import TokenReduceError

ENCODER_METHODS = ("none", "tome", "evit")
DECODER_METHODS = ("fastv", "pyramiddrop", "gemfilter")
METHODS = ENCODER_METHODS + DECODER_METHODS
INNER_COMPILERS = ("inductor", "eager")
R_SCHEDULES = ("constant", "decreasing")


@dataclass(frozen=True)
class Settings:
    """How to reduce tokens.

    Attributes:
        method: "tome" (merge, Bolya et al. 2023), "evit" (keep top-k by CLS attention and fuse the
            rest, Liang et al. 2022) or "none" (capture and analyse only); for decoder LLMs/VLMs
            (`tokenreduce.reduce_decoder`): "fastv", "pyramiddrop" or "gemfilter".
        r: ToMe tokens merged per block: one int for every block, or a per-block list (padded with 0).
        r_schedule: "constant" or "decreasing" (ToMe's (r, -0.5) inflection schedule: more merging early,
            same total as constant r).
        keep_ratio: EViT fraction of the non-protected tokens kept at each chosen layer, in (0, 1]. FastV /
            PyramidDrop: fraction of the span tokens kept at each stage.
        keep_tokens: GemFilter: span tokens kept (the paper's k).
        score_pool: decoder methods: max-pool the last-query scores over this many neighbouring tokens
            before ranking (odd; 1 = the papers' ranking; SnapKV-style extension, see methods/decoder.py).
        layers: block indices (0-based) where a reduction happens. EViT default: the paper's 4th, 7th and
            10th of 12 blocks, scaled to the model depth. ToMe default: every block.
        prop_attn: add log(size) to the attention logits after a merge. None means the method's
            default (on for ToMe, off for EViT, as in the papers).
        protected_tokens: number of leading tokens never merged or pruned. None detects them from the
            graph (CLS, distillation and register tokens concatenated in front of the patches; the
            first token of a text model).
        fuse: EViT fuses the pruned tokens into one extra token (True) or drops them (False).
        clamp_r: when a block has fewer tokens than r needs, merge as many as it can (the report lists
            every clamped block) instead of raising. Off by default: nothing is silently reduced less.
        unmerge: restore the original token count at the model outputs (each original position gets
            the value of the token it ended up in), so dense outputs and outside pooling keep their shape.
        inner: compiler that runs the rewritten graph: "inductor" (default) or "eager".
        dynamic_batch: capture with a symbolic batch dimension so one graph serves every batch size.
    """

    method: str = "tome"
    r: int | tuple[int, ...] = 0
    r_schedule: str = "constant"
    keep_ratio: float = 1.0
    keep_tokens: int | None = None
    score_pool: int = 1
    layers: tuple[int, ...] | None = None
    prop_attn: bool | None = None
    protected_tokens: int | None = None
    fuse: bool = True
    unmerge: bool = False
    clamp_r: bool = False
    inner: str = "inductor"
    dynamic_batch: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TokenReduceError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(self.r, Sequence) and not isinstance(self.r, str):
            object.__setattr__(self, "r", tuple(int(v) for v in self.r))
            if any(v < 0 for v in self.r):  # type: ignore[union-attr]
                raise TokenReduceError(f"r must be >= 0 in every block, got {list(self.r)}")  # type: ignore[arg-type]
        elif isinstance(self.r, int) and not isinstance(self.r, bool):
            if self.r < 0:
                raise TokenReduceError(f"r must be >= 0, got {self.r}")
        else:
            raise TokenReduceError(f"r must be an int or a list of ints, got {self.r!r}")
        if self.r_schedule not in R_SCHEDULES:
            raise TokenReduceError(f"unknown r_schedule {self.r_schedule!r}; choose {' or '.join(R_SCHEDULES)}")
        if self.r_schedule == "decreasing" and not isinstance(self.r, int):
            raise TokenReduceError("r_schedule='decreasing' needs one int r, not a per-block list")
        if not (0.0 < float(self.keep_ratio) <= 1.0):
            raise TokenReduceError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.layers is not None:
            if isinstance(self.layers, int):
                object.__setattr__(self, "layers", (self.layers,))
            object.__setattr__(self, "layers", tuple(int(v) for v in self.layers))  # type: ignore[union-attr]
        if not isinstance(self.score_pool, int) or self.score_pool < 1 or self.score_pool % 2 == 0:
            raise TokenReduceError(f"score_pool must be an odd int >= 1 (1 = off), got {self.score_pool!r}")
        if self.keep_tokens is not None and (not isinstance(self.keep_tokens, int) or self.keep_tokens < 1):
            raise TokenReduceError(f"keep_tokens must be a positive int, got {self.keep_tokens!r}")
        if self.protected_tokens is not None and self.protected_tokens < 0:
            raise TokenReduceError(f"protected_tokens must be >= 0, got {self.protected_tokens}")
        if self.inner not in INNER_COMPILERS:
            raise TokenReduceError(f"unknown inner compiler {self.inner!r}; choose {' or '.join(INNER_COMPILERS)}")
        if self.unmerge and self.method == "evit" and not self.fuse:
            raise TokenReduceError(
                "unmerge needs every original token to land in a kept slot; EViT with fuse=False drops "
                "tokens. Use fuse=True or unmerge=False."
            )

    @property
    def use_prop_attn(self) -> bool:
        if self.prop_attn is not None:
            return self.prop_attn
        return self.method == "tome"

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Settings:
        """Build from a torch.compile `options` dict or keyword arguments; unknown names are errors."""
        merged = dict(options or {})
        merged.update(kwargs)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(merged) - names)
        if unknown:
            raise TokenReduceError(
                f"unknown setting(s) {', '.join(unknown)}; valid settings: {', '.join(sorted(names))}"
            )
        return cls(**merged)

    def uuid(self) -> str:
        """Hash of the fields that change the compiled graph."""
        payload = {name: getattr(self, name) for name in CACHE_FIELDS}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


CACHE_FIELDS = (
    "method", "r", "r_schedule", "keep_ratio", "keep_tokens", "score_pool", "layers", "prop_attn", "protected_tokens", "fuse", "unmerge",
    "clamp_r",
)
