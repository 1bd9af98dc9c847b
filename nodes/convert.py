"""The one boundary between ComfyUI's data layouts and the core's.

ComfyUI: IMAGE (B, H, W, C) float in [0, 1]; MASK (B, H, W) (also seen as (H, W) or
(B, 1, H, W)); LATENT {"samples": raw VAE latent (B, 16, h, w), ...}; CONDITIONING
[[embeds (B, L, D), {"pooled_output": (B, P), ...}], ...]. The core: NCHW float tensors and
SD3-scaled latents (``(raw - 0.0609) * 1.5305``, ComfyUI's ``latent_formats.SD3.process_in``).
"""

from __future__ import annotations

import torch

from ..hairdiff_core.errors import HairDiffError, InputError

_SHORT_CLASSES: dict[type, type] = {}


def _short_named(cls: type) -> type:
    """A subclass of ``cls`` that ComfyUI reports by its bare name.

    ComfyUI shows an exception's type as ``module.qualname`` unless the module is ``builtins``;
    for a custom node that is an internal path (``/.../custom_nodes/hairdiff.hairdiff_core.
    errors.InputError``). The subclass keeps ``isinstance`` checks working.
    """
    if cls not in _SHORT_CLASSES:
        _SHORT_CLASSES[cls] = type(cls.__name__, (cls,), {"__module__": "builtins", "__qualname__": cls.__name__})
    return _SHORT_CLASSES[cls]


def node_error(node: str, input_name: str | None, problem: str | Exception, fix: str = "") -> InputError:
    """An error that names the node, the input that was wrong (when one is) and what to do."""
    if getattr(problem, "node", None) == node:
        return problem  # already this node's message (raised by a helper inside the same try)
    text = f"{node}: input '{input_name}': {problem}" if input_name else f"{node}: {problem}"
    if fix:
        text += f" -> {fix}"
    base = type(problem) if isinstance(problem, HairDiffError) else InputError
    if base in _SHORT_CLASSES.values():
        base = base.__bases__[0]  # already a short-named copy: wrap its original
    err = _short_named(base)(text, input=input_name)
    err.node = node
    return err


def input_of(exc: HairDiffError, names: dict[str, str] | None = None, default: str | None = None) -> str | None:
    """The node input a core error is about: the error's own ``input`` field, renamed through
    ``names`` (core argument -> node input) when the node calls it differently."""
    name = getattr(exc, "input", None) or default
    return (names or {}).get(name, name)


def check_combos(node_cls, values: dict) -> bool | str:
    """``True`` when every given COMBO value is one of its options, else one message naming each
    wrong input and its allowed values (``validate_inputs`` returns it; ComfyUI answers 400).

    ComfyUI does not check V3 combo values sent through its API, and a node would otherwise run
    an unknown value as some default. ``values`` maps input names to values; ``None`` (not given,
    or linked) is skipped.
    """
    problems = []
    schema = node_cls.define_schema()
    for inp in schema.inputs:
        options = getattr(inp, "options", None)
        if not isinstance(options, (list, tuple)) or inp.id not in values or values[inp.id] is None:
            continue
        value = values[inp.id]
        if value not in options:
            shown = ", ".join(repr(o) for o in options[:20]) + (
                f" (and {len(options) - 20} more)" if len(options) > 20 else ""
            )
            problems.append(f"input '{inp.id}' is {value!r}; allowed: {shown}")
    if not problems:
        return True
    return f"{schema.display_name}: " + "; ".join(problems)


