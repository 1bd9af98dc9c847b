"""The native route's glue on the stand-ins (no ComfyUI): the SAMPLER function against the core's
sampler, Sketch Conditioning's outputs, Stitch, the adapter's patch embedding, and the errors.

The real-ComfyUI side of the same nodes is tests/test_comfyui_native.py (skipped in CI)."""

from __future__ import annotations

import types

import pytest
import torch


def _velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A deterministic stand-in for a transformer's velocity (smooth in x and sigma)."""
    return torch.tanh(x * 0.7 + sigma) - 0.3 * x


class _Guider:
    """What ComfyUI's sampler function reaches through ``KSamplerX0Inpaint.inner_model``: a
    callable returning x0 (``denoised``), with the model patcher and the processed conds."""

    def __init__(self, channels: int = 32, concat: bool = True):
        conv = torch.nn.Conv2d(channels, 8, 2, 2)
        self.model_patcher = types.SimpleNamespace(get_model_object=lambda name: conv)
        self.conds = {"positive": [{"model_conds": {"c_concat": object()} if concat else {}}]}

    def __call__(self, x, sigma, **kw):
        s = float(sigma[0])
        return x - s * _velocity(x, s)


def _model_k(x0, noise, guider):
    return types.SimpleNamespace(inner_model=guider, latent_image=x0, noise=noise)


@pytest.fixture
def latents():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 8, 12, generator=g)
    noise = torch.randn(1, 16, 8, 12, generator=g)
    mask = torch.zeros(1, 1, 8, 12)
    mask[..., 2:6, 3:9] = 1.0
    mask[..., 1, 3:9] = 0.4  # a feathered edge
    return x0, noise, mask


def test_the_sampler_function_is_the_cores_soft_mask_sampler(comfy, latents):
    from hairdiff_pack.hairdiff_core.method.flow import sampling_sigmas
    from hairdiff_pack.hairdiff_core.method.sampler import soft_mask_sample
    from hairdiff_pack.nodes.native_sampling import sample_soft_mask

    x0, noise, mask = latents
    sigmas = sampling_sigmas(6, shift=3.0, strength=0.8).float()
    seen = []
    got = sample_soft_mask(
        _model_k(x0, noise, _Guider()),
        torch.zeros_like(x0),  # ComfyUI's uniformly noised start: not used
        sigmas,
        extra_args={"denoise_mask": mask.expand(1, 16, 8, 12), "model_options": {}, "seed": 0},
        callback=seen.append,
    )
    want = soft_mask_sample(lambda x, s, i: _velocity(x, s), x0, mask, sigmas, noise)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    keep = (mask == 0).expand_as(x0)
    assert torch.equal(got[keep], x0[keep])  # never touched, not merely close
    assert not torch.allclose(got[~keep], x0[~keep])
    assert [c["i"] for c in seen] == list(range(len(sigmas) - 1)) and "denoised" in seen[0]


@pytest.mark.parametrize(
    "guider, mask, words",
    [
        (dict(channels=16), True, ("input 'model'", "HairDiff Apply Adapter")),
        (dict(concat=False), True, ("input 'positive'", "HairDiff Sketch Conditioning")),
        (dict(), False, ("input 'latent_image'", "noise_mask")),
    ],
)
def test_a_miswired_sampler_is_a_node_error_before_any_step(comfy, latents, guider, mask, words):
    from hairdiff_pack.hairdiff_core.errors import HairDiffError
    from hairdiff_pack.nodes.native_sampling import sample_soft_mask

    x0, noise, m = latents
    calls = []
    g = _Guider(**guider)
    g_call = g.__call__
    g.__class__ = type("Counting", (_Guider,), {"__call__": lambda self, *a, **k: calls.append(1) or g_call(*a, **k)})
    extra = {"denoise_mask": m} if mask else {}
    with pytest.raises(HairDiffError) as err:
        sample_soft_mask(_model_k(x0, noise, g), x0, torch.tensor([1.0, 0.5, 0.0]), extra_args=extra)
    assert not calls
    for w in words:
        assert w in str(err.value)


