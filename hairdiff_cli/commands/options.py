"""Flags several commands share, and their reading: the text encoders and prompts (generate, eval,
encode-prompt) and the ``--ref-*`` reference-attention fields (generate, eval).

Apart from ``generate`` so that the argument checks (``preflight``), which every command runs
first, read them without importing a command module: ``generate`` runs ``preflight``, and
``preflight`` reading these from ``generate`` made the two import each other.
"""

from __future__ import annotations

import argparse


def add_text_arguments(p: argparse.ArgumentParser, group=None, prompts: bool = True) -> None:
    """--prompt/--negative-prompt and where SD3's text encoders are (generate, eval, encode-prompt)."""
    if prompts:
        group.add_argument("--prompt", help="text prompt, e.g. 'copper red hair' (encoded with SD3's text encoders)")
        group.add_argument("--negative-prompt", help="negative prompt (used when --cfg > 1)")
    t = p.add_argument_group(
        "text encoders (for --prompt; a diffusers --model folder brings its own; --tiny has tiny ones)"
    )
    t.add_argument(
        "--text-encoders",
        metavar="PATH",
        help="a diffusers SD3 folder, or a folder of single files (clip_l*, clip_g*, t5xxl* .safetensors)",
    )
    t.add_argument("--clip-l", metavar="FILE", help="CLIP-L single file (e.g. models/text_encoders/clip_l.safetensors)")
    t.add_argument("--clip-g", metavar="FILE", help="CLIP-G single file")
    t.add_argument(
        "--t5", metavar="FILE", help="T5-XXL single file (fp16 or fp8); optional: without it T5's part is zeros"
    )
    t.add_argument("--no-t5", action="store_true", help="leave T5 out even when present (saves ~9 GB)")
    t.add_argument(
        "--tokenizers",
        metavar="DIR",
        help="for single files: a diffusers SD3 folder (tokenizer*/) or a ComfyUI installation "
        "(comfy/sd1_tokenizer, comfy/text_encoders/t5_tokenizer)",
    )


def text_source(args):
    """The ``TextEncoderSource`` of the flags, or None (the pipeline then picks tiny / the --model folder)."""
    from hairdiff_core.models.text_encoders import TextEncoderSource

    src = TextEncoderSource(
        folder=args.text_encoders,
        clip_l=args.clip_l,
        clip_g=args.clip_g,
        t5=args.t5,
        tokenizers=args.tokenizers,
        use_t5=not args.no_t5,
    )
    return src if src.given else None


def check_prompt_source(args) -> None:
    """A --prompt without any text encoders fails here, before a multi-GB model is loaded."""
    from pathlib import Path

    from hairdiff_core.errors import InputError

    if getattr(args, "prompt", None) is None and getattr(args, "negative_prompt", None) is None:
        return
    if args.tiny or text_source(args) is not None or (args.model and (Path(args.model) / "text_encoder").is_dir()):
        return
    raise InputError(
        "--prompt needs SD3's text encoders: --model is not a diffusers folder with text_encoder*/tokenizer*, so pass "
        "--text-encoders PATH (a diffusers SD3 folder, or ComfyUI's models/text_encoders) or --clip-l/--clip-g[/--t5] "
        "files with --tokenizers DIR; or encode once with `hairdiff encode-prompt` and pass --prompt-embeds"
    )


def prompt_kwargs(args) -> dict:
    """``prompt=``/``negative_prompt=`` for ``generate``; refuses a prompt together with --prompt-embeds."""
    from hairdiff_core.errors import InputError

    kw = {k: getattr(args, k) for k in ("prompt", "negative_prompt") if getattr(args, k, None) is not None}
    if kw and getattr(args, "prompt_embeds", None):
        raise InputError("give --prompt/--negative-prompt or --prompt-embeds, not both")
    return kw


#: ``--ref-*`` flag -> ``ReferenceSettings`` field (shared by generate and eval).
REFERENCE_FLAGS = {
    "ref_weight_inside": ("weight_inside", float, "reference weight for queries inside the matte"),
    "ref_weight_outside": ("weight_outside", float, "reference weight for queries outside the matte"),
    "ref_key_weight_inside": ("key_weight_inside", float, "weight of reference keys inside the matte (0 = excluded)"),
    "ref_input": ("reference_input", str, "feed the reference pass the 'photo' or a hair-'filled' copy"),
    "ref_suppress_self": (
        "suppress_self_outside",
        float,
        "0-1: down-weight the generation's own keys outside the matte",
    ),
    "ref_once_sigma": ("once_sigma", float, "noise level of the single reference pass of --reference once"),
    "ref_key_pool": (
        "key_pool",
        int,
        "key budget: average reference keys over NxN token cells (1 = off, 2 = 4x fewer)",
    ),
    "ref_key_ring": ("key_ring", int, "key budget: only reference keys within R tokens of the matte (0 = all)"),
    "ref_kernel": (
        "attention_kernel",
        str,
        "auto (grouped on CUDA), grouped (no float mask), folded (biases in extra head dims) or bias",
    ),
}
#: ``--ref-*`` flags with a fixed set of values.
REFERENCE_FLAG_CHOICES = {
    "ref_input": ("photo", "filled"),
    "ref_key_pool": (1, 2, 4),
    "ref_kernel": ("auto", "grouped", "bias", "folded"),  # reference.ATTENTION_KERNELS (the CLI loads torch lazily)
}


def add_reference_field_arguments(group) -> None:
    for dest, (_, kind, help_text) in REFERENCE_FLAGS.items():
        extra = {"choices": REFERENCE_FLAG_CHOICES[dest]} if dest in REFERENCE_FLAG_CHOICES else {}
        group.add_argument("--" + dest.replace("_", "-"), type=kind, help=help_text, **extra)


def reference_fields(args) -> dict:
    """The ``ReferenceSettings`` fields the user set with ``--ref-*`` flags."""
    return {
        field: getattr(args, dest) for dest, (field, _, _) in REFERENCE_FLAGS.items() if getattr(args, dest) is not None
    }


def reference_settings(args):
    """The run's ReferenceSettings from --reference and the --ref-* flags; None when off."""
    if args.reference == "off":
        return None
    from hairdiff_core.method.reference import ReferenceSettings

    return ReferenceSettings(mode=args.reference, reference_noise=args.ref_noise, **reference_fields(args))


def generate_settings(args):
    """The run's ``GenerateSettings`` from the flags: every sampling setting, validated once."""
    from hairdiff_core.settings import GenerateSettings

    return GenerateSettings(
        steps=args.steps,
        seed=args.seed,
        strength=args.strength,
        cfg=args.cfg,
        shift=args.shift,
        method=args.method,
        reference=reference_settings(args),
        feather_sigma=args.feather,
        matte_threshold=args.matte_threshold,
        paste_back=not args.no_paste_back,
        work_size=args.work_size,
        context_margin=args.margin,
        **({"style_weight": args.style_weight} if getattr(args, "style_weight", None) is not None else {}),
    )
