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
import os
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from .checks import GENERATE_BOUNDS, check_device, check_number, parse_dtype
from .defaults import DEFAULTS
from .errors import InputError
from .fileio import check_input_path
from .imageops import resize_same_aspect, to_rgb
from .method import mask as M
from .method.flow import sampling_sigmas
from .method.sampler import SAMPLERS, OnStep, TransformerDenoiser
from .method.surgery import widen_input_channels
from .models.text import PromptCache, check_text, zero_text
from .settings import GenerateSettings

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


def _check_range(x: torch.Tensor, what: str) -> None:
    """Refuse NaN/inf pixels and 0..255 images: the core takes float images in [0, 1]."""
    if x.numel() == 0:
        raise InputError(f"the {what} is empty ({tuple(x.shape)})", input=what)
    if not x.is_floating_point():
        raise InputError(
            f"the {what} is a {x.dtype} tensor; HairDiff takes float images in [0, 1] (divide 8-bit images by 255)",
            input=what,
        )
    # min and max propagate NaN and show inf: no full-size boolean copy of a large photo.
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"the {what} holds NaN or inf values; give a finite image in [0, 1]", input=what)
    if hi > 1.0 + 1e-3 or lo < -1e-3:
        fix = "divide it by 255" if hi > 1.5 else "clamp it to [0, 1]"
        raise InputError(
            f"the {what} has values {lo:g}..{hi:g}, but HairDiff takes images in [0, 1]: {fix}", input=what
        )


def _as_rgb(image: torch.Tensor, what: str) -> torch.Tensor:
    return to_rgb(image, what).float()


def _match_size(x: torch.Tensor, size: tuple[int, int], what: str, mode: str, announce: bool = True) -> torch.Tensor:
    """Resize a sketch/matte to the photo's size when the aspect ratios agree (within 1%)."""
    out = resize_same_aspect(x, size, what, "photo", mode)
    if announce and out is not x:
        logger.info(
            "resizing the %s from %dx%d to the photo's %dx%d (same aspect ratio)",
            what,
            x.shape[-1],
            x.shape[-2],
            size[1],
            size[0],
        )
    return out


def _reference_mode(reference) -> str:
    """The mode of a ``reference`` argument (None, a mode string, a dict or ``ReferenceSettings``)."""
    from .method.reference import ReferenceSettings

    return ReferenceSettings.coerce(reference).mode


