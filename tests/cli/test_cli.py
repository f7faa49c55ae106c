"""The `tokenreduce` command line, run through its real entry point in a subprocess.

Every test starts the installed console script (or `python -m tokenreduce` where it is not installed)
the way a user would, on the tiny models of `tiny_models.py` (loaded as `tiny_models:NAME` with this
directory on PYTHONPATH), and checks the exit code, what is printed, and what is (not) left on disk.

Success paths: convert to ONNX (file, report, verification diff), inspect a model and an ONNX file,
bench on the eager target, --json for scripts. Bad input: unknown source, missing file, a model without
transformer blocks, r too large, a layer out of range, TensorRT absent, failed verification; each must
be one `tokenreduce: error:` line on stderr, a non-zero exit code, no traceback and no output file.

Each subprocess pays ~3 s of imports (torch, dynamo) before doing anything, so the command lines of the
selected tests (`CASES`, keyed by test id) are started up front, two at a time, and each test waits for
its own result. Inductor is never used (its compile alone takes minutes here).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

CLI_DIR = Path(__file__).resolve().parent
REPO = CLI_DIR.parents[1]
VIT = "tiny_models:vit"  # 32x32 images, 8x8 patches: 17 tokens (CLS + 16), 4 blocks
TWO_BLOCKS = ["--model-arg", "depth=2"]  # exports are the slow part: fewer blocks, same code paths
ONE_BLOCK = ["--model-arg", "depth=1"]
WORKERS = 2  # the machine has 2 cores
# a tiny random CaiT: 2 self-attention blocks on 16 patch tokens, then 1 class-attention block (CLS over the tokens)
CAIT = [a for kv in ("img_size=32", "patch_size=8", "depth=2", "embed_dim=64", "num_heads=2", "depth_token_only=1")
        for a in ("--model-arg", kv)]

# test id -> command line; "{out}" is a fresh directory of that test (checked for leftovers)
CASES: dict[str, list[str]] = {
    "convert": ["convert", VIT, *TWO_BLOCKS, "--method", "tome", "--r", "2", "-o", "{out}/vit_tome.onnx"],
    "test_inspect_model": ["inspect", VIT],
    "test_inspect_json_with_keyword_inputs": ["inspect", "tiny_models:bert", "--model-arg", "seq_len=12",
                                              "--method", "tome", "--r", "2", "--json"],
    "test_inspect_names_the_reason_a_block_is_skipped": ["inspect", "timm:cait_xxs24_224", *CAIT, "--method", "tome",
                                                         "--r", "2", "--json"],
    "test_bench_eager_prints_the_ratio_table": ["bench", VIT, "--method", "tome", "--r", "2", "--target", "eager",
                                                "--batch", "1,2", "--repeats", "2", "--warmup", "0"],
    "test_bench_json": ["bench", VIT, "--method", "evit", "--target", "eager", "--batch", "2", "--repeats", "2",
                        "--warmup", "0", "--json"],
    "test_help_has_examples": ["--help"],
    "test_unknown_model_source[bare-timm-name]": ["inspect", "vit_tiny_patch16_224"],
    "test_unknown_model_source[timm-typo]": ["inspect", "timm:vit_tiny_patch16_2244"],
    "test_missing_file[pt2]": ["convert", "{out}/missing.pt2", "--r", "2", "-o", "{out}/out.onnx"],
    "test_missing_file[checkpoint]": ["convert", "timm:vit_tiny_patch16_224", "--checkpoint", "{out}/w.pth",
                                      "--r", "2", "-o", "{out}/out.onnx"],
    "test_model_without_transformer_blocks": ["convert", "tiny_models:mlp", "--r", "2", "-o", "{out}/mlp.onnx"],
    "test_r_too_large_names_the_largest_valid_r": ["convert", VIT, "--method", "tome", "--r", "9",
                                                   "-o", "{out}/out.onnx"],
    "test_layer_out_of_range": ["convert", VIT, "--method", "tome", "--r", "2", "--layers", "0,7",
                                "-o", "{out}/out.onnx"],
    "test_tensorrt_absent_is_a_clear_error_and_leaves_no_file": [
        "convert", VIT, *ONE_BLOCK, "--method", "tome", "--r", "2", "--to", "tensorrt", "-o", "{out}/vit.engine"],
    "test_failed_verification_leaves_no_file": ["convert", VIT, *ONE_BLOCK, "--method", "tome", "--r", "2",
                                                "--atol", "0", "-o", "{out}/out.onnx"],
}
NEEDS_CONVERT = ("test_convert_to_onnx_writes_a_verified_file", "test_inspect_onnx_file")


def _entry_point() -> list[str]:
    script = Path(sys.executable).with_name("tokenreduce")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tokenreduce"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CLI_DIR), str(REPO), env.get("PYTHONPATH", "")) if p)
    env["COLUMNS"] = "200"
    return subprocess.run([*_entry_point(), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=CLI_DIR)


class Runs:
    """The started command lines: `runs(test_id)` waits for one; `runs.out(test_id)` is its directory."""

    def __init__(self, root: Path, pool: ThreadPoolExecutor) -> None:
        self.root = root
        self.pool = pool
        self.futures: dict[str, Future[subprocess.CompletedProcess[str]]] = {}

    def out(self, name: str) -> Path:
        path = self.root / re.sub(r"\W+", "_", name)
        path.mkdir(exist_ok=True)
        return path

    def start(self, name: str, after: str | None = None, extra: Callable[[], list[str]] | None = None) -> None:
        argv = [a.replace("{out}", str(self.out(name))) for a in CASES.get(name, [])]

        def job() -> subprocess.CompletedProcess[str]:
            if after is not None:
                self(after)
            return run(*argv, *(extra() if extra else []))

        self.futures[name] = self.pool.submit(job)

    def __call__(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.futures[name].result()


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    selected = {item.name for item in request.session.items}
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        r = Runs(tmp_path_factory.mktemp("cli"), pool)
        if selected & set(NEEDS_CONVERT):
            r.start("convert")
        for name in CASES:
            if name in selected:
                r.start(name)
        if "test_inspect_onnx_file" in selected:  # reads the file the convert run writes
            r.start("test_inspect_onnx_file", after="convert",
                    extra=lambda: ["inspect", str(r.out("convert") / "vit_tome.onnx"), "--strict"])
        yield r


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("tokenreduce: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def assert_empty(directory: Path) -> None:
    assert sorted(p.name for p in directory.iterdir()) == []


# ============================================================================================ success paths
def test_convert_to_onnx_writes_a_verified_file(runs: Runs) -> None:
    proc, out = runs("convert"), runs.out("convert") / "vit_tome.onnx"
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and out.stat().st_size > 0
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no scratch files left beside it
    # the per-block report: 17 tokens, CLS protected, two merges per block
    for text in ("blocks.0", "17 -> 15", "blocks.1", "15 -> 13", "tome r=2", "protected tokens: 1", "FLOPs"):
        assert text in proc.stdout, text
    diff = re.search(r"max abs diff ([0-9.e+-]+)", proc.stdout)
    assert diff is not None, proc.stdout
    assert float(diff.group(1)) <= 1e-4
    assert "dynamic batch" in proc.stdout


def test_inspect_onnx_file(runs: Runs) -> None:
    proc = runs("test_inspect_onnx_file")
    assert proc.returncode == 0, proc.stderr  # --strict: non-zero if a check had failed
    assert "static check: OK" in proc.stdout
    assert "TensorRT compatibility check: OK" in proc.stdout
    assert "[batch, 3, 32, 32]" in proc.stdout
    assert "TensorRT on this machine" in proc.stdout


def test_inspect_model(runs: Runs) -> None:
    proc = runs("test_inspect_model")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "4 transformer blocks" in out
    assert out.count("pre-ln") == 4 and out.count("reducible") == 4
    assert "scaled_dot_product_attention" in out
    assert "protected tokens: 1" in out and "CLS" in out
    # default ToMe r=13 is capped at the largest valid constant r (3 for 17 tokens over 4 blocks)
    assert "largest valid constant ToMe r: 3" in out
    assert "ToMe r=3" in out and "17 -> 14" in out
    assert "EViT keep 0.7 @ 1,2,3" in out
    assert "unreduced" in out and "FLOPs ratio" in out


def test_inspect_json_with_keyword_inputs(runs: Runs) -> None:
    # module:function returning a dict of inputs (BERT: input_ids + attention_mask), --model-arg passed on
    proc = runs("test_inspect_json_with_keyword_inputs")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert data["inputs"] == {"input_ids": [2, 12], "attention_mask": [2, 12]}
    assert data["text_model"] is True
    assert [(b["layout"], b["tokens"], b["reducible"]) for b in data["blocks"]] == [("post-ln", 12, True)] * 2
    assert data["protected_tokens"]["count"] == 1  # [CLS] of a text model
    assert data["largest_constant_r"] == 3  # r=4: 12 -> 8, and block 1 allows only (8 - 1) // 2 = 3
    assert list(data["methods"]) == ["tome"]
    tome = data["methods"]["tome"]
    assert [(b["tokens_in"], b["tokens_out"]) for b in tome["blocks"]] == [(12, 10), (10, 8)]
    assert 0 < tome["flops"] < data["flops"]
    assert tome["flops_ratio"] == pytest.approx(tome["flops"] / data["flops"])


def test_inspect_names_the_reason_a_block_is_skipped(runs: Runs) -> None:
    """CaiT's class-attention block (one CLS query over the patch tokens) cannot be reduced: inspect says so,
    by name, for that block, and plans ToMe on the self-attention blocks only."""
    proc = runs("test_inspect_names_the_reason_a_block_is_skipped")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    blocks = data["blocks"]
    assert [b["reducible"] for b in blocks] == [True, True, False]
    assert [b["skip_reason"] for b in blocks[:2]] == [None, None]
    assert "class attention" in blocks[2]["skip_reason"] and "only self-attention is reduced" in blocks[2]["skip_reason"]
    tome = data["methods"]["tome"]
    assert [(b["tokens_in"], b["tokens_out"]) for b in tome["blocks"][:2]] == [(16, 14), (14, 12)]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA saved as a folder (CLIP vision tower of 2 blocks, Llama of 3), as `hf:` reads it."""
    import torch
    import transformers

    torch.manual_seed(0)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8)
    tc = transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=150, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    path = tmp_path_factory.mktemp("tinyllava")
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(path)
    return path


