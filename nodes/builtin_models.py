"""The built-in models (toy, tiny) as ComfyUI's own ``MODEL`` and ``VAE``.

ComfyUI recognises SD3 checkpoints by shape, and the built-in models are too small for its
detection: its MMDiT takes its width as 64 x depth and its head count as depth (SD3's head size
of 64), while the toy has 3 heads of 32 and the tiny model 4 heads of 8. So the built-in loader
builds ComfyUI's own ``comfy.model_base.SD3`` with an explicit config (its MMDiT, model sampling,
memory management and model patches are then ComfyUI's, exactly as for SD3.5) and converts the
diffusers weights into ComfyUI's key layout with ComfyUI's own key map. Their VAEs use GroupNorms
of 1 or 4 groups where ComfyUI's autoencoder has 32, so ``BuiltinVAE`` is ComfyUI's ``VAE``
(tiling, batching, memory management) around the diffusers autoencoder.
"""

from __future__ import annotations

import logging

import torch

#: ComfyUI's MMDiT: hidden = 64 x depth (``mmdit.py``: "this defines a head_size of 64").
COMFY_HEAD_DIM = 64


class MMDiTDepth(int):
    """The ``depth`` ComfyUI's MMDiT and its key maps read: the head count as an int, and
    ``64 * depth`` the model's width. With 64-wide heads (every SD3/SD3.5) it is a plain int."""

    hidden: int

    def __new__(cls, heads: int, hidden: int):
        obj = super().__new__(cls, int(heads))
        obj.hidden = int(hidden)
        return obj

    def __mul__(self, other):
        return self.hidden if other == COMFY_HEAD_DIM else int(self) * other

    __rmul__ = __mul__

    def __reduce__(self):  # copies and pickles (ComfyUI deep-copies model configs) keep the width
        return (MMDiTDepth, (int(self), self.hidden))


def unet_config_of(config) -> dict:
    """ComfyUI's MMDiT ``unet_config`` for a diffusers ``SD3Transformer2DModel`` config (what
    ``comfy.model_detection`` would read off the weights of a model of SD3's widths)."""
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    hidden = heads * head_dim
    if int(config["caption_projection_dim"]) != hidden:
        raise ValueError(f"caption_projection_dim {config['caption_projection_dim']} != width {hidden}")
    depth = heads if head_dim == COMFY_HEAD_DIM else MMDiTDepth(heads, hidden)
    dual = sorted(int(i) for i in (config.get("dual_attention_layers") or ()))
    pos = int(config["pos_embed_max_size"])
    return {
        "in_channels": int(config.get("in_channels", 16)),
        "out_channels": int(config.get("out_channels") or 16),
        "patch_size": int(config["patch_size"]),
        "depth": depth,
        "num_blocks": int(config["num_layers"]),
        "input_size": None,
        "adm_in_channels": int(config["pooled_projection_dim"]),
        "context_embedder_config": {
            "target": "torch.nn.Linear",
            "params": {"in_features": int(config["joint_attention_dim"]), "out_features": hidden},
        },
        "num_patches": pos * pos,
        "pos_embed_max_size": pos,
        "pos_embed_scaling_factor": None,
        "qk_norm": "rms" if config.get("qk_norm") else None,
        "x_block_self_attn_layers": dual,
    }


def to_comfy_layout(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer state dict in ComfyUI's (SD3's original) key layout.

    The key names come from ComfyUI's own map (``comfy.utils.mmdit_to_diffusers``); it places
    q/k/v at multiples of 64 x depth, so the slices are placed at multiples of the real width.
    """
    import comfy.utils

    blocks = int(config["num_layers"])
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    key_map = comfy.utils.mmdit_to_diffusers({"depth": blocks, "num_blocks": blocks})
    comfy_width = blocks * COMFY_HEAD_DIM
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        target = key_map.get(key)
        if target is None:
            raise KeyError(f"no ComfyUI key for diffusers key {key!r}")
        if isinstance(target, str):
            out[target] = tensor
            continue
        name, offset = target[0], target[1]
        fun = target[2] if len(target) > 2 else None
        value = fun(tensor) if fun is not None else tensor
        if offset is None:
            out[name] = value
        else:
            parts.setdefault(name, []).append((offset[1] // comfy_width * hidden, value))
    for name, pieces in parts.items():
        out[name] = torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim=0)
    return out


def latent_format_class(scale: float, shift: float):
    """A ComfyUI latent format with a built-in VAE's scale and shift (SD3's are measured on the
    SD3 VAE; the toy's on its own). No RGB preview factors: SD3's would be wrong for it."""
    import comfy.latent_formats

    class BuiltinLatent(comfy.latent_formats.SD3):
        def __init__(self):
            super().__init__()
            self.scale_factor = float(scale)
            self.shift_factor = float(shift)
            self.latent_rgb_factors = None
            self.latent_rgb_factors_bias = None
            self.taesd_decoder_name = None

    return BuiltinLatent


def comfy_model(transformer, scale: float, shift: float, sampling_shift: float):
    """ComfyUI's ``ModelPatcher`` around ``comfy.model_base.SD3`` holding ``transformer``'s weights.

    Args:
        transformer: a stock (16-channel) diffusers ``SD3Transformer2DModel``.
        scale, shift: the VAE's latent scale and shift (the model's latent format).
        sampling_shift: the flow-match schedule shift (ModelSamplingSD3 can change it later).
    """
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = dict(transformer.config)
    model_config = comfy.supported_models.SD3(unet_config_of(config))
    model_config.latent_format = latent_format_class(scale, shift)()
    model_config.sampling_settings["shift"] = float(sampling_shift)
    load_device = mm.get_torch_device()
    dtype = next(transformer.parameters()).dtype
    manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model({}, "")
    state = to_comfy_layout({k: v.detach().clone() for k, v in transformer.state_dict().items()}, config)
    missing, unexpected = model.diffusion_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"built-in model conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    offload = mm.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model.to(offload), load_device=load_device, offload_device=offload)


class _DiffusersKL(torch.nn.Module):
    """A diffusers ``AutoencoderKL`` with the ``encode``/``decode`` of ComfyUI's first stage
    models: pixels in [-1, 1] <-> raw latents (the distribution's mode, as the core encodes)."""

    def __init__(self, autoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(x).latent_dist.mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z).sample


def comfy_vae(autoencoder):
    """ComfyUI's ``VAE`` (VAE Encode/Decode, tiling, memory management) around a built-in diffusers
    autoencoder. ComfyUI builds a VAE's module from its weights; this one is given instead."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    class BuiltinVAE(comfy.sd.VAE):
        def __init__(self, module):
            # ComfyUI's defaults (an 8x, [-1, 1] KL autoencoder) without a module, and without its
            # "no VAE weights detected" warning: the module is set next.
            previous = logging.root.manager.disable
            logging.disable(logging.WARNING)
            try:
                super().__init__(sd={})
            finally:
                logging.disable(previous)
            self.first_stage_model = module.eval()
            self.latent_channels = int(module.autoencoder.config.latent_channels)
            self.working_dtypes = [torch.float32]
            self.device = mm.vae_device()
            self.vae_dtype = torch.float32
            self.output_device = mm.intermediate_device()
            self.patcher = comfy.model_patcher.ModelPatcher(
                module, load_device=self.device, offload_device=mm.vae_offload_device()
            )
            self.size = None
            self.model_size()

    return BuiltinVAE(_DiffusersKL(autoencoder.float()))
