"""Sketch Preprocess and Hair Matte: pure tensor nodes."""

from __future__ import annotations

import pytest
import torch


def _pencil_sketch(h=48, w=64):
    s = torch.ones(1, h, w, 3)  # white paper
    s[:, 20:22, 10:50] = 0.1  # dark pencil line
    return s


def test_pencil_on_paper_becomes_white_strokes_on_black(comfy):
    out = comfy.nodes.SketchPreprocess.execute(sketch=_pencil_sketch())
    image, strokes = out[0], out[1]
    assert image.shape == (1, 48, 64, 3) and strokes.shape == (1, 48, 64)
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    assert torch.all(image[0, 20:22, 10:50] == 1.0) and torch.all(image[0, :15] == 0.0)
    assert torch.equal(strokes[0] > 0.5, image[0].amax(-1) > 0.5)
    assert out.ui is not None  # shows the result


def test_input_is_not_mutated_and_invert_and_background(comfy):
    sketch = _pencil_sketch()
    before = sketch.clone()
    inverted = comfy.nodes.SketchPreprocess.execute(sketch=1 - sketch, invert=True)[1]
    plain = comfy.nodes.SketchPreprocess.execute(sketch=sketch)[1]
    assert torch.equal(sketch, before) and torch.equal(inverted, plain)
    # A chalk sketch on black read as "light background" would find the whole page a stroke;
    # declaring the background dark finds exactly the chalk line.
    chalk = 1 - sketch
    dark = comfy.nodes.SketchPreprocess.execute(sketch=chalk, background="dark")[1]
    assert torch.equal(dark, plain)
    light = comfy.nodes.SketchPreprocess.execute(sketch=chalk, background="light")[1]
    assert float(light.mean()) > 0.9


def test_thickening_and_resize_to_photo(comfy):
    sketch = _pencil_sketch()
    thick = comfy.nodes.SketchPreprocess.execute(sketch=sketch, thickness_px=2)[1]
    thin = comfy.nodes.SketchPreprocess.execute(sketch=sketch)[1]
    assert int(thick.sum()) == (2 + 4) * (40 + 4) and bool((thick >= thin).all())
    photo = torch.rand(1, 96, 128, 3)
    big = comfy.nodes.SketchPreprocess.execute(sketch=sketch, photo=photo)[0]
    assert big.shape == (1, 96, 128, 3)
    with pytest.raises(ValueError, match=r"input 'sketch'.*64x48.*'photo' is 100x96"):
        comfy.nodes.SketchPreprocess.execute(sketch=sketch, photo=torch.rand(1, 96, 100, 3))


def test_sketch_errors_name_the_input(comfy):
    with pytest.raises(ValueError, match=r"input 'sketch'.*IMAGE"):
        comfy.nodes.SketchPreprocess.execute(sketch=torch.rand(1, 32, 32))


def test_matte_grow_shrink_feather_threshold(comfy):
    mask = torch.zeros(2, 40, 40)
    mask[:, 10:30, 10:30] = 0.7
    before = mask.clone()
    hard = comfy.nodes.HairMatte.execute(mask=mask, feather_sigma=0.0)[0]
    assert hard.shape == (2, 40, 40) and int(hard[0].sum()) == 400 and torch.equal(mask, before)
    grown = comfy.nodes.HairMatte.execute(mask=mask, grow_px=3, feather_sigma=0.0)[0]
    shrunk = comfy.nodes.HairMatte.execute(mask=mask, grow_px=-3, feather_sigma=0.0)[0]
    assert int(grown[0].sum()) == 26 * 26 and int(shrunk[0].sum()) == 14 * 14
    soft = comfy.nodes.HairMatte.execute(mask=mask, feather_sigma=3.0)[0]
    assert 0 < float(soft[0, 10, 20]) < 1 and float(soft[0, 20, 20]) == pytest.approx(1.0, abs=1e-4)
    assert float(soft.min()) >= 0 and float(soft.max()) <= 1
    with pytest.raises(ValueError, match=r"input 'mask'.*no hair pixels.*threshold"):
        comfy.nodes.HairMatte.execute(mask=mask, threshold=0.8)
    with pytest.raises(ValueError, match=r"input 'grow_px'"):
        comfy.nodes.HairMatte.execute(mask=mask, grow_px=-15)