def test_inspect_decoder_lists_every_block_and_why_it_is_not_pruned(llava_dir: Path, capfd: pytest.CaptureFixture[str]
                                                                    ) -> None:
    """Decoder inspect (in-process): the vision tower's blocks are listed as not pruned with the analysis'
    reason, the language model's blocks as decoder blocks with their token counts."""
    from tokenreduce.cli import main

    assert main(["inspect", f"hf:{llava_dir}", "--seq-len", "8", "--method", "fastv", "--layers", "1", "--json"]) == 0
    data = json.loads(capfd.readouterr().out)
    blocks = data["blocks"]
    skipped = [b for b in blocks if not b["reducible"]]
    decoder_blocks = [b for b in blocks if b["reducible"]]
    assert len(skipped) == 2 and all("bidirectional attention" in b["skip_reason"] for b in skipped)
    assert all("vision_tower" in b["name"] for b in skipped)
    assert [b["index"] for b in decoder_blocks] == [0, 1, 2]
    assert all(b["tokens"] == 8 + 16 and "language_model" in b["name"] for b in decoder_blocks)  # 16 image tokens
    (fastv,) = data["methods"]
    assert fastv["applicable"] and fastv["tokens_per_block"] == [24, 16, 16]  # half of the 16 image tokens kept
    assert main(["inspect", f"hf:{llava_dir}", "--seq-len", "8", "--method", "fastv", "--layers", "1",
                 "--no-progress"]) == 0
    text = capfd.readouterr().out
    assert "5 attention blocks, 3 decoder blocks" in text and "skip: bidirectional attention" in text


