"""Dataset scan/validation and sample loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hairdiff_core.data.datasets import DatasetError, check_resolution, load_sample, resize_center_crop, scan_dataset
from hairdiff_core.errors import InputError
from training.synthetic import make_synthetic_dataset


@pytest.fixture
def dataset(tmp_path):
    return make_synthetic_dataset(tmp_path / "ds", n=4, size=48, braid=1)


def test_clean_dataset_scans(dataset):
    scan = scan_dataset(dataset)
    assert [s.stem for s in scan.samples] == ["s000", "s001", "s002", "s003"]
    assert scan.problems == []
    assert [s.is_braid for s in scan.samples] == [True, False, False, False]


def _break_dataset(root):
    (root / "sketch" / "s000.png").unlink()  # missing pair
    (root / "img" / "s001.png").write_bytes(b"not an image at all")  # unreadable
    Image.new("L", (32, 48)).save(root / "matte" / "s002.png")  # size mismatch (and empty)
    Image.new("L", (48, 48), 0).save(root / "matte" / "s003.png")  # empty matte
    Image.new("RGB", (48, 48)).save(root / "img" / "s004.jpg")  # photo with no matte or sketch
    Image.new("RGB", (48, 48)).save(root / "img" / "s003.webp")  # duplicate stem
    (root / "braid.txt").write_text("s000\nnosuch\n")


def test_each_kind_of_bad_sample_is_named(dataset):
    _break_dataset(dataset)
    with pytest.raises(DatasetError) as info:
        scan_dataset(dataset)
    msg = str(info.value)
    assert "s000: no sketch file" in msg
    assert "s001: unreadable img file s001.png" in msg
    assert "s002: sizes differ (img 48x48, matte 32x48, sketch 48x48)" in msg
    assert "s003: several img files with this stem (s003.png, s003.webp)" in msg
    assert "s004: no matte file" in msg and "s004: no sketch file" in msg
    assert "nosuch: listed in braid.txt" in msg
    assert "--skip-bad" in msg


def test_empty_matte_is_named(dataset):
    Image.new("L", (48, 48), 0).save(dataset / "matte" / "s003.png")
    with pytest.raises(DatasetError, match=r"s003: empty matte \(s003.png has no pixel above 0.5\)"):
        scan_dataset(dataset)


def test_skip_bad_keeps_the_good_ones(dataset):
    Image.new("L", (48, 48), 0).save(dataset / "matte" / "s003.png")
    (dataset / "sketch" / "s000.png").unlink()
    scan = scan_dataset(dataset, skip_bad=True)
    assert [s.stem for s in scan.samples] == ["s001", "s002"]
    assert scan.bad_stems == ["s000", "s003"]
    assert {p.stem for p in scan.problems} == {"s000", "s003"}


def test_no_usable_sample_is_refused_even_with_skip_bad(dataset):
    for p in (dataset / "sketch").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="no usable sample"):
        scan_dataset(dataset, skip_bad=True)


def test_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan_dataset(tmp_path / "nowhere")
    (tmp_path / "img").mkdir()
    with pytest.raises(DatasetError, match=r"lacks the sub-folder\(s\) \['matte', 'sketch'\]"):
        scan_dataset(tmp_path)


def test_load_sample_resolution_and_conventions(tmp_path):
    root = tmp_path / "ds"
    for kind in ("img", "matte", "sketch"):
        (root / kind).mkdir(parents=True)
    photo = np.zeros((60, 100, 3), np.uint8)
    photo[:, 50:] = 255  # right half white
    Image.fromarray(photo).save(root / "img" / "a.png")
    matte = np.zeros((60, 100), np.uint8)
    matte[10:30, 40:60] = 255
    Image.fromarray(matte).save(root / "matte" / "a.png")
    sketch = np.full((60, 100, 3), 255, np.uint8)
    sketch[20, 30:70] = 0  # a dark pencil line on white paper
    Image.fromarray(sketch).save(root / "sketch" / "a.jpg")
    (s,) = scan_dataset(root).samples
    item = load_sample(s, resolution=48, crop="center")
    assert item["image"].shape == (3, 48, 48) and item["sketch"].shape == (3, 48, 48)
    assert item["matte"].shape == (1, 48, 48)
    assert set(item["matte"].unique().tolist()) <= {0.0, 1.0} and item["matte"].sum() > 0
    # Centre crop: the black/white boundary of the photo stays in the middle.
    assert item["image"][:, :, :20].max() < 0.05 and item["image"][:, :, 28:].min() > 0.95
    # Canonical sketch: the pencil line became bright on black.
    assert item["sketch"][:, 16].max() > 0.5 and item["sketch"][:, :8].max() == 0
    full = load_sample(s)
    assert full["image"].shape == (3, 60, 100)


def test_resolution_must_be_multiple_of_16():
    assert check_resolution(64) == 64
    with pytest.raises(InputError, match="use 96 or 112"):
        check_resolution(100)


def test_resize_center_crop_square():
    x = torch.arange(2 * 1 * 32 * 64, dtype=torch.float32).view(2, 1, 32, 64)
    out = resize_center_crop(x, 32)
    assert out.shape == (2, 1, 32, 32)
    assert torch.equal(out, x[..., 16:48])


# -- aspect buckets ------------------------------------------------------------------------------
@pytest.mark.parametrize("resolution", [32, 64, 512, 1024])
def test_bucket_set_sides_area_and_symmetry(resolution):
    from hairdiff_core.data.datasets import aspect_buckets

    buckets = aspect_buckets(resolution)
    assert (resolution, resolution) in buckets
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0
        assert h * w <= resolution**2 and h * w >= 0.85 * resolution**2 or resolution < 128
        assert max(h, w) / min(h, w) <= 2.0
        assert (w, h) in buckets
    if resolution == 1024:
        # SDXL's 1024 list, every bucket of which is in ours.
        for hw in ((1152, 896), (1216, 848), (1344, 768)):
            assert hw in buckets and hw[::-1] in buckets
        assert len(buckets) == 13


def _portrait_dataset(root, h=1024, w=768, top=0, bottom=960):
    for kind in ("img", "matte", "sketch"):
        (root / kind).mkdir(parents=True)
    photo = np.zeros((h, w, 3), np.uint8)
    photo[..., 0] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]  # row ramp: locates the crop
    Image.fromarray(photo).save(root / "img" / "p.png")
    matte = np.zeros((h, w), np.uint8)
    matte[top:bottom, 100:668] = 255  # long hair from the top edge to 64 px above the bottom
    Image.fromarray(matte).save(root / "matte" / "p.png")
    sketch = np.zeros((h, w, 3), np.uint8)
    sketch[top + 10 : bottom - 10 : 50, 120:640] = 255
    Image.fromarray(sketch).save(root / "sketch" / "p.png")
    (s,) = scan_dataset(root).samples
    return s


def test_portrait_768x1024_keeps_its_whole_matte(tmp_path):
    from hairdiff_core.data.datasets import HairDataset

    s = _portrait_dataset(tmp_path / "ds")
    assert s.size == (768, 1024)
    item = load_sample(s, resolution=1024)
    h, w = item["matte"].shape[-2:]
    assert (h, w) == (1152, 896)  # the 3:4 portrait's bucket (aspect 1.29 vs 1.33)
    # No matte pixel cut: the matte's area is the stored one scaled by the resize (1152/1024 x).
    scale = max(1152 / 1024, 896 / 768)
    expected = 960 * 568 * scale**2
    assert abs(float(item["matte"].sum()) - expected) / expected < 0.01
    assert item["matte"][0, 0].any()  # the hair still touches the top edge
    rows = item["matte"][0].any(dim=1).nonzero().flatten()
    assert int(rows[-1]) < 1152 - 1  # and ends above the bottom: nothing was cut there either
    # The centre square of the old behaviour cuts the top and bottom of that hair.
    square = load_sample(s, resolution=1024, crop="center")
    assert square["matte"].shape[-2:] == (1024, 1024)
    assert float(square["matte"].sum()) / (960 * 568 * (1024 / 768) ** 2) < 0.85  # ~20% of the hair lost
    ds = HairDataset([s], 1024)
    assert ds.buckets == [(1152, 896)] and HairDataset([s], 1024, crop="center").buckets == [(1024, 1024)]


def test_bucket_crop_is_placed_where_the_matte_is_not(tmp_path):
    from hairdiff_core.data.datasets import crop_offset, resize_to_bucket

    # 100 rows to a window of 80: a matte in rows 0..50 keeps the top, one in 60..99 the bottom.
    cov = torch.zeros(100)
    cov[0:50] = 1
    assert crop_offset(100, 80, cov) == 0
    cov = torch.zeros(100)
    cov[60:100] = 1
    assert crop_offset(100, 80, cov) == 20
    assert crop_offset(100, 80, None) == 10  # no matte: centred
    cov = torch.zeros(100)
    cov[5:95] = 1  # longer than the window: centred on the matte
    assert crop_offset(100, 80, cov) == 10
    x = torch.arange(100.0).view(1, 1, 100, 1).expand(1, 1, 100, 80).contiguous()
    m = torch.zeros(1, 1, 100, 80)
    m[..., 60:, :] = 1
    out = resize_to_bucket(x, (80, 80), m)
    assert torch.equal(out[0, 0, :, 0], torch.arange(20.0, 100.0))


def test_bad_crop_mode_is_refused():
    from hairdiff_core.data.datasets import check_crop

    with pytest.raises(InputError, match=r"crop mode 'middle'.*bucket"):
        check_crop("middle")
