"""Checks of a command's arguments that run before anything heavy (images, models) is read.

One function per command; each calls the core's own checks (``hairdiff_core.checks``, the
pipeline's file checks), which the Python API runs too, so a bad value gets the same message
whichever way it comes in. A long run never starts with an argument already known to be wrong,
and nothing is created (no output folder, no temporary file) when a check fails.
"""

from __future__ import annotations

from pathlib import Path

from hairdiff_core.checks import Bound, check_device, check_generate_settings, check_number, parse_dtype
from hairdiff_core.errors import InputError, SettingsError
from hairdiff_core.fileio import check_input_path, check_writable_folder

from .options import REFERENCE_FLAGS, check_prompt_source, generate_settings, reference_fields

#: PIL decodes at most 2^31 pixels per image; the RAM is the real bound.
MAX_MEGAPIXELS = Bound("--max-megapixels", lo=0.0, lo_open=True, hi=2000.0, hint="largest image read, in MP")


def _sampling(args) -> None:
    check_generate_settings(
        steps=args.steps,
        seed=args.seed,
        strength=args.strength,
        cfg=args.cfg,
        shift=args.shift,
        feather_sigma=args.feather,
        work_size=args.work_size,
        **({"context_margin": args.margin} if hasattr(args, "margin") else {}),
        **({"matte_threshold": args.matte_threshold} if hasattr(args, "matte_threshold") else {}),
    )


def _model(args) -> None:
    from hairdiff_core.pipeline import check_model_files

    parse_dtype(args.dtype)
    check_device(args.device)
    toy = bool(getattr(args, "toy", False))
    chosen = [flag for flag, on in (("--model PATH", bool(args.model)), ("--tiny", args.tiny), ("--toy", toy)) if on]
    if len(chosen) > 1:
        raise InputError(
            f"pass one of --model PATH, --toy or --tiny (built-in models), not {' and '.join(chosen)}", input="model"
        )
    if not chosen:
        raise InputError(
            "no model given: pass --model PATH (SD3.5 folder or .safetensors), --toy for the toy model "
            "or --tiny for the wiring check",
            input="model",
        )
    check_model_files(model=args.model, vae=args.vae, adapter=args.adapter, tiny=bool(args.tiny), toy=toy)


def _reference_flags(args, modes: list[str], methods: list[str]) -> None:
    fields = reference_fields(args)
    if not fields:
        return
    flags = ", ".join(
        "--" + dest.replace("_", "-")
        for dest in vars(args)
        if dest.startswith("ref_") and getattr(args, dest) is not None
    )
    if all(m == "off" for m in modes):
        raise SettingsError(
            f"{flags} given but --reference is off, so it would have no effect; add "
            f"--reference once (or per_step), or drop {flags}",
            input="reference",
        )
    from hairdiff_core.errors import HairDiffError
    from hairdiff_core.method.reference import ReferenceSettings

    try:
        ReferenceSettings(mode="once", **fields)
    except HairDiffError as exc:
        # The core names the field (weight_inside); on the command line it is --ref-weight-inside.
        flag = next(("--" + d.replace("_", "-") for d, (f, _, _) in REFERENCE_FLAGS.items() if f == exc.input), None)
        if flag is None:
            raise
        raise SettingsError(f"{flag}: {exc}", input=exc.input) from exc


def _input_files(paths: dict[str, str | list[str] | None]) -> None:
    """Every given input file exists and is a file; repeatable flags (--matte, --exclude) give lists."""
    for flag, values in paths.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is None:
                continue
            check_input_path(value, f"--{flag}", input=flag)


def check_generate_args(args):
    """``hairdiff generate``: settings, input files, output path and model files, in that order.
    Returns the run's ``GenerateSettings`` (validated here, once)."""
    from hairdiff_core.data.imageio import check_output_image

    _sampling(args)
    if args.method == "replace" and args.reference != "off":
        raise SettingsError(
            "--reference is part of the joint method; drop --method replace or use --reference off", input="reference"
        )
    _reference_flags(args, [args.reference], [args.method])
    check_number(args.max_megapixels, MAX_MEGAPIXELS, "max_megapixels")
    styles = _style_flags(args)
    mattes, excludes = list(args.matte or []), list(getattr(args, "exclude", None) or [])
    _input_files(
        {
            "image": args.image,
            "sketch": args.sketch,
            "matte": mattes,
            "exclude": excludes,
            "prompt-embeds": getattr(args, "prompt_embeds", None),
            "style-image": styles[:1],
            "style-matte": styles[1:],
        }
    )
    _image_sizes(args.image, {"sketch": [args.sketch], "matte": mattes, "exclude": excludes}, args.max_megapixels)
    if styles:
        _style_sizes(*styles, args.max_megapixels)
    check_output_image(args.out, inputs=(args.image, args.sketch, *mattes, *excludes, *styles), what="output")
    _prompt(args)
    _model(args)
    return generate_settings(args)


