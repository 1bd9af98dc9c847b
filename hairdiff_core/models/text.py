"""Text conditioning: zero embeddings (training's default) or cached SD3 prompt embeddings.

HairDiff trains with zero text embeddings and zero pooled projections (no text encoders in
memory), so inference without a prompt must feed exactly the same thing: ``ZERO_TEXT_TOKENS``
zero tokens. The count matters even though the tokens are zero: every token becomes the same
key (the context embedder's bias), and how many copies of it there are changes attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError

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

    from ..fileio import check_input_path

    check_input_path(path, "prompt embeddings file", input="prompt_embeds")
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


# --------------------------------------------------------------------------------------------
# Encoding prompts once: a cache by prompt, in memory and optionally on disk (shared by
# ``HairDiffPipeline.generate(prompt=...)``, ``hairdiff encode-prompt`` and training's captions)
# --------------------------------------------------------------------------------------------
def free_memory() -> None:
    """Give freed tensors back (the text encoders are GBs: T5-XXL alone ~9 GB in fp16)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PromptCache:
    """prompt -> (embeds (1, L, D), pooled (1, P)) in float32 on the CPU.

    ``folder``: also keep each entry as ``<folder>/<hash>.safetensors`` (keyed by prompt,
    ``model_key`` and ``max_sequence_length``), written atomically, so a later run skips the
    encoders entirely. ``encode`` loads the encoders only when some prompt is missing and frees
    them before returning, so the transformer never shares memory with them.
    """

    def __init__(self, folder=None, model_key: str = "", max_sequence_length: int = 77):
        from pathlib import Path

        self.folder = Path(folder) if folder is not None else None
        self.model_key = str(model_key)
        self.max_sequence_length = int(max_sequence_length)
        self._memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoder_loads = 0

    def path(self, prompt: str):
        if self.folder is None:
            return None
        import hashlib

        h = hashlib.sha256(f"{self.model_key}\n{self.max_sequence_length}\n{prompt}".encode()).hexdigest()[:32]
        return self.folder / f"{h}.safetensors"

    def get(self, prompt: str):
        if prompt in self._memory:
            return self._memory[prompt]
        path = self.path(prompt)
        if path is not None and path.is_file():
            t = load_prompt_embeds(path)
            pair = (t["prompt_embeds"].float(), t["pooled_prompt_embeds"].float())
            self._memory[prompt] = pair
            return pair
        return None

    def put(self, prompt: str, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        embeds = embeds.detach().float().cpu().contiguous()
        pooled = pooled.detach().float().cpu().contiguous()
        self._memory[prompt] = (embeds, pooled)
        path = self.path(prompt)
        if path is not None:
            from safetensors.torch import save_file

            from ..fileio import atomic_write

            with atomic_write(path, fsync=False) as tmp:
                save_file({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, str(tmp))

    def encode(self, prompts, load_encoder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every prompt's pair; ``load_encoder()`` -> a callable ``prompt -> (embeds, pooled)``
        is called at most once, only when a prompt is not cached, and released afterwards."""
        prompts = list(dict.fromkeys(prompts))
        missing = [p for p in prompts if self.get(p) is None]
        if missing:
            encoder = load_encoder()
            self.encoder_loads += 1
            try:
                with torch.no_grad():
                    for p in missing:
                        embeds, pooled = encoder(p)
                        self.put(p, embeds, pooled)
            finally:
                # Drop our reference (the caller keeps none) and hand the memory back.
                del encoder
                free_memory()
        return {p: self.get(p) for p in prompts}


def save_prompt_embeds(
    path,
    prompt_embeds,
    pooled_prompt_embeds,
    negative_prompt_embeds=None,
    negative_pooled_prompt_embeds=None,
    metadata: dict | None = None,
):
    """Write the file ``load_prompt_embeds`` (and ``--prompt-embeds``) reads, atomically."""
    from pathlib import Path

    from safetensors.torch import save_file

    tensors = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}
    if negative_prompt_embeds is not None:
        tensors.update(
            negative_prompt_embeds=negative_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds
        )
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    from ..fileio import atomic_write

    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path
