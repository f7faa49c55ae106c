"""The model matrix's checks: run one check on one family and say what happened, as an `Outcome`.

Why this file exists: the matrix test (`test_matrix.py`) and `scripts/support_table.py` need the same
checks and the same reading of their results. A check never raises; it returns

* `works` -- the check ran and every assertion of it held;
* `refused: <message>` -- tokenreduce raised a `TokenReduceError` (a refusal that names its reason);
* `unreduced: <reason>` -- the compile succeeded but no block was reduced (the report's skip reason);
* `wrong: <what>` -- it ran, but a number is wrong (identity off, non-finite output, wrong shape, tokens
  that differ from the reference): a bug;
* `crash: <ExceptionType>: <message>` -- any other exception: a bug (tokenreduce must refuse by name);
* `n/a: <why>` -- the check does not apply (ONNX when the unreduced model itself does not export).

Encoder checks share one capture per family: `tokenreduce.compile` (the user's path, FLOP counting on)
builds the ToMe model; the identity, EViT and PiToMe checks rewrite copies of one `export_graph` capture
through the same pipeline steps as `tokenreduce.compile` (`reduce_graph`, `make_report`, the eager target).
Decoder checks go through `tokenreduce.reduce_decoder` and compare with the plain model's own `generate()`
and with the independent reference in `tests/decoder_reference.py`.
"""

from __future__ import annotations

import copy
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from conftest import output_tensor
from matrix.builders import DECODERS, ENCODERS, TRACE_BATCH, DecoderCase, EncoderCase

import tokenreduce
from tokenreduce import TokenReduceError

ENCODER_CHECKS = ("tome-identity", "evit-identity", "tome", "evit", "pitome", "dynamic-batch", "onnx")
DECODER_CHECKS = ("fastv-identity", "fastv", "fastv-generate", "pyramiddrop", "gemfilter", "fastv-batch",
                  "fastv-onnx")
KINDS = ("works", "refused", "unreduced", "wrong", "crash", "n/a")

IDENTITY_TOL = 1e-5
BATCH_TOL = 1e-4
TOME = dict(method="tome", r=2)
EVIT = dict(method="evit", keep_ratio=0.5, layers=[1])
PITOME = dict(method="pitome", r=2)
FASTV = dict(layers=[1], keep_ratio=0.5)
GEN_STEPS = 4


@dataclass
class Outcome:
    kind: str
    text: str = ""
    last_line: str = ""  # a crash's traceback, last frame line + message (for the owner)

    def __str__(self) -> str:
        return self.kind if self.kind == "works" else f"{self.kind}: {self.text}"


def parse_expectation(spec: str) -> tuple[str, str]:
    kind, _, text = spec.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise ValueError(f"expectation {spec!r} must start with one of {KINDS}")
    return kind, text.strip()


def matches(outcome: Outcome, spec: str) -> bool:
    """`works` equals `works`; otherwise the kinds are equal and the expectation's text is a substring of the
    outcome's (for crashes: of "ExceptionType: message")."""
    kind, text = parse_expectation(spec)
    return outcome.kind == kind and text in outcome.text


ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes some exporters put in their messages


def _crash(exc: BaseException) -> Outcome:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"
    text = ANSI.sub("", str(exc)).strip()
    msg = text.splitlines()[0] if text else ""
    return Outcome("crash", f"{type(exc).__name__}: {msg}", f"{where}: {type(exc).__name__}: {msg}")