def image_to_nchw(image, node: str, input_name: str) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> (B, C, H, W) float32 in [0, 1] (a new tensor: inputs stay untouched)."""
    if not isinstance(image, torch.Tensor):
        raise node_error(
            node,
            input_name,
            f"expected an IMAGE tensor, got {type(image).__name__}",
            "connect an IMAGE output (e.g. Load Image)",
        )
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise node_error(
            node,
            input_name,
            f"expected an IMAGE of shape (B, H, W, 3), got {tuple(image.shape)}",
            "connect an IMAGE output, not a MASK or LATENT",
        )
    if image.shape[1] < 2 or image.shape[2] < 2:
        raise node_error(node, input_name, f"image is {image.shape[2]}x{image.shape[1]} px", "use a real image")
    return image.movedim(-1, 1).float().clamp(0, 1).contiguous()


def nchw_to_image(x: torch.Tensor, device=None) -> torch.Tensor:
    """(B, 3, H, W) -> IMAGE (B, H, W, 3) float32 in [0, 1]."""
    out = x.detach().movedim(1, -1).float().clamp(0, 1).contiguous()
    return out.to(device) if device is not None else out


def mask_to_nchw(mask, node: str, input_name: str) -> torch.Tensor:
    """MASK (H, W), (B, H, W) or (B, 1, H, W) -> (B, 1, H, W) float32 in [0, 1]."""
    if not isinstance(mask, torch.Tensor):
        raise node_error(
            node,
            input_name,
            f"expected a MASK tensor, got {type(mask).__name__}",
            "connect a MASK output (e.g. Image To Mask, or Load Image's MASK)",
        )
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise node_error(
            node,
            input_name,
            f"expected a MASK of shape (B, H, W), got {tuple(mask.shape)}",
            "convert an IMAGE with Image To Mask first",
        )
    return mask.unsqueeze(1).float().clamp(0, 1).contiguous()


def nchw_to_mask(x: torch.Tensor, device=None) -> torch.Tensor:
    """(B, 1, H, W) -> MASK (B, H, W)."""
    out = x.detach()[:, 0].float().clamp(0, 1).contiguous()
    return out.to(device) if device is not None else out


def check_batch(n: int, batch: int, node: str, input_name: str, other: str) -> None:
    if n not in (1, batch):
        raise node_error(
            node, input_name, f"has a batch of {n} but '{other}' has {batch}", f"give 1 item (used for all) or {batch}"
        )


def conditioning_to_embeds(cond, node: str, input_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CONDITIONING from ComfyUI's SD3 text encoders -> (prompt_embeds, pooled_prompt_embeds)."""
    if not isinstance(cond, (list, tuple)) or not cond:
        raise node_error(
            node,
            input_name,
            "expected a CONDITIONING (a non-empty list)",
            "connect CLIP Text Encode fed by an SD3 text encoder loader",
        )
    if len(cond) > 1:
        raise node_error(
            node,
            input_name,
            f"has {len(cond)} conditioning entries (combined or area conditioning)",
            "HairDiff takes one prompt; use a single CLIP Text Encode (Conditioning Concat is fine)",
        )
    entry = cond[0]
    embeds = entry[0]
    extra = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    pooled = extra.get("pooled_output")
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
        raise node_error(
            node,
            input_name,
            "the conditioning tensor is not (B, tokens, dim)",
            "use ComfyUI's SD3 text encoders (Triple CLIP Loader + CLIP Text Encode)",
        )
    if pooled is None:
        raise node_error(
            node,
            input_name,
            "the conditioning has no pooled output, which SD3 needs",
            "use ComfyUI's SD3 text encoders (Triple CLIP Loader + CLIP Text Encode)",
        )
    return embeds.float(), pooled.float()


def latent_from_comfy(raw: torch.Tensor, latent_format) -> torch.Tensor:
    """ComfyUI's raw VAE latent -> the SD3-scaled latent the transformer works in."""
    return latent_format.process_in(raw.float())


def latent_to_comfy(scaled: torch.Tensor, latent_format) -> torch.Tensor:
    """SD3-scaled latent -> ComfyUI's raw VAE latent (what VAE Decode expects)."""
    return latent_format.process_out(scaled.float())


def check_widgets(node_cls, values: dict) -> None:
    """Raise the node's error for the first widget value outside its widget: a COMBO value not in
    its options, a number that is NaN, infinite or outside the widget's min..max.

    ComfyUI checks ranges and (0.8.0) combo options when a graph is queued, except that NaN passes
    its ``val < min`` / ``val > max`` tests; a node calls this first thing in ``execute`` so such a
    value is refused, naming the input and the widget's own range, before any work.
    """
    import math

    schema = node_cls.define_schema()
    for inp in schema.inputs:
        if inp.id not in values or values[inp.id] is None:
            continue
        value = values[inp.id]
        options = getattr(inp, "options", None)
        if isinstance(options, (list, tuple)):
            if value not in options:
                raise node_error(schema.display_name, inp.id, f"is {value!r}", f"pick one of {list(options)[:20]}")
            continue
        lo, hi = getattr(inp, "min", None), getattr(inp, "max", None)
        if lo is None and hi is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise node_error(
                schema.display_name,
                inp.id,
                f"is {value!r}",
                f"the widget takes {lo} to {hi}; give a number in that range",
            )
