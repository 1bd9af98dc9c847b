"""The training objective: sigma sampling, soft-mask MSE, Sobel shape loss, float32."""

from __future__ import annotations

import pytest
import torch

from hairdiff_core.imageops import sobel
from hairdiff_core.method.flow import shift_sigmas, soft_noise
from hairdiff_core.method.losses import (
    hairdiff_loss,
    masked_mse,
    sample_sigmas,
    sample_u,
    shape_loss,
    training_sigma_table,
)


def test_soft_mask_noising_matches_the_design_formula():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    m = torch.rand(2, 1, 8, 8, generator=g)
    m[:, :, :2] = 0
    m[:, :, -2:] = 1
    sigma = torch.tensor([0.3, 0.9])
    s = sigma.view(-1, 1, 1, 1)
    x_in = soft_noise(x0, eps, sigma, m)
    # x_in = (1-m) x0 + m ((1-sigma) x0 + sigma eps) = per-pixel noise level sigma*m.
    torch.testing.assert_close(x_in, (1 - m) * x0 + m * ((1 - s) * x0 + s * eps))
    torch.testing.assert_close(x_in, (1 - s * m) * x0 + s * m * eps)
    assert torch.equal(x_in[:, :, :2], x0[:, :, :2])  # clean outside the mask


def test_sigma_sampling_follows_diffusers_table():
    table = training_sigma_table(3.0)
    assert len(table) == 1000 and abs(float(table[0]) - 1.0) < 1e-6
    assert abs(float(table[-1]) - float(shift_sigmas(torch.tensor(0.001), 3.0))) < 1e-6
    sig = sample_sigmas(4096, "logit_normal", generator=torch.Generator().manual_seed(0))
    assert sig.dtype == torch.float32 and sig.min() > 0 and sig.max() <= 1
    assert set(sig.tolist()) <= set(table.tolist())
    # logit-normal u centred at 0.5 -> median sigma = shift(0.5) = 0.75.
    assert abs(float(sig.median()) - 0.75) < 0.03
    u = sample_u(4096, "uniform", generator=torch.Generator().manual_seed(0))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    with pytest.raises(ValueError, match="unknown sigma sampling scheme"):
        sample_u(2, "nope")
    same = sample_sigmas(8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(same, sample_sigmas(8, generator=torch.Generator().manual_seed(5)))


def test_background_cannot_dominate():
    pred = torch.zeros(1, 4, 16, 16)
    target = torch.zeros(1, 4, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 6:10, 6:10] = 1
    target[..., ~mask[0, 0].bool()] = 100.0  # huge error everywhere outside the mask
    assert float(masked_mse(pred, target, mask)) == 0.0
    target[..., 6:10, 6:10] = 1.0
    assert float(masked_mse(pred, target, mask)) == pytest.approx(1.0)


def test_mse_is_normalised_by_mask_sum_per_sample():
    pred = torch.zeros(2, 2, 16, 16)
    target = torch.ones(2, 2, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, :2, :2] = 1  # tiny region
    mask[1] = 1  # whole image
    # Same per-pixel error -> same loss, whatever the region size.
    assert float(masked_mse(pred, target, mask)) == pytest.approx(1.0)
    assert float(masked_mse(pred, target, torch.zeros_like(mask))) == 0.0  # empty mask: no NaN


def test_shape_loss_zero_for_identical_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 12, 12, generator=g)
    mask = torch.zeros(2, 1, 12, 12)
    mask[..., 3:9, 3:9] = 1
    assert float(shape_loss(x0, x0, mask)) == 0.0
    assert float(shape_loss(x0 + 5.0, x0, mask)) == pytest.approx(0.0, abs=1e-6)  # shape, not level
    assert float(shape_loss(x0 + torch.randn(2, 16, 12, 12, generator=g), x0, mask)) > 0
    outside = x0.clone()
    outside[..., :, :1] += torch.randn(2, 16, 12, 1, generator=g)  # change only far outside the mask
    assert float(shape_loss(outside, x0, mask)) == 0.0


def test_sobel_detects_edges_in_both_directions():
    x = torch.zeros(1, 1, 8, 8)
    x[..., :, 4:] = 1
    gx, gy = sobel(x)
    assert float(gx.abs().max()) > 0 and float(gy.abs().max()) == 0
    gx, gy = sobel(x.transpose(-1, -2))
    assert float(gy.abs().max()) > 0 and float(gx.abs().max()) == 0


def test_perfect_prediction_has_zero_loss_even_on_feathered_edge():
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    m = torch.rand(2, 1, 8, 8, generator=g)  # soft everywhere
    sigma = torch.tensor([0.4, 0.8])
    x_in = soft_noise(x0, eps, sigma, m)
    terms = hairdiff_loss(eps - x0, x0, eps, x_in, sigma, m, lambda_shape=1.0)
    assert float(terms.mse) == 0.0
    assert float(terms.shape) < 1e-10
    wrong = hairdiff_loss(eps - x0 + 0.1 * torch.randn(2, 16, 8, 8, generator=g), x0, eps, x_in, sigma, m, 0.5)
    assert float(wrong.mse) > 0 and float(wrong.shape) > 0
    assert float(wrong.total) == pytest.approx(float(wrong.mse) + 0.5 * float(wrong.shape), rel=1e-6)


def test_loss_is_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    m = torch.ones(1, 1, 8, 8)
    sigma = torch.tensor([0.5])
    x_in = soft_noise(x0, eps, sigma, m)
    lin = torch.nn.Linear(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = lin(x_in.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        assert v.dtype == torch.bfloat16
        terms = hairdiff_loss(v, x0, eps, x_in, sigma, m, lambda_shape=0.2)
    assert terms.total.dtype == terms.mse.dtype == terms.shape.dtype == torch.float32
    ref = ((v.detach().float() - (eps - x0)) ** 2).mean()
    assert float(terms.mse.detach()) == pytest.approx(float(ref), rel=1e-6)
    terms.total.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
