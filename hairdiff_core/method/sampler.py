"""Samplers: the soft-mask (per-pixel noise level) Euler sampler and the replacement baseline.

Both walk SD3's flow-match sigma ladder (``flow.sampling_sigmas``) and call a ``denoise(x, sigma,
step)`` function that returns the velocity. ``TransformerDenoiser`` is that function for the
32-channel HairDiff transformer. Progress, cancel and cleanup are one mechanism: ``on_step`` is
called after every step and may raise (ComfyUI's Cancel does); callers hold their patches in
``try/finally``/context managers, so an exception from here leaves nothing behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from ..errors import NonFiniteError
from .flow import soft_noise, timestep_from_sigma

logger = logging.getLogger(__name__)

Denoise = Callable[[torch.Tensor, float, int], torch.Tensor]
OnStep = Callable[[int, int, torch.Tensor], None]


class AttentionHook(Protocol):
    def step_kwargs(self, sigma: float, step: int) -> dict: ...


def _check_finite(v: torch.Tensor, step: int, total: int, dtype: torch.dtype | None = None) -> None:
    if not bool(torch.isfinite(v).all()):
        # Every setting is range-checked up front, but extreme values within range (a large cfg,
        # reference weights, a tiny shift) can still overflow: name them before the weights.
        settings = "settings near their limits (--cfg, --shift, --ref-weight-inside/-outside, --strength)"
        if dtype == torch.float16:
            why = "fp16 overflows on SD3.5: use bf16 or fp32 (--dtype bf16 / fp32)"
        elif dtype is None:
            why = (
                f"in fp16, SD3.5 overflows: use bf16 or fp32; otherwise {settings}, or the weights "
                "(an adapter or model file holding NaN/inf)"
            )
        else:
            why = (
                f"the model runs in {str(dtype).replace('torch.', '')}: first try the defaults of {settings}; if "
                f"NaN stays, the weights are the cause (an adapter or model file holding NaN/inf or from a "
                f"diverged training run): try another adapter or the base model alone"
            )
        raise NonFiniteError(f"the model produced NaN/inf at step {step + 1} of {total}; {why}")


def soft_mask_sample(
    denoise: Denoise,
    x0: torch.Tensor,
    mask: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """Euler flow-matching with per-pixel noise level sigma * m (the design's soft-mask sampler).

    Start at x = soft_noise(x0, noise, sigma_max, m); each step x <- x + m * (s_next - s) * v.
    Pixels with m = 0 are never touched, so they stay the source latent bit for bit.
    """
    total = len(sigmas) - 1
    if total <= 0:
        return x0.clone()
    mask = mask.to(dtype=x0.dtype)
    x = soft_noise(x0, noise, float(sigmas[0]), mask)
    keep = mask == 0
    for i in range(total):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = denoise(x, s, i)
        _check_finite(v, i, total, getattr(denoise, "dtype", None))
        x = torch.where(keep, x, x + mask * (s_next - s) * v.to(x.dtype))
        if on_step is not None:
            on_step(i + 1, total, x)
    return x


def replace_sample(
    denoise: Denoise,
    x0: torch.Tensor,
    mask: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """Baseline: plain latent-replacement inpainting (what SD3's inpaint pipeline does).

    The whole latent is noised to sigma_max and stepped globally; after every step the region
    outside the *binary* mask is replaced by the source latent noised to the next level.
    """
    total = len(sigmas) - 1
    if total <= 0:
        return x0.clone()
    inside = (mask > 0.5).to(x0.dtype)
    s0 = float(sigmas[0])
    x = (1 - s0) * x0 + s0 * noise
    for i in range(total):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = denoise(x, s, i)
        _check_finite(v, i, total, getattr(denoise, "dtype", None))
        x = x + (s_next - s) * v.to(x.dtype)
        known = (1 - s_next) * x0 + s_next * noise
        x = inside * x + (1 - inside) * known
        if on_step is not None:
            on_step(i + 1, total, x)
    return x


SAMPLERS = {"joint": soft_mask_sample, "replace": replace_sample}


class TransformerDenoiser:
    """velocity = transformer(cat([x, sketch_latent]), timestep = sigma * 1000, text).

    With ``cfg != 1`` and negative embeddings, the uncond and cond halves run as one batch of 2B
    ([uncond, cond]) and are combined as u + cfg * (c - u). ``attention_hook.step_kwargs`` is
    asked once per step for the ``joint_attention_kwargs`` (one reference pass for both halves).
    """

    def __init__(
        self,
        transformer,
        sketch_latent: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        cfg: float = 1.0,
        attention_hook: AttentionHook | None = None,
    ):
        self.transformer = transformer
        self.sketch_latent = sketch_latent
        self.cfg = float(cfg)
        self.attention_hook = attention_hook
        self.do_cfg = self.cfg != 1.0 and negative_prompt_embeds is not None
        if self.do_cfg:
            self.encoder_hidden_states = torch.cat([negative_prompt_embeds, prompt_embeds])
            self.pooled = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])
        else:
            self.encoder_hidden_states = prompt_embeds
            self.pooled = pooled_prompt_embeds
        self.calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.pos_embed.proj.weight.dtype

    def __call__(self, x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        kwargs = self.attention_hook.step_kwargs(sigma, step) if self.attention_hook is not None else None
        model_in = torch.cat([x, self.sketch_latent.to(x.dtype)], dim=1).to(self.dtype)
        if self.do_cfg:
            model_in = torch.cat([model_in, model_in])
        # float32 like diffusers' pipelines: in bf16, 987.4 would become 988.
        timestep = timestep_from_sigma(sigma, model_in.shape[0], device=model_in.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=model_in,
            encoder_hidden_states=self.encoder_hidden_states.to(self.dtype),
            pooled_projections=self.pooled.to(self.dtype),
            timestep=timestep,
            joint_attention_kwargs=kwargs or None,
            return_dict=False,
        )[0]
        self.calls += 1
        out = out.float()
        if self.do_cfg:
            uncond, cond = out.chunk(2)
            out = uncond + self.cfg * (cond - uncond)
        return out
