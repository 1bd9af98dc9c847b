"""Augmentation: registration in ``all`` mode, photo untouched in ``seed`` mode."""

from __future__ import annotations

import pytest
import torch

from hairdiff_core.data.augment import AugmentParams, AugmentSettings, affine_matrices, augment_batch, sample_params
from hairdiff_core.imageops import sobel

S = 64


def _scene(batch: int = 8):
    """A photo with a bright square, a sketch stroke drawn on the square's edges, its matte."""
    photo = torch.full((batch, 3, S, S), 0.2)
    photo[..., 20:44, 20:44] = 0.9
    sketch = torch.zeros(batch, 3, S, S)
    for a, b in ((20, 21), (43, 44)):
        sketch[..., a:b, 20:44] = 1.0
        sketch[..., 20:44, a:b] = 1.0
    matte = torch.zeros(batch, 1, S, S)
    matte[..., 20:44, 20:44] = 1.0
    return photo, sketch, matte


def _edge_strength(photo: torch.Tensor) -> torch.Tensor:
    gx, gy = sobel(photo.mean(1, keepdim=True))
    return (gx**2 + gy**2).sqrt()


def test_all_mode_keeps_photo_sketch_matte_registered():
    photo, sketch, matte = _scene()
    settings = AugmentSettings(mode="all", sketch_jitter_px=0.0, max_translate_px=50 * 1024 / S * 0.1)
    p, s, m = augment_batch(photo, sketch, matte, settings, torch.Generator().manual_seed(0))
    assert not torch.allclose(p, photo)  # something happened
    edges = _edge_strength(p)
    stroke = s.mean(1, keepdim=True) > 0.5
    for i in range(p.shape[0]):
        on, off = edges[i][stroke[i]], edges[i][~stroke[i]]
        # The strokes still lie on the photo's (moved) edges: the mean edge strength under the
        # strokes is several times the average elsewhere.
        assert float(on.mean()) > 4 * float(off.mean())
        # The matte moved with the photo: bright square pixels and matte pixels coincide.
        bright = p[i].mean(0) > 0.7
        inter = (bright & (m[i, 0] > 0.5)).sum()
        union = (bright | (m[i, 0] > 0.5)).sum()
        assert float(inter) / float(union) > 0.85


def test_all_mode_same_transform_for_identical_content():
    photo, _, _ = _scene(4)
    settings = AugmentSettings(mode="all", sketch_jitter_px=0.0)
    params = sample_params(4, S, S, settings, torch.Generator().manual_seed(3))
    p, s, _ = augment_batch(photo, photo.clone(), photo[:, :1] * 0, settings, params=params)
    # Away from the border (where padding differs) the sketch is warped exactly like the photo.
    torch.testing.assert_close(p[..., 16:48, 16:48], s[..., 16:48, 16:48])


def test_all_mode_sketch_jitter_moves_only_the_sketch():
    photo, sketch, matte = _scene(2)
    base = AugmentSettings(mode="all", sketch_jitter_px=0.0)
    jit = AugmentSettings(mode="all", sketch_jitter_px=200.0)  # 200 px @1024 -> up to 12.5 px here
    params = sample_params(2, S, S, jit, torch.Generator().manual_seed(1))
    p0, s0, m0 = augment_batch(
        photo, sketch, matte, base, params=AugmentParams(params.flip, params.angle, params.translate, torch.zeros(2, 2))
    )
    p1, s1, m1 = augment_batch(photo, sketch, matte, jit, params=params)
    assert torch.equal(p0, p1) and torch.equal(m0, m1)
    assert not torch.allclose(s0, s1)
    assert float(params.jitter.abs().max()) <= 200.0 * S / 1024


def test_seed_mode_photo_fixed_sketch_and_matte_together():
    photo, _, matte = _scene(6)
    settings = AugmentSettings(mode="seed")
    sketch = matte.repeat(1, 3, 1, 1)  # same content as the matte
    p, s, m = augment_batch(photo, sketch, matte, settings, torch.Generator().manual_seed(2))
    assert p is photo
    assert torch.equal((s.mean(1, keepdim=True) > 0.5).float(), m)
    assert not torch.equal(m, matte)
    assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_translation_scales_with_resolution():
    g = torch.Generator().manual_seed(0)
    small = sample_params(4096, 256, 256, AugmentSettings(), g)
    big = sample_params(4096, 1024, 1024, AugmentSettings(), torch.Generator().manual_seed(0))
    assert float(big.translate.abs().max()) <= 50.0 and float(big.translate.abs().max()) > 45.0
    torch.testing.assert_close(small.translate * 4, big.translate)
    assert float(big.angle.abs().max()) <= 15.0
    flips = float(big.flip.float().mean())
    assert 0.45 < flips < 0.55


