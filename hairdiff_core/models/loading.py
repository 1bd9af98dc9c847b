"""Model loading: diffusers folders, ComfyUI-style single-file SD3/SD3.5 checkpoints, the tiny model.

Nothing is ever fetched from a model hub. diffusers' single-file loader normally guesses a hub
repository from the key shapes and downloads that repository's config; here the transformer and
VAE configs ship with the package (``hairdiff_core/models/configs``) and the family is recognised from
tensor shapes alone, so every diffusers call gets a local config folder and
``local_files_only=True``.

Only safetensors are read (never pickles: unpickling a user file can run code).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .families import ARCH_KEYS, FAMILY_NAMES, VAE_CONFIG_FILE, shipped_config, transformer_config

logger = logging.getLogger(__name__)

# Head size of every published SD3/SD3.5 model; used when no q/k-norm weight reveals it.
_DEFAULT_HEAD_DIM = 64

_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
_VAE_PREFIX_PREFERENCE = ("first_stage_model.", "vae.", "")

# Per key layout: the tensors the transformer's shape reading needs (names after the prefix).
_LAYOUTS: dict[str, dict[str, str]] = {
    "original": {
        "patch": "x_embedder.proj.weight",
        "pos": "pos_embed",
        "context": "context_embedder.weight",
        "pooled": "y_embedder.mlp.0.weight",
        "final": "final_layer.linear.weight",
        "block": r"joint_blocks\.(\d+)\.",
        "attn2": r"joint_blocks\.(\d+)\.x_block\.attn2\.",
        "ln_q": "joint_blocks.0.x_block.attn.ln_q.weight",
    },
    "diffusers": {
        "patch": "pos_embed.proj.weight",
        "pos": "pos_embed.pos_embed",
        "context": "context_embedder.weight",
        "pooled": "time_text_embed.text_embedder.linear_1.weight",
        "final": "proj_out.weight",
        "block": r"transformer_blocks\.(\d+)\.",
        "attn2": r"transformer_blocks\.(\d+)\.attn2\.",
        "ln_q": "transformer_blocks.0.attn.norm_q.weight",
    },
}
# Top-level module names of the transformer per layout: a prefix-less file may bundle other
# models (VAE, text encoders) whose keys must not reach the converter.
_TRANSFORMER_ROOTS = {
    "original": {
        "pos_embed",
        "x_embedder",
        "t_embedder",
        "y_embedder",
        "context_embedder",
        "joint_blocks",
        "final_layer",
    },
    "diffusers": {"pos_embed", "time_text_embed", "context_embedder", "transformer_blocks", "norm_out", "proj_out"},
}
_TRANSFORMER_PREFIX_PREFERENCE = ("model.diffusion_model.", "diffusion_model.", "", "transformer.")

_VAE_LAYOUTS = {
    "ldm": r"encoder\.down\.(\d+)\.block\.(\d+)\.conv1\.weight",
    "diffusers": r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight",
}


@dataclass
class LoadedModels:
    """What ``load_models`` returns."""

    transformer: Any  # SD3Transformer2DModel: as stored, 16 ch (stock) or 32 ch (widened)
    vae: Any | None  # AutoencoderKL
    family: str  # a key of FAMILY_NAMES
    source: str  # where the weights came from, for logs and UIs


# --------------------------------------------------------------------------------------------
# Shape reading and identification


def _shape(value: Any) -> tuple[int, ...]:
    if hasattr(value, "shape"):
        return tuple(int(s) for s in value.shape)
    return tuple(int(s) for s in value)


def _prefixes_of(keys: Iterator[str] | list[str], mark: str) -> list[str]:
    found = []
    for key in keys:
        if key == mark:
            found.append("")
        elif key.endswith("." + mark):
            found.append(key[: -len(mark)])
    return found


def _pick(prefixes: list[str], preference: tuple[str, ...]) -> str:
    for p in preference:
        if p in prefixes:
            return p
    return min(prefixes, key=len)


def _transformer_view(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str] | None:
    """(layout, prefix) of the SD3 transformer inside a state dict, or None."""
    for layout in ("original", "diffusers"):
        prefixes = _prefixes_of(list(shapes), _LAYOUTS[layout]["patch"])
        if layout == "diffusers":
            # Other DiTs (PixArt, Hunyuan, ...) share the patch-embedding name; SD3 also has this.
            prefixes = [p for p in prefixes if p + "context_embedder.weight" in shapes]
        if prefixes:
            return layout, _pick(prefixes, _TRANSFORMER_PREFIX_PREFERENCE)
    return None


def _strip(shapes: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    n = len(prefix)
    return {k[n:]: v for k, v in shapes.items() if k.startswith(prefix)}


def _what_else(keys: list[str]) -> str:
    """A guess at what a non-SD3 file is, for error messages."""
    joined = "\n".join(keys[:5000])
    guesses = [
        ("double_blocks.", "a Flux transformer"),
        ("input_blocks.", "an SD1.x/SDXL UNet"),
        ("down_blocks.0.attentions", "an SD1.x/SDXL UNet (diffusers layout)"),
        ("lora_", "a LoRA"),
        ("text_model.", "a text encoder"),
        ("shared.weight", "a T5 text encoder"),
        ("decoder.conv_in", "a VAE"),
    ]
    for needle, what in guesses:
        if needle in joined:
            return f" It looks like {what}."
    return ""


def _unknown(shapes: Mapping[str, Any], what: str, source: str | None) -> ModelLoadError:
    keys = sorted(shapes)
    where = f" in {source}" if source else ""
    sample = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    return ModelLoadError(f"no {what} found{where}: it has {len(keys)} tensors ({sample or 'none'}).{_what_else(keys)}")


def _format_layers(layers: tuple[int, ...]) -> str:
    if not layers:
        return ""
    if list(layers) == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(i) for i in layers)


def identify_transformer(
    state_dict_or_shapes: Mapping[str, Any],
    name_hint: str | None = None,
    *,
    source: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Recognise an SD3/SD3.5 transformer from tensor shapes alone.

    ``state_dict_or_shapes`` maps key -> tensor (meta tensors are fine) or shape, in the original
    single-file layout (``joint_blocks.*``, with or without ``model.diffusion_model.``) or the
    diffusers layout (``transformer_blocks.*``, optionally under ``transformer.``). Other keys
    (VAE, text encoders) are ignored. Returns ``(family, config)``: the family is a key of
    ``FAMILY_NAMES`` and config holds the 13 ``SD3Transformer2DModel`` arguments, with
    ``in_channels`` as stored (32 for an already widened file). SD3.5 Large and Large Turbo have
    identical shapes; ``name_hint`` (a file name) containing "turbo" selects Turbo. Shapes that
    match no shipped config give family ``"custom"`` and a config derived from the shapes.
    """
    shapes = {k: _shape(v) for k, v in state_dict_or_shapes.items()}
    view = _transformer_view(shapes)
    if view is None:
        raise _unknown(
            shapes, "SD3/SD3.5 transformer (no 'x_embedder.proj.weight' nor 'pos_embed.proj.weight' tensor)", source
        )
    layout, prefix = view
    names = _LAYOUTS[layout]
    own = _strip(shapes, prefix)
    where = f" in {source}" if source else ""

    def need(role: str, ndim: int) -> tuple[int, ...]:
        shape = own.get(names[role])
        if shape is None or len(shape) != ndim:
            seen = "missing" if shape is None else f"shape {list(shape)}"
            raise ModelLoadError(
                f"SD3 transformer{where} ({layout} key layout, prefix '{prefix}') is incomplete or "
                f"not SD3: tensor '{prefix}{names[role]}' is {seen}, expected {ndim} dimensions. "
                f"The file may be partial or another architecture."
            )
        return shape

    hidden, in_channels, kh, kw = need("patch", 4)
    if kh != kw:
        raise ModelLoadError(f"SD3 transformer{where}: patch kernel {kh}x{kw} is not square")
    patch = kh
    pos_rows = need("pos", 3)[1]
    pos_max = math.isqrt(pos_rows)
    if pos_max * pos_max != pos_rows:
        raise ModelLoadError(f"SD3 transformer{where}: position table has {pos_rows} rows, not a square number")
    caption_dim, joint_dim = need("context", 2)
    pooled_dim = need("pooled", 2)[1]
    out_channels = need("final", 2)[0] // (patch * patch)
    block_re, attn2_re = re.compile(names["block"]), re.compile(names["attn2"])
    blocks = {int(m.group(1)) for k in own if (m := block_re.match(k))}
    if not blocks or blocks != set(range(max(blocks) + 1)):
        raise ModelLoadError(f"SD3 transformer{where}: block indices {sorted(blocks)} are not 0..N-1 (partial file?)")
    dual = tuple(sorted({int(m.group(1)) for k in own if (m := attn2_re.match(k))}))
    ln_q = own.get(names["ln_q"])
    head_dim = ln_q[0] if ln_q else _DEFAULT_HEAD_DIM
    if hidden % head_dim or caption_dim != hidden:
        raise ModelLoadError(
            f"SD3 transformer{where}: hidden size {hidden}, caption projection {caption_dim}, "
            f"head size {head_dim} do not fit SD3 (caption projection = hidden = heads x head size)"
        )
    derived = {
        "sample_size": 128,
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_layers": max(blocks) + 1,
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": joint_dim,
        "caption_projection_dim": caption_dim,
        "pooled_projection_dim": pooled_dim,
        "pos_embed_max_size": pos_max,
        "dual_attention_layers": dual,
        "qk_norm": "rms_norm" if ln_q else None,
    }
    family = "custom"
    config = derived
    for candidate in ("sd3.5-large", "sd3.5-medium", "sd3-medium", "tiny", "toy"):
        shipped = transformer_config(candidate)
        if all(shipped[k] == derived[k] for k in ARCH_KEYS):
            family, config = candidate, {**shipped, "in_channels": in_channels}
            break
    if family == "sd3.5-large" and name_hint and "turbo" in name_hint.lower():
        family = "sd3.5-large-turbo"
    return family, config


