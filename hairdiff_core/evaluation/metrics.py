"""Image metrics for HairDiff results: computed from the images and masks alone (no network).

Every function takes torch tensors in [0, 1] — images (B, 3, H, W), mattes and sketches
(B, C, H, W) as ``mask.binarize_matte`` / ``mask.normalize_sketch`` accept them — or, for
convenience, numpy arrays (H, W[, C]) / (B, H, W, C), uint8 or float. Each returns one value per
batch item (a float tensor of shape (B,)); NaN where a metric is undefined for that item (e.g. no
strokes inside the matte). All lengths are given in pixels at a 1024-px reference side and scaled
with the image's geometric-mean side ``s = sqrt(H W) / 1024``, like the feather sigma.

Notation: ``I`` the result, ``P`` the source photo, ``M`` the binary matte (matte > 0.5),
``d_out(x)`` the Euclidean distance of an outside pixel to the matte, ``d_in(x)`` that of an
inside pixel to the background (1 for pixels touching the boundary, 0 on the other side).

- ``preservation``: ``O = {d_out > r}`` (r = 10 px = one feather sigma by default, so the
  feathered band where the composite blends is partly counted).
  ``MSE = mean_{O, c} (I - P)^2``, ``PSNR = 10 log10(1 / MSE)`` dB (inf when identical),
  ``MAE = mean_{O, c} |I - P|``.
- ``seam``: ``G = |Sobel(I - blur_sigma_hp(I))|`` — gradient magnitude (over RGB) of a
  band-passed result (sigma_hp = 8 px), so a slow feathered ramp contributes little and a pasted
  edge keeps its step. ``P(k)`` = mean of G over the pixels in the 1-px distance bin ``k`` across
  the boundary (k = -4w..-1 inside, 1..4w outside; w = 8 px, one latent cell: the baseline's seam
  sits on the latent grid near the boundary). ``seam = (max_{|k| <= w} P(k) + eps) /
  (mean_{w < |k| <= 4w} P(k) + eps)``. Averaging along the boundary before comparing lets a thin
  edge stand out of texture; the max over the ring finds it wherever it is within w px.
  About 1 when nothing special happens on the boundary, large for a pasted edge. A real edge of
  the photo along the matte also raises it: compare methods on the same data (the evaluation
  reports the source photo's own value as ``seam_source``).
- ``sketch_adherence`` (at an analysis size of at most 512 px a side): strokes
  ``S = stroke alpha & M``; edges ``E`` = non-maximum-suppressed Sobel edges of the result's
  luminance (blur sigma 1 px, magnitude > ``edge_threshold``) inside ``erode(M, 2)``;
  ``chamfer = (mean_{s in S} min(d_E(s), cap) + mean_{e in E} min(d_S(e), cap)) / 2 / sqrt(h w)``
  with ``cap = 0.05 sqrt(h w)`` (so a result without edges scores 0.05, a perfect one ~0).
  ``stroke_color_de``: over coloured stroke pixels (Lab chroma of the stroke > 15; pencil strokes
  are white, chroma 0, and carry no colour), the mean CIE76 ``Delta E`` between the stroke colour
  and the (blurred, sigma 1 px) result under it.
- ``color_consistency``: ``inner = {0 < d_in <= r}`` of the result, ``outer = {0 < d_out <= r}``
  of the source (r = 16 px); mean Lab ``mu``: ``consistency_de = |mu_I(inner) - mu_P(outer)|``
  (Delta E of the means) and ``consistency_dl = mu_I,L(inner) - mu_P,L(outer)`` (signed
  lightness offset; the source's own value on the same bands tells the natural contrast).
- ``harmony_tracking``: with a known per-channel gain ``g`` applied to the photo (``apply_gain``,
  presets ``GAINS``) and a second result ``I_g`` from the gained photo and the same seed:
  ``s_c = log mean_H(I_g,c) - log mean_H(I_c)`` over the hair ``H = erode(M, 2)``,
  ``a_c = log mean_O(P_g,c) - log mean_O(P_c)`` over the outside ``O = {d_out > 10 px}`` (the
  applied shift as measured, clipping included), ``tracking = (s . a) / (a . a)``: 1 = the hair
  follows the scene's light, 0 = it ignores it.
- ``leakage``: results from the photo (A) and from a copy with the hair region filled (B), same
  sketch, matte and seed. ``old_hair_de = mean_H DeltaE(I_A, P)`` (pixelwise), ``old_hair_chamfer``
  the symmetric edge chamfer between ``I_A``'s and ``P``'s edges inside ``H``;
  ``leak_color = old_hair_de(B) - old_hair_de(A)`` and ``leak_edges = chamfer(B) - chamfer(A)``:
  > 0 when the result made from the photo stays closer to the old hair than one that never saw it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..imageops import gaussian_blur, luminance, sobel, to_rgb
from ..method import mask as M

REFERENCE_SIDE = 1024.0

#: Lengths at a 1024-px side (scaled with the image).
PRESERVE_DILATION = 10.0
SEAM_RING = 8.0
SEAM_HIGHPASS_SIGMA = 8.0
CONSISTENCY_BAND = 16.0
INNER_ERODE = 2.0
#: Analysis sizes (max side) for the resolution-independent metrics.
ADHERENCE_SIZE = 512
ANALYSIS_SIZE = 1024
EDGE_THRESHOLD = 0.03
CHAMFER_CAP = 0.05
COLOURED_CHROMA = 15.0
SEAM_EPS = 1e-4

#: Colour gains (R, G, B) for harmony tracking.
GAINS: dict[str, tuple[float, float, float]] = {
    "warm": (1.15, 1.0, 0.82),
    "cool": (0.85, 1.0, 1.18),
    "dim": (0.7, 0.7, 0.7),
}


# -- input handling ----------------------------------------------------------------------------
def as_nchw(x, what: str = "image") -> torch.Tensor:
    """Tensor (B, C, H, W) or numpy (H, W), (H, W, C), (B, H, W, C) -> float tensor (B, C, H, W).

    uint8 arrays are scaled to [0, 1]; float arrays are taken as [0, 1].
    """
    if isinstance(x, torch.Tensor):
        if x.ndim != 4:
            raise InputError(f"{what} must be a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        return x.float()
    if isinstance(x, np.ndarray):
        arr = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        if arr.ndim == 2:
            arr = arr[None, :, :, None]
        elif arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise InputError(f"{what} must be an (H, W[, C]) or (B, H, W, C) array, got shape {x.shape}")
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    raise InputError(f"{what} must be a torch tensor or a numpy array, got {type(x).__name__}")


def _rgb(x, what: str) -> torch.Tensor:
    return to_rgb(as_nchw(x, what), what)


def _same_geometry(*pairs: tuple[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Check that all inputs share H, W and a compatible batch; return them broadcast."""
    (n0, t0) = pairs[0]
    for name, t in pairs[1:]:
        if t.shape[-2:] != t0.shape[-2:]:
            raise InputError(
                f"{name} is {t.shape[-1]}x{t.shape[-2]} but {n0} is {t0.shape[-1]}x{t0.shape[-2]}; "
                f"resize them to the same size before measuring"
            )
    batch = max(t.shape[0] for _, t in pairs)
    for name, t in pairs:
        if t.shape[0] not in (1, batch):
            raise InputError(f"{name} has a batch of {t.shape[0]} but another input has {batch}; give 1 or {batch}")
    return _broadcast(*(t for _, t in pairs))


