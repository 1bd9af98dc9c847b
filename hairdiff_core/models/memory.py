"""SD3.5 on small GPUs: weight storage precision, block offloading, and the peak-memory estimate.

Three knobs, one place:

* ``weights`` (``auto``, ``bf16``, ``fp16``, ``fp8_e4m3fn``, ``fp8_e5m2``): the dtype the
  transformer's Linear weights are *stored* in. Computation stays in the compute dtype (bf16 on
  GPUs): each Linear becomes a ``StoredLinear`` that upcasts its weight inside its forward
  (diffusers' layerwise casting, with the cast in the matmul so ``torch.compile`` traces it),
  so one layer's compute copy exists at a time. The patch embedding (HairDiff's widened
  32-channel input), the final projection and its modulation, every norm and every LoRA layer
  stay in the compute dtype.
  The blocks' adaLN modulation Linears are stored in fp8 too: they are a third of SD3.5's
  weights, and ComfyUI's own fp8 files store them so.
* ``offload`` (``auto``, ``none``, ``model``, ``blocks``): ``blocks`` keeps the transformer
  blocks on the CPU and moves each one to the GPU for its forward (diffusers' group offloading,
  one block per group, the next block prefetched on a CUDA stream); ``model`` keeps the whole
  transformer on the GPU while sampling and gives it back afterwards.
* ``estimate_peak_vram``: what a setting needs on the GPU for one sampling call, counting the
  resident weights, the upcast or prefetched layer, activations, and reference attention's K/V
  cache and bias. ComfyUI's node hands it to ComfyUI's memory management; ``auto`` picks from it.
"""

from __future__ import annotations

import logging
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import HairDiffError, InputError
from .families import FAMILY_NAMES, transformer_config

logger = logging.getLogger(__name__)

WEIGHTS = ("auto", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2")
OFFLOADS = ("auto", "none", "model", "blocks")
REFERENCE_MODES = ("off", "once", "per_step")

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

#: Module-name patterns (``re.search`` on names relative to the transformer) that layerwise
#: casting leaves in the compute dtype. Only Linear/Conv layers are ever cast; norms have no
#: Linear, so their weights stay as they are.
KEEP_IN_COMPUTE = ("pos_embed", "^proj_out$", "^norm_out", r"(^|\.)lora_")

#: Bytes per weight of GGUF quantisations (block size 32 or 256 with its scales).
GGUF_BYTES_PER_WEIGHT = {
    "Q8_0": 34 / 32,
    "Q6_K": 210 / 256,
    "Q5_K": 176 / 256,
    "Q5_0": 22 / 32,
    "Q4_K": 144 / 256,
    "Q4_0": 18 / 32,
    "Q3_K": 110 / 256,
    "Q2_K": 84 / 256,
}

#: Text tokens SD3 sees with real prompts (CLIP 77 + T5 256); zero text uses fewer.
SD3_TEXT_TOKENS = 333
#: Live activation tensors of one block's forward, in units of (batch x tokens x hidden): the
#: residual, the modulated input, q/k/v, the attention output and two 4x-wide MLP tensors.
ACTIVATION_FACTOR = 14
#: Modules diffusers' group offloading streams, per family attribute name.
BLOCK_LISTS = ("transformer_blocks",)


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weights_name(dtype: torch.dtype) -> str:
    """'bf16' for torch.bfloat16 etc.; 'fp32' for float32."""
    for name, d in STORAGE_DTYPES.items():
        if d == dtype:
            return name
    if dtype == torch.float32:
        return "fp32"
    raise InputError(f"no weights option for {dtype}")


def check_weights(weights: str) -> str:
    if weights not in WEIGHTS:
        raise InputError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}", input="weights")
    return weights


def check_offload(offload: str) -> str:
    if offload not in OFFLOADS:
        raise InputError(f"unknown offload {offload!r}; choose one of {', '.join(OFFLOADS)}", input="offload")
    return offload


