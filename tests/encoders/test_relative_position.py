"""Relative-position encoders under reduction: DeBERTa-v2 (disentangled attention in a `[B*H, N, d]` bmm
layout, its relative-position index gathered through `torch.gather`, padding by `masked_fill`) and MPNet
(a relative bias added in place). Each must be the model at zero reduction, reduce with ToMe / EViT /
PiToMe, and gather its per-token position tensors by the representatives (`gather_side_input` nodes,
folded `[B*H, N, N]` index included); one graph serves another batch size.

`gather_side_input` itself is checked against explicit indexing in tests/passes/test_side_input_gather.py,
including the folded layout."""

from __future__ import annotations

import pytest
import torch

import tokenreduce


def _text_model(kind: str) -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  pad_token_id=0, max_position_embeddings=64)
    if kind == "deberta-v2":
        cfg = T.DebertaV2Config(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, **common)
        return T.DebertaV2Model(cfg).eval()
    return T.MPNetModel(T.MPNetConfig(**common)).eval()


def _inputs(batch: int = 2, n: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[0, -3:] = 0
    return ids, mask


@pytest.mark.parametrize("kind", ["deberta-v2", "mpnet"])
def test_relative_position_encoders_reduce(kind):
    model = _text_model(kind)
    ids, mask = _inputs()

    def run(**settings):
        red = tokenreduce.compile(model, (ids,), {"attention_mask": mask}, inner="eager", count_model_flops=False,
                                  **settings)
        return red, red(ids, attention_mask=mask).last_hidden_state

    _, zero = run(method="tome", r=0)
    torch.testing.assert_close(zero, model(ids, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-5)
    for settings, tokens in [(dict(method="tome", r=2), [12, 10, 8]),
                             (dict(method="evit", keep_ratio=0.5, layers=[0, 1]), [12, 8, 6]),
                             (dict(method="pitome", r=2), [12, 10, 8])]:
        red, out = run(**settings)
        assert red.report.tokens_per_block == tokens, settings
        assert torch.isfinite(out).all() and out.shape[1] < 12
        ids3, mask3 = _inputs(batch=3, seed=2)
        assert red(ids3, attention_mask=mask3).last_hidden_state.shape[0] == 3
    if kind == "deberta-v2":
        gm = run(method="tome", r=2)[0].graph_module
        gathers = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "gather_side_input"]
        folded = [n for n in gathers if n.args[0].meta["val"].dim() == 3]  # the [B*H, N, N] index
        assert folded, "the relative-position index of the later blocks is gathered"


def test_evit_ranks_deberta_tokens_by_the_models_own_attention():
    """EViT's CLS row must include DeBERTa's relative c2p/p2c terms. Pruning (no fusing) at the last block
    keeps the CLS token and the top-k tokens by the model's own head-averaged CLS attention, in that order,
    and since the MLP is per token the output is the full model's output at those tokens."""
    model = _text_model("deberta-v2")
    with torch.no_grad():  # make the relative terms weigh in the ranking (random init leaves them small)
        model.encoder.rel_embeddings.weight.mul_(30.0)
    ids, mask = _inputs()
    red = tokenreduce.compile(model, (ids,), {"attention_mask": mask}, method="evit", keep_ratio=0.5, layers=[2],
                              fuse=False, inner="eager", count_model_flops=False)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, output_attentions=True)
    cls_row = full.attentions[2][:, :, 0, :].mean(dim=1)[:, 1:]  # [B, 11] candidates
    cls_row = cls_row.masked_fill(mask[:, 1:] == 0, -1.0)  # padding never outranks a real token
    keep = cls_row.topk(6, dim=-1).indices + 1
    order = torch.cat([torch.zeros(2, 1, dtype=torch.long), keep], dim=1)
    expected = full.last_hidden_state.gather(1, order[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(red(ids, attention_mask=mask).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def test_deberta_with_padding_exports_to_onnx_and_matches(tmp_path):
    """DeBERTa zeroes the embeddings of padding tokens: with a bias-free key projection their keys are 0
    (ToMe's cosine was NaN, ordered differently by torch and ONNX TopK) and otherwise equal (exact ties).
    The exported file must match the eager reduced model on every position, padding included."""
    from tokenreduce.targets.onnx import export_onnx

    model = _text_model("deberta-v2")
    ids, mask = _inputs()
    red = tokenreduce.compile(model, (ids,), {"attention_mask": mask}, method="tome", r=2, inner="eager",
                              count_model_flops=False)
    res = export_onnx(red, tmp_path / "deberta_tome.onnx")
    assert res.verified and res.max_abs_diff is not None and res.max_abs_diff <= 1e-4