class Failed(Exception):
    """A shared step (capture, a compile) already failed: the checks built on it report its outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(str(outcome))
        self.outcome = outcome


def guarded(fn: Callable[[], Outcome]) -> Outcome:
    try:
        return fn()
    except Failed as f:
        return f.outcome
    except TokenReduceError as exc:
        return Outcome("refused", " ".join(ANSI.sub("", str(exc)).split()))
    except Exception as exc:  # noqa: BLE001 - any other exception is what the matrix reports as a crash
        return _crash(exc)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all()) if t.is_floating_point() else True


# ============================================================================================ encoders
@dataclass
class EncoderRun:
    """One encoder family's shared state: the model, its capture, the ToMe module (built once)."""

    family: str
    case: EncoderCase
    captured: Any = None
    capture_outcome: Outcome | None = None
    modules: dict[str, Any] = field(default_factory=dict)  # setting name -> ReducedModule or Outcome

    def inputs(self, rows: int = TRACE_BATCH) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.case.rows(rows)

    def original(self, rows: int = TRACE_BATCH) -> torch.Tensor:
        args, kwargs = self.inputs(rows)
        with torch.no_grad():
            return output_tensor(self.case.model(*args, **kwargs))

    def capture(self) -> Any:
        if self.captured is None and self.capture_outcome is None:
            from tokenreduce.compiler.capture import export_graph, trace_lock

            def run() -> Outcome:
                args, kwargs = self.inputs()
                with trace_lock():
                    self.captured = export_graph(self.case.model, args, kwargs, dynamic_batch=True)
                return Outcome("works")

            self.capture_outcome = guarded(run)
        if self.captured is None:
            assert self.capture_outcome is not None
            raise Failed(self.capture_outcome)
        return self.captured

    def rewritten(self, name: str, opts: dict[str, Any]) -> Any:
        """A ReducedModule for `opts` built on a copy of the shared capture, as `tokenreduce.compile` does."""
        if name not in self.modules:
            self.modules[name] = _build(lambda: self._rewrite(opts))
        return _unwrap(self.modules[name])

    def _rewrite(self, opts: dict[str, Any]) -> Any:
        from tokenreduce import Settings, targets
        from tokenreduce.compiler.api import ReducedModule
        from tokenreduce.compiler.capture import trace_lock
        from tokenreduce.compiler.pipeline import make_report, reduce_graph
        from tokenreduce.targets import TargetOptions

        captured = self.capture()
        args, kwargs = self.inputs()
        cfg = Settings.from_options(dict(opts, inner="eager"))
        with trace_lock():
            red = reduce_graph(copy.deepcopy(captured.gm), cfg)
            report = make_report(red, cfg)
            if captured.static_batch_reason:
                report.notes.append(captured.static_batch_reason)
            runner = targets.get("eager").lower(red.gm, args, kwargs,
                                                TargetOptions(dynamic_batch=captured.dynamic_batch)).runner
        return ReducedModule(red.gm, runner, report, cfg, args, kwargs, captured.dynamic_batch)

    def compiled(self, name: str, opts: dict[str, Any]) -> Any:
        """`tokenreduce.compile` itself (default FLOP counting), at the trace batch."""
        if name not in self.modules:
            args, kwargs = self.inputs()
            self.modules[name] = _build(lambda: tokenreduce.compile(self.case.model, args, kwargs, inner="eager",
                                                                    **opts))
        return _unwrap(self.modules[name])


def _build(fn: Callable[[], Any]) -> Any:
    box: list[Any] = []

    def run() -> Outcome:
        box.append(fn())
        return Outcome("works")

    outcome = guarded(run)
    return box[0] if box else outcome


def _unwrap(v: Any) -> Any:
    if isinstance(v, Outcome):
        raise Failed(v)
    return v


def _skip_reasons(report: Any) -> str:
    reasons = [f"{b.name}: {b.reason}" for b in report.blocks if b.reason]
    return "; ".join(reasons) or "no block reduced and no reason given"


def check_identity(run: EncoderRun, name: str, opts: dict[str, Any]) -> Outcome:
    red = run.rewritten(name, opts)
    args, kwargs = run.inputs()
    with torch.no_grad():
        got = output_tensor(red(*args, **kwargs))
    want = run.original()
    if got.shape != want.shape:
        return Outcome("wrong", f"output shape {tuple(got.shape)}, the model's {tuple(want.shape)}")
    diff = float((got - want).abs().max())
    if not diff <= IDENTITY_TOL:
        return Outcome("wrong", f"identity: max |diff| {diff:.2e} > {IDENTITY_TOL:g}")
    return Outcome("works")