def storage_dtype(weights: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of a concrete ``weights`` option (``auto`` = the compute dtype)."""
    check_weights(weights)
    return compute_dtype if weights == "auto" else STORAGE_DTYPES[weights]


# --------------------------------------------------------------------------------------------
# Layerwise casting


class StoredLinear(torch.nn.Linear):
    """A Linear whose weights rest in ``storage_dtype`` and are upcast into its matmul.

    ``apply_weights`` turns the transformer's Linears into this class in place (their weights
    converted, nothing else changed). diffusers' layerwise-casting hook converts the module
    itself before and after each forward instead: that rebuilds its Parameters twice per call,
    which dynamo cannot trace (every Linear split a compiled block: 43 graph breaks and no
    speedup in bench_compile --weights fp8_e4m3fn), and a hook is a per-module ``forward`` object
    that compiled blocks guard on by identity (one recompilation per block, past dynamo's limit
    of 8 on SD3.5's 24-38 blocks). Casting inside a class's own forward computes the same
    numbers, and every block traces into the same graph.
    """

    storage_dtype: torch.dtype
    compute_dtype: torch.dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return torch.nn.functional.linear(input, self.weight.to(self.compute_dtype), bias)


def _apply_casting(module: torch.nn.Module, storage: torch.dtype, compute: torch.dtype, prefix: str = "") -> None:
    """diffusers' ``apply_layerwise_casting`` walk (the same layers, ``KEEP_IN_COMPUTE`` skipped),
    plain Linears made ``StoredLinear``s; other castable layers (convolutions, quantised
    Linears: none in SD3's blocks) get diffusers' hook."""
    import re

    from diffusers.hooks.layerwise_casting import _GO_LC_SUPPORTED_PYTORCH_LAYERS, apply_layerwise_casting_hook

    if any(re.search(pattern, prefix) for pattern in KEEP_IN_COMPUTE):
        return
    if type(module) is torch.nn.Linear:
        module.__class__ = StoredLinear
        module.storage_dtype, module.compute_dtype = storage, compute
        module.to(dtype=storage)
        return
    if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
        apply_layerwise_casting_hook(module, storage, compute, non_blocking=False)
        return
    for name, child in module.named_children():
        _apply_casting(child, storage, compute, f"{prefix}.{name}" if prefix else name)


def _casting_hook(module: torch.nn.Module):
    """What stores ``module``'s weights apart (it has ``storage_dtype``): the module itself when it
    is a ``StoredLinear``, diffusers' layerwise-casting hook when it has one, else None."""
    if isinstance(module, StoredLinear):
        return module
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return None
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    return registry.get_hook(_LAYERWISE_CASTING_HOOK)


def current_storage_dtype(transformer: torch.nn.Module) -> torch.dtype | None:
    """The storage dtype of layerwise casting on ``transformer``, or None when it is off."""
    for module in transformer.modules():
        hook = _casting_hook(module)
        if hook is not None:
            return hook.storage_dtype
    return None


def compute_dtype_of(transformer: torch.nn.Module) -> torch.dtype:
    """The dtype the transformer computes in: that of its patch embedding (never stored in fp8)."""
    return transformer.pos_embed.proj.weight.dtype


def apply_weights(transformer: torch.nn.Module, weights: str, compute_dtype: torch.dtype | None = None) -> torch.dtype:
    """Store the transformer's Linear weights in ``weights``' dtype, computing in ``compute_dtype``.

    Args:
        transformer: an ``SD3Transformer2DModel`` (stock or widened, with or without LoRA).
        weights: one of ``WEIGHTS``; ``auto`` or the compute dtype's own name leaves the
            weights as they are.
        compute_dtype: the dtype of the forward pass (default: the patch embedding's dtype).

    Returns the storage dtype. Layers whose weights were already loaded in the storage dtype
    (a directly loaded fp8 file) are hooked without a round trip. Applying it twice with the same
    dtype is a no-op; another storage dtype on a model that already has one is refused (its
    weights were rounded: reload the model).
    """
    compute_dtype = compute_dtype or compute_dtype_of(transformer)
    storage = storage_dtype(weights, compute_dtype)
    current = current_storage_dtype(transformer)
    if current is not None:
        if current != storage:
            raise HairDiffError(
                f"the transformer's weights are already stored as {weights_name(current)}; storing them as "
                f"{weights} would round them twice. Reload the model with weights={weights!r}."
            )
        return storage
    if storage == compute_dtype:
        return storage
    if compute_dtype in FLOAT8_DTYPES:
        raise InputError(f"fp8 cannot be the compute dtype; compute in bf16 and store in {weights}")
    # LoRA layers stay in the compute dtype (KEEP_IN_COMPUTE), so PEFT's cast of a LoRA's input
    # to its weights' dtype is a no-op: diffusers' hook that disables it is not needed.
    _apply_casting(transformer, storage, compute_dtype)
    n = sum(1 for m in transformer.modules() if _casting_hook(m) is not None)
    logger.info(
        "weights stored as %s (%d layers), computed in %s", weights_name(storage), n, weights_name(compute_dtype)
    )
    return storage


def lora_compute_dtype(transformer: torch.nn.Module, base_weight: torch.Tensor) -> torch.dtype | None:
    """The dtype a new LoRA layer on ``base_weight`` should have when the base is not a compute
    dtype (fp8 storage or a GGUF-quantised byte tensor): the patch embedding's; else None."""
    if base_weight.dtype in FLOAT8_DTYPES or not base_weight.dtype.is_floating_point:
        return compute_dtype_of(transformer)
    return None


# --------------------------------------------------------------------------------------------
# Offloading


def is_offloaded(transformer: torch.nn.Module) -> bool:
    """Whether diffusers' group offloading is on for ``transformer``."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return _is_group_offload_enabled(transformer)


def apply_offload(
    transformer: torch.nn.Module,
    offload: str,
    onload_device: str | torch.device,
    offload_device: str | torch.device = "cpu",
    *,
    use_stream: bool | None = None,
    low_cpu_mem_usage: bool = False,
) -> str:
    """Set up ``offload`` on ``transformer``; returns the mode applied.

    Args:
        transformer: the transformer (weights already in their storage dtype).
        offload: ``none`` (nothing), ``model`` (nothing here: the caller moves the whole model
            to the GPU for sampling and back afterwards) or ``blocks`` (group offloading: each
            transformer block is moved to ``onload_device`` for its forward and back after it;
            everything else, small, rides along with the first block).
        onload_device: where the forward runs.
        offload_device: where the weights rest (the CPU).
        use_stream: prefetch the next block on a CUDA stream (default: on CUDA); this pins a
            copy of the weights in CPU memory unless ``low_cpu_mem_usage``.
        low_cpu_mem_usage: pin each block on the fly instead (less RAM, slower transfers).
    """
    check_offload(offload)
    if offload == "auto":
        raise InputError("resolve offload='auto' first (choose_settings); apply_offload takes none, model or blocks")
    if offload != "blocks":
        return offload
    if is_offloaded(transformer):
        return offload
    onload = torch.device(onload_device)
    if use_stream is None:
        use_stream = onload.type == "cuda"
    transformer.enable_group_offload(
        onload_device=onload,
        offload_device=torch.device(offload_device),
        offload_type="block_level",
        num_blocks_per_group=1,
        non_blocking=use_stream,
        use_stream=use_stream,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
    if use_stream:
        prime_offload(transformer)
    logger.info(
        "block offloading: blocks rest on %s and run on %s%s",
        offload_device,
        onload,
        " (prefetched on a CUDA stream)" if use_stream else "",
    )
    return offload


@torch.no_grad()
def prime_offload(transformer: torch.nn.Module) -> None:
    """One small complete forward, so streamed offloading learns the block order from it.

    diffusers records the order in which blocks run during the first forward and prefetches by
    it afterwards. HairDiff's first forward may be a reference pass, which stops once every
    layer's K/V is cached: an order learnt from it would be incomplete.
    """
    cfg = transformer.config
    param = transformer.pos_embed.proj.weight
    side = 2 * int(cfg.patch_size)
    transformer(
        hidden_states=torch.zeros(1, param.shape[1], side, side, dtype=param.dtype),
        encoder_hidden_states=torch.zeros(1, 1, int(cfg.joint_attention_dim), dtype=param.dtype),
        pooled_projections=torch.zeros(1, int(cfg.pooled_projection_dim), dtype=param.dtype),
        timestep=torch.tensor([500.0]),
        return_dict=False,
    )


def remove_offload(transformer: torch.nn.Module, device: str | torch.device = "cpu") -> None:
    """Undo ``apply_offload``: remove the group-offloading hooks and put every weight on ``device``.

    The layerwise-casting hooks and attention processors are left as they are.
    """
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
    )

    if not is_offloaded(transformer):
        return
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
        registry.remove_hook(name, recurse=True)
    torch.nn.Module.to(transformer, torch.device(device))


def execution_device(transformer: torch.nn.Module, default: str | torch.device) -> torch.device:
    """Where the transformer's forward runs: the onload device when offloaded, else ``default``."""
    if is_offloaded(transformer):
        from diffusers.hooks.group_offloading import _get_group_onload_device

        return torch.device(_get_group_onload_device(transformer))
    return torch.device(default)


# --------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the GPU at the peak of one sampling call (the transformer's part)."""

    weights_total: int  # all transformer weights in their storage dtype
    weights_resident: int  # the part of them on the GPU at the peak
    transient: int  # the layer upcast by layerwise casting (or dequantised from GGUF)
    activations: int  # one block's live tensors, incl. the K/V concatenated with the reference's
    reference_cache: int  # reference attention's K/V of every layer
    attention_bias: int  # reference attention's additive biases (joint and attn2)

    @property
    def total(self) -> int:
        return self.weights_resident + self.transient + self.activations + self.reference_cache + self.attention_bias

    @property
    def beyond_weights(self) -> int:
        """What must be free beside the resident weights (ComfyUI's ``memory_required``)."""
        return self.total - self.weights_resident

    def as_dict(self) -> dict[str, float]:
        gib = 2.0**30
        out = {
            k: round(getattr(self, k) / gib, 3)
            for k in (
                "weights_total",
                "weights_resident",
                "transient",
                "activations",
                "reference_cache",
                "attention_bias",
            )
        }
        out["total"] = round(self.total / gib, 3)
        return out


def family_config(family: str) -> dict[str, Any]:
    """The transformer config of a family (``families.FAMILY_NAMES`` keys), widened to 32 channels."""
    key = "sd3.5-large" if family == "sd3.5-large-turbo" else family
    if key not in FAMILY_NAMES or key == "custom":
        raise InputError(
            f"unknown family {family!r}; choose one of {sorted(k for k in FAMILY_NAMES if k != 'custom')} "
            f"or pass the transformer's config"
        )
    return {**transformer_config(key), "in_channels": 32}


@dataclass(frozen=True)
class _Counts:
    cast: int  # parameters of Linears layerwise casting stores in the storage dtype
    kept: int  # everything else (patch embedding, final layer, norms, position table)
    block_cast: int  # the largest transformer block's share of each
    block_kept: int
    blocks: int
    largest_linear: int  # weights of the largest cast Linear (what one upcast holds)


_COUNT_CACHE: dict[tuple, _Counts] = {}


def _is_cast(name: str, module: torch.nn.Module) -> bool:
    import re

    return isinstance(module, torch.nn.Linear) and not any(re.search(p, name) for p in KEEP_IN_COMPUTE)


def _param_counts(config: Mapping[str, Any]) -> _Counts:
    """Parameter counts of ``config`` by storage class, from a meta-device model (no memory)."""
    from diffusers import SD3Transformer2DModel

    key = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.items()))
    if key in _COUNT_CACHE:
        return _COUNT_CACHE[key]
    # A small position table: building the real one (192² x hidden sin/cos in numpy) takes seconds;
    # its size is added below. Parameter shapes do not depend on it.
    small = {k: v for k, v in config.items() if not k.startswith("_")}
    small.update(sample_size=4, pos_embed_max_size=4)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**small)
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    table = int(config["pos_embed_max_size"]) ** 2 * hidden

    def split(root: torch.nn.Module) -> tuple[int, int, int]:
        cast = kept = largest = 0
        for name, module in root.named_modules():
            own = sum(p.numel() for p in module.parameters(recurse=False))
            if own and _is_cast(name, module):
                cast += own
                largest = max(largest, module.weight.numel())
            else:
                kept += own
        return cast, kept, largest

    cast, kept, largest = split(model)
    per_block = []
    for i, block in enumerate(model.transformer_blocks):
        # Names as seen from the model, so the KEEP patterns match as in apply_weights.
        c = sum(
            sum(p.numel() for p in m.parameters(recurse=False))
            for n, m in block.named_modules()
            if _is_cast(f"transformer_blocks.{i}.{n}", m)
        )
        per_block.append((c, sum(p.numel() for p in block.parameters()) - c))
    block_cast, block_kept = max(per_block, key=lambda ck: ck[0] + ck[1])
    counts = _Counts(
        cast=cast,
        kept=kept + table,
        block_cast=block_cast,
        block_kept=block_kept,
        blocks=len(per_block),
        largest_linear=largest,
    )
    _COUNT_CACHE[key] = counts
    return counts