def describe_transformer(family: str, config: Mapping[str, Any]) -> str:
    """E.g. 'SD3.5 Medium transformer (24 blocks, dual attention 0-12)'."""
    parts = [f"{config['num_layers']} blocks"]
    dual = tuple(config.get("dual_attention_layers") or ())
    if dual:
        parts.append(f"dual attention {_format_layers(dual)}")
    if config["in_channels"] != 16:
        parts.append(f"{config['in_channels']} input channels")
    if family == "sd3.5-large":
        parts.append("or Large Turbo: same shapes; a name containing 'turbo' selects Turbo")
    if family == "custom":
        parts.append(
            f"{config['num_attention_heads']}x{config['attention_head_dim']} heads, config derived from shapes"
        )
    return f"{FAMILY_NAMES[family]} transformer ({', '.join(parts)})"


def _vae_view(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str] | None:
    prefixes = [
        p for p in _prefixes_of(list(shapes), "encoder.conv_in.weight") if p + "decoder.conv_in.weight" in shapes
    ]
    if not prefixes:
        return None
    prefix = _pick(prefixes, _VAE_PREFIX_PREFERENCE)
    own = _strip(shapes, prefix)
    for layout, pattern in _VAE_LAYOUTS.items():
        if any(re.match(pattern, k) for k in own):
            return layout, prefix
    return None


