"""`tokenreduce convert`: reduce a model and write a verified ONNX file or a TensorRT engine.

The output is checked before anything is loaded (`cli/files.py`: not an input file, the suffix of `--to`,
a writable folder). The ONNX export runs in a scratch folder beside the output, passes the static check
and the onnxruntime verification there, and only then moves into place; `--to tensorrt` adds the
TensorRT compatibility check and the engine build the same way. A decoder folder (`hf:` of a causal LM
or VLM) is handed to `cli/decoder.py`. Refuses: a setting that reduces nothing (`--method tome` without
`--r`, `--keep-ratio 1`); `--method none` exports the unreduced model on purpose.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenreduce.cli import decoder, files
from tokenreduce.cli.args import (
    SOURCES_HELP,
    add_common,
    add_model,
    add_settings,
    encoder_and_decoder_choices,
    load_source,
    non_negative_float,
    profile,
)
from tokenreduce.cli.methods import require_reduction, setting_name, settings_from_args
from tokenreduce.cli.ui import EXIT_OK, UI, Steps, fmt_flops, fmt_size, inputs_text
from tokenreduce.errors import TokenReduceError
from tokenreduce.util.files import atomic_path, scratch_folder

DEFAULT_BATCH = 2  # export and verify with more than one row (a batch of 1 can specialise the batch)

EPILOG = f"""\
examples:
  tokenreduce convert timm:vit_base_patch16_224 --method tome --r 13 -o vit_b_tome13.onnx
  tokenreduce convert timm:vit_small_patch16_224 --checkpoint vit_s.pth --method tome --r 13 -o vit_s.onnx
  tokenreduce convert timm:vit_base_patch16_224 --method evit --keep-ratio 0.7 --layers 3,6,9 -o vit_b_evit.onnx
  tokenreduce convert hf:./all-MiniLM-L6-v2 --method tome --r 4 --seq-len 128 --batch 4 -o minilm.onnx
  tokenreduce convert mymodels:build --method tome --r 8 --to tensorrt --fp16 -o vit.engine --keep-onnx
  tokenreduce convert timm:vit_base_patch16_224 --method tome --r 13 -o vit.onnx --json > convert.json
  tokenreduce convert hf:./all-MiniLM-L6-v2 --method tome --r 3 --seq-len 32 --precision int8 -o minilm_int8.onnx
  tokenreduce convert timm:vit_small_patch16_224 --method tome --r 8 --precision int8 --calib imgs/ -o vit_int8.onnx
  tokenreduce convert timm:vit_small_patch16_224 --method tome --r 8 --precision fp16 -o vit_fp16.onnx
  tokenreduce convert diffusers:./sd-pipeline --method tomesd --ratio 0.5 --fused-attention -o unet_tomesd.onnx

The ONNX file has a dynamic batch dimension and every other dimension static. It is written only after
the static check and the onnxruntime verification pass (max abs diff <= --atol); --no-verify skips the
verification. --to tensorrt exports and verifies the ONNX, runs the TensorRT compatibility check, then
builds the engine (needs the `tensorrt` package and a CUDA GPU). OUT must end in .onnx (--to onnx) or
.engine (--to tensorrt) and must not be an input file; its folder is checked for writing before the model
is loaded. An interrupted run (Ctrl-C, SIGTERM) leaves no file behind.

--precision fp16|int8 (ONNX only): the fp32 export is checked and verified first, then converted with the
plan subgraph (the ranking, comparisons and index math) kept in fp32 and unquantized. fp16 keeps fp32
inputs/outputs. int8 is dynamic for models with integer inputs (text) and static for image inputs, with
calibration images (or .npy arrays) from --calib DIR. The converted file is verified against the
unreduced model converted the same way: the reduction may not move the output further from the unreduced
model than in fp32 beyond a per-precision slack; the rule and the numbers are printed.

