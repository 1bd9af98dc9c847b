"""The shared image operators: one Sobel, one blur, one luminance, checked against references."""

from __future__ import annotations

import math
import subprocess
import sys

import kornia
import numpy as np
import pytest
import torch

from hairdiff_core.errors import InputError
from hairdiff_core.imageops import gaussian_blur, luminance, sobel, to_rgb


def test_sobel_equals_kornia_normalised_spatial_gradient():
    x = torch.rand(2, 3, 17, 23, generator=torch.Generator().manual_seed(0))
    gx, gy = sobel(x)
    ref = kornia.filters.spatial_gradient(x, mode="sobel", order=1, normalized=True)
    torch.testing.assert_close(gx, ref[:, :, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(gy, ref[:, :, 1], atol=1e-6, rtol=0)


def _conv_reference(x, sigma):
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = (k / k.sum()).float()
    c = x.shape[1]
    out = torch.nn.functional.pad(x, (r, r, 0, 0), mode="replicate")
    out = torch.nn.functional.conv2d(out, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = torch.nn.functional.pad(out, (0, 0, r, r), mode="replicate")
    return torch.nn.functional.conv2d(out, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


@pytest.mark.parametrize("sigma", [0.7, 2.0, 4.5, 12.0])  # slice path (<= 31 taps) and conv path
def test_blur_is_the_replicate_border_gaussian(sigma):
    x = torch.rand(1, 2, 80, 96, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gaussian_blur(x, sigma), _conv_reference(x, sigma), atol=1e-5, rtol=0)


def test_blur_keeps_a_border_matte_at_one_and_zero_is_identity():
    m = torch.zeros(1, 1, 40, 40)
    m[..., :, :10] = 1
    out = gaussian_blur(m, 3.0)
    assert torch.all(out[..., 0] > 0.999) and gaussian_blur(m, 0) is m


def test_blur_larger_than_the_image_is_the_mean_and_bad_sigma_is_refused():
    x = torch.rand(1, 3, 30, 20, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gaussian_blur(x, 1e9), x.mean((-2, -1), keepdim=True).expand_as(x))
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(InputError, match="sigma"):
            gaussian_blur(x, bad)


def test_huge_sigmas_stay_within_a_small_memory_limit():
    code = (
        "import resource, torch\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "from hairdiff_core.imageops import gaussian_blur\n"
        "x = torch.rand(1, 1, 256, 192)\n"
        "for s in (60.0, 200.0, 1e9):\n"
        "    assert torch.isfinite(gaussian_blur(x, s)).all()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_luminance_matches_pil_greyscale_and_to_rgb_accepts_1_3_4_channels():
    from PIL import Image

    rgb = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    pil = Image.fromarray((rgb[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    grey = torch.from_numpy(np.asarray(pil.convert("L"), dtype=np.float32))[None, None] / 255
    quantised = torch.from_numpy(np.asarray(pil, dtype=np.float32)).permute(2, 0, 1)[None] / 255
    assert (luminance(quantised) - grey).abs().max() <= 1 / 255
    assert to_rgb(rgb[:, :1]).shape == (1, 3, 8, 8)
    assert torch.equal(to_rgb(torch.cat([rgb, rgb[:, :1]], 1)), rgb)
    with pytest.raises(InputError, match="2 channels"):
        to_rgb(rgb[:, :2], "photo")


def test_resize_same_aspect_resizes_within_one_percent_and_refuses_other_ratios():
    from hairdiff_core.imageops import resize_same_aspect

    x = torch.rand(1, 1, 50, 100)
    assert resize_same_aspect(x, (50, 100), "sketch") is x
    assert resize_same_aspect(x, (100, 200), "matte", mode="nearest").shape == (1, 1, 100, 200)
    assert resize_same_aspect(x, (100, 199), "matte").shape == (1, 1, 100, 199)  # within 1%
    with pytest.raises(InputError, match=r"the sketch is 100x50 but the photo is 100x100: different aspect") as err:
        resize_same_aspect(x, (100, 100), "sketch")
    assert err.value.input == "sketch"
