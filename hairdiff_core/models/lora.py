"""LoRA on the SD3 transformer through peft: add, scale, fuse/unfuse, export, load extra files.

HairDiff's own LoRA lives under the adapter name ``"hairdiff"``; extra LoRAs (``load_lora_file``)
get their own names and stay active beside it. diffusers' ``add_adapter`` activates *only* the
new adapter, so every function here that adds or removes one re-activates the others.

State-dict keys are diffusers' SD3 LoRA format, ``transformer.<module>.lora_A.weight`` /
``.lora_B.weight`` (what ``StableDiffusion3Pipeline.save_lora_weights`` writes): diffusers'
``load_lora_adapter`` and ComfyUI's ``LoraLoaderModelOnly`` read them.

Scales: the effective LoRA factor of a layer is ``scale * alpha / rank``. ``set_lora_scale(0)``
gives exactly the base model's outputs (the LoRA term is multiplied by 0.0 and added).
Fusing merges ``W += scale * (alpha/rank) * B @ A`` into the base weights; unfusing subtracts
the same product again, which is exact up to float rounding (~1e-7 in float32, visibly lossy in
bfloat16), so keep an unfused copy if bit-exact outputs matter.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFileError, HairDiffError, InputError

logger = logging.getLogger(__name__)

#: Attention projections HairDiff adapts by default. peft matches names by suffix, so on
#: SD3.5 Medium these also adapt the dual-attention ``attn2`` projections.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_ADAPTER_NAME = "hairdiff"
DEFAULT_RANK = 16
#: Key prefix of the transformer's LoRA weights in diffusers' SD3 LoRA files.
LORA_KEY_PREFIX = "transformer."
#: diffusers' safetensors header key holding the peft ``LoraConfig`` as JSON.
LORA_METADATA_KEY = "lora_adapter_metadata"

_INITS = {"gaussian": "gaussian", "default": True}
_ADAPTER_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LORA_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
#: Prefixes LoRA files put before the diffusers module path of the transformer: diffusers,
#: peft, ComfyUI/original-SD3 layouts. The core's loader and the ComfyUI LoRA node read the same list.
LORA_KEY_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.", "model.diffusion_model.")


# --------------------------------------------------------------------------------------------
# Introspection


def _lora_layers(transformer: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.lora.layer import LoraLayer

    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_names(transformer: torch.nn.Module) -> list[str]:
    """Names of the LoRA adapters on ``transformer`` (in the order they were added)."""
    return list(getattr(transformer, "peft_config", None) or {})


def has_lora(transformer: torch.nn.Module, adapter_name: str | None = None) -> bool:
    """True if ``transformer`` carries a LoRA (named ``adapter_name``, or any when None)."""
    names = adapter_names(transformer)
    return bool(names) if adapter_name is None else adapter_name in names


def is_fused(transformer: torch.nn.Module) -> bool:
    """True if some LoRA is currently merged into the base weights (``fuse_lora``)."""
    return any(layer.merged for _, layer in _lora_layers(transformer))


def active_adapters(transformer: torch.nn.Module) -> list[str]:
    for _, layer in _lora_layers(transformer):
        return list(layer.active_adapters)
    return []


def lora_config_of(transformer: torch.nn.Module, adapter_name: str = DEFAULT_ADAPTER_NAME) -> dict | None:
    """``{"rank", "alpha", "targets", "init"}`` of an adapter, or None if there is none.

    ``alpha`` is an int when it is whole (as peft stores it for ``alpha=None``), else a float.
    """
    config = (getattr(transformer, "peft_config", None) or {}).get(adapter_name)
    if config is None:
        return None
    targets = config.target_modules
    if isinstance(targets, str):
        targets = [targets]
    alpha = config.lora_alpha
    if isinstance(alpha, float) and alpha.is_integer():
        alpha = int(alpha)
    init = config.init_lora_weights
    return {
        "rank": int(config.r),
        "alpha": alpha,
        "targets": sorted(targets or ()),
        "init": "default" if init is True else init,
    }


def get_lora_scale(transformer: torch.nn.Module, adapter_name: str = DEFAULT_ADAPTER_NAME) -> float:
    """The scale last set by ``set_lora_scale`` (1.0 after ``add_lora``)."""
    _require_adapter(transformer, adapter_name, "read the scale of")
    for _, layer in _lora_layers(transformer):
        if adapter_name in layer.scaling:
            base = layer.lora_alpha[adapter_name] / layer.r[adapter_name]
            return float(layer.scaling[adapter_name] / base)
    return 1.0


def _require_adapter(transformer: torch.nn.Module, adapter_name: str, verb: str) -> None:
    if not has_lora(transformer, adapter_name):
        have = adapter_names(transformer)
        raise HairDiffError(
            f"cannot {verb} LoRA '{adapter_name}': the transformer has "
            + (f"only the LoRA adapters {have}" if have else "no LoRA")
            + ". Add one with add_lora() or load an adapter file first."
        )


def _require_unfused(transformer: torch.nn.Module, action: str) -> None:
    if is_fused(transformer):
        raise HairDiffError(f"cannot {action} while a LoRA is fused into the base weights; call unfuse_lora() first")


def _target_modules(transformer: torch.nn.Module, targets: Iterable[str], strict: bool = False) -> list[str]:
    """Names of the Linear layers peft would adapt for ``targets`` (its suffix rule)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = tuple(targets)
    found = []
    for name, module in transformer.named_modules():
        if name.endswith(".base_layer") or ".lora_" in name:
            continue
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, torch.nn.Linear):
            found.append(name)
        elif not strict:
            continue
        elif isinstance(base, torch.nn.Module) and any(True for _ in base.parameters(recurse=False)):
            # A LoRA on e.g. pos_embed.proj would hide the widened patch conv from the adapter file.
            raise InputError(
                f"LoRA target {name} is a {type(base).__name__}; HairDiff LoRAs adapt Linear "
                f"layers only (attention projections such as {list(DEFAULT_LORA_TARGETS)})"
            )
    return found


