"""HiPrune and FlowCut (vision-tower selections before the LLM) on a tiny random-init LLaVA whose CLIP tower
has 4 layers (the projector reads layer 2, so three vision layers feed the LLM), against an independent
reference written here: forward hooks on the tower's layers take each layer's normalised input, q/k/v and
the attention probabilities are computed by hand from the layer's weights in float64, the selections are
plain python (HiPrune: anchors by the attention a patch receives in the object layer, their grid
neighbours, registers from the deep layer; FlowCut: CLS attention + CLS-value similarity, times the value
L1 norm, accumulated over layers), and the hand-written eager prefill of tests/decoder_reference.py drops
the tokens not picked. Compared: prefill logits, every layer's cached keys/values and kept original
positions, the greedy tokens of `generate()`; a row pruned alone; `keep_ratio=1` against the plain model;
the public selection functions on random maps (non-square grids, register tokens); the plan ops through
ONNX export in onnxruntime; the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from decoder_reference import IMG_ID, N_IMG, RefDecoder, check_prefill, embeds_of, select_prefill, tiny_llava

import tokenreduce
from tokenreduce import TokenReduceError
from tokenreduce.kernels import vision_ops

transformers = pytest.importorskip("transformers")
tr = torch.ops.tokenreduce
GRID = 4  # 32 x 32 image, patch 8


@pytest.fixture(scope="module")
def llava4():  # type: ignore[no-untyped-def]
    """tests/decoder_reference.tiny_llava with a 4-layer CLIP tower (vision q/k sharpened too)."""
    model = tiny_llava(vision_layers=4)
    with torch.no_grad():
        for layer in tower_layers(model):
            layer.self_attn.q_proj.weight *= 3
            layer.self_attn.k_proj.weight *= 3
    return model


# ------------------------------------------------------------------------------------------- the reference
def tower_layers(model):  # type: ignore[no-untyped-def]
    vt = model.model.vision_tower
    return (getattr(vt, "vision_model", None) or vt).encoder.layers


def tower_qkv(model, px):  # type: ignore[no-untyped-def]
    """Per vision layer feeding the LLM: (q, k, v) `[B, H, N, d]` float64, from each layer's normalised input
    (a forward hook on `layer_norm1`) and its projection weights."""
    vt, cfg = model.model.vision_tower, model.config
    layers = tower_layers(model)
    grabbed: dict[int, torch.Tensor] = {}
    hooks = [layer.layer_norm1.register_forward_hook(lambda m, a, out, i=i: grabbed.__setitem__(i, out))
             for i, layer in enumerate(layers)]
    with torch.no_grad():
        n_hidden = len(vt(px, output_hidden_states=True).hidden_states)
    for h in hooks:
        h.remove()
    feature_layer = n_hidden + cfg.vision_feature_layer - 1  # hidden_states[f] is layer f-1's output
    heads = cfg.vision_config.num_attention_heads

    def proj(x, lin):  # type: ignore[no-untyped-def]
        y = x @ lin.weight.detach().double().T + lin.bias.detach().double()
        return y.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    out = []
    for i in range(feature_layer + 1):
        a, x = layers[i].self_attn, grabbed[i].detach().double()
        out.append((proj(x, a.q_proj), proj(x, a.k_proj), proj(x, a.v_proj)))
    return out


def probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`[B, H, N, N]` attention probabilities (no mask in a CLIP tower)."""
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)


def hiprune_ref(mid: list[float], deep: list[float], rows: int, cols: int, keep: int, anchors: int) -> list[int]:
    """Anchors (best `mid`), their on-grid 4-neighbours, then the best other patches by `deep`."""
    p = rows * cols
    chosen: set[int] = set()
    for a in sorted(range(p), key=lambda i: -mid[i])[:anchors]:
        r, c = divmod(a, cols)
        chosen.add(a)
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            if 0 <= r + dr < rows and 0 <= c + dc < cols:
                chosen.add((r + dr) * cols + c + dc)
    rest = sorted((i for i in range(p) if i not in chosen), key=lambda i: -deep[i])
    return sorted(chosen | set(rest[:keep - len(chosen)]))


def received(attn: torch.Tensor, row: int, prefix: int) -> list[float]:
    """The attention each patch receives, averaged over heads and queries (row `row` of a batch)."""
    a = attn[row]  # [H, N, N]
    n, h = a.shape[-1], a.shape[0]
    return [sum(float(a[hh, i, j]) for hh in range(h) for i in range(n)) / (h * n) for j in range(prefix, n)]