def identify_vae(state_dict_or_shapes: Mapping[str, Any], *, source: str | None = None) -> tuple[str, dict[str, Any]]:
    """Recognise the SD3/SD3.5 VAE ("sd3") or the tiny VAE ("tiny") from shapes.

    Accepts the original LDM layout (``encoder.down.0.block.0...``, also under
    ``first_stage_model.``) and the diffusers layout. The Flux VAE has the same shapes as the SD3
    one (but other scale/shift factors); shapes cannot tell them apart.
    """
    shapes = {k: _shape(v) for k, v in state_dict_or_shapes.items()}
    view = _vae_view(shapes)
    where = f" in {source}" if source else ""
    if view is None:
        raise _unknown(shapes, "VAE (no 'encoder.conv_in.weight' + 'decoder.conv_in.weight')", source)
    layout, prefix = view
    own = _strip(shapes, prefix)
    pattern = re.compile(_VAE_LAYOUTS[layout])
    blocks: dict[int, dict[int, int]] = {}
    for key, shape in own.items():
        if m := pattern.match(key):
            blocks.setdefault(int(m.group(1)), {})[int(m.group(2))] = shape[0]
    block_out = [blocks[i][0] for i in sorted(blocks)]
    layers = len(blocks[min(blocks)])
    conv_out = own.get("encoder.conv_out.weight")
    latent = conv_out[0] // 2 if conv_out else -1
    has_quant = "quant_conv.weight" in own
    seen = (
        f"{latent} latent channels, block channels {block_out}, {layers} layers per block"
        f"{', quant_conv' if has_quant else ''}"
    )
    from .tiny import TINY_VAE_CONFIG

    for kind, config in (("sd3", shipped_config(VAE_CONFIG_FILE)), ("tiny", dict(TINY_VAE_CONFIG))):
        if (
            latent == config["latent_channels"]
            and block_out == list(config["block_out_channels"])
            and layers == config["layers_per_block"]
            and has_quant == config["use_quant_conv"]
        ):
            return kind, config
    hint = " A 4-channel VAE belongs to SD1.x/SDXL, not SD3." if latent == 4 else ""
    raise ModelLoadError(
        f"VAE{where} is not the SD3/SD3.5 VAE: it has {seen}; SD3/SD3.5 needs 16 latent "
        f"channels, block channels [128, 256, 512, 512], 2 layers per block, no quant_conv.{hint} "
        f"Pass the SD3.5 VAE (its diffusers vae/ folder or a .safetensors file)."
    )


# --------------------------------------------------------------------------------------------
# Files


