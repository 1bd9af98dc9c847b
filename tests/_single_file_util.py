"""Test helpers: write diffusers-layout weights in the original single-file layouts.

Inverses of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` (SD3 MMDiT keys as
in Stability's / ComfyUI's checkpoints) and ``convert_ldm_vae_checkpoint`` (LDM VAE keys).
diffusers has no such direction; tests check these by converting back with diffusers.
"""

from __future__ import annotations

import re

import torch

SD3_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    # diffusers' swap_scale_shift exchanges the two halves: applying it twice is the identity.
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_original_sd3(state: dict[str, torch.Tensor], prefix: str = SD3_PREFIX) -> dict[str, torch.Tensor]:
    """Diffusers ``SD3Transformer2DModel`` state dict -> original MMDiT single-file keys.

    Raises KeyError if a diffusers key is left unmapped, so the mapping cannot silently drop one.
    """
    sd = dict(state)
    out: dict[str, torch.Tensor] = {}

    def move(src: str, dst: str, fn=None) -> None:
        t = sd.pop(src)
        out[dst] = fn(t) if fn else t

    move("pos_embed.pos_embed", "pos_embed")
    for wb in ("weight", "bias"):
        move(f"pos_embed.proj.{wb}", f"x_embedder.proj.{wb}")
        move(f"context_embedder.{wb}", f"context_embedder.{wb}")
        for i, j in ((1, 0), (2, 2)):
            move(f"time_text_embed.timestep_embedder.linear_{i}.{wb}", f"t_embedder.mlp.{j}.{wb}")
            move(f"time_text_embed.text_embedder.linear_{i}.{wb}", f"y_embedder.mlp.{j}.{wb}")
        move(f"proj_out.{wb}", f"final_layer.linear.{wb}")
        move(f"norm_out.linear.{wb}", f"final_layer.adaLN_modulation.1.{wb}", _swap_halves)

    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    last = blocks[-1]
    for i in blocks:
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for wb in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{wb}"] = torch.cat([sd.pop(f"{d}attn.to_{c}.{wb}") for c in "qkv"])
            out[f"{o}context_block.attn.qkv.{wb}"] = torch.cat([sd.pop(f"{d}attn.add_{c}_proj.{wb}") for c in "qkv"])
            move(f"{d}attn.to_out.0.{wb}", f"{o}x_block.attn.proj.{wb}")
            move(f"{d}norm1.linear.{wb}", f"{o}x_block.adaLN_modulation.1.{wb}")
            move(
                f"{d}norm1_context.linear.{wb}",
                f"{o}context_block.adaLN_modulation.1.{wb}",
                _swap_halves if i == last else None,
            )
            move(f"{d}ff.net.0.proj.{wb}", f"{o}x_block.mlp.fc1.{wb}")
            move(f"{d}ff.net.2.{wb}", f"{o}x_block.mlp.fc2.{wb}")
            if i != last:
                move(f"{d}attn.to_add_out.{wb}", f"{o}context_block.attn.proj.{wb}")
                move(f"{d}ff_context.net.0.proj.{wb}", f"{o}context_block.mlp.fc1.{wb}")
                move(f"{d}ff_context.net.2.{wb}", f"{o}context_block.mlp.fc2.{wb}")
            if f"{d}attn2.to_q.{wb}" in sd:
                out[f"{o}x_block.attn2.qkv.{wb}"] = torch.cat([sd.pop(f"{d}attn2.to_{c}.{wb}") for c in "qkv"])
                move(f"{d}attn2.to_out.0.{wb}", f"{o}x_block.attn2.proj.{wb}")
        for dn, on in (
            ("norm_q", "x_block.attn.ln_q"),
            ("norm_k", "x_block.attn.ln_k"),
            ("norm_added_q", "context_block.attn.ln_q"),
            ("norm_added_k", "context_block.attn.ln_k"),
        ):
            if f"{d}attn.{dn}.weight" in sd:
                move(f"{d}attn.{dn}.weight", f"{o}{on}.weight")
        for dn, on in (("norm_q", "ln_q"), ("norm_k", "ln_k")):
            if f"{d}attn2.{dn}.weight" in sd:
                move(f"{d}attn2.{dn}.weight", f"{o}x_block.attn2.{on}.weight")
    if sd:
        raise KeyError(f"unmapped diffusers keys: {sorted(sd)[:10]}")
    return {prefix + k: v for k, v in out.items()}


def diffusers_to_ldm_vae(state: dict[str, torch.Tensor], prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> original LDM VAE keys (as in SD checkpoints).

    Attention projections become 1x1 convs as in the LDM files. Raises KeyError on a leftover key.
    """
    n_up = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out: dict[str, torch.Tensor] = {}
    left = []
    attn_names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, t in state.items():
        new = key
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key):
            new = f"{m.group(1)}.mid.attn_1.{attn_names[m.group(2)]}.{m.group(3)}"
            if t.ndim == 2:
                t = t[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)$", key):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
            new = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{m.group(3)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", key):
            new = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
            new = f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.{m.group(3)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", key):
            new = f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)$", key):
            new = f"{m.group(1)}.norm_out.{m.group(2)}"
        elif not re.match(r"(encoder|decoder)\.conv_(in|out)\.|(post_)?quant_conv\.", key):
            left.append(key)
            continue
        out[prefix + new.replace("conv_shortcut", "nin_shortcut")] = t
    if left:
        raise KeyError(f"unmapped diffusers VAE keys: {left[:10]}")
    return out
