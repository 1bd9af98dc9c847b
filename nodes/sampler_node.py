"""HairDiff Sampler: the node that runs ``HairDiffPipeline.generate`` inside ComfyUI.

Glue only: layouts in and out (``convert``), ComfyUI's VAE and SD3 latent format at the
boundary, ComfyUI's progress bar (which is also where Cancel raises), and ComfyUI's memory
management around the transformer. Reference attention and every temporary patch are undone
by the core in ``try/finally``, so Cancel or an error leaves the model as it was.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..hairdiff_core.defaults import DEFAULTS
from ..hairdiff_core.errors import HairDiffError
from .comfy_bridge import memory_estimate, memory_required, sampling_session  # noqa: F401  (re-exported for tests)
from .convert import (
    check_batch,
    conditioning_to_embeds,
    image_to_nchw,
    input_of,
    latent_to_comfy,
    mask_to_nchw,
    nchw_to_image,
    node_error,
)
from .model_nodes import HairDiffModel, HairDiffModelType, check_model

logger = logging.getLogger(__name__)

NODE = "HairDiff Sampler"


#: Core argument names -> this node's input names, for errors that name their input.
CORE_TO_NODE_INPUT = {
    "feather_sigma": "feather",
    "prompt_embeds": "positive",
    "pooled_prompt_embeds": "positive",
    "negative_prompt_embeds": "negative",
    "negative_pooled_prompt_embeds": "negative",
    "reference": "model",
}


class HairDiffSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_Sampler",
            display_name="HairDiff Sampler",
            category="HairDiff/sampling",
            description=(
                "Redraws the hair of a photo from a sketch inside a matte with the soft-mask sampler: pixels away "
                "from the matte stay the photo's, bit for bit. Uses ComfyUI's VAE and, optionally, conditioning "
                "from ComfyUI's SD3 text encoders (no prompt = zero text, as in training). The tiny model brings "
                "its own VAE, so 'vae' may stay unconnected with it."
            ),
            inputs=[
                HairDiffModelType.Input(
                    "model",
                    tooltip="The HairDiff model (Load HairDiff Model, optionally through LoRA / Reference Attention).",
                ),
                io.Image.Input(
                    "photo",
                    tooltip="The portrait to edit (any size; a context box around the matte is worked at the model's resolution).",
                ),
                io.Image.Input(
                    "sketch",
                    tooltip="The sketch, same aspect ratio as the photo; best through HairDiff Sketch Preprocess.",
                ),
                io.Mask.Input(
                    "matte", tooltip="Where the new hair goes (white = hair), same aspect ratio as the photo."
                ),
                io.Int.Input(
                    "seed",
                    default=DEFAULTS.seed,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Random seed of the starting noise; the same seed and settings give the same image.",
                ),
                io.Int.Input(
                    "steps",
                    default=DEFAULTS.steps,
                    min=1,
                    max=200,
                    tooltip="Denoising steps: more is slower and usually cleaner (28 for SD3.5 Large, 4-8 for Turbo).",
                ),
                io.Float.Input(
                    "cfg",
                    default=DEFAULTS.cfg,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance: 1 = off (one model call per step); higher follows "
                    "the prompt more closely and doubles the cost.",
                ),
                io.Float.Input(
                    "shift",
                    default=DEFAULTS.shift,
                    min=0.0,
                    max=100.0,
                    step=0.01,
                    tooltip="Flow-matching schedule shift: higher spends more steps at high noise (SD3 uses 3).",
                ),
                io.Float.Input(
                    "strength",
                    default=DEFAULTS.strength,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="How much the hair region is re-noised: 1 = redrawn from scratch, lower keeps "
                    "more of the old hair's layout and colour.",
                ),
                io.Boolean.Input(
                    "paste_back",
                    default=True,
                    tooltip="Composite the result into the full photo with the feathered matte (off = "
                    "return the generated context box as is).",
                ),
                io.Float.Input(
                    "feather",
                    default=DEFAULTS.feather_at_1024,
                    min=0.0,
                    max=100.0,
                    step=0.5,
                    tooltip="Soft-mask feather sigma in pixels at 1024 px (scaled with the working size); "
                    "higher blends the edge over a wider band.",
                ),
                io.Vae.Input(
                    "vae",
                    optional=True,
                    tooltip="ComfyUI's SD3 VAE (e.g. from Load Checkpoint or Load VAE). Optional: without it "
                    "the model's own VAE is used (the tiny model always has one).",
                ),
                io.Conditioning.Input(
                    "positive",
                    optional=True,
                    tooltip="Optional prompt from ComfyUI's SD3 text encoders, e.g. a hair colour; "
                    "unconnected = zero text, the training default.",
                ),
                io.Conditioning.Input(
                    "negative",
                    optional=True,
                    tooltip="Optional negative prompt (used when cfg > 1); unconnected = zero text.",
                ),
            ],
            outputs=[
                io.Image.Output("result", display_name="image", tooltip="The photo with the new hair (B, H, W, 3)."),
                io.Latent.Output(
                    "result_latent",
                    display_name="latent",
                    tooltip="The final latent of the generated context box at the working size "
                    "(ComfyUI's raw SD3 VAE latent: VAE Decode reads it).",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        photo,
        sketch,
        matte,
        seed=DEFAULTS.seed,
        steps=DEFAULTS.steps,
        cfg=DEFAULTS.cfg,
        shift=DEFAULTS.shift,
        strength=DEFAULTS.strength,
        paste_back=True,
        feather=DEFAULTS.feather_at_1024,
        vae=None,
        positive=None,
        negative=None,
    ) -> io.NodeOutput:
        import comfy.model_management as mm

        from ..hairdiff_core.pipeline import HairDiffPipeline

        # 1. Convert in (ComfyUI layouts -> the core's), checked before anything loads.
        check_model(model, NODE)
        photo_t = image_to_nchw(photo, NODE, "photo")
        sketch_t = image_to_nchw(sketch, NODE, "sketch")
        matte_t = mask_to_nchw(matte, NODE, "matte")
        B = photo_t.shape[0]
        check_batch(sketch_t.shape[0], B, NODE, "sketch", "photo")
        check_batch(matte_t.shape[0], B, NODE, "matte", "photo")
        text = _text_kwargs(model, positive, negative, B)
        try:
            HairDiffPipeline.prepare_inputs(photo_t, sketch_t, matte_t)
        except HairDiffError as exc:
            raise node_error(NODE, input_of(exc, CORE_TO_NODE_INPUT), exc) from exc
        if vae is None and model.vae is None:
            raise node_error(
                NODE,
                "vae",
                f"the {model.family} model has no VAE of its own",
                "connect ComfyUI's SD3 VAE (Load VAE, or the VAE output of Load Checkpoint)",
            )

        # 2. One core call, inside ComfyUI's memory management, progress bar and Cancel.
        # The session's own errors (a compiler that fails, raised as the blocks leave it) count too.
        try:
            with sampling_session(model, photo_t, float(cfg), int(steps), vae=vae) as session:
                result = session.pipe.generate(
                    photo_t,
                    sketch_t,
                    matte_t,
                    steps=int(steps),
                    seed=int(seed),
                    strength=float(strength),
                    cfg=float(cfg),
                    shift=float(shift),
                    reference=model.reference,
                    feather_sigma=float(feather),
                    paste_back=bool(paste_back),
                    on_step=session.on_step,
                    announce=False,
                    **text,
                )
        except HairDiffError as exc:
            raise node_error(NODE, input_of(exc, CORE_TO_NODE_INPUT), exc) from exc

        # 3. Convert out.
        out_device = mm.intermediate_device()
        image = nchw_to_image(result.image, out_device)
        latent = {"samples": latent_to_comfy(result.latent, session.latent_format).to(out_device)}
        return io.NodeOutput(image, latent)


def _text_kwargs(model: HairDiffModel, positive, negative, batch: int) -> dict:
    """ComfyUI CONDITIONING -> ``generate``'s prompt embedding arguments, checked against the
    model's text dimensions."""
    text = {}
    for name, cond in (("positive", positive), ("negative", negative)):
        if cond is None:
            continue
        embeds, pooled = conditioning_to_embeds(cond, NODE, name)
        check_batch(embeds.shape[0], batch, NODE, name, "photo")
        cfg_t = model.transformer.config
        if embeds.shape[-1] != cfg_t.joint_attention_dim or pooled.shape[-1] != cfg_t.pooled_projection_dim:
            raise node_error(
                NODE,
                name,
                f"conditioning is ({embeds.shape[-1]}, pooled {pooled.shape[-1]}) wide but "
                f"this {model.family} model takes ({cfg_t.joint_attention_dim}, pooled "
                f"{cfg_t.pooled_projection_dim})",
                "use SD3 text encoders with an SD3.5 model; the tiny model takes no prompt",
            )
        prefix = "" if name == "positive" else "negative_"
        text[f"{prefix}prompt_embeds"] = embeds
        text[f"{prefix}pooled_prompt_embeds"] = pooled
    if "negative_prompt_embeds" in text and "prompt_embeds" not in text:
        raise node_error(
            NODE,
            "positive",
            "a negative prompt is connected without a positive one",
            "connect a positive prompt too (an empty CLIP Text Encode is fine)",
        )
    return text