def _check_path(path: str | os.PathLike, what: str) -> Path:
    from ..fileio import check_input_path

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    check_input_path(p, what, kind="any", input=what)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in _PICKLE_SUFFIXES:
            raise ModelLoadError(
                f"{p} is a pickle checkpoint ({suffix}); HairDiff reads only .safetensors because "
                f"loading a pickle can run arbitrary code. Convert it to .safetensors "
                f"(e.g. load it once in a trusted environment and save it with "
                f"safetensors.torch.save_file) or download the .safetensors release."
            )
    return p


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in a safetensors file, from its header only (cheap for any size)."""
    from safetensors import SafetensorError, safe_open

    p = _check_path(path, "model file")
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise ModelLoadError(
            f"cannot read {p}: not a valid safetensors file ({e}). It is probably truncated or "
            f"corrupted (an interrupted download or copy?); download or copy it again."
        ) from e


def _read_tensors(path: Path, keys: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Read ``{new_name: file_key}`` from a safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {new: f.get_tensor(old) for new, old in keys.items()}
    except SafetensorError as e:
        raise ModelLoadError(f"cannot read tensors from {path} ({e}); the file is corrupted") from e


def read_dtypes(path: str | os.PathLike) -> dict[str, str]:
    """Tensor dtypes in a safetensors file ('BF16', 'F8_E4M3', ...), from its header only."""
    from safetensors import SafetensorError, safe_open

    p = _check_path(path, "model file")
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except SafetensorError as e:
        raise ModelLoadError(f"cannot read {p}: not a valid safetensors file ({e})") from e


_FLOAT8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# ComfyUI's fp8_scaled layout: a `scaled_fp8` marker tensor beside the model's keys (its dtype is
# the fp8 format), float8 weights and per layer `<layer>.scale_weight` (weight = fp8 x scale) and
# optionally `<layer>.scale_input` (for fp8 matmuls of the activations; not needed to dequantise).
_SCALED_FP8_MARKER = "scaled_fp8"
_SCALE_WEIGHT, _SCALE_INPUT = ".scale_weight", ".scale_input"
# ComfyUI's newer mixed-precision layout (comfy/ops.py MixedPrecisionOps, its QUANTIZATION.md),
# what ComfyUI converts fp8_scaled files to on load and newer files are written in: per
# quantised layer a float8 `<layer>.weight`, `<layer>.weight_scale` (weight = fp8 x scale),
# optionally `<layer>.input_scale`, and `<layer>.comfy_quant` (uint8 JSON such as
# {"format": "float8_e4m3fn"}; or the same in the file's `_quantization_metadata`); layers
# without them are plain bf16/fp16.
_WEIGHT_SCALE, _INPUT_SCALE, _COMFY_QUANT = ".weight_scale", ".input_scale", ".comfy_quant"
_SCALE_KEYS = (_SCALE_WEIGHT, _WEIGHT_SCALE)
# Tensors that describe a layer's quantisation rather than being one of its parameters.
_QUANT_AUX = (_SCALE_WEIGHT, _SCALE_INPUT, _WEIGHT_SCALE, _INPUT_SCALE, _COMFY_QUANT)
# Other quantised-weight layouts (NVFP4's second scale, AWQ/GPTQ-style packs), which HairDiff does not read.
_OTHER_QUANT_SUFFIXES = (".weight_scale_2", ".pre_quant_scale", ".scales", ".qweight", ".qzeros")


@dataclass(frozen=True)
class Float8Info:
    """What float8 content a transformer file has."""

    dtype: torch.dtype  # the weights' float8 format
    scaled: bool  # per-layer scale tensors present (scale_weight or weight_scale)
    marker: bool  # ComfyUI's scaled_fp8 marker present
    tensors: int  # float8 tensors in the transformer
    layout: str = "fp8_scaled"  # "fp8_scaled" (scale_weight), "mixed" (weight_scale) or "plain"

    def describe(self) -> str:
        if self.layout == "mixed":
            return "scaled fp8 (ComfyUI mixed precision)"
        return "scaled fp8 (ComfyUI fp8_scaled)" if self.scaled else "plain fp8"


def float8_info(shapes: Mapping[str, Any], dtypes: Mapping[str, str], path: Path, prefix: str) -> Float8Info | None:
    """Recognise float8 weights in a transformer file (ComfyUI fp8_scaled or plain fp8), or None.

    Refuses quantisation layouts it cannot dequantise, naming what it found.
    """
    marker_key = prefix + _SCALED_FP8_MARKER
    own = [k for k in shapes if k.startswith(prefix) and k != marker_key]
    f8 = [k for k in own if dtypes.get(k) in _FLOAT8]
    marker = marker_key in shapes
    scales = [k for k in own if k.endswith(_SCALE_KEYS)]
    scaled = bool(scales)
    other = sorted(k for k in own if k.endswith(_OTHER_QUANT_SUFFIXES))
    if other:
        raise ModelLoadError(
            f"{path} holds quantised weights in a layout HairDiff cannot dequantise (e.g. '{other[0]}'; "
            f"it reads ComfyUI's fp8 files — fp8_scaled with '{_SCALE_WEIGHT}' and mixed precision with "
            f"'{_WEIGHT_SCALE}' tensors — plain fp8/bf16/fp16 .safetensors and GGUF; NVFP4 and int4 packs "
            f"are not read). Use the bf16 release or Comfy-Org's *_fp8_scaled file of the model."
        )
    if not f8:
        if scaled:
            raise ModelLoadError(
                f"{path} has '{scales[0][scales[0].rindex('.') :]}' tensors but no float8 weights; it is not "
                f"an fp8 file HairDiff can read (damaged or another format)"
            )
        return None
    for k in scales:
        weight = k[: k.rindex(".")] + ".weight"
        if dtypes.get(weight) not in _FLOAT8:
            raise ModelLoadError(
                f"{path}: '{k}' scales '{weight}', which is {dtypes.get(weight, 'missing')}, not float8; "
                f"HairDiff reads scaled float8 layers only (another quantisation format?)"
            )
    kinds = {dtypes[k] for k in f8}
    if len(kinds) > 1:
        raise ModelLoadError(f"{path} mixes float8 formats {sorted(kinds)}; HairDiff reads one per file")
    bad = sorted(k for k in f8 if not k.endswith(".weight"))
    if bad:
        raise ModelLoadError(
            f"{path}: float8 tensor '{bad[0]}' is not a layer weight; only weights may be fp8 in the "
            f"files HairDiff reads (ComfyUI's fp8_scaled layout)"
        )
    layout = "mixed" if any(k.endswith(_WEIGHT_SCALE) for k in scales) else "fp8_scaled" if scaled else "plain"
    return Float8Info(dtype=_FLOAT8[kinds.pop()], scaled=scaled, marker=marker, tensors=len(f8), layout=layout)


# Keys (after the prefix) whose modules stay in the compute dtype under fp8 storage: the patch
# embedding and the final layer (memory.KEEP_IN_COMPUTE in diffusers names), in both layouts.
_KEPT_IN_COMPUTE = {
    "original": ("pos_embed", "x_embedder.", "final_layer."),
    "diffusers": ("pos_embed", "proj_out.", "norm_out."),
}


def _dequantise(t: torch.Tensor, scale: torch.Tensor | None, key: str, path: Path) -> torch.Tensor:
    """fp8 weight (x its ComfyUI scale_weight) -> float32, one layer at a time."""
    w = t.to(torch.float32)
    if scale is None:
        return w
    scale = scale.to(torch.float32)
    if scale.numel() != 1 and scale.ndim != w.ndim:
        raise ModelLoadError(
            f"{path}: scale of '{key}' has shape {list(scale.shape)}, which does not fit the weight "
            f"{list(w.shape)} (expected one scale per layer, as ComfyUI writes)"
        )
    return w * (scale.reshape(()) if scale.numel() == 1 else scale)


def _to_storage(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        # Out-of-range values would become NaN in float8; saturate like ComfyUI does.
        limit = torch.finfo(dtype).max
        t = t.clamp(-limit, limit)
    return t.to(dtype)


def _read_transformer_state(
    path: Path,
    keys: Mapping[str, str],
    layout: str,
    compute_dtype: torch.dtype,
    storage: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Read ``{new_name: file_key}`` tensor by tensor, dequantising fp8 (with ComfyUI's
    ``scale_weight``) and casting each to its final dtype: Linear weights to ``storage``, the
    rest to ``compute_dtype``. At most one layer is ever held in float32."""
    from safetensors import SafetensorError, safe_open

    kept = _KEPT_IN_COMPUTE[layout]
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            for new, old in keys.items():
                if new.endswith(_QUANT_AUX):
                    continue
                t = f.get_tensor(old)
                stored = t.ndim >= 2 and not new.startswith(kept)
                target = storage if stored else compute_dtype
                if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    layer = old[: -len(".weight")]
                    scale_key = next((layer + s for s in _SCALE_KEYS if layer + s in names), None)
                    scale = f.get_tensor(scale_key) if scale_key is not None else None
                    if scale is None and t.dtype == target:
                        out[new] = t  # plain fp8 into the same fp8: no round trip
                        continue
                    t = _dequantise(t, scale, old, path)
                if not bool(torch.isfinite(t).all()):
                    raise ModelLoadError(f"{path}: tensor '{old}' holds NaN/inf; the file is damaged")
                out[new] = _to_storage(t, target) if t.dtype != target else t
    except SafetensorError as e:
        raise ModelLoadError(f"cannot read tensors from {path} ({e}); the file is corrupted") from e
    return out


