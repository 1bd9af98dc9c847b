"""Test helpers: write a transformer as ComfyUI's fp8 single files.

ComfyUI's ``*_fp8_scaled.safetensors`` (Comfy-Org's ``sd3.5_large_fp8_scaled``): the original
MMDiT keys under ``model.diffusion_model.``, a ``model.diffusion_model.scaled_fp8`` marker (an
empty tensor whose dtype is the fp8 format), each Linear weight as float8 ``weight / scale``
with ``<layer>.scale_weight`` (float32 scalar, so that weight = fp8 x scale, as ComfyUI's
``scaled_fp8_ops`` dequantise it) and optionally ``<layer>.scale_input``. A plain fp8 file is
the weights cast to float8 with no scales and no marker.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import save_file

# The tests run with --import-mode=importlib (tests/ is not on sys.path): load the sibling by path.
_spec = importlib.util.spec_from_file_location("_single_file_util", Path(__file__).with_name("_single_file_util.py"))
_sfu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sfu)
SD3_PREFIX, diffusers_to_ldm_vae, diffusers_to_original_sd3 = (
    _sfu.SD3_PREFIX,
    _sfu.diffusers_to_ldm_vae,
    _sfu.diffusers_to_original_sd3,
)


def _quantise(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().max().float() / torch.finfo(dtype).max).clamp_min(1e-12)
    return (w.float() / scale).to(dtype), scale.reshape(())


def write_fp8_checkpoint(
    transformer,
    path: str | Path,
    *,
    vae=None,
    dtype: torch.dtype = torch.float8_e4m3fn,
    scaled: bool = True,
    marker: bool = True,
    scale_input: bool = True,
) -> dict[str, torch.Tensor]:
    """Write ``transformer`` (a diffusers SD3 model) as an fp8 single file; returns the file's tensors.

    Every 2-D ``.weight`` becomes float8 (scaled per layer when ``scaled``); biases, norms and
    the position table stay float32. ``vae`` adds ``first_stage_model.*`` in float32.
    """
    # Converted one tensor at a time on the model's device (not the whole state in fp32 on the
    # CPU first): the GPU checks write SD3.5 Large's 8B parameters with this.
    state = {k: v.detach().contiguous() for k, v in transformer.state_dict().items()}
    original = diffusers_to_original_sd3(state)
    del state
    out: dict[str, torch.Tensor] = {}
    for key in list(original):
        t = original.pop(key)
        if key.endswith(".weight") and t.ndim == 2:
            if scaled:
                q, scale = _quantise(t, dtype)
                out[key] = q.cpu()
                layer = key[: -len(".weight")]
                out[layer + ".scale_weight"] = scale.cpu()
                if scale_input:
                    out[layer + ".scale_input"] = torch.ones(())
            else:
                out[key] = t.to(dtype).cpu()
        else:
            out[key] = t.float().cpu()
    if marker:
        out[SD3_PREFIX + "scaled_fp8"] = torch.empty(0, dtype=dtype)
    if vae is not None:
        out.update(diffusers_to_ldm_vae({k: v.detach().float().contiguous() for k, v in vae.state_dict().items()}))
    save_file(out, str(path))
    return out


def to_mixed_precision(written: dict[str, torch.Tensor], plain_layers: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """An fp8_scaled file's tensors in ComfyUI's newer mixed-precision layout, as its
    ``comfy.utils.convert_old_quants`` converts them: ``scale_weight`` -> ``weight_scale``,
    ``scale_input`` -> ``input_scale`` (dropped when 1), a ``<layer>.comfy_quant`` JSON per
    quantised layer, no marker. Layers whose name contains one of ``plain_layers`` are written
    back in bf16 without scales (the "mixed" in mixed precision)."""
    import json

    out: dict[str, torch.Tensor] = {}
    for key, t in written.items():
        if key.endswith("scaled_fp8"):
            continue
        layer = key.rsplit(".", 1)[0]
        plain = any(p in layer for p in plain_layers)
        if key.endswith(".scale_weight"):
            if not plain:
                out[layer + ".weight_scale"] = t
                conf = json.dumps({"format": "float8_e4m3fn"}).encode("utf-8")
                out[layer + ".comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
        elif key.endswith(".scale_input"):
            if not plain and float(t) != 1.0:
                out[layer + ".input_scale"] = t
        elif key.endswith(".weight") and t.dtype == torch.float8_e4m3fn and plain:
            out[key] = (t.float() * written[layer + ".scale_weight"]).to(torch.bfloat16)
        else:
            out[key] = t
    return out