def test_matte_from_sketch_fills_the_enclosed_region(comfy):
    sketch = torch.ones(1, 64, 64, 3)
    sketch[:, 10, 10:50] = 0.0  # an open-bottom box of pencil lines, closed by a gap of 1 px
    sketch[:, 10:50, 10] = 0.0
    sketch[:, 10:50, 49] = 0.0
    sketch[:, 49, 10:30] = 0.0
    sketch[:, 49, 31:50] = 0.0
    matte = comfy.nodes.HairMatte.execute(sketch=sketch, sketch_dilate_px=2, feather_sigma=0.0)[0]
    assert matte.shape == (1, 64, 64)
    assert float(matte[0, 30, 30]) == 1.0  # inside the box
    assert float(matte[0, 60, 60]) == 0.0 and float(matte[0, 2, 2]) == 0.0  # outside
    open_box = comfy.nodes.HairMatte.execute(sketch=sketch, sketch_dilate_px=0, feather_sigma=0.0)[0]
    assert float(open_box[0, 30, 30]) == 0.0  # the 1-px gap leaks without closing
    # mode picks the sources: mask alone, the sketch's region alone, or both (the default).
    mask = torch.zeros(1, 64, 64)
    mask[:, 0:5, 0:5] = 1
    only_mask = comfy.nodes.HairMatte.execute(mask=mask, sketch=sketch, feather_sigma=0.0, mode="mask")[0]
    assert torch.equal(only_mask, mask)
    union = comfy.nodes.HairMatte.execute(mask=mask, sketch=sketch, sketch_dilate_px=2, feather_sigma=0.0)[0]
    assert torch.equal(union, torch.maximum(mask, matte))
    only_sketch = comfy.nodes.HairMatte.execute(
        mask=mask, sketch=sketch, sketch_dilate_px=2, feather_sigma=0.0, mode="sketch"
    )[0]
    assert torch.equal(only_sketch, matte)


def test_matte_shorter_hair_with_exclusion_and_photo_preview(comfy, caplog):
    sketch = torch.ones(1, 64, 64, 3)
    sketch[:, 8, 8:56] = 0.0  # a box outline framing the face
    sketch[:, 8:56, 8] = 0.0
    sketch[:, 8:56, 55] = 0.0
    sketch[:, 55, 8:56] = 0.0
    old_hair = torch.zeros(1, 64, 64)
    old_hair[:, 0:12, 4:60] = 1
    face = torch.zeros(1, 64, 64)
    face[:, 20:50, 20:44] = 1
    photo = torch.rand(1, 64, 64, 3)
    out = comfy.nodes.HairMatte.execute(
        mask=old_hair, sketch=sketch, exclude=face, photo=photo, sketch_dilate_px=0, feather_sigma=0.0
    )
    matte = out[0]
    assert float(matte[0, 2, 30]) == 1.0 and float(matte[0, 30, 12]) == 1.0  # old hair and the sketched region
    assert not bool(matte[face.bool()].any())  # the face stays the photo's
    assert out.ui.image.shape == photo.shape  # the preview is the matte over the photo
    with caplog.at_level("WARNING"):
        comfy.nodes.HairMatte.execute(mask=old_hair, sketch=sketch, sketch_dilate_px=0, feather_sigma=0.0)
    assert "covers" in caplog.text  # the box encloses most of the picture: a warning, not an error
    # LoadImage's MASK of a picture without alpha is a 64x64 zero placeholder: ignored in a union.
    photo_wide = torch.rand(1, 64, 80, 3)
    wide_sketch = torch.nn.functional.pad(sketch.movedim(-1, 1), (8, 8), value=1.0).movedim(1, -1)
    caplog.clear()
    with caplog.at_level("WARNING"):
        placeholder = comfy.nodes.HairMatte.execute(
            mask=torch.zeros(1, 64, 64),
            sketch=wide_sketch,
            photo=photo_wide,
            exclude=torch.zeros(1, 64, 64),
            sketch_dilate_px=0,
            feather_sigma=0.0,
        )[0]
    assert placeholder.shape == (1, 64, 80) and float(placeholder[0, 30, 20]) == 1.0
    assert "the exclude mask is empty, nothing is protected" in caplog.text  # e.g. a Protect picture without alpha
    with pytest.raises(ValueError, match=r"input 'exclude'.*covers the whole matte"):
        comfy.nodes.HairMatte.execute(mask=old_hair, exclude=torch.ones(1, 64, 64))
    with pytest.raises(ValueError, match=r"input 'mode'.*needs a sketch"):
        comfy.nodes.HairMatte.execute(mask=old_hair, mode="sketch")


def test_matte_without_inputs_says_what_to_connect(comfy):
    with pytest.raises(ValueError, match=r"input 'mask'.*neither 'mask' nor 'sketch'"):
        comfy.nodes.HairMatte.execute()
    with pytest.raises(ValueError, match=r"input 'sketch'.*no hair pixels"):
        comfy.nodes.HairMatte.execute(sketch=torch.ones(1, 32, 32, 3))


def test_mask_layouts_are_accepted(comfy):
    m = torch.zeros(16, 16)
    m[4:12, 4:12] = 1
    for layout in (m, m[None], m[None, None]):
        assert comfy.nodes.HairMatte.execute(mask=layout, feather_sigma=0.0)[0].shape == (1, 16, 16)
