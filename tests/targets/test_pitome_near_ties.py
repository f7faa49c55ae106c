"""PiToMe's matching on nearly parallel keys: eager and onnxruntime take the same decisions (issue 12).

Found on random-init timm ViT-B/16 at r=16: the ONNX verification failed by 2.3e-3 because, in block 0, two
A -> B edges had the same float32 cosine (0.9983498454; their float64 cosines differ by 1.4e-7) at the r
boundary of the edge ranking, and onnxruntime's matmul, summing in another order, put them the other way
round, so another pair merged. Near 1, float32 resolves cosines only to 6e-8 while 1 - cos is ~1e-3, so
such ties are common between the nearly parallel keys of a random-init model. The fix ranks the preselected
pairs by their exactly recomputed squared distance (`methods.pitome.best_matches`).

The keys here are built so that the decisions are known without running PiToMe: pairs of unit keys
`(g_k, normalize(g_k + eps_k h_k))`, `1 - cos = eps_k^2 / 2` spaced 5e-8 apart (below float32's spacing near
1) in a shuffled order, the pairs far apart from each other and with energies ordered by construction (each
pair adjacent in the energy ranking, checked in float64 below). The energy-ordered matching must then merge
exactly the r closest pairs and list the unmerged A tokens from the closest pair on; the expected slots are
written from the construction. Checked: the eager plan, the plan exported to ONNX and run in onnxruntime
(equal to the expected plan and to each other), and `best_matches` choosing the nearer of two B tokens whose
float32 cosines with the A token are equal. Before the fix the eager plan listed tied pairs by index and
onnxruntime disagreed with it.
"""

from __future__ import annotations

import math

import pytest
import torch

from tokenreduce.methods.pitome import best_matches, pitome_plan

