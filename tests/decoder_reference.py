"""Independent eager reference for the decoder methods (FastV, PyramidDrop, GemFilter) on Llama-style
models, written from the papers for the tests. It does not import tokenreduce.

A hand-written Llama forward (RMSNorm, rotary, grouped-query attention, SwiGLU MLP) that reads the
weights of a `transformers` `LlamaForCausalLM` (or the language model of a LLaVA), prunes the hidden
states at the stage layers, and keeps per layer the keys/values and the original positions of the
tokens it saw, so greedy decoding can continue from exactly that cache.
"""

from __future__ import annotations

import torch


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotary(pos: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    f = pos[..., None].float() * inv
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def _rot_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class RefLlama:
    def __init__(self, causal_lm: torch.nn.Module) -> None:
        lm = causal_lm
        inner = lm.model
        self.text = getattr(inner, "language_model", inner)
        self.lm_head = lm.lm_head
        cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self.h, self.hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        rp = getattr(cfg, "rope_parameters", None) or {}
        self.theta = float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))

    def _layer_qkv(self, layer, x, pos):  # type: ignore[no-untyped-def]
        a = layer.self_attn
        b, n, _ = x.shape
        xn = _rms(x, layer.input_layernorm.weight, self.eps)
        q = (xn @ a.q_proj.weight.T).view(b, n, self.h, self.d).transpose(1, 2)
        k = (xn @ a.k_proj.weight.T).view(b, n, self.hkv, self.d).transpose(1, 2)
        v = (xn @ a.v_proj.weight.T).view(b, n, self.hkv, self.d).transpose(1, 2)
        cos, sin = _rotary(pos, self.d, self.theta)
        cos, sin = cos[:, None], sin[:, None]
        return q * cos + _rot_half(q) * sin, k * cos + _rot_half(k) * sin, v

    def _attend(self, q, k, v, allowed):  # type: ignore[no-untyped-def]
        rep = self.h // self.hkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        logits = (q @ k.transpose(-1, -2)) / self.d ** 0.5
        logits = logits.masked_fill(~allowed[:, None], torch.finfo(logits.dtype).min)
        p = logits.softmax(-1)
        return p @ v, p

    def _finish(self, layer, x, out):  # type: ignore[no-untyped-def]
        b, _, n, _ = out.shape
        x = x + out.transpose(1, 2).reshape(b, n, -1) @ layer.self_attn.o_proj.weight.T
        m = layer.mlp
        xn = _rms(x, layer.post_attention_layernorm.weight, self.eps)
        return x + (torch.nn.functional.silu(xn @ m.gate_proj.weight.T) * (xn @ m.up_proj.weight.T)) @ m.down_proj.weight.T

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor, span: torch.Tensor,
                stages: list[tuple[int, int, int]], pool: int = 1):  # type: ignore[no-untyped-def]
        """stages: (score_layer, first_pruned_layer, keep) as in the papers (FastV: (K-1, K, keep);
        GemFilter: (L, 0, k)). Returns last logits [B, V] and per layer (k, v, original positions)."""
        b, n, _ = embeds.shape
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        layers = list(self.text.layers)
        idx = torch.arange(n).expand(b, n)
        gem = [s for s in stages if s[0] >= s[1]]
        if gem:  # GemFilter: a filter pass over the first L+1 layers on all tokens
            score_layer, _, keep = gem[0]
            x = embeds
            for li in range(score_layer + 1):
                q, k, v = self._layer_qkv(layers[li], x, position_ids)
                allowed = (idx[:, None, :] <= idx[:, :, None]) & mask.bool()[:, None, :]
                out, p = self._attend(q, k, v, allowed)
                x = self._finish(layers[li], x, out)
            keep_idx = _select(_pool(p[:, :, -1].mean(1), pool), span, keep)
            x, idx = _take(embeds, keep_idx), keep_idx
            stages = []
        else:
            x = embeds
        droppable = span.gather(1, idx)
        cache, last_scores = [], None
        by_first = {s[1]: s for s in stages}
        for li, layer in enumerate(layers):
            if li in by_first:
                keep_idx = _select(_pool(last_scores, pool), droppable, by_first[li][2])
                x = _take(x, keep_idx)
                idx = idx.gather(1, keep_idx)
                droppable = droppable.gather(1, keep_idx)
            q, k, v = self._layer_qkv(layer, x, position_ids.gather(1, idx))
            allowed = (idx[:, None, :] <= idx[:, :, None]) & mask.bool().gather(1, idx)[:, None, :]
            out, p = self._attend(q, k, v, allowed)
            last_scores = p[:, :, -1].mean(1)
            cache.append([k, v, idx.clone()])
            x = self._finish(layer, x, out)
        logits = _rms(x, self.text.norm.weight, self.eps)[:, -1] @ self.lm_head.weight.T
        return logits, cache

    @torch.no_grad()
    def decode(self, first_logits, cache, mask, steps: int, embed):  # type: ignore[no-untyped-def]
        """Greedy decoding from a prefill cache; returns the `steps` generated ids [B, steps]."""
        layers = list(self.text.layers)
        b, n = mask.shape
        next_pos = mask.sum(-1)  # next position id per row (left padding)
        tok = first_logits.argmax(-1)
        out_ids = [tok]
        key_ok = [mask.bool().gather(1, c[2]) for c in cache]
        for t in range(steps - 1):
            x = embed(tok)[:, None]
            pos = (next_pos + t)[:, None]
            for li, layer in enumerate(layers):
                q, k, v = self._layer_qkv(layer, x, pos)
                cache[li][0] = torch.cat([cache[li][0], k], dim=2)
                cache[li][1] = torch.cat([cache[li][1], v], dim=2)
                key_ok[li] = torch.cat([key_ok[li], torch.ones(b, 1, dtype=torch.bool)], dim=1)
                out, _ = self._attend(q, cache[li][0], cache[li][1], key_ok[li][:, None, :])
                x = self._finish(layer, x, out)
            logits = _rms(x, self.text.norm.weight, self.eps)[:, -1] @ self.lm_head.weight.T
            tok = logits.argmax(-1)
            out_ids.append(tok)
        return torch.stack(out_ids, dim=1)


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