def check_reduced(run: EncoderRun, name: str, opts: dict[str, Any], through_compile: bool = False) -> Outcome:
    red = run.compiled(name, opts) if through_compile else run.rewritten(name, opts)
    if not red.report.reduced_blocks:
        return Outcome("unreduced", _skip_reasons(red.report))
    args, kwargs = run.inputs()
    with torch.no_grad():
        got = output_tensor(red(*args, **kwargs))
    want = run.original()
    if not _finite(got):
        return Outcome("wrong", "non-finite values in the reduced output")
    return _shape_outcome(got, want, red.report)


def _shape_outcome(got: torch.Tensor, want: torch.Tensor, report: Any) -> Outcome:
    """The reduced output has the model's shape, or (a token output) the model's shape with the token axis
    at the last block's token count."""
    if got.shape == want.shape:
        return Outcome("works")
    tokens = report.blocks[-1].tokens_out
    ok = (got.dim() == want.dim() and got.shape[0] == want.shape[0] and got.shape[2:] == want.shape[2:]
          and got.shape[1] == tokens)
    if ok:
        return Outcome("works")
    return Outcome("wrong", f"reduced output shape {tuple(got.shape)}; the model's is {tuple(want.shape)} and the "
                            f"last block leaves {tokens} tokens")


def check_dynamic_batch(run: EncoderRun) -> Outcome:
    """The ToMe module traced at TRACE_BATCH rows runs on more rows; its first rows equal the traced-batch
    output (rows are independent)."""
    red = run.compiled("tome", TOME)
    if not red.dynamic_batch:
        note = next((n for n in red.report.notes if "static batch" in n), "compiled with a static batch")
        return Outcome("refused", note)
    args, kwargs = run.inputs()
    big_args, big_kwargs = run.case.rows(TRACE_BATCH + 1)
    with torch.no_grad():
        small = output_tensor(red(*args, **kwargs))
        big = output_tensor(red(*big_args, **big_kwargs))
    if big.shape[0] != TRACE_BATCH + 1 or not _finite(big):
        return Outcome("wrong", f"batch {TRACE_BATCH + 1}: output shape {tuple(big.shape)}, finite={_finite(big)}")
    diff = float((big[:TRACE_BATCH] - small).abs().max())
    if not diff <= BATCH_TOL:
        return Outcome("wrong", f"batch {TRACE_BATCH + 1} rows differ from batch {TRACE_BATCH}: {diff:.2e}")
    return Outcome("works")


def check_onnx(run: EncoderRun, tmp: Any) -> Outcome:
    """Export the ToMe module with the ONNX target (which verifies it in onnxruntime). A failure counts only
    when the unmodified model exports (`torch.onnx.export(..., dynamo=True)`, the exporter the target uses)."""
    from tokenreduce.targets.onnx import export_onnx

    def reduced_export() -> Outcome:
        export_onnx(run.compiled("tome", TOME), tmp / "reduced.onnx")
        return Outcome("works")

    def plain_export() -> Outcome:
        args, kwargs = run.inputs()
        with torch.no_grad():
            torch.onnx.export(run.case.model, args, str(tmp / "plain.onnx"), kwargs=kwargs, dynamo=True,
                              verbose=False)
        return Outcome("works")

    reduced = guarded(reduced_export)
    if reduced.kind == "works":
        return reduced
    plain = guarded(plain_export)
    if plain.kind != "works":
        return Outcome("n/a", f"the unmodified model does not export to ONNX either: {plain.text}")
    return reduced