def test_the_adapter_wrapper_needs_the_sketch_and_scales_it_like_a_latent(comfy):
    from hairdiff_pack.hairdiff_core.errors import HairDiffError
    from hairdiff_pack.nodes.native_sampling import adapter_wrapper

    fmt = comfy.modules["comfy.latent_formats"].SD3()
    seen = {}

    def executor(x, t, c_concat, *rest, **kw):
        seen["c_concat"] = c_concat
        return x

    executor.class_obj = types.SimpleNamespace(latent_format=fmt)
    raw = torch.randn(1, 16, 4, 4)
    adapter_wrapper(executor, torch.zeros(1, 16, 4, 4), torch.ones(1), raw)
    torch.testing.assert_close(seen["c_concat"], fmt.process_in(raw))
    with pytest.raises(HairDiffError, match="HairDiff Sketch Conditioning"):
        adapter_wrapper(executor, torch.zeros(1, 16, 4, 4), torch.ones(1), None)


class _VAE:
    """ComfyUI's VAE interface: IMAGE (B, H, W, 3) -> raw latent (B, 16, H/8, W/8) and back."""

    def encode(self, pixels):
        x = pixels.movedim(-1, 1)
        return torch.nn.functional.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16]

    def decode(self, latent):
        return torch.nn.functional.interpolate(latent[:, :3], scale_factor=8).movedim(1, -1)


def _inputs(h=96, w=128):
    g = torch.Generator().manual_seed(1)
    photo = torch.rand(1, h, w, 3, generator=g)
    sketch = torch.zeros(1, h, w, 3)
    sketch[:, 20:60, 40:44] = 1.0
    matte = torch.zeros(1, h, w)
    matte[:, 10:70, 30:90] = 1.0
    return photo, sketch, matte


def test_sketch_conditioning_and_stitch_keep_the_photo_outside_the_matte(comfy):
    from hairdiff_pack.hairdiff_core.pipeline import HairDiffPipeline, prepare_work
    from hairdiff_pack.nodes import native_nodes as N

    photo, sketch, matte = _inputs()
    text = [[torch.zeros(1, 77, 32), {"pooled_output": torch.zeros(1, 64)}]]
    pos, neg, latent, stitch = N.HairDiffSketchConditioning.execute(
        text, text, _VAE(), photo, sketch, matte, 64, 10.0
    ).result
    p, s, b = HairDiffPipeline.prepare_inputs(photo.movedim(-1, 1), sketch.movedim(-1, 1), matte[:, None])
    work = prepare_work(p, s, b, 64, 10.0)
    assert torch.equal(pos[0][1]["noise_concat"], _VAE().encode(work.sketch.movedim(1, -1)))
    assert torch.equal(neg[0][1]["noise_concat"], pos[0][1]["noise_concat"])
    assert torch.equal(latent["noise_mask"], work.latent_mask)
    assert latent["samples"].shape[-2:] == latent["noise_mask"].shape[-2:]
    assert "noise_concat" not in text[0][1]  # the incoming conditioning is not changed

    decoded = torch.rand(1, work.photo.shape[-2], work.photo.shape[-1], 3)
    (image,) = N.HairDiffStitch.execute(stitch, decoded, True).result
    assert image.shape == photo.shape
    from hairdiff_pack.hairdiff_core.pipeline import composite

    want, full_mask = composite(
        p, b, decoded.movedim(-1, 1)[..., : work.plan.height, : work.plan.width], work.plan, 10.0
    )
    torch.testing.assert_close(image.movedim(-1, 1), want)
    outside = (full_mask == 0).expand(1, 3, *photo.shape[1:3]).movedim(1, -1)
    assert torch.equal(image[outside], photo[outside])
    with pytest.raises(Exception, match="decode the latent sampled from this stitch"):
        N.HairDiffStitch.execute(stitch, decoded[:, :-16], True)


