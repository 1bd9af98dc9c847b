"""The Python API refuses bad input with the CLI's messages (HairDiffError subclasses naming their
input), and extreme size settings stay within a memory limit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hairdiff_core.errors import HairDiffError, SettingsError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipe():
    from hairdiff_core.pipeline import HairDiffPipeline

    return HairDiffPipeline.from_files(tiny=True, dtype="fp32")  # a dtype name works as well as torch's


def _inputs(size=32):
    photo = torch.rand(1, 3, size, size)
    matte = torch.zeros(1, 1, size, size)
    matte[..., 8:20, 8:24] = 1
    return photo, photo.clone(), matte


@pytest.mark.parametrize(
    "kw,input_name,pattern",
    [
        ({"steps": "2"}, "steps", r"steps must be a whole number .*got '2' \(a str\)"),
        ({"seed": None}, "seed", r"seed must be .*got None"),
        ({"seed": 2**64}, "seed", r"got 18446744073709551616"),
        ({"cfg": float("nan")}, "cfg", r"cfg .*got nan"),
        ({"shift": 0.0}, "shift", r"shift must be a number above 0"),
        ({"feather_sigma": 1e9}, "feather_sigma", r"feather must be .* to 1024"),
        ({"work_size": 7}, "work_size", r"work size"),
        ({"context_margin": -5}, "context_margin", r"margin"),
        ({"matte_threshold": -1}, "matte_threshold", r"matte threshold"),
        ({"steps": True}, "steps", r"got True \(a bool\)"),
    ],
)
def test_generate_settings_are_refused_by_name(pipe, kw, input_name, pattern):
    with pytest.raises(SettingsError, match=pattern) as info:
        pipe.generate(*_inputs(), **kw)
    assert info.value.input == input_name and "\n" not in str(info.value)


def test_seed_up_to_2_64_minus_1_runs(pipe):
    out = pipe.generate(*_inputs(), steps=1, seed=2**64 - 1)
    assert out.image.shape == (1, 3, 32, 32)


def test_bad_images_and_load_arguments(pipe, tmp_path):
    from hairdiff_core.pipeline import HairDiffPipeline

    photo, sketch, matte = _inputs()
    with pytest.raises(HairDiffError, match=r"divide it by 255") as info:
        pipe.generate(photo * 255, sketch, matte, steps=1)
    assert info.value.input == "photo"
    nan_sketch = sketch.clone()
    nan_sketch[0, 0, 0, 0] = float("nan")
    with pytest.raises(HairDiffError, match=r"sketch holds NaN") as info:
        pipe.generate(photo, nan_sketch, matte, steps=1)
    assert info.value.input == "sketch"
    for kw, pattern in (
        ({"device": "banana"}, "unknown device"),
        ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
        ({"dtype": torch.int8}, "not a float precision"),
        ({"adapter": str(tmp_path / "nope.safetensors")}, "adapter not found"),
    ):
        with pytest.raises(HairDiffError, match=pattern):
            HairDiffPipeline.from_files(tiny=True, **kw)
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match=r"sees no CUDA GPU.*--device cpu"):
            HairDiffPipeline.from_files(tiny=True, device="cuda")


def test_int8_adapter_is_refused(tmp_path, tiny_transformer):
    from safetensors.torch import load_file, save_file

    from hairdiff_core.errors import AdapterFileError
    from hairdiff_core.method.surgery import widen_input_channels
    from hairdiff_core.models.adapter import load_adapter, save_adapter

    widen_input_channels(tiny_transformer)
    path = tmp_path / "a.safetensors"
    save_adapter(tiny_transformer, path)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # not mkstemp's 0600
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    tensors = {k: v.to(torch.int8) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(AdapterFileError, match=r"torch.int8, not floating point"):
        load_adapter(tiny_transformer, path)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


MEMORY_CHECK = """
import resource, torch
from hairdiff_core.method import mask as M
from hairdiff_core.pipeline import HairDiffPipeline
from hairdiff_core.models.tiny import build_tiny_transformer, build_tiny_vae
pipe = HairDiffPipeline(build_tiny_transformer(), build_tiny_vae())
photo = torch.rand(1, 3, 96, 80); matte = torch.zeros(1, 1, 96, 80); matte[..., 30:60, 20:50] = 1
# From here on at most __LIMIT__ more bytes of address space: an unbounded kernel would need GBs.
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + __LIMIT__, hard))
x = torch.zeros(1, 1, 2000, 1500); x[..., 900:1100, 700:800] = 1
for sigma in (1e9, 5000.0, 700.0, 33.0):
    y = M.gaussian_blur(x, sigma)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
