"""Independent eager reference for the decoder methods (FastV, PyramidDrop, GemFilter), written from the
papers and the model families' published arithmetic for the tests. It does not import tokenreduce.

A hand-written decoder forward that reads the weights of a `transformers` causal LM (or the language model
of a VLM), prunes the hidden states at the stage layers, and keeps per layer the keys/values and the
original positions of the tokens it saw, so greedy decoding can continue from exactly that cache. It
covers the arithmetic of these families (`config.model_type`):

* llama / qwen2 / mistral (RMSNorm, rotary, grouped-query attention with optional q/k/v bias, SwiGLU;
  Mistral's `sliding_window` on every layer);
* qwen3 (per-head q/k RMSNorm before rotary); olmo2 (q/k RMSNorm over the whole projection, no input
  norm, norms after attention and MLP); phi3 (fused qkv and gate_up, partial rotary);
* gemma (`(1 + w)` RMSNorm, sqrt(hidden) embedding scale, GeGLU); phi (Phi-2: LayerNorm, partial rotary,
  attention and MLP in parallel on one input norm, biased lm_head);
* gemma2 / gemma3_text (`(1 + w)` RMSNorm, sqrt(hidden) embedding scale, `query_pre_attn_scalar`,
  tanh soft-capped attention logits and final logits, sandwich norms, GeGLU, sliding-window layers with
  their own rotary base, per-head q/k norm for Gemma 3);
* gpt2 (LayerNorm, Conv1D `x @ W + b` fused qkv, learned positions, GELU MLP); opt (pre-LN, learned
  positions with offset 2, q scaled before `q @ k^T`, ReLU MLP);
* gpt_neox (fused per-head qkv, partial rotary `rotary_pct`, parallel residual);
* qwen2_vl / qwen2_5_vl language models (mRoPE: 3-axis positions, frequency sections per axis).

A sliding window is measured in original sequence positions: a query at sequence index i sees keys j
with `i - window < j <= i`, whatever was pruned in between.

Its last section holds what the VLM method tests in tests/decoders share: the tiny LLaVA, the LLaVA and
Qwen2-VL prompts, the language model's input embeddings as the model builds them, and the comparison of a
pruned prefill (logits, cache, positions, tokens per block) with the reference's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if offset:  # Gemma: (x_hat * (1 + w)) computed in float32
        return (normed * (offset + w.float())).to(x.dtype)
    return w * normed.to(x.dtype)


def _ln(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _lin(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    y = x @ module.weight.T
    return y + module.bias if getattr(module, "bias", None) is not None else y


def _conv1d(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:  # GPT-2's Conv1D: weight [in, out]
    return x @ module.weight + module.bias


def _rot_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class RefDecoder:
    def __init__(self, causal_lm: torch.nn.Module) -> None:
        lm = causal_lm
        inner = getattr(lm, "model", None) or getattr(lm, "transformer", None) or lm.gpt_neox
        self.text = getattr(inner, "language_model", None) or getattr(inner, "decoder", None) or inner  # OPT: .decoder
        self.lm_head = getattr(lm, "lm_head", None) or lm.embed_out
        cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self.cfg = cfg
        self.family = cfg.model_type.removesuffix("_text")
        self.h = cfg.num_attention_heads
        self.hkv = getattr(cfg, "num_key_value_heads", None) or self.h
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_eps", 1e-5)
        self.gemma = self.family in ("gemma", "gemma2", "gemma3")  # (1 + w) norms, embedding scale, GeGLU
        self.sandwich = self.family in ("gemma2", "gemma3")  # norms after attention and MLP too
        self.layers = list(getattr(self.text, "layers", None) or getattr(self.text, "h", None))
        rp = getattr(cfg, "rope_parameters", None) or {}
        self.layer_types = getattr(cfg, "layer_types", None) or (
            ["sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"] * len(self.layers))
        self.theta, self.rot_dim = {}, {}
        for lt in set(self.layer_types):
            p = rp.get(lt, rp) if isinstance(rp.get(lt), dict) else rp
            assert p.get("rope_type", "default") == "default", "the reference implements default rotary only"
            self.theta[lt] = float(p.get("rope_theta", 10000.0))
            self.rot_dim[lt] = int(self.d * float(p.get("partial_rotary_factor", 1.0)))
        self.mrope = rp.get("mrope_section")
        if self.sandwich:
            self.scaling = cfg.query_pre_attn_scalar ** -0.5
        elif self.family == "gpt2":
            self.scaling = self.d ** -0.5 if cfg.scale_attn_weights else 1.0
        elif self.family == "opt":
            self.scaling = 1.0  # applied to q (see qkv)
        else:
            self.scaling = self.d ** -0.5
        self.softcap = getattr(cfg, "attn_logit_softcapping", None)
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)

    # ------------------------------------------------------------------------------------------ pieces
    def window(self, li: int) -> int | None:
        return self.cfg.sliding_window if self.layer_types[li] == "sliding_attention" else None

    def norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.family in ("gpt2", "gpt_neox", "phi", "opt"):
            return _ln(x, module)
        return _rms(x, module.weight, self.eps, 1.0 if self.gemma else 0.0)

    def embed(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.family == "gpt2":
            return self.text.wte.weight[ids] + self.text.wpe.weight[position_ids]
        if self.family == "opt":  # learned positions stored with an offset of 2
            return self.text.embed_tokens.weight[ids] + self.text.embed_positions.weight[position_ids + 2]
        table = (self.text.embed_in if self.family == "gpt_neox" else self.text.embed_tokens).weight
        x = table[ids]
        if self.gemma:
            x = x * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=x.dtype)
        return x

    def _rotary(self, pos: torch.Tensor, li: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin `[B, 1, n, rot]` for position ids `[B, n]` (or mRoPE `[3, B, n]`)."""
        lt = self.layer_types[li]
        dim = self.rot_dim[lt]
        inv = 1.0 / (self.theta[lt] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        if self.mrope is not None:
            pos3 = pos if pos.dim() == 3 else pos[None].expand(3, *pos.shape)
            f3 = pos3[..., None].float() * inv  # [3, B, n, dim/2]
            axis = torch.cat([torch.full((s,), i % 3) for i, s in enumerate(self.mrope)])  # axis of each freq
            f = f3.gather(0, axis.view(1, 1, 1, -1).expand(1, *f3.shape[1:]))[0]
        else:
            f = pos[..., None].float() * inv
        emb = torch.cat([f, f], dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = cos.shape[-1]
        rot, rest = t[..., :r], t[..., r:]
        return torch.cat([rot * cos + _rot_half(rot) * sin, rest], dim=-1)

    def qkv(self, li: int, x: torch.Tensor, pos: torch.Tensor):  # type: ignore[no-untyped-def]
        """q `[B, H, n, d]`, and k, v as a cache stores them (`[B, H_kv, n, d]`, after rotary)."""
        layer, b, n = self.layers[li], x.shape[0], x.shape[1]

        def heads(t: torch.Tensor, h: int) -> torch.Tensor:
            return t.view(b, n, h, self.d).transpose(1, 2)

        if self.family == "gpt2":
            q, k, v = _conv1d(_ln(x, layer.ln_1), layer.attn.c_attn).split(self.cfg.hidden_size, dim=-1)
            return heads(q, self.h), heads(k, self.h), heads(v, self.h)  # learned positions: no rotary
        if self.family == "opt":  # pre-LN (do_layer_norm_before), q scaled before q @ k^T
            a = layer.self_attn
            xn = _ln(x, layer.self_attn_layer_norm)
            q = _lin(xn, a.q_proj) * self.d ** -0.5
            return heads(q, self.h), heads(_lin(xn, a.k_proj), self.h), heads(_lin(xn, a.v_proj), self.h)
        if self.family == "gpt_neox":
            a = layer.attention
            qkv = _lin(_ln(x, layer.input_layernorm), a.query_key_value).view(b, n, self.h, 3 * self.d)
            q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)
        elif self.family == "phi":  # phi-2: LayerNorm, q/k/v with bias, partial rotary
            a = layer.self_attn
            xn = _ln(x, layer.input_layernorm)
            q, k, v = heads(_lin(xn, a.q_proj), self.h), heads(_lin(xn, a.k_proj), self.hkv), heads(_lin(xn, a.v_proj), self.hkv)
        elif self.family == "phi3":
            a = layer.self_attn
            qkv = _lin(self.norm(layer.input_layernorm, x), a.qkv_proj)
            qd, kd = self.h * self.d, self.hkv * self.d
            q, k, v = heads(qkv[..., :qd], self.h), heads(qkv[..., qd:qd + kd], self.hkv), heads(qkv[..., qd + kd:], self.hkv)
        else:
            a = layer.self_attn
            xn = x if self.family == "olmo2" else self.norm(layer.input_layernorm, x)
            q, k, v = _lin(xn, a.q_proj), _lin(xn, a.k_proj), _lin(xn, a.v_proj)
            if self.family == "olmo2":  # norm over the whole projection, before the head split
                q, k = self.norm(a.q_norm, q), self.norm(a.k_norm, k)
            q, k, v = heads(q, self.h), heads(k, self.hkv), heads(v, self.hkv)
            if self.family in ("qwen3", "gemma3"):  # per-head norm
                q, k = self.norm(a.q_norm, q), self.norm(a.k_norm, k)
        cos, sin = self._rotary(pos, li)
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def attend(self, li: int, q, k, v, allowed):  # type: ignore[no-untyped-def]
        rep = self.h // self.hkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        logits = (q @ k.transpose(-1, -2)) * self.scaling
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        logits = logits.masked_fill(~allowed[:, None], torch.finfo(logits.dtype).min)
        p = logits.float().softmax(-1).to(q.dtype)
        return p @ v, p

    def finish(self, li: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        layer, (b, _, n, _) = self.layers[li], out.shape
        o = out.transpose(1, 2).reshape(b, n, -1)
        if self.family == "gpt2":
            h = x + _conv1d(o, layer.attn.c_proj)
            m = layer.mlp
            act = F.gelu(_conv1d(_ln(h, layer.ln_2), m.c_fc), approximate="tanh")
            return h + _conv1d(act, m.c_proj)
        if self.family == "gpt_neox":
            attn = _lin(o, layer.attention.dense)
            m = layer.mlp
            src = x if self.cfg.use_parallel_residual else x + attn
            mlp = _lin(F.gelu(_lin(_ln(src, layer.post_attention_layernorm), m.dense_h_to_4h)), m.dense_4h_to_h)
            return x + attn + mlp if self.cfg.use_parallel_residual else src + mlp
        if self.family == "opt":
            h = x + _lin(o, layer.self_attn.out_proj)
            return h + _lin(F.relu(_lin(_ln(h, layer.final_layer_norm), layer.fc1)), layer.fc2)
        if self.family == "phi":  # parallel: attention and MLP both read the same input norm
            m = layer.mlp
            xn = _ln(x, layer.input_layernorm)
            mlp = _lin(F.gelu(_lin(xn, m.fc1), approximate="tanh"), m.fc2)
            return x + _lin(o, layer.self_attn.dense) + mlp
        attn = _lin(o, layer.self_attn.o_proj)
        m = layer.mlp
        if self.sandwich:
            h = x + self.norm(layer.post_attention_layernorm, attn)
            xn = self.norm(layer.pre_feedforward_layernorm, h)
            mlp = _lin(_gelu_tanh(_lin(xn, m.gate_proj)) * _lin(xn, m.up_proj), m.down_proj)
            return h + self.norm(layer.post_feedforward_layernorm, mlp)
        if self.family == "olmo2":
            h = x + self.norm(layer.post_attention_layernorm, attn)
            mlp = _lin(F.silu(_lin(h, m.gate_proj)) * _lin(h, m.up_proj), m.down_proj)
            return h + self.norm(layer.post_feedforward_layernorm, mlp)
        h = x + attn
        xn = self.norm(layer.post_attention_layernorm, h)
        if self.gemma:  # Gemma (1): pre-norm residuals with a GeGLU MLP
            return h + _lin(_gelu_tanh(_lin(xn, m.gate_proj)) * _lin(xn, m.up_proj), m.down_proj)
        if self.family == "phi3":
            gate, up = _lin(xn, m.gate_up_proj).chunk(2, dim=-1)
            return h + _lin(F.silu(gate) * up, m.down_proj)
        return h + _lin(F.silu(_lin(xn, m.gate_proj)) * _lin(xn, m.up_proj), m.down_proj)

    def logits(self, x_last: torch.Tensor) -> torch.Tensor:
        final = {"gpt2": "ln_f", "gpt_neox": "final_layer_norm", "phi": "final_layernorm",
                 "opt": "final_layer_norm"}.get(self.family, "norm")
        out = _lin(self.norm(getattr(self.text, final), x_last), self.lm_head)
        if self.final_softcap is not None:
            out = torch.tanh(out / self.final_softcap) * self.final_softcap
        return out

    def allowed(self, li: int, q_idx: torch.Tensor, k_idx: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        """`[B, nq, nk]`: causal in original sequence positions, padding, and the layer's window."""
        ok = (k_idx[:, None, :] <= q_idx[:, :, None]) & key_ok[:, None, :]
        w = self.window(li)
        if w is not None:
            ok &= k_idx[:, None, :] > q_idx[:, :, None] - w
        return ok

    # ------------------------------------------------------------------------------------------ methods
    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor, span: torch.Tensor,
                stages: list[tuple[int, int, int]], pool: int = 1, position_ids: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
        """stages: (score_layer, first_pruned_layer, keep) as in the papers (FastV: (K-1, K, keep);
        GemFilter: (L, 0, k)). `position_ids`: `[B, N]` (default: from the padding mask) or mRoPE
        `[3, B, N]`. Returns last logits [B, V] and per layer (k, v, original positions)."""
        b, n, _ = embeds.shape
        if position_ids is None:
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)

        def pos_of(idx: torch.Tensor) -> torch.Tensor:
            if position_ids.dim() == 3:
                return position_ids.gather(2, idx[None].expand(3, *idx.shape))
            return position_ids.gather(1, idx)

        idx = torch.arange(n).expand(b, n)
        gem = [s for s in stages if s[0] >= s[1]]
        if gem:  # GemFilter: a filter pass over the first L+1 layers on all tokens
            score_layer, _, keep = gem[0]
            x = embeds
            for li in range(score_layer + 1):
                q, k, v = self.qkv(li, x, position_ids)
                out, p = self.attend(li, q, k, v, self.allowed(li, idx, idx, mask.bool()))
                x = self.finish(li, x, out)
            keep_idx = _select(_pool(p[:, :, -1].float().mean(1), pool), span, keep)
            x, idx = _take(embeds, keep_idx), keep_idx
            stages = []
        else:
            x = embeds
        droppable = span.gather(1, idx)
        cache, last_scores = [], None
        by_first = {s[1]: s for s in stages}
        for li in range(len(self.layers)):
            if li in by_first:
                keep_idx = _select(_pool(last_scores, pool), droppable, by_first[li][2])
                x = _take(x, keep_idx)
                idx = idx.gather(1, keep_idx)
                droppable = droppable.gather(1, keep_idx)
            q, k, v = self.qkv(li, x, pos_of(idx))
            out, p = self.attend(li, q, k, v, self.allowed(li, idx, idx, mask.bool().gather(1, idx)))
            last_scores = p[:, :, -1].float().mean(1)
            cache.append([k, v, idx.clone()])
            x = self.finish(li, x, out)
        return self.logits(x[:, -1]), cache

    @torch.no_grad()
    def decode(self, first_logits, cache, mask, steps: int, embed=None, next_pos=None):  # type: ignore[no-untyped-def]
        """Greedy decoding from a prefill cache; returns the `steps` generated ids [B, steps]. `embed`
        maps token ids to input embeddings (default: this reference's own `embed`); `next_pos` is the
        next position id per row (default: the number of real prompt tokens; mRoPE: the rope delta added)."""
        b, n = mask.shape
        if next_pos is None:
            next_pos = mask.sum(-1)
        tok = first_logits.argmax(-1)
        out_ids = [tok]
        key_ok = [mask.bool().gather(1, c[2]) for c in cache]
        key_idx = [c[2] for c in cache]
        for t in range(steps - 1):
            pos = (next_pos + t)[:, None]
            x = self.embed(tok[:, None], pos) if embed is None else embed(tok)[:, None]
            q_idx = torch.full((b, 1), n + t)
            for li in range(len(self.layers)):
                q, k, v = self.qkv(li, x, pos)
                cache[li][0] = torch.cat([cache[li][0], k], dim=2)
                cache[li][1] = torch.cat([cache[li][1], v], dim=2)
                key_ok[li] = torch.cat([key_ok[li], torch.ones(b, 1, dtype=torch.bool)], dim=1)
                key_idx[li] = torch.cat([key_idx[li], q_idx], dim=1)
                out, _ = self.attend(li, q, cache[li][0], cache[li][1], self.allowed(li, q_idx, key_idx[li], key_ok[li]))
                x = self.finish(li, x, out)
            tok = self.logits(x[:, -1]).argmax(-1)
            out_ids.append(tok)
        return torch.stack(out_ids, dim=1)


RefLlama = RefDecoder  # the name the Llama / LLaVA tests use


def _select(scores: torch.Tensor, droppable: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of every non-droppable token plus the `keep` best droppable ones per row."""
    rows = []
    for s, d in zip(scores, droppable):
        cand = torch.nonzero(d).flatten()
        best = cand[torch.sort(s[cand], descending=True, stable=True).indices[:keep]]
        rows.append(torch.sort(torch.cat([torch.nonzero(~d).flatten(), best])).values)
    return torch.stack(rows)


def _pool(scores: torch.Tensor, window: int) -> torch.Tensor:
    """Each token's score replaced by the max over itself and `window // 2` neighbours on each side."""
    if window == 1:
        return scores
    h = window // 2
    padded = torch.nn.functional.pad(scores, (h, h), value=float("-inf"))
    return padded.unfold(-1, window, 1).max(-1).values


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[-1]))


# ------------------------------------------------------------------------------ selection methods (VLM)
# Pure-python selections, written from the papers / official code's arithmetic, on plain float lists.
def _cos(a: list[float], b: list[float]) -> float:
    na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
    return sum(x * y for x, y in zip(a, b)) / max(na, 1e-12) / max(nb, 1e-12) if na and nb else 0.0


def divprune_select(feats: list[list[float]], keep: int) -> list[int]:
    """DivPrune's greedy max-min diversity (Alvar et al., CVPR 2025): indices into `feats` in the order
    chosen. First the token whose nearest other token is farthest (cosine distance), then repeatedly the
    unchosen token whose smallest distance to the chosen ones is largest; ties to the earlier token."""
    s = len(feats)
    d = [[1.0 - _cos(feats[i], feats[j]) for j in range(s)] for i in range(s)]
    nearest = [min((d[i][j] for j in range(s) if j != i), default=math.inf) for i in range(s)]
    chosen = [max(range(s), key=lambda i: (nearest[i], -i))]
    while len(chosen) < keep:
        rest = [i for i in range(s) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(d[c][i] for c in chosen), -i)))
    return chosen


