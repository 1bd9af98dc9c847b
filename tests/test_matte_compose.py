"""compose_matte: old hair mask + the sketch's region - exclusions, grown, feathered, warned."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hairdiff_core.errors import EmptyMaskError, InputError
from hairdiff_core.method.mask import compose_matte, matte_preview, protect_mask, protect_picture, soft_mask

S = 64


def _old_hair():
    m = torch.zeros(1, 1, S, S)
    m[..., 4:20, 16:48] = 1.0  # a crown of hair
    return m


def _ring_sketch():
    """Dark strokes on white: a closed ring around the 'face' (rows 24-44, cols 20-44)."""
    s = torch.ones(1, 3, S, S)
    s[..., 22:24, 18:46] = 0.0
    s[..., 44:46, 18:46] = 0.0
    s[..., 22:46, 18:20] = 0.0
    s[..., 22:46, 44:46] = 0.0
    return s


def _face():
    f = torch.zeros(1, 1, S, S)
    f[..., 26:42, 22:42] = 1.0
    return f


def test_union_mask_and_sketch_modes():
    old, sketch = _old_hair(), _ring_sketch()
    union = compose_matte(old, sketch, sketch_dilate_px=0).binary
    only_mask = compose_matte(old, sketch, mode="mask").binary
    only_sketch = compose_matte(old, sketch, mode="sketch", sketch_dilate_px=0).binary
    assert torch.equal(only_mask, old)
    assert bool(only_sketch[..., 30, 30] == 1) and bool(only_sketch[..., 10, 30] == 0)  # enclosed, not the crown
    assert torch.equal(union, torch.maximum(only_mask, only_sketch))
    assert torch.equal(compose_matte(old).binary, old)  # union of what is given


def test_exclusion_removes_the_face_enclosed_by_strokes():
    composed = compose_matte(_old_hair(), _ring_sketch(), _face(), sketch_dilate_px=0)
    face = _face().bool()
    assert not bool(composed.binary[face].any())  # the protected face stays out
    assert bool(composed.binary[..., 22, 30] == 1) and bool(
        composed.binary[..., 10, 30] == 1
    )  # strokes and old hair stay
    with pytest.raises(EmptyMaskError, match="exclusion mask covers the whole matte"):
        compose_matte(_old_hair(), exclude=torch.ones(1, 1, S, S))


def test_grow_shrink_and_feather():
    old = _old_hair()
    grown = compose_matte(old, grow_px=3).binary
    shrunk = compose_matte(old, grow_px=-3).binary
    assert grown.sum() > old.sum() > shrunk.sum() > 0
    assert bool((grown >= old).all()) and bool((shrunk <= old).all())
    with pytest.raises(EmptyMaskError, match="shrinking the matte by 40 px"):
        compose_matte(old, grow_px=-40)
    c = compose_matte(old, feather_px=3.0)
    assert torch.equal(c.binary, old)
    assert 0 < float(c.soft[..., 20, 30]) < 1 and float(c.soft.min()) >= 0 and float(c.soft.max()) <= 1
    assert torch.equal(compose_matte(old).soft, old)


def test_large_matte_warns_but_does_not_fail(caplog):
    big = torch.zeros(1, 1, S, S)
    big[..., :, :50] = 1.0
    c = compose_matte(big)
    assert c.coverage == [pytest.approx(50 / 64)]
    assert len(c.warnings) == 1 and "covers 78% of the image" in c.warnings[0]
    assert compose_matte(_old_hair()).warnings == []


def test_a_matte_over_the_protected_region_warns_with_numbers():
    # The ring encloses the whole face: before the exclusion the matte covers all of it.
    c = compose_matte(_old_hair(), _ring_sketch(), _face(), sketch_dilate_px=0)
    assert c.protected_overlap == [1.0]
    (line,) = [w for w in c.warnings if "protected region" in w]
    assert "reached over 100% of the protected region (item 0: 320 of its 320 px, 8% of the image)" in line
    # Old hair beside the face, nothing enclosing it: no warning, the face was never in the matte.
    clean = compose_matte(_old_hair(), exclude=_face())
    assert clean.protected_overlap == [0.0] and clean.warnings == []
    # Grown into the face's top rows (16 of 320 px): a small overlap is taken out without a warning.
    touching = compose_matte(_old_hair(), exclude=_face(), grow_px=7)
    assert 0 < touching.protected_overlap[0] < 0.5 and touching.warnings == []
    # No exclusion (or an empty one): nothing to measure.
    assert compose_matte(_old_hair()).protected_overlap == []
    assert compose_matte(_old_hair(), exclude=torch.zeros(1, 1, S, S)).protected_overlap == []


def test_the_feather_stops_at_the_protected_region():
    c = compose_matte(_old_hair(), _ring_sketch(), _face(), sketch_dilate_px=0, feather_px=3.0)
    face = _face().bool()
    assert float(c.soft[face].abs().max()) == 0.0  # the feathered edge does not reach into the face
    assert float(c.soft[..., 24, 30]) > 0  # outside it the edge is soft as before
    # and as before outside it (a blur computed twice: equal up to float rounding, not bit for bit)
    torch.testing.assert_close(c.soft, soft_mask(c.binary, 3.0).where(~face, 0.0), rtol=0, atol=1e-6)


def test_a_protect_picture_reads_as_comfyuis_load_image_mask():
    """Transparent = protected (Load Image's MASK = 1 - alpha, what the mask editor paints); without
    transparency a plain mask, white = protected. protect_picture turns the plain one into the first."""
    face = _face()
    photo = torch.rand(1, 3, S, S)
    transparent = torch.cat([photo, 1.0 - face], 1)
    assert torch.equal(protect_mask(transparent), face)
    assert torch.equal(protect_mask(face), face)  # grey mask
    assert torch.equal(protect_mask(face.expand(-1, 3, -1, -1)), face)  # RGB black/white
    opaque = torch.cat([face.expand(-1, 3, -1, -1), torch.ones_like(face)], 1)
    assert torch.equal(protect_mask(opaque), face)  # opaque RGBA: its picture is the mask
    assert torch.equal(protect_picture(transparent), transparent)
    for plain in (face, face.expand(-1, 3, -1, -1), opaque):
        picture = protect_picture(plain)
        assert picture.shape == (1, 4, S, S) and torch.equal(1.0 - picture[:, 3:], face)
    # The same protection as an exclusion, whichever way it was given.
    assert torch.equal(
        compose_matte(_old_hair(), _ring_sketch(), protect_mask(transparent), sketch_dilate_px=0).binary,
        compose_matte(_old_hair(), _ring_sketch(), face, sketch_dilate_px=0).binary,
    )
    with pytest.raises(InputError, match="2 channels"):
        protect_mask(torch.zeros(1, 2, S, S))


def test_cli_exclude_reads_a_protect_picture_like_comfyuis_load_image(tmp_path):
    """hairdiff generate --exclude: the bundled protect picture (face transparent) and a plain mask of the
    same face (white) protect the same pixels."""
    import argparse

    from PIL import Image

    from hairdiff_cli.commands.generate import compose_matte_from_args
    from hairdiff_core.data.imageio import load_image

    assets = Path(__file__).resolve().parents[1] / "hairdiff_core" / "assets"
    with Image.open(assets / "sample_face_protect.png") as im:
        im.getchannel("A").point(lambda v: 255 - v).save(tmp_path / "face_white.png")
    photo, sketch = load_image(assets / "sample_photo.png"), load_image(assets / "sample_sketch.png")
    out = []
    for exclude in (assets / "sample_face_protect.png", tmp_path / "face_white.png"):
        args = argparse.Namespace(
            matte=[str(assets / "sample_matte.png")], matte_add_sketch=True, exclude=[str(exclude)], matte_threshold=0.5
        )
        out.append(compose_matte_from_args(args, photo, sketch))
    face = load_image(tmp_path / "face_white.png") > 0.5
    first, second = out  # the binary mattes
    assert torch.equal(first, second) and float(first[face].max()) == 0.0 and float(first.mean()) > 0.2


def test_errors_name_the_missing_or_mismatched_input():
    with pytest.raises(InputError, match="mode 'mask' needs a mask"):
        compose_matte(sketch=_ring_sketch(), mode="mask")
    with pytest.raises(InputError, match="mode 'sketch' needs a sketch"):
        compose_matte(_old_hair(), mode="sketch")
    with pytest.raises(InputError, match="no matte source"):
        compose_matte(exclude=_face())
    with pytest.raises(InputError, match="not one of"):
        compose_matte(_old_hair(), mode="both")
    with pytest.raises(InputError, match="the exclusion mask is 32x64 but the mask is 64x64"):
        compose_matte(_old_hair(), exclude=torch.zeros(1, 1, 64, 32))
    with pytest.raises(EmptyMaskError, match="the mask gave no hair pixels"):
        compose_matte(torch.zeros(1, 1, S, S))
    # Same aspect ratio, another size: resized to the photo's size.
    half = compose_matte(_old_hair()[..., ::2, ::2], size=(S, S)).binary
    assert half.shape == (1, 1, S, S) and torch.equal(half, _old_hair())


def test_preview_tints_only_the_matte():
    photo = torch.full((1, 3, S, S), 0.5)
    prev = matte_preview(photo, _old_hair())
    assert prev.shape == photo.shape
    inside, outside = prev[0, :, 10, 30], prev[0, :, 50, 10]
    assert float(inside[0]) > float(inside[2])  # tinted
    assert torch.allclose(outside, torch.full((3,), 0.3))  # dimmed, untinted


def test_cli_matte_flags_compose_mattes_sketch_and_exclusions(tmp_path, capsys, monkeypatch, caplog):
    from PIL import Image

    import hairdiff_cli
    from hairdiff_core.pipeline import HairDiffPipeline

    Image.new("RGB", (64, 64), (120, 90, 60)).save(tmp_path / "photo.png")
    sketch = Image.new("RGB", (64, 64), (255, 255, 255))
    for x in range(18, 46):  # a ring of dark strokes framing the 'face'
        for y in (22, 23, 44, 45):
            sketch.putpixel((x, y), (0, 0, 0))
            sketch.putpixel((y - 4, x), (0, 0, 0))
            sketch.putpixel((y, x), (0, 0, 0))
    sketch.save(tmp_path / "sketch.png")
    for name, box in (("a", (16, 4, 32, 20)), ("b", (32, 4, 48, 20)), ("face", (22, 26, 42, 42))):
        m = Image.new("L", (64, 64), 0)
        m.paste(255, box)
        m.save(tmp_path / f"{name}.png")
    seen = []
    original = HairDiffPipeline.generate

    def spy(self, photo, sk, matte, **kwargs):
        seen.append(matte)
        return original(self, photo, sk, matte, **kwargs)

    monkeypatch.setattr(HairDiffPipeline, "generate", spy)
    base = [
        "generate",
        "--tiny",
        "--steps",
        "1",
        "--image",
        str(tmp_path / "photo.png"),
        "--sketch",
        str(tmp_path / "sketch.png"),
        "--out",
        str(tmp_path / "out.png"),
    ]
    both = ["--matte", str(tmp_path / "a.png"), "--matte", str(tmp_path / "b.png")]
    assert hairdiff_cli.main(base + both) == 0
    assert int(seen[-1].sum()) == 32 * 16  # the union of the two mattes
    assert hairdiff_cli.main(base + both + ["--matte-add-sketch", "--exclude", str(tmp_path / "face.png")]) == 0
    matte = seen[-1][0, 0]
    assert bool(matte[10, 20] == 1) and bool(matte[23, 30] == 1)  # old hair and the sketch's strokes
    assert not bool(matte[26:42, 22:42].any())  # the protected face
    assert bool(matte[30, 20] == 1)  # enclosed by the strokes, outside the face
    assert hairdiff_cli.main(base) == 2
    assert "no matte: pass --matte FILE" in capsys.readouterr().err


def test_eval_option_adds_the_sketch_region_to_each_matte():
    from types import SimpleNamespace

    from hairdiff_core.evaluation.evaluate import EvalOptions, EvalSetting, evaluate_samples

    class FakePipeline:  # records the matte; the metrics run on the photo itself
        mattes = []

        def generate(self, image, sketch, matte, **kw):
            self.mattes.append(matte)
            return SimpleNamespace(image=image)

    photo = torch.rand(1, 3, S, S)
    sample = {"stem": "x", "image": photo, "sketch": _ring_sketch(), "matte": _old_hair()}
    pipe = FakePipeline()
    for add in (False, True):
        evaluate_samples(pipe, [sample], [EvalSetting("joint")], EvalOptions(steps=1, matte_add_sketch=add))
    plain, added = pipe.mattes
    assert torch.equal(plain, _old_hair())
    assert torch.equal(added, compose_matte(_old_hair(), _ring_sketch()).binary) and added.sum() > plain.sum()
