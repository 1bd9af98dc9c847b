import pytest
import torch

from hairdiff_core.errors import EmptyMaskError, InputError
from hairdiff_core.method import mask as M
from hairdiff_core.method.flow import sampling_sigmas, soft_noise


def _square_matte(size=128, lo=40, hi=88):
    m = torch.zeros(1, 1, size, size)
    m[..., lo:hi, lo:hi] = 1
    return m


def test_soft_mask_range_zero_far_one_inside_monotone():
    soft = M.soft_mask(_square_matte(), sigma=4.0)
    assert soft.min() >= 0 and soft.max() <= 1
    assert soft[0, 0, 64, 64] == pytest.approx(1.0, abs=1e-6)
    assert soft[0, 0, 5, 5] == 0 and soft[0, 0, 64, 10] == 0  # beyond 3 sigma of the edge
    row = soft[0, 0, 64, :64]  # left edge, moving inwards
    assert torch.all(row[1:] >= row[:-1] - 1e-7)
    assert 0 < row[38] < 1 and 0 < row[42] < 1  # a real feather across the edge at 40


def test_feather_sigma_scales_with_resolution():
    assert M.feather_sigma(1024, 1024) == pytest.approx(10.0)
    assert M.feather_sigma(512, 512) == pytest.approx(5.0)


def test_grids_are_area_averages():
    soft = M.soft_mask(_square_matte(), sigma=2.0)
    lat, tok = M.latent_grid(soft), M.token_grid(soft)
    assert lat.shape[-2:] == (16, 16) and tok.shape[-2:] == (8, 8)
    assert lat.mean() == pytest.approx(soft.mean().item(), rel=1e-5)
    assert tok.mean() == pytest.approx(soft.mean().item(), rel=1e-5)


def test_binarize_matte_modes_and_empty():
    rgb = _square_matte().repeat(1, 3, 1, 1) * 0.9
    assert torch.equal(M.binarize_matte(rgb), _square_matte())
    rgba = torch.cat([torch.zeros(1, 3, 128, 128), _square_matte()], 1)
    assert torch.equal(M.binarize_matte(rgba), _square_matte())
    with pytest.raises(EmptyMaskError, match="empty"):
        M.binarize_matte(torch.zeros(1, 1, 8, 8))
    with pytest.raises(InputError, match="2 channels"):
        M.binarize_matte(torch.zeros(1, 2, 8, 8))


@pytest.mark.parametrize("form", ["black_on_white", "white_on_black", "L_black_on_white", "rgba", "colour_on_white"])
def test_sketch_normalisation_one_canonical_form(form):
    strokes = torch.zeros(1, 1, 32, 32)
    strokes[..., 10, 4:28] = 1
    colour = torch.tensor([0.9, 0.7, 0.3]).view(1, 3, 1, 1)
    if form == "black_on_white":
        img = 1 - strokes.repeat(1, 3, 1, 1)
    elif form == "white_on_black":
        img = strokes.repeat(1, 3, 1, 1)
    elif form == "L_black_on_white":
        img = 1 - strokes
    elif form == "rgba":
        img = torch.cat([torch.rand(1, 3, 32, 32) * 0 + colour, strokes], 1)
    else:
        img = torch.where(strokes.bool(), colour.expand(1, 3, 32, 32), torch.ones(1, 3, 32, 32))
    canon, alpha = M.normalize_sketch(img)
    assert torch.equal(alpha, strokes)
    assert torch.count_nonzero(canon * (1 - strokes)) == 0  # black background
    expected = colour if form in ("rgba", "colour_on_white") else torch.ones(1, 3, 1, 1)
    assert torch.allclose(canon[..., 10, 4:28], expected.view(1, 3, 1).expand(1, 3, 24), atol=1e-6)


def test_sigmas_match_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(28)
    ours = sampling_sigmas(28, shift=3.0)
    assert torch.allclose(ours.float(), sched.sigmas.float(), atol=1e-6)
    assert len(sampling_sigmas(10, strength=0.6)) == 7  # 6 steps, like SD3 img2img
    assert sampling_sigmas(10, strength=0.0).tolist() == [0.0]


def test_soft_noise_is_per_pixel_noise_level():
    x0, eps = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    m = torch.rand(1, 1, 8, 8)
    sigma = 0.7
    expected = (1 - sigma * m) * x0 + sigma * m * eps
    assert torch.allclose(soft_noise(x0, eps, sigma, m), expected, atol=1e-6)


def test_matte_from_strokes_fills_what_the_strokes_enclose():
    strokes = torch.zeros(1, 1, 64, 64)
    strokes[..., 16, 16:48] = 1
    strokes[..., 47, 16:48] = 1
    strokes[..., 16:48, 16] = 1
    strokes[..., 16:48, 47] = 1
    strokes[..., 30, 16] = 0  # a 1-px gap: closed by the dilation
    filled = M.fill_enclosed(M.dilate(strokes, 1))
    assert filled[0, 0, 32, 32] == 1 and filled[0, 0, 5, 5] == 0
    assert M.fill_enclosed(strokes)[0, 0, 32, 32] == 0  # the open outline leaks: nothing enclosed
    matte = M.matte_from_strokes(strokes, 4)
    assert matte[0, 0, 32, 32] == 1 and matte[0, 0, 14, 32] == 1 and matte[0, 0, 2, 2] == 0
