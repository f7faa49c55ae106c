"""What the model matrix expects of every family today: family -> check -> outcome.

Every check not listed for a family is expected to work. An entry is "refused: <substring of the
TokenReduceError>", "unreduced: <substring of the skip reason>", "wrong: <substring>", "crash: <ExceptionType>"
(a bug: tokenreduce must refuse by name, never raise a raw exception) or "n/a: <why>".
`docs/support.md` is generated from this table (`python scripts/support_table.py`; a test keeps it in sync);
`python scripts/support_table.py --run` lists every cell a run measures differently.
"""

from __future__ import annotations

from matrix.builders import FAMILIES
from matrix.harness import checks_of

PVT = ("spatial-reduction attention (256 queries over 4 keys computed from a downsampled copy of the tokens, "
       "PVT-style); token reduction would change the keys' spatial grid")
CAUSAL = "causal attention (decoder); encoder methods (ToMe/EViT) need bidirectional attention"

# Models without a CLS token (SigLIP, GAP ViTs, CaiT's self-attention stage, Wav2Vec2, Whisper) work with EViT:
# its default score="auto" ranks their tokens by the attention each receives (methods/evit.py).
KNOWN: dict[str, dict[str, str]] = {
    "timm-pvt-v2": {"evit": f"unreduced: {PVT}", "tome": f"unreduced: {PVT}", "pitome": f"unreduced: {PVT}"},
    "hf-clip-text": {"evit": f"unreduced: {CAUSAL}", "tome": f"unreduced: {CAUSAL}",
                     "pitome": f"unreduced: {CAUSAL}"},
    # 3 layers, global attention every 3rd: EViT at block 1 meets the local (windowed) blocks 1 and 2; the
    # ONNX file differs from the eager graph by 0.013 even unreduced (method none)
    "hf-modernbert": {"evit": "unreduced: a later block (2, layers.2) uses sliding-window attention (window 5); a "
                              "merged token mixes tokens of different windows",
                      # the UNMODIFIED model's own export differs from eager (0.013) at one padding query whose
                      # whole local window is padding; without such a window the reduced export verifies
                      # (tests/targets/test_onnx_families.py)
                      "onnx": "refused: ONNX verification failed: onnxruntime differs from the eager reduced model"},
    # the model's own random masking (argsort of the noise) is a TopK whose k is not a constant: not export-safe
    "hf-vit-mae": {"onnx": "refused: TopK k is not a constant"},
}
EXPECTED: dict[str, dict[str, str]] = {f: dict(KNOWN.get(f, {})) for f in FAMILIES}


def expected(family: str, check: str) -> str:
    if check not in checks_of(family):
        raise KeyError(f"{family} has no check {check!r}")
    return EXPECTED[family].get(check, "works")
