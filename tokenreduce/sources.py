"""Model sources for the command line: turn a MODEL string into a model plus example inputs.

The compiler needs an `nn.Module` and the inputs it is called with; a command line only has a string.
This module owns that translation, so every subcommand (convert, inspect, bench) accepts the same sources:

- `timm:NAME`: `timm.create_model(NAME, pretrained=False, **model_args)`, random init unless a local
  checkpoint is given (nothing is downloaded); inputs `[B, C, S, S]` at the model's configured size.
- `hf:PATH`: a local Hugging Face folder (offline: `HF_HUB_OFFLINE=1`), loaded with `AutoModel`; inputs
  from the config: `pixel_values [B, C, S, S]` for vision configs, `input_ids`/`attention_mask [B, L]`
  for text configs.
- `FILE.pt2`: a program saved with `torch.export.save`; inputs from its placeholders' shapes.
- `module:function`: a Python function returning `(model, example_inputs)` (a tuple or a dict).
- `diffusers:FOLDER`: a diffusion denoiser (a diffusers model or pipeline folder) with one denoiser call's
  inputs; `sources_diffusers.py` holds it.

Every failure (unknown name, missing file, import error, wrong return value) is a `TokenReduceError`
with a one-line message saying what was expected.

Code from a model source runs only when the user says so. `module:function` imports and calls the user's
code by definition. A `.pt2` archive can carry code too: torch's loader unpickles entries marked
`use_pickle` (and opaque constants, legacy weight files, example inputs that fail the safe loader) with
`weights_only=False`, evaluates symbolic-shape strings with `sympy.sympify` (which calls `eval`), `exec`s
the program's guard code, and loads AOTInductor shared libraries. `pt2_code_risks` reads the archive (a
zip) without loading anything, and `load_pt2` refuses a file with any such entry unless
`trust_pickle=True` (`--trust-pickle`).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import io
import json
import math
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from tokenreduce.errors import TokenReduceError
from tokenreduce.util.batch import batch_of

SOURCE_FORMS = "timm:NAME, hf:PATH, diffusers:FOLDER, FILE.pt2 or module:function"
_FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
DEFAULT_SEQ_LEN = 128

InputsFn = Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]]


@dataclass
class ModelSource:
    """A loaded model with example inputs, and a way to make inputs at another batch size."""

    spec: str
    kind: str  # "timm" | "hf" | "diffusers" | "pt2" | "function"
    model: torch.nn.Module
    example_args: tuple[Any, ...]
    example_kwargs: dict[str, Any]
    description: str
    notes: list[str] = field(default_factory=list)
    make_inputs: InputsFn | None = None

    @property
    def batch(self) -> int:
        return batch_of(self.example_args, self.example_kwargs) or 1

    def inputs(self, batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Example inputs at `batch` rows: generated fresh where the source knows how, else the example
        inputs tiled (or cut) along the batch dimension."""
        if self.make_inputs is not None:
            return self.make_inputs(batch)
        return rebatch(self.example_args, self.example_kwargs, batch)

    def input_shapes(self) -> dict[str, list[int]]:
        """Human/JSON summary of the example inputs: name (or position) -> shape."""
        out: dict[str, list[int]] = {}
        for i, a in enumerate(self.example_args):
            if isinstance(a, torch.Tensor):
                out[f"arg{i}"] = list(a.shape)
        for k, v in self.example_kwargs.items():
            if isinstance(v, torch.Tensor):
                out[k] = list(v.shape)
        return out


# ---------------------------------------------------------------------------------------------- helpers
def parse_model_args(items: Sequence[str] | None) -> dict[str, Any]:
    """`["img_size=64", "global_pool=avg"]` -> `{"img_size": 64, "global_pool": "avg"}` (Python literals
    where they parse, strings otherwise)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise TokenReduceError(f"--model-arg expects KEY=VALUE (e.g. img_size=64), got {item!r}")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def rebatch(args: tuple[Any, ...], kwargs: Mapping[str, Any], batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Tile (or cut) every tensor whose leading dimension is the example batch to `batch` rows."""
    old = batch_of(args, kwargs)
    if old is None or old == batch:
        return tuple(args), dict(kwargs)

    def fit(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == old:
            reps = math.ceil(batch / old)
            return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch].contiguous()
        return t

    new_args, new_kwargs = pytree.tree_map(fit, (tuple(args), dict(kwargs)))
    return tuple(new_args), dict(new_kwargs)


