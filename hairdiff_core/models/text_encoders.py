"""SD3's three text encoders (CLIP-L, CLIP-G, T5-XXL), loaded offline, for prompts.

Where they come from (``TextEncoderSource``):

- a diffusers SD3/SD3.5 folder: ``text_encoder``, ``text_encoder_2``, ``text_encoder_3`` with
  ``tokenizer``, ``tokenizer_2``, ``tokenizer_3`` (T5 optional);
- single files as ComfyUI keeps them in ``models/text_encoders``: ``clip_l.safetensors``,
  ``clip_g.safetensors``, ``t5xxl_fp16.safetensors`` / ``t5xxl_fp8_e4m3fn(_scaled).safetensors``
  (transformers' key layout; the architecture is read from the tensor shapes). Single files
  carry no tokenizer: ``tokenizers`` points to a diffusers SD3 folder (``tokenizer*``) or to a
  ComfyUI installation (``comfy/sd1_tokenizer``, ``comfy/text_encoders/t5_tokenizer``);
- ``tiny``: random tiny CLIP/T5 encoders and word-level tokenizers built in code, shaped for
  the tiny transformer (a wiring check: the prompt's meaning is noise).

The encoding follows diffusers' ``StableDiffusion3Pipeline.encode_prompt``: each CLIP's
penultimate hidden states (77 tokens) side by side, zero-padded to T5's width, followed by T5's
tokens (``max_sequence_length``; zeros of 77 tokens when T5 is absent, as SD3 allows); pooled =
both CLIPs' projected end-of-text embeddings side by side.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

CLIP_TOKENS = 77
#: SD3's joint attention width when T5 is absent and nothing else says so.
SD3_JOINT_DIM = 4096
TINY_KEY = "tiny"

#: A small word list for the tiny tokenizers: enough for hair prompts in tests and templates.
TINY_VOCAB = (
    "a an the of and with in on to hair hairstyle short long curly wavy straight braid braids bob bangs fringe "
    "bun ponytail red copper ginger auburn blonde platinum golden brown chestnut black dark light silver grey gray "
    "white pink blue green purple violet teal orange pastel shiny glossy matte soft natural dyed highlights ombre "
    "photo portrait woman man girl boy person , ."
).split()


@dataclass
class TextEncoderSource:
    """Where SD3's text encoders and tokenizers are (see the module docstring).

    Args:
        folder: a diffusers SD3 folder, or a folder of single files (``clip_l*``, ``clip_g*``,
            ``t5xxl*`` ``.safetensors``, e.g. ComfyUI's ``models/text_encoders``).
        clip_l, clip_g, t5: single files (override what ``folder`` holds).
        tokenizers: a diffusers SD3 folder or a ComfyUI installation, for single files.
        tiny: the built-in tiny random encoders (no files).
        use_t5: False leaves T5 out even when present (zeros for its part; saves ~9 GB).
    """

    folder: str | None = None
    clip_l: str | None = None
    clip_g: str | None = None
    t5: str | None = None
    tokenizers: str | None = None
    tiny: bool = False
    use_t5: bool = True

    @property
    def given(self) -> bool:
        return bool(self.tiny or self.folder or self.clip_l or self.clip_g or self.t5)

    @property
    def key(self) -> str:
        """Identifies the encoders for a prompt cache."""
        if self.tiny:
            return TINY_KEY
        parts = [
            str(Path(p).resolve()) if p else ""
            for p in (self.folder, self.clip_l, self.clip_g, self.t5 if self.use_t5 else None)
        ]
        return "|".join(parts)


# --------------------------------------------------------------------------------------------
# The encoders
# --------------------------------------------------------------------------------------------
class SD3TextEncoders:
    """CLIP-L + CLIP-G (+ T5) with their tokenizers; ``encode(prompt)`` -> (embeds, pooled)."""

    def __init__(
        self,
        clip_l,
        tokenizer_l,
        clip_g,
        tokenizer_g,
        t5=None,
        tokenizer_t5=None,
        joint_dim: int | None = None,
        max_sequence_length: int = 77,
    ):
        self.clip_l, self.tokenizer_l = clip_l.eval(), tokenizer_l
        self.clip_g, self.tokenizer_g = clip_g.eval(), tokenizer_g
        self.t5 = t5.eval() if t5 is not None else None
        self.tokenizer_t5 = tokenizer_t5
        self.joint_dim = int(t5.config.d_model) if t5 is not None else int(joint_dim or SD3_JOINT_DIM)
        self.max_sequence_length = int(max_sequence_length)
        clip_dim = clip_l.config.hidden_size + clip_g.config.hidden_size
        if clip_dim > self.joint_dim:
            raise ModelLoadError(
                f"the CLIP encoders' hidden sizes add up to {clip_dim}, wider than the joint width {self.joint_dim}; "
                f"these are not SD3's CLIP-L/CLIP-G (768 + 1280 for a 4096-wide T5)"
            )

    @property
    def pooled_dim(self) -> int:
        return int(self.clip_l.config.projection_dim + self.clip_g.config.projection_dim)

    def _device(self, model) -> torch.device:
        return next(model.parameters()).device

    def _clip(self, model, tokenizer, prompts: list[str]):
        ids = tokenizer(
            prompts, padding="max_length", max_length=CLIP_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        out = model(ids.to(self._device(model)), output_hidden_states=True)
        return out.hidden_states[-2], out[0]  # penultimate layer (SD3's clip_skip None), projected pooled

    @torch.no_grad()
    def encode(self, prompt) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt (str or list) -> (embeds (B, 77 + T5 tokens, joint_dim), pooled (B, pooled_dim)) float32 CPU."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        hl, pl = self._clip(self.clip_l, self.tokenizer_l, prompts)
        hg, pg = self._clip(self.clip_g, self.tokenizer_g, prompts)
        clip = torch.cat([hl.float().cpu(), hg.float().cpu()], dim=-1)
        clip = F.pad(clip, (0, self.joint_dim - clip.shape[-1]))
        if self.t5 is not None:
            ids = self.tokenizer_t5(
                prompts,
                padding="max_length",
                max_length=self.max_sequence_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids
            t5 = self.t5(ids.to(self._device(self.t5)))[0].float().cpu()
        else:
            t5 = torch.zeros(len(prompts), CLIP_TOKENS, self.joint_dim)
        pooled = torch.cat([pl.float().cpu(), pg.float().cpu()], dim=-1)
        return torch.cat([clip, t5], dim=-2), pooled

    __call__ = encode


def load_text_encoders(
    source: TextEncoderSource,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    joint_dim: int | None = None,
    max_sequence_length: int = 77,
) -> SD3TextEncoders:
    """Build ``SD3TextEncoders`` from ``source``, offline. Raises ``ModelLoadError`` naming what is missing."""
    if source.tiny:
        return build_tiny_text_encoders(device=device, max_sequence_length=max_sequence_length)
    if not source.given:
        raise ModelLoadError(
            "a prompt needs SD3's text encoders and none were given: pass --text-encoders (a diffusers SD3 folder, "
            "or ComfyUI's models/text_encoders with clip_l/clip_g[/t5xxl] .safetensors), or --clip-l/--clip-g[/--t5] "
            "files; or use --prompt-embeds, or --tiny for the wiring check"
        )
    folder = Path(source.folder) if source.folder else None
    if folder is not None and not folder.is_dir():
        raise ModelLoadError(f"text encoder folder {folder} does not exist")
    if folder is not None and (folder / "text_encoder").is_dir() and not (source.clip_l or source.clip_g):
        return _from_diffusers(folder, source, device, dtype, joint_dim, max_sequence_length)
    files = _single_files(source)
    tok_l, tok_g, tok_t5 = _tokenizers_for_single_files(source, need_t5=files["t5"] is not None)
    clip_l = _clip_from_file(files["clip_l"], "CLIP-L", dtype, tok_l).to(device)
    clip_g = _clip_from_file(files["clip_g"], "CLIP-G", dtype, tok_g).to(device)
    t5 = _t5_from_file(files["t5"], dtype).to(device) if files["t5"] is not None else None
    logger.info("text encoders: %s", ", ".join(f"{k}={v.name}" for k, v in files.items() if v is not None))
    return SD3TextEncoders(
        clip_l, tok_l, clip_g, tok_g, t5, tok_t5, joint_dim=joint_dim, max_sequence_length=max_sequence_length
    )


def _from_diffusers(folder: Path, source: TextEncoderSource, device, dtype, joint_dim, max_len) -> SD3TextEncoders:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    need = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    missing = [n for n in need if not (folder / n).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{folder} lacks {missing}: a diffusers SD3 folder has text_encoder(_2,_3) and tokenizer(_2,_3)"
        )

    def tok(name):
        return AutoTokenizer.from_pretrained(str(folder / name), local_files_only=True)

    def model(cls, name):
        try:
            return cls.from_pretrained(str(folder / name), torch_dtype=dtype, local_files_only=True).to(device)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load {folder / name}: {exc}") from exc

    t5 = tok_t5 = None
    if source.use_t5 and (folder / "text_encoder_3").is_dir():
        if not (folder / "tokenizer_3").is_dir():
            raise ModelLoadError(f"{folder} has text_encoder_3 (T5) but no tokenizer_3")
        t5, tok_t5 = model(T5EncoderModel, "text_encoder_3"), tok("tokenizer_3")
    elif source.use_t5:
        logger.info("%s has no text_encoder_3: T5's part of the prompt is zeros (as SD3 allows)", folder)
    return SD3TextEncoders(
        model(CLIPTextModelWithProjection, "text_encoder"),
        tok("tokenizer"),
        model(CLIPTextModelWithProjection, "text_encoder_2"),
        tok("tokenizer_2"),
        t5,
        tok_t5,
        joint_dim=joint_dim,
        max_sequence_length=max_len,
    )


# --------------------------------------------------------------------------------------------
# Single files (ComfyUI's models/text_encoders)
# --------------------------------------------------------------------------------------------
_PATTERNS = {"clip_l": r"clip[_-]?l", "clip_g": r"clip[_-]?g", "t5": r"t5"}


def _single_files(source: TextEncoderSource) -> dict[str, Path | None]:
    found: dict[str, Path | None] = {"clip_l": None, "clip_g": None, "t5": None}
    if source.folder:
        for p in sorted(Path(source.folder).glob("*.safetensors")):
            for k, pat in _PATTERNS.items():
                if found[k] is None and re.match(pat, p.name, re.IGNORECASE):
                    found[k] = p
    for k in found:
        explicit = getattr(source, k)
        if explicit:
            found[k] = Path(explicit)
    if not source.use_t5:
        found["t5"] = None
    for p in found.values():
        if p is not None and not p.is_file():
            raise ModelLoadError(f"text encoder file not found: {p}")
    missing = [k for k in ("clip_l", "clip_g") if found[k] is None]
    if missing:
        where = f" in {source.folder}" if source.folder else ""
        raise ModelLoadError(
            f"no {' and no '.join(missing)} text encoder{where}: SD3 needs clip_l.safetensors and clip_g.safetensors "
            f"(t5xxl_fp16.safetensors optional); pass --clip-l/--clip-g, or --text-encoders FOLDER holding them"
        )
    return found


def _tokenizers_for_single_files(source: TextEncoderSource, need_t5: bool):
    from transformers import AutoTokenizer

    root = Path(source.tokenizers) if source.tokenizers else None
    candidates = []
    if root is not None:
        candidates.append((root / "tokenizer", root / "tokenizer_2", root / "tokenizer_3"))  # diffusers SD3 folder
        comfy = root / "comfy" if (root / "comfy").is_dir() else root
        candidates.append((comfy / "sd1_tokenizer", comfy / "sd1_tokenizer", comfy / "text_encoders" / "t5_tokenizer"))
    else:
        comfy = _comfyui_package_dir()
        if comfy is not None:
            candidates.append(
                (comfy / "sd1_tokenizer", comfy / "sd1_tokenizer", comfy / "text_encoders" / "t5_tokenizer")
            )
    for l_dir, g_dir, t5_dir in candidates:
        if l_dir.is_dir() and g_dir.is_dir():
            tok_l = AutoTokenizer.from_pretrained(str(l_dir), local_files_only=True)
            tok_g = AutoTokenizer.from_pretrained(str(g_dir), local_files_only=True)
            if l_dir == g_dir:
                tok_g.pad_token = "!"  # SD3's tokenizer_2 pads with "!" (CLIP-G was trained so)
            tok_t5 = None
            if need_t5:
                if not t5_dir.is_dir():
                    raise ModelLoadError(f"a T5 encoder was given but its tokenizer is not at {t5_dir}")
                tok_t5 = AutoTokenizer.from_pretrained(str(t5_dir), local_files_only=True)
            return tok_l, tok_g, tok_t5
    looked = ", ".join(str(c[0]) for c in candidates) or "nowhere (no --tokenizers given, not inside ComfyUI)"
    raise ModelLoadError(
        "single-file text encoders carry no tokenizer, and none was found (looked in " + looked + "); pass "
        "--tokenizers DIR: a diffusers SD3 folder (tokenizer/, tokenizer_2/, tokenizer_3/ with vocab.json, "
        "merges.txt, tokenizer.json) or a ComfyUI installation (comfy/sd1_tokenizer, comfy/text_encoders/t5_tokenizer)"
    )


def _comfyui_package_dir() -> Path | None:
    """ComfyUI's ``comfy`` package folder when running inside ComfyUI (it ships the tokenizers)."""
    import sys

    comfy = sys.modules.get("comfy")
    path = getattr(comfy, "__file__", None) if comfy is not None else None
    return Path(path).parent if path else None


def _read_state_dict(path: Path, what: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read the {what} text encoder {path}: {exc}") from exc
    # fp8 files (t5xxl_fp8_e4m3fn) are cast up; "scaled" fp8 files carry a per-weight scale.
    out = {}
    for k, v in sd.items():
        if k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8":
            continue
        scale = sd.get(k[: -len(".weight")] + ".scale_weight") if k.endswith(".weight") else None
        v = v.to(torch.float32) * scale.to(torch.float32) if scale is not None else v
        out[k] = v.to(dtype)
    return out


def _materialise(model, sd: dict, path: Path, what: str):
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ModelLoadError(
            f"{path} is not a {what} text encoder in transformers' layout: {len(missing)} weights missing, e.g. "
            f"{missing[:3]} (unexpected: {list(unexpected)[:3]})"
        )
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (CLIP's position ids) are rebuilt
            if not name.endswith("position_ids"):
                raise ModelLoadError(f"{path}: buffer {name} was not in the file")
            module = model.get_submodule(name.rsplit(".", 1)[0])
            module.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(1, -1), persistent=False)
    return model.eval()


def _clip_from_file(path: Path, what: str, dtype: torch.dtype, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sd = _read_state_dict(path, what, dtype)
    if "text_model.embeddings.token_embedding.weight" not in sd:
        raise ModelLoadError(
            f"{path} is not a {what} text encoder in transformers' layout (no text_model.embeddings.token_embedding."
            f"weight); use the clip_l/clip_g files ComfyUI's SD3 examples use, or a diffusers SD3 folder"
        )
    vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
    layers = len({k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")})
    inter = sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    positions = sd["text_model.embeddings.position_embedding.weight"].shape[0]
    if "text_projection.weight" not in sd:  # some clip_l files have none: identity, as ComfyUI does
        sd["text_projection.weight"] = torch.eye(hidden, dtype=dtype)
    proj = sd["text_projection.weight"].shape[0]
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=positions,
        projection_dim=proj,
        # CLIP-L (OpenAI) uses quick_gelu, CLIP-G (OpenCLIP bigG) gelu; heads are 64 wide in both.
        hidden_act="quick_gelu" if hidden == 768 else "gelu",
        # The pooled output is read at the end-of-text token: take its id from the tokenizer.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    return _materialise(model, sd, path, what)


def _t5_from_file(path: Path, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    sd = _read_state_dict(path, "T5", dtype)
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    if "shared.weight" not in sd or "encoder.block.0.layer.0.SelfAttention.q.weight" not in sd:
        raise ModelLoadError(
            f"{path} is not a T5 encoder in transformers' layout (no shared.weight / encoder.block.0...)"
        )
    sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    vocab, d_model = sd["shared.weight"].shape
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.block.")})
    heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    d_ff = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0]
    config = T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    with torch.device("meta"):
        model = T5EncoderModel(config)
    return _materialise(model, sd, path, "T5")


# --------------------------------------------------------------------------------------------
# The tiny wiring-check encoders (shaped for hairdiff_core.models.tiny's transformer)
# --------------------------------------------------------------------------------------------
def tiny_tokenizer(kind: str):
    """A word-level tokenizer over ``TINY_VOCAB`` built in code: ``clip`` (bos ... eos, pad) or ``t5`` (... </s>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in TINY_VOCAB if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "clip":
        tok.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<pad>",
            unk_token="<unk>",
            model_max_length=CLIP_TOKENS,
        )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=512
    )


def build_tiny_text_encoders(device="cpu", max_sequence_length: int = 77, seed: int | None = None) -> SD3TextEncoders:
    """Tiny random CLIP-L/CLIP-G/T5 + tokenizers for the tiny transformer (joint 32, pooled 64)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .tiny import TINY_SEED, TINY_TRANSFORMER_CONFIG, _fill_deterministic

    seed = TINY_SEED + 7 if seed is None else seed
    tok_clip, tok_t5 = tiny_tokenizer("clip"), tiny_tokenizer("t5")
    vocab = len(tok_clip)
    joint = TINY_TRANSFORMER_CONFIG["joint_attention_dim"]
    pooled = TINY_TRANSFORMER_CONFIG["pooled_projection_dim"]
    clips = []
    for i in range(2):
        # One head and gelu: what a single file of this width is read back as (heads = max(1, width // 64)).
        cfg = CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=joint // 2,
            intermediate_size=joint,
            num_hidden_layers=2,
            num_attention_heads=1,
            hidden_act="gelu",
            max_position_embeddings=CLIP_TOKENS,
            projection_dim=pooled // 2,
            bos_token_id=tok_clip.bos_token_id,
            eos_token_id=tok_clip.eos_token_id,
            pad_token_id=tok_clip.pad_token_id,
        )
        model = CLIPTextModelWithProjection(cfg)
        _fill_deterministic(model, seed + i)
        clips.append(model.to(device))
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=joint,
            d_kv=8,
            d_ff=joint * 2,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=tok_t5.pad_token_id,
            eos_token_id=tok_t5.eos_token_id,
        )
    )
    _fill_deterministic(t5, seed + 2)
    return SD3TextEncoders(
        clips[0], tok_clip, clips[1], tok_clip, t5.to(device), tok_t5, max_sequence_length=max_sequence_length
    )
