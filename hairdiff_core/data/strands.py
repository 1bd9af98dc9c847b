"""Training sketches synthesised from a photo and its hair matte.

Users have photos and hair mattes, not sketches. This module draws the sketch a training sample
needs, in the canonical sketch format of :mod:`hairdiff_core.method.mask` (strokes in their own colour
on pure black):

- ``strands``: the hair's local orientation is estimated from the luminance inside the matte
  (a smoothed structure tensor, :func:`orientation_field`); streamlines are traced along it from
  well-spread seed points (:func:`trace_streamlines`, all streamlines advanced at once) and drawn
  as strokes whose thickness scales with the resolution (:func:`draw_polylines`).
- ``edges``: Canny edges of the luminance inside the matte, thinned to one pixel, then drawn at
  the same stroke thickness.

Strokes never leave the matte. With ``colour=True`` a strand takes the median hair colour along
it (an edge pixel the local hair colour), so that coloured sketches teach colour; otherwise
strokes are white (shape only). Everything is deterministic for a given ``seed``.

Angles are radians in image coordinates (x to the right, y down), measured from +x towards +y,
and axial: a strand at ``theta`` and one at ``theta + pi`` are the same strand.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..method import mask as M

logger = logging.getLogger(__name__)

STYLES = ("strands", "edges")
SEEDINGS = ("grid", "ridges")
#: Scale (px at 1024) of the "hair around" a highlight for ``seeding="ridges"``.
RIDGE_SIGMA_AT_1024 = 24.0

#: Stroke geometry at 1024 px (geometric-mean side); scaled linearly with the resolution.
STROKE_THICKNESS_AT_1024 = 3.0
STROKE_LENGTH_AT_1024 = 140.0
STEP_AT_1024 = 2.0
#: Smoothing of the structure tensor at 1024 px: about one hair lock wide.
ORIENTATION_SIGMA_AT_1024 = 8.0
#: Fraction of the matte the strokes cover at density 1 (before overlaps).
COVERAGE_AT_DENSITY_1 = 0.18
#: A streamline stops where it would turn by more than this per step (a crossing or a swirl
#: the orientation field cannot resolve).
MAX_TURN_DEGREES = 40.0
#: Edges: the strongest fraction of the edge ridges inside the matte seed the Canny hysteresis
#: at density 1; ridges below the floor (kornia's unnormalised Sobel magnitude, ~8x the
#: luminance slope per px) are noise.
EDGE_STRONG_FRACTION = 0.35
EDGE_NOISE_FLOOR = 0.05
EDGE_MAX_GAIN = 8.0
#: Hysteresis follows a weak edge this far (px at 1024, scaled) from a strong one.
EDGE_MAX_REACH_AT_1024 = 64
#: Stroke colours are kept at least this bright in their brightest channel, so that a stroke of
#: black hair is still a stroke (not background) on the black canvas.
MIN_STROKE_VALUE = 2.0 / 255.0


def resolution_scale(height: int, width: int) -> float:
    """Size of an image relative to 1024 px (geometric-mean side)."""
    return math.sqrt(height * width) / M.REFERENCE_RESOLUTION


def stroke_thickness(height: int, width: int, thickness: float = 1.0) -> float:
    """Stroke width in pixels for an image of this size (3 px at 1024, at least 1)."""
    return max(1.0, STROKE_THICKNESS_AT_1024 * resolution_scale(height, width) * float(thickness))


@dataclass
class Streamlines:
    """Traced polylines. ``points`` (N, L, 2) xy in pixels (pixel i spans [i, i+1), its centre
    is i + 0.5); ``valid`` (N, L) bool, one contiguous run per streamline; ``batch`` (N,) the
    batch item each streamline belongs to."""

    points: torch.Tensor
    valid: torch.Tensor
    batch: torch.Tensor

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def segment_angles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Orientation (radians) and length (px) of every segment between two valid points."""
        d = self.points[:, 1:] - self.points[:, :-1]
        ok = self.valid[:, 1:] & self.valid[:, :-1]
        d = d[ok]
        return torch.atan2(d[:, 1], d[:, 0]), d.norm(dim=1)


# -- input checks ------------------------------------------------------------------------------
def _as_batch(x: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what} must be a torch tensor, got {type(x).__name__}")
    if x.ndim == 2:
        return x[None, None], True
    if x.ndim == 3:
        return x[None], True
    if x.ndim == 4:
        return x, False
    raise InputError(f"{what} must be (B, C, H, W), (C, H, W) or (H, W); got shape {tuple(x.shape)}")


def _matte_batch(matte: torch.Tensor, size: tuple[int, int], batch: int) -> torch.Tensor:
    """Any matte -> (B, 1, H, W) in {0, 1} (soft mattes cut at 0.5)."""
    matte, _ = _as_batch(matte, "matte")
    if tuple(matte.shape[-2:]) != tuple(size):
        raise InputError(
            f"matte is {matte.shape[-1]}x{matte.shape[-2]} but the image is {size[1]}x{size[0]}; "
            "give a matte of the photo's size"
        )
    binary = M.binarize_matte(matte, require_nonempty=False)
    if binary.shape[0] == 1 and batch > 1:
        binary = binary.expand(batch, -1, -1, -1)
    if binary.shape[0] != batch:
        raise InputError(f"matte batch {binary.shape[0]} does not match image batch {batch}; give one matte per image")
    return binary