def _broadcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Expand batch-1 inputs to the common batch (after ``_same_geometry`` checked it)."""
    b = max(t.shape[0] for t in tensors)
    return tuple(t if t.shape[0] == b else t.expand(b, *t.shape[1:]) for t in tensors)


def _matte(matte, what: str = "matte") -> torch.Tensor:
    return M.binarize_matte(as_nchw(matte, what), 0.5, require_nonempty=False)


def _px(value_at_1024: float, h: int, w: int, minimum: int = 1) -> int:
    return max(minimum, int(round(value_at_1024 * math.sqrt(h * w) / REFERENCE_SIDE)))


def _resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _analysis_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, C, H, W) over mask m (B, 1, H, W) and channels -> (B,); NaN where m is empty."""
    m = m.to(x.dtype)
    num = (x * m).sum(dim=(1, 2, 3))
    den = m.sum(dim=(1, 2, 3)) * x.shape[1]
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.full_like(num, float("nan")))


def _masked_channel_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-channel mean over mask -> (B, C); NaN where empty."""
    m = m.to(x.dtype)
    num = (x * m).sum(dim=(2, 3))
    den = m.sum(dim=(2, 3))
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.full_like(num, float("nan")))


# -- geometry ----------------------------------------------------------------------------------
def distance_to(feature: torch.Tensor, cap: int) -> torch.Tensor:
    """Euclidean distance in pixels from every pixel to the nearest True pixel of ``feature``.

    ``feature`` (B, 1, H, W) bool. Exact up to ``cap``, clamped to ``cap`` beyond (and for
    items without any feature pixel). Separable: a row pass (nearest feature left/right by
    cumulative max/min of indices) and a column pass over offsets |k| <= cap,
    ``d^2(y, x) = min_k g(y + k, x)^2 + k^2``; cost O(H W cap), no Python loop per pixel.
    """
    cap = int(max(1, cap))
    f = feature[:, 0].bool()
    B, H, W = f.shape
    far = cap + 1
    xs = torch.arange(W, device=f.device).view(1, 1, W).expand(B, H, W)
    left = torch.where(f, xs, torch.full_like(xs, -(10**7))).cummax(dim=2).values
    right = torch.where(f, xs, torch.full_like(xs, 10**7)).flip(2).cummin(dim=2).values.flip(2)
    g = torch.minimum(xs - left, right - xs).clamp(max=far).float()
    g2 = g * g
    best = g2.clone()
    padded = F.pad(g2, (0, 0, cap, cap), value=float(far * far))
    for k in range(1, min(cap, H) + 1):
        kk = float(k * k)
        nearer = torch.minimum(padded[:, cap + k : cap + k + H], padded[:, cap - k : cap - k + H])
        torch.minimum(best, nearer.add_(kk), out=best)
    return best.sqrt().clamp(max=float(cap)).unsqueeze(1)


def _bbox(inside: torch.Tensor, margin: int) -> tuple[slice, slice] | None:
    """Bounding box of the True pixels of all items, grown by ``margin`` and clipped; None if empty."""
    H, W = inside.shape[-2:]
    rows = torch.nonzero(inside.any(dim=-1).any(dim=0).any(dim=0)).flatten()
    cols = torch.nonzero(inside.any(dim=-2).any(dim=0).any(dim=0)).flatten()
    if not rows.numel():
        return None
    return (
        slice(max(0, int(rows[0]) - margin), min(H, int(rows[-1]) + margin + 1)),
        slice(max(0, int(cols[0]) - margin), min(W, int(cols[-1]) + margin + 1)),
    )


@dataclass
class MatteGeometry:
    """Distances around a binary matte, computed once and shared by the metrics."""

    inside: torch.Tensor  # (B, 1, H, W) bool
    d_in: torch.Tensor  # distance of inside pixels to the background (0 outside), capped
    d_out: torch.Tensor  # distance of outside pixels to the matte (0 inside), capped
    cap: int

    @classmethod
    def of(cls, binary: torch.Tensor, cap: int) -> MatteGeometry:
        """Distances up to ``cap``, computed only on the matte's bounding box grown by ``cap + 1``
        (exact: a pixel farther than ``cap`` from the box is farther than ``cap`` from the matte,
        and the nearest background pixel of an inside pixel within ``cap`` lies in the box)."""
        inside = binary > 0.5
        d_in = torch.zeros(inside.shape, dtype=torch.float32, device=inside.device)
        d_out = torch.full(inside.shape, float(cap), dtype=torch.float32, device=inside.device)
        box = _bbox(inside, cap + 1)
        if box is not None:
            rows, cols = box
            crop = inside[..., rows, cols]
            d_in[..., rows, cols] = distance_to(~crop, cap)
            d_out[..., rows, cols] = distance_to(crop, cap)
            d_in = torch.where(inside, d_in, torch.zeros_like(d_in))
        return cls(inside, d_in, d_out, cap)

    def ring(self, w: float) -> torch.Tensor:
        return (self.inside & (self.d_in <= w)) | (~self.inside & (self.d_out <= w))

    def inner_band(self, lo: float, hi: float) -> torch.Tensor:
        return self.inside & (self.d_in > lo) & (self.d_in <= hi)

    def outer_band(self, lo: float, hi: float) -> torch.Tensor:
        return ~self.inside & (self.d_out > lo) & (self.d_out <= hi)

    def eroded(self, r: float) -> torch.Tensor:
        return self.inside & (self.d_in > r)

    def box(self, margin: int) -> tuple[slice, slice]:
        """Rows and columns of the matte's bounding box (all items) grown by ``margin``."""
        box = _bbox(self.inside, margin)
        return box if box is not None else (slice(None), slice(None))

    def crop(self, rows: slice, cols: slice) -> MatteGeometry:
        return MatteGeometry(
            self.inside[..., rows, cols], self.d_in[..., rows, cols], self.d_out[..., rows, cols], self.cap
        )