def _bytes_per_weight(weights: str, compute_dtype: torch.dtype) -> float:
    if weights.lower().startswith("gguf_"):
        quant = weights[5:].upper()
        if quant not in GGUF_BYTES_PER_WEIGHT:
            raise InputError(f"unknown GGUF type {quant}; known: {', '.join(GGUF_BYTES_PER_WEIGHT)}")
        return GGUF_BYTES_PER_WEIGHT[quant]
    if weights == "fp32":
        return 4.0
    return float(_dtype_size(storage_dtype(weights, compute_dtype)))


def estimate_peak_vram(
    family: str | Mapping[str, Any],
    *,
    weights: str = "bf16",
    offload: str = "none",
    height: int = 1024,
    width: int = 1024,
    cfg: float = 1.0,
    reference: str = "off",
    batch: int = 1,
    compute_dtype: torch.dtype = torch.bfloat16,
    text_tokens: int = SD3_TEXT_TOKENS,
    use_stream: bool = True,
) -> MemoryEstimate:
    """Predict the GPU memory one HairDiff sampling call needs (the transformer's part).

    Args:
        family: a family key (``sd3.5-large``, ``sd3.5-medium``, ``sd3-medium``, ``tiny``) or a
            transformer config dict.
        weights: a ``WEIGHTS`` option (``auto`` = the compute dtype), ``fp32``, or
            ``gguf_<type>`` (e.g. ``gguf_q8_0``) for a GGUF file.
        offload: ``none``/``model`` (whole model resident while sampling) or ``blocks``.
        height, width: the working size in pixels (the context box, about 1024² for SD3.5).
        cfg: guidance scale; != 1 doubles the batch of the model calls.
        reference: reference attention mode (``off``, ``once``, ``per_step``); on, it adds the
            K/V cache of every layer, the biases and the longer keys.
        batch: photos per call.
        compute_dtype: dtype of activations and upcast weights.
        text_tokens: text tokens per call (333 with SD3's encoders).
        use_stream: blocks offloading prefetches the next block (two blocks resident).

    Returns a ``MemoryEstimate``; ``.total`` is the peak in bytes. The VAE, text encoders and
    the CUDA context (about 0.3-0.5 GB) are not included: they are loaded at other times.
    """
    check_offload(offload)
    if offload == "auto":
        raise InputError("estimate a concrete offload (none, model or blocks), not 'auto'")
    if reference not in REFERENCE_MODES:
        raise InputError(f"unknown reference mode {reference!r}; choose one of {', '.join(REFERENCE_MODES)}")
    if weights not in WEIGHTS and weights != "fp32" and not weights.lower().startswith("gguf_"):
        check_weights(weights)
    if height <= 0 or width <= 0 or batch <= 0:
        raise InputError(f"height, width and batch must be positive, got {height}x{width}, batch {batch}")
    config = family_config(family) if isinstance(family, str) else {**family, "in_channels": 32}
    n = _param_counts(config)
    csize = _dtype_size(compute_dtype)
    per_weight = _bytes_per_weight(weights, compute_dtype)
    upcast = per_weight != csize  # layerwise casting or GGUF dequantisation
    weights_total = int(n.cast * per_weight + n.kept * csize)
    if offload == "blocks":
        on_gpu = min(n.blocks, 2 if use_stream else 1)  # the running block (+ the prefetched one)
        outside = (n.cast - n.blocks * n.block_cast) * per_weight + (n.kept - n.blocks * n.block_kept) * csize
        resident = int(outside + on_gpu * (n.block_cast * per_weight + n.block_kept * csize))
    else:
        resident = weights_total
    transient = int(n.largest_linear * csize) if upcast else 0

    patch = int(config["patch_size"]) * 8
    th, tw = math.ceil(height / patch), math.ceil(width / patch)
    tokens = th * tw
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    rows = batch * (2 if cfg != 1.0 else 1)
    activations = ACTIVATION_FACTOR * rows * (tokens + text_tokens) * hidden * csize
    ref_cache = bias = 0
    if reference != "off":
        from ..method.reference import predicted_cache_bytes

        shape = types.SimpleNamespace(config=types.SimpleNamespace(**config))
        ref_cache = predicted_cache_bytes(shape, (th * 2, tw * 2), batch=batch, dtype=compute_dtype)
        # The generation's keys and values grow by the reference's (concatenated copies).
        activations += 2 * rows * tokens * hidden * csize
        joint = batch * (tokens + text_tokens) * (tokens + text_tokens + tokens)
        dual = batch * tokens * (tokens + tokens) if config.get("dual_attention_layers") else 0
        bias = (joint + dual) * csize
    return MemoryEstimate(
        weights_total=weights_total,
        weights_resident=resident,
        transient=transient,
        activations=int(activations),
        reference_cache=int(ref_cache),
        attention_bias=int(bias),
    )


