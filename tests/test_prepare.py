"""``hairdiff prepare``: photos + mattes -> a training set the loader, ``train`` and ``eval`` read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import hairdiff_cli
from hairdiff_core.data.datasets import load_sample, scan_dataset
from training.synthetic import make_sample_arrays

SIZE = 48


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny images and models: thread start-up dominates on a busy 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_inputs(root, n: int = 3, size: int = SIZE, seed: int = 0) -> tuple:
    """Photos and mattes as users have them: photos png or jpg, mattes L, RGB or RGBA-alpha."""
    images, mattes = root / "photos", root / "mattes"
    images.mkdir(parents=True)
    mattes.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for i in range(n):
        stem = f"p{i}"
        photo, matte = make_sample_arrays(size, rng)[:2]
        Image.fromarray(photo).save(images / (f"{stem}.jpg" if i % 2 else f"{stem}.png"), quality=95)
        if i % 3 == 0:
            Image.fromarray(matte, mode="L").save(mattes / f"{stem}.png")
        elif i % 3 == 1:
            Image.fromarray(np.repeat(matte[..., None], 3, axis=2)).save(mattes / f"{stem}.png")
        else:  # hair = opaque, the rest transparent
            rgba = np.zeros((size, size, 4), np.uint8)
            rgba[..., 3] = matte
            Image.fromarray(rgba, mode="RGBA").save(mattes / f"{stem}.png")
        arrays[stem] = (photo, matte)
    return images, mattes, arrays


def prepare(images, mattes, out, *extra) -> int:
    return hairdiff_cli.main(["prepare", "--images", str(images), "--mattes", str(mattes), "--out", str(out), *extra])


def test_layout_variants_braids_and_loader(tmp_path, capsys):
    images, mattes, arrays = write_inputs(tmp_path)
    out = tmp_path / "ds"
    assert prepare(images, mattes, out, "--variants", "2", "--braid-pattern", "p1*", "--colour") == 0, (
        capsys.readouterr().err
    )
    stems = [f"p{i}_v{k}" for i in range(3) for k in range(2)]
    for kind in ("img", "matte", "sketch"):
        assert sorted(p.stem for p in (out / kind).iterdir()) == stems
    assert (out / "braid.txt").read_text().split() == ["p1_v0", "p1_v1"]
    scan = scan_dataset(out)  # the training/eval loader's own check: no problem
    assert [s.stem for s in scan.samples] == stems and sum(s.is_braid for s in scan.samples) == 2
    record = json.loads((out / "prepare.json").read_text())
    assert record["settings"]["sketch"] == "strands" and record["settings"]["colour"] is True
    assert record["totals"]["samples"] == 6 and record["skipped"] == []
    by_stem = {s["stem"]: s for s in record["samples"]}
    for stem, (photo, matte) in arrays.items():
        entry = by_stem[stem]
        assert entry["size"] == [SIZE, SIZE]
        assert entry["matte_fraction"] == pytest.approx((matte > 127).mean(), abs=1e-4)
        v0, v1 = entry["variants"]
        assert v0["density"] == 1.0 and v0["seed"] != v1["seed"]
        a, b = (load_sample(next(s for s in scan.samples if s.stem == v["stem"])) for v in (v0, v1))
        # Whatever the matte's format, the written matte is the user's hair region.
        assert torch.equal(a["matte"][0], torch.from_numpy(matte > 127).float())
        assert torch.equal(a["image"], b["image"]) and not torch.equal(a["sketch"], b["sketch"])
        for sample in (a, b):
            stroke = sample["sketch"].amax(0) > 0
            assert int(stroke.sum()) > 10
            assert bool((sample["matte"][0][stroke] > 0.5).all())  # strokes inside the matte
        if stem.endswith("0"):  # png in: the photo is kept bit for bit
            assert torch.equal((a["image"] * 255).round().byte(), torch.from_numpy(photo).permute(2, 0, 1))


def test_deterministic_and_seeded(tmp_path):
    images, mattes, _ = write_inputs(tmp_path, n=2)
    outs = [tmp_path / name for name in ("a", "b", "c")]
    for out, seed in zip(outs, ("3", "3", "4")):
        assert prepare(images, mattes, out, "--seed", seed) == 0
    for stem in ("p0", "p1"):
        a, b, c = ((out / "sketch" / f"{stem}.png").read_bytes() for out in outs)
        assert a == b and a != c
        assert (outs[0] / "img" / f"{stem}.png").read_bytes() == (outs[1] / "img" / f"{stem}.png").read_bytes()
    ja, jb = (json.loads((out / "prepare.json").read_text()) for out in outs[:2])
    assert ja["samples"] == jb["samples"]


def test_bad_samples_are_named_and_nothing_is_written(tmp_path, capsys):
    images, mattes, _ = write_inputs(tmp_path, n=2)
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    Image.new("L", (SIZE, SIZE)).save(mattes / "broken.png")
    Image.new("RGB", (SIZE, SIZE)).save(images / "wrongsize.png")
    Image.new("L", (SIZE + 8, SIZE)).save(mattes / "wrongsize.png")
    Image.new("RGB", (SIZE, SIZE)).save(images / "nohair.png")
    Image.new("L", (SIZE, SIZE), 0).save(mattes / "nohair.png")
    Image.new("RGB", (SIZE, SIZE)).save(images / "lonely.png")
    Image.new("L", (SIZE, SIZE), 255).save(mattes / "orphan.png")
    (images / "notes.txt").write_text("not an image: ignored")
    out = tmp_path / "ds"
    assert prepare(images, mattes, out) == 2
    err = capsys.readouterr().err
    for expected in (
        "broken: unreadable photos file broken.jpg",
        "wrongsize: sizes differ: photo 48x48, matte 56x48",
        "nohair: empty matte",
        "lonely: photo lonely.png has no matte",
        "orphan: matte orphan.png has no photo",
        "--skip-bad",
    ):
        assert expected in err, (expected, err)
    assert "notes" not in err
    assert not out.exists()  # checked before anything is written

    assert prepare(images, mattes, out, "--skip-bad") == 0
    assert sorted(p.stem for p in (out / "img").iterdir()) == ["p0", "p1"]
    record = json.loads((out / "prepare.json").read_text())
    assert sorted(s["stem"] for s in record["skipped"]) == ["broken", "lonely", "nohair", "orphan", "wrongsize"]


def test_exif_rotated_photo_is_written_upright(tmp_path, capsys):
    images, mattes = tmp_path / "photos", tmp_path / "mattes"
    images.mkdir()
    mattes.mkdir()
    h, w = 40, 24  # a portrait
    upright = np.zeros((h, w, 3), np.uint8)
    upright[: h // 2] = (200, 40, 40)  # red top half: the hair
    upright[h // 2 :] = (40, 40, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(images / "phone.jpg", quality=95, exif=exif)
    matte = np.zeros((h, w), np.uint8)
    matte[: h // 2] = 255
    Image.fromarray(matte, mode="L").save(mattes / "phone.png")
    out = tmp_path / "ds"
    assert prepare(images, mattes, out) == 0, capsys.readouterr().err
    written = np.asarray(Image.open(out / "img" / "phone.png")).astype(np.float32)
    assert written.shape == (h, w, 3)
    assert np.abs(written - upright).mean() < 8
    assert json.loads((out / "prepare.json").read_text())["samples"][0]["exif_rotated"] is True

    # A matte made from the sideways pixels: the message says what happened.
    Image.fromarray(np.ascontiguousarray(np.rot90(matte, 1)), mode="L").save(mattes / "phone.png")
    assert prepare(images, mattes, tmp_path / "ds2") == 2
    err = capsys.readouterr().err
    assert "photo 24x40 (upright, EXIF-rotated), matte 40x24" in err and "before its EXIF rotation" in err


def test_max_side_braid_file_and_overwrite(tmp_path, capsys):
    images, mattes, _ = write_inputs(tmp_path, n=2, size=64)
    braids = tmp_path / "braids.txt"
    braids.write_text("p0.png\n# comment\n")
    out = tmp_path / "ds"
    assert prepare(images, mattes, out, "--max-side", "32", "--braids", str(braids), "--variants", "2") == 0
    assert Image.open(out / "img" / "p0_v1.png").size == (32, 32)
    assert Image.open(out / "matte" / "p0_v1.png").size == (32, 32)
    assert (out / "braid.txt").read_text().split() == ["p0_v0", "p0_v1"]
    # An existing dataset is not mixed into.
    assert prepare(images, mattes, out, "--sketch", "edges") == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert prepare(images, mattes, out, "--sketch", "edges", "--overwrite") == 0
    assert sorted(p.name for p in (out / "sketch").iterdir()) == ["p0.png", "p1.png"]  # no stale variants
    assert not (out / "braid.txt").exists()
    braids.write_text("p0\nnobody\n")
    assert prepare(images, mattes, tmp_path / "ds3", "--braids", str(braids)) == 2
    assert "nobody: listed in" in capsys.readouterr().err


def test_help_is_cheap_and_names_the_library_defaults():
    import subprocess
    import sys
    from pathlib import Path

    from hairdiff_core.data.prepare import PrepareOptions

    repo = Path(__file__).resolve().parent.parent
    code = "import sys, hairdiff_cli; hairdiff_cli.build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"  # `hairdiff --help` does not import torch
    parser = hairdiff_cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["prepare"]
    assert f"default {PrepareOptions().max_side};" in " ".join(sub.format_help().split())


def test_prepared_dataset_trains_and_evaluates(tmp_path, capsys):
    images, mattes, _ = write_inputs(tmp_path, n=2, size=32)
    data = tmp_path / "ds"
    assert prepare(images, mattes, data, "--braid-pattern", "p0") == 0
    rc = hairdiff_cli.main(
        [
            "train",
            "--data",
            str(data),
            "--output",
            str(tmp_path / "run"),
            "--tiny",
            "--resolution",
            "32",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--mixed-precision",
            "no",
            "--num-workers",
            "0",
            "--validate-every",
            "0",
            "--warmup-steps",
            "0",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "hairdiff_adapter.safetensors").is_file()
    rc = hairdiff_cli.main(
        [
            "eval",
            "--data",
            str(data),
            "--tiny",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "eval"),
            "--method",
            "joint",
            "--no-sheets",
            "--no-images",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "eval" / "metrics.csv").read_text().count("\n") == 3  # header + 2 samples


def test_seeding_ridges_is_recorded_and_puts_strokes_on_brighter_hair(tmp_path, capsys):
    images, mattes, arrays = write_inputs(tmp_path, n=1, size=96, seed=4)
    brightness = {}
    for seeding in ("grid", "ridges"):
        out = tmp_path / seeding
        assert prepare(images, mattes, out, "--seeding", seeding) == 0, capsys.readouterr().err
        assert json.loads((out / "prepare.json").read_text())["settings"]["seeding"] == seeding
        strokes = np.asarray(Image.open(out / "sketch" / "p0.png").convert("L")) > 127
        photo = np.asarray(Image.open(out / "img" / "p0.png").convert("L")).astype(np.float32)
        assert strokes.sum() > 0
        brightness[seeding] = float(photo[strokes].mean())
    assert brightness["ridges"] > brightness["grid"]
    with pytest.raises(SystemExit):
        prepare(images, mattes, tmp_path / "bad", "--seeding", "random")
    from hairdiff_core.data.prepare import PrepareOptions
    from hairdiff_core.errors import InputError

    with pytest.raises(InputError, match="unknown --seeding 'random'; choose one of grid, ridges"):
        PrepareOptions(seeding="random").validate()
    assert not (tmp_path / "bad").exists()