# -- image operators ---------------------------------------------------------------------------
def lowpass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Approximately Gaussian blur for large sigma: area-downsample by f = sigma // 2, blur the
    small image, bilinear upsample. sigma at the small scale is reduced so that the box and
    tent filters of the resampling (variances f^2/12 and f^2/6) add up to sigma^2 overall."""
    f = int(sigma // 2)
    if f < 2:
        return gaussian_blur(x, sigma)
    H, W = x.shape[-2:]
    small = F.adaptive_avg_pool2d(x, (max(1, -(-H // f)), max(1, -(-W // f))))
    sigma_small = math.sqrt(max(sigma**2 - f**2 / 4.0, 0.25)) / f
    return F.interpolate(gaussian_blur(small, sigma_small), size=(H, W), mode="bilinear", align_corners=False)


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """sqrt(sum_c gx_c^2 + gy_c^2) -> (B, 1, H, W)."""
    gx, gy = sobel(x)
    return (gx.square() + gy.square()).sum(1, keepdim=True).sqrt()


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> CIE Lab (D65): L in [0, 100], a/b roughly [-128, 127]."""
    import kornia

    return kornia.color.rgb_to_lab(rgb.clamp(0, 1))


def edges(image: torch.Tensor, threshold: float = EDGE_THRESHOLD, blur_sigma: float = 1.0) -> torch.Tensor:
    """Thin edges of the luminance: Sobel magnitude > threshold and a local maximum across the edge.

    Non-maximum suppression compares each pixel with its two neighbours along the gradient
    direction quantised to 0/45/90/135 degrees. Returns (B, 1, H, W) bool.
    """
    lum = gaussian_blur(luminance(image), blur_sigma)
    gx, gy = sobel(lum)
    mag = (gx.square() + gy.square()).sqrt()
    p = F.pad(mag, (1, 1, 1, 1), mode="constant", value=0.0)
    H, W = mag.shape[-2:]

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return p[..., 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]

    angle = torch.atan2(gy, gx)  # [-pi, pi]
    sector = torch.remainder(torch.round(angle / (math.pi / 4)), 4)  # 0: x, 1: diag, 2: y, 3: anti-diag
    n1 = torch.where(
        sector == 0,
        shifted(0, 1),
        torch.where(sector == 1, shifted(1, 1), torch.where(sector == 2, shifted(1, 0), shifted(1, -1))),
    )
    n2 = torch.where(
        sector == 0,
        shifted(0, -1),
        torch.where(sector == 1, shifted(-1, -1), torch.where(sector == 2, shifted(-1, 0), shifted(-1, 1))),
    )
    return (mag > threshold) & (mag >= n1) & (mag >= n2)


