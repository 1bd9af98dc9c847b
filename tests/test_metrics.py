"""Known-answer tests for hairdiff_core.evaluation.metrics: constructed images whose right score is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hairdiff_core.errors import InputError
from hairdiff_core.evaluation import metrics as Mt
from hairdiff_core.method.mask import gaussian_blur, soft_mask

S = 256


def texture(seed: int, mean, amp: float = 0.08, size: int = S) -> torch.Tensor:
    """Smooth random texture around a mean colour, well inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    n = gaussian_blur(torch.rand(1, 3, size, size, generator=g) - 0.5, 1.0)
    n = n / n.std() * amp
    return (torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) + n).clamp(0.02, 0.98)


def disc_matte(size: int = S, radius: float = 70.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= radius**2).float().view(1, 1, size, size)


def box_matte(size: int = S, t=64, b=192, l=64, r=192) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    m[..., t:b, l:r] = 1
    return m


# -- distance transform ---------------------------------------------------------------------------
def test_distance_to_matches_brute_force_below_cap():
    g = torch.Generator().manual_seed(3)
    f = torch.rand(2, 1, 40, 37, generator=g) > 0.97
    f[1] = False
    f[1, 0, 5, 5] = True
    cap = 9
    d = Mt.distance_to(f, cap)
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(37), indexing="ij")
    for b in range(2):
        pts = torch.nonzero(f[b, 0]).float()
        grid = torch.stack([yy, xx], -1).float().view(-1, 1, 2)
        brute = (grid - pts.view(1, -1, 2)).norm(dim=-1).min(dim=1).values.view(40, 37)
        assert torch.allclose(d[b, 0], brute.clamp(max=cap), atol=1e-5)


def test_distance_to_empty_feature_is_cap():
    d = Mt.distance_to(torch.zeros(1, 1, 10, 10, dtype=torch.bool), 4)
    assert torch.all(d == 4)


# -- preservation -----------------------------------------------------------------------------------
def test_untouched_photo_has_infinite_psnr_outside():
    photo = texture(1, (0.5, 0.4, 0.3))
    matte = disc_matte()
    edited = photo.clone()
    edited[matte.expand_as(photo) > 0] = 0.0  # the hair changes completely, nothing else does
    out = Mt.preservation(edited, photo, matte)
    assert math.isinf(float(out["psnr_out"][0])) and float(out["psnr_out"][0]) > 0
    assert float(out["mae_out"][0]) == 0.0


def test_preservation_known_offset_outside():
    photo = texture(2, (0.5, 0.5, 0.5))
    matte = box_matte()
    r = 4
    result = photo + 0.1  # a constant 0.1 error everywhere: MSE 0.01 -> 20 dB, MAE 0.1
    out = Mt.preservation(result, photo, matte, dilation=r)
    assert float(out["psnr_out"][0]) == pytest.approx(20.0, abs=1e-3)
    assert float(out["mae_out"][0]) == pytest.approx(0.1, abs=1e-5)
    # The dilated band is excluded: an error only within r px of the matte does not count.
    near = photo.clone()
    near[..., 64 - r : 64, 64:192] += 0.2
    assert math.isinf(float(Mt.preservation(near, photo, matte, dilation=r)["psnr_out"][0]))
    assert not math.isinf(float(Mt.preservation(near, photo, matte, dilation=r - 1)["psnr_out"][0]))


# -- seam -------------------------------------------------------------------------------------------
def test_hard_paste_scores_worse_than_feathered_blend():
    photo = texture(4, (0.7, 0.6, 0.5))
    new_hair = texture(5, (0.25, 0.2, 0.15))
    matte = disc_matte()
    hard = photo * (1 - matte) + new_hair * matte
    m = soft_mask(matte, 6.0)
    feathered = photo * (1 - m) + new_hair * m
    s_hard = float(Mt.seam(hard, matte)[0])
    s_feather = float(Mt.seam(feathered, matte)[0])
    s_none = float(Mt.seam(photo, matte)[0])
    assert s_hard > 2.0
    assert s_hard > 2.0 * s_feather
    assert 0.6 < s_feather < 1.3
    assert 0.8 < s_none < 1.25  # a stationary texture has nothing special on the boundary
    # The baseline's seam sits on the latent grid, a few px off the matte: still found.
    grown = (Mt.distance_to(matte > 0.5, 4) <= 2).float()
    assert float(Mt.seam(photo * (1 - grown) + new_hair * grown, matte)[0]) > 2.0


