"""Geometric augmentation of (photo, sketch, matte) batches, on the device, with kornia.

Two modes (DESIGN.md, "Augmentation"):

- ``all`` (default): photo, sketch and matte get the *same* random flip (p = 0.5), rotation
  (+-15 deg) and translation (+-50 px at 1024 px, scaled with the resolution), so the strokes
  and the matte stay on the hair of the target; the sketch alone then gets a small extra
  translation (``jitter``, a few px at 1024) so the model learns tolerance to sloppy strokes
  without learning that strokes are only a loose hint. The photo must be VAE-encoded after the
  warp, every step.
- ``seed`` (the published method): only sketch and matte are warped, together; the photo is
  returned untouched (same object), so its latent can be computed once and cached.

Random parameters come from a CPU ``torch.Generator`` (reproducible and resumable whatever the
device); the warps run where the images are. Padding: zeros for the sketch (its canonical
background is black) and the matte (no hair comes in from outside), reflection for the photo
(no black wedges that the model would have to reproduce). The warped matte is re-binarised at
0.5; it is feathered afterwards like any matte.

Matte growth (HairDiff's addition, DESIGN.md "Matte growth"): users paint the matte over the old
hair *and* where the new hair goes, so where the new hair is shorter the model must paint skin,
neck or background inside the matte. :func:`grow_matte` grows the (warped) training matte beyond
the hair with probability ``p``: a disk dilation of 16-64 px at 1024 (scaled), plus up to three
elliptic blobs (radii 40-160 px at 1024) centred on the grown band, so joined to it. The sketch is
left as it is (it shows only the real hair), and the target inside the grown region is the photo
itself, i.e. its own skin or background. ``p = 0`` returns the matte untouched and draws nothing
from the generator: exactly the behaviour without growth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

AUGMENT_MODES = ("all", "seed", "none")
REFERENCE_RESOLUTION = 1024


@dataclass
class AugmentSettings:
    mode: str = "all"
    flip_p: float = 0.5
    max_rotation_deg: float = 15.0
    max_translate_px: float = 50.0  # at 1024 px, scaled with the resolution
    sketch_jitter_px: float = 4.0  # at 1024 px, scaled; "all" mode only

    def __post_init__(self) -> None:
        if self.mode not in AUGMENT_MODES:
            raise ValueError(f"unknown augmentation mode {self.mode!r}; choose one of {AUGMENT_MODES}")


@dataclass
class MatteGrowth:
    """How the training matte grows beyond the hair (lengths in px at 1024, scaled)."""

    p: float = 0.5
    min_dilate_px: float = 16.0
    max_dilate_px: float = 64.0
    max_blobs: int = 3
    blob_min_px: float = 40.0
    blob_max_px: float = 160.0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.p) <= 1.0:
            raise ValueError(f"matte growth probability must be in [0, 1], got {self.p}")
        if not 0.0 <= self.min_dilate_px <= self.max_dilate_px or not 0.0 < self.blob_min_px <= self.blob_max_px:
            raise ValueError(
                "matte growth: need 0 <= min_dilate_px <= max_dilate_px and 0 < blob_min_px <= blob_max_px"
            )

    @property
    def draws(self) -> int:
        """Uniform draws per batch item (always the same, so the generator's stream is fixed)."""
        return 3 + 4 * int(self.max_blobs)


@dataclass
class AugmentParams:
    flip: torch.Tensor  # (B,) bool
    angle: torch.Tensor  # (B,) degrees
    translate: torch.Tensor  # (B, 2) px (x, y)
    jitter: torch.Tensor  # (B, 2) px, sketch only


def sample_params(
    batch: int, height: int, width: int, settings: AugmentSettings, generator: torch.Generator | None = None
) -> AugmentParams:
    """Draw one set of parameters per batch item (always the same number of draws, so the
    generator's stream does not depend on the mode)."""
    scale = math.sqrt(height * width) / REFERENCE_RESOLUTION
    flip = torch.rand(batch, generator=generator) < settings.flip_p
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * settings.max_rotation_deg
    translate = (torch.rand(batch, 2, generator=generator) * 2 - 1) * settings.max_translate_px * scale
    jitter = (torch.rand(batch, 2, generator=generator) * 2 - 1) * settings.sketch_jitter_px * scale
    return AugmentParams(flip=flip, angle=angle, translate=translate, jitter=jitter)


def affine_matrices(
    params: AugmentParams, height: int, width: int, extra_translate: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, 2, 3) pixel-space matrices (kornia's ``align_corners=True`` convention):
    flip about the centre, rotate about the centre, then translate."""
    from kornia.geometry.transform import get_rotation_matrix2d

    b = params.angle.shape[0]
    center = torch.tensor([(width - 1) / 2.0, (height - 1) / 2.0]).expand(b, 2)
    rot = get_rotation_matrix2d(center, params.angle.float(), torch.ones(b, 2))
    eye = torch.eye(3).expand(b, 3, 3).clone()
    flip = eye.clone()
    flip[params.flip, 0, 0] = -1.0
    flip[params.flip, 0, 2] = width - 1.0
    rot3 = eye.clone()
    rot3[:, :2] = rot
    move = eye.clone()
    shift = params.translate.float() if extra_translate is None else params.translate.float() + extra_translate.float()
    move[:, :2, 2] = shift
    return (move @ rot3 @ flip)[:, :2]


def _warp(x: torch.Tensor, matrices: torch.Tensor, padding_mode: str) -> torch.Tensor:
    from kornia.geometry.transform import warp_affine

    m = matrices.to(device=x.device, dtype=torch.float32)
    out = warp_affine(
        x.float(), m, dsize=tuple(x.shape[-2:]), mode="bilinear", padding_mode=padding_mode, align_corners=True
    )
    return out.to(x.dtype)


def augment_batch(
    photo: torch.Tensor,
    sketch: torch.Tensor,
    matte: torch.Tensor,
    settings: AugmentSettings,
    generator: torch.Generator | None = None,
    params: AugmentParams | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment a batch: photo (B,3,H,W), canonical sketch (B,3,H,W), binary matte (B,1,H,W).

    Returns (photo, sketch, matte); in ``seed`` mode the photo is the input object itself.
    """
    b, _, h, w = photo.shape
    if params is None:
        params = sample_params(b, h, w, settings, generator)
    if settings.mode == "none":
        return photo, sketch, matte
    shared = affine_matrices(params, h, w)
    matte_out = (_warp(matte, shared, "zeros") > 0.5).to(matte.dtype)
    if settings.mode == "seed":
        return photo, _warp(sketch, shared, "zeros").clamp(0, 1), matte_out
    photo_out = _warp(photo, shared, "reflection").clamp(0, 1)
    sketch_m = affine_matrices(params, h, w, extra_translate=params.jitter)
    sketch_out = _warp(sketch, sketch_m, "zeros").clamp(0, 1)
    return photo_out, sketch_out, matte_out


# -- matte growth ----------------------------------------------------------------------------
def _dilate_disk(matte: torch.Tensor, radius: float) -> torch.Tensor:
    """(1, 1, H, W) binary matte dilated by a disk of ``radius`` px (kornia). Computed on a grid
    coarsened so that the disk is at most ~8 cells wide (the edge is then off by < one cell,
    which the feathering blurs away); always a superset of the input."""
    import torch.nn.functional as F
    from kornia.morphology import dilation

    if radius < 1:
        return matte
    h, w = matte.shape[-2:]
    f = max(1, math.ceil(radius / 8))
    coarse = F.max_pool2d(matte.float(), f, stride=f, ceil_mode=True) if f > 1 else matte.float()
    rc = radius / f
    k = int(math.ceil(rc))
    yy, xx = torch.meshgrid(torch.arange(-k, k + 1.0), torch.arange(-k, k + 1.0), indexing="ij")
    kernel = ((yy**2 + xx**2) <= rc**2 + 1e-6).float().to(matte.device)
    grown = dilation(coarse, kernel, engine="unfold")
    if f > 1:
        grown = grown.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)[..., :h, :w]
    return torch.maximum(grown.to(matte.dtype), matte)


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float, angle: float, device) -> torch.Tensor:
    yy = torch.arange(h, device=device, dtype=torch.float32).view(h, 1) - cy
    xx = torch.arange(w, device=device, dtype=torch.float32).view(1, w) - cx
    c, s = math.cos(angle), math.sin(angle)
    u, v = xx * c + yy * s, -xx * s + yy * c
    return (((u / rx) ** 2 + (v / ry) ** 2) <= 1.0).float()