def _build_direct(state: dict[str, torch.Tensor], layout: str, config: Mapping[str, Any], what: str):
    """An ``SD3Transformer2DModel`` that takes ``state``'s tensors as they are (dtypes mixed:
    fp8 Linears, compute-dtype rest), converting the original key layout with diffusers' own
    converter. ``from_single_file`` would cast everything to one dtype first."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    try:
        if layout == "original":
            state = convert_sd3_transformer_checkpoint_to_diffusers(state)
        body = dict(config)
        body["dual_attention_layers"] = tuple(body.get("dual_attention_layers") or ())
        with torch.device("meta"):
            model = SD3Transformer2DModel(**body)
        model.load_state_dict(state, strict=True, assign=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"cannot build {what}: {type(e).__name__}: {e}") from e
    return model.eval()


@contextlib.contextmanager
def _config_dir(config: Mapping[str, Any], class_name: str) -> Iterator[str]:
    """A temporary folder holding ``config.json``: what diffusers' ``from_single_file`` wants
    (its ``config=`` takes a path, not a dict) to stay off the hub."""
    with tempfile.TemporaryDirectory(prefix="hairdiff-config-") as tmp:
        body = {"_class_name": class_name, **config}
        if "dual_attention_layers" in body:
            body["dual_attention_layers"] = list(body["dual_attention_layers"])
        Path(tmp, "config.json").write_text(json.dumps(body, indent=2), encoding="utf-8")
        yield tmp


def _ensure_loaded(model: torch.nn.Module, source: str) -> None:
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise ModelLoadError(
            f"{source} lacks {len(missing)} weights the model needs (e.g. {missing[0]}); the file is "
            f"partial or of another model variant"
        )


class _DropEmptyFp32Warning(logging.Filter):
    # ModelMixin.to(dtype) warns "modules ... should be kept in float32: []" for every model
    # without such modules (SD3 and its VAE have none); from_single_file always triggers it.
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextlib.contextmanager
def _quiet_dtype_casts() -> Iterator[None]:
    target = logging.getLogger("diffusers.models.modeling_utils")
    flt = _DropEmptyFp32Warning()
    target.addFilter(flt)
    try:
        yield
    finally:
        target.removeFilter(flt)


def _finish(model: torch.nn.Module, dtype: torch.dtype, device: str | torch.device):
    from .memory import current_storage_dtype

    # Weights stored in another dtype (layerwise casting) or quantised (GGUF) stay so.
    stored_apart = current_storage_dtype(model) is not None or getattr(model, "is_quantized", False)
    if not stored_apart and any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        with _quiet_dtype_casts():
            model = model.to(dtype=dtype)
    return model.to(device=device).eval()


# --------------------------------------------------------------------------------------------
# Transformer


def _build_single_file(cls, state, config, dtype: torch.dtype, what: str):
    """``cls.from_single_file`` on an in-memory state dict with a local config (never a hub)."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    with _config_dir(config, cls.__name__) as cfg:
        try:
            with _quiet_dtype_casts():
                return cls.from_single_file(state, config=cfg, local_files_only=True, torch_dtype=dtype)
        except (KeyError, RuntimeError, ValueError, SingleFileComponentError) as e:
            raise ModelLoadError(f"cannot build {what}: {type(e).__name__}: {e}") from e


