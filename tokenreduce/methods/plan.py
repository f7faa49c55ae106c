"""A plan: chosen reduction settings saved with the evidence they were chosen on, as a versioned JSON file.

`tokenreduce.tune` writes one; `tokenreduce.compile(model, x, plan=plan_or_path)`, the Dynamo backend's
`options={"plan": path}` and `tokenreduce convert --plan FILE` read it. A plan fixes the method and all of
its options (a per-block `r`, EViT's layers and keep ratio); the settings that do not change what is reduced
(`inner`, `dynamic_batch`, `unmerge`) may still be given beside it. Everything else the plan holds (budget,
target, batch, measured FLOPs and latency ratios, fidelity) is the record of how it was chosen: it is shown
and kept, never re-applied.

It lives with the settings (below the compiler) so every entry point can read one without importing the
tuner. Refuses: files of another format or a newer version, settings the registered methods do not accept
(the method's own message), and a setting given twice (in the plan and as a keyword) unless it is one of
`OVERRIDABLE`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenreduce.errors import TokenReduceError
from tokenreduce.jsonable import jsonable
from tokenreduce.util.files import write_text

FORMAT = "tokenreduce-plan"
VERSION = 1
OVERRIDABLE = ("inner", "dynamic_batch", "unmerge")  # how the plan runs, not what it reduces


@dataclass
class Plan:
    """Reduction settings chosen for one model, and the measurements they were chosen on.

    Attributes:
        settings: flat tokenreduce settings (`method` plus the method's options, e.g. `{"method": "tome",
            "r": [12, 10, 8, 0, ...]}`), exactly what `tokenreduce.compile(**settings)` takes.
        label: one line naming the setting ("ToMe greedy r=12,10,8,...").
        budget: what the plan had to fit: `{"flops": 0.5}` (FLOPs ratio) or `{"latency": 0.6}` (measured
            latency ratio on `target` at `batch`). Empty for a plan written by hand.
        target, batch: where latency was measured (None where it was not).
        measured: `flops_ratio` (the compile report's), `latency_ratio` (median reduced / unreduced, None
            if not measured), `fidelity` (score of `metric` against the full model on the calibration inputs),
            `metric` (its name), `calib_samples`.
        model: a description of the model the plan was tuned for (a plan is specific to its token count).
        notes: what the search did or could not do (time budget hit, candidates refused and why).
        candidates: the tuning table: one row per candidate tried (label, settings, FLOPs ratio, fidelity,
            measured latency ratio where measured, whether it was chosen); empty for a plan written by hand.
    """

    settings: dict[str, Any]
    label: str = ""
    budget: dict[str, float] = field(default_factory=dict)
    target: str | None = None
    batch: int | None = None
    measured: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    notes: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from tokenreduce.methods.settings import Settings

        if not isinstance(self.settings, Mapping) or "method" not in self.settings:
            raise TokenReduceError(f"a plan's settings must be a mapping with a 'method', got {self.settings!r}",
                                   setting="plan")
        Settings.from_options(dict(self.settings))  # the method's own checks, with its own messages
        self.settings = {k: list(v) if isinstance(v, tuple) else v for k, v in self.settings.items()}
        for key, value in self.budget.items():
            if key not in ("flops", "latency") or not isinstance(value, int | float) or not 0 < value <= 1:
                raise TokenReduceError(f"plan budget must be {{'flops': f}} or {{'latency': f}} with f in (0, 1], "
                                       f"got {self.budget!r}", setting="budget")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "label": self.label, "settings": self.settings,
                "budget": self.budget, "target": self.target, "batch": self.batch, "measured": self.measured,
                "model": self.model, "notes": self.notes, "candidates": self.candidates}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "plan") -> Plan:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise TokenReduceError(f"{where} is not a tokenreduce plan (no \"format\": \"{FORMAT}\")", setting="plan")
        version = data.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise TokenReduceError(f"{where} is plan format version {version!r}; this tokenreduce reads versions "
                                   f"up to {VERSION}: upgrade tokenreduce or re-run tokenreduce tune", setting="plan")
        return cls(settings=dict(data["settings"]), label=str(data.get("label", "")),
                   budget=dict(data.get("budget") or {}), target=data.get("target"), batch=data.get("batch"),
                   measured=dict(data.get("measured") or {}), model=str(data.get("model", "")),
                   notes=list(data.get("notes") or []), candidates=list(data.get("candidates") or []))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON (atomically: a reader never sees half a file)."""
        return write_text(path, json.dumps(jsonable(self.to_dict()), indent=2, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise TokenReduceError(f"plan file {p} not found; write one with `tokenreduce tune MODEL ... -o {p.name}` "
                                   "or tokenreduce.tune(...).save(path)", setting="plan")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TokenReduceError(f"plan file {p} is not valid JSON: {exc}", setting="plan") from exc
        return cls.from_dict(data, where=f"plan file {p}")

    def summary(self) -> str:
        m = self.measured
        parts = [self.label or str(self.settings)]
        if m.get("flops_ratio") is not None:
            parts.append(f"FLOPs ratio {m['flops_ratio']:.3f}")
        if m.get("latency_ratio") is not None:
            parts.append(f"latency ratio {m['latency_ratio']:.3f} ({self.target}, batch {self.batch})")
        if m.get("fidelity") is not None:
            parts.append(f"{m.get('metric', 'fidelity')} {m['fidelity']:.4f}")
        return "; ".join(parts)


def as_plan(plan: Any) -> Plan:
    """A `Plan`, a path to a plan file, or a plan's dict (`to_dict()`), as a `Plan`."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, str | os.PathLike):
        return Plan.load(plan)
    if isinstance(plan, Mapping):
        return Plan.from_dict(plan)
    raise TokenReduceError(f"plan must be a tokenreduce Plan, a path to a plan file or a plan dict, got "
                           f"{type(plan).__name__}", setting="plan")


def merge_plan(plan: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    """The flat settings of `plan` with the caller's `given` settings: only `OVERRIDABLE` ones may be added;
    a method option given again is an error (the plan fixes it)."""
    p = as_plan(plan)
    clash = sorted(k for k in given if k not in OVERRIDABLE)
    if clash:
        raise TokenReduceError(
            f"the plan fixes the method and its options; {', '.join(clash)} cannot be given beside plan= (only "
            f"{', '.join(OVERRIDABLE)} can). Edit the plan file, or drop plan= and pass the settings yourself",
            setting=clash[0])
    return {**p.settings, **given}