def _activate(transformer: torch.nn.Module, names: Sequence[str]) -> None:
    """Make exactly ``names`` active without touching ``requires_grad`` (peft's set_adapter does)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not names:
        return
    for _, module in transformer.named_modules():
        if isinstance(module, BaseTunerLayer):
            flags = [(p, p.requires_grad) for p in module.parameters()]
            present = [n for n in names if n in getattr(module, "lora_A", {})]
            module.set_adapter(present or list(names))
            for p, flag in flags:
                p.requires_grad_(flag)


# --------------------------------------------------------------------------------------------
# Adding, scaling, fusing, removing


def _validate_lora_args(rank: Any, alpha: Any, targets: Any, adapter_name: Any) -> tuple[int, float, list[str]]:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"LoRA rank must be a positive integer, got {rank!r}")
    if alpha is None:
        alpha = rank
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or alpha != alpha:
        raise InputError(f"LoRA alpha must be a positive number (or None for alpha = rank), got {alpha!r}")
    if isinstance(targets, str):
        targets = [targets]
    targets = [str(t) for t in targets]
    if not targets or any(not t for t in targets):
        raise InputError(
            f"LoRA targets must be non-empty module names such as {list(DEFAULT_LORA_TARGETS)}, got {targets!r}"
        )
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME_RE.match(adapter_name):
        raise InputError(
            f"adapter name must be letters, digits and '_' (peft stores it as a module name), got {adapter_name!r}"
        )
    return rank, alpha, targets


def _inject(transformer: torch.nn.Module, adapter_name: str, config) -> None:
    """``add_adapter`` + keep the previously active adapters active."""
    before = active_adapters(transformer)
    with warnings.catch_warnings():
        # Several adapters on one model is the design here (HairDiff's + extra LoRAs).
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        transformer.add_adapter(config, adapter_name=adapter_name)
    _activate(transformer, [n for n in before if n != adapter_name] + [adapter_name])


def _lora_in_compute_dtype(transformer: torch.nn.Module, adapter_name: str) -> None:
    # peft gives a new LoRA its base layer's dtype; weights stored in fp8 (layerwise casting) or
    # quantised (GGUF) are no dtype to hold a LoRA in: it takes the compute dtype instead.
    from .memory import lora_compute_dtype

    for _, layer in _lora_layers(transformer):
        dtype = lora_compute_dtype(transformer, layer.get_base_layer().weight)
        if dtype is not None and adapter_name in layer.lora_A:
            layer.lora_A[adapter_name].to(dtype=dtype)
            layer.lora_B[adapter_name].to(dtype=dtype)


def add_lora(
    transformer: torch.nn.Module,
    rank: int = DEFAULT_RANK,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_LORA_TARGETS,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    init: str = "gaussian",
) -> None:
    """Add a peft LoRA to ``transformer`` in place (alpha None = rank, i.e. factor 1).

    ``init="gaussian"`` (A ~ N(0, 1/rank), B = 0) or ``"default"`` (peft's Kaiming A, B = 0):
    both start with B = 0, so the model's outputs are unchanged until training moves B. LoRA
    weights take the dtype and device of the layers they wrap (bf16 on a bf16 model). Other
    adapters already on the model stay active.
    """
    from peft import LoraConfig

    rank, alpha, targets = _validate_lora_args(rank, alpha, targets, adapter_name)
    if init not in _INITS:
        raise InputError(f"unknown LoRA init {init!r}; use one of {sorted(_INITS)}")
    if has_lora(transformer, adapter_name):
        raise HairDiffError(
            f"the transformer already has a LoRA named '{adapter_name}'; remove it with "
            f"remove_lora(transformer, '{adapter_name}') or pick another adapter_name"
        )
    _require_unfused(transformer, "add a LoRA")
    if not _target_modules(transformer, targets, strict=True):
        raise InputError(
            f"no Linear layer of this transformer matches the LoRA targets {targets}; SD3 attention "
            f"projections are named e.g. {list(DEFAULT_LORA_TARGETS)}, 'add_q_proj', 'to_add_out'"
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights=_INITS[init],
        target_modules=list(targets),
        lora_dropout=0.0,
    )
    _inject(transformer, adapter_name, config)
    _lora_in_compute_dtype(transformer, adapter_name)
    logger.debug("added LoRA '%s' rank %d alpha %s on %s", adapter_name, rank, alpha, targets)


def set_lora_scale(transformer: torch.nn.Module, scale: float, adapter_name: str = DEFAULT_ADAPTER_NAME) -> None:
    """Scale one adapter's contribution (1 = as trained, 0 = exactly the base model); activates it."""
    _require_adapter(transformer, adapter_name, "scale")
    scale = float(scale)
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise InputError(f"LoRA scale must be a finite number, got {scale}")
    _require_unfused(transformer, "change a LoRA scale")
    for _, layer in _lora_layers(transformer):
        layer.set_scale(adapter_name, scale)
    active = active_adapters(transformer)
    if adapter_name not in active:
        _activate(transformer, active + [adapter_name])


def fuse_lora(transformer: torch.nn.Module, scale: float = 1.0) -> None:
    """Merge the active LoRAs (times ``scale``, on top of their own scales) into the base weights.

    Forward passes then cost what the base model costs. ``unfuse_lora`` undoes it. diffusers'
    own ``fuse_lora(lora_scale=s)`` leaves the layers' scales multiplied by ``s`` afterwards;
    here they are restored on unfuse.
    """
    if not has_lora(transformer):
        raise HairDiffError("cannot fuse: the transformer has no LoRA")
    if is_fused(transformer):
        raise HairDiffError("a LoRA is already fused; call unfuse_lora() before fusing again")
    scale = float(scale)
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise InputError(f"fuse scale must be a finite number, got {scale}")
    for _, layer in _lora_layers(transformer):
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if not active:
            continue
        layer._hairdiff_prefuse_scaling = dict(layer.scaling)
        for a in active:
            layer.scaling[a] = layer.scaling[a] * scale
        layer.merge(adapter_names=active)


def unfuse_lora(transformer: torch.nn.Module) -> None:
    """Subtract fused LoRAs from the base weights again and restore their scales (no-op if none)."""
    for _, layer in _lora_layers(transformer):
        if layer.merged:
            layer.unmerge()
        saved = getattr(layer, "_hairdiff_prefuse_scaling", None)
        if saved is not None:
            layer.scaling.update(saved)
            del layer._hairdiff_prefuse_scaling


def remove_lora(transformer: torch.nn.Module, adapter_name: str = DEFAULT_ADAPTER_NAME) -> None:
    """Delete one adapter; when none is left the peft wrappers go too (a plain model again)."""
    _require_adapter(transformer, adapter_name, "remove")
    _require_unfused(transformer, "remove a LoRA")
    keep = [n for n in active_adapters(transformer) if n != adapter_name]
    transformer.delete_adapters(adapter_name)
    if not adapter_names(transformer):
        transformer.unload_lora()
        transformer._hf_peft_config_loaded = False
    else:
        _activate(transformer, keep or adapter_names(transformer))


# --------------------------------------------------------------------------------------------
# State dicts


def lora_state_dict(transformer: torch.nn.Module, adapter_name: str = DEFAULT_ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers SD3 keys (``transformer.<module>.lora_A.weight``).

    Tensors are detached contiguous copies in their own dtype (fp32 if the trainer keeps the
    LoRA in fp32 on a bf16 model).
    """
    from peft.utils import get_peft_model_state_dict

    _require_adapter(transformer, adapter_name, "export")
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return {LORA_KEY_PREFIX + k: v.detach().contiguous().clone() for k, v in state.items()}


def lora_header_metadata(transformer: torch.nn.Module, adapter_name: str = DEFAULT_ADAPTER_NAME) -> str:
    """The ``lora_adapter_metadata`` header value diffusers' ``save_lora_weights`` writes:
    the peft ``LoraConfig`` as JSON with keys prefixed ``transformer.``."""
    _require_adapter(transformer, adapter_name, "describe")
    raw = transformer.peft_config[adapter_name].to_dict()
    packed = {}
    for key, value in raw.items():
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        packed[LORA_KEY_PREFIX + key] = value
    return json.dumps(packed, indent=2, sort_keys=True, default=str)


def alpha_tensors(state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """ComfyUI-style ``<module>.alpha`` scalars for every LoRA module in ``state``.

    ComfyUI scales a LoRA by ``alpha / rank`` only when these exist (1.0 otherwise); diffusers'
    ``load_lora_adapter`` ignores them and reads alpha from the header metadata.
    """
    out = {}
    for key in state:
        m = _LORA_KEY_RE.match(key)
        if m and m.group("kind") == "lora_A":
            out[f"{m.group('module')}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def split_lora_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group ``<module>.lora_A/B.weight`` by module; return (modules, other keys)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, value in state.items():
        m = _LORA_KEY_RE.match(key)
        if m:
            modules.setdefault(m.group("module"), {})[m.group("kind")] = value
        else:
            other.append(key)
    return modules, other


def _check_module_weights(
    transformer: torch.nn.Module, modules: Mapping[str, Mapping[str, torch.Tensor]], source: str
) -> dict[str, int]:
    """Validate file LoRA tensors against the transformer's layers; return module -> rank."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    named = dict(transformer.named_modules())
    ranks = {}
    problems = []
    for module_name, pair in sorted(modules.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            problems.append(f"{module_name}: has only {sorted(pair)}")
            continue
        a, b = pair["lora_A"], pair["lora_B"]
        layer = named.get(module_name)
        base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
        if not isinstance(base, torch.nn.Linear):
            problems.append(f"{module_name}: no such Linear layer in this transformer")
            continue
        if (
            a.ndim != 2
            or b.ndim != 2
            or a.shape[0] != b.shape[1]
            or a.shape[1] != base.in_features
            or b.shape[0] != base.out_features
        ):
            problems.append(
                f"{module_name}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit a "
                f"{base.in_features}->{base.out_features} layer"
            )
            continue
        ranks[module_name] = int(a.shape[0])
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise AdapterFileError(
            f"the LoRA weights in {source} do not fit this transformer: "
            + "; ".join(problems[:5])
            + more
            + ". The LoRA was made for another model; use one made for this base model."
        )
    return ranks


def _copy_weights(
    transformer: torch.nn.Module, adapter_name: str, modules: Mapping[str, Mapping[str, torch.Tensor]]
) -> None:
    named = dict(transformer.named_modules())
    with torch.no_grad():
        for module_name, pair in modules.items():
            layer = named[module_name]
            for kind in ("lora_A", "lora_B"):
                param = getattr(layer, kind)[adapter_name].weight
                # The file may be fp32 and the model bf16 (or the reverse): cast, never refuse.
                param.copy_(pair[kind].to(device=param.device, dtype=param.dtype))


def check_lora_weights(
    transformer: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    rank: int,
    targets: Sequence[str],
    source: str,
) -> dict[str, dict[str, torch.Tensor]]:
    """Check LoRA tensors (module keys, no prefix) against rank/targets and the transformer.

    Strict: A and B for exactly the layers the targets select, all of the given rank, shapes
    fitting the layers. Returns the tensors grouped by module. Touches nothing.
    """
    modules, other = split_lora_state(state)
    if other:
        raise AdapterFileError(
            f"{source} has unexpected LoRA tensors {other[:3]}; expected only "
            f"'<module>.lora_A.weight' / '.lora_B.weight'"
        )
    ranks = _check_module_weights(transformer, modules, source)
    expected = set(_target_modules(transformer, targets))
    missing, extra = sorted(expected - set(modules)), sorted(set(modules) - expected)
    wrong_rank = sorted(m for m, r in ranks.items() if r != rank)
    if missing or extra or wrong_rank:
        parts = []
        if missing:
            parts.append(f"{len(missing)} targeted layer(s) have no weights (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} layer(s) are not among the targets {list(targets)} (e.g. {extra[0]})")
        if wrong_rank:
            parts.append(f"layer {wrong_rank[0]} has rank {ranks[wrong_rank[0]]}, the header says {rank}")
        raise AdapterFileError(
            f"{source}: LoRA weights and header disagree: "
            + "; ".join(parts)
            + ". The file is damaged or was edited; re-export it."
        )
    return modules


def apply_lora_weights(
    transformer: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    adapter_name: str,
    source: str,
) -> None:
    """Add a LoRA with the given rank/alpha/targets and load ``state`` into it (checked first)."""
    modules = check_lora_weights(transformer, state, rank=rank, targets=targets, source=source)
    add_lora(transformer, rank=rank, alpha=alpha, targets=targets, adapter_name=adapter_name)
    _copy_weights(transformer, adapter_name, modules)


# --------------------------------------------------------------------------------------------
# Extra LoRA files (diffusers / peft format)


def _strip_prefix(keys: Iterable[str]) -> str:
    keys = list(keys)
    for prefix in LORA_KEY_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def _adapter_name_from(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", path.stem) or "lora"
    return name if _ADAPTER_NAME_RE.match(name) else f"lora_{name}"


def _checked_path(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if p.is_dir():
        raise AdapterFileError(f"{what} must be a .safetensors file, got the folder {p}")
    from ..fileio import check_input_path

    check_input_path(p, what)
    if p.suffix.lower() != ".safetensors":
        raise AdapterFileError(
            f"{what} {p.name} is not a .safetensors file; HairDiff reads only safetensors (pickled "
            f".ckpt/.pt/.bin files can run code when loaded). Convert it to safetensors first."
        )
    return p


def _unreadable(what: str, p: Path, exc: BaseException) -> AdapterFileError:
    return AdapterFileError(
        f"{what} {p} cannot be read as safetensors ({exc}); the file is corrupted or truncated "
        f"(an interrupted download or copy?). Copy it again."
    )


def read_safetensors(
    path: str | os.PathLike, what: str, *, load_tensors: bool = True
) -> tuple[dict[str, torch.Tensor | None], dict[str, str]]:
    """All tensors (or, with ``load_tensors=False``, just their names mapped to None) and the
    header metadata of a safetensors file; HairDiff errors for a wrong or damaged file."""
    from safetensors import SafetensorError, safe_open

    p = _checked_path(path, what)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            keys = list(f.keys())
            tensors = {k: (f.get_tensor(k) if load_tensors else None) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(what, p, exc) from exc
    return tensors, header


#: Fields of diffusers' LoRA header that loading reads, and what each must be.
_LORA_HEADER_FIELDS = {
    "r": "an integer",
    "lora_alpha": "a number",
    "alpha_pattern": "an object",
    "use_rslora": "true or false",
}


def _parse_lora_header(header: Mapping[str, str], prefix: str, source: str = "LoRA file") -> dict[str, Any]:
    from ..checks import HEADER_KINDS, header_field

    raw = header.get(LORA_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable %s header entry", LORA_METADATA_KEY)
        return {}
    if not isinstance(data, dict):
        return {}
    if prefix and any(k.startswith(prefix) for k in data):
        data = {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}
    # A rank "16" (a string) would pass int() here and a "sixteen" end in a traceback: the type
    # is checked, and named, as the adapter header's is.
    fix = f"its '{LORA_METADATA_KEY}' header entry was edited or written by another tool; re-save the LoRA"
    for key, expected in _LORA_HEADER_FIELDS.items():
        if data.get(key) is not None:
            header_field(data, key, expected, source, AdapterFileError, fix, f"{LORA_METADATA_KEY}.")
    for pattern, value in (data.get("alpha_pattern") or {}).items():
        if not HEADER_KINDS["a number"](value):
            header_field({pattern: value}, pattern, "a number", source, AdapterFileError, fix, "alpha_pattern.")
    return data


def load_lora_file(
    transformer: torch.nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    scale: float = 1.0,
) -> str:
    """Add an extra LoRA from a diffusers/peft-format SD3 ``.safetensors`` file; return its name.

    Keys may carry ``transformer.`` (diffusers), ``base_model.model.`` (peft) or no prefix.
    Rank and alpha come from diffusers' ``lora_adapter_metadata`` header when present, else
    from ComfyUI-style ``<module>.alpha`` tensors, else alpha = rank. The adapter name defaults
    to the file's stem (sanitised). Other adapters (the HairDiff one) stay active.
    """
    p = Path(path)
    tensors, header = read_safetensors(p, "LoRA file")
    if "hairdiff" in header:
        raise AdapterFileError(
            f"{p.name} is a HairDiff adapter (LoRA + sketch channels), not a plain LoRA; load it with "
            f"load_adapter() (CLI: --adapter; ComfyUI: HairDiff Apply Adapter)"
        )
    name = adapter_name or _adapter_name_from(p)
    _validate_lora_args(1, None, ["x"], name)
    if has_lora(transformer, name):
        raise HairDiffError(
            f"the transformer already has a LoRA named '{name}'; pass another adapter_name "
            f"or remove_lora(transformer, '{name}') first"
        )
    prefix = _strip_prefix(tensors)
    own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if len(own) < len(tensors):
        skipped = sorted(k for k in tensors if not k.startswith(prefix))
        logger.warning(
            "%s: ignoring %d tensor(s) outside the transformer (e.g. text-encoder LoRA %s)",
            p.name,
            len(skipped),
            skipped[0],
        )
    alphas = {
        k[: -len(".alpha")]: float(v.float().item()) for k, v in own.items() if k.endswith(".alpha") and v.numel() == 1
    }
    modules, other = split_lora_state(own)
    if any("dora" in k or "magnitude" in k for k in other):
        raise AdapterFileError(f"{p.name} is a DoRA; only plain LoRA files are supported")
    if not modules:
        sample = ", ".join(sorted(tensors)[:3]) or "no tensors"
        raise AdapterFileError(
            f"{p.name} has no diffusers/peft-format LoRA weights ('<module>.lora_A.weight'); its keys look "
            f"like: {sample}. Original-format (kohya/ComfyUI 'joint_blocks...') SD3 LoRAs are not converted; "
            f"load them with ComfyUI's own LoRA loader."
        )
    ignored = [k for k in other if not k.endswith(".alpha")]
    if ignored:
        logger.warning("%s: ignoring %d non-LoRA tensor(s), e.g. %s", p.name, len(ignored), ignored[0])
    ranks = _check_module_weights(transformer, modules, p.name)
    meta = _parse_lora_header(header, LORA_KEY_PREFIX, p.name)
    rank = int(meta.get("r") or Counter(ranks.values()).most_common(1)[0][0])
    if "lora_alpha" in meta:
        alpha_of = {m: float(meta["lora_alpha"]) for m in ranks}
        for pattern, value in (meta.get("alpha_pattern") or {}).items():
            for m in ranks:
                if re.match(rf"(.*\.)?({pattern})$", m):
                    alpha_of[m] = float(value)
    else:
        alpha_of = {m: alphas.get(m, float(r)) for m, r in ranks.items()}
    alpha = Counter(alpha_of.values()).most_common(1)[0][0]
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(ranks),
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(m): a for m, a in alpha_of.items() if a != alpha},
        use_rslora=bool(meta.get("use_rslora", False)),
        lora_dropout=0.0,
    )
    _require_unfused(transformer, "add a LoRA")
    _inject(transformer, name, config)
    _copy_weights(transformer, name, modules)
    for param_name, param in transformer.named_parameters():
        if f".{name}." in param_name and ".lora_" in param_name:
            param.requires_grad_(False)
    set_lora_scale(transformer, scale, name)
    logger.info(
        "loaded LoRA %s as '%s': %d layers, rank %d, alpha %s, scale %s", p.name, name, len(ranks), rank, alpha, scale
    )
    return name