def _style_flags(args) -> list[str]:
    """``--style-image``/``--style-matte``/``--style-weight``: the weight's range, the pair given
    together, the joint method; returns [style image, style matte] or []."""
    image, matte = getattr(args, "style_image", None), getattr(args, "style_matte", None)
    weight = getattr(args, "style_weight", None)
    if weight is not None:
        check_generate_settings(style_weight=weight)
    if image is None and matte is None:
        if weight is not None:
            raise SettingsError(
                "--style-weight given but no --style-image, so it would have no effect; add --style-image FILE "
                "--style-matte FILE, or drop --style-weight",
                input="style_weight",
            )
        return []
    if matte is None:
        raise InputError(
            f"--style-image {image} given without --style-matte: give the style photo's hair matte (white = hair) too",
            input="style_matte",
        )
    if image is None:
        raise InputError(
            f"--style-matte {matte} given without --style-image: give the style photo too", input="style_image"
        )
    if args.method == "replace":
        raise SettingsError(
            "--style-image is part of the joint method (reference attention); drop --method replace",
            input="style_image",
        )
    return [image, matte]


def _style_sizes(image: str, matte: str, max_megapixels: float) -> None:
    """The style matte has the style photo's aspect ratio (any size), read from the headers."""
    from hairdiff_core.data.imageio import image_size
    from hairdiff_core.imageops import check_same_aspect

    ref = image_size(image, "--style-image", max_megapixels)
    size = image_size(matte, "--style-matte", max_megapixels)
    check_same_aspect(
        size,
        ref,
        f"style matte {matte} (--style-matte)",
        f"style image {image}",
        input="style_matte",
        noun="style matte",
    )


def _image_sizes(photo: str, others: dict[str, list[str]], max_megapixels: float) -> None:
    """Every sketch, matte and exclusion has the photo's aspect ratio, from the headers: the
    message names the file and its flag (the core, given tensors, could only say "the mask")."""
    from hairdiff_core.data.imageio import image_size
    from hairdiff_core.imageops import check_same_aspect

    ref = image_size(photo, "--image", max_megapixels)
    for flag, paths in others.items():
        for path in paths:
            size = image_size(path, f"--{flag}", max_megapixels)
            noun = {"exclude": "exclusion mask"}.get(flag, flag)
            check_same_aspect(size, ref, f"{noun} {path} (--{flag})", f"photo {photo}", input=flag, noun=noun)


def check_eval_args(args) -> None:
    """``hairdiff eval``: settings, dataset folder, output folder, model files."""
    _sampling(args)
    if args.limit is not None:
        check_number(args.limit, Bound("--limit", integer=True, lo=1), "limit")
    if args.resolution is not None:
        from hairdiff_core.data.datasets import check_resolution

        check_resolution(args.resolution)
    if args.edge_threshold is not None:
        check_number(args.edge_threshold, Bound("--edge-threshold", lo=0.0, hi=10.0), "edge_threshold")
    _reference_flags(args, list(args.reference), list(args.method))
    if not Path(args.data).exists():
        raise InputError(f"--data {args.data}: not a folder (expected img/, matte/ and sketch/ inside)", input="data")
    check_input_path(args.data, "--data", kind="folder", input="data")
    if getattr(args, "prompt_embeds", None):
        _input_files({"prompt-embeds": args.prompt_embeds})
    out = check_writable_folder(args.out, "eval output")
    if out.resolve() == Path(args.data).resolve():
        raise InputError("--out is the dataset folder; write the results to another folder", input="out")
    _prompt(args)
    _model(args)


def _prompt(args) -> None:
    check_prompt_source(args)


def check_demo_args(args) -> None:
    """``hairdiff demo``: sampling steps and seed, and an output folder that can be written."""
    check_generate_settings(steps=8 if args.steps is None else args.steps, seed=args.seed)
    check_writable_folder(args.out, "demo output")
