"""Image operations shared by the core: one Sobel, one Gaussian blur, one luminance, one RGB.

Masks, losses, metrics, sketch synthesis and the nodes all filter images; each operator lives
here once so that "the same blur" is the same code (and the same numbers) everywhere.
All take and return NCHW float tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InputError

#: Rec. 601 luma weights, the ones PIL's "L" conversion uses, so a greyscale PNG and the luminance
#: of the same picture in RGB agree.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def check_nchw(x: torch.Tensor, what: str) -> None:
    """Raise ``InputError`` naming ``what`` unless ``x`` is a 4-d (B, C, H, W) tensor."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{what} must be a (B, C, H, W) tensor, got {shape}", input=what)


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma (Rec. 601 weights, as PIL's "L")."""
    w = torch.tensor(LUMA_WEIGHTS, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb * w).sum(1, keepdim=True)


def to_rgb(x: torch.Tensor, what: str = "image") -> torch.Tensor:
    """1 channel -> repeated, 3 -> as is, 4 (RGBA) -> the colour channels; else ``InputError``."""
    check_nchw(x, what)
    c = x.shape[1]
    if c == 3:
        return x
    if c == 1:
        return x.repeat(1, 3, 1, 1)
    if c == 4:
        return x[:, :3]
    raise InputError(f"{what} has {c} channels; expected 1, 3 or 4", input=what)


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised Sobel derivatives per channel (kernel / 8, replicate border): (gx, gy).

    The same numbers as ``kornia.filters.spatial_gradient(x, normalized=True)`` (tested), written
    as shifted slices: on the CPU several times faster than kornia's grouped conv, and
    differentiable (the shape loss back-propagates through it).
    """
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dx = p[..., :, 2:] - p[..., :, :-2]
    dy = p[..., 2:, :] - p[..., :-2, :]
    gx = (dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]) / 8
    gy = (dy[..., :, :-2] + 2 * dy[..., :, 1:-1] + dy[..., :, 2:]) / 8
    return gx, gy


def gaussian_kernel1d(sigma: float, radius: int) -> list[float]:
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    return (k / k.sum()).tolist()


#: Above this sigma (px) the blur runs on an area-downsampled copy: a wide Gaussian is smooth, so
#: the result barely changes while the cost stays bounded (a 12-MP matte at sigma 1000 would
#: otherwise take minutes and gigabytes).
EXACT_BLUR_MAX_SIGMA = 32.0
_REDUCED_SIGMA = 8.0


def _reduction(sigma: float) -> int:
    return 1 if sigma <= EXACT_BLUR_MAX_SIGMA else int(math.ceil(sigma / _REDUCED_SIGMA))


def blur_radius(sigma: float) -> int:
    """How far (px) :func:`gaussian_blur` spreads a pixel: pad a crop by this to keep its border clean."""
    if sigma <= 0:
        return 0
    factor = _reduction(sigma)
    return int(math.ceil(3.0 * sigma)) + (0 if factor == 1 else 3 * factor)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, radius ceil(3 sigma), replicate border (edge pixels repeated).

    A matte touching the border stays 1 there. Cost and memory are bounded by the image, not by
    sigma: up to ``EXACT_BLUR_MAX_SIGMA`` the filter is exact; above it, it runs on an
    area-downsampled copy and is upsampled back; a sigma beyond the image is the plain
    per-channel mean. Non-finite or negative sigmas are refused.

    Args:
        x: (B, C, H, W) float tensor.
        sigma: standard deviation in pixels; 0 returns ``x`` unchanged.
    """
    check_nchw(x, "image to blur")
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise InputError(f"blur sigma must be a finite number >= 0, got {sigma}", input="feather")
    if sigma == 0:
        return x
    H, W = x.shape[-2:]
    factor = _reduction(sigma)
    if factor >= max(H, W) or sigma > 3 * max(H, W):
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x).clone()
    if factor > 1:
        small = F.avg_pool2d(x, factor, stride=factor, ceil_mode=True)
        small = gaussian_blur(small, sigma / factor)
        return F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)
    radius = max(1, int(math.ceil(3.0 * sigma)))
    k = gaussian_kernel1d(sigma, radius)
    out = _blur_axis(x, k, radius, axis=-1)
    return _blur_axis(out, k, radius, axis=-2)


def _blur_axis(x: torch.Tensor, k: list[float], radius: int, axis: int) -> torch.Tensor:
    n = x.shape[axis]
    # Edge padding by index (replicate padding refuses pads larger than the side).
    idx = torch.clamp(torch.arange(-radius, n + radius, device=x.device), 0, n - 1)
    p = x.index_select(axis % x.ndim, idx)
    if len(k) <= 31:
        # Shifted slices: ~3x faster than a grouped conv on the CPU for the small kernels that
        # metrics and masks mostly use.
        acc = p.narrow(axis, 0, n) * k[0]
        for i in range(1, len(k)):
            acc.add_(p.narrow(axis, i, n), alpha=k[i])
        return acc
    c = x.shape[1]
    kt = torch.tensor(k, dtype=x.dtype, device=x.device)
    weight = kt.view(1, 1, 1, -1) if axis == -1 else kt.view(1, 1, -1, 1)
    return F.conv2d(p, weight.repeat(c, 1, 1, 1), groups=c)


#: Two sizes have "the same aspect ratio" within this relative tolerance (rounding of a resize).
ASPECT_TOLERANCE = 0.01


def check_same_aspect(
    size: tuple[int, int],
    ref_size: tuple[int, int],
    what: str,
    ref: str = "photo",
    input: str | None = None,
    noun: str | None = None,
) -> None:
    """Refuse ``size`` = (w, h) unless its aspect ratio is ``ref_size``'s within 1%.

    The one wording of the refusal, on tensors (``resize_same_aspect``) and on files' headers
    (the CLI names the files, before any is decoded). ``what``/``ref`` name the two sides,
    ``noun`` what to redraw (default ``what``).
    """
    w, h = size
    W, H = ref_size
    if abs((w / h) / (W / H) - 1.0) > ASPECT_TOLERANCE:
        raise InputError(
            f"the {what} is {w}x{h} but the {ref} is {W}x{H}: different aspect ratios "
            f"({w / h:.3f} vs {W / H:.3f}); draw the {noun or what} on a canvas of {W}x{H} (or any size of "
            f"that aspect ratio)",
            input=input or what.split()[0],
        )


def resize_same_aspect(
    x: torch.Tensor, size: tuple[int, int], what: str, ref: str = "photo", mode: str = "bilinear"
) -> torch.Tensor:
    """Resize ``x`` (B, C, h, w) to ``size`` = (H, W) when the aspect ratios agree within 1%.

    A sketch or matte drawn at another resolution of the same canvas is resized; one of another
    aspect ratio would be distorted, so it is refused with ``InputError`` naming both sizes.

    Args:
        x: the image or mask to fit.
        size: the target (H, W), e.g. the photo's.
        what: how messages name ``x`` (also the error's ``input``), e.g. "sketch".
        ref: how messages name the target, e.g. "photo".
        mode: "bilinear" (antialiased, for images) or "nearest" (for binary masks).
    """
    h, w = x.shape[-2:]
    H, W = size
    if (h, w) == (H, W):
        return x
    check_same_aspect((w, h), (W, H), what, ref, input=what.split()[0])
    if mode == "nearest":
        return F.interpolate(x.float(), size=(H, W), mode="nearest")
    return F.interpolate(x.float(), size=(H, W), mode="bilinear", align_corners=False, antialias=True)