def dart_select(feats: list[list[float]], l1: list[float], span: list[bool], real: list[bool], keep: int,
                pivot_image: int, pivot_text: int) -> list[int]:
    """DART (Wen et al., 2025): positions of the kept span tokens of one row. Pivots: the `pivot_image`
    span tokens and the `pivot_text` real tokens after the span with the largest key L1 norm (the best text
    pivot repeated when there are fewer); image pivots are kept; then every pivot in sequence order takes
    its share of `keep - pivot_image` (equal, remainder to the first pivots) among the remaining span tokens
    least cosine-similar to it."""
    n = len(feats)
    cand = [i for i in range(n) if span[i]]
    img = sorted(cand, key=lambda i: -l1[i])[:pivot_image]
    last = max(cand)
    after = [i for i in range(n) if i > last and real[i] and not span[i]]
    txt = sorted(after, key=lambda i: -l1[i])[:pivot_text]
    txt += txt[:1] * (pivot_text - len(txt))
    pivots = sorted(img + txt)
    kept, remaining = list(img), [i for i in cand if i not in img]
    base, extra = divmod(keep - pivot_image, len(pivots))
    for j, p in enumerate(pivots):
        budget = base + (1 if j < extra else 0)
        best = sorted(remaining, key=lambda i: _cos(feats[p], feats[i]))[:budget]
        kept += best
        remaining = [i for i in remaining if i not in best]
    return sorted(kept)