def test_sketch_conditioning_names_the_input_of_a_bad_matte(comfy):
    from hairdiff_pack.hairdiff_core.errors import HairDiffError
    from hairdiff_pack.nodes import native_nodes as N

    photo, sketch, _ = _inputs()
    text = [[torch.zeros(1, 77, 32), {"pooled_output": torch.zeros(1, 64)}]]
    with pytest.raises(HairDiffError) as err:
        N.HairDiffSketchConditioning.execute(text, text, _VAE(), photo, sketch, torch.zeros(1, 96, 128), 64, 10.0)
    assert "HairDiff Sketch Conditioning" in str(err.value) and "'matte'" in str(err.value)


def test_apply_adapter_refuses_a_model_that_is_not_sd3(comfy):
    from hairdiff_pack.hairdiff_core.errors import HairDiffError
    from hairdiff_pack.nodes import native_nodes as N

    not_sd3 = types.SimpleNamespace(model=torch.nn.Linear(2, 2))
    with pytest.raises(HairDiffError) as err:
        N.HairDiffApplyAdapter.execute(not_sd3, N.BUILTIN_TOY_ADAPTER, 1.0)
    assert "input 'model'" in str(err.value) and "Linear" in str(err.value) and "Load Diffusion Model" in str(err.value)


def test_the_patch_embedding_moves_from_the_base_to_the_adapter(comfy, tmp_path):
    from hairdiff_pack.hairdiff_core.models import toy
    from hairdiff_pack.hairdiff_core.models.adapter import base_signature, patch_embedding, read_adapter

    t = toy.load_toy_transformer()
    proj = t.pos_embed.proj
    found = read_adapter(toy.adapter_path(), base_signature(t), tuple(proj.weight.shape))
    w1, b1 = patch_embedding(proj.weight, proj.bias, found, 1.0)
    w0, b0 = patch_embedding(proj.weight, proj.bias, found, 0.0)
    assert found.keep_base  # the toy's adapter was trained with its image channels frozen
    assert torch.equal(w1[:, :16], proj.weight) and torch.equal(b1, proj.bias)
    assert torch.equal(w1[:, 16:], found.weight[:, 16:].to(w1.dtype))
    assert torch.equal(w0[:, :16], proj.weight) and not w0[:, 16:].any()
    half = patch_embedding(proj.weight.half(), proj.bias.half(), found, 0.5)[0]
    assert half.dtype == torch.float16
    torch.testing.assert_close(half[:, 16:].float(), found.weight[:, 16:].float() * 0.5, atol=1e-3, rtol=1e-3)


def test_a_thin_matte_is_worked_within_every_models_position_table(comfy):
    """A braid-like matte on a tall photo: the box is widened (or the photo scaled) so that its
    longest side stays within 3x the working side, which every SD3/SD3.5 position table reaches."""
    from hairdiff_pack.hairdiff_core.models.families import transformer_config
    from hairdiff_pack.nodes import native_nodes as N

    for family in ("sd3.5-large", "sd3.5-medium", "sd3-medium", "tiny", "toy"):
        c = transformer_config(family)
        assert c["pos_embed_max_size"] * c["patch_size"] >= N.MAX_SIDE_FACTOR * c["sample_size"], family
    photo = torch.rand(1, 1600, 40, 3)
    matte = torch.zeros(1, 1600, 40)
    matte[:, 10:1590, 18:22] = 1.0
    text = [[torch.zeros(1, 77, 32), {"pooled_output": torch.zeros(1, 64)}]]
    _pos, _neg, latent, stitch = N.HairDiffSketchConditioning.execute(
        text, text, _VAE(), photo, photo, matte, 64, 10.0
    ).result
    assert max(latent["samples"].shape[-2:]) * 8 <= N.MAX_SIDE_FACTOR * 64
    (image,) = N.HairDiffStitch.execute(
        stitch, torch.zeros(1, *[s * 8 for s in latent["samples"].shape[-2:]], 3), True
    ).result
    assert image.shape == photo.shape
