import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import hairdiff_cli
from hairdiff_cli.commands.demo import sample_paths

ROOT = Path(__file__).resolve().parent.parent


def _write(path, arr_mode, size, fill):
    Image.new(arr_mode, size, fill).save(path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    photo = _write(tmp_path / "photo.png", "RGB", (40, 48), (120, 90, 60))
    sketch = _write(tmp_path / "sketch.png", "RGB", (40, 48), (255, 255, 255))
    matte_img = Image.new("L", (40, 48), 0)
    matte_img.paste(255, (10, 10, 30, 30))
    matte_img.save(tmp_path / "matte.png")
    return {"image": photo, "sketch": sketch, "matte": str(tmp_path / "matte.png"), "tmp": tmp_path}


def _argv(files, **over):
    args = {
        "image": files["image"],
        "sketch": files["sketch"],
        "matte": files["matte"],
        "out": str(files["tmp"] / "out.png"),
    }
    args.update(over)
    argv = ["generate", "--tiny", "--steps", "2"]
    for k, v in args.items():
        argv += [f"--{k}", v]
    return argv


def test_generate_writes_output_same_size(files):
    assert hairdiff_cli.main(_argv(files)) == 0
    assert Image.open(files["tmp"] / "out.png").size == (40, 48)


def test_missing_file_named(files, capsys):
    code = hairdiff_cli.main(_argv(files, sketch=str(files["tmp"] / "nope.png")))
    err = capsys.readouterr().err
    assert code == 2 and "nope.png" in err and "Traceback" not in err


def test_empty_matte(files, capsys):
    _write(files["tmp"] / "empty.png", "L", (40, 48), 0)
    code = hairdiff_cli.main(_argv(files, matte=str(files["tmp"] / "empty.png")))
    assert code == 2 and "matte is empty" in capsys.readouterr().err


def test_unreadable_image(files, capsys):
    bad = files["tmp"] / "bad.png"
    bad.write_bytes(b"not an image at all")
    code = hairdiff_cli.main(_argv(files, image=str(bad)))
    assert code == 2 and "cannot read image" in capsys.readouterr().err


def test_sketch_aspect_mismatch(files, capsys):
    _write(files["tmp"] / "wide.png", "RGB", (80, 20), (255, 255, 255))
    code = hairdiff_cli.main(_argv(files, sketch=str(files["tmp"] / "wide.png")))
    assert code == 2 and "aspect" in capsys.readouterr().err


def test_no_model_given(files, capsys):
    argv = [a for a in _argv(files) if a != "--tiny"]
    assert hairdiff_cli.main(argv) == 2
    assert "--model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "dtype,advice",
    [
        ("fp16", "fp16 overflows on SD3.5: use bf16 or fp32"),
        ("fp32", "the model runs in float32: first try the defaults of settings near their limits (--cfg, --shift"),
    ],
)
def test_nan_during_sampling_advice_fits_the_dtype(files, capsys, monkeypatch, dtype, advice):
    from hairdiff_core.method import sampler

    monkeypatch.setattr(sampler.TransformerDenoiser, "__call__", lambda self, x, s, i: torch.full_like(x, float("nan")))
    assert hairdiff_cli.main(_argv(files, dtype=dtype)) == 2
    err = capsys.readouterr().err
    assert advice in err
    if dtype == "fp32":
        assert "bf16" not in err  # the fp16 hint is wrong advice in fp32


def test_demo_runs_as_a_console_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hairdiff_cli", "demo", "--tiny", "--out", str(tmp_path), "--steps", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "WIRING CHECK" in proc.stderr
    result = Image.open(tmp_path / "result.png")
    assert result.size == Image.open(sample_paths()["photo"]).size
    assert Image.open(tmp_path / "contact_sheet.png").text["Title"].startswith("built-in TINY model")


def test_adapter_for_another_base(files, capsys):
    from diffusers import SD3Transformer2DModel

    from hairdiff_core.method.surgery import widen_input_channels
    from hairdiff_core.models.adapter import save_adapter
    from hairdiff_core.models.tiny import TINY_TRANSFORMER_CONFIG

    other = widen_input_channels(SD3Transformer2DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": 3}))
    path = files["tmp"] / "foreign.safetensors"
    save_adapter(other, path)
    code = hairdiff_cli.main(_argv(files, adapter=str(path)))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "foreign.safetensors" in err and "num_layers" in err


def test_adapter_for_this_base_is_used(files, tiny_transformer):
    from hairdiff_core.method.surgery import widen_input_channels
    from hairdiff_core.models.adapter import save_adapter

    widen_input_channels(tiny_transformer)
    w = tiny_transformer.pos_embed.proj.weight.data
    # A "trained" sketch half. Random, not constant: a constant is the same shift on every
    # feature, which the blocks' LayerNorm removes exactly.
    w[:, 16:] = torch.randn(w[:, 16:].shape, generator=torch.Generator().manual_seed(0)) * 0.3
    save_adapter(tiny_transformer, files["tmp"] / "mine.safetensors")
    sketch = Image.new("RGB", (40, 48), (255, 255, 255))
    sketch.paste((0, 0, 0), (12, 12, 28, 16))
    sketch.save(files["tmp"] / "strokes.png")
    outs = []
    for extra in ([], ["--adapter", str(files["tmp"] / "mine.safetensors")]):
        out = files["tmp"] / f"out{len(outs)}.png"
        assert hairdiff_cli.main(_argv(files, sketch=str(files["tmp"] / "strokes.png"), out=str(out)) + extra) == 0
        outs.append(Image.open(out).tobytes())
    assert outs[0] != outs[1]
