"""HairDiff on ComfyUI's own SD3 model: an adapter patch, sketch conditioning, a SAMPLER, a stitch.

An artist's graph: Load Diffusion Model (or Load Checkpoint, a GGUF loader, HairDiff's built-in
toy) -> HairDiff Apply Adapter -> [LoRA Loader, ModelSamplingSD3, ...] -> SamplerCustomAdvanced
with HairDiff Soft-Mask Sampler; CLIP Text Encode -> HairDiff Sketch Conditioning (photo, sketch,
matte, VAE) -> positive / negative / latent; VAE Decode -> HairDiff Stitch -> Save Image. Each
node converts its inputs, makes one core call and converts the result: the method's maths
(prepare_work, patch_embedding, soft_mask_sample, composite, sampling_sigmas) is the core's.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io

from ..hairdiff_core.defaults import DEFAULTS
from ..hairdiff_core.errors import HairDiffError
from .convert import (
    check_batch,
    check_combos,
    check_widgets,
    image_to_nchw,
    input_of,
    mask_to_nchw,
    nchw_to_image,
    node_error,
)
from .native_sampling import (
    ADAPTER_NODE,
    CONDITIONING_NODE,
    FILLED_KEY,
    PATCH_EMBED,
    WRAPPER_KEY,
    model_input_channels,
)

logger = logging.getLogger(__name__)

MODEL_CAT, COND_CAT, SAMPLING_CAT, IMAGE_CAT = (
    "HairDiff/model",
    "HairDiff/conditioning",
    "HairDiff/sampling",
    "HairDiff/image",
)
BUILTIN_TOY = "toy (synthetic portraits)"
BUILTIN_TINY = "tiny (wiring check)"
BUILTIN_TOY_ADAPTER = "toy adapter (built-in)"
BUILTIN_TINY_ADAPTER = "tiny adapter (built-in: zero sketch channels)"
StitchType = io.Custom("HAIRDIFF_STITCH")

#: How far past its native side every SD3/SD3.5 family's position table reaches (the smallest).
MAX_SIDE_FACTOR = 3
#: The models' native working sides (px): SD3.5's 1024, the toy's 128, the tiny model's 256.
WORK_SIZE_TIP = "Side of the area the model works at, in px: 1024 for SD3.5, 128 for the toy, 256 for the tiny model."


# --------------------------------------------------------------------------------------------
# Built-in models


def _builtin(name: str):
    """(transformer, autoencoder) of a built-in model, built from the core."""
    if name == BUILTIN_TOY:
        from ..hairdiff_core.models import toy

        return toy.load_toy_transformer(), toy.load_toy_vae()
    from ..hairdiff_core.models import tiny

    return tiny.build_tiny_transformer(), tiny.build_tiny_vae()


def empty_conditioning(transformer) -> list:
    """Zero text of the model's widths: the training default, for models without text encoders."""
    from ..hairdiff_core.models.text import zero_text

    embeds, pooled = zero_text(transformer, 1)
    return [[embeds, {"pooled_output": pooled}]]


class HairDiffLoadBuiltin(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_LoadBuiltin",
            display_name="HairDiff Built-in Model",
            category=MODEL_CAT,
            description=(
                "ComfyUI's own SD3 MODEL and VAE for HairDiff's built-in models, with no downloads: the toy "
                "(trained on synthetic portraits: draws striped synthetic hair, use it with 'toy adapter "
                "(built-in)') or the tiny random model (a wiring check: draws noise). 'no prompt' is the zero "
                "text these models were trained with. For real photos load SD3.5 with Load Diffusion Model."
            ),
            inputs=[
                io.Combo.Input(
                    "model",
                    options=[BUILTIN_TOY, BUILTIN_TINY],
                    default=BUILTIN_TOY,
                    tooltip="toy: draws synthetic striped hair from a sketch; tiny: random weights, a wiring check.",
                )
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL", tooltip="ComfyUI's SD3 model holding the built-in weights (16 channels)."
                ),
                io.Vae.Output(display_name="VAE", tooltip="The built-in model's own autoencoder."),
                io.Conditioning.Output(display_name="no prompt", tooltip="Zero text of this model's widths."),
            ],
        )

    @classmethod
    def validate_inputs(cls, model=None) -> bool | str:
        return check_combos(cls, {"model": model})

    @classmethod
    def execute(cls, model=BUILTIN_TOY) -> io.NodeOutput:
        from .builtin_models import comfy_model, comfy_vae

        transformer, autoencoder = _builtin(model)
        scale, shift = float(autoencoder.config.scaling_factor), float(autoencoder.config.shift_factor or 0.0)
        patcher = comfy_model(transformer, scale, shift, DEFAULTS.shift)
        return io.NodeOutput(patcher, comfy_vae(autoencoder), empty_conditioning(transformer))


