"""`tokenreduce inspect`: what tokenreduce finds in a model and what each method would do, or check an ONNX file.

For a model: the transformer blocks (layout, tokens, attention spelling, reducible or why not), the
protected tokens, each method's plan per block (`cli/methods.py` says which methods and with which
defaults) and the FLOPs of each, counted on rewritten copies of one captured graph. A setting the user
asked for that is impossible is an error; a default that does not apply is shown as not applicable.

For a decoder LLM / VLM (an `hf:` folder, `cli/decoder.py`): every attention block of the captured prefill,
each either a decoder block a method can prune from or not, with the analysis' reason (a VLM's vision
tower, a block the analysis cannot follow), then each decoder method's stages and tokens per block. A
model whose analysis finds no decoder block is an error that names why.

For an `.onnx` file: inputs, outputs, op counts, the static check and the TensorRT compatibility check.
Refuses: a file that does not parse, and one with no graph, no opset import or no outputs (an empty or
truncated copy), which is an error exit even without `--strict` (a CI gate must not pass it).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from tokenreduce.cli import decoder
from tokenreduce.cli.args import (
    SOURCES_HELP,
    add_common,
    add_model,
    add_settings,
    encoder_and_decoder_choices,
    load_source,
)
from tokenreduce.cli.methods import inspect_methods, inspect_setting, setting_name, settings_from_args
from tokenreduce.cli.ui import EXIT_ERROR, EXIT_OK, UI, fmt_float, fmt_flops, inputs_text
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods.tome import Tome

EPILOG = f"""\
examples:
  tokenreduce inspect timm:vit_base_patch16_224                  # ToMe at r=13, EViT at keep 0.7
  tokenreduce inspect timm:vit_base_patch16_224 --r 16 --keep-ratio 0.5 --layers 2,5,8
  tokenreduce inspect hf:./all-MiniLM-L6-v2 --seq-len 64 --method tome --r 4
  tokenreduce inspect vit_b_tome13.onnx                          # static + TensorRT compatibility check
  tokenreduce inspect vit_b_tome13.onnx --strict                 # exit status 1 when a check fails

For a model: the transformer blocks found (layout, tokens, attention spelling, reducible or why not), the
protected tokens, what each encoder method would do per block, and the FLOPs of each. Without --r, ToMe is shown
at r={Tome.INSPECT_R} or the model's largest valid constant r if that is smaller. An ONNX file with no graph,
no opset or no outputs is an error.