--fused-attention (ONNX, fp32): each attention without mask or dropout is written as onnxruntime's fused
com.microsoft.MultiHeadAttention instead of MatMul-Softmax-MatMul, so no [B, heads, N, N] score tensor is
materialised (a 1024-px SD UNet's finest level: 8.6 GB per call otherwise). The file then runs only in
onnxruntime. The attentions left unfused are listed with the reason.

{SOURCES_HELP}"""


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    from tokenreduce import targets

    artefacts = targets.names(targets.ARTEFACT)
    p: argparse.ArgumentParser = sub.add_parser(
        "convert", formatter_class=fmt, epilog=EPILOG,
        help="reduce a model and write a verified ONNX file or a TensorRT engine",
        description="Reduce MODEL's tokens, export it, verify the export, write the artefact,\n"
                    "and print the per-block report and the verification result.")
    add_model(p, batch_list=False)
    add_settings(p, choices=encoder_and_decoder_choices(baseline=True), default="tome")
    g = p.add_argument_group("artefact")
    g.add_argument("--to", choices=artefacts, default="onnx", help="artefact type (default: onnx)")
    g.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="file to write: " + ", ".join(f"{files.suffix_of(t)} for {t}" for t in artefacts))
    g.add_argument("--no-verify", action="store_true",
                   help="skip the onnxruntime verification (the static check still runs)")
    g.add_argument("--atol", type=non_negative_float, default=1e-4,
                   help="largest max abs difference onnxruntime vs the reduced model (default: 1e-4)")
    g.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="onnx: precision of the written file (default: fp32); the plan subgraph stays fp32")
    g.add_argument("--calib", dest="calibration", metavar="DIR", default=None,
                   help="onnx --precision int8: folder of calibration images or .npy arrays (static int8; "
                        "needed for image inputs)")
    g.add_argument("--fused-attention", action="store_true",
                   help="onnx, fp32: write attention as onnxruntime's fused MultiHeadAttention (no N x N score "
                        "tensor; the file then needs onnxruntime)")
    g.add_argument("--plan", metavar="FILE", default=None,
                   help="a plan file from `tokenreduce tune` (it fixes the method and its options: give neither "
                        "--method nor the method's flags beside it)")
    g.add_argument("--keep-onnx", action="store_true",
                   help="tensorrt: also keep the verified ONNX file next to OUT (OUT with suffix .onnx)")
    g.add_argument("--fp16", action="store_true", help="tensorrt: build an fp16 engine")
    g.add_argument("--profile-batch", type=profile, default=(1, 8, 32), metavar="MIN,OPT,MAX",
                   help="tensorrt: batch sizes of the optimisation profile (default: 1,8,32)")
    g.add_argument("--workspace-gb", type=float, default=4.0, metavar="GB",
                   help="tensorrt: builder workspace (default: 4)")
    add_common(p)
    return p


def input_files(args: argparse.Namespace) -> list[Path]:
    """Files the command reads: the model file (.pt2), the checkpoint, the prompt file."""
    paths = [Path(args.model)]
    if args.checkpoint:
        paths.append(Path(args.checkpoint))
    if args.prompt and args.prompt.startswith("@"):
        paths.append(Path(args.prompt[1:]))
    return paths


def run(args: argparse.Namespace, ui: UI) -> int:
    import torch

    import tokenreduce

    out = Path(args.output)
    onnx_out = out.with_suffix(".onnx")
    files.check_output(out, args.to, input_files(args),
                       extra_outputs=[onnx_out] if args.to == "tensorrt" and args.keep_onnx else [])
    check_precision_args(args)
    if (folder := decoder.route(args)) is not None:
        if args.precision != "fp32":
            raise TokenReduceError(f"--precision {args.precision} is not supported for decoder prefill exports; "
                                   f"convert them in fp32", setting="precision", hint="precision='fp32'")
        if args.fused_attention:
            raise TokenReduceError("--fused-attention is not supported for decoder prefill exports (their causal, "
                                   "masked attention is not what it fuses)", setting="fused_attention")
        return decoder.convert(args, ui, folder)
    opts = plan_settings(args) if args.plan else None
    if opts is None:
        require_reduction(args)
        opts = settings_from_args(args)
    total = 4 + (2 if args.to == "tensorrt" else 0)
    with ui.steps(total, "loading model") as steps:
        with steps.stage(f"loading {args.model}"):
            src = load_source(args, args.batch, default_batch=DEFAULT_BATCH)
        with steps.stage("capturing, reducing, counting FLOPs"), torch.no_grad():
            red = tokenreduce.compile(src.model, src.example_args, src.example_kwargs, inner="eager", **opts)
            unreduced = None
            if args.precision != "fp32" and not args.no_verify:  # the same-precision reference
                unreduced = tokenreduce.compile(src.model, src.example_args, src.example_kwargs, inner="eager",
                                                method="none", count_model_flops=False,
                                                dynamic_batch=opts.get("dynamic_batch", True))
        if args.to == "onnx":
            with atomic_path(out) as staged:
                exported = export_verified_onnx(red, staged, verify=not args.no_verify, atol=args.atol, steps=steps,
                                                precision=args.precision, calibration=args.calibration,
                                                unreduced=unreduced, fused_attention=args.fused_attention)
            exported.export.path = out
            trt: dict[str, Any] | None = None
        else:
            exported, trt = convert_tensorrt(red, out, onnx_out, args, steps)
    report = red.report
    if ui.json_mode:
        ui.emit_json({
            "command": "convert", "model": src.description, "inputs": src.input_shapes(), "target": args.to,
            "output": str(out), "settings": opts, "report": report.to_dict(),
            "onnx": onnx_dict(exported, args, kept=args.to == "onnx" or args.keep_onnx), "tensorrt": trt,
        })
        return EXIT_OK
    ui.print(f"model: {src.description}; inputs: {inputs_text(src.input_shapes())}")
    ui.print(report_table(report, f"tokenreduce: {setting_name(report.settings)}"))
    protected = f"protected tokens: {report.num_protected} ({report.protected_reason})"
    ui.print(protected)
    if report.flops_before and report.flops_after is not None and (ratio := report.flops_ratio):
        ui.print(f"FLOPs: {fmt_flops(report.flops_before)} -> {fmt_flops(report.flops_after)} "
                 f"(ratio {ratio:.3f}, {1 / ratio:.2f}x fewer)")
    elif report.flops_unavailable:
        ui.print(f"FLOPs unavailable: {report.flops_unavailable}")
    print_verification(ui, exported, args)
    if args.to == "onnx":
        ui.print(f"wrote {out} ({fmt_size(out)}, {batch_text(exported)})", style="bold")
    else:
        if args.keep_onnx:
            ui.print(f"kept the verified ONNX at {onnx_out} ({fmt_size(onnx_out)})")
        ui.print("TensorRT compatibility check: OK", style="green")
        ui.print(f"wrote {out} ({fmt_size(out)}, TensorRT engine, batch profile {args.profile_batch})", style="bold")
    return EXIT_OK


def report_table(report: Any, title: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, just in (("#", "right"), ("block", "left"), ("tokens", "right"), ("action", "left"), ("note", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for b in report.blocks:
        tokens = f"{b.tokens_in} -> {b.tokens_out}" if b.tokens_out != b.tokens_in else str(b.tokens_in)
        table.add_row(str(b.index), b.name, tokens, b.action, b.reason)
    return table


# ============================================================================================ ONNX
@dataclass
class WrittenOnnx:
    """An exported ONNX file and the batch dimension each of its inputs ended up with."""

    export: Any  # tokenreduce.targets.onnx.OnnxExport
    batch_dims: list[int | str]

    @property
    def dynamic_batch(self) -> bool:
        """True when the inputs that carry the batch have a symbolic first dimension. Inputs that do not carry it
        keep a fixed one (tomesd's `tomesd_draws`, Flux's position ids), so one symbolic input is enough."""
        return any(isinstance(d, str) for d in self.batch_dims)


def batch_dims(path: Path) -> list[int | str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims: list[int | str] = []
    for inp in model.graph.input:
        shape = inp.type.tensor_type.shape.dim
        if shape:
            dims.append(shape[0].dim_param or shape[0].dim_value)
    return dims


def check_precision_args(args: argparse.Namespace) -> None:
    """Refuse precision options the chosen artefact cannot honour (before the model is loaded)."""
    if args.precision != "fp32" and args.to != "onnx":
        raise TokenReduceError(f"--precision {args.precision} applies to --to onnx; for a TensorRT engine use --fp16 "
                               f"(int8 engines are not built here)", setting="precision",
                               hint="precision='fp32' or fp16=True")
    if args.calibration is not None and args.precision != "int8":
        raise TokenReduceError("--calib DIR is the calibration data of --precision int8", setting="calibration",
                               hint="precision='int8'")
    if args.fused_attention and (args.to != "onnx" or args.precision != "fp32"):
        raise TokenReduceError("--fused-attention writes onnxruntime's fp32 MultiHeadAttention: it applies to --to onnx "
                               "with --precision fp32 (TensorRT fuses attention itself)", setting="fused_attention")


def export_verified_onnx(red: Any, staged: Path, *, verify: bool, atol: float, steps: Steps, precision: str = "fp32",
                         calibration: str | None = None, unreduced: Any = None,
                         fused_attention: bool = False) -> WrittenOnnx:
    """Export to `staged` (a path in a scratch folder, moved into place by the caller) and verify it there.
    Export and verification are separate progress stages; `export_onnx` still runs the static check.
    fp16/int8: export, conversion and verification run as one stage (`export_onnx` does all three)."""
    from tokenreduce.targets.onnx import export_onnx, verify_onnx

    if precision != "fp32":
        with steps.stage(f"exporting ONNX, converting to {precision}, verifying in onnxruntime"):
            result = export_onnx(red, staged, verify=verify, atol=atol, precision=precision, calibration=calibration,
                                 unreduced=unreduced)
        steps.advance()
        return WrittenOnnx(result, batch_dims(staged))
    with steps.stage("exporting ONNX (dynamo exporter + static check)"):
        result = export_onnx(red, staged, verify=False, atol=atol, fused_attention=fused_attention)
    if verify:
        with steps.stage("verifying in onnxruntime"):
            result.max_abs_diff = verify_onnx(staged, red, red.example_args, red.example_kwargs, atol=atol)
            result.verified = True
    else:
        steps.advance()
    return WrittenOnnx(result, batch_dims(staged))


def batch_text(written: WrittenOnnx) -> str:
    if written.dynamic_batch:
        return "dynamic batch"
    return f"static batch {written.batch_dims[0] if written.batch_dims else '?'}: runs only at that batch size"


def onnx_dict(written: WrittenOnnx, args: argparse.Namespace, kept: bool) -> dict[str, Any]:
    exported = written.export
    return {
        "path": str(exported.path) if kept else None,
        "verified": exported.verified,
        "max_abs_diff": exported.max_abs_diff,
        "atol": args.atol,
        "dynamic_batch": written.dynamic_batch,
        "batch_dims": written.batch_dims,
        "problems": exported.problems,
        "external_data": exported.external_data,
        "inputs": exported.input_names,
        "outputs": exported.output_names,
        "op_counts": exported.op_counts,
        "precision": exported.precision,
        "quantization": exported.quantization or None,
        "fp32_max_abs_diff": exported.fp32_max_abs_diff,
        "tolerance": exported.tolerance.describe() if exported.tolerance else None,
        "fused_attention": exported.fused_attention,
        "unfused_attention": exported.unfused_attention,
    }


def print_verification(ui: UI, written: WrittenOnnx, args: argparse.Namespace) -> None:
    exported = written.export
    ui.print("ONNX static check: OK (every dimension static except the batch; export-safe ops)", style="green")
    if exported.precision != "fp32":
        ui.print(f"precision: {exported.quantization}")
        if exported.fp32_max_abs_diff is not None:
            ui.print(f"fp32 export before conversion: max abs diff {exported.fp32_max_abs_diff:.3g} <= atol {args.atol:g}: "
                     "OK", style="green")
        if exported.verified and exported.tolerance is not None:
            ui.print(f"verification ({exported.tolerance.describe()}): OK", style="green")
        else:
            ui.print("verification: skipped (--no-verify)", style="yellow")
        return
    if args.fused_attention:
        ui.print(f"fused attention: {exported.fused_attention} attention node(s) written as onnxruntime's "
                 f"MultiHeadAttention" + (f"; {len(exported.unfused_attention)} left unfused:" if
                                          exported.unfused_attention else ""))
        for why in exported.unfused_attention:
            ui.print(f"  {why}")
    if exported.verified:
        ui.print(f"verification (onnxruntime vs reduced model): max abs diff {exported.max_abs_diff:.3g} "
                 f"<= atol {args.atol:g}: OK", style="green")
    else:
        ui.print("verification: skipped (--no-verify)", style="yellow")


# ============================================================================================ TensorRT
def convert_tensorrt(red: Any, out: Path, onnx_out: Path, args: argparse.Namespace, steps: Steps
                     ) -> tuple[WrittenOnnx, dict[str, Any]]:
    """ONNX (exported and verified) -> TensorRT compatibility check -> engine. With --keep-onnx the verified
    ONNX moves next to OUT as soon as it is verified; otherwise it lives in a scratch folder that is removed
    on any exit. The engine file appears only when complete."""
    from tokenreduce.targets.tensorrt import build_engine, check_tensorrt

    with contextlib.ExitStack() as scratch:
        if args.keep_onnx:
            with atomic_path(onnx_out) as staged:
                exported = export_verified_onnx(red, staged, verify=not args.no_verify, atol=args.atol, steps=steps)
            onnx_path = onnx_out
        else:
            folder = scratch.enter_context(scratch_folder(out.parent))
            onnx_path = folder / onnx_out.name
            exported = export_verified_onnx(red, onnx_path, verify=not args.no_verify, atol=args.atol, steps=steps)
        exported.export.path = onnx_path
        with steps.stage("checking TensorRT compatibility"):
            issues = check_tensorrt(onnx_path)
        if issues:
            kept = f"; the verified ONNX is at {onnx_path}" if args.keep_onnx else ""
            raise TokenReduceError(f"the ONNX model is not TensorRT-compatible: {issues[0]}"
                                   + (f" (+{len(issues) - 1} more; `tokenreduce inspect` lists them)"
                                      if len(issues) > 1 else "") + kept)
        with steps.stage("building TensorRT engine"):
            try:
                with atomic_path(out) as staged:
                    build_engine(onnx_path, staged, fp16=args.fp16, batch=args.profile_batch,
                                 workspace_gb=args.workspace_gb)
            except TokenReduceError as exc:
                kept = (f"; kept the verified ONNX at {onnx_path}" if args.keep_onnx
                        else "; the ONNX export passed verification and the TensorRT compatibility check "
                             "(--keep-onnx keeps it)")
                raise TokenReduceError(f"cannot build the TensorRT engine: {exc}{kept}") from exc
    return exported, {"compatible": True, "issues": [], "engine": str(out), "fp16": args.fp16,
                      "profile_batch": list(args.profile_batch)}


def plan_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`tokenreduce.compile` keywords for `--plan FILE`: the plan, plus only the settings a plan leaves open
    (`methods.plan.OVERRIDABLE`). The method's own flags beside a plan are an error, not silently dropped."""
    from tokenreduce.methods.plan import OVERRIDABLE

    given = settings_from_args(args, strict=False)
    extra = sorted(k for k in given if k != "method" and k not in OVERRIDABLE)
    if extra:
        raise TokenReduceError(f"--plan fixes the method and its options; drop --{extra[0].replace('_', '-')}",
                               setting=extra[0])
    return {"plan": args.plan, **{k: given[k] for k in OVERRIDABLE if k in given}}
