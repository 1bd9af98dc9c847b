"""Optional per-image text conditioning for training.

Default: none (zero embeddings, no text encoder in memory). Two ways to condition on captions:

- ``--text-embeds DIR``: ``DIR/<stem>.safetensors`` files with SD3 prompt embeddings
  (``prompt_embeds`` (1, L, D) and ``pooled_prompt_embeds`` (1, P), the keys
  :func:`hairdiff_core.models.text.load_prompt_embeds` reads), computed elsewhere;
- ``--captions FILE`` (JSON ``{stem: caption}`` or ``stem<TAB>caption`` lines): encoded once with
  the SD3 text encoders of the ``--model`` diffusers folder, cached under
  ``<cache>/text/<hash>.safetensors`` (keyed by caption, model and encoder length), after which
  the encoders are unloaded.

Samples without a caption get zero text of the same length.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from hairdiff_core.checks import parse_dtype
from hairdiff_core.errors import InputError
from hairdiff_core.fileio import check_input_path

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 77  # T5 tokens, the SD3 training script's default


@dataclass
class TextEmbeddings:
    by_index: dict[int, tuple[torch.Tensor, torch.Tensor]]  # (L, D), (P,)
    tokens: int

    def get(self, index: int, default=(None, None)):
        return self.by_index.get(index, default)


def read_captions(path) -> dict[str, str]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "captions file not found", str(path))
    check_input_path(path, "captions file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"cannot read captions {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise InputError(f"captions {path} must be a JSON object {{stem: caption}}")
        return {str(k): str(v) for k, v in data.items()}
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise InputError(f"captions {path} line {n}: expected 'stem<TAB>caption', got {line[:60]!r}")
        stem, caption = line.split("\t", 1)
        out[stem.strip()] = caption.strip()
    return out


def _check_dims(embeds: torch.Tensor, pooled: torch.Tensor, transformer, where: str) -> None:
    cfg = transformer.config
    if embeds.ndim != 2 or embeds.shape[-1] != cfg.joint_attention_dim or pooled.shape[-1] != cfg.pooled_projection_dim:
        raise InputError(
            f"text embeddings {where} have shapes {tuple(embeds.shape)} / {tuple(pooled.shape)}; this transformer "
            f"needs (tokens, {cfg.joint_attention_dim}) / ({cfg.pooled_projection_dim},). Were they made for another model?"
        )


def _from_folder(folder: Path, samples, transformer) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    from hairdiff_core.models.text import load_prompt_embeds

    out = {}
    for i, s in enumerate(samples):
        path = folder / f"{s.stem}.safetensors"
        if path.is_file():
            t = load_prompt_embeds(path)
            e, p = t["prompt_embeds"].float(), t["pooled_prompt_embeds"].float()
            e, p = (e[0] if e.ndim == 3 else e), (p[0] if p.ndim == 2 else p)
            _check_dims(e, p, transformer, f"in {path}")
            out[i] = (e, p)
    return out


def _encode_captions(
    captions: dict[str, str], samples, config, cache: Path, device
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    from hairdiff_core.models.text import PromptCache

    model_key = (
        str(Path(config.model).resolve()) if config.model else ("toy" if getattr(config, "toy", False) else "tiny")
    )
    prompts = PromptCache(cache / "text", model_key=model_key, max_sequence_length=MAX_SEQUENCE_LENGTH)
    wanted = {i: captions[s.stem] for i, s in enumerate(samples) if s.stem in captions}

    def load_encoder():
        if not config.model or not Path(config.model).is_dir():
            raise InputError(
                "--captions needs SD3's text encoders: pass --model as a diffusers SD3.5 folder (with text_encoder, "
                "text_encoder_2, text_encoder_3 and tokenizers), or precompute embeddings and use --text-embeds DIR"
            )
        from diffusers import StableDiffusion3Pipeline

        dtype = torch.float32 if config.mixed_precision == "no" else parse_dtype(config.mixed_precision)
        pipe = StableDiffusion3Pipeline.from_pretrained(
            config.model, transformer=None, vae=None, torch_dtype=dtype, local_files_only=True
        ).to(device)

        def encode(caption: str):
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=caption,
                prompt_2=None,
                prompt_3=None,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
            return embeds, pooled

        return encode

    # Encoded once, cached by caption; the encoders (T5-XXL alone is ~9 GB) are freed before training.
    pairs = prompts.encode(wanted.values(), load_encoder)
    if prompts.encoder_loads:
        logger.info("encoded caption(s) with SD3's text encoders (cached in %s), encoders unloaded", prompts.folder)
    return {i: (pairs[c][0][0].float(), pairs[c][1][0].float()) for i, c in wanted.items()}


def load_text_embeddings(config, samples, transformer, output: Path, acc) -> TextEmbeddings | None:
    if not config.captions and not config.text_embeds:
        return None
    by_index: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if config.text_embeds:
        folder = Path(config.text_embeds)
        if not folder.is_dir():
            raise FileNotFoundError(2, "text embeddings folder not found", str(folder))
        by_index.update(_from_folder(folder, samples, transformer))
    if config.captions:
        captions = read_captions(config.captions)
        cache = Path(config.cache_dir) if config.cache_dir else Path(output) / "cache"
        if acc.is_main_process:
            _encode_captions(captions, samples, config, cache, acc.device)
        acc.wait_for_everyone()
        for i, pair in _encode_captions(captions, samples, config, cache, acc.device).items():
            _check_dims(pair[0], pair[1], transformer, f"for {samples[i].stem}")
            by_index.setdefault(i, pair)
    if not by_index:
        logger.warning("no sample has a caption or text embedding; training with zero text")
        return None
    lengths = {e.shape[0] for e, _ in by_index.values()}
    if len(lengths) > 1:
        raise InputError(
            f"text embeddings have different token counts {sorted(lengths)}; encode all captions with the same max length"
        )
    logger.info("text conditioning for %d of %d sample(s)", len(by_index), len(samples))
    return TextEmbeddings(by_index, lengths.pop())
