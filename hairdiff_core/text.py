"""Text conditioning: zero embeddings (training's default) or cached SD3 prompt embeddings.

HairDiff trains with zero text embeddings and zero pooled projections (no text encoders in
memory), so inference without a prompt must feed exactly the same thing: ``ZERO_TEXT_TOKENS``
zero tokens. The count matters even though the tokens are zero: every token becomes the same
key (the context embedder's bias), and how many copies of it there are changes attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError

#: Tokens of the zero text sequence, as in training (77 = CLIP's length, SD3's training default).
ZERO_TEXT_TOKENS = 77

PROMPT_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")


@dataclass
class TextConditioning:
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None


def zero_text(transformer, batch: int, device=None, dtype=torch.float32, tokens: int = ZERO_TEXT_TOKENS):
    """(embeds (B, tokens, joint_attention_dim), pooled (B, pooled_projection_dim)), all zeros."""
    cfg = transformer.config
    embeds = torch.zeros(batch, tokens, cfg.joint_attention_dim, device=device, dtype=dtype)
    pooled = torch.zeros(batch, cfg.pooled_projection_dim, device=device, dtype=dtype)
    return embeds, pooled


def check_text(transformer, embeds: torch.Tensor, pooled: torch.Tensor, what: str = "prompt") -> None:
    cfg = transformer.config
    if embeds.ndim != 3 or embeds.shape[-1] != cfg.joint_attention_dim:
        raise InputError(
            f"{what} embeddings have shape {tuple(embeds.shape)}; this transformer expects "
            f"(B, tokens, {cfg.joint_attention_dim}). Were they made for another model?",
            input="negative_prompt_embeds" if what.startswith("negative") else "prompt_embeds",
        )
    if pooled.ndim != 2 or pooled.shape[-1] != cfg.pooled_projection_dim:
        raise InputError(
            f"{what} pooled embeddings have shape {tuple(pooled.shape)}; this transformer expects "
            f"(B, {cfg.pooled_projection_dim})",
            input="negative_pooled_prompt_embeds" if what.startswith("negative") else "pooled_prompt_embeds",
        )


def load_prompt_embeds(path) -> dict[str, torch.Tensor]:
    """Read cached SD3 prompt embeddings from a safetensors file with the ``PROMPT_KEYS`` names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise InputError(f"cannot read prompt embeddings from {path}: {exc}") from exc
    missing = [k for k in PROMPT_KEYS[:2] if k not in tensors]
    if missing:
        raise InputError(
            f"prompt embeddings file {path} lacks {missing}; expected keys {list(PROMPT_KEYS)} "
            f"(the negative ones optional)"
        )
    return {k: tensors[k] for k in PROMPT_KEYS if k in tensors}