# -- orientation --------------------------------------------------------------------------------
def orientation_field(
    photo: torch.Tensor, matte: torch.Tensor, sigma: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local strand orientation of the hair inside the matte, from a smoothed structure tensor.

    Args:
        photo: (B, 3, H, W) or (B, 1, H, W) image in [0, 1].
        matte: (B, 1, H, W) hair matte; gradients across the matte's border (hair against
            background) are left out, so the border does not bend the strands along it.
        sigma: smoothing of the tensor in px (default 8 px at 1024, scaled with resolution).

    Returns:
        ``(angle, coherence)``, each (B, 1, H, W): the strand angle in radians (axial, in
        [-pi/2, pi/2)) and the coherence in [0, 1] (1 = one clear direction). Where the hair has
        no texture the strands default to vertical.
    """
    import kornia

    photo, _ = _as_batch(photo, "photo")
    b, _, h, w = photo.shape
    binary = _matte_batch(matte, (h, w), b).to(photo.device)
    lum = M._luminance(photo.float()) if photo.shape[1] >= 3 else photo[:, :1].float()
    grad = kornia.filters.spatial_gradient(lum, mode="sobel", normalized=True)[:, 0]
    gx, gy = grad[:, 0:1], grad[:, 1:2]
    # Sobel reads one pixel around: keep only gradients two pixels inside the matte.
    inner = M.dilate(binary, -2)
    inner = torch.where(inner.flatten(1).any(1).view(-1, 1, 1, 1), inner, binary)
    jxx, jyy, jxy = gx * gx * inner, gy * gy * inner, gx * gy * inner
    if sigma is None:
        sigma = max(1.5, ORIENTATION_SIGMA_AT_1024 * resolution_scale(h, w))
    j = torch.cat([jxx, jyy, jxy], dim=1)
    factor = max(1, int(sigma // 2))
    if factor > 1:
        # A wide blur of a smooth field: done on an area-downsampled grid (sigma 2 there) and
        # interpolated back, ~factor^2 cheaper than at full size, same field to a fraction of a degree.
        small = M.resize_area(j, (max(1, h // factor), max(1, w // factor)))
        j = F.interpolate(
            M.gaussian_blur(small, float(sigma) / factor), size=(h, w), mode="bilinear", align_corners=False
        )
    else:
        j = M.gaussian_blur(j, float(sigma))
    jxx, jyy, jxy = j[:, 0:1], j[:, 1:2], j[:, 2:3]
    # A faint horizontal-gradient prior: untextured hair reads as vertical strands, not as noise.
    energy = (jxx + jyy).flatten(1).mean(1).view(-1, 1, 1, 1)
    jxx = jxx + 1e-3 * energy + 1e-12
    grad_angle = 0.5 * torch.atan2(2 * jxy, jxx - jyy)
    angle = _wrap_axial(grad_angle + math.pi / 2)
    coherence = torch.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy).clamp_min(1e-12)
    return angle, coherence.clamp(0, 1)


def _wrap_axial(angle: torch.Tensor) -> torch.Tensor:
    return torch.remainder(angle + math.pi / 2, math.pi) - math.pi / 2


# -- streamlines --------------------------------------------------------------------------------
def _bilinear(field: torch.Tensor, batch: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Sample (B, C, H, W) at N points (pixel coordinates, centres at i + 0.5) of given batch
    items -> (N, C). One gather over the flattened field: every batch item in one call."""
    b, c, h, w = field.shape
    x = (xy[:, 0] - 0.5).clamp(0, w - 1)
    y = (xy[:, 1] - 0.5).clamp(0, h - 1)
    x0, y0 = x.floor().long().clamp(max=w - 2 if w > 1 else 0), y.floor().long().clamp(max=h - 2 if h > 1 else 0)
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    fx, fy = (x - x0).unsqueeze(1), (y - y0).unsqueeze(1)
    flat = field.permute(0, 2, 3, 1).reshape(b * h * w, c)
    base = batch * (h * w)

    def at(yy, xx):
        return flat[base + yy * w + xx]

    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    return top * (1 - fy) + bottom * fy


