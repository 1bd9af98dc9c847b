"""``hairdiff generate``: redraw the hair of one photo from a sketch and a matte."""

from __future__ import annotations

import argparse
import logging

from hairdiff_core.defaults import DEFAULTS

from .options import (
    add_reference_field_arguments,
    add_text_arguments,
    prompt_kwargs,
    text_source,
)

logger = logging.getLogger(__name__)

DTYPES = ("fp32", "bf16", "fp16")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="SD3.5 diffusers folder (pipeline or transformer/) or single-file .safetensors")
    g.add_argument("--vae", help="VAE folder or .safetensors, if not inside --model")
    g.add_argument("--adapter", help="HairDiff adapter .safetensors (LoRA + sketch channels)")
    g.add_argument("--tiny", action="store_true", help="use the built-in tiny random model (a wiring check, not art)")
    g.add_argument(
        "--toy",
        action="store_true",
        help="use the shipped toy model (trained on synthetic portraits, 128 px) with its shipped adapter "
        "(--adapter overrides it)",
    )
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    g.add_argument("--dtype", choices=DTYPES, default="fp32", help="transformer precision (default fp32; bf16 on GPUs)")
    g.add_argument(
        "--weights",
        choices=("auto", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2"),
        default="auto",
        help="storage of the transformer's weights, computed in --dtype (fp8 halves bf16's memory); "
        "auto = an fp8 file's own fp8, else --dtype",
    )
    g.add_argument(
        "--offload",
        choices=("auto", "none", "model", "blocks"),
        default="none",
        help="blocks = one transformer block on the GPU at a time (12 GB cards); model = transformer on "
        "the GPU only while sampling; auto = blocks when the model does not fit the free VRAM",
    )
    from hairdiff_core.models.compiling import COMPILE_BACKENDS  # torch-free at import

    g.add_argument(
        "--compile",
        choices=("off", *COMPILE_BACKENDS),
        default="off",
        help="torch.compile the transformer's blocks: inductor = faster steps after a first call that "
        "compiles (worth it for many steps or images); eager = trace only, a check (default off)",
    )


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"sampling steps (default {DEFAULTS.steps})")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed)
    g.add_argument("--strength", type=float, default=DEFAULTS.strength, help="denoise strength in [0, 1] (default 1)")
    g.add_argument("--cfg", type=float, default=DEFAULTS.cfg, help="classifier-free guidance scale (1 = off)")
    g.add_argument(
        "--shift", type=float, default=DEFAULTS.shift, help=f"flow-match schedule shift (default {DEFAULTS.shift})"
    )
    g.add_argument("--prompt-embeds", help="safetensors with prompt_embeds/pooled_prompt_embeds (+ negative_*)")
    add_text_arguments(p, g)
    g.add_argument(
        "--method",
        choices=("joint", "replace"),
        default="joint",
        help="joint = HairDiff soft-mask sampler; replace = latent-replacement inpainting baseline",
    )
    g.add_argument(
        "--work-size", type=int, help="side of the working area in px (default: the model's, 1024 for SD3.5)"
    )
    g.add_argument(
        "--margin",
        type=float,
        default=DEFAULTS.context_margin,
        help="context margin around the matte, fraction of its size",
    )
    g.add_argument(
        "--feather",
        type=float,
        help=f"feather sigma in px at 1024 px working size (default {DEFAULTS.feather_at_1024:g})",
    )
    g.add_argument("--matte-threshold", type=float, default=DEFAULTS.matte_threshold)
    g.add_argument(
        "--no-paste-back", action="store_true", help="keep the raw generated context box instead of compositing"
    )
    r = p.add_argument_group("reference attention (lighting from the photo)")
    r.add_argument("--reference", choices=("off", "once", "per_step"), default="off")
    r.add_argument(
        "--ref-noise",
        choices=REFERENCE_NOISES,
        default="auto",
        help="what the reference pass sees: clean = the photo as is (published; auto for per_step), "
        "matched = the photo noised to each step's sigma (auto for once)",
    )
    add_reference_field_arguments(r)


REFERENCE_NOISES = ("auto", "clean", "matched")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="the photo")
    p.add_argument(
        "--sketch", required=True, help="strokes of the new hair (RGB, RGBA or L; white or black background)"
    )
    p.add_argument("--matte", action="append", help="hair matte (white = hair); repeat to add several (their union)")
    p.add_argument(
        "--matte-add-sketch",
        action="store_true",
        help="add the sketch's region (strokes + what they enclose) to the matte: for shorter or longer hair",
    )
    p.add_argument(
        "--exclude",
        action="append",
        help="what must stay the photo's, e.g. the face: a mask (white = protected) or a picture with that part "
        "transparent, as ComfyUI's Protect reads it (hairdiff_face_protect.png); repeatable",
    )
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument(
        "--max-megapixels",
        type=float,
        default=DEFAULTS.max_megapixels,
        help=f"refuse a photo, sketch or matte of more megapixels, from its header before decoding "
        f"(default {DEFAULTS.max_megapixels:g}; about 4 GB of RAM per 100 MP)",
    )
    add_model_arguments(p)
    add_sampling_arguments(p)
    s = p.add_argument_group("style reference (colour and texture from another photo's hair)")
    s.add_argument(
        "--style-image",
        metavar="FILE",
        help="a photo whose hair gives the new hair its colour and texture (any size; needs --style-matte; "
        "turns --reference once on when it is off)",
    )
    s.add_argument(
        "--style-matte", metavar="FILE", help="the style photo's hair matte (white = hair, its aspect ratio)"
    )
    s.add_argument(
        "--style-weight",
        type=float,
        help=f"how strongly the new hair sees the style hair, 0-100 (default {DEFAULTS.style_weight:g}; 0 = ignored)",
    )


