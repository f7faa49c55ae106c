"""Decoder analysis: find the causal self-attention blocks of a captured LLM / VLM graph and what a prefill
pruning pass must carry along with the hidden states.

Builds on `analysis/encoder.py` (attention spellings, block input, residual add) and adds, per decoder block:

* `kv`: the key and value tensors a KV cache stores (`[B, H_kv, N, d]`, after rotary, before the
  grouped-query `repeat_kv` expansion), found by walking back from the attention's k/v operands through
  pure layout ops.
* `side_inputs()`: tensors entering the q/k/v path from outside the hidden-state stream that carry the
  token axis -- the rotary `cos`/`sin` tables (`q * cos + rotate_half(q) * sin`, Llama; only the rotated
  part of a partial rotary, GPT-NeoX / Phi-3; after q/k norms, Qwen3 / OLMo2 / Gemma 3; mRoPE's tables
  after its 3-axis sections are combined, Qwen2-VL). The block analysis (`Block.side_inputs`) names
  them with their token axes; for blocks it found none on, this module's own walk is the fallback: an
  operand of the path from the block input to q/k/v, not computed from the hidden-state stream, whose
  axis -2 has the token count (`[B, H|1, N, d]`, the attention contract).
* the attention mask (`[B|1, 1, N, N]`): both trailing axes are token axes (SDPA contract). A sliding
  window (Gemma 2/3 local layers, Mistral) is part of the mask, so gathering it by kept original
  positions keeps the window in original positions.

Causality is read from the graph: SDPA's `is_causal`, or a mask built by comparing two position ranges
(`kv_idx <= q_idx` in transformers' `sdpa_mask`; `tril`/`triu` in older code).

Refuses (TokenReduceError): graphs without causal self-attention; any causal self-attention block the
block analysis could not take apart (its reason -- the construct -- prefixed by the block name: the
methods prune between blocks and cache every layer, so no block may be missing). Non-causal blocks (a
VLM's vision tower) are listed with the reason they are not pruned.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import fx

from tokenreduce.analysis.encoder import Attention, Block, analyse_block, find_attention, mask_is_causal
from tokenreduce.errors import TokenReduceError
from tokenreduce.ir import patterns as P
from tokenreduce.ir.graph import args_of, descendants, nodes_between, shape

aten = torch.ops.aten
# Pure layout ops between the cached k/v and the attention operand (repeat_kv: unsqueeze+expand+reshape).
_KV_LAYOUT = {aten.reshape.default, aten.view.default, aten.expand.default, aten.unsqueeze.default,
              aten.clone.default, aten.contiguous.default, aten._unsafe_view.default}


@dataclass
class DecoderBlock:
    index: int  # among the decoder blocks (0-based), the index users pass in `layers`
    block: Block
    kv: tuple[fx.Node, fx.Node] | None = None
    per_token: list[fx.Node] = field(default_factory=list)
    qkv_path: set[fx.Node] = field(default_factory=set)  # nodes from the q/k/v projections to the attention

    @property
    def attention(self) -> Attention:
        return self.block.attention

    def side_inputs(self) -> list[tuple[fx.Node, tuple[int, ...], list[fx.Node]]]:
        """(tensor, its token axes, the nodes of this block that read it) for every per-token side input:
        the block analysis's `Block.side_inputs` where it found some, else this module's `per_token`."""
        # weights are never per-token (a [C, C] projection weight can look like one when N == C)
        found = [(si.node, tuple(si.axes), list(si.users)) for si in self.block.side_inputs
                 if si.node.op == "call_function"]
        if not found:
            found = [(n, (-2,), []) for n in self.per_token]
        # every reader on this block's q/k/v path (q's and k's rotary muls alike), plus any the analysis named
        return [(n, axes, list(dict.fromkeys(users + [u for u in n.users if u in self.qkv_path])))
                for n, axes, users in found]


@dataclass
class DecoderAnalysis:
    blocks: list[DecoderBlock]
    skipped: list[tuple[str, str]]  # (block name, reason) of attention blocks that are not decoder blocks
    num_tokens: int


def is_causal(att: Attention) -> bool:
    return att.is_causal or mask_is_causal(att.mask)


def _cache_source(node: object) -> fx.Node | None:
    while isinstance(node, fx.Node) and node.target in _KV_LAYOUT:
        node = args_of(node)[0]
    return node if isinstance(node, fx.Node) else None


def analyse_decoder(gm: fx.GraphModule) -> DecoderAnalysis:
    attentions = find_attention(gm)
    if not attentions:
        raise TokenReduceError("no attention found in the graph: looked for scaled_dot_product_attention and for "
                               "matmul/bmm -> softmax -> matmul (eager attention)" + _softmax_sources(gm) +
                               "; the decoder methods rank tokens by the attention of the last query, so the model "
                               "needs one of these spellings")
    decoder: list[DecoderBlock] = []
    skipped: list[tuple[str, str]] = []
    broken: list[tuple[str, str]] = []  # causal self-attention blocks the block analysis could not take apart
    for i, att in enumerate(attentions):
        blk = _decoder_block(i, att)
        if not is_causal(att):
            skipped.append((blk.name, "bidirectional attention (e.g. a VLM's vision tower); the decoder methods "
                                      "prune the language model's prefill"))
            continue
        qs, ks = shape(att.q), shape(att.k)
        if qs is None or ks is None or qs[-2] != ks[-2]:
            skipped.append((blk.name, "cross-attention or cached keys; only prefill self-attention is pruned"))
            continue
        if blk.x_in is None:
            broken.append((blk.name, blk.skip_reason or "no block input found"))
            continue
        decoder.append(DecoderBlock(index=len(decoder), block=blk))
    if broken:
        # every decoder block must be found: the methods prune between blocks, `layers` counts them, and the
        # KV cache needs every layer's keys and values
        why = "; ".join(f"{n}: {r}" for n, r in broken[:3]) + ("; ..." if len(broken) > 3 else "")
        raise TokenReduceError(f"{len(broken)} of {len(broken) + len(decoder)} causal self-attention blocks cannot "
                               f"be pruned between: {why}")
    if not decoder:
        why = "; ".join(f"{n}: {r}" for n, r in skipped[:3])
        raise TokenReduceError(f"no causal self-attention found (is this a decoder LLM?): {why}")
    stream = descendants([decoder[0].block.x_in])  # type: ignore[list-item]
    for db in decoder:
        att = db.attention
        k_src, v_src = _cache_source(att.k), _cache_source(att.v)
        if k_src is not None and v_src is not None and shape(k_src) is not None and len(shape(k_src) or ()) == 4:
            db.kv = (k_src, v_src)
        x_in = db.block.x_in
        assert x_in is not None
        db.qkv_path = nodes_between([x_in], [att.q, att.k, att.v])
        side: dict[fx.Node, None] = {}
        n = db.block.num_tokens
        for node in db.qkv_path - {x_in}:
            for inp in node.all_input_nodes:
                if inp in stream or inp.op != "call_function":
                    continue
                s = shape(inp)
                if s is not None and len(s) >= 2 and s[-2] == n:
                    side[inp] = None
        db.per_token = list(side)
    return DecoderAnalysis(blocks=decoder, skipped=skipped, num_tokens=decoder[0].block.num_tokens)


def _softmax_sources(gm: fx.GraphModule) -> str:
    """What feeds the graph's softmaxes, when none of them was recognised as attention (names the construct:
    e.g. Bloom's ALiBi logits come from `baddbmm`)."""
    ops: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in P.SOFTMAX:
            src = args_of(node)[0]
            for _ in range(8):  # past casts, layout ops and the mask add/fill
                if not isinstance(src, fx.Node) or src.op != "call_function":
                    break
                name = getattr(src.target, "__name__", str(src.target)).split(".")[0]
                if name not in ("add", "_to_copy", "to", "masked_fill", "where", "mul", "div", "view", "reshape",
                                "_unsafe_view", "clone", "contiguous", "expand"):
                    ops[name] = None
                    break
                src = args_of(src)[0]
    if not ops:
        return ""
    return f"; the graph's softmax logits come from {', '.join(ops)}, which is not one of them"


def _decoder_block(index: int, att: Attention) -> Block:
    """`analyse_block` without its causal and window refusals (which are there for the encoder methods:
    a decoder method keeps the causal, windowed mask and gathers it by kept original positions)."""
    free = dataclasses.replace(att, mask=None, is_causal=False)
    if hasattr(free, "window"):
        free = dataclasses.replace(free, window=None)
    blk = analyse_block(index, free)
    blk.attention = att
    return blk
