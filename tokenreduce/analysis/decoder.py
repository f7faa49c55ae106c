"""Decoder analysis: find the causal self-attention blocks of a captured LLM / VLM graph and what a prefill
pruning pass must carry along with the hidden states.

Builds on `analysis/encoder.py` (attention spellings, block input, residual add) and adds, per decoder block:

* `kv`: the key and value tensors a KV cache stores (`[B, H_kv, N, d]`, after rotary, before the
  grouped-query `repeat_kv` expansion), found by walking back from the attention's k/v operands through
  pure layout ops.
* `per_token`: operands of the q/k/v paths that come from outside the hidden-state stream, i.e. the
  rotary `cos`/`sin` tables (`q * cos + rotate_half(q) * sin`, Llama). Their axis -2 is the token axis
  by the attention contract (`[B, H|1, N, d]`), so a pass gathers them there.
* the attention mask (`[B|1, 1, N, N]`): both trailing axes are token axes (SDPA contract).

Causality is read from the graph: SDPA's `is_causal`, or a mask built by comparing two position ranges
(`kv_idx <= q_idx` in transformers' `sdpa_mask`; `tril`/`triu` in older code).

Refuses (TokenReduceError): graphs without causal self-attention; blocks whose hidden state is not
`[B, N, C]`. Non-causal blocks (a VLM's vision tower) are listed with the reason they are not pruned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from tokenreduce.analysis.encoder import Attention, Block, analyse_block, find_attention, mask_is_causal
from tokenreduce.errors import TokenReduceError
from tokenreduce.ir.graph import ancestor_linear, args_of, descendants, nodes_between, shape

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
        raise TokenReduceError("no attention found in the graph; tokenreduce's decoder methods need a "
                               "Llama-style model with scaled_dot_product_attention or eager attention")
    decoder: list[DecoderBlock] = []
    skipped: list[tuple[str, str]] = []
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
            skipped.append((blk.name, blk.skip_reason or "no block input found"))
            continue
        decoder.append(DecoderBlock(index=len(decoder), block=blk))
    if not decoder:
        why = "; ".join(f"{n}: {r}" for n, r in skipped[:3])
        raise TokenReduceError(f"no causal self-attention blocks found (is this a decoder LLM?): {why}")
    stream = descendants([decoder[0].block.x_in])  # type: ignore[list-item]
    for db in decoder:
        att = db.attention
        k_src, v_src = _cache_source(att.k), _cache_source(att.v)
        if k_src is not None and v_src is not None and shape(k_src) is not None and len(shape(k_src) or ()) == 4:
            db.kv = (k_src, v_src)
        side: dict[fx.Node, None] = {}
        for operand in (att.q, att.k, att.v):
            proj = ancestor_linear(operand, 16)
            if proj is None:
                continue
            path = nodes_between([proj], [operand])
            db.qkv_path |= path
            for n in path:
                for inp in n.all_input_nodes:
                    if inp not in stream and inp.op == "call_function" and isinstance(inp.meta.get("val"), torch.Tensor):
                        side[inp] = None
        db.per_token = list(side)
    return DecoderAnalysis(blocks=decoder, skipped=skipped, num_tokens=decoder[0].block.num_tokens)


def _decoder_block(index: int, att: Attention) -> Block:
    """`analyse_block` without its causal refusal (which is there for the encoder methods)."""
    causal_free = Attention(att.kind, att.node, att.q, att.k, att.v, att.scale, None, False, att.output,
                            att.mask_add, att.spelling)
    blk = analyse_block(index, causal_free)
    blk.attention = att
    return blk
