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
class AugmentParams:
    flip: torch.Tensor  # (B,) bool
    angle: torch.Tensor  # (B,) degrees
    translate: torch.Tensor  # (B, 2) px (x, y)
    jitter: torch.Tensor  # (B, 2) px, sketch only


def sample_params(batch: int, height: int, width: int, settings: AugmentSettings, generator: torch.Generator | None = None) -> AugmentParams:
    """Draw one set of parameters per batch item (always the same number of draws, so the
    generator's stream does not depend on the mode)."""
    scale = math.sqrt(height * width) / REFERENCE_RESOLUTION
    flip = torch.rand(batch, generator=generator) < settings.flip_p
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * settings.max_rotation_deg
    translate = (torch.rand(batch, 2, generator=generator) * 2 - 1) * settings.max_translate_px * scale
    jitter = (torch.rand(batch, 2, generator=generator) * 2 - 1) * settings.sketch_jitter_px * scale
    return AugmentParams(flip=flip, angle=angle, translate=translate, jitter=jitter)


def affine_matrices(params: AugmentParams, height: int, width: int, extra_translate: torch.Tensor | None = None) -> torch.Tensor:
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
    out = warp_affine(x.float(), m, dsize=tuple(x.shape[-2:]), mode="bilinear", padding_mode=padding_mode, align_corners=True)
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