def choose_settings(
    family: str | Mapping[str, Any],
    free_bytes: int,
    *,
    weights: str = "auto",
    offload: str = "auto",
    compute_dtype: torch.dtype = torch.bfloat16,
    headroom: float = 0.9,
    **estimate_kwargs: Any,
) -> tuple[str, str, MemoryEstimate]:
    """Resolve ``auto`` weights/offload for ``free_bytes`` of free GPU memory.

    Tries, cheapest in quality and speed first: the compute dtype all on the GPU; fp8 storage
    all on the GPU; fp8 with block offloading (half the bytes to move per step); the compute
    dtype with block offloading. Options
    the caller fixed are kept. Returns ``(weights, offload, estimate)``; when nothing fits within
    ``headroom`` x ``free_bytes``, the smallest setting is returned (it may still run: ComfyUI
    and the driver can evict or page). A fixed ``weights`` may also be ``fp32`` or ``gguf_<type>``
    (a loaded model's, see ``weights_of``).
    """
    check_offload(offload)
    # "auto" = weights kept in the compute dtype (no casting): fp32 is not a storage option.
    native = weights_name(compute_dtype) if compute_dtype != torch.float32 else "auto"
    weight_options = [native, "fp8_e4m3fn"] if weights == "auto" else [weights]
    offload_options = ["none", "blocks"] if offload == "auto" else [offload]
    candidates = []
    for off in offload_options:
        # Streaming blocks moves every weight over PCIe at every step: half as many bytes in fp8.
        for w in weight_options if off != "blocks" else weight_options[::-1]:
            candidates.append((w, off))
    best = None
    for w, off in candidates:
        est = estimate_peak_vram(family, weights=w, offload=off, compute_dtype=compute_dtype, **estimate_kwargs)
        if est.total <= headroom * free_bytes:
            return w, off, est
        if best is None or est.total <= best[2].total:  # ties: the later, more frugal candidate
            best = (w, off, est)
    logger.warning(
        "no weights/offload setting fits in %.1f GB free; using the smallest (%s, %s: %.1f GB)",
        free_bytes / 2**30,
        best[0],
        best[1],
        best[2].total / 2**30,
    )
    return best