def select_prefill(ref: RefDecoder, embeds: torch.Tensor, mask: torch.Tensor, span: torch.Tensor, layer: int,
                   choose, position_ids: torch.Tensor | None = None,
                   fastv: Sequence[tuple[int, int]] = ()):  # type: ignore[no-untyped-def]
    """A prefill that keeps, from block `layer` on, the non-span tokens plus the span tokens `choose` picks:
    `choose(row, x_row [N, C], keys_prev_row [H_kv, N, d] or None, real_row [N])` -> kept span positions.
    `fastv`: (block K, keep) stages after it, FastV's: block K-1's last-query attention (head mean) keeps the
    `keep` best remaining span tokens from block K on.
    Returns last logits and per layer (k, v, original positions), like `RefDecoder.prefill`."""
    b, n, _ = embeds.shape
    if position_ids is None:
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)

    def pos_of(idx: torch.Tensor) -> torch.Tensor:
        if position_ids.dim() == 3:
            return position_ids.gather(2, idx[None].expand(3, *idx.shape))
        return position_ids.gather(1, idx)

    idx = torch.arange(n).expand(b, n)
    x, cache, keys_prev, last_scores = embeds, [], None, None
    later = dict(fastv)
    for li in range(len(ref.layers)):
        if li in later:
            keep_idx = _select(last_scores, span.gather(1, idx), later[li])
            x, idx = _take(x, keep_idx), idx.gather(1, keep_idx)
        if li == layer:
            rows = []
            for r in range(b):
                kept = choose(r, x[r], None if keys_prev is None else keys_prev[r], mask[r].bool())
                rows.append(torch.tensor(sorted([i for i in range(n) if not span[r, i]] + list(kept))))
            keep_idx = torch.stack(rows)
            x, idx = _take(x, keep_idx), keep_idx
        q, k, v = ref.qkv(li, x, pos_of(idx))
        out, p = ref.attend(li, q, k, v, ref.allowed(li, idx, idx, mask.bool().gather(1, idx)))
        last_scores = p[:, :, -1].float().mean(1)
        cache.append([k, v, idx.clone()])
        keys_prev = k
        x = ref.finish(li, x, out)
    return ref.logits(x[:, -1]), cache