# --------------------------------------------------------------------------------------------
# Apply Adapter


def adapter_choices() -> list[str]:
    from .model_folders import safetensors_in

    return [BUILTIN_TOY_ADAPTER, BUILTIN_TINY_ADAPTER] + safetensors_in("hairdiff") + safetensors_in("loras")


def _adapter_path(choice: str) -> str:
    if choice == BUILTIN_TOY_ADAPTER:
        from ..hairdiff_core.models import toy

        return str(toy.adapter_path())
    if choice == BUILTIN_TINY_ADAPTER:
        return str(_tiny_adapter())
    from .model_folders import resolve

    return resolve(choice, ADAPTER_NODE, "adapter")


def _tiny_adapter():
    """The tiny model's adapter: zero sketch channels, no LoRA (the tiny model is random: a wiring
    check, which samples exactly like the plain tiny model). Written once into ComfyUI's temp folder."""
    import folder_paths

    from ..hairdiff_core.method.surgery import widen_input_channels
    from ..hairdiff_core.models import tiny
    from ..hairdiff_core.models.adapter import save_adapter

    path = Path(folder_paths.get_temp_directory()) / "hairdiff_tiny_adapter.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_adapter(widen_input_channels(tiny.build_tiny_transformer()), path)
    return path


def model_signature(model) -> tuple[str, dict]:
    """(family, dims) of a ComfyUI SD3 model, read off its weights' shapes by the core."""
    from ..hairdiff_core.models.adapter import signature_of_config
    from ..hairdiff_core.models.loading import identify_transformer

    shapes = {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}
    family, config = identify_transformer(shapes, source="the connected MODEL")
    return family, signature_of_config(config)


def _widened_conv(proj, weight: torch.Tensor, bias: torch.Tensor | None):
    """A patch embedding of ``proj``'s own class (ComfyUI's cast/offload ops) with ``weight``."""
    conv = type(proj)(
        weight.shape[1],
        weight.shape[0],
        kernel_size=proj.kernel_size,
        stride=proj.stride,
        padding=proj.padding,
        bias=bias is not None,
        device="meta",
        dtype=weight.dtype,
    )
    conv.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        conv.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    return conv


