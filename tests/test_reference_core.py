"""The host-agnostic entry points of reference attention (``joint_attention``, ``ReferenceSchedule``,
``reference_latent_at``, ``ReferenceGating.changes_attention``): what ComfyUI's patch calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hairdiff_core.method.reference import (
    GenerationPassState,
    ReferenceCache,
    ReferenceComplete,
    ReferenceGating,
    ReferencePassState,
    ReferenceSchedule,
    ReferenceSettings,
    joint_attention,
    reference_latent_at,
)

B, HEADS, D, TH, TW, LT = 1, 2, 8, 4, 4, 3
L = TH * TW


def _qkv(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, HEADS, n, D, generator=g) for _ in range(3)]


def _mask() -> torch.Tensor:
    m = torch.zeros(B, 1, TH, TW)
    m[..., 1:3, 1:3] = 1.0
    return m


def test_without_state_it_is_the_plain_joint_attention():
    q, k, v = _qkv(0, L)
    tq, tk, tv = _qkv(1, LT)
    out = joint_attention("slot", q, k, v, tq, tk, tv, None)
    want = F.scaled_dot_product_attention(torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2))
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_reference_pass_stores_the_slot_and_ends_when_complete():
    s = ReferenceSettings(mode="once")
    gating = ReferenceGating(s, _mask(), (TH, TW))
    cache = ReferenceCache()
    q, k, v = _qkv(0, L)
    tq, tk, tv = _qkv(1, LT)
    joint_attention(("block", 0), q, k, v, tq, tk, tv, ReferencePassState(cache, gating, True, expected=2))
    assert list(cache) == [("block", 0)]
    assert cache[("block", 0)][0].shape[2] == gating.kept < L  # the matte's keys are not stored
    with pytest.raises(ReferenceComplete):
        joint_attention(("block", 1), q, k, v, tq, tk, tv, ReferencePassState(cache, gating, True, expected=2))


def test_duplicated_keys_with_unit_weights_are_the_plain_attention():
    s = ReferenceSettings(mode="per_step", weight_inside=1.0, weight_outside=1.0, key_weight_inside=1.0)
    gating = ReferenceGating(s, _mask(), (TH, TW))
    q, k, v = _qkv(0, L)
    tq, tk, tv = _qkv(1, LT)
    cache = ReferenceCache({"s": (k, v)})
    out = joint_attention("s", q, k, v, tq, tk, tv, GenerationPassState(cache, gating, True))
    torch.testing.assert_close(out, joint_attention("s", q, k, v, tq, tk, tv, None), rtol=1e-5, atol=1e-6)


def test_changes_attention():
    m = _mask()
    assert ReferenceGating(ReferenceSettings(mode="once"), m, (TH, TW)).changes_attention()
    zero = ReferenceSettings(mode="once", weight_inside=0.0, weight_outside=0.0)
    assert not ReferenceGating(zero, m, (TH, TW)).changes_attention()
    suppressed = ReferenceSettings(mode="once", weight_inside=0.0, weight_outside=0.0, suppress_self_outside=0.5)
    assert ReferenceGating(suppressed, m, (TH, TW)).changes_attention()


def test_schedule_once_and_per_step():
    asked = []

    def run(sigma):
        asked.append(sigma)
        return ReferenceCache({"s": sigma})

    once = ReferenceSchedule(ReferenceSettings(mode="once", once_sigma=0.2))
    for i, sigma in enumerate([1.0, 0.7, 0.4]):
        assert once.cache_for(sigma, i, run)["s"] == 0.2
    assert asked == [0.2] and once.passes == 1
    asked.clear()
    per = ReferenceSchedule(ReferenceSettings(mode="per_step"))
    for sigma in [1.0, 1.0, 0.5, 0.5, 0.25]:
        assert per.cache_for(sigma, None, run)["s"] == sigma
    assert asked == [1.0, 0.5, 0.25] and per.passes == 3
    per.clear()
    assert per.cache is None


def test_reference_latent_at():
    x0, noise = torch.full((1, 16, 2, 2), 2.0), torch.full((1, 16, 2, 2), -1.0)
    clean = ReferenceSettings(mode="per_step", reference_noise="clean")
    matched = ReferenceSettings(mode="per_step", reference_noise="matched")
    assert reference_latent_at(clean, x0, noise, 0.5) is x0
    torch.testing.assert_close(reference_latent_at(matched, x0, noise, 0.25), 0.75 * x0 + 0.25 * noise)