def test_bench_eager_prints_the_ratio_table(runs: Runs) -> None:
    proc = runs("test_bench_eager_prints_the_ratio_table")
    assert proc.returncode == 0, proc.stderr
    for text in ("latency ratio", "FLOPs ratio", "efficiency", "ToMe r=2"):
        assert text in proc.stdout, text
    rows = [line for line in proc.stdout.splitlines() if re.search(r"\beager\b", line) and "│" in line]
    assert len(rows) == 2  # batch 1 and batch 2


def test_bench_json(runs: Runs) -> None:
    proc = runs("test_bench_json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    (row,) = data["rows"]
    assert row["target"] == "eager" and row["batch"] == 2 and row["repeats"] == 2
    assert len(row["samples_unreduced_ms"]) == len(row["samples_reduced_ms"]) == 2
    assert 0 < row["flops_ratio"] < 1
    assert row["latency_ratio"] == pytest.approx(row["latency_reduced_ms"] / row["latency_unreduced_ms"])
    assert row["efficiency"] == pytest.approx(row["flops_ratio"] / row["latency_ratio"])


def test_help_has_examples(runs: Runs) -> None:
    proc = runs("test_help_has_examples")
    assert proc.returncode == 0
    for text in ("convert", "inspect", "bench", "examples:", "tokenreduce convert timm:", "timm:NAME", "hf:PATH",
                 ".pt2", "module:function"):
        assert text in proc.stdout, text


# ============================================================================================ bad input
@pytest.mark.parametrize(("case", "needle"), [
    ("bare-timm-name", "unknown model source 'vit_tiny_patch16_224'"),
    ("timm-typo", "unknown timm model 'vit_tiny_patch16_2244'; did you mean timm:vit_tiny_patch16_224"),
], ids=["bare-timm-name", "timm-typo"])
def test_unknown_model_source(runs: Runs, case: str, needle: str) -> None:
    assert_one_line_error(runs(f"test_unknown_model_source[{case}]"), needle)


@pytest.mark.parametrize(("case", "needle"), [
    ("pt2", "no such file"),
    ("checkpoint", "checkpoint not found"),
], ids=["pt2", "checkpoint"])
def test_missing_file(runs: Runs, case: str, needle: str) -> None:
    name = f"test_missing_file[{case}]"
    assert_one_line_error(runs(name), needle)
    assert_empty(runs.out(name))


def test_model_without_transformer_blocks(runs: Runs) -> None:
    name = "test_model_without_transformer_blocks"
    assert_one_line_error(runs(name), "no transformer blocks found")
    assert_empty(runs.out(name))


def test_r_too_large_names_the_largest_valid_r(runs: Runs) -> None:
    name = "test_r_too_large_names_the_largest_valid_r"
    line = assert_one_line_error(runs(name))
    assert "largest valid r there is 8" in line  # block 0: (17 - 1) // 2
    assert "largest constant r for this model is 3" in line
    assert "--clamp-r" in line  # the command-line spelling of the way out
    assert_empty(runs.out(name))


def test_layer_out_of_range(runs: Runs) -> None:
    name = "test_layer_out_of_range"
    assert_one_line_error(runs(name), "[7] out of range", "valid layers 0..3")
    assert_empty(runs.out(name))


def test_tensorrt_absent_is_a_clear_error_and_leaves_no_file(runs: Runs) -> None:
    from tokenreduce.targets.tensorrt import tensorrt_available

    name = "test_tensorrt_absent_is_a_clear_error_and_leaves_no_file"
    if tensorrt_available()[0]:
        pytest.skip("TensorRT and CUDA are present here: the engine would be built")
    assert_one_line_error(runs(name), "cannot build the TensorRT engine", "TensorRT is not installed", "install",
                          "passed verification and the TensorRT compatibility check")
    assert_empty(runs.out(name))  # no engine, no partial engine, no ONNX (not asked to keep it)


def test_failed_verification_leaves_no_file(runs: Runs) -> None:
    name = "test_failed_verification_leaves_no_file"
    proc = runs(name)
    if proc.returncode == 0:
        pytest.skip("onnxruntime matched the reduced model bit for bit: nothing to fail at atol=0")
    assert_one_line_error(proc, "ONNX verification failed", "tolerance 0", "not written")
    assert_empty(runs.out(name))