{SOURCES_HELP}"""


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "inspect", formatter_class=fmt, epilog=EPILOG,
        help="show blocks, protected tokens, what each method would do, FLOPs; or check an ONNX file",
        description="Show what tokenreduce finds in MODEL and what each method would do to it,\n"
                    "or run the static and TensorRT compatibility checks on an ONNX file.")
    add_model(p, batch_list=False, onnx_ok=True)
    add_settings(p, choices=encoder_and_decoder_choices(baseline=False), default=None,
                 method_text="show only this method (default: every encoder method; for a decoder LLM/VLM "
                             "every decoder method)",
                 r_text=f"ToMe merges per block: one int or a per-block list (default: {Tome.INSPECT_R}, "
                        "capped at the largest valid r)")
    g = p.add_argument_group("ONNX files")
    g.add_argument("--strict", action="store_true", help="exit with status 1 when an ONNX check finds problems")
    add_common(p)
    return p


def run(args: argparse.Namespace, ui: UI) -> int:
    if args.model.endswith(".onnx"):
        return inspect_onnx(args, ui)
    if (folder := decoder.route(args)) is not None:
        return inspect_decoder(args, ui, folder)
    return inspect_model(args, ui)


# ============================================================================================ models
def check_layers(layers: list[int], num_blocks: int) -> None:
    """Layers asked for explicitly must exist, whichever method is shown."""
    bad = [i for i in layers if not 0 <= i < num_blocks]
    if bad:
        raise TokenReduceError(f"layer(s) {bad} out of range: the model has {num_blocks} transformer blocks "
                               f"(valid layers 0..{num_blocks - 1})", setting="layers")


def inspect_model(args: argparse.Namespace, ui: UI) -> int:
    from tokenreduce.analysis.encoder import analyse
    from tokenreduce.compiler.capture import export_graph
    from tokenreduce.compiler.report import count_flops
    from tokenreduce.methods import tome

    methods = inspect_methods(args, "encoder")
    with ui.steps(3 + len(methods), "loading model") as steps:
        with steps.stage(f"loading {args.model}"):
            src = load_source(args, args.batch)
        with steps.stage("capturing the graph (torch.export) and analysing"):
            captured = export_graph(src.model, src.example_args, src.example_kwargs,
                                    dynamic_batch=args.dynamic_batch is not False)
            analysis = analyse(captured.gm, args.protected_tokens)
        if args.layers is not None:
            check_layers(args.layers, len(analysis.blocks))
        largest_r = tome.largest_constant_r(
            next((b.num_tokens for b in analysis.blocks if b.reducible), 0), analysis.num_protected,
            [b.reducible and (args.layers is None or b.index in args.layers) for b in analysis.blocks])
        with steps.stage("counting FLOPs of the unreduced model"):
            flops_before = count_flops(captured.gm, captured.args, captured.kwargs)
        results: dict[str, dict[str, Any]] = {}
        for method in methods:
            opts, note, explicit = inspect_setting(method, args, analysis)
            with steps.stage(f"planning {setting_name(opts)} and counting FLOPs"):
                results[method] = plan_method(opts, captured, flops_before, note, explicit)
    blocks = [{
        "index": b.index, "name": b.name, "layout": b.layout, "tokens": b.num_tokens,
        "attention": b.attention.spelling, "reducible": b.reducible, "skip_reason": b.skip_reason,
    } for b in analysis.blocks]
    payload = {
        "command": "inspect", "model": src.description, "inputs": src.input_shapes(),
        "dynamic_batch": captured.dynamic_batch, "text_model": analysis.text_model, "blocks": blocks,
        "protected_tokens": {"count": analysis.num_protected, "reason": analysis.protected_reason},
        "largest_constant_r": largest_r, "flops": flops_before, "methods": results,
    }
    if ui.json_mode:
        ui.emit_json(payload)
        return EXIT_OK
    print_inspect(ui, payload)
    return EXIT_OK


def plan_method(opts: dict[str, Any], captured: Any, flops_before: int, note: str, explicit: bool) -> dict[str, Any]:
    """Plan and apply one setting on a copy of the captured graph and count its FLOPs (no re-export). An
    impossible setting the user asked for is an error; a default that does not apply is reported."""
    import torch

    from tokenreduce import Settings
    from tokenreduce.compiler.pipeline import reduce_graph
    from tokenreduce.compiler.report import count_flops

    entry: dict[str, Any] = {"setting": setting_name(opts), "settings": opts, "note": note}
    try:
        with torch.no_grad():
            red = reduce_graph(copy.deepcopy(captured.gm), Settings.from_options(opts))
    except TokenReduceError as exc:
        if explicit:
            raise
        entry.update(applicable=False, error=str(exc), blocks=[], tokens_out=None, flops=None, flops_ratio=None)
        return entry
    with torch.no_grad():
        flops = count_flops(red.gm, captured.args, captured.kwargs)
    plans = red.plans
    entry.update(
        applicable=True,
        blocks=[{"index": p.index, "name": p.name, "tokens_in": p.tokens_in, "tokens_out": p.tokens_out, "action": p.action,
                 "r": p.r, "keep": p.keep, "reason": p.reason} for p in plans],
        tokens_out=plans[-1].tokens_out if plans else None,
        flops=flops,
        flops_ratio=flops / flops_before if flops_before else float("nan"),
    )
    return entry


def print_inspect(ui: UI, payload: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    ui.print(f"model: {payload['model']}; inputs: {inputs_text(payload['inputs'])}; "
             f"dynamic batch: {'yes' if payload['dynamic_batch'] else 'no'}"
             + ("; text model" if payload["text_model"] else ""))
    methods = payload["methods"]
    n0 = next((b["tokens"] for b in payload["blocks"] if b["reducible"]), 0)
    # per-block columns only for the methods that move tokens here; the rest (not applicable, or no token
    # moves such as TempScale) are in the summary below, with the reason
    moving = [m for m in methods.values() if m["applicable"] and m["tokens_out"] != n0]
    table = Table(title=f"{len(payload['blocks'])} transformer blocks", title_justify="left")
    for col, just in (("#", "right"), ("block", "left"), ("layout", "left"), ("tokens (unreduced)", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    table.add_column("attention", justify="left", min_width=len("F.scaled_dot_product_attention"))
    table.add_column("status", justify="left")
    row_names = {b["name"] for b in payload["blocks"]}
    by_name = {m["setting"]: any(p.get("name") in row_names for p in m["blocks"]) for m in moving}
    for m in moving:
        table.add_column(m["setting"], justify="right")
    for b in payload["blocks"]:
        status = (Text("reducible", style="green") if b["reducible"]
                  else Text(f"skip: {b['skip_reason']}", style="yellow"))
        cells: list[Any] = [str(b["index"]), b["name"], b["layout"], str(b["tokens"]), b["attention"], status]
        for m in moving:
            cells.append(plan_cell(m, b, by_name[m["setting"]]))
        table.add_row(*cells)
    ui.print(table)
    p = payload["protected_tokens"]
    ui.print(f"protected tokens: {p['count']} ({p['reason']})")
    ui.print(f"largest valid constant ToMe r: {payload['largest_constant_r']}")
    summary = Table(title="what each method would do", title_justify="left")
    for col, just in (("method", "left"), ("tokens", "right"), ("FLOPs", "right"), ("FLOPs ratio", "right"),
                      ("note", "left")):
        summary.add_column(col, justify=just)  # type: ignore[arg-type]
    summary.add_row("unreduced", str(n0), fmt_flops(payload["flops"]), "1.000", "")
    for m in methods.values():
        if not m["applicable"]:
            summary.add_row(m["setting"], "-", "-", "-", Text(f"not applicable: {m['error']}", style="yellow"))
            continue
        summary.add_row(m["setting"], f"{n0} -> {m['tokens_out']}", fmt_flops(m["flops"]), fmt_float(m["flops_ratio"]),
                        m["note"])
    ui.print(summary)


def plan_cell(method: dict[str, Any], block: dict[str, Any], by_name: bool) -> Any:
    """The method's plan for one row of the block table: matched by block name when the method's plans are
    named like the rows (a denoiser's plans count transformer blocks while its rows are attentions, self and
    cross, so an index would land on the wrong row), else by index."""
    from rich.text import Text

    if not method["applicable"]:
        return "-"
    key, value = ("name", block["name"]) if by_name else ("index", block["index"])
    bp = next((b for b in method["blocks"] if b.get(key) == value), None)
    if bp is None:
        return "-"
    if bp["tokens_out"] != bp["tokens_in"]:
        return f"{bp['tokens_in']} -> {bp['tokens_out']}"
    return Text(bp["reason"], style="yellow") if bp["reason"] else "-"


# ============================================================================================ decoders
def decoder_blocks(p: decoder.DecoderPrompt) -> list[dict[str, Any]]:
    """Every attention block of the prefill graph: the decoder blocks (prunable) and the others with the
    analysis' reason. Captured once through `reduce_decoder(model, "none")`, which prunes nothing."""
    import tokenreduce

    dec = tokenreduce.reduce_decoder(p.model, "none")
    dec.prefill(p.input_ids, None, p.span, **p.extra)
    rep = dec.report
    assert rep is not None
    rows: list[dict[str, Any]] = [{"index": None, "name": name, "tokens": None, "reducible": False, "skip_reason": why}
            for name, why in rep.skipped]
    rows += [{"index": b.index, "name": b.name, "tokens": b.tokens_in, "reducible": True, "skip_reason": None}
             for b in rep.blocks]
    return rows