def test_flip_and_rotation_matrices():
    params = AugmentParams(torch.tensor([True]), torch.tensor([0.0]), torch.zeros(1, 2), torch.zeros(1, 2))
    m = affine_matrices(params, 9, 9)
    torch.testing.assert_close(m[0], torch.tensor([[-1.0, 0.0, 8.0], [0.0, 1.0, 0.0]]))
    x = torch.zeros(1, 1, 9, 9)
    x[..., 4, 8] = 1
    p, _, _ = augment_batch(x.repeat(1, 3, 1, 1), x.repeat(1, 3, 1, 1), x, AugmentSettings(), params=params)
    assert float(p[0, 0, 4, 0]) == pytest.approx(1.0)


def test_unknown_mode_rejected():
    with pytest.raises(ValueError, match="unknown augmentation mode"):
        AugmentSettings(mode="sometimes")


# -- matte growth ------------------------------------------------------------------------------
def _hair(batch: int = 6, size: int = 128):
    matte = torch.zeros(batch, 1, size, size)
    matte[..., 20:60, 30:90] = 1.0
    return matte


def test_matte_growth_contains_the_hair_and_grows_it():
    from hairdiff_core.data.augment import MatteGrowth, grow_matte

    matte = _hair()
    g = torch.Generator().manual_seed(1)
    grown = grow_matte(matte, MatteGrowth(p=1.0), g)
    assert grown is not matte and torch.equal(matte, _hair())  # the input is not modified
    assert set(grown.unique().tolist()) <= {0.0, 1.0}
    assert bool((grown >= matte).all())  # grown ⊇ original
    added = (grown - matte).sum(dim=(1, 2, 3))
    # Dilation of 16-64 px at 1024 is 2-8 px at 128: at least a 2 px ring around a 40x60 box.
    assert bool((added >= 2 * 2 * (40 + 60)).all())
    # ... but it stays a matte, not the whole image.
    assert bool((grown.mean(dim=(1, 2, 3)) < 0.9).all())


def test_matte_growth_probability_zero_is_the_old_behaviour():
    from hairdiff_core.data.augment import MatteGrowth, grow_matte

    matte = _hair()
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert grow_matte(matte, MatteGrowth(p=0.0), g) is matte
    assert torch.equal(g.get_state(), state)  # no draw: sigma and noise of the step are unchanged


def test_matte_growth_is_deterministic_and_random_per_item():
    from hairdiff_core.data.augment import MatteGrowth, grow_matte

    matte = _hair(batch=64, size=32)
    a = grow_matte(matte, MatteGrowth(p=0.5), torch.Generator().manual_seed(3))
    b = grow_matte(matte, MatteGrowth(p=0.5), torch.Generator().manual_seed(3))
    c = grow_matte(matte, MatteGrowth(p=0.5), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    grown = (a != matte).flatten(1).any(1).float().mean()
    assert 0.3 < float(grown) < 0.7  # about p of the items grow


def test_matte_growth_leaves_the_sketch_alone_in_the_training_step():
    """The trainer's order: warp photo/sketch/matte, then grow only the matte."""
    from hairdiff_core.data.augment import MatteGrowth, grow_matte

    photo, sketch, matte = _scene(4)
    g = torch.Generator().manual_seed(0)
    _, sketch_a, matte_a = augment_batch(photo, sketch, matte, AugmentSettings(mode="seed"), generator=g)
    kept = sketch_a.clone()
    grown = grow_matte(matte_a, MatteGrowth(p=1.0), g)
    assert torch.equal(sketch_a, kept)
    assert bool((grown >= matte_a).all()) and float((grown - matte_a).sum()) > 0
    with pytest.raises(ValueError, match="probability"):
        MatteGrowth(p=1.5)