def flowcut_layer_ref(attn_cls: list[float], v: torch.Tensor) -> list[float]:
    """One layer's FlowCut scores of one row: `attn_cls` the head-mean CLS attention to each patch,
    `v [H, N, d]` the values."""
    h, n, _ = v.shape
    sem = [0.0] * (n - 1)
    for hh in range(h):
        dots = [float(v[hh, 0] @ v[hh, j]) for j in range(n)]
        top = max(dots)
        ex = [math.exp(d - top) for d in dots]
        for j in range(1, n):
            sem[j - 1] += ex[j] / sum(ex) / h
    norm = [float(v[:, j].mean(0).abs().sum()) for j in range(1, n)]
    sa, ss = sum(attn_cls), sum(sem)
    return [(attn_cls[j] / sa + sem[j] / ss) * norm[j] for j in range(n - 1)]


def flowcut_ref(layers: list[tuple[list[float], torch.Tensor]], keep: int, decay: float = 0.5) -> list[int]:
    cum: list[float] = []
    for cls, v in layers:
        s = flowcut_layer_ref(cls, v)
        cum = s if not cum else [decay * c + (1 - decay) * x for c, x in zip(cum, s)]
    return sorted(sorted(range(len(cum)), key=lambda i: -cum[i])[:keep])


def hiprune_rows(model, px, keep: int, anchor_ratio: float, object_layer: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    qkv = tower_qkv(model, px)
    mid, deep = probs(*qkv[object_layer][:2]), probs(*qkv[-1][:2])
    anchors = min(round(keep * anchor_ratio / 5), keep // 5)
    return [hiprune_ref(received(mid, r, 1), received(deep, r, 1), GRID, GRID, keep, anchors)
            for r in range(px.shape[0])]


def flowcut_rows(model, px, keep: int, layers: list[int]) -> list[list[int]]:  # type: ignore[no-untyped-def]
    qkv = tower_qkv(model, px)
    out = []
    for r in range(px.shape[0]):
        per_layer = []
        for li in layers:
            q, k, v = qkv[li]
            cls = probs(q, k)[r, :, 0].mean(0)[1:].tolist()
            per_layer.append((cls, v[r]))
        out.append(flowcut_ref(per_layer, keep))
    return out


def check_against_reference(model, prompt, dec, kept_rows, embeds=None, fastv=()):  # type: ignore[no-untyped-def]
    """`dec`'s prefill and generate() against the hand-written prefill keeping `kept_rows` (patch indices per row)
    before the LLM, from `embeds` (default: the model's own input embeddings), then FastV's `fastv` stages."""
    ids, mask, px = prompt
    n = ids.shape[1]
    pre = dec.prefill(ids, mask, pixel_values=px)
    if embeds is None:
        embeds, _ = embeds_of(model, ids, mask, pixel_values=px)
    span = ids == IMG_ID

    def choose(r, x, keys, real):  # type: ignore[no-untyped-def]
        pos = torch.nonzero(span[r]).flatten().tolist()
        return [pos[i] for i in kept_rows[r]]

    ref = RefDecoder(model)
    ref_logits, ref_cache = select_prefill(ref, embeds, mask, span, 0, choose, fastv=fastv)
    check_prefill(dec, pre, ref_logits, ref_cache, mask)
    out = dec.generate(ids, mask, pixel_values=px, max_new_tokens=4)
    _, ref_cache = select_prefill(ref, embeds, mask, span, 0, choose, fastv=fastv)
    want = ref.decode(ref_logits, ref_cache, mask, 4, model.model.language_model.embed_tokens)
    assert torch.equal(out[:, :n], ids) and torch.equal(out[:, n:], want)
    return pre


# ------------------------------------------------------------------------------------------- LLaVA
def test_hiprune_llava_matches_reference(llava4, llava_prompt):
    """keep 8 of 16: one anchor (alpha 0.6 -> round(8 * 0.6 / 5) = 1) with its grid neighbours from vision
    layer 1 (the default: round(8/22 * 2)), registers from layer 2 (the one the projector reads)."""
    dec = tokenreduce.reduce_decoder(llava4, "hiprune", keep_ratio=0.5, anchor_ratio=0.6)
    kept_rows = hiprune_rows(llava4, llava_prompt[2], 8, 0.6, 1)
    pre = check_against_reference(llava4, llava_prompt, dec, kept_rows)
    assert dec.report.tokens_per_block == [llava_prompt[0].shape[1] - N_IMG + 8] * 4
    # the other object layer selects differently on this image: the option reaches the plan
    other = hiprune_rows(llava4, llava_prompt[2], 8, 0.6, 0)
    assert other != kept_rows
    dec0 = tokenreduce.reduce_decoder(llava4, "hiprune", keep_ratio=0.5, anchor_ratio=0.6, object_layer=0)
    check_against_reference(llava4, llava_prompt, dec0, other)
    del pre


def test_flowcut_llava_matches_reference(llava4, llava_prompt):
    """keep 4 of 16 by the cumulative score of vision layers 0 and 1 (the default: every layer before the
    projector's layer 2), and with `vision_layers=[0, 1, 2], decay=0.25`."""
    dec = tokenreduce.reduce_decoder(llava4, "flowcut", keep_ratio=0.25)
    check_against_reference(llava4, llava_prompt, dec, flowcut_rows(llava4, llava_prompt[2], 4, [0, 1]))
    qkv = tower_qkv(llava4, llava_prompt[2])
    rows = []
    for r in range(2):
        per_layer = [(probs(q, k)[r, :, 0].mean(0)[1:].tolist(), v[r]) for q, k, v in qkv]
        rows.append(flowcut_ref(per_layer, 4, decay=0.25))
    dec3 = tokenreduce.reduce_decoder(llava4, "flowcut", keep_ratio=0.25, vision_layers=[0, 1, 2], decay=0.25)
    check_against_reference(llava4, llava_prompt, dec3, rows)


@pytest.mark.parametrize("method, opts", [("hiprune", dict(keep_ratio=0.5, anchor_ratio=0.6)),
                                          ("flowcut", dict(keep_ratio=0.25))])
def test_rows_are_selected_alone_and_keep_everything_is_the_plain_model(llava4, llava_prompt, method, opts):
    ids, mask, px = llava_prompt
    dec = tokenreduce.reduce_decoder(llava4, method, **opts)
    both = dec.prefill(ids, mask, pixel_values=px)
    alone = dec.prefill(ids[1:, 2:], mask[1:, 2:], pixel_values=px[1:])  # the padded row, unpadded
    torch.testing.assert_close(alone.logits[0], both.logits[1], atol=1e-4, rtol=1e-4)
    assert torch.equal(alone.kept[0][0] + 2, both.kept[0][1][2:])
    same = tokenreduce.reduce_decoder(llava4, method, keep_ratio=1.0)
    with torch.no_grad():
        full = llava4(input_ids=ids, attention_mask=mask, pixel_values=px).logits[:, -1]
        want = llava4.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=4,
                               do_sample=False)
    torch.testing.assert_close(same.prefill(ids, mask, pixel_values=px).logits, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(same.generate(ids, mask, pixel_values=px, max_new_tokens=4), want)


# ------------------------------------------------------------------------------------------- the selections
def test_hiprune_select_matches_python_on_grids_with_register_tokens():
    """Random maps, a 3 x 5 grid after 1 or 2 prefix tokens (CLS, a register), several budgets; anchors on
    the grid's edges and corners get only their on-grid neighbours."""
    torch.manual_seed(7)
    for prefix in (0, 1, 2):
        n = prefix + 15
        mid, deep = torch.rand(2, n, n).softmax(-1), torch.rand(2, n, n).softmax(-1)
        for keep, alpha in [(5, 1.0), (10, 0.5), (15, 0.1), (7, 0.0), (12, 1.0)]:
            got = vision_ops.hiprune_select(mid, deep, (3, 5), keep, anchor_ratio=alpha, num_prefix=prefix)
            anchors = min(round(keep * alpha / 5), keep // 5)
            for r in range(2):
                want = hiprune_ref(received(mid[:, None], r, prefix), received(deep[:, None], r, prefix), 3, 5,
                                   keep, anchors)
                assert got[r].tolist() == want, (prefix, keep, alpha, r)
    edge, deep = torch.zeros(1, 12, 12), torch.zeros(1, 12, 12)
    edge[0, :, 4] = 1.0  # every query attends to patch 4 (row 1, column 0 of 3 x 4): the anchor
    deep[0, :, 10:] = 0.5  # registers: the last two patches
    got = vision_ops.hiprune_select(edge, deep, (3, 4), 6, anchor_ratio=1.0, num_prefix=0)
    assert got[0].tolist() == [0, 4, 5, 8, 10, 11]  # up, right, down; not 3 (the flat index - 1, a row above)


def test_flowcut_select_matches_python_and_reads_only_the_cls_row():
    torch.manual_seed(8)
    n, h, d = 13, 3, 4
    attns = [torch.rand(2, n, n).softmax(-1) for _ in range(3)]
    values = [torch.randn(2, h, n, d) for _ in range(3)]
    for keep, decay in [(1, 0.5), (5, 0.5), (12, 0.0), (6, 0.9)]:
        got = vision_ops.flowcut_select(attns, keep, values, decay=decay)
        for r in range(2):
            want = flowcut_ref([(a[r, 0, 1:].tolist(), v[r]) for a, v in zip(attns, values)], keep, decay)
            assert got[r].tolist() == want, (keep, decay, r)
        rows_only = vision_ops.flowcut_select([a[:, :1] for a in attns], keep, values, decay=decay)
        assert torch.equal(rows_only, got)


def test_selection_functions_refuse_bad_inputs():
    a, v = torch.rand(1, 5, 5).softmax(-1), torch.randn(1, 2, 5, 3)
    with pytest.raises(ValueError, match=r"keep must be in 1..4 \(the patches\), got 5"):
        vision_ops.hiprune_select(a, a, (2, 2), 5)
    with pytest.raises(ValueError, match=r"the grid 3 x 2 does not hold the 4 patches"):
        vision_ops.hiprune_select(a, a, (3, 2), 2)
    with pytest.raises(ValueError, match=r"anchor_ratio must be in \[0, 1\]"):
        vision_ops.hiprune_select(a, a, (2, 2), 2, anchor_ratio=1.5)
    with pytest.raises(ValueError, match="CLS-free sequence"):
        vision_ops.flowcut_select([a], 2, [v], num_prefix=0)
    with pytest.raises(ValueError, match="one attention map and one value tensor per layer, got 0 and 0"):
        vision_ops.flowcut_select([], 2, [])
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        vision_ops.flowcut_select([a], 2, [v], decay=1.0)


def test_plan_ops_export_to_onnx(tmp_path):
    """The two plans from q/k/v as the graph emits them (head-mean attention, then the op), exported alone
    with their references inlined: onnxruntime gives the same kept patches (LLaVA's whole pruned prefill:
    test_vlm_export.py)."""
    pytest.importorskip("onnxruntime")
    from tokenreduce.targets.onnx import export_graph

    class Plans(torch.nn.Module):
        def forward(self, q0, k0, v0, q1, k1, v1):  # type: ignore[no-untyped-def]
            mid = vision_ops.head_mean_attention(q0, k0, None, 0.5)
            deep = vision_ops.head_mean_attention(q1, k1, None, 0.5)
            hip = tr.hiprune_plan(mid, deep, 4, 4, 8, 1, 1)
            rows = [vision_ops.head_mean_attention(q[:, :, :1], k, None, 0.5) for q, k in ((q0, k0), (q1, k1))]
            flow = tr.flowcut_plan(rows, [v0, v1], 5, 0.5, 1)
            return hip, flow

    torch.manual_seed(9)
    args = tuple(torch.randn(2, 2, 17, 4) for _ in range(6))
    gm = torch.export.export(Plans(), args).module()
    written = export_graph(gm, args, {}, tmp_path / "vision_plans.onnx", verify=True, atol=1e-6, dynamic_batch=False)
    assert written.verified and written.max_abs_diff == 0.0


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("method, opts, setting, match", [
    ("hiprune", dict(keep_ratio=0.0), "keep_ratio", r"keep_ratio must be in \(0, 1\]"),
    ("flowcut", dict(keep_ratio=1.5), "keep_ratio", r"keep_ratio must be in \(0, 1\]"),
    ("hiprune", dict(anchor_ratio=1.2), "anchor_ratio", r"anchor_ratio must be a number in \[0, 1\], got 1.2"),
    ("hiprune", dict(object_layer=-1), "object_layer", "object_layer must be >= 0"),
    ("hiprune", dict(layers=[2]), "layers", r"hiprune selects before the LLM \(layer 0\)"),
    ("flowcut", dict(layers=[1]), "layers", r"flowcut selects before the LLM \(layer 0\)"),
    ("flowcut", dict(vision_layers=[1, 0]), "vision_layers", "strictly increasing and not empty"),
    ("flowcut", dict(vision_layers=[]), "vision_layers", "strictly increasing and not empty"),
    ("flowcut", dict(decay=1.0), "decay", r"decay must be a number in \[0, 1\), got 1.0"),
])
def test_settings_are_checked(llava4, method, opts, setting, match):
    with pytest.raises(TokenReduceError, match=match) as e:
        tokenreduce.reduce_decoder(llava4, method, **opts)
    assert e.value.setting == setting


def test_layers_outside_the_tower_are_refused(llava4, llava, llava_prompt):
    ids, mask, px = llava_prompt
    with pytest.raises(TokenReduceError, match=r"object_layer must be a vision layer feeding the LLM, 0..2 "
                                               r"\(the projector reads layer 2\), got 3") as e:
        tokenreduce.reduce_decoder(llava4, "hiprune", object_layer=3).prefill(ids, mask, pixel_values=px)
    assert e.value.setting == "object_layer"
    with pytest.raises(TokenReduceError, match=r"vision_layers must be vision layers feeding the LLM, 0..2"):
        tokenreduce.reduce_decoder(llava4, "flowcut", vision_layers=[1, 3]).prefill(ids, mask, pixel_values=px)
    # the 2-layer tower's projector reads layer 0: nothing before it to accumulate by default
    with pytest.raises(TokenReduceError, match=r"give vision_layers=\[0\]"):
        tokenreduce.reduce_decoder(llava, "flowcut").prefill(ids, mask, pixel_values=px)
    one = tokenreduce.reduce_decoder(llava, "flowcut", keep_ratio=0.25, vision_layers=[0])
    assert one.prefill(ids, mask, pixel_values=px).kept[0].shape == (2, ids.shape[1] - N_IMG + 4)


def test_a_cls_free_tower_is_refused(llava_prompt):
    """A SigLIP tower (no CLS token; LLaVA reads all its tokens): FlowCut has no relay token (HiPrune is refused
    by the same check of the CLS-first feature layout the vision site reads; one capture keeps the test short)."""
    torch.manual_seed(0)
    vc = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)
    tc = transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG_ID, vision_feature_layer=-1,
                                   vision_feature_select_strategy="full")
    cfg._attn_implementation = "sdpa"
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    ids, mask, px = llava_prompt
    with pytest.raises(TokenReduceError, match="plus a CLS token") as e:
        tokenreduce.reduce_decoder(model, "flowcut", vision_layers=[0]).prefill(ids, mask, pixel_values=px)
    assert e.value.setting == "method"



# ------------------------------------------------------------------------------------------- FlowCut, progressive
def progressive_embeds(model, prompt, keep_after: dict[int, int], scored: list[int], decay: float = 0.5):  # type: ignore[no-untyped-def]
    """The official progressive FlowCut run eagerly through hooks on the model itself (the reference): after each
    scored vision layer its survivors are scored by hand (float64 q/k/v from the layer's normalised input), the
    running score is `decay * c + (1 - decay) * s` over the survivors, and after each prune layer the layer's
    output is cut to the CLS and the best `keep_after[i]` survivors (in their order), so the next layers run on
    them. The projector's input (the feature layer's patches, fewer than the placeholders) is put back at the
    survivors' original indices (zeros elsewhere: those tokens are dropped before the LLM). Returns the LLM's
    input embeddings, position ids and the kept patch indices per row."""
    ids, mask, px = prompt
    layers, cfg = tower_layers(model), model.config
    heads = cfg.vision_config.num_attention_heads
    normed: dict[int, torch.Tensor] = {}
    state: dict = {"cum": None, "origin": None}

    def proj(x, lin):  # type: ignore[no-untyped-def]
        y = x @ lin.weight.detach().double().T + lin.bias.detach().double()
        return y.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    def after_layer(i, out):  # type: ignore[no-untyped-def]
        if i in scored:
            a, x = layers[i].self_attn, normed[i].detach().double()
            q, k, v = proj(x, a.q_proj), proj(x, a.k_proj), proj(x, a.v_proj)
            s = [flowcut_layer_ref(probs(q, k)[r, :, 0].mean(0)[1:].tolist(), v[r]) for r in range(out.shape[0])]
            state["cum"] = s if state["cum"] is None else [
                [decay * c + (1 - decay) * x for c, x in zip(cr, sr)] for cr, sr in zip(state["cum"], s)]
        if i not in keep_after:
            return None
        n = out.shape[1] - 1
        if state["origin"] is None:
            state["origin"] = [list(range(n)) for _ in range(out.shape[0])]
        rows = [sorted(sorted(range(n), key=lambda j, c=c: -c[j])[:keep_after[i]]) for c in state["cum"]]
        state["cum"] = [[c[j] for j in r] for c, r in zip(state["cum"], rows)]
        state["origin"] = [[o[j] for j in r] for o, r in zip(state["origin"], rows)]
        return torch.stack([torch.cat([out[b, :1], out[b, 1:][r]]) for b, r in enumerate(rows)])

    def place(module, args):  # type: ignore[no-untyped-def]
        feats = args[0]
        full = feats.new_zeros(feats.shape[0], N_IMG, feats.shape[-1])
        for b, o in enumerate(state["origin"]):
            full[b, o] = feats[b]
        return (full,)

    hooks = [layer.layer_norm1.register_forward_hook(lambda m, a, out, i=i: normed.__setitem__(i, out))
             for i, layer in enumerate(layers)]
    hooks += [layer.register_forward_hook(lambda m, a, out, i=i: after_layer(i, out)) for i, layer in enumerate(layers)]
    hooks.append(model.model.multi_modal_projector.register_forward_pre_hook(place))
    try:
        embeds, position_ids = embeds_of(model, ids, mask, pixel_values=px)
    finally:
        for h in hooks:
            h.remove()
    return embeds, position_ids, state["origin"]


@pytest.mark.parametrize("opts, keep_after", [
    (dict(), {1: 4}),  # the official prune layers of a tower read at layer 2: layer 1 only (F-1), to keep
    (dict(prune_layers=[0, 1], prune_keep=[10, 4]), {0: 10, 1: 4}),  # two steps: layer 1 scores 10 survivors
    (dict(prune_layers=[0, 1]), {0: 10, 1: 4}),  # the default counts fall linearly: 16 - round(12 / 2) = 10, 4
])
def test_flowcut_progressive_matches_the_official_loop(llava4, llava_prompt, opts, keep_after):
    """keep 4 of 16; layers after a prune run on the survivors (the feature layer 2 on CLS + 4 patches)."""
    ids, mask, px = llava_prompt
    dec = tokenreduce.reduce_decoder(llava4, "flowcut", keep_ratio=0.25, progressive=True, **opts)
    embeds, _, origins = progressive_embeds(llava4, llava_prompt, keep_after, scored=[0, 1])
    pre = check_against_reference(llava4, llava_prompt, dec, origins, embeds=embeds)
    # the pruned tower is not the select-once one: the kept features differ (the feature layer saw 5 tokens)
    once = tokenreduce.reduce_decoder(llava4, "flowcut", keep_ratio=0.25).prefill(ids, mask, pixel_values=px)
    assert (once.logits - pre.logits).abs().max().item() > 1e-3


def test_flowcut_progressive_exports_to_onnx(llava4, llava_prompt, tmp_path):
    pytest.importorskip("onnxruntime")
    ids, mask, px = llava_prompt
    dec = tokenreduce.reduce_decoder(llava4, "flowcut", keep_ratio=0.25, progressive=True, prune_layers=[0, 1])
    ex = dec.export_onnx(tmp_path / "flowcut.onnx", ids[:1, 2:], pixel_values=px[:1])
    assert ex.verified and not ex.problems and ex.max_abs_diff < 1e-4


@pytest.mark.parametrize("opts, setting, match", [
    (dict(prune_layers=[1]), "prune_layers", "needs progressive=True"),
    (dict(prune_keep=[4]), "prune_keep", "needs progressive=True"),
    (dict(progressive=True, prune_layers=[1, 0]), "prune_layers", "strictly increasing and not empty"),
    (dict(progressive=True, prune_layers=[2]), "prune_layers", r"prune_layers must be vision layers 0..1"),
    (dict(progressive=True, prune_layers=[0]), "vision_layers", "vision layer 1 is scored after the last prune "
                                                                "layer 0"),
    (dict(progressive=True, prune_layers=[0, 1], prune_keep=[10, 5]), "prune_keep", "ending at the kept count 4"),
    (dict(progressive=True, prune_layers=[0, 1], prune_keep=[3, 4]), "prune_keep", "non-increasing"),
    (dict(progressive=True, prune_keep=[4, 4]), "prune_keep", r"one count per prune layer \(1: \[1\]\)"),
    (dict(progressive="yes"), "progressive", "progressive must be"),
])
def test_flowcut_progressive_settings_are_checked(llava4, llava_prompt, opts, setting, match):
    ids, mask, px = llava_prompt
    with pytest.raises(TokenReduceError, match=match) as e:
        tokenreduce.reduce_decoder(llava4, "flowcut", keep_ratio=0.25, **opts).prefill(ids, mask, pixel_values=px)
    assert e.value.setting == setting


# ------------------------------------------------------------------------------------------- with FastV inside the LLM
def test_before_the_llm_combines_with_fastv_inside(llava4, llava_prompt):
    """FlowCut keeps 8 of 16 before the LLM, then `llm_layers=[2]`: block 1's last-query attention keeps
    ceil(0.5 * 8) = 4 of them from block 2 on (FastV after the selection, as the VisionZip paper pairs them).
    Reference: the same FlowCut rows, then FastV's rule in the hand-written prefill."""
    ids, mask, px = llava_prompt
    n = ids.shape[1]
    dec = tokenreduce.reduce_decoder(llava4, "flowcut", keep_ratio=0.5, llm_layers=[2], llm_keep_ratio=0.5)
    pre = check_against_reference(llava4, llava_prompt, dec, flowcut_rows(llava4, px, 8, [0, 1]), fastv=[(2, 4)])
    assert dec.report.tokens_per_block == [n - N_IMG + 8] * 2 + [n - N_IMG + 4] * 2
    only = tokenreduce.reduce_decoder(llava4, "flowcut", keep_ratio=0.5).prefill(ids, mask, pixel_values=px)
    assert (only.logits - pre.logits).abs().max().item() > 1e-4  # the LLM stage changed the prefill


@pytest.mark.parametrize("opts, setting, match", [
    (dict(llm_keep_ratio=0.3), "llm_keep_ratio", "give llm_layers=\\[K\\]"),
    (dict(llm_layers=[0]), "llm_layers", "must be >= 1"),
    (dict(llm_layers=[3, 2]), "llm_layers", "strictly increasing"),
    (dict(llm_layers=[2], llm_keep_ratio=0.0), "llm_keep_ratio", r"llm_keep_ratio must be in \(0, 1\]"),
    (dict(llm_layers=[9]), "llm_layers", r"layer\(s\) \[9\] out of range: the model has 4 decoder blocks"),
    (dict(layers=[2]), "layers", "to prune inside the LLM as well, give llm_layers"),
])
def test_llm_layers_are_checked(llava4, llava_prompt, opts, setting, match):
    ids, mask, px = llava_prompt
    with pytest.raises(TokenReduceError, match=match) as e:
        tokenreduce.reduce_decoder(llava4, "visionzip", **opts).prefill(ids, mask, pixel_values=px)
    assert e.value.setting == setting


def test_visionzip_with_fastv_inside_exports_to_onnx(llava4, llava_prompt, tmp_path):
    """VisionZip before the LLM, FastV after block 1, in one graph: it exports and verifies in onnxruntime."""
    pytest.importorskip("onnxruntime")
    ids, mask, px = llava_prompt
    dec = tokenreduce.reduce_decoder(llava4, "visionzip", keep_ratio=0.5, llm_layers=[2])
    pre = dec.prefill(ids, mask, pixel_values=px)
    assert dec.report.tokens_per_block[1:3] == [ids.shape[1] - N_IMG + 8, ids.shape[1] - N_IMG + 4]
    assert pre.kept[3].shape[1] == ids.shape[1] - N_IMG + 4
    ex = dec.export_onnx(tmp_path / "visionzip_fastv.onnx", ids[:1, 2:], pixel_values=px[:1])
    assert ex.verified and not ex.problems and ex.max_abs_diff < 1e-4


def test_flowcut_progressive_report_names_the_tower_steps(llava4, llava_prompt):
    ids, mask, px = llava_prompt
    dec = tokenreduce.reduce_decoder(llava4, "flowcut", keep_ratio=0.25, progressive=True, prune_layers=[0, 1])
    dec.prefill(ids, mask, pixel_values=px)
    assert ("flowcut: vision tower pruned in 2 steps, patches kept after layer 0: 10, after layer 1: 4 (of 16); "
            "vision layers 1..2 run on the survivors") in dec.report.notes