def run_encoder_check(run: EncoderRun, check: str, tmp: Any) -> Outcome:
    fns: dict[str, Callable[[], Outcome]] = {
        "tome-identity": lambda: check_identity(run, "tome-0", dict(method="tome", r=0)),
        "evit-identity": lambda: check_identity(run, "evit-1", dict(method="evit", keep_ratio=1.0)),
        "tome": lambda: check_reduced(run, "tome", TOME, through_compile=True),
        "evit": lambda: check_reduced(run, "evit", EVIT),
        "pitome": lambda: check_reduced(run, "pitome", PITOME),
        "dynamic-batch": lambda: check_dynamic_batch(run),
        "onnx": lambda: check_onnx(run, tmp),
    }
    return guarded(fns[check])


# ============================================================================================ decoders


@dataclass
class DecoderRun:
    family: str
    case: DecoderCase
    plain: Any = None  # the model's own greedy generate(): sequences and first-step logits

    def plain_generate(self) -> Any:
        if self.plain is None:
            c = self.case
            with torch.no_grad():
                self.plain = c.model.generate(input_ids=c.input_ids, attention_mask=c.attention_mask,
                                              max_new_tokens=GEN_STEPS, do_sample=False, output_logits=True,
                                              return_dict_in_generate=True, **c.extra)
        return self.plain

    decoders: dict[str, Any] = field(default_factory=dict)  # one ReducedDecoder per setting (its captures kept)

    def reduce(self, method: str, **opts: Any) -> Any:
        key = f"{method} {sorted(opts.items())}"
        if key not in self.decoders:
            self.decoders[key] = tokenreduce.reduce_decoder(self.case.model, method, **opts)
        return self.decoders[key]

    def prefill(self, dec: Any) -> Any:
        c = self.case
        return dec.prefill(c.input_ids, c.attention_mask, c.span, **c.extra)


def _pruned(report: Any) -> bool:
    return any(n < report.num_tokens for n in report.tokens_per_block)


def check_decoder_identity(run: DecoderRun) -> Outcome:
    """FastV keeping every span token: the plain model's first-step logits and greedy tokens."""
    c = run.case
    dec = run.reduce("fastv", layers=[1], keep_ratio=1.0)
    pre = run.prefill(dec)
    plain = run.plain_generate()
    diff = float((pre.logits - plain.logits[0]).abs().max())
    if not diff <= IDENTITY_TOL:
        return Outcome("wrong", f"identity: prefill logits max |diff| {diff:.2e} > {IDENTITY_TOL:g}")
    out = dec.generate(c.input_ids, c.attention_mask, c.span, max_new_tokens=GEN_STEPS, **c.extra)
    if not torch.equal(out, plain.sequences):
        return Outcome("wrong", "identity: generate() after a prefill keeping everything differs from the model's")
    return Outcome("works")


def check_decoder_method(run: DecoderRun, method: str, opts: dict[str, Any]) -> Outcome:
    dec = run.reduce(method, **opts)
    pre = run.prefill(dec)
    if not _finite(pre.logits):
        return Outcome("wrong", "non-finite prefill logits")
    if not _pruned(dec.report):
        reasons = "; ".join(f"{n}: {r}" for n, r in dec.report.skipped) or "no block pruned"
        return Outcome("unreduced", reasons)
    return Outcome("works")


def check_decoder_generate(run: DecoderRun) -> Outcome:
    """generate() after a FastV prefill: the prompt followed by GEN_STEPS tokens, the tokens of the independent
    reference (tests/decoder_reference.py, which covers every decoder family here) under the same stages."""
    c = run.case
    dec = run.reduce("fastv", **FASTV)
    out = dec.generate(c.input_ids, c.attention_mask, c.span, max_new_tokens=GEN_STEPS, **c.extra)
    n = c.input_ids.shape[1]
    if out.shape != (c.input_ids.shape[0], n + GEN_STEPS) or not torch.equal(out[:, :n], c.input_ids):
        return Outcome("wrong", f"generate() returned shape {tuple(out.shape)} (expected "
                                f"{(c.input_ids.shape[0], n + GEN_STEPS)}) or changed the prompt")
    if not _pruned(dec.report):
        return Outcome("unreduced", "; ".join(f"{a}: {b}" for a, b in dec.report.skipped) or "no block pruned")
    want = _reference_tokens(run, dec.report)
    if not torch.equal(out[:, n:], want):
        return Outcome("wrong", f"generate() tokens {out[:, n:].tolist()} differ from the reference's {want.tolist()}")
    return Outcome("works")


