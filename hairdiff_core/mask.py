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

import torch
import torch.nn.functional as F

from .defaults import DEFAULTS
from .errors import EmptyMaskError, InputError
from .imageops import check_nchw as _check_nchw
from .imageops import blur_radius, gaussian_blur  # noqa: F401  (re-exported: nodes, pipeline, benches)
from .imageops import luminance as _luminance

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


def normalize_sketch(sketch: torch.Tensor, threshold: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Any sketch image -> (canonical RGB sketch, stroke alpha); see the module docstring.

    Accepts 1 (L), 3 (RGB) or 4 (RGBA, transparent background) channels, strokes on a white or a
    black background (detected from the median colour of the border). ``threshold`` is the
    colour distance from the background above which a pixel is a stroke.
    """
    _check_nchw(sketch, "sketch")
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
        border = torch.cat(
            [rgb[:, :, 0, :], rgb[:, :, -1, :], rgb[:, :, :, 0], rgb[:, :, :, -1]], dim=-1
        )
        bg = border.median(dim=-1).values.view(-1, 3, 1, 1)
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