def edge_chamfer(
    a: torch.Tensor, b: torch.Tensor, region: torch.Tensor | None = None, cap_fraction: float = CHAMFER_CAP
) -> torch.Tensor:
    """Symmetric truncated chamfer distance between two pixel sets, as a fraction of sqrt(H W).

    ``0.5 (mean_{p in A} min(d_B(p), cap) + mean_{q in B} min(d_A(q), cap)) / sqrt(H W)``,
    ``cap = cap_fraction sqrt(H W)``; an empty side counts as ``cap``. NaN when ``a`` is empty.
    ``region`` restricts both sets.
    """
    if region is not None:
        a = a & region
        b = b & region
    H, W = a.shape[-2:]
    side = math.sqrt(H * W)
    cap = max(1, int(round(cap_fraction * side)))
    d_b = distance_to(b, cap)
    d_a = distance_to(a, cap)
    af, bf = a.float(), b.float()
    na, nb = af.sum(dim=(1, 2, 3)), bf.sum(dim=(1, 2, 3))
    a_to_b = torch.where(na > 0, (d_b * af).sum(dim=(1, 2, 3)) / na.clamp_min(1), torch.full_like(na, float("nan")))
    b_to_a = torch.where(nb > 0, (d_a * bf).sum(dim=(1, 2, 3)) / nb.clamp_min(1), torch.full_like(nb, float(cap)))
    return 0.5 * (a_to_b + b_to_a) / side