def _nearest(field: torch.Tensor, batch: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) at N points, nearest pixel; points outside the image read 0 -> (N,)."""
    b, _, h, w = field.shape
    xi, yi = xy[:, 0].floor().long(), xy[:, 1].floor().long()
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    idx = batch * (h * w) + yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)
    return torch.where(inside, field.reshape(-1)[idx], torch.zeros((), dtype=field.dtype, device=field.device))


def seed_points(
    matte: torch.Tensor, spacing: float, generator: torch.Generator, score: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-spread seeds inside a (B, 1, H, W) matte, one per cell of a ``spacing``-px grid, kept
    where the matte is set: a uniformly jittered point, or with ``score`` ((B, 1, H, W)) the
    cell's best-scoring matte pixel where that score is positive (e.g. :func:`ridge_score`:
    seeds on the visible strands). Returns (xy (N, 2), batch (N,))."""
    b, _, h, w = matte.shape
    spacing = max(1.0, float(spacing))
    if score is not None:
        return _best_in_cells(matte, max(1, int(round(spacing))), generator, score)
    ny, nx = max(1, math.ceil(h / spacing)), max(1, math.ceil(w / spacing))
    jitter = torch.rand((b, ny, nx, 2), generator=generator, dtype=torch.float32)
    gy, gx = torch.meshgrid(torch.arange(ny, dtype=torch.float32), torch.arange(nx, dtype=torch.float32), indexing="ij")
    xy = (torch.stack([gx, gy], dim=-1)[None] + jitter) * spacing
    batch = torch.arange(b).view(b, 1, 1).expand(b, ny, nx)
    xy, batch = xy.reshape(-1, 2).to(matte.device), batch.reshape(-1).to(matte.device)
    keep = _nearest(matte.float(), batch, xy) > 0.5
    return xy[keep], batch[keep]


