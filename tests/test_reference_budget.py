"""Reference key budget (pooled cells, ring around the matte) and the grouped attention kernel.

The grouped kernel (attention per key group, merged by log-sum-exp) is what CUDA uses; here it
is forced with ``attention_kernel="grouped"`` and must equal the float-bias path.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hairdiff_core.errors import InputError
from hairdiff_core.method.reference import ReferenceGating, ReferenceSettings, grouped_attention, reference_attention
from hairdiff_core.method.sampler import TransformerDenoiser
from hairdiff_core.method.surgery import widen_input_channels

H, W = 8, 12  # latent: 4x6 tokens (non-square) of the tiny dual-attention model
TH, TW = H // 2, W // 2
TEXT = 7


def _inputs(batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, noise, sketch = (torch.randn(batch, 16, H, W, generator=g) for _ in range(3))
    text, pooled = torch.randn(batch, TEXT, 32, generator=g), torch.randn(batch, 64, generator=g)
    token_mask = torch.zeros(batch, 1, TH, TW)
    token_mask[..., 1:3, 2:5] = 1.0
    token_mask[..., 0, 2:5] = 0.4  # a feathered edge
    return x0, noise, sketch, text, pooled, token_mask


_spec = importlib.util.spec_from_file_location("_reference_util", Path(__file__).with_name("_reference_util.py"))
_ref_util = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ref_util)
_forward, _with_reference = _ref_util.forward, _ref_util.with_reference


@pytest.fixture
def model(tiny_transformer):
    return widen_input_channels(tiny_transformer)


def test_grouped_attention_equals_one_softmax_with_group_biases():
    g = torch.Generator().manual_seed(0)
    B, Hh, Lq, D = 2, 3, 9, 8
    q = torch.randn(B, Hh, Lq, D, generator=g)
    sizes = (5, 4, 6)
    ks = [torch.randn(B, Hh, n, D, generator=g) for n in sizes]
    vs = [torch.randn(B, Hh, n, D, generator=g) for n in sizes]
    rows = [torch.randn(B, Lq, generator=g) for _ in sizes]
    rows[2][:, -3:] = -math.inf  # some queries never see group 2
    rows[1] = rows[1][:1]  # a bias shared by the batch
    dense = torch.cat([r.expand(B, Lq)[:, :, None].expand(B, Lq, n) for r, n in zip(rows, sizes)], dim=2)
    expected = F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2), attn_mask=dense[:, None])
    got = grouped_attention(q, list(zip(ks, vs, rows)))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # A scalar bias and no bias are the same as constant rows.
    got = grouped_attention(q, [(ks[0], vs[0], None), (ks[1], vs[1], -0.7)])
    expected = F.scaled_dot_product_attention(
        q,
        torch.cat(ks[:2], 2),
        torch.cat(vs[:2], 2),
        attn_mask=torch.cat([torch.zeros(Lq, sizes[0]), torch.full((Lq, sizes[1]), -0.7)], 1),
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


SETTINGS = [
    dict(),
    dict(key_weight_inside=0.3, suppress_self_outside=0.5, weight_inside=0.8),
    dict(key_pool=2),
    dict(key_pool=2, key_weight_inside=0.5),
    dict(key_ring=1),
    dict(blind_reference=False, weight_outside=1.5),
]


def _per_step_with_cfg(model, kernel: str, extra: dict) -> torch.Tensor:
    x0, noise, sketch, text, pooled, mask = _inputs(batch=1, seed=5)
    neg_text, neg_pooled = torch.zeros_like(text), torch.zeros_like(pooled)
    s = ReferenceSettings(mode="per_step", attention_kernel=kernel, **extra)
    with reference_attention(
        model,
        s,
        reference_latent=x0,
        token_mask=mask,
        noise=noise,
        encoder_hidden_states=text,
        pooled_projections=pooled,
    ) as hook:
        d = TransformerDenoiser(model, sketch, text, pooled, neg_text, neg_pooled, cfg=3.0, attention_hook=hook)
        return d(noise, 0.7, 0)


@pytest.mark.parametrize("kernel", ["grouped", "folded"])
@pytest.mark.parametrize(
    "extra", SETTINGS, ids=[",".join(f"{k}={v}" for k, v in e.items()) or "defaults" for e in SETTINGS]
)
@torch.no_grad()
def test_bias_free_kernels_equal_the_bias_path_with_cfg(model, extra, kernel, monkeypatch):
    """grouped: one SDPA per key group merged by log-sum-exp; folded: the biases in extra head
    dimensions, one SDPA call. Neither passes a float mask; both give the float-bias result."""
    import hairdiff_core.method.reference as R

    want = _per_step_with_cfg(model, "bias", extra)
    grouped_calls, masks = [], []
    real_grouped, real_sdpa = R.grouped_attention, R.F.scaled_dot_product_attention
    monkeypatch.setattr(R, "grouped_attention", lambda q, groups: grouped_calls.append(1) or real_grouped(q, groups))
    monkeypatch.setattr(
        R.F, "scaled_dot_product_attention", lambda *a, **kw: masks.append(kw.get("attn_mask")) or real_sdpa(*a, **kw)
    )
    got = _per_step_with_cfg(model, kernel, extra)
    monkeypatch.undo()
    # grouped: every generation attention (joint + attn2) and, when blind, the reference pass's
    assert (len(grouped_calls) >= 2) == (kernel == "grouped")
    assert all(m is None for m in masks)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_folded_attention_is_the_biased_softmax():
    from hairdiff_core.method.reference import _FOLD_DIMS, folded_attention

    g = torch.Generator().manual_seed(3)
    B, H, Lq, Lk, D = 2, 3, 7, 11, 16
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Lq, Lk, Lk))
    q_extra = torch.randn(B, Lq, _FOLD_DIMS, generator=g)
    k_extra = torch.randn(1, Lk, _FOLD_DIMS, generator=g)
    k_extra[:, 3] = 0.0
    q_extra[0, 2, :] = 0.0
    q_extra[0, 2, 0], k_extra[0, 3, 0] = -1e3, 1.0  # "not seen" (the -inf stand-in)
    bias = (q_extra @ k_extra.transpose(1, 2))[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(folded_attention(q, k, v, q_extra, k_extra), want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_grouped_kernel_with_a_batch_of_different_mattes(model):
    """Different stored-key patterns per item: the grouped kernel falls back, same result."""
    x0, noise, sketch, text, pooled, mask = _inputs(batch=2, seed=6)
    mask[1] = torch.flip(mask[1], dims=(-1,))
    mask[1, :, 3, :] = 1.0
    x = torch.randn_like(x0)
    outs = [
        _with_reference(
            model,
            ReferenceSettings(mode="once", attention_kernel=k, key_weight_inside=0.2),
            x,
            sketch,
            0.5,
            x0,
            noise,
            mask,
            text,
            pooled,
        )
        for k in ("bias", "grouped", "folded")
    ]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel", ["bias", "grouped", "folded"])
@torch.no_grad()
def test_zero_weights_equal_the_plain_model_under_the_budget(model, kernel):
    x0, noise, sketch, text, pooled, mask = _inputs(seed=7)
    x = torch.randn_like(x0)
    plain = _forward(model, x, sketch, 0.7, text, pooled)
    for budget in (dict(key_pool=2), dict(key_ring=1), dict(key_pool=2, key_ring=1)):
        s = ReferenceSettings(mode="per_step", weight_inside=0.0, weight_outside=0.0, attention_kernel=kernel, **budget)
        out = _with_reference(model, s, x, sketch, 0.7, x0, noise, mask, text, pooled)
        torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
        s = ReferenceSettings(mode="per_step", attention_kernel=kernel, **budget)
        assert (_with_reference(model, s, x, sketch, 0.7, x0, noise, mask, text, pooled) - plain).abs().max() > 1e-3


def test_pooled_cell_of_identical_keys_attends_like_its_keys():
    """A 2x2 cell holding one key 4 times = one pooled key with bias log(4), exactly;
    border cells with excluded keys count only their visible keys."""
    g = torch.Generator().manual_seed(1)
    th, tw, heads, D = 4, 6, 2, 8
    mask = torch.zeros(1, 1, th, tw)
    mask[..., 0, 0] = 1.0  # one excluded key (dilation 0): its cell keeps 3
    cells = torch.randn(1, heads, th // 2, tw // 2, D, generator=g)
    per_token = cells.repeat_interleave(2, 2).repeat_interleave(2, 3).reshape(1, heads, th * tw, D)
    values = torch.randn(1, heads, th // 2, tw // 2, D, generator=g).repeat_interleave(2, 2).repeat_interleave(2, 3)
    values = values.reshape(1, heads, th * tw, D)
    q = torch.randn(1, heads, th * tw + TEXT, D, generator=g)
    own_k, own_v = (
        torch.randn(1, heads, th * tw + TEXT, D, generator=g),
        torch.randn(1, heads, th * tw + TEXT, D, generator=g),
    )
    outs = []
    for pool in (1, 2):
        s = ReferenceSettings(
            mode="once", key_pool=pool, key_dilate_tokens=0, weight_inside=0.6, suppress_self_outside=0.4
        )
        gating = ReferenceGating(s, mask, (th, tw))
        k, v = gating.compact(per_token), gating.compact(values)
        assert k.shape[2] == (th * tw - 1 if pool == 1 else th * tw // 4)
        bias = gating.generation_bias(1, TEXT, torch.float32, "cpu")
        outs.append(
            F.scaled_dot_product_attention(q, torch.cat([own_k, k], 2), torch.cat([own_v, v], 2), attn_mask=bias)
        )
        if pool == 2:
            assert sorted(gating.col_kept[0].exp().round().tolist()) == [3.0] + [4.0] * 5
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


def test_ring_keeps_only_keys_near_the_matte():
    mask = torch.zeros(1, 1, 10, 10)
    mask[..., 4:6, 4:6] = 1.0
    counts = {}
    for ring in (0, 1, 2, 20):
        gating = ReferenceGating(ReferenceSettings(mode="once", key_ring=ring, key_dilate_tokens=1), mask, (10, 10))
        counts[ring] = gating.kept
    # excluded: the 4x4 dilated matte; ring R keeps the (4+2R)^2 square minus it
    assert counts == {0: 100 - 16, 1: 36 - 16, 2: 64 - 16, 20: 100 - 16}
    both = ReferenceGating(ReferenceSettings(mode="once", key_ring=1, key_pool=2), mask, (10, 10))
    assert both.kept < counts[1]


def test_budget_and_kernel_settings_are_validated():
    with pytest.raises(InputError, match="key_pool must be one of"):
        ReferenceSettings(key_pool=3)
    with pytest.raises(InputError, match="key_ring must be a whole number"):
        ReferenceSettings(key_ring=-1)
    with pytest.raises(InputError, match="attention_kernel 'flash' is not one of"):
        ReferenceSettings(attention_kernel="flash")
    assert ReferenceSettings.coerce({"mode": "once", "key_pool": 2.0, "key_ring": 3}).key_pool == 2


def test_cli_budget_flags_reach_the_settings():
    import argparse

    from hairdiff_cli.commands.options import add_reference_field_arguments, reference_fields

    p = argparse.ArgumentParser()
    add_reference_field_arguments(p)
    fields = reference_fields(p.parse_args(["--ref-key-pool", "2", "--ref-key-ring", "4", "--ref-kernel", "grouped"]))
    s = ReferenceSettings(mode="once", **fields)
    assert (s.key_pool, s.key_ring, s.attention_kernel) == (2, 4, "grouped")
    from hairdiff_cli.commands.options import REFERENCE_FLAG_CHOICES
    from hairdiff_core.method.reference import ATTENTION_KERNELS

    assert REFERENCE_FLAG_CHOICES["ref_kernel"] == ATTENTION_KERNELS  # the CLI's copy (no torch at import)
    with pytest.raises(SystemExit):
        p.parse_args(["--ref-key-pool", "3"])
