"""`tokenreduce inspect|bench|convert` on decoder LLM folders (hf:PATH of a *ForCausalLM), in-process.

A tiny random Llama saved with `save_pretrained` stands in for a real checkpoint folder. Checks what is
printed (span, stages, tokens per block, FLOPs), the JSON for scripts, a verified ONNX of the pruned
prefill, and the refusals (a decoder method on a non-decoder model, an unsupported bench target).
"""

from __future__ import annotations

import json

import pytest
import torch

from tokenreduce.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("tinyllama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _json(capfd) -> dict:
    out = capfd.readouterr().out
    return json.loads(out)


def test_inspect_shows_every_method_with_span_and_tokens(llama_dir, capfd):
    assert main(["inspect", f"hf:{llama_dir}", "--seq-len", "96", "--no-progress"]) == 0
    out = capfd.readouterr().out
    assert "span (droppable): tokens 16..79" in out
    for method in ("fastv", "pyramiddrop", "gemfilter"):
        assert method in out
    assert "tokens per block: 0-1: 96, 2-3: 64" in out  # FastV after layer 2 keeps half of 64 span tokens


def test_inspect_json_with_explicit_settings(llama_dir, capfd):
    assert main(["inspect", f"hf:{llama_dir}", "--seq-len", "80", "--span", "8:-8", "--method", "gemfilter",
                 "--layers", "1", "--keep-tokens", "10", "--json"]) == 0
    doc = _json(capfd)
    (m,) = doc["methods"]
    assert m["method"] == "gemfilter" and m["span_tokens"] == 64
    assert m["tokens_per_block"] == [80 - 64 + 10] * 4
    assert 0 < m["flops_ratio"] < 1


def test_bench_json_rows(llama_dir, capfd):
    assert main(["bench", f"hf:{llama_dir}", "--seq-len", "64", "--method", "fastv", "--batch", "1",
                 "--repeats", "2", "--warmup", "0", "--json"]) == 0
    doc = _json(capfd)
    (row,) = doc["rows"]
    assert row["target"] == "eager" and row["tokens_per_block"] == [64, 64, 48, 48]
    assert row["speedup"] == pytest.approx(row["full_ms"] / row["pruned_ms"])


def test_convert_writes_a_verified_onnx(llama_dir, tmp_path, capfd):
    out = tmp_path / "prefill.onnx"
    assert main(["convert", f"hf:{llama_dir}", "--seq-len", "48", "--method", "pyramiddrop", "--layers", "1,3",
                 "-o", str(out), "--json"]) == 0
    doc = _json(capfd)
    assert out.is_file() and doc["verified"] and doc["max_abs_diff"] < 1e-4
    assert doc["tokens_per_block"] == [48, 48 - 16 + 8, 48 - 16 + 8, 48 - 16 + 4]  # span 16..31 halved twice


def test_decoder_method_on_an_encoder_is_refused(capfd):
    assert main(["inspect", "timm:vit_tiny_patch16_224", "--method", "fastv"]) != 0
    assert "prunes the prefill of a decoder" in capfd.readouterr().err


def test_bench_refuses_onnxruntime_for_decoders(llama_dir, capfd):
    assert main(["bench", f"hf:{llama_dir}", "--seq-len", "64", "--method", "fastv", "--target", "onnxruntime"]) != 0
    assert "eager or inductor" in capfd.readouterr().err


def test_bad_span_is_refused(llama_dir, capfd):
    assert main(["inspect", f"hf:{llama_dir}", "--seq-len", "64", "--span", "70:80"]) != 0
    assert "selects nothing inside the 64-token prompt" in capfd.readouterr().err