def inspect_decoder(args: argparse.Namespace, ui: UI, folder: Path) -> int:
    import tokenreduce

    methods = inspect_methods(args, "decoder")
    results: list[dict[str, Any]] = []
    with ui.steps(2 + len(methods), "loading model") as steps:
        with steps.stage(f"loading {args.model}"):
            p = decoder.load(args, folder, args.batch or 1)
        with steps.stage("capturing the prefill and finding its blocks"):
            blocks = decoder_blocks(p)
        for method in methods:
            explicit = args.method is not None
            with steps.stage(f"{method}: capturing, pruning, counting FLOPs"):
                try:
                    dec = tokenreduce.reduce_decoder(p.model, method, count_model_flops=True,
                                                     **settings_from_args(args, method, strict=explicit))
                    dec.prefill(p.input_ids, None, p.span, **p.extra)
                except TokenReduceError as exc:
                    if explicit:
                        raise
                    results.append({"method": method, "applicable": False, "error": str(exc)})
                    continue
                results.append({**decoder.summary(dec), "applicable": True})
    payload = {"command": "inspect", "model": p.description, "decoder": True, "span": p.span_text,
               "inputs": {"input_ids": list(p.input_ids.shape), **{k: list(v.shape) for k, v in p.extra.items()}},
               "blocks": blocks, "methods": results}
    if ui.json_mode:
        ui.emit_json(payload)
        return EXIT_OK
    print_decoder(ui, payload)
    return EXIT_OK


