"""``hairdiff encode-prompt``: encode a prompt once with SD3's text encoders into the file ``--prompt-embeds`` reads.

Only the text encoders are loaded (no transformer, no VAE), then freed; the file holds
``prompt_embeds``/``pooled_prompt_embeds`` (+ ``negative_*``), float32, and the prompts in its
metadata.
"""

from __future__ import annotations

import argparse
import logging

from .generate import DTYPES, torch_dtype
from .options import add_text_arguments, text_source

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="the prompt, e.g. 'copper red hair'")
    p.add_argument("--negative-prompt", help="a negative prompt (for --cfg > 1 later)")
    p.add_argument("--out", required=True, help="output .safetensors (what --prompt-embeds reads)")
    p.add_argument("--model", help="a diffusers SD3.5 folder: its text_encoder*/tokenizer* are used")
    p.add_argument(
        "--tiny", action="store_true", help="the tiny random text encoders of the tiny model (a wiring check)"
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="encoder precision (bf16/fp16 on GPUs)")
    p.add_argument("--max-sequence-length", type=int, default=77, help="T5 tokens (SD3: 77, up to 512)")
    add_text_arguments(p, prompts=False)


def run(args) -> int:
    from pathlib import Path

    from hairdiff_core.errors import InputError
    from hairdiff_core.fileio import check_writable_file
    from hairdiff_core.models.text import PromptCache, save_prompt_embeds
    from hairdiff_core.models.text_encoders import TextEncoderSource, load_text_encoders

    # Checked before the encoders load: a .png name would hold a safetensors file.
    out = check_writable_file(args.out, "--out")
    if out.suffix.lower() != ".safetensors":
        raise InputError(
            f"--out {out.name}: prompt embeddings are a .safetensors file; name it e.g. {out.stem}.safetensors",
            input="out",
        )
    if args.model and not Path(args.model).expanduser().exists():
        raise FileNotFoundError(2, "model not found", str(args.model))
    source = text_source(args)
    if source is None and args.tiny:
        source = TextEncoderSource(tiny=True)
    elif source is None and args.model and (Path(args.model) / "text_encoder").is_dir():
        source = TextEncoderSource(folder=args.model)
    if source is None:
        raise InputError(
            "no text encoders: pass --model (a diffusers SD3.5 folder), --text-encoders PATH, --clip-l FILE --clip-g FILE "
            "[--t5 FILE] (with --tokenizers DIR), or --tiny for the wiring check"
        )
    if not 1 <= args.max_sequence_length <= 512:
        raise InputError(f"--max-sequence-length must be in 1..512 (T5's limit), got {args.max_sequence_length}")
    cache = PromptCache(model_key=source.key, max_sequence_length=args.max_sequence_length)
    prompts = [args.prompt] + ([args.negative_prompt] if args.negative_prompt is not None else [])
    pairs = cache.encode(
        prompts,
        lambda: load_text_encoders(
            source, device=args.device, dtype=torch_dtype(args.dtype), max_sequence_length=args.max_sequence_length
        ),
    )
    embeds, pooled = pairs[args.prompt]
    neg = pairs.get(args.negative_prompt) if args.negative_prompt is not None else (None, None)
    path = save_prompt_embeds(
        args.out,
        embeds,
        pooled,
        neg[0],
        neg[1],
        metadata={"prompt": args.prompt, "negative_prompt": args.negative_prompt or "", "text_encoders": source.key},
    )
    logger.info("wrote %s: prompt_embeds %s, pooled %s", path, tuple(embeds.shape), tuple(pooled.shape))
    return 0
