"""Matte, soft mask and sketch preparation.

Conventions (all torch, NCHW, float32 unless said otherwise):
- images: (B, 3, H, W) RGB in [0, 1];
- mattes and masks: (B, 1, H, W) in [0, 1];
- the *canonical sketch*: (B, 3, H, W) RGB in [0, 1] with the strokes in their own colour on a
  pure black background, plus its stroke alpha (B, 1, H, W). Dark strokes drawn on a light
  background or on a transparent one become white strokes (so "pencil on paper", "chalk on
  slate" and "ink on a transparent layer" sketches encode alike); coloured strokes keep their
  colour (they carry the wanted hair colour).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..defaults import DEFAULTS
from ..errors import EmptyMaskError, InputError
from ..imageops import blur_radius, gaussian_blur, resize_same_aspect  # noqa: F401  (re-exported: nodes, pipeline, benches)
from ..imageops import check_nchw as _check_nchw
from ..imageops import luminance as _luminance

#: Feather sigma in pixels at a 1024-px working resolution (design default).
DEFAULT_FEATHER_SIGMA = DEFAULTS.feather_at_1024
REFERENCE_RESOLUTION = 1024
#: The VAE downsamples by 8; SD3's 2x2 patches make one token per 16x16 pixels.
LATENT_FACTOR = 8
TOKEN_FACTOR = 16


def binarize_matte(matte: torch.Tensor, threshold: float = 0.5, require_nonempty: bool = True) -> torch.Tensor:
    """Any matte image -> (B, 1, H, W) in {0, 1}.

    1 channel: the value; 3 channels: luminance; 4 channels: the alpha channel when it is not
    uniformly opaque, else the luminance. Raises ``EmptyMaskError`` when nothing is selected.
    """
    _check_nchw(matte, "matte")
    c = matte.shape[1]
    matte = matte.float()
    if c == 1:
        value = matte
    elif c == 3:
        value = _luminance(matte)
    elif c == 4:
        alpha = matte[:, 3:4]
        value = alpha if bool((alpha < 0.999).any()) else _luminance(matte[:, :3])
    else:
        raise InputError(f"matte has {c} channels; expected 1 (mask), 3 (RGB) or 4 (RGBA)", input="matte")
    binary = (value > threshold).float()
    if require_nonempty:
        empty = [i for i in range(binary.shape[0]) if not bool(binary[i].any())]
        if empty:
            raise EmptyMaskError(
                f"the hair matte is empty (no pixel above threshold {threshold}) for batch item(s) "
                f"{empty}; paint the hair region white on black, or lower the threshold",
                input="matte",
            )
    return binary


def has_transparency(picture: torch.Tensor) -> bool:
    """A (B, 4, H, W) picture whose alpha is not uniformly opaque."""
    return picture.shape[1] == 4 and bool((picture[:, 3:4] < 0.999).any())


def protect_mask(picture: torch.Tensor) -> torch.Tensor:
    """A Protect picture (B, C, H, W) -> (B, 1, H, W) in [0, 1], 1 = keep as the photo's.

    The one reading of a protect picture, as ComfyUI's Load Image gives its MASK: with
    transparency (4 channels, alpha not uniformly opaque) it is ``1 - alpha`` (transparent =
    protected, what the mask editor paints); otherwise it is a plain mask, white = protected (the
    value, or the luminance of RGB / an opaque RGBA). Unlike ``binarize_matte``, whose alpha marks
    the hair (opaque = selected), transparency here marks what is kept.
    """
    _check_nchw(picture, "protect picture")
    picture = picture.float()
    c = picture.shape[1]
    if c not in (1, 3, 4):
        raise InputError(f"the protect picture has {c} channels; expected 1 (mask), 3 (RGB) or 4 (RGBA)")
    if has_transparency(picture):
        return 1.0 - picture[:, 3:4]
    return picture if c == 1 else _luminance(picture[:, :3])


def protect_picture(picture: torch.Tensor) -> torch.Tensor:
    """A Protect picture -> (B, 4, H, W) RGBA that ComfyUI's Load Image reads as the same mask.

    A picture with transparency is returned as it is; a plain mask (white = keep) becomes its own
    grey picture with the protected part transparent (alpha = 1 - ``protect_mask``).
    """
    if has_transparency(picture):
        return picture.float()
    keep = protect_mask(picture)
    rgb = picture.float()[:, :3] if picture.shape[1] >= 3 else keep.expand(-1, 3, -1, -1)
    return torch.cat([rgb, 1.0 - keep], 1)


def feather_sigma(height: int, width: int, sigma_at_1024: float = DEFAULT_FEATHER_SIGMA) -> float:
    """Feather sigma in pixels scaled with the working resolution (geometric mean side)."""
    return float(sigma_at_1024) * math.sqrt(height * width) / REFERENCE_RESOLUTION


def soft_mask(binary: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """Feather a binary matte: Gaussian blur (sigma in px, default scaled from 10 @ 1024), clamp [0,1]."""
    _check_nchw(binary, "matte")
    if sigma is None:
        sigma = feather_sigma(binary.shape[-2], binary.shape[-1])
    return gaussian_blur(binary.float(), sigma).clamp_(0.0, 1.0)


def resize_area(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area (average) resize to an arbitrary grid, the right filter for a coverage mask."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.adaptive_avg_pool2d(mask, size)


def latent_grid(mask: torch.Tensor) -> torch.Tensor:
    h, w = mask.shape[-2:]
    return resize_area(mask, (h // LATENT_FACTOR, w // LATENT_FACTOR))


def token_grid(mask: torch.Tensor) -> torch.Tensor:
    h, w = mask.shape[-2:]
    return resize_area(mask, (h // TOKEN_FACTOR, w // TOKEN_FACTOR))


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary-ish dilation (max filter) by ``radius`` pixels; negative radius erodes."""
    if radius == 0:
        return mask
    # Beyond the image's extent a larger radius changes nothing: cap it (time and memory).
    radius = max(-max(mask.shape[-2:]), min(radius, max(mask.shape[-2:])))
    k = 2 * abs(radius) + 1
    if radius > 0:
        return F.max_pool2d(mask, k, stride=1, padding=abs(radius))
    return -F.max_pool2d(-mask, k, stride=1, padding=abs(radius))


