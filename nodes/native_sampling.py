"""HairDiff on ComfyUI's own sampling: the soft-mask SAMPLER, the adapter's model wrapper and the
checks that turn a miswired graph into a node error.

The maths is the core's (``sampler.soft_mask_sample``, ``flow``); this module only adapts
ComfyUI's calling convention to it: ComfyUI's samplers call a denoiser that returns x0, the core
steps a velocity, and the soft mask arrives as the LATENT's ``noise_mask`` (``denoise_mask``).
"""

from __future__ import annotations

import torch

from ..hairdiff_core.method.flow import velocity_from_denoised
from ..hairdiff_core.method.sampler import soft_mask_sample
from .convert import node_error

SAMPLER_NODE = "HairDiff Soft-Mask Sampler"
ADAPTER_NODE = "HairDiff Apply Adapter"
CONDITIONING_NODE = "HairDiff Sketch Conditioning"
PATCH_EMBED = "diffusion_model.x_embedder.proj"
WRAPPER_KEY = "hairdiff_adapter"
#: The positive conditioning's key for the filled photo's raw latent (HairDiff Reference Attention).
FILLED_KEY = "hairdiff_filled_latent"


def model_input_channels(patcher) -> int:
    """Input channels of the patch embedding a ModelPatcher's model will run with (object
    patches included): 16 for stock SD3, 32 with HairDiff's adapter."""
    return int(patcher.get_model_object(PATCH_EMBED).weight.shape[1])


def _has_concat(guider) -> bool:
    conds = getattr(guider, "conds", None) or {}
    return any("c_concat" in c.get("model_conds", {}) for group in conds.values() for c in group)


def _text_width(guider) -> int | None:
    conds = getattr(guider, "conds", None) or {}
    for group in conds.values():
        for c in group:
            cross = c.get("model_conds", {}).get("c_crossattn")
            if cross is not None and hasattr(cross, "cond"):
                return int(cross.cond.shape[-1])
    return None


def check_wiring(guider, denoise_mask, node: str = SAMPLER_NODE) -> None:
    """The model, the conditioning and the latent must all be HairDiff's, before any step."""
    patcher = getattr(guider, "model_patcher", None)
    if patcher is not None and model_input_channels(patcher) == 16:
        raise node_error(
            node,
            "model",
            "the model has no HairDiff adapter (its patch embedding takes 16 channels)",
            f"put {ADAPTER_NODE} between the model loader and the guider",
        )
    if not _has_concat(guider):
        raise node_error(
            node,
            "positive",
            "the conditioning carries no sketch",
            f"connect positive and negative through {CONDITIONING_NODE}",
        )
    width = _text_width(guider)
    if patcher is not None and width is not None:
        want = patcher.get_model_object("diffusion_model.context_embedder").weight.shape[1]
        if width != want:
            raise node_error(
                node,
                "positive",
                f"the prompt is {width} wide but this model's text input takes {want}",
                "use the text encoders of this model (SD3's for SD3.5; the built-in model's 'no prompt', or "
                "HairDiff Prompt's tiny encoders for the tiny model)",
            )
    if denoise_mask is None:
        raise node_error(
            node,
            "latent_image",
            "the latent has no soft mask (noise_mask)",
            f"connect the latent output of {CONDITIONING_NODE}",
        )


def sample_soft_mask(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A k-diffusion-style sampler function (what ``comfy.samplers.KSAMPLER`` wraps) running the
    method's soft-mask sampler: start at (1 - m·σmax)·x0 + m·σmax·ε, step x += m·(σnext - σ)·v.

    ``model`` is ComfyUI's ``KSamplerX0Inpaint``: its ``latent_image`` (x0, in the model's latent
    space) and ``noise`` give the start, and its inner guider is called directly, so ComfyUI's
    inpaint blend (which re-noises the outside to σ) never runs: pixels with m = 0 stay x0. ``x``
    (the start ComfyUI noised uniformly) is not used.
    """
    import comfy.model_management as mm

    extra = dict(extra_args or {})
    mask = extra.pop("denoise_mask", None)
    guider = model.inner_model
    check_wiring(guider, mask)
    x0 = model.latent_image
    noise = model.noise
    last = {}

    def denoise(xt: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        mm.throw_exception_if_processing_interrupted()
        denoised = guider(xt, xt.new_full((xt.shape[0],), sigma), **extra)
        last["denoised"] = denoised
        return velocity_from_denoised(xt, denoised, sigma)

    def on_step(step: int, total: int, latent: torch.Tensor) -> None:
        if callback is not None:
            i = step - 1
            callback({"x": latent, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": last["denoised"]})

    return soft_mask_sample(denoise, x0, mask[:, :1].to(x0.dtype), sigmas, noise, on_step=on_step)


def adapter_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
    """APPLY_MODEL wrapper of a HairDiff model: the sketch latent is required, and it is brought
    into the model's latent space here (``noise_concat`` reaches the model raw, like a LATENT)."""
    if c_concat is None:
        raise node_error(
            ADAPTER_NODE,
            "model",
            "this model takes a sketch, and the conditioning it was sampled with has none",
            f"connect positive and negative through {CONDITIONING_NODE}",
        )
    model = executor.class_obj
    c_concat = model.latent_format.process_in(c_concat)
    return executor(x, t, c_concat, c_crossattn, control, transformer_options or {}, **kw)