def auto_offload_for(transformer: torch.nn.Module, family: str, free_bytes: int, **estimate_kwargs: Any) -> str:
    """``offload="auto"`` for a loaded transformer: the one policy (``choose_settings``) with the
    weights it was loaded with kept, so the command line, evaluation and training decide alike."""
    known = family if family in FAMILY_NAMES and family != "custom" else _config_of(transformer)
    _weights, offload, _est = choose_settings(
        known,
        free_bytes,
        weights=weights_of(transformer),
        offload="auto",
        compute_dtype=compute_dtype_of(transformer),
        **estimate_kwargs,
    )
    return offload


def weights_of(transformer: torch.nn.Module) -> str:
    """The ``weights`` a loaded transformer has: its storage dtype's name, ``gguf_q8_0`` for a
    GGUF model (sized as Q8_0: the estimate's upper end for GGUF), or ``fp32``."""
    if getattr(transformer, "is_quantized", False):
        return "gguf_q8_0"
    storage = current_storage_dtype(transformer)
    dtype = storage if storage is not None else compute_dtype_of(transformer)
    return "fp32" if dtype == torch.float32 else weights_name(dtype)


def _config_of(transformer: torch.nn.Module) -> dict[str, Any]:
    return {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}


def estimate_for(
    transformer: torch.nn.Module,
    family: str,
    *,
    offload: str,
    height: int,
    width: int,
    cfg: float = 1.0,
    reference: str = "off",
    batch: int = 1,
    text_tokens: int = SD3_TEXT_TOKENS,
) -> MemoryEstimate:
    """``estimate_peak_vram`` for a loaded transformer: its family (or config), storage and
    compute dtypes are read from the model."""
    # A family outside the registry (a custom or renamed model) is sized from its own config.
    known = family if family in FAMILY_NAMES and family != "custom" else _config_of(transformer)
    return estimate_peak_vram(
        known,
        weights=weights_of(transformer),
        offload=offload,
        height=height,
        width=width,
        cfg=cfg,
        reference=reference,
        batch=batch,
        compute_dtype=compute_dtype_of(transformer),
        text_tokens=text_tokens,
    )