r = pipe.generate(photo, photo, matte, steps=1, feather_sigma=1024.0, context_margin=16.0, work_size=4096)
assert r.image.shape == photo.shape
print("ok")
"""


def test_extreme_size_settings_stay_within_a_memory_limit():
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc to measure the address space in use")
    code = MEMORY_CHECK.replace("__LIMIT__", str(1500 * 2**20))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_blur_of_a_huge_sigma_is_the_mean_and_moderate_ones_stay_close():
    from hairdiff_core import imageops as M

    x = torch.zeros(1, 1, 40, 60)
    x[..., 10:20, 10:30] = 1
    torch.testing.assert_close(M.gaussian_blur(x, 1e9), x.mean().expand_as(x))
    # Just above the exact range the reduced-resolution blur agrees with the exact one.
    big = torch.zeros(1, 1, 400, 400)
    big[..., 150:250, 120:280] = 1
    exact_sigma = M.EXACT_BLUR_MAX_SIGMA
    a = M.gaussian_blur(big, exact_sigma)
    b = M.gaussian_blur(big, exact_sigma + 1e-3)
    assert float((a - b).abs().max()) < 0.03


def test_resize_message_is_logged_once_per_run(pipe, caplog):
    photo, _, matte = _inputs(32)
    small_sketch = torch.rand(1, 3, 16, 16)  # same aspect ratio, resized to the photo
    from hairdiff_core.pipeline import HairDiffPipeline

    with caplog.at_level("INFO", logger="hairdiff_core.pipeline"):
        HairDiffPipeline.prepare_inputs(photo, small_sketch, matte)  # the CLI's and node's early check
        pipe.generate(photo, small_sketch, matte, steps=1, announce=False)
    assert caplog.text.count("resizing the sketch") == 1


def test_dilation_radius_is_capped_by_the_image():
    from hairdiff_core.method import mask as M

    m = torch.zeros(1, 1, 20, 30)
    m[..., 5, 7] = 1
    assert torch.equal(M.dilate(m, 10**9), torch.ones_like(m))
    assert torch.equal(M.dilate(M.dilate(m, 3), -(10**9)), torch.zeros_like(m))


@pytest.mark.parametrize(
    "shape,rows,cols",
    [
        ((40, 1600), slice(None), slice(500, 800)),  # a whole photo longer than the model's positions
        ((2000, 600), slice(50, 1950), slice(300, 304)),  # a braid-like 4 px matte
        ((3, 50000), slice(None), slice(20000, 25000)),  # a 3-px-high strip
    ],
    ids=["tall-photo", "braid", "strip"],
)
def test_thin_regions_and_photos_fit_the_position_embeddings(pipe, shape, rows, cols):
    """The tiny model has positions for 96 tokens (1536 px) a side: before, each of these ended in
    diffusers' 'cannot be greater than pos_embed_max_size' after the model had loaded."""
    from hairdiff_core.pipeline import max_work_side

    photo = torch.rand(1, 3, *shape)
    matte = torch.zeros(1, 1, *shape)
    matte[..., rows, cols] = 1
    out = pipe.generate(photo, photo, matte, steps=1)
    side = max_work_side(pipe.transformer)
    assert side == 1536 and max(out.work_size) <= side
    assert torch.equal(out.image[out.mask.expand_as(photo) == 0], photo[out.mask.expand_as(photo) == 0])


def test_every_box_shape_plans_within_each_familys_limit():
    """The class: any matte on any photo gives a working size (padding included) within the
    transformer's positions, for the limits of every shipped config."""
    import json

    from hairdiff_core.models import configs, toy
    from hairdiff_core.models.tiny import TINY_TRANSFORMER_CONFIG
    from hairdiff_core.pipeline import plan_crop, widen_box

    folder = Path(configs.__file__).parent
    families = [json.loads(p.read_text()) for p in sorted(folder.glob("*-transformer.json"))]
    families += [TINY_TRANSFORMER_CONFIG, toy.TOY_TRANSFORMER_CONFIG]
    gen = torch.Generator().manual_seed(0)
    for cfg in families:
        side = cfg["pos_embed_max_size"] * cfg["patch_size"] * 8
        work = cfg["sample_size"] * 8
        for H, W in ((2048, 2048), (100, 2000), (3, 50000), (6000, 90), (work, work), (17, 17)):
            binary = torch.zeros(1, 1, H, W)
            t = int(torch.randint(0, H, (1,), generator=gen))
            l = int(torch.randint(0, W, (1,), generator=gen))
            binary[..., t : t + max(1, H // 2), l : l + 11] = 1  # thin and tall, or a dot
            for ws in (work, 4096):
                plan = plan_crop(binary, ws, 10.0, 0.25, side)
                assert plan.height + plan.pad_h <= side and plan.width + plan.pad_w <= side, (cfg, H, W, ws, plan)
                assert plan.box.top >= 0 and plan.box.top + plan.box.height <= H
                assert plan.box.left >= 0 and plan.box.left + plan.box.width <= W
    # widening stays inside the photo and keeps the box
    from hairdiff_core.pipeline import CropBox

    assert widen_box(CropBox(0, 0, 1000, 10), 1000, 40, 9.0) == CropBox(0, 0, 1000, 40)
    assert widen_box(CropBox(0, 95, 900, 5), 1000, 100, 9.0) == CropBox(0, 0, 900, 100)
