"""The peak-VRAM estimate and the auto choice (hairdiff_core.models.memory); models on the meta device only."""

from __future__ import annotations

import pytest
import torch

from hairdiff_core.errors import InputError
from hairdiff_core.models.memory import choose_settings, estimate_peak_vram

GB = 2**30


def test_weights_match_the_real_parameter_counts():
    from diffusers import SD3Transformer2DModel

    from hairdiff_core.models.memory import family_config

    for family in ("sd3.5-large", "sd3.5-medium", "tiny"):
        config = family_config(family)
        with torch.device("meta"):
            small = SD3Transformer2DModel(**{**config, "sample_size": 4, "pos_embed_max_size": 4})
        hidden = config["num_attention_heads"] * config["attention_head_dim"]
        numel = sum(p.numel() for p in small.parameters()) + config["pos_embed_max_size"] ** 2 * hidden
        est = estimate_peak_vram(family, weights="bf16")
        assert est.weights_total == 2 * numel  # every weight in bf16, the position table included
        assert est.weights_resident == est.weights_total and est.transient == 0
    large = estimate_peak_vram("sd3.5-large", weights="bf16")
    assert 16.0e9 < large.weights_total < 16.6e9  # SD3.5 Large's 16.3 GB


def test_estimate_moves_the_right_way():
    def total(**kw):
        base = dict(weights="fp8_e4m3fn", offload="none", height=1024, width=1024, cfg=1.0, reference="off")
        return estimate_peak_vram("sd3.5-large", **{**base, **kw}).total

    assert total(height=512, width=512) < total() < total(height=1536, width=1536)
    assert total() < total(cfg=4.0)
    assert total() < total(reference="once") == total(reference="per_step")
    assert total(offload="blocks") < 0.35 * total()
    assert total(offload="model") == total()  # on the GPU while sampling either way
    bf16, fp8 = (estimate_peak_vram("sd3.5-large", weights=w) for w in ("bf16", "fp8_e4m3fn"))
    assert 0.45 < fp8.weights_total / bf16.weights_total < 0.55 and fp8.transient > 0
    once = estimate_peak_vram("sd3.5-large", reference="once")
    # K and V of every layer's 64x64 image tokens at 2432 wide, bf16: 38 x 2 x 4096 x 2432 x 2 bytes.
    assert once.reference_cache == 38 * 2 * 4096 * 2432 * 2 and once.attention_bias > 0
    with pytest.raises(InputError, match="unknown offload 'ssd'"):
        estimate_peak_vram("sd3.5-large", offload="ssd")
    with pytest.raises(InputError, match="unknown family 'flux'"):
        estimate_peak_vram("flux")


def test_auto_choices_for_the_cards_artists_have():
    # SD3.5 Large on 12 GB: fp8 weights fit without offloading; on 8 GB it needs blocks too.
    assert choose_settings("sd3.5-large", 12 * GB, reference="once")[:2] == ("fp8_e4m3fn", "none")
    assert choose_settings("sd3.5-large", 8 * GB, reference="once")[:2] == ("fp8_e4m3fn", "blocks")
    assert choose_settings("sd3.5-large", 24 * GB, reference="once")[:2] == ("bf16", "none")
    # Medium on 8 GB as it is.
    assert choose_settings("sd3.5-medium", 8 * GB, reference="once")[:2] == ("bf16", "none")
    # Fixed options are kept.
    w, off, est = choose_settings("sd3.5-large", 12 * GB, weights="fp8_e4m3fn", offload="blocks")
    assert (w, off) == ("fp8_e4m3fn", "blocks") and est.total < 12 * GB


def test_a_model_of_an_unknown_family_is_sized_from_its_own_config(tiny_transformer):
    from hairdiff_core.models.memory import estimate_for

    mine = estimate_for(tiny_transformer, "my-finetune", offload="none", height=256, width=256)
    tiny = estimate_for(tiny_transformer, "tiny", offload="none", height=256, width=256)
    assert mine.total == tiny.total


def test_auto_offload_is_the_one_policy_with_the_loaded_weights(tiny_transformer):
    """The command line's offload="auto" is choose_settings with the model's own weights kept."""
    from hairdiff_core.models.memory import auto_offload_for, choose_settings, estimate_for

    need = estimate_for(tiny_transformer, "tiny", offload="none", height=256, width=256, reference="once").total
    for free in (need * 10, need // 10):
        got = auto_offload_for(tiny_transformer, "tiny", free, height=256, width=256, reference="once")
        want = choose_settings(
            "tiny",
            free,
            weights="fp32",
            offload="auto",
            compute_dtype=torch.float32,
            height=256,
            width=256,
            reference="once",
        )[1]
        assert got == want
    assert auto_offload_for(tiny_transformer, "tiny", need * 10, height=256, width=256, reference="once") == "none"
    assert auto_offload_for(tiny_transformer, "tiny", 1, height=256, width=256, reference="once") == "blocks"
