"""HairDiffPipeline: photo + sketch + matte -> photo with new hair.

One object that the CLI, the ComfyUI nodes and training's validation all call. It owns the
VAE scale/shift (one place), the crop-and-stitch of large photos, padding to multiples of 16,
the soft mask, the sampler choice, optional reference attention and the final composite.

Geometry: the matte's bounding box, grown by a context margin, is cut out of the photo and
resized to about ``work_size``² pixels (the model's native area, 1024² for SD3.5), generated
there, resized back and composited into the full-resolution photo with the feathered mask.
Outside that mask every pixel is the source's, bit for bit; a 4000x3000 portrait costs what a
1024² one does. Photos no larger than the work area are processed at their own size.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import mask as M
from .errors import InputError
from .flow import DEFAULT_SHIFT, sampling_sigmas
from .sampler import SAMPLERS, OnStep, TransformerDenoiser
from .surgery import widen_input_channels
from .text import check_text, zero_text

logger = logging.getLogger(__name__)

MULTIPLE = M.TOKEN_FACTOR  # VAE factor 8 x patch 2


@dataclass
class CropBox:
    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self):
        return (slice(self.top, self.top + self.height), slice(self.left, self.left + self.width))


@dataclass
class GenerateResult:
    image: torch.Tensor  # (B, 3, H, W) in [0, 1], the input photo's size
    latent: torch.Tensor  # (B, 16, h, w) final latent at the working size (SD3-scaled)
    mask: torch.Tensor  # (B, 1, H, W) the feathered composite mask at full resolution
    box: CropBox  # the context box in the full photo that was generated
    work_size: tuple[int, int]  # (height, width) the model worked at (before padding)
    info: dict = field(default_factory=dict)


def _to(module, device: torch.device, dtype: torch.dtype):
    """Move a diffusers model, casting only when needed (diffusers warns on every dtype cast)."""
    param = next(module.parameters(), None)
    if param is not None and param.dtype != dtype:
        module = module.to(dtype=dtype)
    if param is not None and param.device != device:
        module = module.to(device=device)
    return module


def _round_to(v: float, m: int) -> int:
    return max(m, int(round(v / m)) * m)


def _as_rgb(image: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise InputError(f"{what} must be a (B, C, H, W) tensor in [0, 1]")
    c = image.shape[1]
    if c == 3:
        return image.float()
    if c == 4:
        return image[:, :3].float()
    if c == 1:
        return image.float().repeat(1, 3, 1, 1)
    raise InputError(f"{what} has {c} channels; expected 1, 3 or 4")


def _match_size(x: torch.Tensor, size: tuple[int, int], what: str, mode: str) -> torch.Tensor:
    """Resize a sketch/matte to the photo's size when the aspect ratios agree (within 1%)."""
    h, w = x.shape[-2:]
    H, W = size
    if (h, w) == (H, W):
        return x
    if abs((w / h) / (W / H) - 1.0) > 0.01:
        raise InputError(
            f"the {what} is {w}x{h} but the photo is {W}x{H}: different aspect ratios "
            f"({w / h:.3f} vs {W / H:.3f}); draw the {what} on a canvas of the photo's size"
        )
    logger.info("resizing the %s from %dx%d to the photo's %dx%d (same aspect ratio)", what, w, h, W, H)
    if mode == "nearest":
        return F.interpolate(x, size=(H, W), mode="nearest")
    return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False, antialias=True)


