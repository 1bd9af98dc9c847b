"""Reference attention: invariants of the processor, the hook and the install/restore contract.

The tiny transformer (one SD3.5-Medium-style dual-attention block, rms q/k norm) is widened to
32 channels; latents are 8x12 (non-square, 4x6 tokens) with 7 text tokens.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hairdiff_core.errors import InputError
from hairdiff_core.method.flow import sampling_sigmas, timestep_from_sigma
from hairdiff_core.method.reference import (
    KWARG,
    GenerationPassState,
    ReferenceAttnProcessor,
    ReferenceCache,
    ReferenceGating,
    ReferenceSettings,
    fill_hair_region,
    generation_kwargs,
    predicted_cache_bytes,
    reference_attention,
    reference_pass,
    reference_processors,
)
from hairdiff_core.method.sampler import TransformerDenoiser, soft_mask_sample
from hairdiff_core.method.surgery import widen_input_channels

H, W = 8, 12  # latent
TH, TW = H // 2, W // 2  # tokens
TEXT = 7


def _inputs(batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 16, H, W, generator=g)
    noise = torch.randn(batch, 16, H, W, generator=g)
    sketch = torch.randn(batch, 16, H, W, generator=g)
    text = torch.randn(batch, TEXT, 32, generator=g)
    pooled = torch.randn(batch, 64, generator=g)
    token_mask = torch.zeros(batch, 1, TH, TW)
    token_mask[..., 1:3, 2:5] = 1.0
    token_mask[..., 0, 2:5] = 0.4  # a feathered edge
    return x0, noise, sketch, text, pooled, token_mask


@pytest.fixture
def model(tiny_transformer):
    return widen_input_channels(tiny_transformer)


_spec = importlib.util.spec_from_file_location("_reference_util", Path(__file__).with_name("_reference_util.py"))
_ref_util = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ref_util)
_forward, _with_reference = _ref_util.forward, _ref_util.with_reference


@torch.no_grad()
def test_processor_without_state_is_the_stock_processor(model):
    x0, _, sketch, text, pooled, _ = _inputs()
    plain = _forward(model, x0, sketch, 0.5, text, pooled)
    with reference_processors(model):
        assert all(isinstance(p, ReferenceAttnProcessor) for p in model.attn_processors.values())
        ours = _forward(model, x0, sketch, 0.5, text, pooled)
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-6)


@torch.no_grad()
def test_zero_weights_equal_the_plain_model(model):
    x0, noise, sketch, text, pooled, mask = _inputs()
    x = torch.randn_like(x0)
    plain = _forward(model, x, sketch, 0.7, text, pooled)
    for mode, ref_noise in (("once", "matched"), ("once", "clean"), ("per_step", "matched"), ("per_step", "clean")):
        s = ReferenceSettings(mode=mode, weight_inside=0.0, weight_outside=0.0, reference_noise=ref_noise)
        out = _with_reference(model, s, x, sketch, 0.7, x0, noise, mask, text, pooled)
        torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    # Not vacuous: non-zero weights change the output.
    out = _with_reference(model, ReferenceSettings(mode="per_step"), x, sketch, 0.7, x0, noise, mask, text, pooled)
    assert (out - plain).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("ref_noise", ["matched", "clean"])
def test_reference_equal_to_generation_input_with_unit_weights_equals_plain(model, ref_noise):
    """Duplicated keys with bias 0 leave the softmax unchanged, layer after layer."""
    x0, noise, _, text, pooled, mask = _inputs()
    sigma = 0.6
    # What the reference pass sees at this sigma: the noised photo (matched) or the photo (clean).
    x = (1 - sigma) * x0 + sigma * noise if ref_noise == "matched" else x0
    zero_sketch = torch.zeros_like(x0)
    plain = _forward(model, x, zero_sketch, sigma, text, pooled)
    s = ReferenceSettings(
        mode="per_step", weight_inside=1.0, weight_outside=1.0, key_weight_inside=1.0, reference_noise=ref_noise
    )
    out = _with_reference(model, s, x, zero_sketch, sigma, x0, noise, mask, text, pooled)
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    other = _with_reference(model, s, x, zero_sketch, sigma, torch.randn_like(x0), noise, mask, text, pooled)
    assert (other - plain).abs().max() > 1e-3


@torch.no_grad()
def test_excluded_reference_keys_hide_changes_inside_the_matte(model):
    x0, noise, sketch, text, pooled, mask = _inputs()
    x = torch.randn_like(x0)
    gating = ReferenceGating(ReferenceSettings(mode="once"), mask, (TH, TW))
    inside = gating.key_inside.view(1, 1, TH, TW).repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert 0 < inside.float().mean() < 1
    changed = torch.where(inside, x0 + 3 * torch.randn_like(x0), x0)
    for mode in ("once", "per_step"):
        s = ReferenceSettings(mode=mode)  # defaults: key_weight_inside = 0, hair-blind reference pass
        a = _with_reference(model, s, x, sketch, 0.8, x0, noise, mask, text, pooled)
        b = _with_reference(model, s, x, sketch, 0.8, changed, noise, mask, text, pooled)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # With the hair keys visible the same change does show.
    s = ReferenceSettings(mode="once", key_weight_inside=1.0)
    a = _with_reference(model, s, x, sketch, 0.8, x0, noise, mask, text, pooled)
    b = _with_reference(model, s, x, sketch, 0.8, changed, noise, mask, text, pooled)
    assert (a - b).abs().max() > 1e-4


@torch.no_grad()
def test_text_queries_never_see_the_reference(model):
    attn = model.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, TH * TW, 32, generator=g)
    txt = torch.randn(2, TEXT, 32, generator=g)
    ref_k = torch.randn(1, attn.heads, TH * TW, 8, generator=g)
    ref_v = torch.randn(1, attn.heads, TH * TW, 8, generator=g)
    _, _, _, _, _, mask = _inputs()
    s = ReferenceSettings(mode="once", weight_inside=1.0, key_weight_inside=1.0)
    cache = ReferenceCache({attn: (ref_k, ref_v)})
    proc = ReferenceAttnProcessor()
    img0, txt0 = proc(attn, img, txt)
    img1, txt1 = proc(
        attn, img, txt, hairdiff_reference=GenerationPassState(cache, ReferenceGating(s, mask, (TH, TW)), True)
    )
    assert (img1 - img0).abs().max() > 1e-3
    torch.testing.assert_close(txt1, txt0, rtol=0, atol=1e-6)


@torch.no_grad()
def test_attn2_takes_part_only_when_included(model):
    x0, noise, _, text, pooled, mask = _inputs()
    n_joint = len(model.transformer_blocks)
    n_attn2 = sum(b.attn2 is not None for b in model.transformer_blocks)
    assert n_attn2 == 1
    with reference_processors(model):
        for include, expected in ((True, n_joint + n_attn2), (False, n_joint)):
            s = ReferenceSettings(mode="once", include_attn2=include)
            gating = ReferenceGating(s, mask, (TH, TW))
            model_in = torch.cat([x0, torch.zeros_like(x0)], 1)
            cache = reference_pass(model, model_in, timestep_from_sigma(0.1, 1), text, pooled, gating, s)
            assert len(cache) == expected
            full = predicted_cache_bytes(model, (H, W), include_attn2=include)
            # Excluded keys are not stored.
            assert cache.nbytes() == full * gating.kept // (TH * TW)
            assert gating.kept == int((~gating.key_inside).sum()) < TH * TW
    with reference_processors(model):
        s = ReferenceSettings(mode="once", key_weight_inside=0.5)
        gating = ReferenceGating(s, mask, (TH, TW))
        cache = reference_pass(model, model_in, timestep_from_sigma(0.1, 1), text, pooled, gating, s)
        assert cache.nbytes() == predicted_cache_bytes(model, (H, W))


@torch.no_grad()
def test_compacted_cache_equals_the_full_one(model):
    """Dropping excluded keys (with -inf padding for items with fewer) changes nothing."""
    x0, noise, sketch, text, pooled, mask = _inputs(batch=2, seed=4)
    mask[1] = 0.0
    mask[1, :, 0:2, 0:2] = 1.0  # fewer excluded keys: item 0 gets padded
    s = ReferenceSettings(mode="once", weight_inside=0.7, suppress_self_outside=0.3)
    t = timestep_from_sigma(0.4, 2)
    x = torch.cat([torch.randn_like(x0), sketch], 1)
    with reference_processors(model):
        compact = ReferenceGating(s, mask, (TH, TW))
        assert compact.keep_index is not None
        full = ReferenceGating(s, mask, (TH, TW))
        full.keep_index, full.kept, full.col_kept = None, TH * TW, full.col_ref
        outs = []
        for gating in (compact, full):
            cache = reference_pass(model, torch.cat([x0, torch.zeros_like(x0)], 1), t, text, pooled, gating, s)
            outs.append(
                model(
                    hidden_states=x,
                    encoder_hidden_states=text,
                    pooled_projections=pooled,
                    timestep=t,
                    joint_attention_kwargs=generation_kwargs(cache, gating, s),
                    return_dict=False,
                )[0]
            )
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=2e-6)


@torch.no_grad()
def test_full_suppression_and_full_exclusion_stay_finite(model):
    x0, noise, sketch, text, pooled, _ = _inputs()
    everything = torch.ones(1, 1, TH, TW)
    s = ReferenceSettings(mode="per_step", suppress_self_outside=1.0, weight_outside=0.0, weight_inside=0.0)
    out = _with_reference(model, s, x0, sketch, 0.5, x0, noise, everything, text, pooled)
    assert torch.isfinite(out).all()
    s = ReferenceSettings(mode="per_step", suppress_self_outside=1.0)
    out = _with_reference(model, s, x0, sketch, 0.5, x0, noise, torch.zeros(1, 1, TH, TW), text, pooled)
    assert torch.isfinite(out).all()


def _snapshot(model):
    return {k: id(v) for k, v in model.attn_processors.items()}


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("ref_noise", ["clean", "matched"])
@torch.no_grad()
def test_processors_and_outputs_restored_after_a_raise(model, error, ref_noise):
    x0, noise, sketch, text, pooled, mask = _inputs()
    before = _snapshot(model)
    plain = _forward(model, x0, sketch, 0.5, text, pooled)

    def on_step(step, total, latent):
        if step == 2:
            raise error("cancelled")

    with pytest.raises(error):
        with reference_attention(
            model,
            ReferenceSettings(mode="per_step", reference_noise=ref_noise),
            reference_latent=x0,
            token_mask=mask,
            noise=noise,
            encoder_hidden_states=text,
            pooled_projections=pooled,
        ) as hook:
            denoise = TransformerDenoiser(model, sketch, text, pooled, attention_hook=hook)
            soft_mask_sample(denoise, x0, torch.ones(1, 1, H, W), sampling_sigmas(4), noise, on_step=on_step)
    assert hook.reference_passes == 2
    assert hook._cache is None  # freed
    assert _snapshot(model) == before
    torch.testing.assert_close(_forward(model, x0, sketch, 0.5, text, pooled), plain, rtol=0, atol=0)


def _reference_inputs_seen(model, settings, steps=4):
    """Sample ``steps`` steps; return (sigmas, [(hidden_states, timestep) of each reference pass])."""
    from hairdiff_core.method.reference import ReferencePassState

    x0, noise, sketch, text, pooled, mask = _inputs()
    seen = []

    def spy(module, args, kwargs):
        if isinstance((kwargs.get("joint_attention_kwargs") or {}).get(KWARG), ReferencePassState):
            seen.append((kwargs["hidden_states"].clone(), kwargs["timestep"].clone()))

    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with reference_attention(
            model,
            settings,
            reference_latent=x0,
            token_mask=mask,
            noise=noise,
            encoder_hidden_states=text,
            pooled_projections=pooled,
        ) as hook:
            denoise = TransformerDenoiser(model, sketch, text, pooled, attention_hook=hook)
            sigmas = sampling_sigmas(steps)
            soft_mask_sample(denoise, x0, torch.ones(1, 1, H, W), sigmas, noise)
    finally:
        handle.remove()
    return x0, noise, sigmas, seen


@torch.no_grad()
def test_clean_reference_pass_gets_the_unnoised_latent_and_the_current_timestep(model):
    settings = ReferenceSettings(mode="per_step")
    assert settings.noise == "clean"  # the published dual pass is per_step's default
    x0, _, sigmas, seen = _reference_inputs_seen(model, settings)
    assert len(seen) == len(sigmas) - 1
    for (hidden, timestep), sigma in zip(seen, sigmas[:-1]):
        assert torch.equal(hidden[:, :16], x0)  # the photo latent as is, even at sigma 1
        assert torch.equal(hidden[:, 16:], torch.zeros_like(hidden[:, 16:]))  # no sketch
        assert timestep == pytest.approx([float(sigma) * 1000])
    # ``matched`` instead re-noises the photo to each step's sigma with the generation's noise.
    _, noise, _, matched = _reference_inputs_seen(model, ReferenceSettings(mode="per_step", reference_noise="matched"))
    for (hidden, timestep), sigma in zip(matched, sigmas[:-1]):
        s = float(sigma)
        torch.testing.assert_close(hidden[:, :16], (1 - s) * x0 + s * noise, rtol=0, atol=1e-6)
        assert timestep == pytest.approx([s * 1000])
    assert ReferenceSettings(mode="once").noise == "matched"
    assert ReferenceSettings(mode="once", reference_noise="clean").noise == "clean"
    with pytest.raises(InputError, match="reference_noise 'noisy' is not one of"):
        ReferenceSettings(mode="per_step", reference_noise="noisy")


@torch.no_grad()
def test_off_leaves_the_model_untouched(model):
    before = _snapshot(model)
    with reference_attention(
        model,
        ReferenceSettings(),
        reference_latent=None,
        token_mask=None,
        noise=None,
        encoder_hidden_states=None,
        pooled_projections=None,
    ) as hook:
        assert _snapshot(model) == before
        assert hook.step_kwargs(0.5, 0) == {}
    assert _snapshot(model) == before


@pytest.mark.parametrize("mode,expected", [("once", 1), ("per_step", 3)])
@torch.no_grad()
def test_reference_pass_counts_with_cfg(model, mode, expected):
    x0, noise, sketch, text, pooled, mask = _inputs()
    calls = []
    with reference_attention(
        model,
        ReferenceSettings(mode=mode),
        reference_latent=x0,
        token_mask=mask,
        noise=noise,
        encoder_hidden_states=text,
        pooled_projections=pooled,
    ) as hook:
        original = hook.run_reference
        hook.run_reference = lambda sigma: calls.append(sigma) or original(sigma)
        denoise = TransformerDenoiser(
            model, sketch, text, pooled, torch.zeros_like(text), torch.zeros_like(pooled), cfg=4.0, attention_hook=hook
        )
        sigmas = sampling_sigmas(3)
        soft_mask_sample(denoise, x0, torch.ones(1, 1, H, W), sigmas, noise)
    assert hook.reference_passes == expected == len(calls)
    assert denoise.calls == 3
    if mode == "once":
        assert calls == [pytest.approx(0.1)]
    else:
        assert calls == pytest.approx([float(s) for s in sigmas[:-1]])


@torch.no_grad()
def test_batch_with_cfg_matches_items_run_alone(model):
    x0, noise, sketch, text, pooled, mask = _inputs(batch=2, seed=3)
    mask[1] = torch.flip(mask[1], dims=(-1,))
    mask[1, :, 3, :] = 1.0  # a different number of excluded keys than item 0
    neg_text, neg_pooled = torch.zeros_like(text), torch.zeros_like(pooled)
    s = ReferenceSettings(mode="per_step", suppress_self_outside=0.5)

    def velocity(sl):
        with reference_attention(
            model,
            s,
            reference_latent=x0[sl],
            token_mask=mask[sl],
            noise=noise[sl],
            encoder_hidden_states=text[sl],
            pooled_projections=pooled[sl],
        ) as hook:
            d = TransformerDenoiser(
                model, sketch[sl], text[sl], pooled[sl], neg_text[sl], neg_pooled[sl], cfg=3.0, attention_hook=hook
            )
            return d(noise[sl], 0.7, 0)

    both = velocity(slice(0, 2))
    torch.testing.assert_close(both[0:1], velocity(slice(0, 1)), rtol=0, atol=2e-5)
    torch.testing.assert_close(both[1:2], velocity(slice(1, 2)), rtol=0, atol=2e-5)


@torch.no_grad()
def test_two_calls_in_a_row_do_not_affect_each_other(model):
    x0, noise, sketch, text, pooled, mask = _inputs()
    plain = _forward(model, x0, sketch, 0.5, text, pooled)
    s = ReferenceSettings(mode="once")
    first = _with_reference(model, s, x0, sketch, 0.5, x0, noise, mask, text, pooled)
    after = _forward(model, x0, sketch, 0.5, text, pooled)
    again = _with_reference(model, s, x0, sketch, 0.5, x0, noise, mask, text, pooled)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def _add_random_lora(model):
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@torch.no_grad()
def test_lora_deltas_still_apply_under_the_processor(tiny_transformer):
    import copy

    base = widen_input_channels(tiny_transformer)
    lora = copy.deepcopy(base)
    _add_random_lora(lora)
    x0, noise, sketch, text, pooled, mask = _inputs()
    x = torch.randn_like(x0)
    zero = ReferenceSettings(mode="per_step", weight_inside=0.0, weight_outside=0.0)
    delta_plain = _forward(lora, x, sketch, 0.6, text, pooled) - _forward(base, x, sketch, 0.6, text, pooled)
    delta_ref = _with_reference(lora, zero, x, sketch, 0.6, x0, noise, mask, text, pooled) - _with_reference(
        base, zero, x, sketch, 0.6, x0, noise, mask, text, pooled
    )
    assert delta_plain.abs().max() > 1e-3
    torch.testing.assert_close(delta_ref, delta_plain, rtol=0, atol=1e-5)
    # With the reference on, the LoRA also shapes the cached K/V and the outputs.
    on = ReferenceSettings(mode="per_step")
    a = _with_reference(lora, on, x, sketch, 0.6, x0, noise, mask, text, pooled)
    b = _with_reference(base, on, x, sketch, 0.6, x0, noise, mask, text, pooled)
    assert (a - b).abs().max() > 1e-3


def test_training_api_with_gradient_checkpointing(tiny_transformer):
    """Reference under no_grad, generation with grads: checkpointing changes nothing."""
    model = widen_input_channels(tiny_transformer).train()
    x0, noise, sketch, text, pooled, mask = _inputs()
    s = ReferenceSettings(mode="per_step")
    t = timestep_from_sigma(0.5, 1)
    grads = []
    with reference_processors(model):
        for checkpointing in (False, True):
            if checkpointing:
                model.enable_gradient_checkpointing()
            model.zero_grad()
            gating = ReferenceGating(s, mask, (TH, TW))
            with torch.no_grad():
                cache = reference_pass(model, torch.cat([x0, torch.zeros_like(x0)], 1), t, text, pooled, gating, s)
            out = model(
                hidden_states=torch.cat([noise, sketch], 1),
                encoder_hidden_states=text,
                pooled_projections=pooled,
                timestep=t,
                joint_attention_kwargs=generation_kwargs(cache, gating, s),
                return_dict=False,
            )[0]
            out.square().mean().backward()
            grads.append(
                torch.cat([p.grad.flatten() for p in model.transformer_blocks.parameters() if p.grad is not None])
            )
    assert model.gradient_checkpointing
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)


def test_settings_validation_messages():
    with pytest.raises(InputError, match="reference mode 'always'"):
        ReferenceSettings(mode="always")
    with pytest.raises(InputError, match="weight_inside must be from 0 to 100"):
        ReferenceSettings(mode="once", weight_inside=-0.1)
    with pytest.raises(InputError, match=r"key_weight_inside must be in \[0, 1\]"):
        ReferenceSettings(key_weight_inside=2)
    with pytest.raises(InputError, match="once_sigma"):
        ReferenceSettings(once_sigma=0)
    with pytest.raises(InputError, match="reference_input"):
        ReferenceSettings(reference_input="blurred")
    with pytest.raises(InputError, match="key_dilate_tokens"):
        ReferenceSettings(key_dilate_tokens=1.5)
    with pytest.raises(InputError, match="finite"):
        ReferenceSettings(weight_outside=float("nan"))
    assert ReferenceSettings.coerce("per-step").mode == "per_step"
    assert ReferenceSettings.coerce(None).mode == "off"
    with pytest.raises(InputError, match="unknown reference setting"):
        ReferenceSettings.coerce({"mode": "once", "wieght": 1})


@torch.no_grad()
def test_mismatched_inputs_are_named(model):
    x0, noise, sketch, text, pooled, mask = _inputs()
    kw = dict(token_mask=mask, encoder_hidden_states=text, pooled_projections=pooled)
    with pytest.raises(InputError, match="noise has shape"):
        with reference_attention(model, "once", reference_latent=x0, noise=noise[..., :4], **kw):
            pass
    with pytest.raises(InputError, match="token_mask is 5x5"):
        with reference_attention(
            model, "once", reference_latent=x0, noise=noise, **{**kw, "token_mask": torch.ones(1, 1, 5, 5)}
        ):
            pass
    # A mask on the latent grid (same aspect) is area-resized to tokens.
    with reference_attention(
        model, "once", reference_latent=x0, noise=noise, **{**kw, "token_mask": torch.ones(1, 1, H, W)}
    ) as hook:
        assert hook.gating.token_hw == (TH, TW)
    # A generation at another size than the reference is refused, naming both.
    with pytest.raises(InputError, match="reference has 24 image tokens but the generation has 48"):
        with reference_attention(model, "once", reference_latent=x0, noise=noise, **kw) as hook:
            big = torch.randn(1, 16, H, 2 * W)
            _forward(model, big, torch.zeros_like(big), 0.5, text, pooled, hook.step_kwargs(0.5, 0))


def test_fill_hair_region_keeps_outside_and_forgets_inside():
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 64, 48, generator=g)
    matte = torch.zeros(1, 1, 64, 48)
    matte[..., 10:40, 12:30] = 1.0
    filled = fill_hair_region(image, matte, grow_px=2)
    hole = torch.zeros_like(matte, dtype=torch.bool)
    hole[..., 8:42, 10:32] = True
    assert torch.equal(filled[~hole.expand_as(image)], image[~hole.expand_as(image)])
    other = image.clone()
    other[..., 10:40, 12:30] = torch.rand(1, 3, 30, 18, generator=g)
    assert torch.equal(fill_hair_region(other, matte, grow_px=2), filled)
    # A uniform surrounding fills uniformly.
    flat = torch.full_like(image, 0.25)
    flat[..., 10:40, 12:30] = 0.9
    torch.testing.assert_close(fill_hair_region(flat, matte, grow_px=2), torch.full_like(image, 0.25))
    with pytest.raises(InputError, match="does not match"):
        fill_hair_region(image, matte[..., :32, :])


# ---------------------------------------------------------------------------------------------
# Through the pipeline and the command line
# ---------------------------------------------------------------------------------------------
def _photo_inputs():
    g = torch.Generator().manual_seed(6)
    photo = torch.rand(1, 3, 64, 96, generator=g)
    matte = torch.zeros(1, 1, 64, 96)
    matte[..., 16:48, 32:64] = 1.0
    sketch = torch.ones(1, 3, 64, 96)
    sketch[..., 30:34, 36:60] = 0.0
    return photo, sketch, matte


@torch.no_grad()
def test_pipeline_reference_counts_and_restore(tiny_transformer, tiny_vae):
    from hairdiff_core.pipeline import HairDiffPipeline

    pipe = HairDiffPipeline(tiny_transformer, tiny_vae)
    photo, sketch, matte = _photo_inputs()
    kw = dict(steps=3, seed=1, cfg=2.0)
    before = _snapshot(pipe.transformer)
    off = pipe.generate(photo, sketch, matte, **kw)
    once = pipe.generate(photo, sketch, matte, reference="once", **kw)
    per_step = pipe.generate(photo, sketch, matte, reference=ReferenceSettings(mode="per_step"), **kw)
    assert once.info["reference_passes"] == 1
    assert per_step.info["reference_passes"] == 3
    assert once.info["model_calls"] == per_step.info["model_calls"] == 3
    assert not torch.equal(once.latent, off.latent)
    assert _snapshot(pipe.transformer) == before

    def cancel(step, total, latent):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.generate(photo, sketch, matte, reference="per_step", on_step=cancel, **kw)
    assert _snapshot(pipe.transformer) == before
    assert torch.equal(pipe.generate(photo, sketch, matte, **kw).latent, off.latent)
    filled = pipe.generate(photo, sketch, matte, reference={"mode": "once", "reference_input": "filled"}, **kw)
    assert filled.info["reference_passes"] == 1 and not torch.equal(filled.latent, once.latent)
    with pytest.raises(InputError, match="weight_inside"):
        pipe.generate(photo, sketch, matte, reference={"mode": "once", "weight_inside": -1}, **kw)


def test_cli_reference_flags(tmp_path, capsys, monkeypatch):
    from PIL import Image

    import hairdiff_cli
    from hairdiff_core.pipeline import HairDiffPipeline

    Image.new("RGB", (48, 32), (120, 90, 60)).save(tmp_path / "photo.png")
    Image.new("RGB", (48, 32), (255, 255, 255)).save(tmp_path / "sketch.png")
    matte = Image.new("L", (48, 32), 0)
    matte.paste(255, (12, 8, 36, 24))
    matte.save(tmp_path / "matte.png")
    seen = []
    original = HairDiffPipeline.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs["settings"].reference)  # the CLI passes one GenerateSettings
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HairDiffPipeline, "generate", spy)
    base = [
        "generate",
        "--tiny",
        "--steps",
        "2",
        "--image",
        str(tmp_path / "photo.png"),
        "--sketch",
        str(tmp_path / "sketch.png"),
        "--matte",
        str(tmp_path / "matte.png"),
        "--out",
        str(tmp_path / "out.png"),
    ]
    argv = base + [
        "--reference",
        "once",
        "--ref-weight-inside",
        "0.3",
        "--ref-suppress-self",
        "0.5",
        "--ref-input",
        "filled",
        "--ref-once-sigma",
        "0.2",
    ]
    assert hairdiff_cli.main(argv) == 0
    s = seen[-1]
    assert (s.mode, s.weight_inside, s.suppress_self_outside, s.reference_input, s.once_sigma) == (
        "once",
        0.3,
        0.5,
        "filled",
        0.2,
    )
    assert hairdiff_cli.main(base + ["--reference", "per_step", "--ref-key-weight-inside", "2"]) == 2
    assert "key_weight_inside must be in [0, 1]" in capsys.readouterr().err