def _reference_tokens(run: DecoderRun, report: Any) -> torch.Tensor:
    """The independent reference's greedy tokens under the report's stages. A VLM's reference is fed the
    embeddings and position ids (3-axis for mRoPE) its language model receives, grabbed by a hook during
    a plain forward; decoding continues at `real tokens + rope delta`, as `generate()` does."""
    from decoder_reference import RefDecoder

    c = run.case
    stages = [(s.score_block, s.first_reduced_block, s.keep) for s in report.stages]
    if stages != [(0, 1, 8)]:  # FastV layers=[1]: rank with block 0, keep half of the 16-token span
        raise AssertionError(f"FastV stages {stages}, expected [(0, 1, 8)]")
    lm = c.model
    ref = RefDecoder(lm)
    mask = c.attention_mask
    if c.span is None:  # a VLM: its span is the image tokens
        span = (c.input_ids == lm.config.image_token_id) & mask.bool()
        grabbed: dict[str, Any] = {}
        hook = lm.model.language_model.register_forward_pre_hook(lambda m, a, k: grabbed.update(k),
                                                                 with_kwargs=True)
        with torch.no_grad():
            lm(input_ids=c.input_ids, attention_mask=mask, **c.extra)
        hook.remove()
        logits, cache = ref.prefill(grabbed["inputs_embeds"], mask, span, stages,
                                    position_ids=grabbed.get("position_ids"))
        deltas = getattr(lm.model, "rope_deltas", None)
        next_pos = mask.sum(-1) + (deltas[:, 0] if deltas is not None else 0)
        return ref.decode(logits, cache, mask, GEN_STEPS, embed=lm.get_input_embeddings(), next_pos=next_pos)
    span = _span_mask(c) & mask.bool()
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    logits, cache = ref.prefill(ref.embed(c.input_ids, pos), mask, span, stages)
    return ref.decode(logits, cache, mask, GEN_STEPS)


GRIDS = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}
"""Qwen-VL's flattened patch inputs and the grid input that says how many patch rows each image has."""


def row_inputs(extra: dict[str, Any], b: int, i: int) -> dict[str, Any] | None:
    """Row `i`'s multimodal inputs: batch-leading tensors sliced; Qwen-VL's flattened patches cut at the
    boundaries their grid gives (`t * h * w` rows per image), with one image (or video) per prompt; None where
    neither applies."""
    out: dict[str, Any] = {}
    for k, v in extra.items():
        grid = extra.get(GRIDS.get(k, ""))
        if isinstance(grid, torch.Tensor) and grid.shape[0] == b:
            sizes = grid.prod(-1).tolist()
            start = sum(sizes[:i])
            out[k] = v[start:start + sizes[i]]
        elif isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b:
            out[k] = v[i:i + 1]
        else:
            return None
    return out


def check_decoder_batch(run: DecoderRun) -> Outcome:
    """Each prompt pruned alone (batch 1) gives the logits of its row in the batch-2 prefill: padding and the
    per-row span never leak across rows. Multimodal inputs are split per row (`row_inputs`; n/a where they
    cannot be)."""
    c = run.case
    b = c.input_ids.shape[0]
    rows = [row_inputs(c.extra, b, i) for i in range(b)]
    if any(r is None for r in rows):
        return Outcome("n/a", "multimodal inputs that cannot be split per row")
    dec = run.reduce("fastv", **FASTV)
    whole = run.prefill(dec).logits
    for i in range(b):
        row = dec.prefill(c.input_ids[i:i + 1], c.attention_mask[i:i + 1], c.span, **rows[i]).logits
        diff = float((row - whole[i:i + 1]).abs().max())
        if not diff <= BATCH_TOL:
            return Outcome("wrong", f"row {i} pruned alone differs from its row in the batch by {diff:.2e}")
    return Outcome("works")