PAIRS = 40
DIM = 96  # room for an orthonormal basis: centre, K directions of the bases, K of the mates, more
STEP = 5e-8  # spacing of 1 - cos between consecutive pairs: below float32's 5.96e-8 near 1


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def near_tie_keys(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(metric [1, 1 + 2K, d] float32, pair_rank [K], energy_order [2K])`: a protected token, then K pairs.

    From an orthonormal basis `(c, o_1..o_K, h_1..h_K, ...)`: base `g_k = cos(t_k) c + sin(t_k) o_k` with
    `t_k` rising with k (so `g_k . g_j = cos t_k cos t_j`: energies fall with k, far apart), its mate
    `cos(a_k) g_k + sin(a_k) h_k` (so `1 - cos = 1 - cos a_k`, and the mate's energy is the base's times
    `cos a_k`). Pair k is tokens `1 + 2k` (base) and `2 + 2k` (mate); `pair_rank[k]` is its rank by similarity
    (0 = most similar), a shuffled order, with `1 - cos a_k = 5e-5 + STEP * pair_rank[k]`. `energy_order`
    lists the candidate tokens (0-based, without the protected one) by float64 energy, highest first."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64))
    c, o, h = basis[:, 0], basis[:, 1:1 + PAIRS].T, basis[:, 1 + PAIRS:1 + 2 * PAIRS].T
    t = torch.linspace(0.2, 1.3, PAIRS, dtype=torch.float64)[:, None]
    bases = torch.cos(t) * c + torch.sin(t) * o
    pair_rank = torch.randperm(PAIRS, generator=gen)
    angle = torch.acos(1 - (5e-5 + STEP * pair_rank.double()))[:, None]
    mates = torch.cos(angle) * bases + torch.sin(angle) * h
    cand = torch.stack([bases, mates], dim=1).reshape(2 * PAIRS, DIM)
    protected = basis[:, -1][None]  # orthogonal to every candidate
    metric = torch.cat([protected, cand])[None].float()
    c64 = _unit(metric[0, 1:].double())
    energy = torch.nn.functional.elu(c64 @ c64.T).mean(dim=-1)  # margin 0, alpha 1
    return metric, pair_rank, energy.argsort(descending=True)


def expected_bsm_plan(energy_order: torch.Tensor, pair_rank: torch.Tensor, r: int) -> tuple[list[int], list[int]]:
    """Slots and representatives of PiToMe's energy-ordered matching (protected token 0 first, then the
    unmerged A tokens from the most similar edge on, then the B tokens in energy order) from the construction:
    A of pair k is its higher-energy token, its best B its mate, and the r most similar pairs merge."""
    n_cand = 2 * PAIRS
    slot = [0] * (1 + n_cand)
    rep = [0] * (1 + n_cand - r)
    a_of, b_pos = {}, {}
    for q in range(PAIRS):
        a, b = int(energy_order[2 * q]), int(energy_order[2 * q + 1])
        assert a // 2 == b // 2, "construction: the two tokens of a pair must be adjacent in the energy order"
        a_of[a // 2], b_pos[a // 2] = a, q
    for k in range(PAIRS):
        a, b_token = a_of[k], (a_of[k] ^ 1)
        b_slot = 1 + (PAIRS - r) + b_pos[k]
        slot[1 + b_token] = b_slot
        rep[b_slot] = 1 + b_token
        rank = int(pair_rank[k])
        if rank < r:
            slot[1 + a] = b_slot
        else:
            slot[1 + a] = 1 + rank - r
            rep[1 + rank - r] = 1 + a
    return slot, rep


class Plan(torch.nn.Module):
    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = r

    def forward(self, metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return pitome_plan(metric, self.r, 1, 0.0, 1.0, None, True)


@pytest.mark.parametrize("r", [12, 25])
def test_eager_and_onnxruntime_plans_rank_near_tied_pairs_exactly(r, tmp_path):
    import onnxruntime as ort

    metric, pair_rank, energy_order = near_tie_keys()
    slot, rep = expected_bsm_plan(energy_order, pair_rank, r)
    c32 = _unit(metric[0, 1:])
    cos32 = [float(c32[2 * k] @ c32[2 * k + 1]) for k in range(PAIRS)]
    assert len(set(cos32)) < PAIRS - 5, "construction: float32 cosines must tie (else this test checks nothing)"

    eager = pitome_plan(metric, r, 1, 0.0, 1.0, None, True)
    assert eager[0][0].tolist() == slot
    assert eager[1][0].tolist() == rep

    path = tmp_path / "plan.onnx"
    program = torch.onnx.export(Plan(r).eval(), (metric,), dynamo=True, optimize=True, verbose=False)
    assert program is not None
    program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: metric.numpy()})
    assert got[0][0].tolist() == slot
    assert got[1][0].tolist() == rep
    assert torch.equal(torch.from_numpy(got[2]), eager[2])


def test_best_matches_picks_the_nearer_of_two_b_tokens_float32_cosines_cannot_separate():
    """An A token and two B tokens whose `1 - cos` differ by 1e-8 (a sixth of float32's spacing near 1): the
    float32 cosines tie or rank them the wrong way in many trials; `best_matches` always picks the nearer B,
    and its score is the exact `-|a - b|^2 / 4` of the float32 rows."""
    gen = torch.Generator().manual_seed(1)
    unresolved = 0
    for far_first in (True, False):
        for trial in range(8):
            basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64))
            a = basis[:, 0]
            gaps = [5e-5 + 1e-8, 5e-5] if far_first else [5e-5, 5e-5 + 1e-8]  # the nearer B is index 1 or 0
            rows = [math.cos(math.acos(1 - gap)) * a + math.sin(math.acos(1 - gap)) * basis[:, 1 + i]
                    for i, gap in enumerate(gaps)]
            cand = _unit(torch.stack([a, *rows])[None].float())  # token 0 = A, tokens 1, 2 = B candidates
            nearer = 1 if far_first else 0
            cos = (cand[0, 1:] @ cand[0, 0]).tolist()
            unresolved += cos[nearer] <= cos[1 - nearer]
            score, index = best_matches(cand, torch.tensor([[0]]), torch.tensor([[1, 2]]), None, None)
            assert int(index) == nearer, (trial, cos)
            dist64 = float((cand[0, 0].double() - cand[0, 1 + nearer].double()).square().sum())
            assert float(score) == pytest.approx(-dist64 / 4, rel=1e-5)  # -|a - b|^2 / 4 = (cos - 1) / 2
    assert unresolved >= 6, "construction: float32 cosines must fail to order many trials (else nothing is checked)"