# ------------------------------------------------------------------------------------------- shared by the VLM tests
# The tiny VLMs, prompts and checks the VLM method tests in tests/decoders share (kept here, beside the reference
# they feed, so each test file does not write them again).
IMG_ID, N_IMG = 150, 16  # LLaVA's image token id and the tokens one 32 x 32 image (patch 8) becomes


def sharpened(model, factor: float = 8):  # type: ignore[no-untyped-def]
    """Sharper attention than random init's near-uniform one (the language model's q/k weights times `factor`),
    so a wrong selection or position changes the tokens."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight *= factor
            layer.self_attn.k_proj.weight *= factor
    return model


def tiny_llava(vision_layers: int = 2):  # type: ignore[no-untyped-def]
    """A random-init LLaVA (CLIP tower `vision_layers` layers, Llama LM 4 layers, SDPA, image token `IMG_ID`), the
    LM's q/k sharpened x4."""
    import transformers

    torch.manual_seed(0)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                                       num_attention_heads=2, image_size=32, patch_size=8)
    tc = transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG_ID, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    cfg._attn_implementation = "sdpa"
    return sharpened(transformers.LlavaForConditionalGeneration(cfg).eval(), 4)


def llava_prompt():  # type: ignore[no-untyped-def]
    """Two rows: 3 text tokens, `N_IMG` image tokens, 5 text tokens; row 1 left-padded by two. (ids, mask, pixels)"""
    torch.manual_seed(1)
    ids = torch.cat([torch.randint(3, 100, (2, 3)), torch.full((2, N_IMG), IMG_ID), torch.randint(3, 100, (2, 5))], 1)
    ids[1, :2] = 0
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in row 1
    return ids, mask, torch.randn(2, 3, 32, 32)


