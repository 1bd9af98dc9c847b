"""Images are read at their real range and orientation, whatever PIL mode or format they come in,
and written in the format their suffix names; one sketch in three encodings is one sketch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hairdiff_core.data.imageio import load_image, save_image
from hairdiff_core.errors import InputError, OutputPathError
from hairdiff_core.method import mask as M


def _grey_ramp(h=8, w=12) -> np.ndarray:
    """Values in [0, 1], darker than 1 everywhere (a scale-by-maximum reader would brighten it)."""
    return (np.arange(h * w, dtype=np.float64).reshape(h, w) / (h * w)) * 0.4 + 0.1


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_greyscale_is_read_over_65535_not_its_maximum(tmp_path, mode):
    ramp = _grey_ramp()
    values = np.round(ramp * 65535).astype(np.uint16)
    h, w = values.shape
    im = Image.frombytes(mode, (w, h), values.astype("<u2" if mode == "I;16" else ">u2").tobytes())
    path = tmp_path / ("a.png" if mode == "I;16" else "a.tif")
    im.save(path)
    x = load_image(path)
    assert x.shape == (1, 1, 8, 12)
    torch.testing.assert_close(x[0, 0].double(), torch.from_numpy(values / 65535.0), atol=1e-6, rtol=0)


def test_float_tiff_is_read_as_0_to_1(tmp_path):
    ramp = _grey_ramp().astype(np.float32)
    Image.fromarray(ramp, mode="F").save(tmp_path / "f.tif")
    x = load_image(tmp_path / "f.tif")
    torch.testing.assert_close(x[0, 0], torch.from_numpy(ramp))


def test_la_p_transparency_cmyk_and_1_bit(tmp_path):
    la = Image.new("LA", (6, 4), (100, 255))
    la.putpixel((0, 0), (100, 0))
    la.save(tmp_path / "la.png")
    x = load_image(tmp_path / "la.png")
    assert x.shape == (1, 4, 4, 6) and float(x[0, 3, 0, 0]) == 0.0 and float(x[0, 3, 1, 1]) == 1.0
    assert torch.allclose(x[0, :3, 1, 1], torch.full((3,), 100 / 255))

    p = Image.new("P", (6, 4), 1)
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.putpixel((2, 2), 0)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    x = load_image(tmp_path / "p.png")
    assert x.shape[1] == 4 and float(x[0, 3, 2, 2]) == 0.0 and float(x[0, 3, 0, 0]) == 1.0
    assert torch.allclose(x[0, :3, 0, 0], torch.tensor([200, 100, 50]) / 255)

    Image.new("CMYK", (6, 4), (0, 0, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    x = load_image(tmp_path / "c.jpg")
    assert x.shape[1] == 3 and float(x.min()) > 0.95  # no ink = white

    one = Image.new("1", (6, 4), 0)
    one.putpixel((1, 1), 1)
    one.save(tmp_path / "b.png")
    x = load_image(tmp_path / "b.png")
    assert x.shape[1] == 1 and float(x[0, 0, 1, 1]) == 1.0 and float(x.sum()) == 1.0


def test_exif_rotated_jpeg_is_read_as_displayed(tmp_path):
    stored = np.zeros((8, 16, 3), dtype=np.uint8)  # stored landscape, 16 wide
    stored[:, :4] = 255  # a white band on the stored left edge
    im = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    x = load_image(tmp_path / "phone.jpg")
    assert x.shape[-2:] == (16, 8)  # displayed portrait
    assert float(x[0, :, :4, :].mean()) > 0.9 and float(x[0, :, -4:, :].mean()) < 0.1  # band now on top
    from hairdiff_core.data.imageio import image_size

    # The header-only size the CLI checks aspect ratios with is the displayed one too.
    assert image_size(tmp_path / "phone.jpg") == (8, 16)


def test_background_of_a_16_bit_photo_comes_back_unchanged(tmp_path):
    from hairdiff_core.models.tiny import build_tiny_transformer, build_tiny_vae
    from hairdiff_core.pipeline import HairDiffPipeline

    h = w = 32
    rng = np.random.default_rng(0)
    values = (rng.uniform(0.05, 0.3, (h, w)) * 65535).astype(np.uint16)  # a dark 16-bit photo
    Image.frombytes("I;16", (w, h), values.astype("<u2").tobytes()).save(tmp_path / "photo.png")
    matte = np.zeros((h, w), np.uint8)
    matte[8:16, 8:16] = 255
    Image.fromarray(matte).save(tmp_path / "matte.png")
    photo = load_image(tmp_path / "photo.png")
    pipe = HairDiffPipeline(build_tiny_transformer(), build_tiny_vae())
    result = pipe.generate(photo, torch.zeros(1, 3, h, w), load_image(tmp_path / "matte.png"), steps=1)
    save_image(result.image, tmp_path / "out.png")
    back = np.asarray(Image.open(tmp_path / "out.png").convert("L"), dtype=np.float64) / 255
    far = np.ones((h, w), bool)
    far[0:24, 0:24] = False  # away from the matte and its feather
    assert np.abs(back[far] - values[far] / 65535).max() <= 0.5 / 255 + 1e-6  # 8-bit output, exact otherwise


@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP"), (".tiff", "TIFF")])
def test_output_format_follows_the_suffix(tmp_path, suffix, fmt):
    img = torch.rand(1, 3, 16, 16)
    path = save_image(img, tmp_path / f"r{suffix}")
    with Image.open(path) as im:
        assert im.format == fmt and im.size == (16, 16)
    if fmt in ("PNG", "WEBP", "TIFF"):  # lossless
        assert torch.equal(load_image(path), (img * 255).round() / 255)


def test_unknown_suffix_is_refused_before_writing(tmp_path):
    with pytest.raises(OutputPathError, match=r"unknown image suffix '.bmpx'"):
        save_image(torch.rand(1, 3, 4, 4), tmp_path / "r.bmpx")
    assert list(tmp_path.iterdir()) == []


def test_one_sketch_three_encodings_one_canonical_sketch():
    strokes = torch.zeros(1, 1, 24, 24)
    strokes[..., 5:7, 3:20] = 1
    strokes[..., 4:20, 12:14] = 1
    white_bg = (1 - strokes).repeat(1, 3, 1, 1)  # black pencil on white paper
    black_bg = strokes.repeat(1, 3, 1, 1)  # white chalk on black
    transparent = torch.cat([torch.zeros(1, 3, 24, 24), strokes], 1)  # black ink on a transparent layer
    outs = [M.normalize_sketch(s) for s in (white_bg, black_bg, transparent)]
    for rgb, alpha in outs[1:]:
        assert torch.equal(rgb, outs[0][0]) and torch.equal(alpha, outs[0][1])
    assert torch.equal(outs[0][1], strokes) and float(outs[2][0].amax()) == 1.0  # dark strokes stay visible


def test_empty_sketch_warns(caplog):
    from hairdiff_core.pipeline import HairDiffPipeline

    photo, matte = torch.rand(1, 3, 16, 16), torch.zeros(1, 1, 16, 16)
    matte[..., 4:12, 4:12] = 1
    with caplog.at_level("WARNING"):
        HairDiffPipeline.prepare_inputs(photo, torch.ones(1, 3, 16, 16), matte)
    assert "no strokes inside the matte" in caplog.text
    with pytest.raises(InputError, match=r"HairDiff takes images in \[0, 1\]: divide it by 255"):
        HairDiffPipeline.prepare_inputs(photo * 255, torch.ones(1, 3, 16, 16), matte)