def _broadcast_batch(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise InputError(f"the {what} batch has {x.shape[0]} items but the photo batch has {batch}; give 1 or {batch}")


def context_box(binary: torch.Tensor, margin: float, min_pad: int, aspect_hw: tuple[int, int] | None = None) -> CropBox:
    """Bounding box of the matte (union over the batch) grown by ``margin`` x its size + ``min_pad``."""
    H, W = binary.shape[-2:]
    any_rows = binary.amax(dim=(0, 1, 3)) > 0
    any_cols = binary.amax(dim=(0, 1, 2)) > 0
    rows = torch.nonzero(any_rows).flatten()
    cols = torch.nonzero(any_cols).flatten()
    t, b = int(rows[0]), int(rows[-1]) + 1
    l, r = int(cols[0]), int(cols[-1]) + 1
    pad_h = int(math.ceil((b - t) * margin)) + min_pad
    pad_w = int(math.ceil((r - l) * margin)) + min_pad
    t, b = max(0, t - pad_h), min(H, b + pad_h)
    l, r = max(0, l - pad_w), min(W, r + pad_w)
    return CropBox(t, l, b - t, r - l)


class HairDiffPipeline:
    def __init__(self, transformer, vae, device="cpu", dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None):
        widen_input_channels(transformer)
        self.device = torch.device(device)
        self.dtype = dtype
        self.transformer = _to(transformer, self.device, dtype).eval()
        # The SD3 VAE is numerically fragile in half precision (force_upcast in its config).
        self.vae_dtype = vae_dtype or torch.float32
        self.vae = _to(vae, self.device, self.vae_dtype).eval() if vae is not None else None
        self.encode_fn = None  # optional override: image01 (B,3,H,W) -> SD3-scaled latent
        self.decode_fn = None  # optional override: SD3-scaled latent -> image01

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_files(cls, model=None, vae=None, adapter=None, tiny: bool = False, device="cpu", dtype=torch.float32, toy: bool = False):
        from .loading import load_models

        # The SD3 VAE runs in float32 (force_upcast); loading it so avoids a bf16 round trip.
        loaded = load_models(model, vae=vae, tiny=tiny, toy=toy, dtype=dtype, device="cpu", vae_dtype=torch.float32)
        transformer = loaded.transformer
        if adapter is not None:
            from .adapter import load_adapter

            load_adapter(transformer, adapter)
        pipe = cls(transformer, loaded.vae, device=device, dtype=dtype)
        pipe.family = loaded.family
        return pipe

    @property
    def default_work_size(self) -> int:
        """The model's native side in pixels (sample_size latents x 8): 1024 for SD3.5, 256 tiny."""
        return int(self.transformer.config.sample_size) * M.LATENT_FACTOR

    # -- VAE: SD3's scale and shift live here and nowhere else --------------------------------
    @property
    def _scale_shift(self) -> tuple[float, float]:
        cfg = self.vae.config
        return float(cfg.scaling_factor), float(cfg.shift_factor or 0.0)

    @torch.no_grad()
    def encode(self, image01: torch.Tensor) -> torch.Tensor:
        if self.encode_fn is not None:
            return self.encode_fn(image01)
        if self.vae is None:
            raise InputError("this pipeline has no VAE; pass one (vae=...) or set encode_fn")
        scale, shift = self._scale_shift
        x = image01.to(self.device, self.vae_dtype) * 2 - 1
        latent = self.vae.encode(x).latent_dist.mode()
        return ((latent - shift) * scale).float()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if self.decode_fn is not None:
            return self.decode_fn(latent)
        if self.vae is None:
            raise InputError("this pipeline has no VAE; pass one (vae=...) or set decode_fn")
        scale, shift = self._scale_shift
        image = self.vae.decode((latent.to(self.device, self.vae_dtype) / scale) + shift).sample
        return ((image.float() + 1) / 2).clamp(0, 1)

    # -- the main call ----------------------------------------------------------------------
    @staticmethod
    def prepare_inputs(image, sketch, matte, matte_threshold: float = 0.5):
        """Validate and align the inputs: (photo RGB, sketch at photo size, binary matte).

        Cheap, and raises the same errors ``generate`` would: call it before loading a model.
        """
        photo = _as_rgb(image, "photo").clamp(0, 1)
        B, _, H, W = photo.shape
        for t, what in ((sketch, "sketch"), (matte, "matte")):
            if not isinstance(t, torch.Tensor) or t.ndim != 4:
                raise InputError(f"{what} must be a (B, C, H, W) tensor in [0, 1]")
        sketch = _broadcast_batch(_match_size(sketch.float(), (H, W), "sketch", "bilinear"), B, "sketch")
        matte = _broadcast_batch(_match_size(matte.float(), (H, W), "matte", "nearest"), B, "matte")
        return photo, sketch, M.binarize_matte(matte, matte_threshold)

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        sketch: torch.Tensor,
        matte: torch.Tensor,
        *,
        steps: int = 28,
        seed: int = 0,
        strength: float = 1.0,
        cfg: float = 1.0,
        shift: float = DEFAULT_SHIFT,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        method: str = "joint",
        reference=None,
        feather_sigma: float | None = None,
        matte_threshold: float = 0.5,
        paste_back: bool = True,
        work_size: int | None = None,
        context_margin: float = 0.25,
        on_step: OnStep | None = None,
    ) -> GenerateResult:
        if method not in SAMPLERS:
            raise InputError(f"unknown method {method!r}; choose one of {sorted(SAMPLERS)}")
        if steps < 1:
            raise InputError(f"steps must be at least 1, got {steps}")
        if not 0.0 <= strength <= 1.0:
            raise InputError(f"strength must be in [0, 1], got {strength}")
        photo, sketch, binary = self.prepare_inputs(image, sketch, matte, matte_threshold)
        B, _, H, W = photo.shape

        # Geometry: work area and context box.
        work = int(work_size or self.default_work_size)
        work_area = work * work
        sigma_at_work = M.DEFAULT_FEATHER_SIGMA if feather_sigma is None else float(feather_sigma)
        if H * W <= work_area:
            box = CropBox(0, 0, H, W)
            scale = 1.0
        else:
            # Pad the box enough that the feathered mask is zero at its border.
            provisional = context_box(binary, context_margin, 0)
            scale = min(1.0, math.sqrt(work_area / (provisional.height * provisional.width)))
            sigma_full = M.feather_sigma(work, work, sigma_at_work) / max(scale, 1e-6)
            box = context_box(binary, context_margin, int(math.ceil(3 * sigma_full)) + MULTIPLE)
            scale = math.sqrt(work_area / (box.height * box.width))
        if scale == 1.0:
            wh, ww = box.height, box.width
        else:
            wh, ww = _round_to(box.height * scale, 1), _round_to(box.width * scale, 1)
        ph, pw = -wh % MULTIPLE, -ww % MULTIPLE

        def to_work(x: torch.Tensor, mode: str) -> torch.Tensor:
            x = x[..., box.slices[0], box.slices[1]]
            if (x.shape[-2], x.shape[-1]) != (wh, ww):
                if mode == "nearest":
                    x = F.interpolate(x, size=(wh, ww), mode="nearest")
                else:
                    x = F.interpolate(x, size=(wh, ww), mode="bilinear", align_corners=False, antialias=True)
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph), mode="replicate")
            return x

        photo_w = to_work(photo, "bilinear")
        binary_w = to_work(binary, "nearest")
        if ph or pw:
            binary_w[..., wh:, :] = 0
            binary_w[..., :, ww:] = 0
        sketch_rgb, _ = M.normalize_sketch(to_work(sketch, "bilinear"))
        sigma_work = M.feather_sigma(wh, ww, sigma_at_work)
        soft_w = M.soft_mask(binary_w, sigma_work)

        # Latents.
        x0 = self.encode(photo_w).to(self.device)
        if method == "replace":
            sketch_latent = torch.zeros_like(x0)  # the baseline never sees the sketch
        else:
            sketch_latent = self.encode(sketch_rgb).to(self.device)
        mask_lat = M.latent_grid(soft_w).to(self.device)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(self.device)
        sigmas = sampling_sigmas(steps, shift=shift, strength=strength)

        # Text.
        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds = zero_text(self.transformer, B, self.device, torch.float32)
        else:
            if pooled_prompt_embeds is None:
                raise InputError("prompt_embeds were given without pooled_prompt_embeds; SD3 needs both")
            check_text(self.transformer, prompt_embeds, pooled_prompt_embeds)
            prompt_embeds = _broadcast_batch(prompt_embeds, B, "prompt embeddings").to(self.device)
            pooled_prompt_embeds = _broadcast_batch(pooled_prompt_embeds, B, "pooled prompt embeddings").to(self.device)
        if cfg != 1.0 and negative_prompt_embeds is None:
            # The unconditional branch is the training default: zero text.
            negative_prompt_embeds, negative_pooled_prompt_embeds = zero_text(
                self.transformer, B, self.device, torch.float32, tokens=prompt_embeds.shape[1]
            )
        if negative_prompt_embeds is not None:
            if negative_pooled_prompt_embeds is None:
                raise InputError("negative_prompt_embeds were given without negative_pooled_prompt_embeds")
            check_text(self.transformer, negative_prompt_embeds, negative_pooled_prompt_embeds, "negative prompt")
            negative_prompt_embeds = _broadcast_batch(negative_prompt_embeds, B, "negative prompt").to(self.device)
            negative_pooled_prompt_embeds = _broadcast_batch(negative_pooled_prompt_embeds, B, "negative pooled").to(self.device)
            if negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]:
                raise InputError(
                    f"prompt and negative prompt have {prompt_embeds.shape[1]} and "
                    f"{negative_prompt_embeds.shape[1]} tokens; encode both with the same max length"
                )

        sampler = SAMPLERS[method]
        info = {"steps_run": len(sigmas) - 1, "work_size": (wh, ww), "box": box, "method": method}
        with self._attention(reference, method, photo_w, binary_w, soft_w, x0, noise, prompt_embeds, pooled_prompt_embeds) as hook:
            denoise = TransformerDenoiser(
                self.transformer,
                sketch_latent,
                prompt_embeds,
                pooled_prompt_embeds,
                negative_prompt_embeds,
                negative_pooled_prompt_embeds,
                cfg=cfg,
                attention_hook=hook,
            )
            latent = sampler(denoise, x0, mask_lat, sigmas, noise, on_step=on_step)
            info["model_calls"] = denoise.calls
            if hook is not None:
                info["reference_passes"] = getattr(hook, "reference_passes", None)

        if info["steps_run"] == 0:
            # Nothing was generated (strength 0): the source itself, without a VAE round trip.
            return GenerateResult(image=photo.clone(), latent=latent, mask=torch.zeros(B, 1, H, W), box=box, work_size=(wh, ww), info=info)

        # Back to pixels and into the full photo.
        decoded = self.decode(latent)[..., :wh, :ww]
        if (wh, ww) != (box.height, box.width):
            decoded = F.interpolate(decoded, size=(box.height, box.width), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        sigma_full = M.feather_sigma(wh, ww, sigma_at_work) * box.height / wh
        full_mask = torch.zeros(B, 1, H, W)
        full_mask[..., box.slices[0], box.slices[1]] = M.soft_mask(binary[..., box.slices[0], box.slices[1]], sigma_full)
        result = photo.clone()
        region = result[..., box.slices[0], box.slices[1]]
        if paste_back:
            m = full_mask[..., box.slices[0], box.slices[1]]
            region = torch.where(m > 0, region * (1 - m) + decoded.cpu() * m, region)
        else:
            region = decoded.cpu()
        result[..., box.slices[0], box.slices[1]] = region
        return GenerateResult(image=result, latent=latent, mask=full_mask, box=box, work_size=(wh, ww), info=info)

    def _attention(self, reference, method, photo_w, binary_w, soft_w, x0, noise, embeds, pooled):
        """Context manager that installs reference attention for one call, or does nothing."""
        import contextlib

        from .reference import ReferenceSettings, fill_hair_region, reference_attention

        # None, "off"|"once"|"per_step", a dict of fields or ReferenceSettings (validated here).
        reference = ReferenceSettings.coerce(reference)
        if reference.mode == "off":
            return contextlib.nullcontext(None)
        if method == "replace":
            raise InputError("reference attention is part of the joint method; use method='joint' or reference='off'")

        if reference.reference_input == "filled":
            ref_latent = self.encode(fill_hair_region(photo_w, binary_w)).to(self.device)
        else:
            ref_latent = x0
        return reference_attention(
            self.transformer,
            reference,
            reference_latent=ref_latent,
            token_mask=M.token_grid(soft_w).to(self.device),
            noise=noise,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
        )
