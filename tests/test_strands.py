"""Sketch synthesis (hairdiff_core.data.strands): known answers on striped synthetic hair."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hairdiff_core.data import strands as S
from hairdiff_core.errors import InputError
from hairdiff_core.method.mask import gaussian_blur


def striped_hair(size: int, degrees: float, colour=(0.4, 0.25, 0.1), period: float | None = None):
    """A photo whose hair (an ellipse) has stripes running at ``degrees`` (image coordinates,
    x right, y down), drawn like training/synthetic.py draws them; and its matte."""
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    across = math.radians(degrees) + math.pi / 2  # the stripes vary across their direction
    period = period or max(3.0, size / 8)
    phase = (np.cos(across) * xx + np.sin(across) * yy) / period
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * phase)
    inside = ((yy - h * 0.45) / (h * 0.3)) ** 2 + ((xx - w * 0.5) / (w * 0.35)) ** 2 <= 1.0
    hair = np.asarray(colour, np.float32) * (0.6 + 0.4 * stripes[..., None])
    photo = np.where(inside[..., None], hair, np.asarray([0.8, 0.7, 0.6], np.float32))
    return torch.from_numpy(photo).permute(2, 0, 1).float().contiguous(), torch.from_numpy(inside.astype(np.float32))[
        None
    ]


def mean_orientation(alpha: torch.Tensor) -> float:
    """Dominant line orientation (degrees, [0, 180)) of a rendered stroke mask, measured from the
    picture alone: the structure tensor of the slightly blurred strokes, summed over the image."""
    a = gaussian_blur(alpha.reshape(1, 1, *alpha.shape[-2:]).float(), 1.5)[0, 0].double().numpy()
    gy, gx = np.gradient(a)
    jxx, jyy, jxy = (gx * gx).sum(), (gy * gy).sum(), (gx * gy).sum()
    return math.degrees(0.5 * math.atan2(2 * jxy, jxx - jyy) + math.pi / 2) % 180.0


def angle_error(measured: float, expected: float) -> float:
    return abs((measured - expected + 90.0) % 180.0 - 90.0)


@pytest.mark.parametrize("degrees", [0, 30, 60, 90, 135])
def test_strands_follow_the_stripes(degrees):
    photo, matte = striped_hair(96, degrees)
    sketch, alpha = S.synthesize_sketch(photo, matte, seed=1, return_alpha=True)
    assert alpha.sum() > 50
    assert angle_error(mean_orientation(alpha), degrees) <= 10.0
    # The orientation field itself, inside the matte (doubled-angle mean: the field is axial).
    angle, coherence = S.orientation_field(photo[None], matte[None])
    inside = matte[None] > 0.5
    a = angle[inside]
    field_mean = math.degrees(0.5 * math.atan2(float(torch.sin(2 * a).mean()), float(torch.cos(2 * a).mean())))
    assert angle_error(field_mean, degrees) <= 3.0
    assert float(coherence[inside].median()) > 0.8


def test_strands_follow_the_synthetic_datasets_own_sketch():
    """On training/synthetic.py's samples (random angle each) the strokes run like the sample's
    own ground-truth sketch."""
    from hairdiff_core.method.mask import normalize_sketch
    from training.synthetic import make_sample_arrays

    rng = np.random.default_rng(11)
    for _ in range(3):
        photo, matte, sketch = (torch.from_numpy(a) for a in make_sample_arrays(96, rng)[:3])
        photo = photo.permute(2, 0, 1).float() / 255
        matte = matte[None].float() / 255
        _, truth = normalize_sketch(sketch.permute(2, 0, 1)[None].float() / 255)
        _, alpha = S.synthesize_sketch(photo, matte, seed=0, return_alpha=True)
        assert angle_error(mean_orientation(alpha), mean_orientation(truth)) <= 10.0


@pytest.mark.parametrize("style", S.STYLES)
@pytest.mark.parametrize("colour", [False, True])
def test_strokes_stay_inside_the_matte(style, colour):
    photo, matte = striped_hair(80, 45)
    sketch, alpha = S.synthesize_sketch(photo, matte, style=style, colour=colour, seed=3, return_alpha=True)
    assert sketch.shape == photo.shape and alpha.shape == (1, 80, 80)
    assert 0.0 <= float(sketch.min()) and float(sketch.max()) <= 1.0
    stroke = alpha > 0
    assert int(stroke.sum()) > 30
    assert float((matte[stroke] > 0.5).float().mean()) >= 0.99
    # Strokes on black: nothing drawn where there is no stroke.
    assert float(sketch[:, ~stroke[0]].abs().max()) == 0.0
    if not colour:
        assert torch.equal(sketch[:, stroke[0]], torch.ones_like(sketch[:, stroke[0]]))


@pytest.mark.parametrize("style", S.STYLES)
@pytest.mark.parametrize("hair", [(0.4, 0.25, 0.1), (0.6, 0.5, 0.2), (0.06, 0.05, 0.04)])
def test_colour_strokes_match_the_hair_under_them(style, hair):
    import kornia

    photo, matte = striped_hair(96, 20, colour=hair)
    sketch, alpha = S.synthesize_sketch(photo, matte, style=style, colour=True, seed=0, return_alpha=True)
    stroke = alpha[0] > 0
    assert int(stroke.sum()) > 30
    delta_e = (kornia.color.rgb_to_lab(sketch[None]) - kornia.color.rgb_to_lab(photo[None])).norm(dim=1)[0][stroke]
    assert float(delta_e.mean()) < 10.0
    assert float(delta_e.quantile(0.95)) < 15.0
    # Even black hair leaves strokes visible on the black canvas (the alpha is recoverable).
    assert bool((sketch.amax(0)[stroke] > 0).all())


@pytest.mark.parametrize("style", S.STYLES)
def test_deterministic_for_a_seed(style):
    photo, matte = striped_hair(64, 70)
    a = S.synthesize_sketch(photo, matte, style=style, colour=True, seed=5)
    b = S.synthesize_sketch(photo, matte, style=style, colour=True, seed=5)
    assert torch.equal(a, b)
    if style == "strands":
        assert not torch.equal(a, S.synthesize_sketch(photo, matte, style=style, colour=True, seed=6))


def test_density_length_thickness_change_the_strokes():
    photo, matte = striped_hair(96, 10)
    base = S.synthesize_sketch(photo, matte, seed=2, return_alpha=True)[1].sum()
    denser = S.synthesize_sketch(photo, matte, seed=2, density=3.0, return_alpha=True)[1].sum()
    assert denser > 1.8 * base
    # Density counts covered area: strokes 4x as thick (3.4 px here) are fewer, cover about as much.
    assert S.stroke_thickness(96, 96, 12.0) > 3 * S.stroke_thickness(96, 96, 1.0)
    thin_lines = S.trace_streamlines(torch.zeros(1, 96, 96), matte, seed=2)
    thick_lines = S.trace_streamlines(torch.zeros(1, 96, 96), matte, seed=2, thickness=12.0)
    assert len(thick_lines) < 0.5 * len(thin_lines)
    thicker = S.synthesize_sketch(photo, matte, seed=2, thickness=12.0, return_alpha=True)[1].sum()
    assert 0.5 * base < thicker < 3 * base
    short = S.trace_streamlines(torch.zeros(1, 96, 96), matte, seed=2, length=0.3)
    long = S.trace_streamlines(torch.zeros(1, 96, 96), matte, seed=2, length=1.5)
    assert long.valid.sum(1).float().mean() > 2 * short.valid.sum(1).float().mean()


def test_curved_hair_gives_curved_strands():
    """Concentric rings of hair: the estimated field is tangent to the circles everywhere and the
    strands traced on it keep their radius (orientation_field + trace_streamlines, no truth)."""
    size = 96
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    c = size / 2
    radius = torch.hypot(xx - c, yy - c)
    lum = 0.3 + 0.15 * torch.sin(2 * math.pi * radius / 6)
    photo = torch.stack([lum, lum * 0.8, lum * 0.6])[None]
    matte = ((radius > 12) & (radius < 44)).float()[None, None]
    angle, _ = S.orientation_field(photo, matte)
    tangent = torch.atan2(yy - c, xx - c) + math.pi / 2
    error = (torch.remainder(angle[0, 0] - tangent + math.pi / 2, math.pi) - math.pi / 2).abs()[matte[0, 0] > 0.5]
    assert math.degrees(float(error.mean())) < 3 and math.degrees(float(error.max())) < 10
    lines = S.trace_streamlines(angle, matte, seed=0, length=2.0)
    r = torch.hypot(lines.points[..., 0] - c, lines.points[..., 1] - c)
    mid = lines.points.shape[1] // 2
    assert float(((r - r[:, mid : mid + 1]).abs() * lines.valid).amax()) < 1.5
    assert float((lines.points[:, 0] - lines.points[:, -1]).norm(dim=1).max()) > 15


def lic_hair(size: int, seed: int = 0):
    """Hair-like texture of a known, wavy orientation field: blurred white noise smeared along
    the field (line integral convolution). Returns (photo (3, H, W), matte (1, H, W), field)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    field = math.pi / 2 + 0.6 * torch.sin(2 * math.pi * xx / size) + 0.4 * torch.cos(3 * math.pi * yy / size)
    noise = gaussian_blur(torch.rand((1, 1, size, size), generator=g), 0.7)
    total, count = noise.clone(), 1
    for sign in (1.0, -1.0):
        x, y = xx.clone(), yy.clone()
        for _ in range(size // 6):
            theta = field[y.long().clamp(0, size - 1), x.long().clamp(0, size - 1)]
            x, y = x + sign * 0.7 * torch.cos(theta), y + sign * 0.7 * torch.sin(theta)
            grid = torch.stack([x / size * 2 - 1, y / size * 2 - 1], -1)[None]
            total += torch.nn.functional.grid_sample(noise, grid, align_corners=False, padding_mode="border")
            count += 1
    texture = total / count
    lum = (0.35 + 0.12 * (texture - texture.mean()) / texture.std()).clamp(0, 1)[0, 0]
    photo = torch.stack([lum, lum * 0.75, lum * 0.5])
    matte = (torch.hypot((xx - size / 2) / (0.42 * size), (yy - size * 0.48) / (0.45 * size)) < 1).float()[None]
    return photo, matte, field


def test_strands_follow_a_wavy_hair_texture():
    """Known answer on hair-like texture (not clean stripes): both the estimated field and the
    traced segments stay within a few degrees of the field the texture was smeared along."""
    size = 96
    photo, matte, field = lic_hair(size)
    angle, _ = S.orientation_field(photo[None], matte[None])
    err = (torch.remainder(angle[0, 0] - field + math.pi / 2, math.pi) - math.pi / 2).abs()[matte[0] > 0.5]
    assert math.degrees(float(err.mean())) < 8.0
    lines = S.trace_streamlines(angle, matte, seed=0)
    seg_angle, seg_len = lines.segment_angles()
    ok = lines.valid[:, 1:] & lines.valid[:, :-1]
    mid = ((lines.points[:, 1:] + lines.points[:, :-1]) / 2)[ok].long().clamp(0, size - 1)
    seg_err = (torch.remainder(seg_angle - field[mid[:, 1], mid[:, 0]] + math.pi / 2, math.pi) - math.pi / 2).abs()
    assert math.degrees(float((seg_err * seg_len).sum() / seg_len.sum())) < 8.0


def test_known_field_traces_circles():
    """A caller with the true field: a circular field gives streamlines at constant radius."""
    size = 96
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    cx = cy = size / 2
    angle = torch.atan2(yy - cy, xx - cx) + math.pi / 2  # tangent to circles around the centre
    radius = torch.hypot(xx - cx, yy - cy)
    matte = ((radius > 10) & (radius < 44)).float()
    lines = S.trace_streamlines(angle, matte, seed=0, length=2.0)
    assert len(lines) > 5
    pts = lines.points
    r = torch.hypot(pts[..., 0] - cx, pts[..., 1] - cy)
    r_seed = r[:, pts.shape[1] // 2 : pts.shape[1] // 2 + 1]
    drift = ((r - r_seed).abs() * lines.valid).amax()
    assert float(drift) < 1.0
    # Long lines actually went round: their ends are far apart.
    span = (pts[:, 0] - pts[:, -1]).norm(dim=1)
    assert float(span.max()) > 20
    rgb, alpha = S.draw_polylines(
        lines.points, lines.valid, (size, size), batch=lines.batch, thickness=1.0, matte=matte
    )
    assert rgb.shape == (1, 3, size, size) and alpha.shape == (1, 1, size, size)
    assert float(alpha.sum()) > 100


def test_sketch_from_a_known_field_matches_the_estimated_path():
    """sketch_from_field is the stroke renderer synthesize_sketch uses: given the field it
    estimates, it draws the same sketch; given the true field of clean stripes, nearly the same.
    (The matte spans the picture: synthesize_sketch works on the matte's box, which is then all
    of it.)"""
    photo, matte = striped_hair(80, 60)
    matte[..., 2:-2, 2:-2] = 1.0
    angle, _ = S.orientation_field(photo[None], matte[None])
    sketch, alpha = S.synthesize_sketch(photo[None], matte[None], colour=True, seed=4, return_alpha=True)
    rgb, alpha2 = S.sketch_from_field(angle, matte[None], photo=photo[None], seed=4)
    assert torch.equal(sketch, rgb) and torch.equal(alpha, alpha2)
    true_field = torch.full((1, 1, 80, 80), math.radians(60))
    _, alpha3 = S.sketch_from_field(true_field, matte[None], seed=4)
    assert angle_error(mean_orientation(alpha3), 60) < 5
    assert float((alpha3 * alpha).sum() / alpha.sum()) > 0.5  # mostly the same pixels


def test_draw_polylines_straight_line_and_thickness():
    pts = torch.tensor([[[10.5, 20.5], [50.5, 20.5]]])
    rgb, alpha = S.draw_polylines(pts, None, (40, 64), colours=torch.tensor([[1.0, 0.5, 0.0]]), thickness=1.0)
    assert torch.equal(alpha[0, 0].nonzero()[:, 0].unique(), torch.tensor([20]))
    assert int(alpha.sum()) == 41
    assert torch.allclose(rgb[0, :, 20, 30], torch.tensor([1.0, 0.5, 0.0]))
    _, thick = S.draw_polylines(pts, None, (40, 64), thickness=3.0)
    assert thick[0, 0].nonzero()[:, 0].unique().tolist() == [19, 20, 21]
    # Invalid points are skipped: only the first segment is drawn.
    pts3 = torch.tensor([[[10.5, 5.5], [20.5, 5.5], [30.5, 30.5]]])
    _, part = S.draw_polylines(pts3, torch.tensor([[True, True, False]]), (40, 64), thickness=1.0)
    assert int(part.sum()) == 11


def test_strands_on_the_matte_box_look_like_strands_on_the_whole_image():
    """A portrait with the hair in a corner: the box crop keeps stroke width, length and coverage
    (they follow the whole image's size, not the crop's)."""
    photo, matte = striped_hair(128, 20)
    matte[..., :, :64] = 0
    matte[..., 70:, :] = 0
    angle, _ = S.orientation_field(photo[None], matte[None])
    cropped = sum(
        S.synthesize_sketch(photo, matte, seed=s, thickness=6.0, return_alpha=True)[1].sum() for s in range(6)
    )
    whole = sum(S.sketch_from_field(angle, matte[None], seed=s, thickness=6.0)[1].sum() for s in range(6))
    assert 0.85 < float(cropped / whole) < 1.15  # over a few seeds: few strokes fit in this hair
    _, alpha = S.synthesize_sketch(photo, matte, seed=1, thickness=6.0, return_alpha=True)
    assert angle_error(mean_orientation(alpha), 20) < 10


def test_edges_on_the_matte_box_equal_edges_on_the_whole_image():
    photo, matte = striped_hair(96, 35)
    photo, matte = photo[None], matte[None]
    matte[..., :, :30] = 0  # hair in one corner of the picture: the box is a real crop
    matte[..., 60:, :] = 0
    sigma, width = max(0.8, 1.5 * S.resolution_scale(96, 96)), S.stroke_thickness(96, 96, 4.0)
    for colour in (False, True):
        rgb, alpha = S.edge_sketch(photo, matte, colour=colour, thickness=4.0)
        full_rgb, full_alpha = S._edges_in_box(
            photo, matte, colour=colour, density=1.0, sigma=sigma, width=width, reach=16
        )
        assert int(alpha.sum()) > 20
        assert torch.equal(alpha, full_alpha)
        torch.testing.assert_close(rgb, full_rgb, atol=1e-6, rtol=0)


def test_thin_reduces_a_bar_to_a_line_and_keeps_thin_lines():
    bar = torch.zeros(1, 1, 20, 40)
    bar[..., 8:13, 5:35] = 1
    line = S.thin(bar)
    assert bool((line <= bar).all())
    assert line[..., 10:30].sum(dim=2).flatten().tolist() == [1.0] * 20  # one pixel wide, no gaps
    # Canny's two-pixel diagonal staircase becomes an 8-connected diagonal, end to end.
    stairs = torch.zeros(1, 1, 12, 12)
    for i in range(1, 10):
        stairs[0, 0, i, i] = stairs[0, 0, i, i + 1] = 1
    thinned = S.thin(stairs)
    rows = thinned[0, 0].sum(1)
    assert rows[1:10].min() >= 1 and rows.max() <= 2 and int(thinned.sum()) >= 9
    # A ring stays a closed ring (no hole filled, none opened).
    ring = torch.zeros(1, 1, 12, 12)
    ring[..., 2:9, 2:9] = 1
    ring[..., 4:7, 4:7] = 0
    thinned = S.thin(ring)
    assert float(thinned[..., 4:7, 4:7].sum()) == 0 and int(thinned.sum()) >= 8
    count = torch.nn.functional.conv2d(thinned, torch.ones(1, 1, 3, 3), padding=1) - thinned
    assert bool((count[thinned > 0] == 2).all())  # every ring pixel has exactly two neighbours


def test_batch_and_errors():
    p1, m1 = striped_hair(64, 0)
    p2, m2 = striped_hair(64, 90)
    out = S.synthesize_sketch(torch.stack([p1, p2]), torch.stack([m1, m2]), seed=0)
    assert out.shape == (2, 3, 64, 64)
    assert angle_error(mean_orientation(out[0].amax(0)), 0) < 10
    assert angle_error(mean_orientation(out[1].amax(0)), 90) < 10
    with pytest.raises(InputError, match="unknown sketch style"):
        S.synthesize_sketch(p1, m1, style="pencil")
    with pytest.raises(InputError, match="64x64.*32x32|32x32.*64x64"):
        S.synthesize_sketch(p1, torch.ones(1, 32, 32))
    with pytest.raises(InputError, match="density"):
        S.synthesize_sketch(p1, m1, density=0)
    # An empty matte draws nothing (the caller decides whether that is an error).
    assert float(S.synthesize_sketch(p1, torch.zeros(1, 64, 64)).abs().sum()) == 0.0


def test_ridge_seeding_puts_strokes_on_the_highlights():
    # Wide stripes (period 24 px at 128): grid seeds land anywhere across a stripe, ridge seeds on
    # its bright middle, and the strokes still run along the stripes.
    photo, matte = striped_hair(128, 30.0, period=24.0)
    lum = (0.2126 * photo[0] + 0.7152 * photo[1] + 0.0722 * photo[2])[None, None]
    brightness = {}
    for seeding in ("grid", "ridges"):
        _, alpha = S.synthesize_sketch(photo, matte, seed=3, seeding=seeding, return_alpha=True)
        a = alpha.reshape(1, 1, 128, 128)
        assert a.sum() > 20
        brightness[seeding] = float((lum * a).sum() / a.sum())
        assert abs(mean_orientation(alpha) - 30.0) < 8.0
    hair = float((lum * matte[None]).sum() / matte.sum())
    assert brightness["ridges"] > brightness["grid"] + 0.02
    assert brightness["ridges"] > hair + 0.03


def test_seed_points_with_a_score_take_each_cells_best_positive_pixel():
    matte = torch.ones(1, 1, 8, 8)
    score = torch.full((1, 1, 8, 8), -1.0)
    score[0, 0, 1, 2] = 5.0  # the only positive pixel of the top-left 4x4 cell
    score[0, 0, 6, 6] = 1.0  # and of the bottom-right one
    xy, batch = S.seed_points(matte, 4.0, torch.Generator().manual_seed(0), score=score)
    assert sorted(map(tuple, xy.tolist())) == [(2.5, 1.5), (6.5, 6.5)]
    assert batch.tolist() == [0, 0]
    with pytest.raises(InputError, match="seeding"):
        S.synthesize_sketch(torch.rand(3, 16, 16), torch.ones(16, 16), seeding="random")
    with pytest.raises(InputError, match=r"seed score must be \(B, 1, H, W\)"):
        S.seed_points(matte, 4.0, torch.Generator().manual_seed(0), score=torch.zeros(1, 1, 4, 4))
