"""``hairdiff generate``: redraw the hair of one photo from a sketch and a matte."""
from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

DTYPES = ("fp32", "bf16", "fp16")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="SD3.5 diffusers folder (pipeline or transformer/) or single-file .safetensors")
    g.add_argument("--vae", help="VAE folder or .safetensors, if not inside --model")
    g.add_argument("--adapter", help="HairDiff adapter .safetensors (LoRA + sketch channels)")
    g.add_argument("--tiny", action="store_true", help="use the built-in tiny random model (a wiring check, not art)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    g.add_argument("--dtype", choices=DTYPES, default="fp32", help="transformer precision (default fp32; bf16 on GPUs)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=28, help="sampling steps (default 28)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--strength", type=float, default=1.0, help="denoise strength in [0, 1] (default 1)")
    g.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--shift", type=float, default=3.0, help="flow-match schedule shift (SD3: 3.0)")
    g.add_argument("--prompt-embeds", help="safetensors with prompt_embeds/pooled_prompt_embeds (+ negative_*)")
    g.add_argument("--method", choices=("joint", "replace"), default="joint",
                   help="joint = HairDiff soft-mask sampler; replace = latent-replacement inpainting baseline")
    g.add_argument("--work-size", type=int, help="side of the working area in px (default: the model's, 1024 for SD3.5)")
    g.add_argument("--margin", type=float, default=0.25, help="context margin around the matte, fraction of its size")
    g.add_argument("--feather", type=float, help="feather sigma in px at 1024 px working size (default 10)")
    g.add_argument("--matte-threshold", type=float, default=0.5)
    g.add_argument("--no-paste-back", action="store_true", help="keep the raw generated context box instead of compositing")
    r = p.add_argument_group("reference attention (lighting from the photo)")
    r.add_argument("--reference", choices=("off", "once", "per_step"), default="off")
    add_reference_field_arguments(r)


#: ``--ref-*`` flag -> ``ReferenceSettings`` field (shared by generate and eval).
REFERENCE_FLAGS = {
    "ref_weight_inside": ("weight_inside", float, "reference weight for queries inside the matte"),
    "ref_weight_outside": ("weight_outside", float, "reference weight for queries outside the matte"),
    "ref_key_weight_inside": ("key_weight_inside", float, "weight of reference keys inside the matte (0 = excluded)"),
    "ref_input": ("reference_input", str, "feed the reference pass the 'photo' or a hair-'filled' copy"),
    "ref_suppress_self": ("suppress_self_outside", float, "0-1: down-weight the generation's own keys outside the matte"),
    "ref_once_sigma": ("once_sigma", float, "noise level of the single reference pass of --reference once"),
    "ref_key_pool": ("key_pool", int, "key budget: average reference keys over NxN token cells (1 = off, 2 = 4x fewer)"),
    "ref_key_ring": ("key_ring", int, "key budget: only reference keys within R tokens of the matte (0 = all)"),
    "ref_kernel": ("attention_kernel", str, "auto (grouped on CUDA), grouped (no float mask) or bias"),
}
#: ``--ref-*`` flags with a fixed set of values.
REFERENCE_FLAG_CHOICES = {"ref_input": ("photo", "filled"), "ref_key_pool": (1, 2, 4),
                          "ref_kernel": ("auto", "grouped", "bias")}


def add_reference_field_arguments(group) -> None:
    for dest, (_, kind, help_text) in REFERENCE_FLAGS.items():
        extra = {"choices": REFERENCE_FLAG_CHOICES[dest]} if dest in REFERENCE_FLAG_CHOICES else {}
        group.add_argument("--" + dest.replace("_", "-"), type=kind, help=help_text, **extra)


def reference_fields(args) -> dict:
    """The ``ReferenceSettings`` fields the user set with ``--ref-*`` flags."""
    return {field: getattr(args, dest) for dest, (field, _, _) in REFERENCE_FLAGS.items() if getattr(args, dest) is not None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="the photo")
    p.add_argument("--sketch", required=True, help="strokes of the new hair (RGB, RGBA or L; white or black background)")
    p.add_argument("--matte", required=True, help="hair matte (white = hair)")
    p.add_argument("--out", required=True, help="output PNG")
    add_model_arguments(p)
    add_sampling_arguments(p)


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def reference_settings(args):
    if args.reference == "off":
        return None
    from hairdiff_core.reference import ReferenceSettings

    return ReferenceSettings(mode=args.reference, **reference_fields(args))


def build_pipeline(args):
    from hairdiff_core.errors import InputError
    from hairdiff_core.pipeline import HairDiffPipeline

    if not args.tiny and not args.model:
        raise InputError("no model given: pass --model PATH (SD3.5 folder or .safetensors) or --tiny for the wiring check")
    return HairDiffPipeline.from_files(
        model=args.model, vae=args.vae, adapter=args.adapter, tiny=args.tiny,
        device=args.device, dtype=torch_dtype(args.dtype),
    )


def sampling_kwargs(args) -> dict:
    kw = dict(
        steps=args.steps, seed=args.seed, strength=args.strength, cfg=args.cfg, shift=args.shift,
        method=args.method, reference=reference_settings(args), feather_sigma=args.feather,
        matte_threshold=args.matte_threshold, paste_back=not args.no_paste_back,
        work_size=args.work_size, context_margin=args.margin,
    )
    if args.prompt_embeds:
        from hairdiff_core.text import load_prompt_embeds

        kw.update(load_prompt_embeds(args.prompt_embeds))
    return kw


def tqdm_callback(total_hint: int, desc: str):
    from tqdm.auto import tqdm

    bar = tqdm(total=total_hint, desc=desc, unit="step")

    def on_step(step: int, total: int, latent) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(step - bar.n)

    return bar, on_step


def run(args) -> int:
    from hairdiff_core.imageio import load_image, save_image

    photo = load_image(args.image)
    sketch = load_image(args.sketch)
    matte = load_image(args.matte)
    from hairdiff_core.pipeline import HairDiffPipeline

    # Bad inputs fail here, before a multi-GB model is loaded.
    HairDiffPipeline.prepare_inputs(photo, sketch, matte, args.matte_threshold)
    pipe = build_pipeline(args)
    bar, on_step = tqdm_callback(args.steps, "hairdiff")
    try:
        result = pipe.generate(photo, sketch, matte, on_step=on_step, **sampling_kwargs(args))
    finally:
        bar.close()
    save_image(result.image, args.out)
    logger.info("wrote %s", args.out)
    return 0