def _broadcast_batch(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise InputError(
        f"the {what} batch has {x.shape[0]} items but the photo batch has {batch}; give 1 or {batch}",
        input=what.split()[0] if what.split()[0] in ("sketch", "matte") else None,
    )


def context_box(binary: torch.Tensor, margin: float, min_pad: int) -> CropBox:
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


def check_model_files(model=None, vae=None, adapter=None, tiny: bool = False, toy: bool = False) -> None:
    """Cheap checks of model arguments before anything loads: the paths exist and an adapter
    carries a HairDiff header (read without its tensors)."""
    from .errors import ModelLoadError

    if tiny and toy:
        raise ModelLoadError("choose the tiny model or the toy model, not both", input="model")
    builtin = "tiny" if tiny else "toy" if toy else None
    if builtin and (model is not None or vae is not None):
        raise ModelLoadError(
            f"the {builtin} model brings its own transformer and VAE; do not pass a model or VAE with it", input="model"
        )
    if builtin is None and model is None:
        raise ModelLoadError(
            "no model given: pass an SD3/SD3.5 diffusers folder or .safetensors checkpoint "
            "(--model PATH), the toy model (--toy: small, trained on synthetic portraits) or the tiny model "
            "(--tiny) for a wiring check",
            input="model",
        )
    for value, what in ((model, "model"), (vae, "vae"), (adapter, "adapter")):
        if value is not None and not os.path.exists(os.path.expanduser(str(value))):
            raise ModelLoadError(f"{what} not found: {value}", input=what)
        if value is not None:
            check_input_path(value, what, kind="file" if what == "adapter" else "any", input=what)
    if adapter is not None:
        from .errors import HairDiffError
        from .models.adapter import read_adapter_metadata

        try:
            read_adapter_metadata(adapter)
        except HairDiffError as exc:
            exc.input = exc.input or "adapter"
            raise


def builtin_model_label(family: str | None) -> str | None:
    """The one-line description of a built-in model family ("toy", "tiny"); None for real models."""
    if family == "toy":
        from .models.toy import LABEL

        return LABEL
    if family == "tiny":
        from .models.tiny import LABEL

        return LABEL
    return None


def _auto_offload(family: str, transformer, device) -> str:
    """offload="auto" outside ComfyUI: the core's one policy (``memory.auto_offload_for``) for the
    free CUDA memory, at the model's native size with reference attention ``once``."""
    from .models.memory import auto_offload_for

    device = torch.device(device)
    if device.type != "cuda":
        return "none"
    free, _ = torch.cuda.mem_get_info(device)
    side = int(transformer.config.sample_size) * M.LATENT_FACTOR
    choice = auto_offload_for(transformer, family, free, height=side, width=side, reference="once")
    logger.info("offload auto: %.1f GB free -> %s", free / 2**30, choice)
    return choice


@dataclass(frozen=True)
class CropPlan:
    """Where the model works: the context ``box`` in the full photo, its working size
    (``height`` x ``width``, the box scaled to about the model's pixel count) and the replicate
    padding (``pad_h``, ``pad_w``) up to the model's multiple of 16."""

    box: CropBox
    height: int
    width: int
    pad_h: int
    pad_w: int

    def to_work(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """Crop ``x`` (B, C, H, W) to the box, resize to the working size, pad to the multiple."""
        x = x[..., self.box.slices[0], self.box.slices[1]]
        if (x.shape[-2], x.shape[-1]) != (self.height, self.width):
            if mode == "nearest":
                x = F.interpolate(x, size=(self.height, self.width), mode="nearest")
            else:
                x = F.interpolate(
                    x, size=(self.height, self.width), mode="bilinear", align_corners=False, antialias=True
                )
        if self.pad_h or self.pad_w:
            x = F.pad(x, (0, self.pad_w, 0, self.pad_h), mode="replicate")
        return x


def max_work_side(transformer) -> int | None:
    """The longest side in pixels the transformer takes: its ``pos_embed_max_size`` (tokens)
    x patch size x the VAE's 8 (3072 px for SD3.5 Large and SD3 Medium, 6144 for SD3.5 Medium,
    1536 tiny, 512 toy); None when the config sets no limit."""
    cfg = transformer.config
    tokens = getattr(cfg, "pos_embed_max_size", None)
    if not tokens:
        return None
    return int(tokens) * int(getattr(cfg, "patch_size", 2) or 2) * M.LATENT_FACTOR


def widen_box(box: CropBox, height: int, width: int, max_aspect: float) -> CropBox:
    """``box`` grown along its short side, centred and kept inside the ``height`` x ``width``
    photo, until its long side is at most ``max_aspect`` x its short side (or it spans the photo)."""
    bh, bw = box.height, box.width
    if bh > bw * max_aspect:
        need = min(width, math.ceil(bh / max_aspect))
        left = min(max(0, box.left - (need - bw) // 2), width - need)
        return CropBox(box.top, left, bh, need)
    if bw > bh * max_aspect:
        need = min(height, math.ceil(bw / max_aspect))
        top = min(max(0, box.top - (need - bh) // 2), height - need)
        return CropBox(top, box.left, need, bw)
    return box


def plan_crop(
    binary: torch.Tensor, work: int, sigma_at_work: float, context_margin: float, max_side: int | None = None
) -> CropPlan:
    """The context box and working size for a binary matte (B, 1, H, W).

    A photo within ``work``² pixels is worked whole at its size. A larger one is cut to the
    matte's bounding box grown by ``context_margin``, padded so that the feathered mask is zero
    at the box's border (pixels outside the box then stay the photo's, bit for bit), and scaled
    to about ``work``² pixels.

    ``max_side`` (``max_work_side(transformer)``) bounds each working side: the transformer has
    position embeddings for that many pixels only. A thin box (a braid, a strand) is first
    widened with more of the photo around it, so that the model still works at its native
    pixel count and sees real context; only where the photo itself is too thin (a 100x2000
    photo) is the working area scaled down until its long side fits, the short side then being
    replicate-padded to the multiple of 16. None (the default): no bound.
    """
    H, W = binary.shape[-2:]
    work_area = work * work

    def fitted(scale: float, box: CropBox) -> float:
        if max_side is None:
            return scale
        return min(scale, max_side / box.height, max_side / box.width)

    def widened(box: CropBox) -> CropBox:
        # At the full work area a box of aspect a has a long side of sqrt(area * a) pixels.
        if max_side is None:
            return box
        return widen_box(box, H, W, max(1.0, max_side * max_side / work_area))

    if H * W <= work_area:
        box = CropBox(0, 0, H, W)
        scale = fitted(1.0, box)
    else:
        provisional = widened(context_box(binary, context_margin, 0))
        scale = fitted(min(1.0, math.sqrt(work_area / (provisional.height * provisional.width))), provisional)
        sigma_full = M.feather_sigma(work, work, sigma_at_work) / max(scale, 1e-6)
        box = widened(context_box(binary, context_margin, M.blur_radius(sigma_full) + MULTIPLE))
        scale = fitted(math.sqrt(work_area / (box.height * box.width)), box)
    if scale == 1.0:
        wh, ww = box.height, box.width
    else:
        wh, ww = _round_to(box.height * scale, 1), _round_to(box.width * scale, 1)
        if max_side is not None:
            wh, ww = min(wh, max_side), min(ww, max_side)
    return CropPlan(box, wh, ww, -wh % MULTIPLE, -ww % MULTIPLE)


@dataclass(frozen=True)
class WorkInputs:
    """The inputs of one generation at the model's working size (``prepare_work``).

    ``photo`` and ``sketch`` (normalised: white strokes on black) are (B, 3, h, w), ``binary`` and
    ``soft`` (the feathered matte) (B, 1, h, w), all cropped to ``plan.box``, resized and padded to
    multiples of 16; ``latent_mask`` is ``soft`` on the latent grid (h/8, w/8), the per-pixel
    noise level of the soft-mask sampler."""

    plan: CropPlan
    sigma_at_work: float
    photo: torch.Tensor
    sketch: torch.Tensor
    binary: torch.Tensor
    soft: torch.Tensor
    latent_mask: torch.Tensor


def prepare_work(
    photo: torch.Tensor,
    sketch: torch.Tensor,
    binary: torch.Tensor,
    work_size: int,
    feather_sigma: float | None = None,
    context_margin: float = DEFAULTS.context_margin,
    max_side: int | None = None,
) -> WorkInputs:
    """Crop, resize and pad aligned inputs (``prepare_inputs``' output) to the working size, and
    feather the matte: the method's geometry, shared by every host (the diffusers pipeline here,
    ComfyUI's nodes on its own model).

    Args:
        photo: (B, 3, H, W) in [0, 1].
        sketch: (B, C, H, W) in [0, 1], the photo's size.
        binary: (B, 1, H, W) binary matte, the photo's size.
        work_size: side of the working area in px (the model's native size: 1024 for SD3.5).
        feather_sigma: soft-mask feather in px at 1024 px; None = the default.
        context_margin: context box around the matte, as a fraction of its size.
        max_side: the longest side the model takes (``max_work_side``); thinner boxes are widened.
    """
    sigma_at_work = M.DEFAULT_FEATHER_SIGMA if feather_sigma is None else float(feather_sigma)
    plan = plan_crop(binary, int(work_size), sigma_at_work, context_margin, max_side)
    binary_w = plan.to_work(binary, "nearest")
    binary_w[..., plan.height :, :] = 0  # the replicate padding is not hair
    binary_w[..., :, plan.width :] = 0
    sketch_rgb, _ = M.normalize_sketch(plan.to_work(sketch, "bilinear"))
    soft_w = M.soft_mask(binary_w, M.feather_sigma(plan.height, plan.width, sigma_at_work))
    return WorkInputs(
        plan=plan,
        sigma_at_work=sigma_at_work,
        photo=plan.to_work(photo, "bilinear"),
        sketch=sketch_rgb,
        binary=binary_w,
        soft=soft_w,
        latent_mask=M.latent_grid(soft_w),
    )


def composite(
    photo: torch.Tensor,
    binary: torch.Tensor,
    decoded: torch.Tensor,
    plan: CropPlan,
    sigma_at_work: float,
    paste_back: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stitch the decoded working box back into the full photo with the feathered matte.

    Returns (image, full-size soft mask). Where the mask is 0 the photo's pixels are kept as
    they are (``torch.where``, not a blend), so the background is the photo's bit for bit.
    """
    B, _, H, W = photo.shape
    box = plan.box
    if (plan.height, plan.width) != (box.height, box.width):
        decoded = F.interpolate(
            decoded, size=(box.height, box.width), mode="bilinear", align_corners=False, antialias=True
        ).clamp(0, 1)
    sigma_full = M.feather_sigma(plan.height, plan.width, sigma_at_work) * box.height / plan.height
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
    return result, full_mask


class LatentCodec(Protocol):
    """Encodes images to SD3-scaled latents and back, in place of the pipeline's own VAE."""

    def encode(self, image01: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...


class HairDiffPipeline:
    def __init__(
        self,
        transformer,
        vae,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype | None = None,
        offload: str = "none",
        codec: LatentCodec | None = None,
    ):
        """Build a pipeline around a (16- or 32-channel) SD3 transformer.

        Args:
            transformer: a diffusers ``SD3Transformer2DModel``; widened to 32 input channels here
                if it is stock (outputs unchanged until an adapter is loaded).
            vae: the SD3 VAE (``AutoencoderKL``), or None when ``codec`` encodes and decodes.
            device: where sampling runs.
            dtype: the transformer's compute dtype.
            vae_dtype: the VAE's dtype (default float32: the SD3 VAE is fragile in half precision).
            offload: ``none``, ``model`` or ``blocks`` (see ``memory.apply_offload``).
            codec: an object with ``encode(image01) -> latent`` and ``decode(latent) -> image01``
                used instead of ``vae`` (ComfyUI passes its own VAE this way); latents are
                SD3-scaled, images (B, 3, H, W) in [0, 1].
        """
        from .models.memory import apply_offload, check_offload

        widen_input_channels(transformer)
        self.device = torch.device(device)
        self.dtype = dtype
        # none: on the device for good; model: on the device while sampling only; blocks: one
        # block at a time (memory.apply_offload). "auto" is resolved by the caller (choose_settings).
        self.offload = check_offload(offload)
        if offload in ("model", "blocks"):
            self.transformer = _to(transformer, torch.device("cpu"), dtype).eval()
            apply_offload(self.transformer, offload, self.device)
        else:
            self.transformer = _to(transformer, self.device, dtype).eval()
        # The SD3 VAE is numerically fragile in half precision (force_upcast in its config).
        self.vae_dtype = vae_dtype or torch.float32
        self.vae = _to(vae, self.device, self.vae_dtype).eval() if vae is not None else None
        self.codec = codec
        # Where prompts are encoded (text_encoders.TextEncoderSource), loaded only when a prompt
        # is not cached yet and freed before sampling.
        self.text_encoders = None
        self.prompt_cache = PromptCache()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_files(
        cls,
        model=None,
        vae=None,
        adapter=None,
        tiny: bool = False,
        device="cpu",
        dtype=torch.float32,
        text_encoders=None,
        weights: str = "auto",
        offload: str = "none",
        toy: bool = False,
    ):
        """Load a base model (+ adapter) from files and build the pipeline.

        Every argument is checked before any weight is read: the device exists, the dtype is
        a float precision, the files exist, and the adapter's header is a HairDiff header.

        Args:
            model: SD3/SD3.5 diffusers folder, single ``.safetensors`` (bf16/fp16, fp8, ComfyUI
                fp8_scaled) or ``.gguf`` transformer (then ``vae`` is needed); None with ``tiny``.
            vae: a VAE folder or file when ``model`` has none.
            adapter: a HairDiff adapter ``.safetensors`` (its LoRA stays in ``dtype``), or None
                for the widened base model.
            tiny: the built-in tiny random model instead of files (a wiring check).
            toy: the shipped toy model (``hairdiff_core.models.toy``: trained on synthetic portraits);
                pass its adapter (``toy.adapter_path()``) to draw from sketches.
            device: "cpu", "cuda", "cuda:N", "mps" or a ``torch.device``: where sampling runs.
            dtype: the compute dtype of the transformer: a torch float dtype or "fp32", "bf16", "fp16".
            text_encoders: a ``TextEncoderSource`` for ``generate(prompt=...)``; None: the tiny
                model gets the tiny encoders, a diffusers ``model`` folder its own.
            weights: storage of the transformer's Linear weights (``memory.WEIGHTS``): ``auto``
                keeps an fp8 file's fp8 and otherwise ``dtype``; ``fp8_e4m3fn`` halves bf16's memory.
            offload: ``none``, ``model`` (transformer on ``device`` only while sampling) or
                ``blocks`` (one transformer block at a time); ``auto`` picks from free CUDA memory.
        """
        from .models.loading import load_models
        from .models.memory import check_offload, check_weights

        dtype = parse_dtype(dtype)
        check_device(device)
        check_weights(weights)
        check_offload(offload)
        check_model_files(model=model, vae=vae, adapter=adapter, tiny=tiny, toy=toy)
        # The SD3 VAE runs in float32 (force_upcast); loading it so avoids a bf16 round trip.
        loaded = load_models(
            model, vae=vae, tiny=tiny, toy=toy, dtype=dtype, device="cpu", vae_dtype=torch.float32, weights=weights
        )
        transformer = loaded.transformer
        if adapter is not None:
            from .models.adapter import load_adapter

            load_adapter(transformer, adapter)
        if offload == "auto":
            offload = _auto_offload(loaded.family, transformer, device)
        pipe = cls(transformer, loaded.vae, device=device, dtype=dtype, offload=offload)
        pipe.family = loaded.family
        label = builtin_model_label(loaded.family)
        if label:
            # A warning, not info: the Python API's default logging shows it too.
            logger.warning("%s", label)
        from pathlib import Path

        from .models.text_encoders import TextEncoderSource

        if text_encoders is None and tiny:
            text_encoders = TextEncoderSource(tiny=True)
        elif text_encoders is None and model is not None and (Path(model) / "text_encoder").is_dir():
            text_encoders = TextEncoderSource(folder=str(model))
        pipe.text_encoders = text_encoders
        return pipe

    def encode_prompt(self, prompt, negative_prompt=None, max_sequence_length: int = 77) -> dict[str, torch.Tensor]:
        """Prompt text -> ``generate``'s embedding keyword arguments, through ``self.text_encoders``.

        Each prompt is encoded once per pipeline (``self.prompt_cache``); the encoders are loaded
        only for prompts not seen yet and freed before this returns, so sampling never holds them.

        Args:
            prompt: a string, or a list (one per photo of the batch).
            negative_prompt: the same for classifier-free guidance, or None.
            max_sequence_length: T5 tokens (SD3: 77 by default, up to 512).
        """
        from .models.text_encoders import load_text_encoders

        source = self.text_encoders
        if source is None or not source.given:
            raise InputError(
                "a prompt needs SD3's text encoders, and this pipeline has none: give text_encoders=TextEncoderSource("
                "folder=... or clip_l=..., clip_g=..., t5=...) (CLI: --text-encoders or --clip-l/--clip-g/--t5), or "
                "precomputed prompt_embeds (CLI: hairdiff encode-prompt, then --prompt-embeds)"
            )
        cache = self.prompt_cache
        if cache.model_key != source.key or cache.max_sequence_length != int(max_sequence_length):
            self.prompt_cache = cache = PromptCache(model_key=source.key, max_sequence_length=max_sequence_length)
        as_list = {"prompt": prompt, "negative_prompt": negative_prompt}
        texts = {k: ([v] if isinstance(v, str) else list(v)) for k, v in as_list.items() if v is not None}
        cfg = self.transformer.config

        def load():
            return load_text_encoders(
                source,
                device=self.device,
                dtype=self.dtype,
                joint_dim=cfg.joint_attention_dim,
                max_sequence_length=max_sequence_length,
            )

        pairs = cache.encode([t for v in texts.values() for t in v], load)
        out = {}
        for k, v in texts.items():
            embeds = torch.cat([pairs[t][0] for t in v])
            pooled = torch.cat([pairs[t][1] for t in v])
            check_text(self.transformer, embeds, pooled, k.replace("_", " "))
            prefix = "negative_" if k == "negative_prompt" else ""
            out[f"{prefix}prompt_embeds"], out[f"{prefix}pooled_prompt_embeds"] = embeds, pooled
        return out

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
        if self.codec is not None:
            return self.codec.encode(image01)
        if self.vae is None:
            raise InputError("this pipeline has no VAE; pass one (vae=...) or a codec (codec=...)")
        scale, shift = self._scale_shift
        x = image01.to(self.device, self.vae_dtype) * 2 - 1
        latent = self.vae.encode(x).latent_dist.mode()
        return ((latent - shift) * scale).float()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if self.codec is not None:
            return self.codec.decode(latent)
        if self.vae is None:
            raise InputError("this pipeline has no VAE; pass one (vae=...) or a codec (codec=...)")
        scale, shift = self._scale_shift
        image = self.vae.decode((latent.to(self.device, self.vae_dtype) / scale) + shift).sample
        return ((image.float() + 1) / 2).clamp(0, 1)

    # -- the main call ----------------------------------------------------------------------
    @staticmethod
    def prepare_inputs(
        image, sketch, matte, matte_threshold: float = DEFAULTS.matte_threshold, *, announce: bool = True
    ):
        """Validate and align the inputs: (photo RGB, sketch at photo size, binary matte).

        Cheap, and raises the same errors ``generate`` would: call it before loading a model.

        Args:
            image: the photo, (B, 1|3|4, H, W) float in [0, 1].
            sketch: (B|1, 1|3|4, h, w) float in [0, 1], the photo's aspect ratio.
            matte: (B|1, 1|3|4, h, w) float in [0, 1], the photo's aspect ratio.
            matte_threshold: matte values above it are hair, in [0, 1).
            announce: log resizes and an empty sketch (``generate`` calls it again with False
                after a caller's early check, so each message is logged once).
        """
        matte_threshold = check_number(matte_threshold, GENERATE_BOUNDS["matte_threshold"], "matte_threshold")
        photo = _as_rgb(image, "photo")
        _check_range(photo, "photo")
        lo, hi = torch.aminmax(photo)
        if lo < 0 or hi > 1:  # within the tolerance _check_range allows: no copy of an exact photo
            photo = photo.clamp(0, 1)
        B, _, H, W = photo.shape
        for t, what in ((sketch, "sketch"), (matte, "matte")):
            if not isinstance(t, torch.Tensor) or t.ndim != 4:
                raise InputError(f"{what} must be a (B, C, H, W) tensor in [0, 1]", input=what)
            _check_range(t, what)
        sketch = _broadcast_batch(_match_size(sketch.float(), (H, W), "sketch", "bilinear", announce), B, "sketch")
        matte = _broadcast_batch(_match_size(matte.float(), (H, W), "matte", "nearest", announce), B, "matte")
        binary = M.binarize_matte(matte, matte_threshold)
        if announce:
            # Only the strokes inside the matte matter: look at its bounding box, with the
            # background colour read from the whole sketch's border (as normalize_sketch does).
            box = context_box(binary, 0.0, 0)
            bg = M.sketch_background(sketch)
            _, strokes = M.normalize_sketch(sketch[..., box.slices[0], box.slices[1]], background=bg)
            inside = binary[..., box.slices[0], box.slices[1]]
            empty = [i for i in range(B) if not bool((strokes[i] * inside[i]).any())]
            if empty:
                logger.warning(
                    "the sketch has no strokes inside the matte (batch item(s) %s): the result follows the "
                    "photo and the matte only, not a sketch",
                    empty,
                )
        return photo, sketch, binary

    @staticmethod
    def prepare_style(style_image, style_matte, matte_threshold: float = DEFAULTS.matte_threshold, batch: int = 1):
        """Validate a style reference: (style photo RGB, its binary matte at the photo's size), or
        None when neither is given. Cheap (call it before loading a model, as ``generate`` does).

        The style photo may have any size and aspect; its matte must have the style photo's aspect
        (resized to it) and select some hair. Each refusal is an ``InputError`` whose ``input`` is
        ``style_image`` or ``style_matte``: one without the other, an empty matte, another aspect.
        """
        from .errors import EmptyMaskError, HairDiffError
        from .imageops import check_same_aspect

        if style_image is None and style_matte is None:
            return None
        if style_matte is None:
            raise InputError(
                "a style photo was given without its hair matte: give style_matte (white = the style hair) "
                "with style_image",
                input="style_matte",
            )
        if style_image is None:
            raise InputError(
                "a style matte was given without its style photo: give style_image with style_matte",
                input="style_image",
            )
        for t, what, name in ((style_image, "style photo", "style_image"), (style_matte, "style matte", "style_matte")):
            if not isinstance(t, torch.Tensor) or t.ndim != 4:
                raise InputError(f"{name} must be a (B, C, H, W) tensor in [0, 1]", input=name)
            try:
                _check_range(t, what)
            except HairDiffError as exc:
                exc.input = name
                raise
        try:
            photo = _as_rgb(style_image, "style photo")
        except HairDiffError as exc:
            exc.input = "style_image"
            raise
        H, W = photo.shape[-2:]
        h, w = style_matte.shape[-2:]
        check_same_aspect((w, h), (W, H), "style matte", "style photo", input="style_matte")
        matte = resize_same_aspect(style_matte.float(), (H, W), "style matte", "style photo", "nearest")
        try:
            binary = M.binarize_matte(matte, matte_threshold)
        except EmptyMaskError as exc:
            raise EmptyMaskError(
                f"the style matte is empty (no pixel above threshold {matte_threshold}): paint the style photo's "
                f"hair white on black",
                input="style_matte",
            ) from exc
        except HairDiffError as exc:
            exc.input = "style_matte"
            raise
        for t, name in ((photo, "style_image"), (binary, "style_matte")):
            if t.shape[0] not in (1, batch):
                raise InputError(
                    f"the {name.replace('_', ' ')} batch has {t.shape[0]} items but the photo batch has {batch}; "
                    f"give 1 or {batch}",
                    input=name,
                )
        photo = photo.clamp(0, 1)
        n = max(photo.shape[0], binary.shape[0])
        return photo.expand(n, *photo.shape[1:]), binary.expand(n, *binary.shape[1:])

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        sketch: torch.Tensor,
        matte: torch.Tensor,
        *,
        steps: int = DEFAULTS.steps,
        seed: int = DEFAULTS.seed,
        strength: float = DEFAULTS.strength,
        cfg: float = DEFAULTS.cfg,
        shift: float = DEFAULTS.shift,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        prompt=None,
        negative_prompt=None,
        method: str = "joint",
        reference=None,
        feather_sigma: float | None = None,
        matte_threshold: float = DEFAULTS.matte_threshold,
        paste_back: bool = True,
        work_size: int | None = None,
        context_margin: float = DEFAULTS.context_margin,
        on_step: OnStep | None = None,
        announce: bool = True,
        settings: GenerateSettings | None = None,
        prepared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        style_image: torch.Tensor | None = None,
        style_matte: torch.Tensor | None = None,
        style_weight: float = DEFAULTS.style_weight,
    ) -> GenerateResult:
        r"""Redraw the hair of ``image`` inside ``matte``, following ``sketch``.

        Args:
            image: the photo, (B, C, H, W) float in [0, 1] with C = 1, 3 or 4 (alpha ignored).
            sketch: the sketch, (B or 1, C, h, w) in [0, 1]; any size with the photo's aspect
                ratio (resized), strokes on a light, dark or transparent background.
            matte: where the new hair goes, (B or 1, C, h, w), white = hair (binarised at
                ``matte_threshold``), the photo's aspect ratio.
            steps: Euler steps of the flow-match schedule.
            seed: seed of the starting noise (0 .. 2**64 - 1); same seed, same result.
            strength: denoise strength in [0, 1]; 1 redraws the hair from pure noise.
            cfg: classifier-free guidance scale; 1 = off (one model call per step).
            shift: flow-match schedule shift.
            prompt_embeds, pooled_prompt_embeds: SD3 text conditioning, (B or 1, T, D) and
                (B or 1, P); None = zero text (the training default).
            negative_prompt_embeds, negative_pooled_prompt_embeds: the unconditional branch
                for ``cfg`` > 1; None = zero text.
            prompt, negative_prompt: text instead of embeddings, encoded once through
                ``self.text_encoders`` (see ``encode_prompt``).
            method: ``"joint"`` (HairDiff's soft-mask sampler) or ``"replace"`` (the
                latent-replacement inpainting baseline, which never sees the sketch).
            reference: reference attention: None / ``"off"``, ``"once"``, ``"per_step"``, a dict
                or a ``ReferenceSettings``.
            feather_sigma: soft-mask feather in px at a 1024-px working size (scaled with the
                working size); None = ``DEFAULTS.feather_at_1024``.
            matte_threshold: a matte pixel is hair above this value.
            paste_back: composite into the full photo with the feathered matte (pixels away
                from it stay the photo's, bit for bit); False returns the generated box.
            work_size: side of the working area in px; None = the model's (1024 for SD3.5).
            context_margin: context box around the matte, as a fraction of its size.
            on_step: ``on_step(step, total, latent)`` after every step (progress, previews,
                cancel by raising); attention patches are restored even then.
            announce: log when the sketch or matte is resized (callers that checked the inputs
                already pass False).
            settings: a ``GenerateSettings`` (validated when made) used in place of the sampling
                keywords above (steps ... context_margin, style_weight); the CLI and evaluation pass one.
            prepared: what ``prepare_inputs(image, sketch, matte, matte_threshold)`` returned for
                these inputs (a caller that checked them before loading the model), so the
                photo-sized tensors are not made twice.
            style_image: a style photo whose hair gives the new hair its colour and texture,
                (B or 1, C, H', W') in [0, 1], any size and aspect; needs ``style_matte``.
            style_matte: the style photo's hair matte, (B or 1, C, h', w'), the style photo's
                aspect ratio. The style photo is cropped around it and worked at the model's
                size; its tokens inside the (slightly shrunk) matte become extra keys for the
                image queries inside the edit matte (weighted by their soft mask), never for
                the face, background or text. A style reference needs reference attention:
                ``reference=None`` then means ``"once"`` (an explicit ``"off"`` is refused).
            style_weight: weight of the style keys, 0 to 100 (0 = the style photo is ignored,
                exactly as if none was given; 1 = as strong as the image's own keys).

        Returns:
            ``GenerateResult``: ``image`` (B, 3, H, W) in [0, 1], the final ``latent`` of the
            working box, the full-size soft ``mask``, the context ``box``, ``work_size`` and
            ``info`` (steps run, model calls, reference passes).

        Raises:
            ``InputError`` / ``SettingsError`` for bad inputs or settings (checked before any
            model call); ``NonFiniteError`` when the model produces NaN/inf.
        """
        # 1. Check inputs and settings (one validated GenerateSettings, made here when not given).
        if settings is None:
            settings = GenerateSettings(
                steps=steps,
                seed=seed,
                strength=strength,
                cfg=cfg,
                shift=shift,
                method=method,
                reference=reference,
                feather_sigma=feather_sigma,
                matte_threshold=matte_threshold,
                paste_back=paste_back,
                work_size=work_size,
                context_margin=context_margin,
                style_weight=style_weight,
            )
        elif not isinstance(settings, GenerateSettings):
            raise InputError(f"settings must be a GenerateSettings, got {type(settings).__name__}", input="settings")
        s = settings
        steps, seed, strength, cfg, shift, method = s.steps, s.seed, s.strength, s.cfg, s.shift, s.method
        feather_sigma, work_size, context_margin = s.feather_sigma, s.work_size, s.context_margin
        matte_threshold, paste_back, reference = s.matte_threshold, s.paste_back, s.reference
        style_weight = s.style_weight
        if prepared is None:
            prepared = self.prepare_inputs(image, sketch, matte, matte_threshold, announce=announce)
        photo, sketch, binary = prepared
        B, _, H, W = photo.shape
        style = self.prepare_style(style_image, style_matte, matte_threshold, batch=B)
        if style is not None and style_weight > 0:
            if method == "replace":
                raise InputError(
                    "a style photo is part of the joint method (reference attention); use the joint method",
                    input="style_image",
                )
            if reference is None:
                reference = "once"  # the style reference rides on reference attention
            elif _reference_mode(reference) == "off":
                # Refused here, before any model call (``_attention`` would refuse it too).
                raise InputError(
                    "a style photo needs reference attention: use reference='once' or 'per_step' (or leave it None)",
                    input="reference",
                )
        else:
            style = None  # style weight 0: exactly as if no style photo was given

        # 2. Encode the prompt (text in: embeddings out, once per prompt).
        if prompt is not None or negative_prompt is not None:
            if prompt_embeds is not None or negative_prompt_embeds is not None:
                raise InputError("give a prompt or prompt embeddings, not both")
            text = self.encode_prompt("" if prompt is None else prompt, negative_prompt)
            prompt_embeds, pooled_prompt_embeds = text["prompt_embeds"], text["pooled_prompt_embeds"]
            negative_prompt_embeds = text.get("negative_prompt_embeds")
            negative_pooled_prompt_embeds = text.get("negative_pooled_prompt_embeds")
            if negative_prompt is not None and cfg == 1.0:
                logger.warning("the negative prompt has no effect at cfg 1; raise cfg (e.g. 4) to use it")

        # 3. Plan the crop: the context box around the matte, worked at the model's size.
        work = prepare_work(
            photo,
            sketch,
            binary,
            int(work_size or self.default_work_size),
            feather_sigma,
            context_margin,
            max_work_side(self.transformer),
        )
        plan, sigma_at_work = work.plan, work.sigma_at_work
        photo_w, binary_w, soft_w = work.photo, work.binary, work.soft

        # 4. Prepare latents: the photo, the sketch, the latent-grid soft mask and the noise.
        x0 = self.encode(photo_w).to(self.device)
        if method == "replace":
            sketch_latent = torch.zeros_like(x0)  # the baseline never sees the sketch
        else:
            sketch_latent = self.encode(work.sketch).to(self.device)
        mask_lat = work.latent_mask.to(self.device)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(self.device)

        # 4b. The style photo: cropped around its own matte, worked at the model's size, encoded;
        # its noise (matched mode) comes from the seed (the generation's noise when the sizes agree).
        style_inputs = None
        if style is not None:
            style_photo, style_binary = style
            plan_s = plan_crop(
                style_binary,
                int(work_size or self.default_work_size),
                sigma_at_work,
                context_margin,
                max_work_side(self.transformer),
            )
            style_binary_w = plan_s.to_work(style_binary, "nearest")
            style_binary_w[..., plan_s.height :, :] = 0  # the replicate padding is not hair
            style_binary_w[..., :, plan_s.width :] = 0
            style_latent = self.encode(plan_s.to_work(style_photo, "bilinear")).to(self.device)
            style_gen = torch.Generator(device="cpu").manual_seed(int(seed))
            style_noise = torch.randn(style_latent.shape, generator=style_gen, dtype=torch.float32).to(self.device)
            style_inputs = (style_latent, M.token_grid(style_binary_w), style_noise, style_weight)

        # 5. Prepare the timesteps.
        sigmas = sampling_sigmas(steps, shift=shift, strength=strength)

        # 6. Prepare the text conditioning (zeros when none is given).
        prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds = self._text(
            B, cfg, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds
        )

        # 7. Denoising loop (reference attention patched in, and restored, around it).
        sampler = SAMPLERS[method]
        box, work = plan.box, (plan.height, plan.width)
        info = {"steps_run": len(sigmas) - 1, "work_size": work, "box": box, "method": method}
        with (
            self._placed(),
            self._attention(
                reference,
                method,
                photo_w,
                binary_w,
                soft_w,
                x0,
                noise,
                prompt_embeds,
                pooled_prompt_embeds,
                style=style_inputs,
            ) as hook,
        ):
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
                info["style_passes"] = getattr(hook, "style_passes", 0)

        if info["steps_run"] == 0:
            # Nothing was generated (strength 0): the source itself, without a VAE round trip.
            return GenerateResult(
                image=photo.clone(), latent=latent, mask=torch.zeros(B, 1, H, W), box=box, work_size=work, info=info
            )

        # 8. Decode and composite into the full photo.
        decoded = self.decode(latent)[..., : plan.height, : plan.width]
        image, full_mask = composite(photo, binary, decoded, plan, sigma_at_work, paste_back)
        return GenerateResult(image=image, latent=latent, mask=full_mask, box=box, work_size=work, info=info)

    def _text(
        self, batch, cfg, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds
    ):
        """The four text tensors on the device, batch-expanded and checked; zeros where none is
        given (the unconditional branch of cfg > 1 is zero text, the training default)."""
        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds = zero_text(self.transformer, batch, self.device, torch.float32)
        else:
            if pooled_prompt_embeds is None:
                raise InputError("prompt_embeds were given without pooled_prompt_embeds; SD3 needs both")
            check_text(self.transformer, prompt_embeds, pooled_prompt_embeds)
            prompt_embeds = _broadcast_batch(prompt_embeds, batch, "prompt embeddings").to(self.device)
            pooled_prompt_embeds = _broadcast_batch(pooled_prompt_embeds, batch, "pooled prompt embeddings").to(
                self.device
            )
        if cfg != 1.0 and negative_prompt_embeds is None:
            negative_prompt_embeds, negative_pooled_prompt_embeds = zero_text(
                self.transformer, batch, self.device, torch.float32, tokens=prompt_embeds.shape[1]
            )
        if negative_prompt_embeds is not None:
            if negative_pooled_prompt_embeds is None:
                raise InputError("negative_prompt_embeds were given without negative_pooled_prompt_embeds")
            check_text(self.transformer, negative_prompt_embeds, negative_pooled_prompt_embeds, "negative prompt")
            negative_prompt_embeds = _broadcast_batch(negative_prompt_embeds, batch, "negative prompt").to(self.device)
            negative_pooled_prompt_embeds = _broadcast_batch(
                negative_pooled_prompt_embeds, batch, "negative pooled"
            ).to(self.device)
            if negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]:
                raise InputError(
                    f"prompt and negative prompt have {prompt_embeds.shape[1]} and "
                    f"{negative_prompt_embeds.shape[1]} tokens; encode both with the same max length"
                )
        return prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds

    def _placed(self):
        """offload="model": the transformer is on the device while sampling, on the CPU otherwise
        (the VAE then has the memory for decoding)."""
        import contextlib

        if self.offload != "model":
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def placed():
            self.transformer.to(self.device)
            try:
                yield
            finally:
                self.transformer.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

        return placed()

    def _attention(self, reference, method, photo_w, binary_w, soft_w, x0, noise, embeds, pooled, style=None):
        """Context manager that installs reference attention for one call, or does nothing.

        ``style``: (latent, token mask, noise, weight) of the style reference, or None."""
        import contextlib

        from .method.reference import ReferenceSettings, fill_hair_region, reference_attention

        # None, "off"|"once"|"per_step", a dict of fields or ReferenceSettings (validated here).
        reference = ReferenceSettings.coerce(reference)
        if reference.mode == "off" and style is not None:
            raise InputError(
                "a style photo needs reference attention: use reference='once' or 'per_step' (or leave it None)",
                input="reference",
            )
        if reference.mode == "off":
            return contextlib.nullcontext(None)
        if method == "replace":
            raise InputError(
                "reference attention is part of the joint method; use the joint method or turn the reference off",
                input="reference",
            )

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
            **(
                {}
                if style is None
                else dict(style_latent=style[0], style_token_mask=style[1], style_noise=style[2], style_weight=style[3])
            ),
        )