def grow_matte(matte: torch.Tensor, growth: MatteGrowth, generator: torch.Generator | None = None) -> torch.Tensor:
    """Grow a batch of binary mattes (B, 1, H, W) beyond the hair at random; see the module
    docstring. Returns a new tensor (every grown matte contains its input) or, with ``p = 0``,
    the input itself.

    Args:
        matte: binary mattes in {0, 1}, on any device.
        growth: probability and sizes (px at 1024, scaled with sqrt(H x W)).
        generator: CPU generator of the random draws (a fixed number per item when ``p > 0``).
    """
    if growth.p <= 0:
        return matte
    b, _, h, w = matte.shape
    scale = math.sqrt(h * w) / REFERENCE_RESOLUTION
    u = torch.rand(b, growth.draws, generator=generator).tolist()
    out = matte.clone()
    for i in range(b):
        ui = u[i]
        m = matte[i : i + 1]
        if ui[0] >= growth.p or not bool(m.any()):
            continue
        radius = (growth.min_dilate_px + ui[1] * (growth.max_dilate_px - growth.min_dilate_px)) * scale
        grown = _dilate_disk(m, radius)
        band = (grown > 0.5) & ~(m > 0.5)
        anchor = band if bool(band.any()) else grown > 0.5
        where = torch.nonzero(anchor[0, 0]).cpu()
        blobs = min(int(ui[2] * (growth.max_blobs + 1)), growth.max_blobs)
        for k in range(blobs):
            up, ua, ub, uang = ui[3 + 4 * k : 7 + 4 * k]
            cy, cx = where[min(int(up * len(where)), len(where) - 1)].tolist()
            ry = (growth.blob_min_px + ua * (growth.blob_max_px - growth.blob_min_px)) * scale
            rx = (growth.blob_min_px + ub * (growth.blob_max_px - growth.blob_min_px)) * scale
            blob = _ellipse(h, w, cy, cx, max(ry, 1.0), max(rx, 1.0), uang * math.pi, matte.device)
            grown = torch.maximum(grown, blob.to(grown.dtype)[None, None])
        out[i : i + 1] = grown
    return out