# -- the metrics -------------------------------------------------------------------------------
def preservation(
    result, source, matte, dilation: float | None = None, geometry: MatteGeometry | None = None
) -> dict[str, torch.Tensor]:
    """PSNR (dB, inf when untouched) and MAE of the result against the source outside the dilated matte.

    ``dilation`` in pixels of this image (default ``PRESERVE_DILATION`` at 1024 px, scaled);
    Euclidean: a pixel counts when it lies more than ``dilation`` px from the matte.
    ``geometry`` (same size, cap > dilation) saves recomputing the distances.
    """
    result, source, binary = _rgb(result, "result"), _rgb(source, "source"), _matte(matte)
    result, source, binary = _same_geometry(("result", result), ("source", source), ("matte", binary))
    H, W = result.shape[-2:]
    r = _px(PRESERVE_DILATION, H, W) if dilation is None else int(round(dilation))
    if geometry is None or geometry.cap <= r or tuple(geometry.inside.shape[-2:]) != (H, W):
        inside = binary > 0.5
        d_out = distance_to(inside, r + 1)
    else:
        inside, d_out = geometry.inside, geometry.d_out
    outside = ~inside & (d_out > r)
    diff = result - source
    mse = _masked_mean(diff.square(), outside)
    mae = _masked_mean(diff.abs(), outside)
    psnr = torch.where(mse > 0, 10.0 * torch.log10(1.0 / mse.clamp_min(1e-20)), torch.full_like(mse, float("inf")))
    psnr = torch.where(torch.isnan(mse), mse, psnr)
    return {"psnr_out": psnr, "mae_out": mae}


def boundary_profile(g: torch.Tensor, geo: MatteGeometry, reach: int) -> torch.Tensor:
    """Mean of ``g`` (B, 1, H, W) per 1-px distance bin across the matte boundary -> (B, 2 reach).

    Bin ``k`` in -reach..-1 holds inside pixels with ``d_in`` in (|k| - 1, |k|], bin 1..reach
    outside pixels with ``d_out`` in (k - 1, k] (column order -reach..-1, 1..reach); NaN for an
    empty bin. One ``scatter_add`` over the image, no loop over bins.
    """
    B = g.shape[0]
    R = int(reach)
    k_in = torch.ceil(geo.d_in).long()
    k_out = torch.ceil(geo.d_out).long()
    index = torch.where(geo.inside, R - k_in, R + k_out - 1)
    valid = torch.where(geo.inside, (k_in >= 1) & (k_in <= R), (k_out >= 1) & (k_out <= R))
    index = index + torch.arange(B, device=g.device).view(B, 1, 1, 1) * (2 * R)
    flat_index, values = index[valid], g[valid].float()
    sums = torch.zeros(B * 2 * R, device=g.device).scatter_add_(0, flat_index, values)
    counts = torch.zeros(B * 2 * R, device=g.device).scatter_add_(0, flat_index, torch.ones_like(values))
    profile = sums / counts.clamp_min(1)
    return torch.where(counts > 0, profile, torch.full_like(profile, float("nan"))).view(B, 2 * R)


def _seam_from(image: torch.Tensor, geo: MatteGeometry, w: float, highpass: float) -> torch.Tensor:
    w = max(1, int(round(w)))
    reach = 4 * w
    # Only pixels within `reach` of the matte count; the low-pass needs 3 sigma of context more.
    rows, cols = geo.box(reach + int(math.ceil(3 * highpass)) + 2)
    image, geo = image[..., rows, cols], geo.crop(rows, cols)
    g = gradient_magnitude(image - lowpass(image, highpass))
    profile = boundary_profile(g, geo, reach)
    distance = torch.cat([torch.arange(reach, 0, -1), torch.arange(1, reach + 1)]).to(profile.device)
    ring = profile[:, distance <= w]
    bands = profile[:, distance > w]
    peak = torch.where(torch.isnan(ring), torch.full_like(ring, -1.0), ring).amax(dim=1)
    peak = torch.where(peak < 0, torch.full_like(peak, float("nan")), peak)
    return (peak + SEAM_EPS) / (torch.nanmean(bands, dim=1) + SEAM_EPS)