def _inspect_transformer_file(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, dict[str, Any]]:
    return identify_transformer(shapes, name_hint=path.name, source=str(path))


def resolve_file_weights(weights: str, fp8: Float8Info | None, dtype: torch.dtype) -> str:
    """``auto`` for a file: its own fp8 format for an fp8 file, else the compute dtype."""
    from .memory import check_weights, weights_name

    check_weights(weights)
    if weights != "auto":
        return weights
    if fp8 is not None:
        return weights_name(fp8.dtype)
    return "auto"


def _load_transformer_file(
    path: Path,
    shapes: Mapping[str, tuple[int, ...]],
    family: str,
    config: dict[str, Any],
    dtype: torch.dtype,
    weights: str = "auto",
):
    from diffusers import SD3Transformer2DModel

    from .memory import apply_weights, storage_dtype

    layout, prefix = _transformer_view(shapes)  # type: ignore[misc]  # identify succeeded
    roots = _TRANSFORMER_ROOTS[layout]
    keys = {k[len(prefix) :]: k for k in shapes if k.startswith(prefix) and k[len(prefix) :].split(".", 1)[0] in roots}
    fp8 = float8_info(shapes, read_dtypes(path), path, prefix)
    weights = resolve_file_weights(weights, fp8, dtype)
    storage = storage_dtype(weights, dtype)
    what = f"the {FAMILY_NAMES[family]} transformer from {path} ({layout} layout)"
    if fp8 is not None or storage != dtype:
        # Tensor by tensor into its final dtype: never the whole model in a wider dtype.
        state = _read_transformer_state(path, keys, layout, dtype, storage)
        model = _build_direct(state, layout, config, what)
        if fp8 is not None:
            logger.info(
                "%s: %d %s weights%s dequantised layer by layer into %s",
                path.name,
                fp8.tensors,
                fp8.describe(),
                "" if fp8.marker or fp8.layout != "fp8_scaled" else " (no scaled_fp8 marker)",
                weights,
            )
    else:
        model = _build_single_file(SD3Transformer2DModel, _read_tensors(path, keys), config, dtype, what)
    _ensure_loaded(model, str(path))
    apply_weights(model, weights, dtype)
    logger.info("recognised %s in %s", describe_transformer(family, config), path)
    return model


# --------------------------------------------------------------------------------------------
# GGUF (optional extra: pip install "hairdiff[gguf]")


def _require_gguf(path: Path):
    try:
        import gguf
    except ImportError as e:
        raise ModelLoadError(
            f"{path} is a GGUF checkpoint; reading it needs the 'gguf' package: pip install \"hairdiff[gguf]\" "
            f"(or pip install gguf). Or use the .safetensors release."
        ) from e
    return gguf