def _split(example_inputs: Any, where: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TokenReduceError(
        f"{where} returned example inputs of type {type(example_inputs).__name__}; expected a tuple of "
        "positional inputs or a dict of keyword inputs"
    )


def _brief(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters (state-dict errors run to pages)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- timm
def _timm_image_size(model: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for: the patch embedding's size (follows `img_size=`), else the
    pretrained config's input size."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    c, h, w = tuple(cfg.get("input_size", (3, 224, 224)))
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        h, w = int(size[0]), int(size[1])
    proj = getattr(pe, "proj", None)
    if isinstance(proj, torch.nn.Conv2d):
        c = proj.in_channels
    return int(c), int(h), int(w)


def _unknown_timm(name: str) -> TokenReduceError:
    import timm

    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else " (see timm.list_models())"
    return TokenReduceError(f"unknown timm model {name!r}{hint}")


def load_timm(name: str, *, checkpoint: str | None, model_args: dict[str, Any], batch: int,
              image_size: int | None, seed: int) -> ModelSource:
    try:
        import timm
    except ImportError as exc:
        raise TokenReduceError("timm: sources need the `timm` package (pip install timm)") from exc
    if not name:
        raise TokenReduceError("timm: needs a model name, e.g. timm:vit_base_patch16_224")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise TokenReduceError(f"checkpoint not found: {checkpoint}")
    kwargs = dict(model_args)
    if image_size is not None and "img_size" not in kwargs:
        kwargs["img_size"] = image_size
    _seeded(seed)
    try:
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc) or "img_size" in model_args:
                raise
            kwargs.pop("img_size")  # a model without an img_size argument: --image-size sets the input only
            model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:
        if str(exc).startswith("Unknown model"):
            raise _unknown_timm(name) from exc
        raise TokenReduceError(f"timm could not create {name!r}: {_brief(exc)}") from exc
    except TypeError as exc:
        raise TokenReduceError(f"timm could not create {name!r} with {model_args}: {_brief(exc)}") from exc
    weights = "random init"
    if checkpoint is not None:
        from timm.models import load_checkpoint

        try:
            load_checkpoint(model, checkpoint, strict=True)
        except Exception as exc:  # noqa: BLE001 - any loading failure is the user's file not matching
            raise TokenReduceError(f"could not load checkpoint {checkpoint} into {name}: {_brief(exc)}") from exc
        weights = f"weights from {checkpoint}"
    model.eval()
    c, h, w = _timm_image_size(model)
    if image_size is not None:
        h = w = image_size

    def make(b: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        g = torch.Generator().manual_seed(seed + 1)
        return (torch.randn(b, c, h, w, generator=g),), {}

    args, kw = make(batch)
    return ModelSource(f"timm:{name}", "timm", model, args, kw, f"timm:{name} ({weights})", make_inputs=make)


# ---------------------------------------------------------------------------------------------- Hugging Face
def load_hf(path_str: str, *, batch: int, image_size: int | None, seq_len: int | None, seed: int) -> ModelSource:
    if not path_str:
        raise TokenReduceError("hf: needs a local folder, e.g. hf:./all-MiniLM-L6-v2")
    path = Path(path_str).expanduser()
    if not path.exists():
        raise TokenReduceError(f"no such directory: {path_str} (hf: takes a local Hugging Face model folder)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise TokenReduceError(f"{path_str} is not a Hugging Face model folder (no config.json in it)")
    from tokenreduce.sources_diffusers import is_diffusers_folder

    if is_diffusers_folder(path):
        raise TokenReduceError(f"{path_str} is a diffusers folder, not a transformers one: use diffusers:{path_str}")
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the network, even for auxiliary files
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the CLI draws its own progress
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as exc:
        raise TokenReduceError("hf: sources need the `transformers` package (pip install transformers)") from exc
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise TokenReduceError(f"could not read {path / 'config.json'}: {_brief(exc)}") from exc
    if hasattr(config, "vision_config") and hasattr(config, "text_config"):
        raise TokenReduceError(
            f"{path_str} is a {type(config).__name__} (vision + text towers); tokenreduce reduces one encoder "
            "at a time: pass a module:function source that returns the tower you want"
        )
    _seeded(seed)
    has_weights = any((path / f).is_file() for f in _HF_WEIGHT_FILES)
    try:
        if has_weights:
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
            weights = f"weights from {path_str}"
        else:
            model = AutoModel.from_config(config)
            weights = "random init: no weights in the folder"
    except Exception as exc:  # noqa: BLE001
        raise TokenReduceError(f"transformers could not load {path_str}: {_brief(exc)}") from exc
    model.eval()
    kind_name = type(model).__name__

    if getattr(config, "image_size", None) is not None:
        size = image_size or config.image_size
        size = size[0] if isinstance(size, (tuple, list)) else int(size)
        channels = int(getattr(config, "num_channels", 3))

        def make(b: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
            g = torch.Generator().manual_seed(seed + 1)
            return (), {"pixel_values": torch.randn(b, channels, size, size, generator=g)}
    elif getattr(config, "vocab_size", None):
        length = seq_len or DEFAULT_SEQ_LEN
        limit = getattr(config, "max_position_embeddings", None)
        if limit and length > limit:
            raise TokenReduceError(f"--seq-len {length} is longer than the model's max_position_embeddings {limit}")
        vocab = int(config.vocab_size)

        def make(b: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
            g = torch.Generator().manual_seed(seed + 1)
            ids = torch.randint(min(5, vocab - 1), vocab, (b, length), generator=g)
            return (), {"input_ids": ids, "attention_mask": torch.ones(b, length, dtype=torch.long)}
    else:
        raise TokenReduceError(
            f"cannot build example inputs for {type(config).__name__}: the config has neither image_size "
            "(vision) nor vocab_size (text); use a module:function source"
        )
    args, kw = make(batch)
    return ModelSource(f"hf:{path_str}", "hf", model, args, kw, f"hf:{path_str} ({kind_name}, {weights})",
                       make_inputs=make)


# ---------------------------------------------------------------------------------------------- .pt2
# What torch.export.load reads without running code: tensors stored raw, JSON, and symbolic-shape strings
# that are plain sympy constructor calls (srepr form). Anything else in the archive can execute code.
_SYMPY_CALLS = frozenset("""Symbol Integer Rational Float Add Mul Pow Mod Max Min floor ceiling Abs sqrt Eq Ne Lt Le Gt
    Ge StrictLessThan StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not Piecewise ExprCondPair
    ITE BooleanTrue BooleanFalse true false oo zoo nan Infinity NegativeInfinity NaN Half One Zero NegativeOne
    FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv IntTrueDiv FloatTrueDiv LShift
    RShift IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat FloatPow
    PowByNatural Identity""".split())
_GUARD_NAMES = frozenset({"L", "math", "inf", "max", "min", "abs", "int", "float", "bool",
                          "IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless"})
_GUARD_ATTRS = frozenset({"size", "stride", "storage_offset", "dim", "numel", "shape", "floor", "ceil", "trunc",
                          "isnan", "isinf", "sqrt", "log", "log2", "exp", "pi", "fabs"})
_PLAIN_SYMBOL = re.compile(r"^[a-z]+\d+$")  # s0, u12: a new sympy Symbol
_OPERATORS = (ast.operator, ast.unaryop, ast.cmpop, ast.boolop, ast.expr_context, ast.Compare, ast.BoolOp,
              ast.UnaryOp, ast.Expression)


def _plain_sympy(expr: str) -> bool:
    """Whether `sympy.sympify(expr)` can only build an expression: calls of sympy constructors on numbers,
    symbols and such calls; strings only as a Symbol's name or a Float's digits (a string anywhere else
    would be parsed, i.e. evaluated, again)."""
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
                return False
            for i, arg in enumerate(node.args):
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    ok = (node.func.id == "Symbol" and re.fullmatch(r"[A-Za-z_]\w*", arg.value)) or (
                        node.func.id == "Float" and re.fullmatch(r"[-+0-9.eE]+", arg.value))
                    if i != 0 or not ok:
                        return False
            if any(kw.arg is None or not (isinstance(kw.value, ast.Constant) and not isinstance(kw.value.value, str))
                   for kw in node.keywords):
                return False
        elif isinstance(node, ast.Name):
            if node.id not in _SYMPY_CALLS and not _PLAIN_SYMBOL.match(node.id):
                return False
        elif isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                return False
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (str, int, float, bool)) and node.value is not None:
                return False
        elif not isinstance(node, (ast.keyword, *_OPERATORS)):
            return False
    return True


def _plain_guard(code: str) -> bool:
    """Whether a guard string (exec'd by `ExportedProgram.module()` inside a generated function, and put in
    a double-quoted message) is one expression over the inputs' sizes: `L['x'].size()[0] >= 2`."""
    if any(c in code for c in "\"\\\n\r"):
        return False
    try:
        tree = ast.parse(code, mode="eval")
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if node.id not in _GUARD_NAMES:
                return False
        elif isinstance(node, ast.Attribute):
            if node.attr not in _GUARD_ATTRS:
                return False
        elif isinstance(node, ast.Call):
            if node.keywords or not isinstance(node.func, (ast.Name, ast.Attribute)):
                return False
        elif isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow) and not (isinstance(node.right, ast.Constant) and node.right.value in range(65)):
                return False
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not re.fullmatch(r"[\w.]*", node.value):
                return False
        elif not isinstance(node, (ast.Subscript, ast.Slice, *_OPERATORS)):
            return False
    return True


def _json_values(obj: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key` anywhere in a parsed JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from _json_values(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _json_values(v, key)


def pt2_code_risks(path: str | os.PathLike[str]) -> list[str]:
    """What in a `torch.export.save` archive would run code when `torch.export.load` reads it, found by
    reading the zip without loading anything ([]: nothing; the file may still fail to load)."""
    from torch.export.pt2_archive import constants as c

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise TokenReduceError(f"{path} is not a torch.export archive (not a readable zip file: {exc})") from exc
    risks: list[str] = []
    with zf:
        names = zf.namelist()
        root = names[0].split("/", 1)[0] + "/" if names else ""
        if any(not n.startswith(root) for n in names):
            return ["entries outside the archive's folder (not a torch.export.save archive)"]
        files = {n[len(root):] for n in names}

        def read(name: str) -> bytes:
            return zf.read(root + name)

        if c.ARCHIVE_FORMAT_PATH not in files or read(c.ARCHIVE_FORMAT_PATH).strip() != c.ARCHIVE_FORMAT_VALUE.encode():
            return ["no pt2 archive format marker: an older torch.export format, which is loaded by unpickling"]
        native = sorted(f for f in files if f.startswith(c.AOTINDUCTOR_DIR) or f.endswith((".so", ".dll", ".dylib")))
        if native:
            risks.append(f"compiled native code ({native[0]})")
        models = sorted(f[len(c.MODELS_DIR):-len(".json")] for f in files
                        if f.startswith(c.MODELS_DIR) and f.endswith(".json"))
        for model in models:
            for legacy in (f"{c.WEIGHTS_DIR}{model}.pt", f"{c.CONSTANTS_DIR}{model}.pt"):
                if legacy in files:
                    risks.append(f"a pickled legacy file {legacy}")
            for config_name, what in ((c.WEIGHTS_CONFIG_FILENAME_FORMAT, "weight"),
                                      (c.CONSTANTS_CONFIG_FILENAME_FORMAT, "constant")):
                config_file = config_name.format(model)
                if config_file not in files:
                    continue
                try:
                    entries = json.loads(read(config_file))["config"]
                except (ValueError, KeyError, TypeError):
                    risks.append(f"an unreadable payload config {config_file}")
                    continue
                for fqn, meta in entries.items():
                    path_name = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
                    if not isinstance(meta, dict) or meta.get("use_pickle") or (
                            what == "constant" and not path_name.startswith(c.TENSOR_CONSTANT_FILENAME_PREFIX)):
                        risks.append(f"a pickled {what} {fqn!r} ({path_name or 'unknown entry'})")
            sample = c.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
            if sample in files:
                try:
                    torch.load(io.BytesIO(read(sample)), weights_only=True)
                except Exception:  # noqa: BLE001 - torch would retry with weights_only=False, i.e. unpickle it
                    risks.append(f"example inputs {sample} that only full unpickling reads")
            try:
                program = json.loads(read(f"{c.MODELS_DIR}{model}.json"))
            except ValueError:
                risks.append(f"an unreadable program {c.MODELS_DIR}{model}.json")
                continue
            exprs = [e for e in _json_values(program, "expr_str") if not (isinstance(e, str) and _plain_sympy(e))]
            if exprs:
                risks.append(f"a symbolic shape that sympy would evaluate as code ({str(exprs[0])[:80]!r})")
            guards = program.get("guards_code") or [] if isinstance(program, dict) else []
            bad = [g for g in guards if not (isinstance(g, str) and _plain_guard(g))]
            if bad:
                risks.append(f"guard code that is not a plain size check ({str(bad[0])[:80]!r})")
    return risks


class ExportedProgramModule(torch.nn.Module):
    """`ExportedProgram.module()` as a regular module: it refuses `.train()`/`.eval()` (which the capture
    calls), and keeps the program's forward signature so a re-export can name the inputs."""

    def __init__(self, program_module: torch.nn.Module) -> None:
        super().__init__()
        self.program = program_module

    def train(self, mode: bool = True) -> ExportedProgramModule:
        self.training = mode  # the program is frozen in the mode it was exported in
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.program(*args, **kwargs)


def _with_signature(program_module: torch.nn.Module) -> ExportedProgramModule:
    sig = inspect.signature(program_module.forward)
    cls = type("ExportedProgram", (ExportedProgramModule,), {})

    def forward(self: ExportedProgramModule, *args: Any, **kwargs: Any) -> Any:
        return self.program(*args, **kwargs)

    forward.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *sig.parameters.values()])
    setattr(cls, "forward", forward)  # noqa: B010 - a per-program subclass carrying the signature
    return cls(program_module)


def _concrete(dim: Any, axis: int, ranges: Mapping[Any, Any], batch: int, seq_len: int | None) -> int:
    if isinstance(dim, int):
        return dim
    want = batch if axis == 0 else (seq_len or DEFAULT_SEQ_LEN)
    expr = getattr(getattr(dim, "node", None), "expr", None)
    vr = ranges.get(expr) if expr is not None else None
    if vr is not None:
        lo, hi = int(vr.lower), vr.upper
        want = max(want, lo)
        if hi is not None and not math.isinf(float(hi)):
            want = min(want, int(hi))
    return want


def load_pt2(path_str: str, *, batch: int, seq_len: int | None, seed: int, trust_pickle: bool = False) -> ModelSource:
    """Load a `torch.export.save` archive; one that would run code while loading is refused first, unless
    `trust_pickle`."""
    path = Path(path_str)
    if not path.is_file():
        raise TokenReduceError(f"no such file: {path_str}")
    if not trust_pickle:
        risks = pt2_code_risks(path)
        if risks:
            more = f" (+{len(risks) - 1} more)" if len(risks) > 1 else ""
            raise TokenReduceError(
                f"{path_str} would run code while loading: {risks[0]}{more}; nothing was loaded. Load it only if "
                "you trust where it came from, with trust_pickle=True", hint="trust_pickle=True")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise TokenReduceError(f"could not load {path_str} as a torch.export program: {_brief(exc)}") from exc
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    g = _seeded(seed)
    flat: list[Any] = []
    for node in placeholders:
        v = node.meta.get("val")
        if not isinstance(v, torch.Tensor):
            raise TokenReduceError(f"{path_str}: input {node.name} is not a tensor ({type(v).__name__})")
        shape = [_concrete(d, i, program.range_constraints, batch, seq_len) for i, d in enumerate(v.shape)]
        if v.dtype.is_floating_point:
            flat.append(torch.randn(shape, generator=g, dtype=v.dtype))
        elif v.dtype == torch.bool or "mask" in node.name:
            flat.append(torch.ones(shape, dtype=v.dtype))
        else:
            flat.append(torch.zeros(shape, dtype=v.dtype))  # ids: 0 is a valid index in every table
    try:
        args, kwargs = pytree.tree_unflatten(flat, program.call_spec.in_spec)
    except Exception as exc:  # noqa: BLE001
        raise TokenReduceError(f"{path_str}: cannot rebuild the program's inputs: {_brief(exc)}") from exc
    model = _with_signature(program.module())
    return ModelSource(str(path), "pt2", model, tuple(args), dict(kwargs), f"{path_str} (torch.export program)")


# ---------------------------------------------------------------------------------------------- module:function
def load_function(spec: str, *, model_args: dict[str, Any], batch: int | None, image_size: int | None,
                  seq_len: int | None, seed: int) -> ModelSource:
    module_name, _, func_name = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the working directory import
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TokenReduceError(f"cannot import module {module_name!r} (from MODEL {spec!r}): {exc}") from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise TokenReduceError(f"module {module_name!r} has no function {func_name!r}")
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    call_kwargs = dict(model_args)
    native_batch = False
    for name, value in (("batch", batch), ("image_size", image_size), ("seq_len", seq_len)):
        if value is not None and (name in params or takes_any):
            call_kwargs[name] = value
            native_batch |= name == "batch"
    unknown = [k for k in call_kwargs if k not in params and not takes_any]
    if unknown:
        raise TokenReduceError(f"{spec} does not take argument(s) {', '.join(unknown)}; it takes "
                               f"({', '.join(params) or 'nothing'})")
    _seeded(seed)
    try:
        result = fn(**call_kwargs)
    except TokenReduceError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's function failed; say so in one line
        raise TokenReduceError(f"{spec} raised {type(exc).__name__}: {_brief(exc)}") from exc
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise TokenReduceError(f"{spec} must return (model, example_inputs), got {type(result).__name__}")
    model, example_inputs = result
    args, kwargs = _split(example_inputs, spec)
    model.eval()
    # other batch sizes (bench) tile these inputs: calling the function again would rebuild the model
    src = ModelSource(spec, "function", model, args, kwargs, f"{spec} ({type(model).__name__})")
    if batch is not None and not native_batch:
        src.example_args, src.example_kwargs = rebatch(args, kwargs, batch)
    return src


# ---------------------------------------------------------------------------------------------- dispatch
def _is_timm_model(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name.split(".")[0]))


def describe_unknown(spec: str) -> TokenReduceError:
    hint = ""
    from tokenreduce.sources_diffusers import is_diffusers_folder

    if Path(spec).is_dir() and is_diffusers_folder(Path(spec)):
        hint = f"; for a diffusers model or pipeline folder use diffusers:{spec}"
    elif Path(spec).is_dir() and (Path(spec) / "config.json").is_file():
        hint = f"; for a Hugging Face folder use hf:{spec}"
    elif spec.endswith((".pt", ".pth", ".bin", ".safetensors")):
        hint = "; a weights file needs an architecture: timm:NAME --checkpoint FILE"
    elif re.fullmatch(r"[a-z0-9_]+(\.[\w]+)?", spec) and _is_timm_model(spec):
        hint = f"; for the timm model use timm:{spec}"
    return TokenReduceError(f"unknown model source {spec!r}: use {SOURCE_FORMS}{hint}")


def load_model(
    spec: str,
    *,
    batch: int | None = None,
    image_size: int | None = None,
    seq_len: int | None = None,
    checkpoint: str | None = None,
    model_args: dict[str, Any] | None = None,
    seed: int = 0,
    trust_pickle: bool = False,
) -> ModelSource:
    """Load MODEL (`timm:NAME`, `hf:PATH`, `diffusers:FOLDER`, `FILE.pt2`, `module:function`) with example inputs. A `.pt2`
    file that would run code while loading is refused unless `trust_pickle` (see `pt2_code_risks`)."""
    model_args = dict(model_args or {})
    if batch is not None and batch < 1:
        raise TokenReduceError(f"--batch must be >= 1, got {batch}")
    kind = source_kind(spec)
    if checkpoint is not None and kind != "timm":
        raise TokenReduceError("--checkpoint applies to timm: models (hf: folders carry their own weights)")
    if model_args and kind in ("hf", "pt2", "diffusers"):
        raise TokenReduceError(f"--model-arg applies to timm: and module:function sources, not {kind}")
    if kind == "timm":
        return load_timm(spec[len("timm:"):], checkpoint=checkpoint, model_args=model_args, batch=batch or 1,
                         image_size=image_size, seed=seed)
    if kind == "hf":
        return load_hf(spec[len("hf:"):], batch=batch or 1, image_size=image_size, seq_len=seq_len, seed=seed)
    if kind == "diffusers":
        from tokenreduce.sources_diffusers import load_diffusers

        model, make, description = load_diffusers(spec[len("diffusers:"):], image_size=image_size, seq_len=seq_len,
                                                  seed=seed)
        args, kw = make(batch or 1)
        return ModelSource(spec, "diffusers", model, args, kw, description, make_inputs=make)
    if kind == "pt2":
        return load_pt2(spec, batch=batch or 1, seq_len=seq_len, seed=seed, trust_pickle=trust_pickle)
    if kind == "function":
        return load_function(spec, model_args=model_args, batch=batch, image_size=image_size, seq_len=seq_len,
                             seed=seed)
    if kind == "onnx":
        raise TokenReduceError(f"{spec} is an ONNX file; this command needs a PyTorch model "
                               f"({SOURCE_FORMS}); `tokenreduce inspect {spec}` checks ONNX files")
    raise describe_unknown(spec)


def source_kind(spec: str) -> str:
    """"timm", "hf", "diffusers", "pt2", "onnx", "function" or "unknown" (from the string alone)."""
    if spec.startswith("timm:"):
        return "timm"
    if spec.startswith("diffusers:"):
        return "diffusers"
    if spec.startswith("hf:"):
        return "hf"
    if spec.endswith(".pt2"):
        return "pt2"
    if spec.endswith(".onnx"):
        return "onnx"
    if _FUNCTION_SPEC.match(spec):
        return "function"
    return "unknown"