def seam(result, matte, ring: float | None = None, geometry: MatteGeometry | None = None) -> torch.Tensor:
    """Boundary gradient ratio (see the module docstring); ~1 = no seam, >> 1 = pasted edge."""
    image, binary = _rgb(result, "result"), _matte(matte)
    image, binary = _same_geometry(("result", image), ("matte", binary))
    H, W = image.shape[-2:]
    w = float(_px(SEAM_RING, H, W)) if ring is None else float(ring)
    geo = geometry if geometry is not None else MatteGeometry.of(binary, 4 * int(round(w)) + 1)
    sigma = max(1.0, SEAM_HIGHPASS_SIGMA * math.sqrt(H * W) / REFERENCE_SIDE)
    return _seam_from(image, geo, w, sigma)


def sketch_adherence(
    result, sketch, matte, *, edge_threshold: float = EDGE_THRESHOLD, size: int = ADHERENCE_SIZE
) -> dict[str, torch.Tensor]:
    """Edge chamfer between the sketch strokes and the result's edges inside the matte, and
    the colour error under coloured strokes (see the module docstring)."""
    image, binary = _rgb(result, "result"), _matte(matte)
    sketch = as_nchw(sketch, "sketch")
    image, sketch, binary = _same_geometry(("result", image), ("sketch", sketch), ("matte", binary))
    colour, alpha = M.normalize_sketch(sketch)
    h, w = _analysis_size(*image.shape[-2:], size)
    image_a = _resize_to(image, (h, w))
    binary_a = F.adaptive_avg_pool2d(binary, (h, w)) > 0.5
    # A thin stroke must survive downsampling: any stroke pixel in a cell marks the cell.
    strokes = (F.adaptive_max_pool2d(alpha, (h, w)) > 0.5) & binary_a
    erode = _px(INNER_ERODE, h, w)
    # The matte's own outline is where old meets new, not a drawn stroke: edges need to be inside.
    inner = distance_to(~binary_a, erode + 1) > erode
    chamfer = edge_chamfer(strokes, edges(image_a, edge_threshold) & inner)
    return {"sketch_chamfer": chamfer, "stroke_color_de": _stroke_colour_error(image, colour, alpha, binary)}


def _stroke_colour_error(
    image: torch.Tensor, colour: torch.Tensor, alpha: torch.Tensor, binary: torch.Tensor
) -> torch.Tensor:
    """Mean Delta E between coloured stroke pixels and the blurred result under them, at full
    resolution (thin strokes would vanish in a downsampled copy) but only on stroke pixels."""
    out = torch.full((image.shape[0],), float("nan"), device=image.device)
    candidates = (alpha > 0.5) & (binary > 0.5)
    for b in range(image.shape[0]):
        ys, xs = torch.nonzero(candidates[b, 0], as_tuple=True)
        if ys.numel() == 0:
            continue
        stroke_lab = rgb_to_lab(colour[b, :, ys, xs].view(1, 3, -1, 1))
        chroma = stroke_lab[0, 1:3, :, 0].square().sum(0).sqrt()
        keep = chroma > COLOURED_CHROMA
        if not bool(keep.any()):
            continue
        ys, xs = ys[keep], xs[keep]
        top, bottom = int(ys.min()), int(ys.max()) + 1
        left, right = int(xs.min()), int(xs.max()) + 1
        # Blur only the strokes' bounding box (plus the kernel radius), not the whole photo.
        pad = 3
        t0, l0 = max(0, top - pad), max(0, left - pad)
        crop = gaussian_blur(image[b : b + 1, :, t0 : bottom + pad, l0 : right + pad], 1.0)
        result_lab = rgb_to_lab(crop[0, :, ys - t0, xs - l0].view(1, 3, -1, 1))
        de = (result_lab - stroke_lab[:, :, keep]).square().sum(1).sqrt()
        out[b] = de.mean()
    return out


