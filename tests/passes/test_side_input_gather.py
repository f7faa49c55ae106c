"""`gather_side_input`, the op every per-token side input goes through after a reduction, against explicit
per-sample indexing: a batchless rotary table (`[N, d]` broadcast against `[B, H, N, d]`), a table that
leaves out a protected prefix, a per-sample `[B, 1, N, d]` table, a relative bias along both token axes,
and position ids."""

from __future__ import annotations

import torch

from tokenreduce.passes.insert_reductions import gather_side_input

B, N, D, H = 3, 9, 4, 2


def _rep() -> torch.Tensor:
    torch.manual_seed(0)
    # slot 0 is the protected token; the others are representatives in any order (EViT keeps top-k order)
    rest = torch.stack([torch.randperm(N - 1)[:5] + 1 for _ in range(B)])
    return torch.cat([torch.zeros(B, 1, dtype=torch.long), rest], dim=1)  # [B, 6]


def test_batchless_table_becomes_per_sample_in_front_of_the_heads():
    table, rep = torch.randn(N, D), _rep()
    got = gather_side_input(table, rep, -2, 0, 4)
    assert got.shape == (B, 1, rep.shape[1], D)
    for b in range(B):
        for s in range(rep.shape[1]):
            torch.testing.assert_close(got[b, 0, s], table[rep[b, s]], rtol=0, atol=0)


def test_table_after_a_protected_prefix_is_indexed_from_the_prefix():
    table, rep = torch.randn(N - 1, D), _rep()  # EVA-02: rows for tokens 1.. (CLS not rotated)
    got = gather_side_input(table, rep, -2, 1, 4)
    assert got.shape == (B, 1, rep.shape[1] - 1, D)
    for b in range(B):
        for s in range(1, rep.shape[1]):
            torch.testing.assert_close(got[b, 0, s - 1], table[rep[b, s] - 1], rtol=0, atol=0)


def test_per_sample_table_keeps_its_batch():
    table, rep = torch.randn(B, 1, N, D), _rep()
    got = gather_side_input(table, rep, -2, 0, 4)
    for b in range(B):
        torch.testing.assert_close(got[b, 0], table[b, 0, rep[b]], rtol=0, atol=0)


def test_relative_bias_along_both_token_axes():
    bias, rep = torch.randn(H, N, N), _rep()
    got = gather_side_input(gather_side_input(bias, rep, -2, 0, 4), rep, -1, 0, 4)
    assert got.shape == (B, H, rep.shape[1], rep.shape[1])
    for b in range(B):
        torch.testing.assert_close(got[b], bias[:, rep[b]][:, :, rep[b]], rtol=0, atol=0)


def test_position_ids():
    ids, rep = torch.arange(N).expand(1, N) + 5, _rep()
    got = gather_side_input(ids, rep, -1, 0, 2)
    torch.testing.assert_close(got, rep + 5, rtol=0, atol=0)


def test_folded_batch_and_heads_gather_per_sample():
    # DeBERTa's [B*H, N, N] relative-position index (sample-major: row b*H + h), here with distinct content
    bias, rep = torch.randn(B * H, N, N), _rep()
    got = gather_side_input(gather_side_input(bias, rep, -2, 0, 3), rep, -1, 0, 3)
    assert got.shape == (B * H, rep.shape[1], rep.shape[1])
    for b in range(B):
        for h in range(H):
            torch.testing.assert_close(got[b * H + h], bias[b * H + h][rep[b]][:, rep[b]], rtol=0, atol=0)
