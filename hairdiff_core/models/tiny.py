"""The built-in tiny model: an SD3-shaped transformer and VAE with fixed random weights.

It is a *wiring check*: small enough for a CPU, shaped like SD3.5 (rms q/k norm, one
dual-attention block like SD3.5 Medium, 16 latent channels, VAE factor 8), and produces
noise-like pictures. Its weights come from numpy's PCG64 generator seeded per parameter name,
which numpy keeps stable across versions and platforms, so the tiny model is the same on
every machine and an adapter trained on it loads onto it later.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

TINY_SEED = 20261122

#: The one line that says what the tiny model is, wherever it is used (run-time log, the demo's
#: contact sheet): on a real photo it draws noise, which otherwise reads as a broken install.
LABEL = "built-in TINY model: random weights, a wiring check; the hair it draws is noise (real results need SD3.5 and a trained adapter)"

TINY_TRANSFORMER_CONFIG = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}

TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 256,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}

#: The tiny model's natural working size in pixels (the demo's and the tests' default).
TINY_WORK_SIZE = 256


def _fill_deterministic(module: torch.nn.Module, seed: int) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            shape = tuple(param.shape)
            if param.ndim == 1 and ("norm" in name and name.endswith("weight")):
                values = np.ones(shape)
            elif param.ndim == 1:
                values = rng.standard_normal(shape) * 0.02
            else:
                fan_in = int(np.prod(shape[1:]))
                values = rng.standard_normal(shape) / np.sqrt(fan_in)
            param.copy_(torch.from_numpy(values.astype(np.float32)))


def build_tiny_transformer(seed: int = TINY_SEED, dtype: torch.dtype = torch.float32):
    """Return the tiny ``SD3Transformer2DModel`` (16 input channels, not widened)."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**TINY_TRANSFORMER_CONFIG)
    _fill_deterministic(model, seed)
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.eval()


def build_tiny_vae(seed: int = TINY_SEED, dtype: torch.dtype = torch.float32):
    """Return the tiny ``AutoencoderKL`` (16 latent channels, factor 8, SD3 scale/shift)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    _fill_deterministic(vae, seed + 1)
    if dtype != torch.float32:
        vae = vae.to(dtype=dtype)
    return vae.eval()
