"""The HairDiff adapter file: one ``.safetensors`` that turns a stock SD3/SD3.5 transformer into
HairDiff's 32-channel, LoRA-tuned model.

Tensors
- ``hairdiff.pos_embed.proj.weight`` (inner, 32, p, p) and ``hairdiff.pos_embed.proj.bias``
  (inner,): the widened patch embedding, all 32 channels (16 image + 16 sketch). Not under
  ``transformer.``: diffusers' ``load_lora_adapter`` loads every ``transformer.*`` key into the
  model, and a 32-channel ``pos_embed.proj`` fails on a stock 16-channel one (size mismatch,
  checked), while keys outside its prefix are skipped. ComfyUI logs them as "lora key not
  loaded" and carries on.
- ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``: the LoRA in diffusers' SD3 format
  (what ``save_lora_weights`` writes), if the transformer has one.
- ``transformer.<module>.alpha`` (float32 scalars), only when alpha != rank: ComfyUI scales a
  LoRA by alpha/rank only when these exist; diffusers ignores them (it reads alpha from the
  header) and still loads the file.

Header (safetensors metadata: string values)
- ``format``: ``"pt"``, as diffusers writes it.
- ``hairdiff``: JSON ``{"format_version", "hairdiff_version", "in_channels", "base_channels",
  "base": {"family", "hash", "dims"}, "lora": {"rank", "alpha", "targets"} | null, ...}`` plus
  the caller's metadata (training step, config, ...) at the top level.
- ``lora_adapter_metadata``: the peft ``LoraConfig`` as JSON, keys prefixed ``transformer.``
  (diffusers' own key, so rank/alpha/targets survive a load by diffusers).

``base.dims`` are the transformer's config values that fix the weights' shapes (independent of
``in_channels`` and of any LoRA); ``base.hash`` is a short hash of them. An adapter loads only
onto a transformer with the same dims; SD3.5 Large and Large Turbo share dims, so either takes
the other's adapter (a warning says so when the patch-embedding image channels differ).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checks import header_field, json_kind
from ..errors import AdapterFileError, AdapterMismatchError, ChannelCountError, HairDiffError, InputError
from ..method.surgery import BASE_CHANNELS, input_channels, widen_input_channels
from .families import ARCH_KEYS, FAMILY_NAMES, transformer_config
from .lora import (
    DEFAULT_ADAPTER_NAME,
    LORA_KEY_PREFIX,
    LORA_METADATA_KEY,
    adapter_names,
    alpha_tensors,
    apply_lora_weights,
    check_lora_weights,
    has_lora,
    is_fused,
    lora_config_of,
    lora_header_metadata,
    lora_state_dict,
    read_safetensors,
    remove_lora,
    split_lora_state,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
HEADER_KEY = "hairdiff"
PATCH_WEIGHT_KEY = "hairdiff.pos_embed.proj.weight"
PATCH_BIAS_KEY = "hairdiff.pos_embed.proj.bias"
#: Config keys that fix an SD3 transformer's weight shapes, apart from in_channels: the same
#: architecture keys model recognition uses.
SIGNATURE_KEYS = ARCH_KEYS
_RESERVED = {"format_version", "hairdiff_version", "in_channels", "base_channels", "base", "lora"}
_KNOWN_FAMILIES = ("sd3.5-large", "sd3.5-medium", "sd3-medium", "tiny", "toy")


# --------------------------------------------------------------------------------------------
# Base signature


def base_signature(transformer) -> dict[str, Any]:
    """The dims of ``transformer`` an adapter depends on (not in_channels, not the LoRA)."""
    return signature_of_config(transformer.config)


def signature_of_config(config) -> dict[str, Any]:
    """``base_signature`` from a transformer config (a diffusers config or a plain mapping, e.g.
    what ``loading.identify_transformer`` reads off another host's weights)."""
    sig: dict[str, Any] = {}
    for key in SIGNATURE_KEYS:
        value = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
        if key == "dual_attention_layers":
            value = sorted(int(v) for v in (value or ()))
        elif key == "out_channels":
            # None means "same as in_channels", which for a stock SD3 transformer is 16.
            value = int(value) if value is not None else BASE_CHANNELS
        elif key == "qk_norm":
            value = None if value is None else str(value)
        else:
            value = int(value)
        sig[key] = value
    return sig


def signature_hash(signature: Mapping[str, Any]) -> str:
    """Short stable hash of a base signature (8 hex digits)."""
    text = json.dumps({k: signature.get(k) for k in SIGNATURE_KEYS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def family_of(signature: Mapping[str, Any]) -> str:
    """The model family with these dims ('sd3.5-large', ..., 'tiny'), or 'custom'."""
    for family in _KNOWN_FAMILIES:
        shipped = transformer_config(family)
        shipped_sig = {
            k: (sorted(shipped.get(k) or ()) if k == "dual_attention_layers" else shipped.get(k))
            for k in SIGNATURE_KEYS
        }
        if all(shipped_sig[k] == signature.get(k) for k in SIGNATURE_KEYS):
            return family
    return "custom"


def _family_name(family: str | None) -> str:
    return FAMILY_NAMES.get(family or "custom", str(family))


def _describe(signature: Mapping[str, Any], family: str | None, digest: str) -> str:
    heads, head_dim = signature.get("num_attention_heads"), signature.get("attention_head_dim")
    inner = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else "?"
    return (
        f"{_family_name(family)} (num_layers={signature.get('num_layers')}, "
        f"{heads} heads x {head_dim} = inner dim {inner}, hash {digest})"
    )


# --------------------------------------------------------------------------------------------
# Saving


def _jsonable(value: Any) -> Any:
    """json.dumps fallback: keep metadata writable whatever the caller passes (never lose an
    adapter at the end of a training run over an odd type)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    logger.warning("adapter metadata: storing %s value as its string form", type(value).__name__)
    return str(value)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from ..fileio import atomic_write

    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def save_adapter(transformer, path: str | os.PathLike, **metadata: Any) -> None:
    """Write the adapter of a widened ``transformer`` to ``path`` (one .safetensors, atomically).

    Stores the patch embedding and the LoRA named "hairdiff" (if any; other adapters, such as
    extra LoRAs loaded for inference, are not saved). ``metadata`` (JSON-able values: training
    step, config, ...) goes into the header; ``family=`` overrides the family name that is
    otherwise recognised from the dims (use it for 'sd3.5-large-turbo').
    """
    from .._version import __version__

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"adapter path must end in .safetensors, got {path.name}")
    clash = sorted(_RESERVED & set(metadata))
    if clash:
        raise InputError(f"adapter metadata keys {clash} are reserved for HairDiff's own header fields; rename them")
    have = input_channels(transformer)
    if have <= BASE_CHANNELS:
        raise ChannelCountError(
            f"this transformer is not widened (its patch embedding takes {have} channels): there is no "
            f"HairDiff adapter to save. Widen it with surgery.widen_input_channels() and train it first."
        )
    signature = base_signature(transformer)
    digest = signature_hash(signature)
    family = metadata.pop("family", None) or family_of(signature)

    proj = transformer.pos_embed.proj
    tensors: dict[str, torch.Tensor] = {PATCH_WEIGHT_KEY: proj.weight.detach().to("cpu").contiguous().clone()}
    if proj.bias is not None:
        tensors[PATCH_BIAS_KEY] = proj.bias.detach().to("cpu").contiguous().clone()
    header = {"format": "pt"}
    lora = None
    if has_lora(transformer, DEFAULT_ADAPTER_NAME):
        config = transformer.peft_config[DEFAULT_ADAPTER_NAME]
        if config.rank_pattern or config.alpha_pattern or config.use_dora or config.use_rslora:
            raise HairDiffError(
                "the 'hairdiff' LoRA uses per-layer ranks/alphas, DoRA or rsLoRA, which the "
                "adapter format does not store; use add_lora() to create it"
            )
        lora = lora_config_of(transformer, DEFAULT_ADAPTER_NAME)
        lora = {"rank": lora["rank"], "alpha": lora["alpha"], "targets": lora["targets"]}
        state = {k: v.to("cpu") for k, v in lora_state_dict(transformer, DEFAULT_ADAPTER_NAME).items()}
        tensors.update(state)
        if float(lora["alpha"]) != float(lora["rank"]):
            tensors.update(alpha_tensors(state, lora["alpha"]))
        header[LORA_METADATA_KEY] = lora_header_metadata(transformer, DEFAULT_ADAPTER_NAME)
    others = [n for n in adapter_names(transformer) if n != DEFAULT_ADAPTER_NAME]
    if others:
        logger.info("save_adapter: not saving the other LoRA adapter(s) %s", others)
    own = {
        "format_version": FORMAT_VERSION,
        "hairdiff_version": __version__,
        "in_channels": have,
        "base_channels": BASE_CHANNELS,
        "base": {"family": family, "hash": digest, "dims": signature},
        "lora": lora,
    }
    own.update(metadata)
    header[HEADER_KEY] = json.dumps(own, sort_keys=True, default=_jsonable)
    _atomic_save(tensors, path, header)
    logger.info(
        "saved HairDiff adapter %s (%d tensors, %s, LoRA %s)",
        path,
        len(tensors),
        _family_name(family),
        "none" if lora is None else f"rank {lora['rank']}",
    )


# --------------------------------------------------------------------------------------------
# Reading


def _parse_header(header: Mapping[str, str], keys: list[str], path: Path) -> dict[str, Any]:
    raw = header.get(HEADER_KEY)
    if raw is None:
        if any(".lora_A." in k or ".lora_down." in k or "lora_unet" in k for k in keys):
            raise AdapterFileError(
                f"{path.name} has no HairDiff metadata: it looks like a plain LoRA, not a HairDiff adapter. "
                f"Load it with the 'HairDiff LoRA' node (or lora.load_lora_file) on top of a HairDiff model."
            )
        raise AdapterFileError(
            f"{path.name} has no HairDiff metadata ('{HEADER_KEY}' header entry): it is not a HairDiff "
            f"adapter (a model checkpoint? a LoRA?). Pick the .safetensors file HairDiff training wrote."
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AdapterFileError(
            f"{path.name}: the HairDiff header is not valid JSON ({exc}); the file is damaged. Re-export the adapter."
        ) from exc
    if not isinstance(meta, dict):
        raise AdapterFileError(f"{path.name}: the HairDiff header is not a JSON object; the file is damaged.")
    fix = "the header was edited or written by another tool; re-export the adapter with save_adapter"

    def field(obj, key, expected, prefix="", required=True):
        return header_field(obj, key, expected, path.name, AdapterFileError, fix, prefix, required)

    version = field(meta, "format_version", "an integer")
    if version < 1:
        raise AdapterFileError(f"{path.name}: HairDiff header has no valid format_version ({version!r}).")
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{path.name} uses adapter format {version}; this HairDiff reads up to format {FORMAT_VERSION}. "
            f"Update HairDiff."
        )
    field(meta, "in_channels", "an integer")
    base = field(meta, "base", "an object")
    dims = field(base, "dims", "an object", "base.")
    for key in SIGNATURE_KEYS:
        kind = {"dual_attention_layers": "a list of integers", "qk_norm": "a string"}.get(key, "an integer")
        # Absent keys are the mismatch check's to report (it names both models' dims); a null
        # qk_norm is a model without q/k norm.
        if not (key == "qk_norm" and dims.get(key) is None):
            field(dims, key, kind, "base.dims.", required=False)
    lora = meta.get("lora")
    if lora is not None:
        if not isinstance(lora, dict):
            raise AdapterFileError(f"{path.name}: header field 'lora' is {json_kind(lora)}, expected an object; {fix}")
        field(lora, "rank", "an integer", "lora.")
        field(lora, "alpha", "a number", "lora.")
        field(lora, "targets", "a list of strings", "lora.")
    return meta


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``hairdiff`` header of an adapter file as a dict (no tensors are read)."""
    keys, header = read_safetensors(path, "adapter file", load_tensors=False)
    return _parse_header(header, list(keys), Path(path))


# --------------------------------------------------------------------------------------------
# Loading


def _check_base(transformer, meta: Mapping[str, Any], path: Path) -> None:
    check_signature(base_signature(transformer), meta, path, "this transformer")


def check_signature(ours: Mapping[str, Any], meta: Mapping[str, Any], path: Path, what: str = "this model") -> None:
    """Refuse an adapter made for other dims than ``ours``, naming both sides and the fix."""
    theirs = meta["base"]["dims"]
    differ = [k for k in SIGNATURE_KEYS if theirs.get(k) != ours.get(k)]
    if not differ:
        return
    digest = signature_hash(ours)
    details = ", ".join(f"{k} {theirs.get(k)!r} vs {ours.get(k)!r}" for k in differ)
    raise AdapterMismatchError(
        f"{path.name} was made for {_describe(theirs, meta['base'].get('family'), meta['base'].get('hash', '?'))}, "
        f"but {what} is {_describe(ours, family_of(ours), digest)}; they differ in {details}. "
        f"Load the base model the adapter was trained on ({_family_name(meta['base'].get('family'))}), or an "
        f"adapter trained for this one."
    )


def _read_checked(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An adapter file's tensors and parsed header, refused when damaged or not float."""
    tensors, header = read_safetensors(p, "adapter file")
    meta = _parse_header(header, list(tensors), p)
    not_float = sorted(k for k, t in tensors.items() if not t.is_floating_point())[:3]
    if not_float:
        raise AdapterFileError(
            f"{p.name}: tensor(s) {not_float} are {tensors[not_float[0]].dtype}, not floating point; a HairDiff "
            f"adapter stores float weights (fp32/bf16/fp16). Re-export it with save_adapter.",
            input="adapter",
        )
    return tensors, meta


def _patch_tensors(
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    base_shape: tuple[int, ...],
    has_bias: bool,
    path: Path,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = tensors.get(PATCH_WEIGHT_KEY)
    bias = tensors.get(PATCH_BIAS_KEY)
    inner, _, kh, kw = base_shape
    want = (inner, meta["in_channels"], kh, kw)
    if weight is None or tuple(weight.shape) != want:
        seen = "missing" if weight is None else f"shape {list(weight.shape)}"
        raise AdapterFileError(
            f"{path.name}: tensor '{PATCH_WEIGHT_KEY}' is {seen}, expected {list(want)}; "
            f"the file is damaged or incomplete. Re-export the adapter."
        )
    if (not has_bias) != (bias is None) or (bias is not None and tuple(bias.shape) != (inner,)):
        seen = "missing" if bias is None else f"shape {list(bias.shape)}"
        raise AdapterFileError(f"{path.name}: tensor '{PATCH_BIAS_KEY}' is {seen}, expected [{inner}]")
    if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise AdapterFileError(
            f"{path.name}: the patch embedding holds NaN/inf values (a diverged training "
            f"run?); use an earlier checkpoint."
        )
    return weight, bias


def _warn_if_base_channels_differ(transformer, weight: torch.Tensor, bias: torch.Tensor | None, path: Path) -> None:
    proj = transformer.pos_embed.proj
    n = BASE_CHANNELS
    mine_w = proj.weight.detach()[:, :n]
    theirs_w = weight[:, :n].to(device=mine_w.device, dtype=mine_w.dtype)
    same = torch.equal(mine_w, theirs_w)
    if bias is not None:
        same = same and torch.equal(proj.bias.detach(), bias.to(device=proj.bias.device, dtype=proj.bias.dtype))
    if not same:
        diff = (mine_w.float() - theirs_w.float()).abs().max().item()
        logger.warning(
            "%s: the adapter's patch-embedding weights for the image latent (channels 0-%d, bias) differ from "
            "this model's (max abs diff %.3g): it was trained with those channels unfrozen, or on another "
            "checkpoint of the same shape (e.g. SD3.5 Large vs Large Turbo). Using the adapter's.",
            path.name,
            n - 1,
            diff,
        )


def load_adapter(transformer, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER_NAME) -> dict[str, Any]:
    """Apply an adapter file to ``transformer`` in place and return its metadata.

    A stock 16-channel transformer is widened first; a widened one is reused. The patch
    embedding's sketch channels come from the file; its image channels and bias too, unless the
    header says they were frozen in training (``base_channels_trained: false``), in which case
    the model keeps its own, and the LoRA is added as ``adapter_name`` (an
    existing adapter of that name is replaced). Everything is checked before the model is
    changed: a missing, damaged or foreign file, or an adapter for other dims, leaves it as it
    was. File and model dtypes may differ (the weights are cast to the model's).
    """
    p = Path(path)
    tensors, meta = _read_checked(p)
    _check_base(transformer, meta, p)
    proj = transformer.pos_embed.proj
    weight, bias = _patch_tensors(tensors, meta, proj.weight.shape, proj.bias is not None, p)
    have, want = input_channels(transformer), meta["in_channels"]
    if have not in (BASE_CHANNELS, want):
        raise ChannelCountError(
            f"{p.name} is for {want} input channels, but this transformer's patch embedding takes {have}; "
            f"load a stock SD3/SD3.5 transformer ({BASE_CHANNELS} channels)."
        )
    if is_fused(transformer):
        raise HairDiffError(
            "cannot load an adapter while a LoRA is fused into the weights; call lora.unfuse_lora() first"
        )
    lora = meta.get("lora")
    lora_keys = {k: v for k, v in tensors.items() if k.startswith(LORA_KEY_PREFIX)}
    own = {k[len(LORA_KEY_PREFIX) :]: v for k, v in lora_keys.items() if not k.endswith(".alpha")}
    if lora is None:
        if own:
            raise AdapterFileError(
                f"{p.name} holds LoRA tensors but its header says it has no LoRA; the file is damaged."
            )
    else:
        # Check the LoRA against this transformer before anything changes (the existing adapter of
        # that name is excluded from the expected layers only by name, so checking now is exact).
        check_lora_weights(transformer, own, rank=lora["rank"], targets=lora["targets"], source=p.name)
        _check_lora_finite(own, p)

    # -- from here on the model changes; nothing below depends on the file's validity --
    # An adapter trained with frozen image channels carries a copy of its base's channels 0-15
    # and bias: this model's own are the right ones (e.g. Large Turbo under a Large adapter).
    keep_base = meta.get("base_channels_trained") is False
    if not keep_base:
        _warn_if_base_channels_differ(transformer, weight, bias, p)
    if have == BASE_CHANNELS:
        widen_input_channels(transformer, want - BASE_CHANNELS)
    proj = transformer.pos_embed.proj
    with torch.no_grad():
        if keep_base:
            proj.weight[:, BASE_CHANNELS:].copy_(
                weight[:, BASE_CHANNELS:].to(device=proj.weight.device, dtype=proj.weight.dtype)
            )
        else:
            proj.weight.copy_(weight.to(device=proj.weight.device, dtype=proj.weight.dtype))
            if bias is not None:
                proj.bias.copy_(bias.to(device=proj.bias.device, dtype=proj.bias.dtype))
    if has_lora(transformer, adapter_name):
        logger.info("replacing the LoRA '%s' already on the transformer with %s", adapter_name, p.name)
        remove_lora(transformer, adapter_name)
    if lora is not None:
        apply_lora_weights(
            transformer,
            own,
            rank=lora["rank"],
            alpha=lora["alpha"],
            targets=lora["targets"],
            adapter_name=adapter_name,
            source=p.name,
        )
        for name, param in transformer.named_parameters():
            if f".{adapter_name}." in name and ".lora_" in name:
                param.requires_grad_(False)
    logger.info(
        "loaded HairDiff adapter %s (%s, %d input channels, LoRA %s)",
        p.name,
        _family_name(meta["base"].get("family")),
        want,
        "none" if lora is None else f"rank {lora['rank']} alpha {lora['alpha']}",
    )
    return meta


def _check_lora_finite(own: Mapping[str, torch.Tensor], p: Path) -> None:
    modules, _ = split_lora_state(own)
    if not all(torch.isfinite(t).all() for pair in modules.values() for t in pair.values()):
        raise AdapterFileError(
            f"{p.name}: the LoRA holds NaN/inf values (a diverged training run?); use an earlier checkpoint."
        )


# --------------------------------------------------------------------------------------------
# Another host's model (ComfyUI's MMDiT): the file read and checked here, applied by the host


@dataclass(frozen=True)
class AdapterFile:
    """An adapter file read and checked against a base, for a host that applies it itself.

    ``lora`` holds the LoRA tensors under their file keys (``transformer.<module>.lora_A.weight``,
    ``.alpha``: diffusers' SD3 format), ``keep_base`` is True when training froze the image
    channels (the base's own channels 0-15 and bias are then the right ones)."""

    path: Path
    meta: dict[str, Any]
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora: dict[str, torch.Tensor]
    keep_base: bool

    @property
    def in_channels(self) -> int:
        return int(self.meta["in_channels"])


def read_adapter(
    path: str | os.PathLike,
    signature: Mapping[str, Any],
    patch_shape: tuple[int, ...],
    has_bias: bool = True,
    what: str = "this model",
) -> AdapterFile:
    """Read an adapter file and check it against a base model given by its dims.

    Args:
        path: the adapter ``.safetensors``.
        signature: the base's ``signature_of_config`` (its dims).
        patch_shape: the base's patch-embedding weight shape (inner, 16, p, p).
        has_bias: whether the base's patch embedding has a bias.
        what: how messages name the base (e.g. "the connected MODEL").

    Raises ``AdapterFileError`` for a damaged or foreign file and ``AdapterMismatchError`` for an
    adapter made for other dims, naming both sides.
    """
    p = Path(path)
    tensors, meta = _read_checked(p)
    check_signature(signature, meta, p, what)
    weight, bias = _patch_tensors(tensors, meta, tuple(patch_shape), has_bias, p)
    lora = {k: v for k, v in tensors.items() if k.startswith(LORA_KEY_PREFIX)}
    own = {k[len(LORA_KEY_PREFIX) :]: v for k, v in lora.items() if not k.endswith(".alpha")}
    if meta.get("lora") is None and own:
        raise AdapterFileError(f"{p.name} holds LoRA tensors but its header says it has no LoRA; the file is damaged.")
    _check_lora_finite(own, p)
    return AdapterFile(p, meta, weight, bias, lora, keep_base=meta.get("base_channels_trained") is False)


def patch_embedding(
    base_weight: torch.Tensor, base_bias: torch.Tensor | None, adapter: AdapterFile, strength: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The widened patch embedding (weight (inner, C, p, p), bias) for ``adapter`` on a base.

    ``strength`` moves from the base (0: channels 0-15 and bias the base's, the sketch channels
    zero: the base model's output exactly) to the adapter (1: the adapter's tensors exactly),
    like a LoRA strength. Returned in the base's dtype and device.
    """
    n = base_weight.shape[1]
    dtype, device = base_weight.dtype, base_weight.device
    base_w = base_weight.detach().float()
    theirs = adapter.weight.detach().float().to(device)
    s = float(strength)
    image = base_w if adapter.keep_base else torch.lerp(base_w, theirs[:, :n], s)
    sketch = theirs[:, n:] * s if s != 1.0 else theirs[:, n:]
    weight = torch.cat([image, sketch], dim=1).to(dtype)
    if base_bias is None:
        return weight, None
    base_b = base_bias.detach().float()
    if adapter.keep_base or adapter.bias is None:
        bias = base_b
    else:
        bias = torch.lerp(base_b, adapter.bias.detach().float().to(device), s)
    return weight, bias.to(base_bias.dtype)