def read_gguf_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Logical tensor shapes in a GGUF file (GGUF lists dimensions innermost first)."""
    p = _check_path(path, "model file")
    gguf = _require_gguf(p)
    try:
        reader = gguf.GGUFReader(str(p))
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"cannot read {p}: not a valid GGUF file ({e}); copy or download it again") from e
    return {t.name: tuple(int(d) for d in reversed(list(t.shape))) for t in reader.tensors}


def _load_transformer_gguf(path: Path, family: str, config: dict[str, Any], dtype: torch.dtype, weights: str):
    from diffusers import GGUFQuantizationConfig, SD3Transformer2DModel

    from .memory import check_weights, weights_name

    check_weights(weights)
    if weights not in ("auto", weights_name(dtype) if dtype != torch.float32 else "auto"):
        raise ModelLoadError(
            f"{path.name} is GGUF: its weights keep the file's own quantisation, so weights={weights!r} "
            f"does not apply. Use weights='auto' with GGUF files, or a .safetensors file for {weights}."
        )
    with _config_dir(config, "SD3Transformer2DModel") as cfg:
        try:
            with _quiet_dtype_casts():
                model = SD3Transformer2DModel.from_single_file(
                    str(path),
                    config=cfg,
                    local_files_only=True,
                    torch_dtype=dtype,
                    quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                )
        except (KeyError, RuntimeError, ValueError) as e:
            raise ModelLoadError(
                f"cannot build the {FAMILY_NAMES[family]} transformer from {path} (GGUF): {type(e).__name__}: {e}"
            ) from e
    _ensure_loaded(model, str(path))
    logger.info(
        "recognised %s in %s (GGUF, dequantised per layer in %s)", describe_transformer(family, config), path, dtype
    )
    return model


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def _safetensors_in(folder: Path, what: str) -> list[Path]:
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}); HairDiff reads only "
                f".safetensors (a pickle can run arbitrary code). Convert them or download the "
                f"safetensors release."
            )
        raise ModelLoadError(f"{folder} has a config.json but no .safetensors {what} weights")
    return weights


def _folder_class(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON ({e})") from e
    return config.get("_class_name") if isinstance(config, dict) else None


def _inspect_transformer_folder(folder: Path) -> tuple[str, dict[str, Any]]:
    cls_name = _folder_class(folder)
    if cls_name not in (None, "SD3Transformer2DModel"):
        raise ModelLoadError(
            f"{folder} holds a {cls_name}, not an SD3Transformer2DModel; HairDiff needs an SD3/SD3.5 transformer"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for weights in _safetensors_in(folder, "transformer"):
        shapes.update(read_shapes(weights))
    # A pipeline's transformer/ folder is named by its parent, e.g. "sd3.5-large-turbo/transformer".
    resolved = folder.resolve()
    hint = f"{resolved.parent.name}/{resolved.name}"
    return identify_transformer(shapes, name_hint=hint, source=str(folder))


def _load_transformer_folder(
    folder: Path, family: str, config: dict[str, Any], dtype: torch.dtype, weights: str = "auto"
):
    from diffusers import SD3Transformer2DModel

    try:
        model = SD3Transformer2DModel.from_pretrained(
            str(folder),
            torch_dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            in_channels=config["in_channels"],
        )
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"cannot load the transformer folder {folder}: {type(e).__name__}: {e}") from e
    _ensure_loaded(model, str(folder))
    from .memory import apply_weights

    apply_weights(model, weights, dtype)
    logger.info("recognised %s in %s", describe_transformer(family, config), folder)
    return model


def load_transformer(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    weights: str = "auto",
) -> tuple[Any, str]:
    """Load an SD3/SD3.5 transformer from a diffusers ``transformer/`` folder or a single file
    (``.safetensors``: bf16/fp16/fp32, plain fp8 or ComfyUI fp8_scaled; ``.gguf`` with the extra).

    ``dtype`` is the compute dtype; ``weights`` (``memory.WEIGHTS``) the storage of the Linear
    weights (``auto``: the file's fp8 format for an fp8 file, else ``dtype``). Returns
    ``(transformer, family)``; the transformer is as stored (16 or 32 input channels).
    """
    p = _check_path(path, "transformer")
    if p.is_dir():
        family, config = _inspect_transformer_folder(p)
        model = _load_transformer_folder(p, family, config, dtype, weights)
    elif _is_gguf(p):
        family, config = identify_transformer(read_gguf_shapes(p), name_hint=p.name, source=str(p))
        model = _load_transformer_gguf(p, family, config, dtype, weights)
    else:
        shapes = read_shapes(p)
        family, config = _inspect_transformer_file(p, shapes)
        model = _load_transformer_file(p, shapes, family, config, dtype, weights)
    return _finish(model, dtype, device), family


# --------------------------------------------------------------------------------------------
# VAE


def _load_vae_file(path: Path, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype):
    from diffusers import AutoencoderKL

    kind, config = identify_vae(shapes, source=str(path))
    layout, prefix = _vae_view(shapes)  # type: ignore[misc]  # identify succeeded
    state = _read_tensors(path, {k[len(prefix) :]: k for k in shapes if k.startswith(prefix)})
    if prefix == "":
        # A bare VAE file's keys all belong to the VAE; anything else would confuse the converter.
        state = {
            k: v for k, v in state.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
        }
    vae = _build_single_file(AutoencoderKL, state, config, dtype, f"the VAE from {path} ({layout} layout)")
    _ensure_loaded(vae, str(path))
    where = f" (under '{prefix}')" if prefix else ""
    logger.info("recognised %s VAE (%s layout) in %s%s", "SD3" if kind == "sd3" else "tiny", layout, path, where)
    return vae


def _load_vae_folder(folder: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    cls_name = _folder_class(folder)
    if cls_name not in (None, "AutoencoderKL"):
        raise ModelLoadError(f"{folder} holds a {cls_name}, not an AutoencoderKL (the SD3 VAE)")
    shapes: dict[str, tuple[int, ...]] = {}
    for weights in _safetensors_in(folder, "VAE"):
        shapes.update(read_shapes(weights))
    kind, _ = identify_vae(shapes, source=str(folder))
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True, use_safetensors=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"cannot load the VAE folder {folder}: {type(e).__name__}: {e}") from e
    _ensure_loaded(vae, str(folder))
    logger.info("recognised %s VAE in %s", "SD3" if kind == "sd3" else "tiny", folder)
    return vae


def load_vae(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the SD3 VAE from a diffusers ``vae/`` folder, a pipeline folder (its ``vae/``), or a
    ``.safetensors`` file (LDM or diffusers layout, bare or under ``first_stage_model.``)."""
    p = _check_path(path, "VAE")
    if p.is_dir():
        if not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
            p = p / "vae"
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is not a diffusers VAE folder (no config.json, no vae/config.json)")
        vae = _load_vae_folder(p, dtype)
    else:
        vae = _load_vae_file(p, read_shapes(p), dtype)
    return _finish(vae, dtype, device)


# --------------------------------------------------------------------------------------------
# Entry point


def load_models(
    model: str | os.PathLike | None = None,
    *,
    vae: str | os.PathLike | None = None,
    tiny: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vae_dtype: torch.dtype | None = None,
    weights: str = "auto",
    toy: bool = False,
) -> LoadedModels:
    """Load the transformer and VAE HairDiff needs, offline.

    ``model``: a diffusers SD3/SD3.5 pipeline folder (``transformer/``, usually ``vae/``), a bare
    ``transformer/`` folder (VAE from ``vae=`` or a sibling ``vae/``), or a single ``.safetensors``
    checkpoint (transformer alone, or with the VAE under ``first_stage_model.``; bundled text
    encoders are ignored). ``vae`` overrides any VAE found with the model. ``tiny=True`` returns
    the built-in tiny model, ``toy=True`` the shipped toy model (:mod:`hairdiff_core.models.toy`, stock:
    its adapter is loaded separately). The transformer comes back as stored: 16 input channels (stock) or
    32 (already widened). ``vae_dtype`` (default: ``dtype``) lets the VAE stay in float32 while
    the transformer is bf16, without a lossy round trip through ``dtype``. ``weights``
    (``memory.WEIGHTS``) stores the transformer's Linear weights in another dtype than the
    compute ``dtype`` (layerwise casting; ``auto``: an fp8 file's own format, else ``dtype``).
    A ``.gguf`` transformer (optional ``gguf`` extra) keeps its quantisation.
    """
    from .memory import apply_weights

    vae_dtype = vae_dtype or dtype
    if toy or tiny:
        name = "toy" if toy else "tiny"
        if model is not None or vae is not None or (toy and tiny):
            others = "model, vae or tiny" if toy else "model or vae"
            raise ModelLoadError(
                f"{name}=True uses the built-in {name} transformer and VAE; do not pass {others} with it"
            )
        if toy:
            from .toy import load_toy_transformer as build_transformer
            from .toy import load_toy_vae as build_vae

            source = "shipped toy model (hairdiff_core/assets/toy)"
        else:
            from .tiny import build_tiny_transformer as build_transformer
            from .tiny import build_tiny_vae as build_vae

            source = "built-in tiny model (hairdiff_core.models.tiny)"
        transformer = _finish(build_transformer(), dtype, device)
        apply_weights(transformer, weights, dtype)
        return LoadedModels(
            transformer=transformer, vae=_finish(build_vae(), vae_dtype, device), family=name, source=source
        )
    if model is None:
        raise ModelLoadError(
            "no model given: pass an SD3/SD3.5 diffusers folder or a .safetensors checkpoint "
            "(e.g. ComfyUI's models/checkpoints/sd3.5_medium.safetensors), or use the tiny model"
        )
    path = _check_path(model, "model")

    # Recognise the transformer and settle where the VAE comes from before reading gigabytes.
    shapes: dict[str, tuple[int, ...]] | None = None
    gguf_shapes: dict[str, tuple[int, ...]] | None = None
    vae_source: tuple[str, Path] | None = None  # ("file"|"folder", path)
    if path.is_dir():
        if (path / "transformer").is_dir():
            transformer_dir = path / "transformer"
            if (path / "vae" / "config.json").is_file():
                vae_source = ("folder", path / "vae")
        elif (path / "config.json").is_file():
            transformer_dir = path
            sibling = path.parent / "vae"
            if (sibling / "config.json").is_file():
                vae_source = ("folder", sibling)
        else:
            raise ModelLoadError(
                f"{path} is not a diffusers model folder: expected a pipeline folder with "
                f"transformer/ (and vae/) or a transformer folder with config.json and "
                f".safetensors weights"
            )
    elif _is_gguf(path):
        transformer_dir = path
        gguf_shapes = read_gguf_shapes(path)
    else:
        transformer_dir = path
        shapes = read_shapes(path)
    if gguf_shapes is not None:
        family, config = identify_transformer(gguf_shapes, name_hint=path.name, source=str(path))
    elif shapes is None:
        family, config = _inspect_transformer_folder(transformer_dir)
    else:
        family, config = _inspect_transformer_file(path, shapes)
        if _vae_view(shapes) is not None:
            vae_source = ("file", path)

    if vae is not None:
        vae_path = _check_path(vae, "VAE")
        if vae_source is not None:
            logger.info("using the VAE from %s instead of the one in %s", vae_path, vae_source[1])
        vae_source = ("given", vae_path)
    if vae_source is None:
        raise ModelLoadError(
            f"no VAE found with {path}: it holds only a transformer. Pass the SD3/SD3.5 VAE "
            f"separately (vae=...: a diffusers vae/ folder or a .safetensors file such as "
            f"ComfyUI's models/vae/sd3_vae.safetensors), or use a checkpoint that includes it."
        )

    # The VAE is small: load it first so its errors come before the long transformer load.
    kind, where = vae_source
    if kind == "file" and shapes is not None:
        vae_model = _load_vae_file(where, shapes, vae_dtype)
        v_desc = "VAE from the same file"
    elif kind == "folder":
        vae_model = _load_vae_folder(where, vae_dtype)
        v_desc = f"VAE folder {where}"
    else:
        vae_model = load_vae(where, dtype=vae_dtype)
        v_desc = f"VAE {where}"

    if gguf_shapes is not None:
        transformer = _load_transformer_gguf(path, family, config, dtype, weights)
        t_desc = f"GGUF file {path}"
    elif shapes is not None:
        transformer = _load_transformer_file(path, shapes, family, config, dtype, weights)
        t_desc = f"single file {path}"
    else:
        transformer = _load_transformer_folder(transformer_dir, family, config, dtype, weights)
        t_desc = f"transformer folder {transformer_dir}"
    return LoadedModels(
        transformer=_finish(transformer, dtype, device),
        vae=_finish(vae_model, vae_dtype, device),
        family=family,
        source=f"{FAMILY_NAMES[family]}: {t_desc}; {v_desc}",
    )
