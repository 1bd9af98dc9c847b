"""The style reference (issue 26): a style photo's hair tokens as extra keys for the new hair.

Attention-level statements on plain tensors (``joint_attention``, what both hosts call), then
the tiny transformer (``reference_attention``), then the pipeline and its input checks.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from hairdiff_core.errors import InputError
from hairdiff_core.method.reference import (
    GenerationPassState,
    ReferenceCache,
    ReferenceGating,
    ReferenceSettings,
    StyleKeys,
    joint_attention,
    reference_processors,
    style_erode_tokens,
)
from hairdiff_core.method.surgery import widen_input_channels

B, HEADS, D, TH, TW, LT = 1, 2, 8, 4, 6, 3
L = TH * TW
STH, STW = 3, 5  # the style photo's token grid: another size and aspect
KERNELS = ("bias", "grouped", "folded")


def _qkv(seed: int, n: int, batch: int = B):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, n, D, generator=g) for _ in range(3)]


def _hard_mask() -> torch.Tensor:
    m = torch.zeros(B, 1, TH, TW)
    m[..., 1:3, 2:5] = 1.0
    return m


def _soft_mask() -> torch.Tensor:
    m = _hard_mask()
    m[..., 0, 2:5] = 0.4  # a feathered edge
    return m


def _style_mask() -> torch.Tensor:
    m = torch.zeros(B, 1, STH, STW)
    m[..., 0:2, 1:4] = 1.0
    m[..., 2, 1] = 0.3  # partly covered: not a style key
    return m


def _style_cache(gating_style: StyleKeys, seed: int = 5):
    sk, sv, _ = _qkv(seed, STH * STW)
    return gating_style.compact(sk), gating_style.compact(sv)


def _generation(settings, mask, ref_kv, style=None, style_kv=None, style_weight=1.0, seed=0):
    q, k, v = _qkv(seed, L)
    tq, tk, tv = _qkv(seed + 1, LT)
    gating = ReferenceGating(settings, mask, (TH, TW), style=style, style_weight=style_weight)
    cache = ReferenceCache({"s": tuple(gating.compact(t) for t in ref_kv)})
    if style_kv is not None:
        cache.style = ReferenceCache({"s": style_kv})
    return joint_attention("s", q, k, v, tq, tk, tv, GenerationPassState(cache, gating, True)), gating


# ---------------------------------------------------------------------------------------------
# The gating: who sees the style keys
# ---------------------------------------------------------------------------------------------
def test_style_keys_are_the_shrunk_matte_and_the_pool_applies():
    keys = StyleKeys(_style_mask())
    assert keys.erode == 0 == style_erode_tokens((STH, STW))  # small grids are not shrunk
    assert keys.kept == 6 and keys.tokens == STH * STW  # the 0.3-covered token is not style hair
    assert style_erode_tokens((64, 64)) == 2 and style_erode_tokens((40, 64)) == 1
    big = torch.zeros(1, 1, 64, 64)
    big[..., 10:30, 20:40] = 1.0
    assert StyleKeys(big).kept == 16 * 16  # shrunk by 2 tokens on every side
    sliver = torch.zeros(1, 1, 64, 64)
    sliver[..., 10:12, 20:40] = 1.0
    assert StyleKeys(sliver).kept == 2 * 20  # too thin to shrink: the unshrunk matte
    pooled = StyleKeys(_style_mask(), pool=2)
    assert pooled.kept == 2  # the 2x2 cells holding style tokens (columns 0-1 and 2-3)
    assert torch.allclose(pooled.col_kept.exp().sum(), torch.tensor(6.0))  # log(tokens per cell)
    with pytest.raises(InputError, match="style matte covers no token") as exc:
        StyleKeys(torch.zeros(1, 1, STH, STW))
    assert exc.value.input == "style_matte"


def test_style_bias_is_minus_inf_for_outside_and_text_queries():
    s = ReferenceSettings(mode="once")
    mask = _soft_mask()
    style = StyleKeys(_style_mask())
    gating = ReferenceGating(s, mask, (TH, TW), style=style, style_weight=2.0)
    bias = gating.generation_bias(1, LT, torch.float32, "cpu")
    S = style.kept
    assert bias.shape[-1] == L + LT + gating.kept + S
    cols = bias[0, 0, :, -S:]  # the style columns
    m = mask.flatten()
    assert torch.isinf(cols[:L][m == 0]).all() and (cols[:L][m == 0] < 0).all()
    assert torch.isinf(cols[L:]).all()  # text queries never see them
    inside = m > 0
    torch.testing.assert_close(cols[:L][inside], torch.log(m[inside] * 2.0)[:, None].expand(-1, S))
    # The other kernels carry the same biases.
    rows = gating._rows("style", 1, LT, "cpu")
    assert torch.equal(torch.isinf(rows[0]), torch.isinf(cols[:, 0]))
    q_extra, k_extra = gating.generation_extras(1, LT, gating.kept, "cpu")
    folded = q_extra[0] @ k_extra[0].T
    finite = torch.isfinite(bias[0, 0])
    torch.testing.assert_close(folded[finite], bias[0, 0][finite])
    assert (folded[~finite] <= -500).all()


@pytest.mark.parametrize("pool", [1, 2])
def test_style_keys_are_invisible_to_outside_and_text_queries(pool):
    """The output rows of queries with m = 0 and of text queries do not change with a style."""
    mask = _soft_mask()
    s = ReferenceSettings(mode="once", key_pool=pool, attention_kernel="bias")
    ref_kv = _qkv(3, L)[:2]
    style = StyleKeys(_style_mask(), pool=pool)
    plain, _ = _generation(s, mask, ref_kv)
    for kernel in KERNELS:
        sk = ReferenceSettings(mode="once", key_pool=pool, attention_kernel=kernel)
        out, _ = _generation(sk, mask, ref_kv, style, _style_cache(style), style_weight=3.0)
        m = mask.flatten()
        outside = torch.cat([m == 0, torch.ones(LT, dtype=torch.bool)])
        torch.testing.assert_close(out[:, :, outside], plain[:, :, outside], rtol=0, atol=2e-6)
        assert (out[:, :, :L][:, :, m > 0] - plain[:, :, :L][:, :, m > 0]).abs().max() > 1e-3


@pytest.mark.parametrize("pool", [1, 2])
def test_kernels_agree_with_a_style_reference(pool):
    mask = _soft_mask()
    style = StyleKeys(_style_mask(), pool=pool)
    ref_kv, style_kv = _qkv(3, L)[:2], _style_cache(style)
    outs = [
        _generation(
            ReferenceSettings(mode="once", key_pool=pool, attention_kernel=k, suppress_self_outside=0.3),
            mask,
            ref_kv,
            style,
            style_kv,
            style_weight=0.7,
        )[0]
        for k in KERNELS
    ]
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=1e-5, atol=2e-6)


def test_a_style_equal_to_the_source_completes_the_excluded_keys():
    """The closest exact form of "a style photo equal to the source, with the source's matte and
    unit weights, changes nothing beyond the existing reference".

    Exact equality with the default reference is impossible: its keys inside the dilated matte
    are excluded and its pass is hair-blind, while the style keys are exactly the hair the
    reference hides, from a pass that sees the whole style photo. So, per layer, on a hard mask,
    with unit weights, the reference's exclusion region equal to the style keys' region
    (``key_dilate_tokens`` 0, no shrinking) and a non-blind pass (reference and style K/V the
    same photo's): queries inside the matte see the reference *with its hair keys back* (the
    style keys are those keys, weight m_i * 1 = 1), which here is the plain attention (every
    image key twice, the text scaled by the same 2); queries outside the matte and text queries
    see exactly the reference alone. Both statements are exact in exact arithmetic.
    """
    mask = _hard_mask()
    for kernel in KERNELS:
        s = ReferenceSettings(
            mode="per_step",
            weight_inside=1.0,
            weight_outside=1.0,
            key_dilate_tokens=0,
            blind_reference=False,
            attention_kernel=kernel,
        )
        q, k, v = _qkv(0, L)
        style = StyleKeys(mask, erode_tokens=0)  # the style photo is the source, with its matte
        styled, gating = _generation(s, mask, (k, v), style, (style.compact(k), style.compact(v)))
        assert torch.equal(style.inside, gating.key_inside)  # the style keys are the excluded keys
        alone, _ = _generation(s, mask, (k, v))
        tq, tk, tv = _qkv(1, LT)
        plain = joint_attention("s", q, k, v, tq, tk, tv, None)
        inside = torch.cat([mask.flatten() > 0, torch.zeros(LT, dtype=torch.bool)])
        torch.testing.assert_close(styled[:, :, inside], plain[:, :, inside], rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(styled[:, :, ~inside], alone[:, :, ~inside], rtol=0, atol=2e-6)
        assert (alone[:, :, inside] - plain[:, :, inside]).abs().max() > 1e-3  # not vacuous


def test_style_settings_are_checked():
    s = ReferenceSettings(mode="once")
    with pytest.raises(InputError, match="style_weight must be from 0 to 100") as exc:
        ReferenceGating(s, _soft_mask(), (TH, TW), style=StyleKeys(_style_mask()), style_weight=101)
    assert exc.value.input == "style_weight"
    two = StyleKeys(torch.cat([_style_mask()] * 2))
    with pytest.raises(InputError, match="style reference has batch 2") as exc:
        ReferenceGating(s, torch.cat([_soft_mask()] * 3), (TH, TW), style=two)
    assert exc.value.input == "style_image"
    gating = ReferenceGating(s, _soft_mask(), (TH, TW), style=StyleKeys(_style_mask()))
    q, k, v = _qkv(0, L)
    cache = ReferenceCache({"s": (gating.compact(k), gating.compact(v))})  # no style pass
    with pytest.raises(InputError, match="style pass stored no K/V"):
        joint_attention("s", q, k, v, None, None, None, GenerationPassState(cache, gating, True))


# ---------------------------------------------------------------------------------------------
# The tiny transformer: the style pass and its schedule
# ---------------------------------------------------------------------------------------------
_spec = importlib.util.spec_from_file_location("_reference_util", Path(__file__).with_name("_reference_util.py"))
_ref_util = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ref_util)
_forward = _ref_util.forward


def _with_style(model, settings, x, sketch, sigma, ref, noise, mask, text, pooled, style=None, steps=(0,)):
    from hairdiff_core.method.reference import reference_attention

    kw = {}
    if style is not None:
        kw = dict(style_latent=style[0], style_token_mask=style[1], style_noise=style[2], style_weight=style[3])
    with reference_attention(
        model,
        settings,
        reference_latent=ref,
        token_mask=mask,
        noise=noise,
        encoder_hidden_states=text,
        pooled_projections=pooled,
        **kw,
    ) as hook:
        outs = [_forward(model, x, sketch, sigma, text, pooled, hook.step_kwargs(sigma - 0.1 * i, i)) for i in steps]
        return outs[-1], hook


@torch.no_grad()
def test_a_style_photo_equal_to_the_input_over_the_whole_image_is_the_plain_model(tiny_transformer):
    """The model-level exact form: with the whole image as the matte the reference keeps no key
    (all excluded) and the style keys, the generation input's own, are every image key again:
    with unit weights each image key appears twice and the text twice as strongly, so the
    softmax, and the model, are unchanged (like the reference's duplicated-keys invariant)."""
    model = widen_input_channels(tiny_transformer)
    g = torch.Generator().manual_seed(0)
    H, W = 8, 12
    x0, noise = torch.randn(1, 16, H, W, generator=g), torch.randn(1, 16, H, W, generator=g)
    text, pooled = torch.randn(1, 7, 32, generator=g), torch.randn(1, 64, generator=g)
    full = torch.ones(1, 1, H // 2, W // 2)
    zero = torch.zeros_like(x0)
    sigma = 0.6
    x = (1 - sigma) * x0 + sigma * noise
    plain = _forward(model, x, zero, sigma, text, pooled)
    s = ReferenceSettings(
        mode="per_step", weight_inside=1.0, weight_outside=1.0, blind_reference=False, reference_noise="matched"
    )
    out, hook = _with_style(model, s, x, zero, sigma, x0, noise, full, text, pooled, (x0, full, noise, 1.0))
    assert hook.gating.kept == 0 and hook.style_keys.kept == full.numel()
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    other, _ = _with_style(model, s, x, zero, sigma, x0, noise, full, text, pooled, (noise, full, x0, 1.0))
    assert (other - plain).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("mode,passes", [("once", 1), ("per_step", 3)])
def test_the_style_pass_follows_the_reference_schedule(tiny_transformer, mode, passes):
    model = widen_input_channels(tiny_transformer)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(1, 16, 8, 12, generator=g), torch.randn(1, 16, 8, 12, generator=g)
    style = torch.randn(1, 16, 6, 10, generator=g)  # another size and aspect
    text, pooled = torch.randn(1, 7, 32, generator=g), torch.randn(1, 64, generator=g)
    mask = torch.zeros(1, 1, 4, 6)
    mask[..., 1:3, 2:5] = 1.0
    style_mask = _style_mask()
    before = dict(model.attn_processors)
    s = ReferenceSettings(mode=mode)
    args = (model, s, torch.randn_like(x0), torch.randn_like(x0), 0.8, x0, noise, mask, text, pooled)
    plain, _ = _with_style(*args, steps=(0, 1, 2))
    styled, hook = _with_style(*args, (style, style_mask, torch.randn_like(style), 1.0), steps=(0, 1, 2))
    assert hook.reference_passes == hook.style_passes == passes
    assert hook.schedule.cache is None  # freed on exit
    assert (styled - plain).abs().max() > 1e-4
    zero, hook0 = _with_style(*args, (style, style_mask, torch.randn_like(style), 0.0), steps=(0, 1, 2))
    assert hook0.style_passes == 0 and torch.equal(zero, plain)
    assert dict(model.attn_processors) == before
    with pytest.raises(InputError, match="needs reference attention on"):
        _with_style(model, "off", *args[2:], (style, style_mask, style, 1.0))


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------
def _photo_inputs():
    g = torch.Generator().manual_seed(6)
    photo = torch.rand(1, 3, 64, 96, generator=g)
    matte = torch.zeros(1, 1, 64, 96)
    matte[..., 16:48, 32:64] = 1.0
    sketch = torch.ones(1, 3, 64, 96)
    sketch[..., 30:34, 36:60] = 0.0
    style = torch.rand(1, 3, 80, 48, generator=g) * 0.5  # portrait aspect, other size
    style_matte = torch.zeros(1, 1, 40, 24)  # half the style photo's size, same aspect
    style_matte[..., 4:24, 4:20] = 1.0
    return photo, sketch, matte, style, style_matte


@torch.no_grad()
def test_pipeline_style_invariants(tiny_transformer, tiny_vae):
    from hairdiff_core.pipeline import HairDiffPipeline

    pipe = HairDiffPipeline(tiny_transformer, tiny_vae)
    photo, sketch, matte, style, style_matte = _photo_inputs()
    kw = dict(steps=3, seed=1, cfg=2.0)
    before = dict(pipe.transformer.attn_processors)
    once = pipe.generate(photo, sketch, matte, reference="once", **kw)
    styled = pipe.generate(photo, sketch, matte, reference="once", style_image=style, style_matte=style_matte, **kw)
    assert styled.info["style_passes"] == 1 and styled.info["reference_passes"] == 1
    assert not torch.equal(styled.latent, once.latent)
    # Style weight 0 is exactly no style photo (no style pass runs).
    zero = pipe.generate(
        photo, sketch, matte, reference="once", style_image=style, style_matte=style_matte, style_weight=0, **kw
    )
    assert torch.equal(zero.latent, once.latent) and zero.info["style_passes"] == 0
    plain = pipe.generate(photo, sketch, matte, **kw)
    zero_off = pipe.generate(photo, sketch, matte, style_image=style, style_matte=style_matte, style_weight=0.0, **kw)
    assert torch.equal(zero_off.latent, plain.latent) and "reference_passes" not in zero_off.info
    # reference=None with a style photo means "once".
    auto = pipe.generate(photo, sketch, matte, style_image=style, style_matte=style_matte, **kw)
    assert torch.equal(auto.latent, styled.latent)
    # The source's pixels outside the feathered matte stay the source's, bit for bit.
    outside = (styled.mask == 0).expand_as(photo)
    assert outside.any() and torch.equal(styled.image[outside], photo[outside])
    per_step = pipe.generate(
        photo, sketch, matte, reference="per_step", style_image=style, style_matte=style_matte, style_weight=2.5, **kw
    )
    assert per_step.info["style_passes"] == 3
    assert dict(pipe.transformer.attn_processors) == before


@torch.no_grad()
def test_pipeline_refuses_bad_style_inputs(tiny_transformer, tiny_vae):
    from hairdiff_core.errors import SettingsError
    from hairdiff_core.pipeline import HairDiffPipeline

    pipe = HairDiffPipeline(tiny_transformer, tiny_vae)
    photo, sketch, matte, style, style_matte = _photo_inputs()
    cases = [
        (dict(style_image=style), "style_matte", "without its hair matte"),
        (dict(style_matte=style_matte), "style_image", "without its style photo"),
        (dict(style_image=style, style_matte=torch.zeros(1, 1, 40, 24)), "style_matte", "style matte is empty"),
        (dict(style_image=style, style_matte=torch.ones(1, 1, 40, 40)), "style_matte", "different aspect ratios"),
        (dict(style_image=style * 255, style_matte=style_matte), "style_image", "divide it by 255"),
        (dict(style_image=style, style_matte=style_matte, reference="off"), "reference", "needs reference attention"),
        (dict(style_image=style, style_matte=style_matte, method="replace"), "style_image", "joint method"),
    ]
    calls = []
    encode = pipe.encode
    pipe.encode = lambda x: calls.append(1) or encode(x)
    for extra, name, pattern in cases:
        with pytest.raises(InputError, match=pattern) as exc:
            pipe.generate(photo, sketch, matte, steps=1, **extra)
        assert exc.value.input == name, (extra.keys(), exc.value.input)
    assert calls == []  # every refusal comes before any model call
    for bad in (-1, 101, math.nan, "1"):
        with pytest.raises(SettingsError, match="style weight must be a number from 0 to 100") as exc:
            pipe.generate(photo, sketch, matte, steps=1, style_image=style, style_matte=style_matte, style_weight=bad)
        assert exc.value.input == "style_weight"


def test_processors_restored_after_a_style_failure(tiny_transformer):
    model = widen_input_channels(tiny_transformer)
    before = dict(model.attn_processors)
    with pytest.raises(InputError, match="style_latent must be"):
        with reference_processors(model):
            from hairdiff_core.method.reference import ReferenceHook

            ReferenceHook(
                model,
                ReferenceSettings(mode="once"),
                torch.zeros(1, 16, 8, 12),
                torch.ones(1, 1, 4, 6),
                torch.zeros(1, 16, 8, 12),
                torch.zeros(1, 7, 32),
                torch.zeros(1, 64),
                style_latent=torch.zeros(1, 3, 8, 8),
            )
    assert dict(model.attn_processors) == before


def test_cli_style_flags(tmp_path, monkeypatch):
    from PIL import Image

    import hairdiff_cli
    from hairdiff_core.pipeline import HairDiffPipeline

    Image.new("RGB", (48, 32), (120, 90, 60)).save(tmp_path / "photo.png")
    Image.new("RGB", (48, 32), (255, 255, 255)).save(tmp_path / "sketch.png")
    matte = Image.new("L", (48, 32), 0)
    matte.paste(255, (12, 8, 36, 24))
    matte.save(tmp_path / "matte.png")
    Image.new("RGB", (40, 60), (200, 40, 20)).save(tmp_path / "style.png")  # another size and aspect
    style_matte = Image.new("L", (20, 30), 0)
    style_matte.paste(255, (4, 4, 16, 20))
    style_matte.save(tmp_path / "style_matte.png")
    seen = []
    original = HairDiffPipeline.generate

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        seen.append((kwargs, result.info))
        return result

    monkeypatch.setattr(HairDiffPipeline, "generate", spy)
    argv = ["generate", "--tiny", "--steps", "2", "--image", str(tmp_path / "photo.png")]
    argv += ["--sketch", str(tmp_path / "sketch.png"), "--matte", str(tmp_path / "matte.png")]
    argv += ["--out", str(tmp_path / "out.png")]
    style = ["--style-image", str(tmp_path / "style.png"), "--style-matte", str(tmp_path / "style_matte.png")]
    assert hairdiff_cli.main(argv + style) == 0
    kwargs, info = seen[-1]
    assert kwargs["style_image"].shape == (1, 3, 60, 40) and kwargs["settings"].style_weight == 1.0
    assert kwargs["settings"].reference is None and info["style_passes"] == info["reference_passes"] == 1  # once
    assert hairdiff_cli.main(argv + style + ["--style-weight", "3", "--reference", "per_step"]) == 0
    kwargs, info = seen[-1]
    assert kwargs["settings"].style_weight == 3.0 and info["style_passes"] == 2
    assert (tmp_path / "out.png").is_file()