def test_seam_is_one_for_flat_image():
    flat = torch.full((1, 3, 64, 64), 0.5)
    assert float(Mt.seam(flat, box_matte(64, 16, 48, 16, 48))[0]) == pytest.approx(1.0)


# -- sketch adherence -------------------------------------------------------------------------------
def stroke_sketch(offset: int = 0, colour=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """Strokes on black: three vertical and one horizontal line inside the box matte."""
    sk = torch.zeros(1, 3, S, S)
    c = torch.tensor(colour).view(1, 3, 1, 1)
    for x in (90, 128, 166):
        sk[..., 80:176, x + offset : x + offset + 3] = c
    sk[..., 150 + offset : 153 + offset, 80:176] = c
    return sk


def draw(photo: torch.Tensor, sketch: torch.Tensor, ink=(0.1, 0.08, 0.05)) -> torch.Tensor:
    """The photo with flat hair in the matte and the strokes drawn in ``ink``."""
    out = photo.clone()
    out[..., 64:192, 64:192] = 0.55
    alpha = (sketch.amax(1, keepdim=True) > 0.5).float()
    ink_t = torch.tensor(ink).view(1, 3, 1, 1)
    return out * (1 - alpha) + ink_t * alpha


def test_result_that_draws_exactly_the_strokes_scores_best():
    photo = texture(6, (0.6, 0.5, 0.4))
    matte = box_matte()
    sketch = stroke_sketch()
    exact = draw(photo, sketch)
    shifted = draw(photo, stroke_sketch(offset=12))
    blank = draw(photo, torch.zeros_like(sketch))
    c_exact = float(Mt.sketch_adherence(exact, sketch, matte)["sketch_chamfer"][0])
    c_shift = float(Mt.sketch_adherence(shifted, sketch, matte)["sketch_chamfer"][0])
    c_blank = float(Mt.sketch_adherence(blank, sketch, matte)["sketch_chamfer"][0])
    assert c_exact < 0.01
    assert c_exact < c_shift < c_blank
    # A result without any edge in the matte gets the cap on both sides.
    assert c_blank == pytest.approx(round(Mt.CHAMFER_CAP * S) / S, abs=1e-6)


def test_no_strokes_in_matte_gives_nan():
    photo = texture(6, (0.6, 0.5, 0.4))
    out = Mt.sketch_adherence(photo, torch.zeros(1, 3, S, S), box_matte())
    assert math.isnan(float(out["sketch_chamfer"][0]))
    assert math.isnan(float(out["stroke_color_de"][0]))


def test_stroke_colour_agreement():
    photo = texture(7, (0.6, 0.5, 0.4))
    matte = box_matte()
    orange = (0.9, 0.45, 0.1)
    sketch = stroke_sketch(colour=orange)
    wide = torch.zeros_like(sketch)
    wide[..., 80:176, 84:172] = torch.tensor(orange).view(1, 3, 1, 1)  # wide coloured patch
    same = photo.clone()
    same[..., 64:192, 64:192] = torch.tensor(orange).view(1, 3, 1, 1)
    blue = photo.clone()
    blue[..., 64:192, 64:192] = torch.tensor((0.1, 0.2, 0.8)).view(1, 3, 1, 1)
    de_same = float(Mt.sketch_adherence(same, wide, matte)["stroke_color_de"][0])
    de_blue = float(Mt.sketch_adherence(blue, wide, matte)["stroke_color_de"][0])
    assert de_same < 1.0
    assert de_blue > 50.0
    # Pencil strokes (white after normalisation) carry no colour: undefined, not zero.
    pencil = Mt.sketch_adherence(same, stroke_sketch(), matte)["stroke_color_de"]
    assert math.isnan(float(pencil[0]))


# -- colour consistency -----------------------------------------------------------------------------
def test_colour_consistency_known_lab_difference():
    skin = (0.8, 0.6, 0.5)
    hair = (0.3, 0.2, 0.1)
    source = torch.tensor(skin).view(1, 3, 1, 1).expand(1, 3, S, S).clone()
    matte = disc_matte()
    result = source * (1 - matte) + torch.tensor(hair).view(1, 3, 1, 1) * matte
    out = Mt.color_consistency(result, source, matte)
    lab_skin = Mt.rgb_to_lab(torch.tensor(skin).view(1, 3, 1, 1))[0, :, 0, 0]
    lab_hair = Mt.rgb_to_lab(torch.tensor(hair).view(1, 3, 1, 1))[0, :, 0, 0]
    assert float(out["consistency_de"][0]) == pytest.approx(float((lab_hair - lab_skin).norm()), rel=1e-4)
    assert float(out["consistency_dl"][0]) == pytest.approx(float(lab_hair[0] - lab_skin[0]), rel=1e-4)
    same = Mt.color_consistency(source, source, matte)
    assert float(same["consistency_de"][0]) == pytest.approx(0.0, abs=1e-4)


# -- harmony tracking -------------------------------------------------------------------------------
@pytest.mark.parametrize("gain", ["warm", "cool", "dim"])
def test_harmony_tracking_known_ratio(gain):
    photo = texture(8, (0.5, 0.45, 0.4), amp=0.05)
    hair = texture(9, (0.35, 0.3, 0.25), amp=0.05)
    matte = disc_matte()
    result = photo * (1 - matte) + hair * matte
    photo_g = Mt.apply_gain(photo, gain)
    g = torch.tensor(Mt.GAINS[gain]).view(1, 3, 1, 1)
    follows = result * g  # no clipping at these levels
    ignores = photo_g * (1 - matte) + hair * matte
    half = photo_g * (1 - matte) + hair * g.sqrt() * matte
    assert float(Mt.harmony_tracking(result, follows, photo, photo_g, matte)[0]) == pytest.approx(1.0, abs=1e-3)
    assert float(Mt.harmony_tracking(result, ignores, photo, photo_g, matte)[0]) == pytest.approx(0.0, abs=1e-3)
    assert float(Mt.harmony_tracking(result, half, photo, photo_g, matte)[0]) == pytest.approx(0.5, abs=1e-3)


def test_apply_gain_rejects_unknown_name():
    with pytest.raises(InputError, match="warm"):
        Mt.apply_gain(torch.rand(1, 3, 8, 8), "sepia")


# -- leakage ----------------------------------------------------------------------------------------
def test_leakage_positive_when_old_hair_survives():
    photo = texture(10, (0.6, 0.5, 0.45))
    old_hair = texture(11, (0.2, 0.15, 0.1), amp=0.15)
    new_hair = texture(12, (0.7, 0.5, 0.2), amp=0.15)
    matte = disc_matte()
    source = photo * (1 - matte) + old_hair * matte
    leaky = source * (1 - matte) + (0.7 * old_hair + 0.3 * new_hair) * matte  # from the photo
    clean = source * (1 - matte) + new_hair * matte  # from the filled photo
    out = Mt.leakage(leaky, clean, source, matte)
    assert float(out["leak_color"][0]) > 5.0
    assert float(out["leak_edges"][0]) > 0.0
    none = Mt.leakage(clean, clean, source, matte)
    assert float(none["leak_color"][0]) == 0.0 and float(none["leak_edges"][0]) == 0.0


# -- the bundle, inputs, errors ---------------------------------------------------------------------
def test_compute_metrics_keys_batch_and_numpy_inputs():
    photo = texture(13, (0.6, 0.5, 0.4), size=128)
    matte = box_matte(128, 32, 96, 32, 96)
    sketch = torch.zeros(1, 3, 128, 128)
    sketch[..., 40:90, 60:62] = 1.0
    result = photo.clone()
    result[..., 32:96, 32:96] = 0.3
    out = Mt.compute_metrics(torch.cat([photo, result]), photo, sketch, matte, source_seam=True)
    assert set(out) == {
        "psnr_out",
        "mae_out",
        "sketch_chamfer",
        "stroke_color_de",
        "seam",
        "seam_source",
        "consistency_de",
        "consistency_dl",
    }
    assert all(v.shape == (2,) for v in out.values())
    assert math.isinf(float(out["psnr_out"][0])) and math.isinf(float(out["psnr_out"][1]))
    assert float(out["seam"][1]) > float(out["seam"][0])
    # numpy HWC uint8 gives the same answer as the tensor.
    as_u8 = lambda t: (t[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # noqa: E731
    q = lambda t: torch.from_numpy(as_u8(t)).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    by_np = Mt.compute_metrics(as_u8(result), as_u8(photo), as_u8(sketch), (matte[0, 0].numpy() * 255).astype(np.uint8))
    by_t = Mt.compute_metrics(q(result), q(photo), q(sketch), matte)
    for k in by_t:
        assert torch.allclose(by_np[k], by_t[k], equal_nan=True), k


def test_size_mismatch_is_a_clear_error():
    with pytest.raises(InputError, match="64x64.*128x128|resize"):
        Mt.preservation(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 128, 128), torch.ones(1, 1, 64, 64))
    with pytest.raises(InputError, match="channels"):
        Mt.seam(torch.rand(1, 5, 32, 32), torch.ones(1, 1, 32, 32))