def _masked_lab_mean(image: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean Lab over a mask -> (B, 3), converting only the masked pixels (a thin band)."""
    out = torch.full((image.shape[0], 3), float("nan"), device=image.device)
    for b in range(image.shape[0]):
        ys, xs = torch.nonzero(m[b, 0], as_tuple=True)
        if ys.numel():
            out[b] = rgb_to_lab(image[b, :, ys, xs].view(1, 3, -1, 1)).mean(dim=(0, 2, 3))
    return out


def _consistency_from(image, source, geo: MatteGeometry, r: float) -> dict[str, torch.Tensor]:
    mu_i = _masked_lab_mean(image, geo.inner_band(0.0, r))
    mu_o = _masked_lab_mean(source, geo.outer_band(0.0, r))
    delta = mu_i - mu_o
    return {"consistency_de": delta.square().sum(1).sqrt(), "consistency_dl": delta[:, 0]}


def color_consistency(result, source, matte, band: float | None = None) -> dict[str, torch.Tensor]:
    """Lab mean difference between the result just inside the matte and the source just outside."""
    image, source, binary = _rgb(result, "result"), _rgb(source, "source"), _matte(matte)
    image, source, binary = _same_geometry(("result", image), ("source", source), ("matte", binary))
    H, W = image.shape[-2:]
    r = float(_px(CONSISTENCY_BAND, H, W)) if band is None else float(band)
    return _consistency_from(image, source, MatteGeometry.of(binary, int(math.ceil(r)) + 1), r)


def apply_gain(image, gain) -> torch.Tensor:
    """Multiply the RGB channels by ``gain`` (a name of ``GAINS`` or 3 numbers) and clip to [0, 1]."""
    image = _rgb(image, "image")
    if isinstance(gain, str):
        if gain not in GAINS:
            raise InputError(f"unknown colour gain {gain!r}; choose one of {sorted(GAINS)} or give 3 numbers")
        gain = GAINS[gain]
    g = torch.as_tensor(gain, dtype=image.dtype, device=image.device).flatten()
    if g.numel() != 3:
        raise InputError(f"a colour gain has 3 numbers (R, G, B), got {g.numel()}")
    return (image * g.view(1, 3, 1, 1)).clamp(0, 1)


def harmony_tracking(result, result_gained, source, source_gained, matte) -> torch.Tensor:
    """Least-squares ratio of the hair's log-colour shift to the photo's (1 = follows the light)."""
    result, result_gained = _rgb(result, "result"), _rgb(result_gained, "gained result")
    source, source_gained = _rgb(source, "source"), _rgb(source_gained, "gained source")
    binary = _matte(matte)
    result, result_gained, source, source_gained, binary = _same_geometry(
        ("result", result),
        ("gained result", result_gained),
        ("source", source),
        ("gained source", source_gained),
        ("matte", binary),
    )
    H, W = result.shape[-2:]
    r, r_out = _px(INNER_ERODE, H, W), _px(PRESERVE_DILATION, H, W)
    geo = MatteGeometry.of(binary, max(r, r_out) + 1)
    hair = geo.eroded(r)
    hair = torch.where(hair.flatten(1).any(1).view(-1, 1, 1, 1), hair, geo.inside)
    outside = ~geo.inside & (geo.d_out > r_out)
    eps = 1e-4
    s = torch.log(_masked_channel_mean(result_gained, hair) + eps) - torch.log(_masked_channel_mean(result, hair) + eps)
    a = torch.log(_masked_channel_mean(source_gained, outside) + eps) - torch.log(
        _masked_channel_mean(source, outside) + eps
    )
    aa = a.square().sum(1)
    return torch.where(aa > 1e-8, (s * a).sum(1) / aa.clamp_min(1e-8), torch.full_like(aa, float("nan")))


def leakage(
    result_photo, result_filled, source, matte, *, edge_threshold: float = EDGE_THRESHOLD, size: int = ADHERENCE_SIZE
) -> dict[str, torch.Tensor]:
    """How much closer the result from the photo (A) stays to the old hair than one from the
    hair-filled photo (B): colour (Delta E) and edge (chamfer) distances to the old hair, B - A."""
    a_img, b_img = _rgb(result_photo, "result (photo)"), _rgb(result_filled, "result (filled)")
    source, binary = _rgb(source, "source"), _matte(matte)
    a_img, b_img, source, binary = _same_geometry(
        ("result (photo)", a_img), ("result (filled)", b_img), ("source", source), ("matte", binary)
    )
    h, w = _analysis_size(*a_img.shape[-2:], size)
    a_img, b_img, source = (_resize_to(t, (h, w)) for t in (a_img, b_img, source))
    binary_a = F.adaptive_avg_pool2d(binary, (h, w)) > 0.5
    r = _px(INNER_ERODE, h, w)
    hair = distance_to(~binary_a, r + 1) > r
    lab_src = rgb_to_lab(gaussian_blur(source, 1.0))
    old_edges = edges(source, edge_threshold)

    def distances(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        de = (rgb_to_lab(gaussian_blur(img, 1.0)) - lab_src).square().sum(1, keepdim=True).sqrt()
        return _masked_mean(de, hair), edge_chamfer(old_edges, edges(img, edge_threshold), region=hair)

    de_a, ch_a = distances(a_img)
    de_b, ch_b = distances(b_img)
    return {
        "old_hair_de": de_a,
        "old_hair_chamfer": ch_a,
        "leak_color": de_b - de_a,
        "leak_edges": ch_b - ch_a,
    }


def compute_metrics(
    result, source, sketch, matte, *, edge_threshold: float = EDGE_THRESHOLD, source_seam: bool = False
) -> dict[str, torch.Tensor]:
    """All single-result metrics in one call (shares the matte geometry): preservation, seam,
    sketch adherence, stroke colour and colour consistency; ``source_seam`` adds the source
    photo's own seam score on the same matte (the natural edge strength there)."""
    image, source_t, binary = _rgb(result, "result"), _rgb(source, "source"), _matte(matte)
    sketch = as_nchw(sketch, "sketch")
    image, source_t, sketch, binary = _same_geometry(
        ("result", image), ("source", source_t), ("sketch", sketch), ("matte", binary)
    )
    out = sketch_adherence(image, sketch, binary, edge_threshold=edge_threshold)

    # Seam and consistency at most ANALYSIS_SIZE a side (large photos cost what 1024² does).
    h, w = _analysis_size(*image.shape[-2:], ANALYSIS_SIZE)
    image_a, source_a = _resize_to(image, (h, w)), _resize_to(source_t, (h, w))
    binary_a = (F.adaptive_avg_pool2d(binary, (h, w)) > 0.5).float() if (h, w) != tuple(binary.shape[-2:]) else binary
    ring = float(_px(SEAM_RING, h, w))
    band = float(_px(CONSISTENCY_BAND, h, w))
    geo = MatteGeometry.of(binary_a, int(math.ceil(max(4 * ring, band))) + 1)
    out.update(preservation(image, source_t, binary, geometry=geo))
    sigma = max(1.0, SEAM_HIGHPASS_SIGMA * math.sqrt(h * w) / REFERENCE_SIDE)
    out["seam"] = _seam_from(image_a, geo, ring, sigma)
    if source_seam:
        out["seam_source"] = _seam_from(source_a, geo, ring, sigma)
    out.update(_consistency_from(image_a, source_a, geo, band))
    return out


# -- strand direction --------------------------------------------------------------------------
def strand_orientation(image, matte, *, erode: float = 0.0) -> dict[str, torch.Tensor]:
    """Dominant strand orientation inside the matte, from the structure tensor of the luminance.

    ``J = mean_M [gx^2, gx gy, gy^2]`` over the matte (optionally eroded by ``erode`` px at
    1024, so the matte's own outline does not count); the gradient's dominant angle is
    ``0.5 atan2(2 Jxy, Jxx - Jyy)`` and strands run across it (+90 degrees). Returns
    ``angle`` (radians in [0, pi), x right, y down, per batch item) and ``coherence``
    (``sqrt((Jxx - Jyy)^2 + 4 Jxy^2) / (Jxx + Jyy)``: 1 = one direction everywhere, 0 = none).
    Works on photos and on sketches alike (strokes are lines: their gradients cross them).
    """
    rgb = _rgb(image, "image")
    binary = _matte(matte)
    (rgb, binary) = _same_geometry(("image", rgb), ("matte", binary))
    h, w = rgb.shape[-2:]
    if erode > 0:
        binary = MatteGeometry.of(binary, _px(erode, h, w) + 2).eroded(_px(erode, h, w)).float()
    gx, gy = sobel(luminance(rgb))
    denom = binary.sum(dim=(1, 2, 3)).clamp_min(1)
    jxx = (gx * gx * binary).sum(dim=(1, 2, 3)) / denom
    jxy = (gx * gy * binary).sum(dim=(1, 2, 3)) / denom
    jyy = (gy * gy * binary).sum(dim=(1, 2, 3)) / denom
    gradient_angle = 0.5 * torch.atan2(2 * jxy, jxx - jyy)
    angle = torch.remainder(gradient_angle + math.pi / 2, math.pi)
    coherence = torch.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy).clamp_min(1e-12)
    empty = binary.sum(dim=(1, 2, 3)) == 0
    nan = torch.full_like(angle, float("nan"))
    return {"angle": torch.where(empty, nan, angle), "coherence": torch.where(empty, nan, coherence)}


def orientation_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest difference in degrees between undirected orientations (radians): 0 .. 90."""
    d = torch.remainder(a - b, math.pi)
    return torch.rad2deg(torch.minimum(d, math.pi - d))