def sketch_background(sketch: torch.Tensor) -> torch.Tensor:
    """(B, 3, 1, 1): the median colour of the border of an opaque (B, 1|3, H, W) sketch."""
    rgb = sketch[:, :3].float()
    if rgb.shape[1] == 1:
        rgb = rgb.expand(-1, 3, -1, -1)
    border = torch.cat([rgb[:, :, 0, :], rgb[:, :, -1, :], rgb[:, :, :, 0], rgb[:, :, :, -1]], dim=-1)
    return border.clamp(0, 1).median(dim=-1).values.view(-1, 3, 1, 1)


#: ``normalize_sketch``'s ``declared_background`` values: detect it, or the user says which it is.
SKETCH_BACKGROUNDS = ("auto", "light", "dark")


def normalize_sketch(
    sketch: torch.Tensor,
    threshold: float = 0.2,
    background: torch.Tensor | None = None,
    declared_background: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Any sketch image -> (canonical RGB sketch, stroke alpha); see the module docstring.

    Accepts 1 (L), 3 (RGB) or 4 (RGBA, transparent background) channels, strokes on a white or a
    black background (detected from the median colour of the border). ``threshold`` is the
    colour distance from the background above which a pixel is a stroke. ``background``
    ((B, 3, 1, 1), ``sketch_background`` of the whole sketch) lets a crop of a sketch be read
    against the whole sketch's background; None: this sketch's border. ``declared_background``
    ("light" or "dark"; "auto" = detect) is the user's word for it, where detection would guess
    wrong (a sketch whose strokes touch the border).
    """
    _check_nchw(sketch, "sketch")
    if declared_background not in SKETCH_BACKGROUNDS:
        raise InputError(
            f"declared_background must be one of {SKETCH_BACKGROUNDS}, got {declared_background!r}", input="background"
        )
    if declared_background != "auto":
        if background is not None:
            raise InputError("give a background colour or a declared background, not both", input="background")
        # A 1-px frame of the declared colour: the border then is that colour, so the detection
        # below (border median; for RGBA, whether every pixel is opaque) says what the user said.
        # The frame is cut off again, so the result has the sketch's own size.
        value = 1.0 if declared_background == "light" else 0.0
        framed = F.pad(sketch.float(), (1, 1, 1, 1), value=value)
        rgb, alpha = normalize_sketch(framed, threshold=threshold)
        return rgb[..., 1:-1, 1:-1], alpha[..., 1:-1, 1:-1]
    sketch = sketch.float().clamp(0, 1)
    c = sketch.shape[1]
    if c == 1:
        rgb, alpha = sketch.repeat(1, 3, 1, 1), None
    elif c == 3:
        rgb, alpha = sketch, None
    elif c == 4:
        rgb, alpha = sketch[:, :3], sketch[:, 3:4]
        if bool((alpha > 0.999).all()):
            alpha = None
    else:
        raise InputError(f"sketch has {c} channels; expected 1 (L), 3 (RGB) or 4 (RGBA)", input="sketch")

    if alpha is not None:
        stroke = (alpha > 0.5).float()
        colour = rgb
        # A transparent background is paper: dark strokes on it are pencil lines and become
        # white, as on a white background (black on the black canvas would be invisible).
        light_bg = torch.ones(rgb.shape[0], dtype=torch.bool, device=rgb.device)
    else:
        bg = sketch_background(rgb) if background is None else background.to(rgb)
        dist = (rgb - bg).abs().amax(dim=1, keepdim=True)
        stroke = (dist > threshold).float()
        colour = rgb
        light_bg = _luminance(bg).view(-1) > 0.5
    # Dark, unsaturated strokes on a light background are pencil lines: draw them white.
    lum = _luminance(colour)
    sat = colour.amax(1, keepdim=True) - colour.amin(1, keepdim=True)
    pencil = (lum < 0.35) & (sat < 0.15) & light_bg.view(-1, 1, 1, 1)
    colour = torch.where(pencil, torch.ones_like(colour), colour)
    return colour * stroke, stroke


def fill_enclosed(strokes: torch.Tensor, max_iters: int | None = None) -> torch.Tensor:
    """(B, 1, H, W) stroke mask -> strokes plus every pixel they enclose (not reachable from the border).

    Breadth-first flood fill from the border through non-stroke pixels, written as repeated
    4-connected max filters (diagonal gaps in a 1-px line do not leak), checked for
    convergence every 16 steps.
    """
    free = (strokes < 0.5).float()
    reach = torch.zeros_like(free)
    reach[..., 0, :] = 1
    reach[..., -1, :] = 1
    reach[..., :, 0] = 1
    reach[..., :, -1] = 1
    reach = reach * free
    h, w = free.shape[-2:]
    limit = max_iters or (h * w)
    for i in range(limit):
        grown_h = F.max_pool2d(reach, (1, 3), stride=1, padding=(0, 1))
        grown_v = F.max_pool2d(reach, (3, 1), stride=1, padding=(1, 0))
        nxt = torch.maximum(grown_h, grown_v) * free
        if i % 16 == 15 and torch.equal(nxt, reach):
            break
        reach = nxt
    return 1.0 - reach


def matte_from_strokes(strokes: torch.Tensor, dilate_px: int = 16) -> torch.Tensor:
    """A rough hair matte for users without one: close the strokes' gaps by dilating them
    ``dilate_px``, fill what they enclose, and grow the result by half that again."""
    closed = dilate(strokes, dilate_px) if dilate_px > 0 else strokes
    filled = fill_enclosed(closed)
    return dilate(filled, dilate_px // 2) if dilate_px > 1 else filled


# --------------------------------------------------------------------------------------------
# Composing a matte from what the artist has (old hair mask, sketch, exclusions)
# --------------------------------------------------------------------------------------------
MATTE_MODES = ("union", "mask", "sketch")
#: Above this share of the photo a matte gets a warning: the model then redraws most of the
#: picture, usually a mistake (a sketch outline around the face fills the face).
MATTE_COVERAGE_WARNING = 0.6
#: When the matte (before the exclusion) covers more than this share of the protected region, a
#: warning says so: the exclusion is then what keeps that region (with no face detector in the
#: core, a protected face is the only way to know a matte reached over a face).
PROTECTED_OVERLAP_WARNING = 0.5


@dataclass
class ComposedMatte:
    binary: torch.Tensor  # (B, 1, H, W) in {0, 1}: what the sampler gets
    soft: torch.Tensor  # (B, 1, H, W) in [0, 1]: ``binary`` feathered by ``feather_px`` (preview / node output)
    coverage: list[float]  # share of the image covered, per batch item
    warnings: list[str]  # one line each, for a log or a node's console; never an error
    #: per batch item, the share of the exclusion mask that the matte covered before the exclusion
    #: took it out (0 for an item whose exclusion is empty; an empty list without any exclusion)
    protected_overlap: list[float] = field(default_factory=list)


def _union(masks, threshold: float, size, what: str):
    """A list of masks -> their binary union (sizes fitted to ``size`` or the first's); else as is."""
    if not isinstance(masks, (list, tuple)):
        return masks
    out = None
    for i, m in enumerate(masks):
        # "the mask 1" read like a value; a single mask is "the mask", one of several is numbered.
        name = what if len(masks) == 1 else f"{what} #{i + 1} of {len(masks)}"
        _check_nchw(m, name)
        b = binarize_matte(m, threshold, require_nonempty=False)
        b = resize_same_aspect(
            b,
            tuple(size or masks[0].shape[-2:]),
            name,
            "photo" if size else f"first {what}",
            mode="nearest",
        )
        out = b if out is None else torch.maximum(out, b)
    return out


def compose_matte(
    mask: torch.Tensor | None = None,
    sketch: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    *,
    mode: str = "union",
    threshold: float = 0.5,
    sketch_dilate_px: int = 16,
    grow_px: int = 0,
    feather_px: float = 0.0,
    size: tuple[int, int] | None = None,
) -> ComposedMatte:
    """One hair matte from any of: the old hair's mask, the sketch's region, an exclusion mask.

    Making hair shorter needs the old hair *and* the new hair's region (``union``); making it
    longer, the region the sketch reaches. The sketch's region is its strokes plus what they
    enclose (``matte_from_strokes``: gaps closed by ``sketch_dilate_px``). The result is grown
    (``grow_px`` > 0) or shrunk (< 0), then everything in ``exclude`` (face, eyes, anything the
    artist protects) is removed, so an outline drawn around the face does not select the face.
    The exclusion holds for ``soft`` too: the feather stops at the protected region (zero there).
    There is no face detector: a face is protected only when the exclusion mask covers it.

    Args:
        mask: (B, C, H, W) old-hair matte (1, 3 or 4 channels, as ``binarize_matte``), a list of
            them (their union), or None.
        sketch: (B, C, H, W) sketch in any form ``normalize_sketch`` reads, or None.
        exclude: (B, C, H, W) region that must stay the photo's (white = protected), a list of
            them, or None.
        mode: ``union`` (every source given), ``mask`` (the mask alone) or ``sketch`` (the
            sketch's region alone).
        threshold: values above it count as selected in ``mask`` and ``exclude``.
        sketch_dilate_px: gap closing and padding of the sketch's region, in pixels.
        grow_px: grow (> 0) or shrink (< 0) the combined matte, in pixels, before the exclusion.
        feather_px: Gaussian sigma of ``soft`` (0 = ``soft`` equals ``binary``).
        size: (H, W) of the photo; inputs of another size but the same aspect ratio are resized.

    Returns:
        ``ComposedMatte``; ``warnings`` holds a line when the matte covers more than
        ``MATTE_COVERAGE_WARNING`` of the image, and one when, before the exclusion, it covered
        more than ``PROTECTED_OVERLAP_WARNING`` of the protected region (numbers in the line;
        ``protected_overlap`` has the shares).

    Raises:
        InputError: an unknown mode, a source the mode needs is missing, sizes of another
            aspect ratio; ``EmptyMaskError`` when nothing is left (the message says why).
    """
    mask = _union(mask, threshold, size, "mask")
    exclude = _union(exclude, threshold, size, "exclusion mask")
    if mode not in MATTE_MODES:
        raise InputError(f"matte mode {mode!r} is not one of {list(MATTE_MODES)}")
    if mode == "mask" and mask is None:
        raise InputError("matte mode 'mask' needs a mask (the old hair, white on black); none was given")
    if mode == "sketch" and sketch is None:
        raise InputError("matte mode 'sketch' needs a sketch whose strokes outline the hair; none was given")
    if mask is None and sketch is None:
        raise InputError("no matte source: give a hair mask, a sketch to take the region from, or both")
    for t, what in ((mask, "mask"), (sketch, "sketch"), (exclude, "exclusion mask")):
        if t is not None:
            _check_nchw(t, what)
    ref = "photo" if size is not None else ("mask" if mask is not None else "sketch")
    size = tuple(size) if size is not None else tuple((mask if mask is not None else sketch).shape[-2:])
    parts = []
    if mask is not None and mode in ("union", "mask"):
        parts.append(
            (
                "mask",
                resize_same_aspect(
                    binarize_matte(mask, threshold, require_nonempty=False), size, "mask", ref, mode="nearest"
                ),
            )
        )
    if sketch is not None and mode in ("union", "sketch"):
        sk = sketch.float()
        if tuple(sk.shape[-2:]) != size:
            sk = resize_same_aspect(sk, size, "sketch", ref, mode="nearest")
        _, strokes = normalize_sketch(sk)
        parts.append(("sketch", matte_from_strokes(strokes, int(sketch_dilate_px))))
    batch = max(p.shape[0] for _, p in parts)
    for what, p in parts:
        if p.shape[0] not in (1, batch):
            raise InputError(f"the {what} has {p.shape[0]} items but another input has {batch}; give 1 or {batch}")
    binary = parts[0][1].expand(batch, -1, -1, -1)
    for _, p in parts[1:]:
        binary = torch.maximum(binary, p)
    if not bool(binary.flatten(1).amax(1).all()):
        raise EmptyMaskError(
            f"the matte is empty: the {' and the '.join(w for w, _ in parts)} gave no hair pixels (threshold "
            f"{threshold}); paint the hair white, draw strokes around it, or lower the threshold"
        )
    if grow_px:
        binary = dilate(binary, int(grow_px))
        if not bool(binary.flatten(1).amax(1).all()):
            raise EmptyMaskError(f"shrinking the matte by {-int(grow_px)} px removed all of it; shrink less")
    keep_out, overlap, areas = None, [], []
    if exclude is not None:
        keep_out = resize_same_aspect(
            binarize_matte(exclude, threshold, require_nonempty=False), size, "exclusion mask", ref, mode="nearest"
        )
        if keep_out.shape[0] not in (1, batch):
            raise InputError(
                f"the exclusion mask has {keep_out.shape[0]} items but the matte has {batch}; give 1 or {batch}"
            )
        protected = keep_out.expand_as(binary).flatten(1).sum(1)
        inside = (binary * keep_out).flatten(1).sum(1)
        if bool(keep_out.any()):
            areas = [float(a) for a in protected]
            overlap = [float(i) / a if a > 0 else 0.0 for i, a in zip(inside, areas)]
        binary = binary * (1.0 - keep_out)
        if not bool(binary.flatten(1).amax(1).all()):
            raise EmptyMaskError("the exclusion mask covers the whole matte; nothing is left to redraw")
    binary = binary.contiguous()
    soft = soft_mask(binary, float(feather_px)) if feather_px > 0 else binary.clone()
    if keep_out is not None and feather_px > 0:
        soft = soft * (1.0 - keep_out)  # the feather does not reach into what is protected
    coverage = [float(v) for v in binary.flatten(1).mean(1)]
    warnings = [
        f"the matte covers {c:.0%} of the image (item {i}); above {MATTE_COVERAGE_WARNING:.0%} most of the picture "
        f"is redrawn: check the sketch outline does not enclose the face, or give an exclusion mask"
        for i, c in enumerate(coverage)
        if c > MATTE_COVERAGE_WARNING
    ]
    n_pixels = size[0] * size[1]
    warnings += [
        f"the matte reached over {share:.0%} of the protected region (item {i}: {round(share * area):,} of its "
        f"{round(area):,} px, {share * area / n_pixels:.0%} of the image); that part is kept as the photo's. "
        f"Without the exclusion mask it would be redrawn: the sketch's outline or the grown mask encloses it"
        for i, (share, area) in enumerate(zip(overlap, areas))
        if share > PROTECTED_OVERLAP_WARNING
    ]
    return ComposedMatte(binary=binary, soft=soft, coverage=coverage, warnings=warnings, protected_overlap=overlap)


def matte_preview(
    photo: torch.Tensor, matte: torch.Tensor, colour=(1.0, 0.25, 0.1), opacity: float = 0.5
) -> torch.Tensor:
    """The photo with the matte laid over it in a tint (what will be redrawn), dimmed outside."""
    _check_nchw(photo, "photo")
    _check_nchw(matte, "matte")
    rgb = photo[:, :3].float() if photo.shape[1] >= 3 else photo.float().repeat(1, 3, 1, 1)
    m = (
        F.interpolate(matte.float(), size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        if matte.shape[-2:] != rgb.shape[-2:]
        else matte.float()
    )
    tint = torch.tensor(colour, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    a = m.clamp(0, 1) * opacity
    return (rgb * (1 - a) + tint * a).clamp(0, 1) * (0.6 + 0.4 * m.clamp(0, 1))