def check_decoder_onnx(run: DecoderRun, tmp: Any) -> Outcome:
    """The FastV-pruned prefill graph exported by the ONNX target, which verifies it in onnxruntime (what
    `tokenreduce convert hf:FOLDER --method fastv` does), on the unpadded prompt (row 0, its multimodal inputs
    split out by `row_inputs`; the whole batch where they cannot be). With a left-padded row the verification
    compares the cache entries of padding positions, whose attention rows are fully masked: eager and
    onnxruntime disagree there, for the unpruned prefill as much as for the pruned one, and those entries are
    never attended. A failure counts only when the same prefill captured without pruning (method "none")
    exports."""
    import types

    from tokenreduce.targets.onnx import export_onnx

    c = run.case
    b = c.input_ids.shape[0]
    first = row_inputs(c.extra, b, 0)
    rows = slice(0, 1) if first is not None else slice(0, b)
    extra = first if first is not None else c.extra

    def export(method: str, opts: dict[str, Any]) -> Outcome:
        dec = run.reduce(method, **opts)
        compiled, flat = dec.compiled_for(c.input_ids[rows], c.attention_mask[rows], c.span, **extra)
        shim = types.SimpleNamespace(graph_module=compiled.gm, example_args=tuple(flat), example_kwargs={},
                                     dynamic_batch=False)
        export_onnx(shim, tmp / f"{method}.onnx")
        return Outcome("works")

    reduced = guarded(lambda: export("fastv", FASTV))
    if reduced.kind == "works":
        return reduced
    plain = guarded(lambda: export("none", {}))
    if plain.kind != "works":
        return Outcome("n/a", f"the unpruned prefill does not export to ONNX either: {plain.text}")
    return reduced


def _span_mask(c: DecoderCase) -> torch.Tensor:
    assert c.span is not None
    m = torch.zeros_like(c.input_ids, dtype=torch.bool)
    m[:, c.span[0]:c.span[1]] = True
    return m


def run_decoder_check(run: DecoderRun, check: str, tmp: Any) -> Outcome:
    fns: dict[str, Callable[[], Outcome]] = {
        "fastv-identity": lambda: check_decoder_identity(run),
        "fastv": lambda: check_decoder_method(run, "fastv", FASTV),
        "fastv-generate": lambda: check_decoder_generate(run),
        "pyramiddrop": lambda: check_decoder_method(run, "pyramiddrop", dict(layers=[1, 2], keep_ratio=0.5)),
        "gemfilter": lambda: check_decoder_method(run, "gemfilter", dict(layers=[1], keep_tokens=6)),
        "fastv-batch": lambda: check_decoder_batch(run),
        "fastv-onnx": lambda: check_decoder_onnx(run, tmp),
    }
    return guarded(fns[check])


# ============================================================================================ families
_RUNS: dict[str, Any] = {}


def family_run(family: str) -> Any:
    """The family's shared state (built on first use; the previous family's is dropped)."""
    if family not in _RUNS:
        _RUNS.clear()
        if family in ENCODERS:
            _RUNS[family] = EncoderRun(family, ENCODERS[family]())
        else:
            _RUNS[family] = DecoderRun(family, DECODERS[family]())
    return _RUNS[family]


def run_check(family: str, check: str, tmp: Any) -> Outcome:
    try:
        run = family_run(family)
    except Exception as exc:  # noqa: BLE001 - a builder that fails is reported, not raised
        return _crash(exc)
    if isinstance(run, EncoderRun):
        return run_encoder_check(run, check, tmp)
    return run_decoder_check(run, check, tmp)


def checks_of(family: str) -> tuple[str, ...]:
    return ENCODER_CHECKS if family in ENCODERS else DECODER_CHECKS