def print_decoder(ui: UI, payload: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    ui.print(f"model: {payload['model']}")
    ui.print(f"span (droppable): {payload['span']}; everything else is kept")
    blocks = payload["blocks"]
    n_dec = sum(b["reducible"] for b in blocks)
    table = Table(title=f"{len(blocks)} attention blocks, {n_dec} decoder blocks", title_justify="left")
    for col, just in (("#", "right"), ("block", "left"), ("tokens", "right"), ("status", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for b in blocks:
        status = (Text("decoder block (prunable)", style="green") if b["reducible"]
                  else Text(f"skip: {b['skip_reason']}", style="yellow"))
        table.add_row("-" if b["index"] is None else str(b["index"]), b["name"],
                      "-" if b["tokens"] is None else str(b["tokens"]), status)
    ui.print(table)
    for r in payload["methods"]:
        ui.print("")
        if not r["applicable"]:
            ui.print(Text(f"{r['method']}: not applicable: {r['error']}", style="yellow"))
            continue
        opts = " ".join(f"{k}={v}" for k, v in r["settings"].items())
        ui.print(f"{r['method']} {opts}: {r['span_tokens']} of {r['prompt_tokens']} prompt tokens in the span")
        for s in r["stages"]:
            ui.print(f"  rank with block {s['score_block']}'s last-query attention; from block "
                     f"{s['first_reduced_block']} keep {s['keep']} span tokens")
        ui.print(f"  tokens per block: {decoder.blocks_text(r['tokens_per_block'])}")
        if r["flops_ratio"] is not None:
            ui.print(f"  prefill FLOPs: {r['flops_before'] / 1e9:.2f} G -> {r['flops_after'] / 1e9:.2f} G "
                     f"(x{r['flops_ratio']:.3f}, {1 / r['flops_ratio']:.2f}x fewer)")


# ============================================================================================ ONNX files
def inspect_onnx(args: argparse.Namespace, ui: UI) -> int:
    path = Path(args.model)
    if not path.is_file():
        raise TokenReduceError(f"no such file: {args.model}")
    try:
        import onnx
    except ImportError as exc:
        raise TokenReduceError("inspecting ONNX files needs the `onnx` package (pip install onnx)") from exc
    from tokenreduce.targets.onnx import check_static, model_problems
    from tokenreduce.targets.tensorrt import check_tensorrt, tensorrt_available

    with ui.steps(3, "loading") as steps:
        with steps.stage(f"loading {path}"):
            try:
                model = onnx.load(str(path))
            except Exception as exc:  # noqa: BLE001
                raise TokenReduceError(f"{path} is not a readable ONNX model: {exc}".split("\n")[0]) from exc
            invalid = model_problems(model)  # onnx.load accepts an empty file
            if invalid:
                raise TokenReduceError(f"{path} is not a valid ONNX model: {'; '.join(invalid)}")
        with steps.stage("static shape check"):
            static = check_static(model)
        with steps.stage("TensorRT compatibility check"):
            issues = check_tensorrt(model)
    trt_ok, trt_why = tensorrt_available()

    def io(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
            out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(tt.elem_type).lower(), "shape": dims})
        return out

    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    payload = {
        "command": "inspect", "file": str(path), "opset": [{"domain": o.domain or "ai.onnx", "version": o.version}
                                                          for o in model.opset_import],
        "inputs": io(model.graph.input), "outputs": io(model.graph.output), "nodes": len(model.graph.node),
        "op_counts": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "static_check": {"ok": not static, "problems": static},
        "tensorrt_check": {"ok": not issues, "issues": [{"node": i.node, "op": i.op, "reason": i.reason}
                                                        for i in issues]},
        "tensorrt_here": {"available": trt_ok, "detail": trt_why},
    }
    failed = bool(static or issues)
    if ui.json_mode:
        ui.emit_json(payload)
    else:
        print_onnx(ui, payload)
    return EXIT_ERROR if failed and args.strict else EXIT_OK


def print_onnx(ui: UI, payload: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    opsets = ", ".join(f"{o['domain']} {o['version']}" for o in payload["opset"])
    ui.print(f"{payload['file']}: {payload['nodes']} nodes, opset {opsets}")
    table = Table(title="inputs and outputs", title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        table.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in payload[kind]:
            table.add_row(kind[:-1], v["name"], v["dtype"], "[" + ", ".join(map(str, v["shape"])) + "]")
    ui.print(table)
    ui.print("ops: " + ", ".join(f"{k} {v}" for k, v in payload["op_counts"].items()))
    static = payload["static_check"]
    if static["ok"]:
        ui.print("static check: OK (every dimension static except the batch; no data-dependent shapes, no "
                 "ScatterND, sum-only ScatterElements, constant TopK k)", style="green")
    else:
        ui.print(f"static check: {len(static['problems'])} problem(s)", style="red")
        for prob in static["problems"]:
            ui.print(f"  - {prob}")
    trt = payload["tensorrt_check"]
    if trt["ok"]:
        ui.print("TensorRT compatibility check: OK (every op supported by the TensorRT ONNX parser, constant TopK "
                 "k within 3840, no data-dependent shapes)", style="green")
    else:
        t = Table(title=f"TensorRT compatibility check: {len(trt['issues'])} issue(s)", title_justify="left")
        for col in ("node", "op", "reason"):
            t.add_column(col)
        for i in trt["issues"]:
            t.add_row(i["node"], i["op"], Text(i["reason"], style="red"))
        ui.print(t)
    here = payload["tensorrt_here"]
    ui.print(f"TensorRT on this machine: {'TensorRT ' + here['detail'] if here['available'] else here['detail']}")
