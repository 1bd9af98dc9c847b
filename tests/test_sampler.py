import pytest
import torch

from hairdiff_core.errors import NonFiniteError
from hairdiff_core.method.flow import sampling_sigmas
from hairdiff_core.method.sampler import TransformerDenoiser, replace_sample, soft_mask_sample
from hairdiff_core.method.surgery import widen_input_channels
from hairdiff_core.models.text import zero_text


def _random_velocity(x, sigma, step):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(step)) * 3


def _setup(h=8, w=12):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 16, h, w, generator=g)
    noise = torch.randn(1, 16, h, w, generator=g)
    mask = torch.zeros(1, 1, h, w)
    mask[..., 2:6, 3:9] = 1.0
    mask[..., 1, 3:9] = 0.5  # feathered edge
    return x0, noise, mask


def test_zero_mask_returns_source_unchanged():
    x0, noise, _ = _setup()
    out = soft_mask_sample(_random_velocity, x0, torch.zeros(1, 1, 8, 12), sampling_sigmas(5), noise)
    assert torch.equal(out, x0)


def test_unmasked_pixels_keep_source_at_every_step():
    x0, noise, mask = _setup()
    keep = (mask == 0).expand_as(x0)
    seen = []

    def on_step(step, total, x):
        seen.append(step)
        assert torch.equal(x[keep], x0[keep])

    out = soft_mask_sample(_random_velocity, x0, mask, sampling_sigmas(6), noise, on_step=on_step)
    assert seen == list(range(1, 7))
    inside = (mask == 1).expand_as(x0)
    assert not torch.allclose(out[inside], x0[inside])


def test_full_mask_is_plain_euler():
    x0, noise, _ = _setup()
    sigmas = sampling_sigmas(4)
    out = soft_mask_sample(_random_velocity, x0, torch.ones(1, 1, 8, 12), sigmas, noise)
    x = (1 - sigmas[0].item()) * x0 + sigmas[0].item() * noise
    for i in range(4):
        x = x + (sigmas[i + 1].item() - sigmas[i].item()) * _random_velocity(x, 0, i)
    assert torch.allclose(out, x, atol=1e-5)


def test_exact_velocity_recovers_source():
    x0, noise, mask = _setup()
    out = soft_mask_sample(lambda x, s, i: noise - x0, x0, mask, sampling_sigmas(10), noise)
    assert torch.allclose(out, x0, atol=1e-5)


def test_strength_zero_returns_source():
    x0, noise, mask = _setup()
    assert torch.equal(soft_mask_sample(_random_velocity, x0, mask, sampling_sigmas(8, strength=0.0), noise), x0)


def test_nan_is_reported():
    x0, noise, mask = _setup()
    with pytest.raises(NonFiniteError, match="bf16 or fp32"):
        soft_mask_sample(lambda x, s, i: torch.full_like(x, float("nan")), x0, mask, sampling_sigmas(3), noise)


def test_replace_baseline_keeps_outside_binary_mask():
    x0, noise, mask = _setup()
    out = replace_sample(_random_velocity, x0, mask, sampling_sigmas(5), noise)
    outside = (mask <= 0.5).expand_as(x0)
    assert torch.equal(out[outside], x0[outside])
    assert not torch.allclose(out[~outside], x0[~outside])


class _Spy:
    """Wraps a transformer and records what it is called with."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.pos_embed = model.pos_embed
        self.config = model.config

    def __call__(self, **kw):
        self.calls.append(kw)
        return self.model(**kw)


def test_timestep_contract_global_sigma_times_1000(tiny_transformer):
    widen_input_channels(tiny_transformer)
    spy = _Spy(tiny_transformer)
    x0, noise, mask = _setup(8, 8)
    emb, pooled = zero_text(tiny_transformer, 1)
    denoise = TransformerDenoiser(spy, torch.randn(1, 16, 8, 8), emb, pooled)
    sigmas = sampling_sigmas(3)
    with torch.no_grad():
        soft_mask_sample(denoise, x0, mask, sigmas, noise)
    got = [float(c["timestep"][0]) for c in spy.calls]
    assert got == pytest.approx([float(s) * 1000 for s in sigmas[:-1]], rel=1e-6)
    assert all(c["hidden_states"].shape[1] == 32 for c in spy.calls)


def test_cfg_runs_one_batch_of_uncond_and_cond(tiny_transformer):
    widen_input_channels(tiny_transformer)
    spy = _Spy(tiny_transformer)
    emb = torch.randn(1, 7, 32)
    pooled = torch.randn(1, 64)
    neg, neg_pooled = zero_text(tiny_transformer, 1, tokens=7)
    x = torch.randn(1, 16, 8, 8)
    sketch = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        guided = TransformerDenoiser(spy, sketch, emb, pooled, neg, neg_pooled, cfg=4.0)(x, 0.5, 0)
        cond = TransformerDenoiser(tiny_transformer, sketch, emb, pooled)(x, 0.5, 0)
        uncond = TransformerDenoiser(tiny_transformer, sketch, neg, neg_pooled)(x, 0.5, 0)
    assert spy.calls[0]["hidden_states"].shape[0] == 2
    assert torch.allclose(guided, uncond + 4.0 * (cond - uncond), atol=1e-5)
