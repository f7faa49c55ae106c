"""The command line on diffusion denoisers: `diffusers:FOLDER` and `module:function` sources with tomesd.

Tiny random-init diffusers models are saved to temporary folders the way users save theirs
(`model.save_pretrained`, `pipeline.save_pretrained`) and loaded back through `tokenreduce.sources` and the
real `tokenreduce` entry point (`cli.main`, in-process). References are independent of the source code under
test: the loaded denoiser must give the saved model's outputs on inputs built here from the config, and the
converted ONNX file, run in onnxruntime here, must give `tokenreduce.compile`'s tomesd output (and not the
unreduced one). Refusals are checked by their messages.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusion_models import sd_unet  # noqa: E402

from tokenreduce.cli import main  # noqa: E402
from tokenreduce.errors import TokenReduceError  # noqa: E402
from tokenreduce.sources import load_model, source_kind  # noqa: E402


def _unet():
    return sd_unet()


def _dit():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8).eval()


def _pixart():
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=12, norm_num_groups=8,
        use_additional_conditions=False).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("denoisers")
    models = {"unet": _unet(), "dit": _dit(), "pixart": _pixart()}
    for name, model in models.items():
        model.save_pretrained(root / name)
    # a whole pipeline folder (model_index.json + components), as DiTPipeline.save_pretrained writes it
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=16)
    diffusers.DiTPipeline(transformer=models["dit"], vae=vae, scheduler=diffusers.DDIMScheduler()).save_pretrained(
        root / "pipeline")
    return root, models


def _run(capfd, *argv: str) -> dict:
    assert main([*argv, "--json", "--no-progress"]) == 0
    return json.loads(capfd.readouterr().out)


@pytest.mark.parametrize("name", ["unet", "dit", "pixart", "pipeline"])
def test_folder_loads_the_denoiser_with_inputs_from_its_config(folders, name):
    root, models = folders
    src = load_model(f"diffusers:{root / name}", batch=2, image_size=None, seq_len=5)
    assert source_kind(f"diffusers:{root / name}") == "diffusers" and src.kind == "diffusers"
    saved = models["dit" if name == "pipeline" else name]
    (latent,), kw = src.example_args, src.example_kwargs
    assert latent.shape == (2, 4, 16 if name == "unet" else 8, 16 if name == "unet" else 8)
    assert kw["timestep"].shape == (2,) and kw["timestep"].dtype == torch.long
    if name == "unet":
        assert kw["encoder_hidden_states"].shape == (2, 5, 32) and set(kw) == {"timestep", "encoder_hidden_states"}
    elif name == "pixart":
        assert kw["encoder_hidden_states"].shape == (2, 5, 12) and set(kw) == {"timestep", "encoder_hidden_states"}
    else:
        assert set(kw) == {"timestep", "class_labels"} and 0 <= kw["class_labels"].min() <= kw["class_labels"].max() < 10
    assert type(src.model) is type(saved) and "weights from" in src.description
    with torch.no_grad():  # the saved weights, not a fresh random init
        assert torch.equal(src.model(latent, **kw).sample, saved(latent, **kw).sample)
    more_args, more_kw = src.inputs(3)
    assert more_args[0].shape[0] == 3 and all(v.shape[0] == 3 for v in more_kw.values())
    sized = load_model(f"diffusers:{root / name}", batch=1, image_size=32)
    assert sized.example_args[0].shape[-2:] == (32, 32)
    if name in ("unet", "pixart"):
        assert sized.example_kwargs["encoder_hidden_states"].shape[1] == 77  # CLIP's length by default


def test_folder_without_weights_is_random_init(tmp_path):
    _dit().save_config(tmp_path)
    src = load_model(f"diffusers:{tmp_path}", batch=1)
    assert "random init" in src.description and isinstance(src.model, diffusers.DiTTransformer2DModel)


def test_sdxl_layout_unet_gets_text_embeds_and_time_ids(tmp_path):
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 20).save_pretrained(tmp_path)
    src = load_model(f"diffusers:{tmp_path}", batch=2)
    cond = src.example_kwargs["added_cond_kwargs"]
    assert cond["text_embeds"].shape == (2, 20) and cond["time_ids"].shape == (2, 6)
    assert cond["time_ids"][0].tolist() == [128.0, 128.0, 0.0, 0.0, 128.0, 128.0]  # 16 x 16 latent = 128 px
    with torch.no_grad():
        assert src.model(*src.example_args, **src.example_kwargs).sample.shape == (2, 4, 16, 16)


def test_convert_writes_a_verified_onnx_that_computes_tomesd(folders, tmp_path, capfd):
    import onnxruntime as ort

    import tokenreduce

    root, models = folders
    out = tmp_path / "dit.onnx"
    data = _run(capfd, "convert", f"diffusers:{root / 'pipeline'}", "--method", "tomesd", "--ratio", "0.5",
                "--max-downsample", "2", "--rand-seed", "3", "-o", str(out))
    assert data["onnx"]["verified"] and data["onnx"]["max_abs_diff"] <= 1e-4 and data["onnx"]["dynamic_batch"]
    assert [(b["tokens_in"], b["tokens_out"]) for b in data["report"]["blocks"]] == [(16, 8), (16, 8)]
    assert data["inputs"] == {"arg0": [2, 4, 8, 8], "timestep": [2], "class_labels": [2]}
    # independent check: onnxruntime on fresh inputs at another batch vs tokenreduce.compile's tomesd model
    g = torch.Generator().manual_seed(9)
    latent, t, labels = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([5, 400, 900]), torch.tensor([1, 2, 3])
    kw = {"timestep": t, "class_labels": labels}
    dit = models["dit"]
    red = tokenreduce.compile(dit, (latent,), kw, method="tomesd", ratio=0.5, max_downsample=2, rand_seed=3,
                              inner="eager", count_model_flops=False)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert len(names) == 3
    (got,) = sess.run(None, dict(zip(names, [latent.numpy(), t.numpy(), labels.numpy()], strict=True)))
    with torch.no_grad():
        want, full = red(latent, **kw).sample, dit(latent, **kw).sample
    assert (torch.from_numpy(got) - want).abs().max().item() < 1e-4
    assert (torch.from_numpy(got) - full).abs().max().item() > 1e-3  # the merge is in the file


def test_convert_unet_folder(folders, tmp_path, capfd):
    root, _ = folders
    data = _run(capfd, "convert", f"diffusers:{root / 'unet'}", "--method", "tomesd", "--ratio", "0.5",
                "--seq-len", "7", "-o", str(tmp_path / "unet.onnx"))
    assert data["onnx"]["verified"] and data["onnx"]["max_abs_diff"] <= 1e-4
    assert data["inputs"]["encoder_hidden_states"] == [2, 7, 32]
    merged = [(b["tokens_in"], b["tokens_out"]) for b in data["report"]["blocks"] if b["tokens_in"] != b["tokens_out"]]
    assert merged == [(256, 128)] * 3  # the 16 x 16 level; the 8 x 8 mid block is coarser than max_downsample=1


def test_convert_unet_folder_with_fused_attention(folders, tmp_path, capfd):
    """--fused-attention: every UNet attention (self and cross, 4 blocks) becomes onnxruntime's MultiHeadAttention;
    the file computes what the unfused file computes, on inputs built here."""
    import onnxruntime as ort

    root, _ = folders
    paths = {}
    for name, extra in (("plain", ()), ("fused", ("--fused-attention",))):
        paths[name] = tmp_path / f"{name}.onnx"
        data = _run(capfd, "convert", f"diffusers:{root / 'unet'}", "--method", "tomesd", "--ratio", "0.5",
                    "--seq-len", "7", *extra, "-o", str(paths[name]))
        assert data["onnx"]["verified"] and data["onnx"]["max_abs_diff"] <= 1e-4
    assert data["onnx"]["fused_attention"] == 8 and data["onnx"]["unfused_attention"] == []
    assert data["onnx"]["op_counts"]["MultiHeadAttention"] == 8 and "Softmax" not in data["onnx"]["op_counts"]
    g = torch.Generator().manual_seed(4)
    feeds = [torch.randn(2, 4, 16, 16, generator=g).numpy(), torch.tensor([3, 700]).numpy(),
             torch.randn(2, 7, 32, generator=g).numpy()]
    outs = []
    for path in paths.values():
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, dict(zip([i.name for i in sess.get_inputs()], feeds, strict=True)))[0])
    assert abs(outs[0] - outs[1]).max() < 1e-4


def test_convert_pixart_and_bench_dit(folders, tmp_path, capfd):
    root, _ = folders
    # PixArt's no-op `squeeze(1)` on [B, N, C] is dropped before the export (ONNX's Squeeze refuses it)
    data = _run(capfd, "convert", f"diffusers:{root / 'pixart'}", "--method", "tomesd", "--max-downsample", "2",
                "--merge-crossattn", "--seq-len", "5", "-o", str(tmp_path / "pixart.onnx"))
    assert data["inputs"] == {"arg0": [2, 4, 8, 8], "timestep": [2], "encoder_hidden_states": [2, 5, 12]}
    assert data["onnx"]["verified"] and data["onnx"]["max_abs_diff"] <= 1e-4
    assert [b["action"] for b in data["report"]["blocks"]] == ["tomesd r=8 (attn, crossattn)"] * 2
    data = _run(capfd, "bench", f"diffusers:{root / 'dit'}", "--method", "tomesd", "--max-downsample", "2",
                "--batch", "1,2", "--repeats", "2", "--warmup", "0")
    rows = data["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and all(0 < r["flops_ratio"] < 1 for r in rows)


def _sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6, out_channels=4,
        pos_embed_max_size=8).eval()


def _flux(guidance=False):
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=6, axes_dims_rope=(2, 2, 4), guidance_embeds=guidance).eval()


def test_sd3_and_flux_folders(tmp_path, capfd):
    """Joint-attention transformers: inputs built from the config as their pipelines feed them; the Flux folder
    converts with tomesd (its packed grid given as --grid-h/--grid-w) to an ONNX file onnxruntime verifies, with a
    dynamic batch on the inputs that have one (img_ids/txt_ids [N, 3] have none)."""
    import tokenreduce

    sd3, flux = _sd3(), _flux(guidance=True)
    sd3.save_pretrained(tmp_path / "sd3")
    flux.save_pretrained(tmp_path / "flux")
    src = load_model(f"diffusers:{tmp_path / 'sd3'}", batch=2, seq_len=5)
    (latent,), kw = src.example_args, src.example_kwargs
    assert latent.shape == (2, 4, 8, 8) and kw["encoder_hidden_states"].shape == (2, 5, 12)
    assert kw["pooled_projections"].shape == (2, 6) and set(kw) == {"timestep", "encoder_hidden_states",
                                                                    "pooled_projections"}
    assert load_model(f"diffusers:{tmp_path / 'sd3'}", batch=1).example_kwargs["encoder_hidden_states"].shape[1] == 333
    with torch.no_grad():
        assert torch.equal(src.model(latent, **kw).sample, sd3(latent, **kw).sample)
    src = load_model(f"diffusers:{tmp_path / 'flux'}", batch=2, image_size=8, seq_len=5)
    (packed,), kw = src.example_args, src.example_kwargs
    assert packed.shape == (2, 16, 8) and kw["txt_ids"].shape == (5, 3) and kw["guidance"].tolist() == [3.5, 3.5]
    assert kw["img_ids"][:, 1:].tolist() == [[r, c] for r in range(4) for c in range(4)]  # (row, column), row-major
    assert 0 < float(kw["timestep"][0]) < 1
    with torch.no_grad():
        assert torch.equal(src.model(packed, **kw).sample, flux(packed, **kw).sample)
    with pytest.raises(TokenReduceError, match="--image-size 7 .* must be even: Flux packs 2 x 2"):
        load_model(f"diffusers:{tmp_path / 'flux'}", image_size=7)
    out = tmp_path / "flux.onnx"
    data = _run(capfd, "convert", f"diffusers:{tmp_path / 'flux'}", "--method", "tomesd", "--grid-h", "4",
                "--grid-w", "4", "--rand-seed", "2", "--image-size", "8", "--seq-len", "5", "-o", str(out))
    assert data["onnx"]["verified"] and data["onnx"]["max_abs_diff"] <= 1e-4
    assert [(b["tokens_in"], b["tokens_out"]) for b in data["report"]["blocks"]] == [(16, 8), (16, 8)]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in sess.get_inputs()], [packed.numpy(), *(v.numpy() for v in kw.values())],
                     strict=True))
    (got,) = sess.run(None, feeds)
    red = tokenreduce.compile(flux, (packed,), kw, method="tomesd", grid_h=4, grid_w=4, rand_seed=2, inner="eager",
                              count_model_flops=False)
    with torch.no_grad():
        want, full = red(packed, **kw).sample, flux(packed, **kw).sample
    assert (torch.from_numpy(got) - want).abs().max().item() < 1e-4
    assert (torch.from_numpy(got) - full).abs().max().item() > 1e-3


MODULE = '''
import torch, diffusers

def denoiser(batch=2, image_size=8):
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=image_size, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8)
    return model, {"hidden_states": torch.randn(batch, 4, image_size, image_size),
                   "timestep": torch.full((batch,), 50), "class_labels": torch.zeros(batch, dtype=torch.long)}
'''


def test_module_function_source_returning_a_denoiser(tmp_path, monkeypatch, capfd):
    (tmp_path / "my_denoisers.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = _run(capfd, "inspect", "my_denoisers:denoiser", "--method", "tomesd", "--ratio", "0.5",
                "--max-downsample", "2", "--image-size", "12", "--batch", "2")
    assert data["inputs"] == {"hidden_states": [2, 4, 12, 12], "timestep": [2], "class_labels": [2]}
    tomesd = data["methods"]["tomesd"]
    assert tomesd["applicable"] and 0 < tomesd["flops_ratio"] < 1
    assert [(b["tokens_in"], b["tokens_out"]) for b in tomesd["blocks"]] == [(36, 18)] * 2  # 6 x 6 patches


def _write(folder: Path, name: str, content: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(content))
    return folder


def test_refusals(folders, tmp_path, capfd):
    root, _ = folders
    cases = [
        (f"diffusers:{tmp_path / 'missing'}", "no such directory"),
        (f"diffusers:{_write(tmp_path / 'bert', 'config.json', {'architectures': ['BertModel']})}",
         "not a diffusers model folder: its config.json has no _class_name; for a Hugging Face transformers"),
        (f"diffusers:{_write(tmp_path / 'vae', 'config.json', {'_class_name': 'AutoencoderKL'})}",
         "holds a AutoencoderKL; the diffusers: source loads the denoisers UNet2DConditionModel, .*"
         "SD3Transformer2DModel, FluxTransformer2DModel; for another model, write a module:function source"),
        (f"diffusers:{_write(tmp_path / 'vaeonly', 'model_index.json', {'_class_name': 'X', 'vae': ['a', 'b']})}",
         "pipeline folder without a unet/ or transformer/ denoiser \\(components: vae\\)"),
        (f"diffusers:{tmp_path}", "is not a diffusers model folder \\(no config.json or model_index.json"),
        (f"hf:{root / 'unet'}", "is a diffusers folder, not a transformers one: use diffusers:"),
        (str(root / "unet"), "for a diffusers model or pipeline folder use diffusers:"),
    ]
    for spec, message in cases:
        with pytest.raises(TokenReduceError, match=message):
            load_model(spec)
    with pytest.raises(TokenReduceError, match="--image-size 9 .* not a multiple of the DiTTransformer2DModel's "
                                               "patch size 2"):
        load_model(f"diffusers:{root / 'dit'}", image_size=9)
    capfd.readouterr()
    assert main(["convert", f"diffusers:{root / 'unet'}", "--method", "tomesd", "--fused-attention", "--to", "tensorrt",
                 "-o", str(tmp_path / "u.engine"), "--no-progress"]) != 0
    assert "--fused-attention writes onnxruntime's fp32 MultiHeadAttention" in capfd.readouterr().err
    with pytest.raises(TokenReduceError, match="--model-arg applies to"):
        load_model(f"diffusers:{root / 'dit'}", model_args={"x": 1})
    cfg = json.loads((root / "unet" / "config.json").read_text())
    _write(tmp_path / "classemb", "config.json", {**cfg, "class_embed_type": "timestep"})
    with pytest.raises(TokenReduceError, match="class_embed_type='timestep' needs inputs the diffusers: source"):
        load_model(f"diffusers:{tmp_path / 'classemb'}")