def qwen_prompt():  # type: ignore[no-untyped-def]
    """For `decoders.families.build("qwen2_vl")`. Two rows, each: text, an image (grid [1, 8, 8] -> 16 tokens),
    text, a video ([2, 4, 4] -> 8 tokens), the question; row 1 left-padded by two. (ids, mask, media kwargs)"""
    from decoders.families import IMAGE, VIDEO, VISION_END, VISION_START

    torch.manual_seed(2)

    def row(pad: int) -> torch.Tensor:
        def text(k: int) -> torch.Tensor:
            return torch.randint(3, 100, (k,))

        return torch.cat([torch.zeros(pad, dtype=torch.long), text(5 - pad), torch.tensor([VISION_START]),
                          torch.full((16,), IMAGE), torch.tensor([VISION_END]), text(2), torch.tensor([VISION_START]),
                          torch.full((8,), VIDEO), torch.tensor([VISION_END]), text(4)])

    ids = torch.stack([row(0), row(2)])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    media = dict(pixel_values=torch.randn(2 * 64, 3 * 2 * 14 * 14), image_grid_thw=torch.tensor([[1, 8, 8]] * 2),
                 pixel_values_videos=torch.randn(2 * 32, 3 * 2 * 14 * 14), video_grid_thw=torch.tensor([[2, 4, 4]] * 2))
    return ids, mask, media