def load_style(args):
    """``generate``'s style inputs from ``--style-image``/``--style-matte`` (checked: pair, aspect, non-empty)."""
    if args.style_image is None:
        return {}
    from hairdiff_core.data.imageio import load_image
    from hairdiff_core.errors import HairDiffError
    from hairdiff_core.pipeline import HairDiffPipeline

    style = load_image(args.style_image, max_megapixels=args.max_megapixels)
    style_matte = load_image(args.style_matte, max_megapixels=args.max_megapixels)
    try:
        HairDiffPipeline.prepare_style(style, style_matte, args.matte_threshold)
    except HairDiffError as exc:
        if exc.input not in ("style_image", "style_matte"):
            raise
        # The core names the tensor (style_matte); on the command line it is the flag and the file.
        flag = "--" + exc.input.replace("_", "-")
        raise type(exc)(f"{flag} {getattr(args, exc.input)}: {exc}", input=exc.input) from exc
    return dict(style_image=style, style_matte=style_matte)  # the weight is in the run's GenerateSettings


def torch_dtype(name: str):
    from hairdiff_core.checks import parse_dtype

    return parse_dtype(name)


def build_pipeline(args):
    from hairdiff_core.pipeline import HairDiffPipeline

    # The model flags were checked by preflight._model (one of --model, --toy, --tiny).
    toy = bool(getattr(args, "toy", False))
    adapter = args.adapter
    if toy and adapter is None:
        from hairdiff_core.models.toy import adapter_path

        adapter = adapter_path()
    pipe = HairDiffPipeline.from_files(
        model=args.model,
        vae=args.vae,
        adapter=adapter,
        tiny=args.tiny,
        toy=toy,
        device=args.device,
        dtype=torch_dtype(args.dtype),
        text_encoders=text_source(args),
        weights=getattr(args, "weights", "auto"),
        offload=getattr(args, "offload", "none"),
    )
    return pipe


def compiled(args, pipe):
    """``--compile``: the context that runs ``pipe``'s blocks compiled (a failing compiler is a
    one-line ``CompileError``, not dynamo's traceback)."""
    from hairdiff_core.models.compiling import CompileSettings, compiled_blocks

    backend = getattr(args, "compile", "off")
    return compiled_blocks(pipe.transformer, None if backend == "off" else CompileSettings(backend=backend))


def text_kwargs(args) -> dict:
    """``generate``'s prompt arguments: prompt text, or embeddings from a file."""
    kw = dict(prompt_kwargs(args))
    if args.prompt_embeds:
        from hairdiff_core.models.text import load_prompt_embeds

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


def compose_matte_from_args(args, photo, sketch):
    """The matte of ``--matte`` (repeatable), ``--matte-add-sketch`` and ``--exclude`` (binary, photo size)."""
    from hairdiff_core.data.imageio import load_image
    from hairdiff_core.errors import InputError
    from hairdiff_core.method.mask import compose_matte, protect_mask

    mp = getattr(args, "max_megapixels", DEFAULTS.max_megapixels)
    mattes = [load_image(p, max_megapixels=mp) for p in args.matte or ()]
    if not mattes and not args.matte_add_sketch:
        raise InputError(
            "no matte: pass --matte FILE (white = hair), or --matte-add-sketch to use the region the sketch outlines"
        )
    excludes = [
        protect_mask(load_image(p, max_megapixels=mp)) for p in args.exclude or ()
    ]  # transparent or white = protected
    composed = compose_matte(
        mattes or None,
        sketch if args.matte_add_sketch else None,
        excludes or None,
        threshold=args.matte_threshold,
        size=tuple(photo.shape[-2:]),
    )
    for line in composed.warnings:
        logger.warning("%s", line)
    return composed.binary


def run(args) -> int:
    from hairdiff_core.data.imageio import load_image, save_image

    from .preflight import check_generate_args

    settings = check_generate_args(args)
    photo = load_image(args.image, max_megapixels=args.max_megapixels)
    sketch = load_image(args.sketch, max_megapixels=args.max_megapixels)
    matte = compose_matte_from_args(args, photo, sketch)
    from hairdiff_core.pipeline import HairDiffPipeline

    # Bad inputs fail here, before a multi-GB model is loaded; generate reuses what this prepared.
    prepared = HairDiffPipeline.prepare_inputs(photo, sketch, matte, settings.matte_threshold)
    text = text_kwargs(args)
    style = load_style(args)
    pipe = build_pipeline(args)
    bar, on_step = tqdm_callback(args.steps, "hairdiff")
    try:
        with compiled(args, pipe):
            result = pipe.generate(
                photo,
                sketch,
                matte,
                on_step=on_step,
                announce=False,
                settings=settings,
                prepared=prepared,
                **text,
                **style,
            )
    finally:
        bar.close()
    save_image(result.image, args.out)
    logger.info("wrote %s", args.out)
    return 0