def _lora_patches(model, lora: dict[str, torch.Tensor], name: str) -> dict:
    """The adapter's LoRA (diffusers' SD3 keys) as ComfyUI weight patches, through ComfyUI's own
    key map and loader (what LoRA Loader does); every LoRA module must find its weight."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k})
    unknown = [m for m in modules if m not in key_map]
    if unknown:
        raise node_error(
            ADAPTER_NODE,
            "adapter",
            f"{name}: {len(unknown)} LoRA layer(s) have no weight in this model (e.g. {unknown[0]!r})",
            "use an adapter trained for this model",
        )
    return comfy.lora.load_lora(lora, key_map, log_missing=False)


class HairDiffApplyAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_ApplyAdapter",
            display_name=ADAPTER_NODE,
            category=MODEL_CAT,
            description=(
                "Makes an SD3/SD3.5 MODEL (Load Checkpoint, Load Diffusion Model with any weight dtype, a GGUF "
                "loader, HairDiff Built-in Model) a HairDiff model: a copy whose patch embedding takes 32 channels "
                "(16 image + 16 sketch) and carries the adapter's LoRA as ComfyUI weight patches. The incoming "
                "model is not changed; LoRA Loader, ModelSamplingSD3 and the rest compose before or after it. "
                "Sample it with HairDiff Sketch Conditioning and HairDiff Soft-Mask Sampler."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD3 / SD3.5 model of the family the adapter was trained on."),
                io.Combo.Input(
                    "adapter",
                    options=adapter_choices(),
                    tooltip="A HairDiff adapter (.safetensors from HairDiff training) in models/hairdiff or "
                    "models/loras, or the toy's built-in one.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=2.0,
                    step=0.05,
                    tooltip="0 = the base model exactly (sketch ignored), 1 = the adapter as trained.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="A HairDiff copy of the model (32-channel input, LoRA).")
            ],
        )

    @classmethod
    def validate_inputs(cls, adapter=None) -> bool | str:
        return check_combos(cls, {"adapter": adapter})

    @classmethod
    def execute(cls, model, adapter, strength=1.0) -> io.NodeOutput:
        import comfy.model_base
        import comfy.patcher_extension

        from ..hairdiff_core.models.adapter import patch_embedding, read_adapter
        from .native_sampling import adapter_wrapper

        # 1. Convert in: an SD3 model without an adapter, and the adapter file checked against it.
        check_widgets(cls, {"strength": strength})
        inner = getattr(model, "model", None)
        if not isinstance(inner, comfy.model_base.SD3):
            kind = type(inner).__name__ if inner is not None else type(model).__name__
            raise node_error(
                ADAPTER_NODE,
                "model",
                f"HairDiff adapters are for SD3/SD3.5 models, and this is a {kind} model",
                "load SD3.5 with Load Checkpoint or Load Diffusion Model (or use HairDiff Built-in Model)",
            )
        if model_input_channels(model) != 16:
            raise node_error(
                ADAPTER_NODE,
                "model",
                "this model already has a HairDiff adapter (its patch embedding takes "
                f"{model_input_channels(model)} channels)",
                "connect the model from its loader, before any HairDiff Apply Adapter",
            )
        path = _adapter_path(adapter)
        proj = model.get_model_object(PATCH_EMBED)
        try:
            _family, signature = model_signature(model)
            found = read_adapter(
                path, signature, tuple(proj.weight.shape), proj.bias is not None, "the connected MODEL"
            )
            weight, bias = patch_embedding(proj.weight, proj.bias, found, float(strength))
        except HairDiffError as exc:
            raise node_error(ADAPTER_NODE, input_of(exc, default="adapter"), exc) from exc
        if found.in_channels <= 16:
            raise node_error(
                ADAPTER_NODE, "adapter", f"{found.path.name} has no sketch channels", "pick a HairDiff adapter"
            )

        # 2. One patch set on a clone: the patch embedding (object patch), the LoRA (weight patches).
        patched = model.clone()
        patched.add_object_patch(PATCH_EMBED, _widened_conv(proj, weight, bias))
        if found.lora:
            patched.add_patches(_lora_patches(model, found.lora, found.path.name), float(strength))
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, adapter_wrapper)
        return io.NodeOutput(patched)


# --------------------------------------------------------------------------------------------
# Sketch Conditioning and Stitch


@dataclasses.dataclass(frozen=True)
class Stitch:
    """What HairDiff Stitch needs to paste the generated box back: the full photo and matte
    (B, C, H, W on the CPU), the crop plan and the feather."""

    photo: torch.Tensor
    binary: torch.Tensor
    plan: Any  # hairdiff_core.pipeline.CropPlan
    sigma_at_work: float


def _encode(vae, image_nchw: torch.Tensor) -> torch.Tensor:
    return vae.encode(image_nchw.movedim(1, -1)[..., :3])


class HairDiffSketchConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_SketchConditioning",
            display_name=CONDITIONING_NODE,
            category=COND_CAT,
            description=(
                "Prepares a HairDiff edit for ComfyUI's samplers: the context box around the matte at the model's "
                "size, the sketch (normalised, VAE-encoded) added to positive and negative as the adapter's "
                "sketch channels, the photo as the start latent with the feathered matte as its noise mask, "
                "and a stitch for HairDiff Stitch. Positive and negative may be any CLIP Text Encode."
            ),
            inputs=[
                io.Conditioning.Input(
                    "positive", tooltip="The prompt (CLIP Text Encode, or the built-in model's 'no prompt')."
                ),
                io.Conditioning.Input(
                    "negative", tooltip="The negative prompt (used when cfg > 1); the same as positive is fine."
                ),
                io.Vae.Input("vae", tooltip="The SD3 VAE (or the built-in model's)."),
                io.Image.Input("photo", tooltip="The portrait to edit, any size."),
                io.Image.Input("sketch", tooltip="The strokes, the photo's aspect ratio (any background)."),
                io.Mask.Input("matte", tooltip="Where the new hair goes (white), the photo's aspect ratio."),
                io.Int.Input("work_size", default=1024, min=64, max=4096, step=16, tooltip=WORK_SIZE_TIP),
                io.Float.Input(
                    "feather",
                    default=DEFAULTS.feather_at_1024,
                    min=0.0,
                    max=100.0,
                    step=0.5,
                    tooltip="Soft-mask feather sigma in px at 1024 px (scaled with the working size).",
                ),
            ],
            outputs=[
                io.Conditioning.Output(
                    display_name="positive", tooltip="The prompt with the sketch latent (noise_concat)."
                ),
                io.Conditioning.Output(display_name="negative", tooltip="The negative prompt with the sketch latent."),
                io.Latent.Output(display_name="latent", tooltip="The photo's box, with the soft matte as noise_mask."),
                StitchType.Output(display_name="stitch", tooltip="For HairDiff Stitch, after VAE Decode."),
            ],
        )

    @classmethod
    def execute(
        cls, positive, negative, vae, photo, sketch, matte, work_size=1024, feather=DEFAULTS.feather_at_1024
    ) -> io.NodeOutput:
        import node_helpers

        from ..hairdiff_core.method.reference import fill_hair_region
        from ..hairdiff_core.pipeline import HairDiffPipeline, prepare_work

        node = CONDITIONING_NODE
        # 1. Convert in, checked by the core before any encode.
        check_widgets(cls, {"work_size": work_size, "feather": feather})
        photo_t = image_to_nchw(photo, node, "photo")
        sketch_t = image_to_nchw(sketch, node, "sketch")
        matte_t = mask_to_nchw(matte, node, "matte")
        B = photo_t.shape[0]
        check_batch(sketch_t.shape[0], B, node, "sketch", "photo")
        check_batch(matte_t.shape[0], B, node, "matte", "photo")
        if vae is None or not hasattr(vae, "encode"):
            raise node_error(node, "vae", "no VAE connected", "connect the SD3 VAE (Load VAE or the checkpoint's)")
        try:
            photo_c, sketch_c, binary = HairDiffPipeline.prepare_inputs(photo_t, sketch_t, matte_t)
            # Without the model here, the box's longest side is held to 3x the working side: every
            # SD3/SD3.5 position table reaches that far (Large and SD3 Medium 3x their 1024 px,
            # Medium 6x, the toy 4x, the tiny model 6x), so a thin matte is widened, never cut.
            work = prepare_work(
                photo_c, sketch_c, binary, int(work_size), float(feather), max_side=MAX_SIDE_FACTOR * int(work_size)
            )
        except HairDiffError as exc:
            raise node_error(node, input_of(exc), exc) from exc

        # 2. Encode with ComfyUI's VAE: raw latents, as LATENTs are (the adapter scales the sketch).
        photo_latent = _encode(vae, work.photo)
        sketch_latent = _encode(vae, work.sketch)
        if sketch_latent.shape[1] != 16:
            raise node_error(node, "vae", f"the VAE gives {sketch_latent.shape[1]} latent channels", "use the SD3 VAE")

        # The filled photo (hair region filled from its surroundings) for HairDiff Reference
        # Attention's reference_input "filled": encoded here because a VAE encode inside sampling
        # could make ComfyUI unload the model being sampled. One extra encode of the box.
        filled_latent = _encode(vae, fill_hair_region(work.photo, work.binary))

        # 3. Convert out.
        pos = node_helpers.conditioning_set_values(positive, {"noise_concat": sketch_latent, FILLED_KEY: filled_latent})
        neg = node_helpers.conditioning_set_values(negative, {"noise_concat": sketch_latent})
        latent = {"samples": photo_latent, "noise_mask": work.latent_mask.to(photo_latent.device)}
        stitch = Stitch(photo_c.cpu(), binary.cpu(), work.plan, work.sigma_at_work)
        return io.NodeOutput(pos, neg, latent, stitch)


class HairDiffStitch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_Stitch",
            display_name="HairDiff Stitch",
            category=IMAGE_CAT,
            description=(
                "Pastes the decoded box back into the full photo with the feathered matte: pixels away from the "
                "matte are the photo's, bit for bit."
            ),
            inputs=[
                StitchType.Input("stitch", tooltip="From HairDiff Sketch Conditioning."),
                io.Image.Input("image", tooltip="VAE Decode of the sampled latent."),
                io.Boolean.Input("paste_back", default=True, tooltip="Off: return the generated box as is."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The full photo with the new hair.")],
        )

    @classmethod
    def execute(cls, stitch, image, paste_back=True) -> io.NodeOutput:
        import comfy.model_management as mm

        from ..hairdiff_core.pipeline import composite

        node = "HairDiff Stitch"
        if not isinstance(stitch, Stitch):
            raise node_error(node, "stitch", "expected a HAIRDIFF_STITCH", f"connect {CONDITIONING_NODE}'s stitch")
        decoded = image_to_nchw(image, node, "image")
        plan = stitch.plan
        want = (plan.height + plan.pad_h, plan.width + plan.pad_w)
        if tuple(decoded.shape[-2:]) != want or decoded.shape[0] != stitch.photo.shape[0]:
            raise node_error(
                node,
                "image",
                f"the image is {decoded.shape[0]}x{decoded.shape[-1]}x{decoded.shape[-2]} (batch x w x h) but "
                f"the stitch's box is {stitch.photo.shape[0]}x{want[1]}x{want[0]}",
                "decode the latent sampled from this stitch's HairDiff Sketch Conditioning",
            )
        decoded = decoded[..., : plan.height, : plan.width].cpu()
        result, _ = composite(stitch.photo, stitch.binary, decoded, plan, stitch.sigma_at_work, bool(paste_back))
        return io.NodeOutput(nchw_to_image(result, mm.intermediate_device()))


# --------------------------------------------------------------------------------------------
# Sampling


class HairDiffSoftMaskSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_SoftMaskSampler",
            display_name="HairDiff Soft-Mask Sampler",
            category=SAMPLING_CAT,
            description=(
                "HairDiff's sampler for SamplerCustomAdvanced: every latent pixel has its own noise level "
                "(sigma x soft matte), so pixels outside the matte never change and the feathered edge moves part "
                "way. Works with any sigmas (BasicScheduler, ModelSamplingSD3's shift, denoise as strength)."
            ),
            inputs=[],
            outputs=[
                io.Sampler.Output(display_name="SAMPLER", tooltip="For SamplerCustomAdvanced (or SamplerCustom).")
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        import comfy.samplers

        from .native_sampling import sample_soft_mask

        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_soft_mask))


def denoise_strength_input():
    """The denoise strength widget of HairDiff Scheduler and HairDiff Sample (one definition)."""
    return io.Float.Input(
        "strength",
        default=DEFAULTS.strength,
        min=0.0,
        max=1.0,
        step=0.01,
        tooltip="1 redraws the hair from noise; lower keeps more of the old hair.",
    )


def model_sigmas(model, steps: int, strength: float) -> torch.Tensor:
    """The core's flow-match ladder (the CLI's and training's) at the model's shift."""
    from ..hairdiff_core.method.flow import sampling_sigmas

    shift = float(getattr(model.get_model_object("model_sampling"), "shift", DEFAULTS.shift))
    return sampling_sigmas(int(steps), shift=shift, strength=float(strength)).float()


class HairDiffScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_Scheduler",
            display_name="HairDiff Scheduler",
            category=SAMPLING_CAT,
            description=(
                "SD3's flow-match sigmas exactly as the HairDiff command line and training compute them (diffusers' "
                "FlowMatchEulerDiscreteScheduler), at the model's shift (ModelSamplingSD3 sets it). BasicScheduler "
                "works too; its 'simple' ladder differs slightly."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model whose shift (ModelSamplingSD3) sets the ladder."),
                io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=1000, tooltip="Euler steps of the ladder."),
                denoise_strength_input(),
            ],
            outputs=[io.Sigmas.Output(display_name="SIGMAS", tooltip="Descending sigmas ending at 0.")],
        )

    @classmethod
    def execute(cls, model, steps=DEFAULTS.steps, strength=DEFAULTS.strength) -> io.NodeOutput:
        check_widgets(cls, {"steps": steps, "strength": strength})
        return io.NodeOutput(model_sigmas(model, steps, strength))


class HairDiffSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_Sample",
            display_name="HairDiff Sample",
            category=SAMPLING_CAT,
            description=(
                "One node for HairDiff's soft-mask sampling, for graphs without custom sampling: the same as "
                "RandomNoise + CFGGuider + HairDiff Scheduler + HairDiff Soft-Mask Sampler + SamplerCustomAdvanced."
            ),
            inputs=[
                io.Model.Input("model", tooltip="From HairDiff Apply Adapter."),
                io.Conditioning.Input("positive", tooltip="From HairDiff Sketch Conditioning."),
                io.Conditioning.Input("negative", tooltip="From HairDiff Sketch Conditioning."),
                io.Latent.Input("latent", tooltip="From HairDiff Sketch Conditioning."),
                io.Int.Input(
                    "seed",
                    default=DEFAULTS.seed,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seed of the starting noise (ComfyUI's RandomNoise draws the same).",
                ),
                io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=1000, tooltip="Euler steps of the ladder."),
                io.Float.Input(
                    "cfg",
                    default=DEFAULTS.cfg,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="1 = off (one model call per step).",
                ),
                denoise_strength_input(),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The sampled latent: VAE Decode, then HairDiff Stitch.")
            ],
        )

    @classmethod
    def execute(
        cls, model, positive, negative, latent, seed=DEFAULTS.seed, steps=DEFAULTS.steps, cfg=DEFAULTS.cfg, strength=1.0
    ) -> io.NodeOutput:
        import comfy.sample
        import comfy.samplers
        import latent_preview

        from .native_sampling import sample_soft_mask

        check_widgets(cls, {"seed": seed, "steps": steps, "cfg": cfg, "strength": strength})
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        sigmas = model_sigmas(model, steps, strength)
        noise = comfy.sample.prepare_noise(samples, int(seed), latent.get("batch_index"))
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        out = comfy.sample.sample_custom(
            model,
            noise,
            float(cfg),
            comfy.samplers.KSAMPLER(sample_soft_mask),
            sigmas,
            positive,
            negative,
            samples,
            noise_mask=latent.get("noise_mask"),
            callback=callback,
            seed=int(seed),
        )
        result = dict(latent)
        result["samples"] = out
        return io.NodeOutput(result)


NATIVE_NODES: list[type[io.ComfyNode]] = [
    HairDiffLoadBuiltin,
    HairDiffApplyAdapter,
    HairDiffSketchConditioning,
    HairDiffStitch,
    HairDiffSoftMaskSampler,
    HairDiffScheduler,
    HairDiffSample,
]