def _best_in_cells(matte, cell: int, generator, score) -> tuple[torch.Tensor, torch.Tensor]:
    b, _, h, w = matte.shape
    if score.shape[0] != b or score.shape[-2:] != (h, w):
        raise InputError(
            f"seed score must be (B, 1, H, W) like the matte {tuple(matte.shape)}; got {tuple(score.shape)}"
        )
    ny, nx = math.ceil(h / cell), math.ceil(w / cell)
    # A deterministic tie-break: flat regions would otherwise always seed at a cell's corner.
    tie = torch.rand((b, 1, h, w), generator=generator, dtype=torch.float32).to(matte.device) * 1e-6
    sc = torch.where(matte > 0.5, score.float() + tie, torch.full_like(tie, -math.inf))
    sc = F.pad(sc, (0, nx * cell - w, 0, ny * cell - h), value=-math.inf)
    cells = sc.view(b, ny, cell, nx, cell).permute(0, 1, 3, 2, 4).reshape(b, ny, nx, cell * cell)
    best, idx = cells.max(dim=-1)
    gy, gx = torch.meshgrid(torch.arange(ny, device=matte.device), torch.arange(nx, device=matte.device), indexing="ij")
    x = (gx[None] * cell + idx % cell).float() + 0.5
    y = (gy[None] * cell + idx // cell).float() + 0.5
    batch = torch.arange(b, device=matte.device).view(b, 1, 1).expand(b, ny, nx)
    keep = best > 0
    return torch.stack([x[keep], y[keep]], dim=-1), batch[keep]


def ridge_score(photo: torch.Tensor, matte: torch.Tensor, sigma: float) -> torch.Tensor:
    """How much brighter each hair pixel is than the hair around it (luminance minus its
    matte-weighted blur at ``sigma`` px): positive on highlights, the visible strands that an
    artist's strokes follow. (B, 1, H, W)."""
    lum = M._luminance(photo.float())
    binary = (matte > 0.5).float()
    return (lum - _masked_blur(lum, binary, sigma)) * binary


def trace_streamlines(
    angle_field: torch.Tensor,
    matte: torch.Tensor,
    *,
    seed: int = 0,
    density: float = 1.0,
    length: float = 1.0,
    thickness: float = 1.0,
    seeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    step: float | None = None,
    seed_score: torch.Tensor | None = None,
) -> Streamlines:
    """Trace streamlines of an orientation field inside a matte, all at once.

    Each streamline grows both ways from its seed with midpoint (RK2) steps along the field,
    keeping its heading (the field is axial), and stops where it would leave the matte or the
    image, turn sharply, or reach its length (each streamline gets a random length between half
    and all of ``length``). The loop runs over steps; every streamline advances in one tensor op.

    Args:
        angle_field: (B, 1, H, W), (1, H, W) or (H, W) strand angles in radians (see the module
            docstring for the convention); e.g. :func:`orientation_field`, or a known field.
        matte: hair matte of the same size ((B|1, 1, H, W), {0, 1} or soft: cut at 0.5).
        seed: seeds the jitter of the seed points and the stroke lengths.
        density: strokes per area relative to the default (1 covers about 18% of the matte).
        length: stroke length relative to the default (140 px at 1024, scaled with resolution).
        thickness: the stroke thickness relative to the default; density is counted in covered
            area, so thicker strokes mean fewer of them.
        seeds: optional ``(xy (N, 2) px, batch (N,))`` seed points instead of the jittered grid.
        step: step length in px (default 2 px at 1024, scaled, at least 0.5).
        seed_score: optional (B, 1, H, W): each grid cell seeds at its best-scoring pixel, where
            positive (see :func:`seed_points`), instead of at a jittered point.

    Returns:
        :class:`Streamlines` on the field's device.
    """
    angle, _ = _as_batch(angle_field, "angle_field")
    b, _, h, w = angle.shape
    binary = _matte_batch(matte, (h, w), b).to(angle.device)
    scale = resolution_scale(h, w)
    if density <= 0 or length <= 0 or thickness <= 0:
        raise InputError(f"density, length and thickness must be > 0; got {density}, {length}, {thickness}")
    step = float(step) if step is not None else max(0.5, STEP_AT_1024 * scale)
    stroke_len = max(3.0 * step, STROKE_LENGTH_AT_1024 * scale * float(length))
    n_steps = max(1, int(round(stroke_len / 2 / step)))
    generator = torch.Generator().manual_seed(int(seed))
    if seeds is None:
        # One seed per cell of area (stroke area / target coverage): coverage follows density.
        area = stroke_len * stroke_thickness(h, w, thickness) / (COVERAGE_AT_DENSITY_1 * float(density))
        xy0, batch = seed_points(binary, math.sqrt(area), generator, score=seed_score)
    else:
        xy0, batch = seeds[0].to(angle.device, torch.float32), seeds[1].to(angle.device, torch.long)
    n = xy0.shape[0]
    if n == 0:
        empty = torch.zeros((0, 2 * n_steps + 1, 2), device=angle.device)
        return Streamlines(empty, torch.zeros(empty.shape[:2], dtype=torch.bool, device=angle.device), batch)
    limit = (torch.rand(n, generator=generator) * 0.5 + 0.5).mul(n_steps).ceil().long().to(angle.device)

    doubled = torch.cat([torch.cos(2 * angle.float()), torch.sin(2 * angle.float())], dim=1)
    cos_turn = math.cos(math.radians(MAX_TURN_DEGREES))

    def direction(xy, heading):
        v = _bilinear(doubled, batch, xy)
        theta = 0.5 * torch.atan2(v[:, 1], v[:, 0])
        d = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
        flip = (d * heading).sum(1, keepdim=True) < 0
        return torch.where(flip, -d, d)

    start = direction(xy0, torch.tensor([0.0, 1.0], device=angle.device).expand(n, 2))

    def walk(heading):
        pts, ok = [xy0], [torch.ones(n, dtype=torch.bool, device=angle.device)]
        xy, alive = xy0, ok[0]
        for i in range(n_steps):
            d1 = direction(xy, heading)
            d2 = direction(xy + 0.5 * step * d1, d1)
            nxt = xy + step * d2
            alive = alive & (i < limit) & ((d2 * heading).sum(1) >= cos_turn) & (_nearest(binary, batch, nxt) > 0.5)
            xy = torch.where(alive.unsqueeze(1), nxt, xy)
            heading = torch.where(alive.unsqueeze(1), d2, heading)
            pts.append(xy)
            ok.append(alive)
        return torch.stack(pts, 1), torch.stack(ok, 1)

    fwd_p, fwd_ok = walk(start)
    bwd_p, bwd_ok = walk(-start)
    points = torch.cat([bwd_p[:, 1:].flip(1), fwd_p], dim=1)
    valid = torch.cat([bwd_ok[:, 1:].flip(1), fwd_ok], dim=1)
    return Streamlines(points, valid, batch)


# -- drawing ------------------------------------------------------------------------------------
def draw_polylines(
    points: torch.Tensor,
    valid: torch.Tensor | None,
    size: tuple[int, int],
    *,
    batch: torch.Tensor | None = None,
    batch_size: int | None = None,
    colours: torch.Tensor | None = None,
    thickness: float | None = None,
    matte: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rasterise polylines as strokes on a black canvas.

    Every segment between two consecutive valid points is sampled every half pixel into a
    one-pixel centre line, widened to the stroke width (rounded to whole pixels) by a square max
    filter. Where strokes overlap, the later stroke (higher index) wins, decided by a
    deterministic max-reduction, not by write order.

    Args:
        points: (N, L, 2) xy in pixels (pixel centres at i + 0.5), e.g. ``Streamlines.points``.
        valid: (N, L) bool, which points exist (None: all).
        size: (H, W) of the canvas.
        batch: (N,) batch item of each polyline (None: all in item 0).
        batch_size: number of canvases (default: ``batch.max() + 1``, or the matte's batch).
        colours: (N, 3) stroke colours in [0, 1] (None: white).
        thickness: stroke width in px, rounded (default :func:`stroke_thickness` of ``size``).
        matte: optional (B|1, 1, H, W) matte; stroke pixels outside it are removed.

    Returns:
        ``(rgb, alpha)``: (B, 3, H, W) strokes in their colour on black, (B, 1, H, W) in {0, 1}.
    """
    h, w = int(size[0]), int(size[1])
    device = points.device
    n, length = points.shape[0], points.shape[1] if points.ndim == 3 else 0
    if points.ndim != 3 or points.shape[-1] != 2:
        raise InputError(f"points must be (N, L, 2) xy; got shape {tuple(points.shape)}")
    valid = torch.ones(points.shape[:2], dtype=torch.bool, device=device) if valid is None else valid.to(device)
    batch = torch.zeros(n, dtype=torch.long, device=device) if batch is None else batch.to(device, torch.long)
    if batch_size is None:
        batch_size = (
            int(matte.shape[0]) if matte is not None and matte.ndim == 4 else (int(batch.max()) + 1 if n else 1)
        )
    thickness = stroke_thickness(h, w) if thickness is None else float(thickness)
    if colours is None:
        colours = torch.ones((n, 3), device=device)
    colours = colours.to(device, torch.float32)

    ids = torch.full((batch_size * h * w,), -1, dtype=torch.long, device=device)
    if n and length > 1:
        a, b = points[:, :-1].float(), points[:, 1:].float()
        seg_ok = valid[:, :-1] & valid[:, 1:]
        seg_len = (b - a).norm(dim=-1)
        sub = max(1, int(math.ceil(float(seg_len[seg_ok].max()) * 2))) if bool(seg_ok.any()) else 1
        t = torch.arange(sub + 1, dtype=torch.float32, device=device) / sub
        samples = a.unsqueeze(2) + (b - a).unsqueeze(2) * t.view(1, 1, -1, 1)  # (N, L-1, S, 2)
        keep = seg_ok.unsqueeze(2).expand(-1, -1, sub + 1)
        stroke = torch.arange(n, device=device).view(n, 1, 1).expand_as(keep)
        xy, stroke = samples[keep], stroke[keep]
        # Single-point polylines (a seed that could not move) still leave a dot.
        lone = valid.sum(1) == 1
        if bool(lone.any()):
            first = valid.float().argmax(1)
            xy = torch.cat([xy, points[lone, first[lone]].float()])
            stroke = torch.cat([stroke, torch.nonzero(lone).flatten()])
        xi, yi = xy[:, 0].floor().long(), xy[:, 1].floor().long()
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        flat = batch[stroke[inside]] * (h * w) + yi[inside] * w + xi[inside]
        ids.scatter_reduce_(0, flat, stroke[inside], reduce="amax")
    ids = ids.view(batch_size, 1, h, w)
    k = max(1, int(round(thickness)))
    if k > 1 and n:
        # Widen the one-pixel centre lines by a k x k max filter over stroke ids: the same
        # "highest id wins" rule, one pass over the image instead of k^2 stamps per sample.
        # Stroke ids stay exact in float32 below 2^24 strokes.
        padded = F.pad(ids.float(), ((k - 1) // 2, k // 2, (k - 1) // 2, k // 2), value=-1.0)
        ids = F.max_pool2d(padded, k, stride=1).long()
    alpha = (ids >= 0).float()
    if matte is not None:
        alpha = alpha * _matte_batch(matte, (h, w), batch_size).to(device)
    if n == 0:
        return torch.zeros((batch_size, 3, h, w), device=device), alpha
    rgb = colours[ids.clamp_min(0).flatten()].view(batch_size, h, w, 3).permute(0, 3, 1, 2) * alpha
    return rgb.contiguous(), alpha


def stroke_colours(photo: torch.Tensor, lines: Streamlines) -> torch.Tensor:
    """(N, 3) median colour of ``photo`` (B, 3, H, W) along each streamline's valid points."""
    n, length = lines.points.shape[:2]
    if n == 0:
        return torch.zeros((0, 3), device=photo.device)
    batch = lines.batch.view(n, 1).expand(n, length).reshape(-1)
    values = _bilinear(photo.float(), batch, lines.points.reshape(-1, 2)).view(n, length, -1)[..., :3]
    values = torch.where(lines.valid.unsqueeze(-1), values, torch.full_like(values, float("nan")))
    return values.nanmedian(dim=1).values


# -- edges --------------------------------------------------------------------------------------
_NEIGHBOUR_OFFSETS = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))  # P2..P9


def _components(bits: list[int]) -> int:
    """Number of 8-connected groups among the set neighbours of a pixel (its 3x3 ring)."""
    nodes = [i for i in range(8) if bits[i]]
    seen: set[int] = set()
    groups = 0
    for start in nodes:
        if start in seen:
            continue
        groups += 1
        stack = [start]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            yi, xi = _NEIGHBOUR_OFFSETS[i]
            stack.extend(
                j
                for j in nodes
                if j not in seen and max(abs(yi - _NEIGHBOUR_OFFSETS[j][0]), abs(xi - _NEIGHBOUR_OFFSETS[j][1])) == 1
            )
    return groups


def _thinning_table() -> torch.Tensor:
    """(256,) bool: whether a set pixel whose neighbours P2..P9 (bit i = P(i+2)) form the index
    may go: it is simple (its set neighbours form one 8-connected group and one of its
    4-neighbours is background, so removing it neither splits a line nor opens a hole) and it is
    no line end (three or more neighbours, so two-pixel staircases are not eaten from the ends,
    as Zhang-Suen does to Canny's diagonal edges)."""
    table = torch.zeros(256, dtype=torch.bool)
    for code in range(256):
        p = [(code >> i) & 1 for i in range(8)]
        border = not (p[0] and p[2] and p[4] and p[6])
        table[code] = border and sum(p) >= 2 and _components(p) == 1
    return table


_THIN_TABLE = _thinning_table()


def thin(mask: torch.Tensor, max_iters: int = 64) -> torch.Tensor:
    """Thin a (B, 1, H, W) {0, 1} mask to 8-connected lines one pixel wide.

    Parallel thinning over four subfields (pixels of one parity of row and of column): pixels of
    one subfield are never neighbours, so removing all of its removable pixels at once keeps the
    topology. Each pass is one convolution (the 8 neighbours packed into a byte) and one table
    lookup over the whole image; stops when nothing changes. Spurs up to two pixels long that
    stick out of a junction are cut at the end."""
    x = (mask > 0.5).float()
    h, w = x.shape[-2:]
    weights = torch.zeros(1, 1, 3, 3, dtype=torch.float32, device=x.device)
    for bit, (dy, dx) in enumerate(_NEIGHBOUR_OFFSETS):
        weights[0, 0, 1 + dy, 1 + dx] = float(1 << bit)
    table = _THIN_TABLE.to(x.device)
    rows = torch.arange(h, device=x.device).view(h, 1) % 2
    cols = torch.arange(w, device=x.device).view(1, w) % 2
    subfields = [(rows == r) & (cols == c) for r, c in ((0, 0), (1, 1), (0, 1), (1, 0))]
    ones = torch.ones(1, 1, 3, 3, dtype=torch.float32, device=x.device)
    ones[0, 0, 1, 1] = 0
    for _ in range(4):
        for _ in range(max_iters):
            changed = False
            for field in subfields:
                code = F.conv2d(x, weights, padding=1).round().long()
                remove = table[code] & (x > 0) & field
                if bool(remove.any()):
                    x = x.masked_fill(remove, 0.0)
                    changed = True
            if not changed:
                break
        # Subfield thinning leaves a comb of short spurs along a thick stroke's skeleton: cut
        # line ends next to a junction (three or more neighbours), then thin what that frees.
        count = F.conv2d(x, ones, padding=1) * x
        spur = (count == 1) & (F.max_pool2d((count >= 3).float(), 3, stride=1, padding=1) > 0)
        if not bool(spur.any()):
            break
        x = x.masked_fill(spur, 0.0)
    return x


def _hysteresis(graded: torch.Tensor, max_reach: int, check_every: int = 8) -> torch.Tensor:
    """Canny hysteresis on graded edges (1 strong, 0.5 weak): weak pixels 8-connected to a
    strong one are kept, up to ``max_reach`` px along the weak chain (one 3x3 max filter per
    px; an unbounded walk costs one filter per px of the longest weak chain, hundreds at 1024).
    kornia's own tracking does eight convolutions per round."""
    weak = (graded > 0.25).float()
    reach = (graded > 0.75).float()
    for i in range(max(1, int(max_reach))):
        grown = F.max_pool2d(reach, 3, stride=1, padding=1) * weak
        if i % check_every == check_every - 1 and torch.equal(grown, reach):
            break
        reach = grown
    return reach


def _masked_blur(photo: torch.Tensor, matte: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur of the photo inside the matte only (normalised convolution): the local hair colour."""
    num = M.gaussian_blur(photo * matte, sigma)
    den = M.gaussian_blur(matte, sigma)
    return torch.where(den > 1e-6, num / den.clamp_min(1e-6), photo)


def edge_sketch(
    photo: torch.Tensor, matte: torch.Tensor, *, colour: bool = False, density: float = 1.0, thickness: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canny edges of the hair inside the matte, thinned, drawn ``thickness``-scaled; returns
    ``(rgb, alpha)`` like :func:`draw_polylines`.

    The hysteresis thresholds adapt to each photo: the strong threshold is a quantile of the
    edge-ridge magnitudes inside the matte (the top ``EDGE_STRONG_FRACTION * density``), the weak
    one half of it, so sharp and soft hair give alike many edges; ridges below
    ``EDGE_NOISE_FLOOR`` (sensor and JPEG noise) never count, measured on the luminance
    contrast-stretched inside the matte so that dark hair keeps its edges."""
    b, _, h, w = photo.shape
    sigma = max(0.8, 1.5 * resolution_scale(h, w))
    width = stroke_thickness(h, w, thickness)
    reach = max(16, round(EDGE_MAX_REACH_AT_1024 * resolution_scale(h, w)))
    # Work on the matte's bounding box (hair is often a small part of a portrait), with a margin
    # wider than every filter so that the crop changes nothing inside the matte.
    box = _matte_box(matte, margin=int(math.ceil(3 * max(sigma, width))) + 4)
    rgb = torch.zeros_like(photo, dtype=torch.float32)
    alpha = torch.zeros_like(matte, dtype=torch.float32)
    if box is None:
        return rgb, alpha
    crop = (Ellipsis, slice(box[0], box[1]), slice(box[2], box[3]))
    rgb[crop], alpha[crop] = _edges_in_box(
        photo[crop], matte[crop], colour=colour, density=density, sigma=sigma, width=width, reach=reach
    )
    return rgb, alpha


def _matte_box(matte: torch.Tensor, margin: int) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the union of the mattes of a batch, grown by ``margin``
    (top and left rounded down to even) and clipped to the image; None for an empty matte."""
    rows = torch.nonzero(matte.amax(dim=(0, 1, 3)) > 0.5).flatten()
    cols = torch.nonzero(matte.amax(dim=(0, 1, 2)) > 0.5).flatten()
    if rows.numel() == 0:
        return None
    h, w = matte.shape[-2:]
    # Even top and left: :func:`thin`'s subfields follow the parity of row and column.
    top, left = max(0, int(rows[0]) - margin), max(0, int(cols[0]) - margin)
    return top - top % 2, min(h, int(rows[-1]) + 1 + margin), left - left % 2, min(w, int(cols[-1]) + 1 + margin)


def _edges_in_box(
    photo: torch.Tensor, matte: torch.Tensor, *, colour: bool, density: float, sigma: float, width: float, reach: int
) -> tuple[torch.Tensor, torch.Tensor]:
    import kornia

    b = photo.shape[0]
    lum = M._luminance(photo.float())
    # Dark hair has little contrast: stretch the hair's luminance (2-98 percentiles, gain at most
    # EDGE_MAX_GAIN so that flat, noisy hair does not become all edges) before the noise floor.
    stretched = []
    for i in range(b):
        values = lum[i][matte[i] > 0.5]
        if values.numel() > 1_000_000:  # torch.quantile's input limit; a regular subsample suffices
            values = values[:: values.numel() // 1_000_000 + 1]
        lo, hi = torch.quantile(values, values.new_tensor([0.02, 0.98])) if values.numel() else (0.0, 1.0)
        stretched.append((lum[i] - lo) / max(float(hi - lo), 1.0 / EDGE_MAX_GAIN))
    lum = torch.stack(stretched)
    k = 2 * int(math.ceil(2.5 * sigma)) + 1
    # The matte's own border is the silhouette, not a strand: keep edges a few px inside.
    inner = M.dilate(matte, -max(1, int(round(sigma)) + 1))
    ridges, _ = kornia.filters.canny(
        lum,
        low_threshold=EDGE_NOISE_FLOOR,
        high_threshold=EDGE_NOISE_FLOOR,
        kernel_size=(k, k),
        sigma=(sigma, sigma),
        hysteresis=False,
    )
    ridges = ridges.float() * inner
    q = min(max(1.0 - EDGE_STRONG_FRACTION * float(density), 0.0), 0.99)
    high = []
    for i in range(b):
        values = ridges[i][ridges[i] > EDGE_NOISE_FLOOR]
        if values.numel() > 1_000_000:  # torch.quantile's input limit; a regular subsample suffices
            values = values[:: values.numel() // 1_000_000 + 1]
        high.append(torch.quantile(values, q) if values.numel() else ridges.new_tensor(float("inf")))
    high_t = torch.stack(high).view(-1, 1, 1, 1).clamp_min(EDGE_NOISE_FLOOR)
    graded = (ridges > high_t).float() + 0.5 * ((ridges > 0.5 * high_t) & (ridges > EDGE_NOISE_FLOOR)).float()
    lines = thin(_hysteresis(graded, max_reach=reach))
    radius = int(round((width - 1) / 2))
    alpha = (M.dilate(lines, radius) if radius > 0 else lines) * matte
    if colour:
        rgb = _masked_blur(photo.float(), matte, max(1.0, width))
        rgb = _keep_visible(rgb.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    else:
        rgb = torch.ones_like(photo)
    return rgb * alpha, alpha


def _keep_visible(colours: torch.Tensor) -> torch.Tensor:
    """Lift colours (..., 3) whose brightest channel is below ``MIN_STROKE_VALUE``."""
    peak = colours.amax(-1, keepdim=True)
    return torch.where(peak < MIN_STROKE_VALUE, colours + (MIN_STROKE_VALUE - peak), colours).clamp(0, 1)


# -- entry point --------------------------------------------------------------------------------
def sketch_from_field(
    angle_field: torch.Tensor,
    matte: torch.Tensor,
    *,
    photo: torch.Tensor | None = None,
    seed: int = 0,
    density: float = 1.0,
    length: float = 1.0,
    thickness: float = 1.0,
    seed_score: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strand strokes along a given orientation field, drawn exactly as ``synthesize_sketch``
    draws them from an estimated one (for a caller who knows the true field, e.g. synthetic hair).

    Args:
        angle_field: (B, 1, H, W) strand angles in radians (module convention).
        matte: (B|1, 1, H, W) hair matte; strokes stay inside it.
        photo: (B, 3, H, W) in [0, 1]: strokes take its median colour along them; None: white.
        seed, density, length, thickness: as in :func:`synthesize_sketch`.
        seed_score: where strokes start (see :func:`trace_streamlines`); None: a jittered grid.

    Returns:
        ``(rgb, alpha)``: (B, 3, H, W) strokes on black and (B, 1, H, W) stroke mask.
    """
    angle, _ = _as_batch(angle_field, "angle_field")
    b, _, h, w = angle.shape
    binary = _matte_batch(matte, (h, w), b).to(angle.device)
    lines = trace_streamlines(
        angle, binary, seed=seed, density=density, length=length, thickness=thickness, seed_score=seed_score
    )
    colours = None
    if photo is not None:
        photo_b, _ = _as_batch(photo, "photo")
        colours = _keep_visible(stroke_colours(photo_b.float(), lines))
    logger.debug("traced %d streamlines for %d image(s)", len(lines), b)
    return draw_polylines(
        lines.points,
        lines.valid,
        (h, w),
        batch=lines.batch,
        batch_size=b,
        colours=colours,
        thickness=stroke_thickness(h, w, thickness),
        matte=binary,
    )


def _strands_in_box(photo, binary, *, colour, seed, density, length, thickness, seeding="grid"):
    """Strands of (B, 3, H, W) hair, computed on the matte's bounding box (every per-pixel step
    costs in proportion to the area, and hair is often a small part of a portrait). Sizes that
    scale with the resolution (smoothing, stroke length and width) follow the whole image."""
    b, _, h, w = photo.shape
    sigma = max(1.5, ORIENTATION_SIGMA_AT_1024 * resolution_scale(h, w))
    box = _matte_box(binary, margin=int(math.ceil(3 * sigma)) + int(math.ceil(stroke_thickness(h, w, thickness))) + 4)
    rgb = torch.zeros_like(photo)
    alpha = torch.zeros_like(binary)
    if box is None:
        return rgb, alpha
    crop = (Ellipsis, slice(box[0], box[1]), slice(box[2], box[3]))
    photo_c, binary_c = photo[crop], binary[crop]
    # trace_streamlines and draw_polylines scale length and width with the size they are given:
    # scale them back up so that a crop draws the strokes of the whole image.
    ratio = resolution_scale(h, w) / resolution_scale(*photo_c.shape[-2:])
    angle, _ = orientation_field(photo_c, binary_c, sigma=sigma)
    score = None
    if seeding == "ridges":
        score = ridge_score(photo_c, binary_c, max(1.5, RIDGE_SIGMA_AT_1024 * resolution_scale(h, w)))
    rgb[crop], alpha[crop] = sketch_from_field(
        angle,
        binary_c,
        photo=photo_c if colour else None,
        seed=seed,
        density=density,
        length=length * ratio,
        thickness=thickness * ratio,
        seed_score=score,
    )
    return rgb, alpha


def synthesize_sketch(
    photo: torch.Tensor,
    matte: torch.Tensor,
    *,
    style: str = "strands",
    colour: bool = False,
    seed: int = 0,
    density: float = 1.0,
    length: float = 1.0,
    thickness: float = 1.0,
    return_alpha: bool = False,
    seeding: str = "grid",
):
    """Draw a training sketch of the hair of a photo: strokes on black, inside the matte.

    Args:
        photo: (B, 3, H, W) or (3, H, W) float RGB in [0, 1].
        matte: hair matte of the same H, W: (B|1, 1, H, W), (1, H, W) or (H, W), {0, 1} or soft
            (cut at 0.5).
        style: ``"strands"`` (streamlines of the hair's orientation field) or ``"edges"``
            (Canny edges of the hair, thinned).
        colour: strokes take the hair's colour (median along a strand, local colour for an
            edge); otherwise white.
        seed: the sketch is a deterministic function of the inputs and this seed (strands:
            seed points and lengths; edges have no randomness and ignore it).
        density: amount of strokes relative to the default (strands: per area; edges: lower
            thresholds).
        length: strand length relative to the default (140 px at 1024; edges ignore it).
        thickness: stroke width relative to the default (3 px at 1024, at least 1 px).
        return_alpha: also return the stroke mask (tells a dark stroke from the background).
        seeding: where strands start (``strands`` style): ``grid`` (a jittered grid: strokes
            spread evenly, anywhere across the strands) or ``ridges`` (each grid cell's brightest
            point relative to the hair around it: strokes lie on the visible highlights, as an
            artist draws them, so a stroke says where a strand is, not only its direction).

    Returns:
        The sketch, same shape as ``photo``, float in [0, 1]; with ``return_alpha`` a tuple
        ``(sketch, alpha)``, alpha with one channel.
    """
    if style not in STYLES:
        raise InputError(f"unknown sketch style {style!r}; choose one of {', '.join(STYLES)}")
    if seeding not in SEEDINGS:
        raise InputError(f"unknown seeding {seeding!r}; choose one of {', '.join(SEEDINGS)}")
    photo_b, squeezed = _as_batch(photo, "photo")
    if photo_b.shape[1] != 3:
        raise InputError(f"photo must have 3 channels (RGB); got {photo_b.shape[1]}")
    b, _, h, w = photo_b.shape
    photo_b = photo_b.float().clamp(0, 1)
    binary = _matte_batch(matte, (h, w), b).to(photo_b.device)
    for name, value in (("density", density), ("length", length), ("thickness", thickness)):
        if not value > 0:
            raise InputError(f"{name} must be > 0; got {value}")

    if style == "edges":
        rgb, alpha = edge_sketch(photo_b, binary, colour=colour, density=density, thickness=thickness)
    else:
        rgb, alpha = _strands_in_box(
            photo_b,
            binary,
            colour=colour,
            seed=seed,
            density=density,
            length=length,
            thickness=thickness,
            seeding=seeding,
        )
    if squeezed:
        rgb, alpha = rgb[0], alpha[0]
    return (rgb, alpha) if return_alpha else rgb
