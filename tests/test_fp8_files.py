"""fp8 single files as ComfyUI users keep them: ComfyUI's fp8_scaled layout and plain fp8.

Files are written from the tiny model by tests/_fp8_util.py; loading must give the original
weights within fp8 rounding, dequantised layer by layer into the requested storage dtype.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hairdiff_core.errors import ModelLoadError
from hairdiff_core.models.loading import load_models, load_transformer
from hairdiff_core.models.memory import current_storage_dtype

_spec = importlib.util.spec_from_file_location("_fp8_util", Path(__file__).with_name("_fp8_util.py"))
fp8u = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fp8u)

E4M3_REL = 2.0**-4  # 3 mantissa bits: half an ulp
E5M2_REL = 2.0**-3  # 2 mantissa bits


def _assert_within_fp8(loaded, original, rel: float):
    """Every weight within fp8 rounding of the original (plus bf16 rounding when stored so).

    Relative: half an fp8 ulp; absolute floor: half the e4m3 subnormal step (2^-9), which is
    what unscaled values below 2^-6 are rounded to."""
    got = {k: v.float() for k, v in loaded.state_dict().items()}
    want = original.state_dict()
    assert set(got) == set(want)
    for key, w in want.items():
        w = w.float()
        tol = (rel + 2.0**-8) * w.abs() + 2.0**-10
        assert bool(((got[key] - w).abs() <= tol).all()), key


@pytest.fixture(scope="module")
def models():
    from hairdiff_core.models.tiny import build_tiny_transformer, build_tiny_vae

    return build_tiny_transformer(), build_tiny_vae()


def test_scaled_fp8_file_loads_within_fp8_rounding(models, tmp_path, caplog):
    transformer, vae = models
    path = tmp_path / "sd3.5_tiny_fp8_scaled.safetensors"
    written = fp8u.write_fp8_checkpoint(transformer, path, vae=vae)
    assert written["model.diffusion_model.scaled_fp8"].dtype == torch.float8_e4m3fn
    assert written["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].dtype == torch.float8_e4m3fn
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.scale_weight" in written

    # Dequantised into bf16 storage: the original weights within fp8 rounding.
    with caplog.at_level("INFO", logger="hairdiff_core.models.loading"):
        loaded = load_models(path, dtype=torch.bfloat16, weights="bf16")
    assert "scaled fp8 (ComfyUI fp8_scaled)" in caplog.text
    assert current_storage_dtype(loaded.transformer) is None
    _assert_within_fp8(loaded.transformer, transformer, E4M3_REL)
    # A scale really was applied: without it the weights would be off by orders of magnitude.
    qkv = written["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].float()
    assert qkv.abs().max() > 100 * transformer.transformer_blocks[0].attn.to_q.weight.abs().max()

    # auto keeps the file's fp8 as the storage, computing in bf16; it still runs.
    auto, family = load_transformer(path, dtype=torch.bfloat16)
    assert family == "tiny" and current_storage_dtype(auto) == torch.float8_e4m3fn
    assert auto.transformer_blocks[1].ff.net[0].proj.weight.dtype == torch.float8_e4m3fn
    assert auto.pos_embed.proj.weight.dtype == torch.bfloat16
    _assert_within_fp8(auto, transformer, 2 * E4M3_REL)  # rounded again without the scale


def test_fp8_without_marker_is_read_correctly(models, tmp_path):
    transformer, _ = models
    # Scales but no marker: the scales are still applied.
    scaled = tmp_path / "nomarker.safetensors"
    fp8u.write_fp8_checkpoint(transformer, scaled, marker=False, scale_input=False)
    t, _ = load_transformer(scaled, dtype=torch.bfloat16, weights="bf16")
    _assert_within_fp8(t, transformer, E4M3_REL)
    # Plain fp8 (what "fp8_e4m3fn" files of other tools are): the values as they are.
    for dtype, rel in ((torch.float8_e4m3fn, E4M3_REL), (torch.float8_e5m2, E5M2_REL)):
        plain = tmp_path / f"plain_{dtype}.safetensors"
        fp8u.write_fp8_checkpoint(transformer, plain, dtype=dtype, scaled=False, marker=False)
        t, _ = load_transformer(plain, dtype=torch.bfloat16, weights="bf16")
        _assert_within_fp8(t, transformer, rel)
        # Loaded into its own fp8 storage: bit for bit the file's values, no round trip.
        same, _ = load_transformer(plain, dtype=torch.bfloat16)
        assert current_storage_dtype(same) == dtype
        file_q = load_file(str(plain))["model.diffusion_model.joint_blocks.0.x_block.mlp.fc1.weight"]
        assert torch.equal(same.transformer_blocks[0].ff.net[0].proj.weight.view(torch.uint8), file_q.view(torch.uint8))


def test_comfyui_mixed_precision_file_loads_within_fp8_rounding(models, tmp_path, caplog):
    # ComfyUI's newer layout (weight_scale, input_scale, comfy_quant), with some layers left in
    # bf16, as ComfyUI's own converter and newer files have it.
    transformer, _ = models
    written = fp8u.write_fp8_checkpoint(transformer, tmp_path / "scaled.safetensors")
    mixed = fp8u.to_mixed_precision(written, plain_layers=("final_layer", "context_block"))
    assert any(k.endswith(".comfy_quant") for k in mixed) and not any(k.endswith("scale_weight") for k in mixed)
    fc1 = "model.diffusion_model.joint_blocks.0.context_block.mlp.fc1.weight"
    assert mixed[fc1].dtype == torch.bfloat16  # a plain layer beside fp8 ones
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with caplog.at_level("INFO", logger="hairdiff_core.models.loading"):
        loaded, family = load_transformer(tmp_path / "mixed.safetensors", dtype=torch.bfloat16, weights="bf16")
    assert family == "tiny" and "ComfyUI mixed precision" in caplog.text
    _assert_within_fp8(loaded, transformer, E4M3_REL)
    auto, _ = load_transformer(tmp_path / "mixed.safetensors", dtype=torch.bfloat16)
    assert current_storage_dtype(auto) == torch.float8_e4m3fn
    _assert_within_fp8(auto, transformer, 2 * E4M3_REL)


def test_unreadable_fp8_layouts_are_refused_clearly(models, tmp_path):
    transformer, _ = models
    path = tmp_path / "scaled.safetensors"
    state = fp8u.write_fp8_checkpoint(transformer, path)
    # NVFP4 (a second scale per layer, packed uint8 weights): not dequantised here.
    nvfp4 = dict(fp8u.to_mixed_precision(state))
    layer = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv"
    nvfp4[layer + ".weight_scale_2"] = torch.ones(())
    save_file(nvfp4, str(tmp_path / "nvfp4.safetensors"))
    with pytest.raises(ModelLoadError, match=r"layout HairDiff cannot dequantise.*weight_scale_2.*NVFP4"):
        load_transformer(tmp_path / "nvfp4.safetensors", dtype=torch.bfloat16)
    # A scale beside a weight that is not float8 (int8 quantisation, say) among fp8 layers.
    int8 = dict(fp8u.to_mixed_precision(state))
    int8[layer + ".weight"] = torch.zeros(int8[layer + ".weight"].shape, dtype=torch.int8)
    save_file(int8, str(tmp_path / "int8.safetensors"))
    with pytest.raises(ModelLoadError, match=r"qkv.weight_scale' scales .*I8, not float8"):
        load_transformer(tmp_path / "int8.safetensors", dtype=torch.bfloat16)
    # Scales beside weights that are not float8: not an fp8 file.
    bf16 = {
        k: (v.float().to(torch.bfloat16) if v.dtype == torch.float8_e4m3fn and v.numel() else v)
        for k, v in state.items()
        if not k.endswith("scaled_fp8")
    }
    save_file(bf16, str(tmp_path / "bf16_with_scales.safetensors"))
    with pytest.raises(ModelLoadError, match="scale_weight' tensors but no float8 weights"):
        load_transformer(tmp_path / "bf16_with_scales.safetensors", dtype=torch.bfloat16)


def test_dequantised_layer_by_layer_into_the_storage_dtype(models, tmp_path, monkeypatch):
    """No float32 copy of the model ever exists: each fp8 layer is widened alone and cast at once."""
    from hairdiff_core.models import loading

    transformer, _ = models
    path = tmp_path / "scaled.safetensors"
    fp8u.write_fp8_checkpoint(transformer, path)
    live = []  # weakrefs to every float32 layer made
    alive_at_call = []  # how many earlier ones still existed when the next was made
    real = loading._dequantise

    def spy(*args, **kwargs):
        import weakref

        alive_at_call.append(sum(ref() is not None for ref in live))
        out = real(*args, **kwargs)
        live.append(weakref.ref(out))
        return out

    monkeypatch.setattr(loading, "_dequantise", spy)
    state = {}
    real_build = loading._build_direct

    def build(s, *args, **kwargs):
        state.update(s)
        return real_build(s, *args, **kwargs)

    monkeypatch.setattr(loading, "_build_direct", build)
    load_transformer(path, dtype=torch.bfloat16, weights="fp8_e4m3fn")
    assert len(live) > 10 and max(alive_at_call) == 0  # one float32 layer at a time
    assert {t.dtype for t in state.values()} <= {torch.bfloat16, torch.float8_e4m3fn}