class QwenCase(NamedTuple):
    """The sharpened tiny Qwen2-VL on `qwen_prompt()`, with what the model itself builds from it."""
    model: torch.nn.Module
    ids: torch.Tensor
    mask: torch.Tensor
    media: dict
    embeds: torch.Tensor  # the language model's input embeddings
    positions: torch.Tensor  # its 3-axis (mRoPE) position ids
    span: torch.Tensor  # image and video tokens
    deltas: torch.Tensor  # `model.model.rope_deltas` after that forward (where decoding continues)


def qwen_case() -> QwenCase:
    """`decoders.families.build("qwen2_vl")`, q/k sharpened x8, on `qwen_prompt()`."""
    from decoders.families import IMAGE, VIDEO, build

    model = sharpened(build("qwen2_vl"))
    ids, mask, media = qwen_prompt()
    types = torch.zeros_like(ids, dtype=torch.int).masked_fill(ids == IMAGE, 1).masked_fill(ids == VIDEO, 2)
    embeds, positions = embeds_of(model, ids, mask, mm_token_type_ids=types, **media)
    return QwenCase(model, ids, mask, media, embeds, positions, (ids == IMAGE) | (ids == VIDEO),
                    model.model.rope_deltas)


def check_qwen_prefill_and_decode(dec, pre, ref: RefDecoder, ref_logits, ref_cache,  # type: ignore[no-untyped-def]
                                  case: QwenCase) -> None:
    """`check_prefill`, then 4 greedy tokens of `dec.generate` equal the reference's decoding from its cache,
    which continues at each row's real length plus the mRoPE offset."""
    ids, mask = case.ids, case.mask
    check_prefill(dec, pre, ref_logits, ref_cache, mask)
    out = dec.generate(ids, mask, max_new_tokens=4, **case.media)
    steps = ref.decode(ref_logits, ref_cache, mask, 4, next_pos=mask.sum(-1) + case.deltas[:, 0])
    n = ids.shape[1]
    assert torch.equal(out[:, :n], ids) and torch.equal(out[:, n:], steps)


def embeds_of(model, ids, mask, **media):  # type: ignore[no-untyped-def]
    """The language model's input embeddings and position ids, as the model itself builds them."""
    grabbed: dict = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, k: grabbed.update(k), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **media)
    handle.remove()
    return grabbed["inputs_embeds"], grabbed.get("position_ids")


def check_prefill(dec, pre, ref_logits, ref_cache, mask):  # type: ignore[no-untyped-def]
    """A `reduce_decoder` prefill `pre` (of `dec`) against the reference's: last logits, every layer's cached
    keys/values (at real tokens) and kept original positions, and the report's tokens per block."""
    torch.testing.assert_close(pre.logits, ref_logits, atol=1e-4, rtol=1e-4)
    for layer, (k, v, idx) in zip(pre.cache.layers, ref_cache, strict=True):
        assert torch.equal(layer.positions, idx)
        valid = mask.bool().gather(1, idx)[:, None, :, None]  # padding keys hold don't-care values
        torch.testing.assert_close(layer.keys * valid, k * valid, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.values * valid, v * valid, atol=1e-4, rtol=1e-4)
    assert dec.report.tokens_per_block == [c[2].shape[1] for c in ref_cache]
