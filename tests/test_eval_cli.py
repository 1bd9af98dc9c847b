"""``hairdiff eval`` and ``evaluation.evaluate_samples`` on a tiny synthetic dataset (tiny model, 2 steps)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image

import hairdiff_cli
from hairdiff_core.errors import InputError
from hairdiff_core.evaluation.evaluate import EvalOptions, EvalSetting, evaluate_samples, make_settings

SIZE = 64


def write_dataset(root, n: int = 2, size: int = SIZE) -> list[str]:
    """Photos with a striped 'hair' blob, its matte and dark strokes on white; png and jpg mixed."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    stems = []
    for i in range(n):
        stem = f"s{i}"
        base = rng.uniform(0.3, 0.7, 3)
        photo = np.broadcast_to(base, (size, size, 3)).copy()
        inside = ((yy - size * 0.4) / (size * 0.25)) ** 2 + ((xx - size * 0.5) / (size * 0.3)) ** 2 <= 1
        stripes = 0.5 + 0.5 * np.sin(xx / 3.0 + i)
        photo[inside] = (rng.uniform(0.1, 0.4, 3) * (0.6 + 0.4 * stripes[..., None]))[inside]
        sketch = np.ones((size, size, 3))
        sketch[inside & (np.abs(np.sin(xx / 3.0 + i)) < 0.2)] = 0.0
        for kind, arr, ext in (
            ("img", photo, ".jpg" if i % 2 else ".png"),
            ("matte", inside[..., None] * np.ones(3), ".png"),
            ("sketch", sketch, ".png"),
        ):
            (root / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(root / kind / f"{stem}{ext}")
        stems.append(stem)
    return stems


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_eval_cli_writes_csv_summary_and_contact_sheets(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    stems = write_dataset(data)
    rc = hairdiff_cli.main(
        [
            "eval",
            "--data",
            str(data),
            "--tiny",
            "--steps",
            "2",
            "--out",
            str(out),
            "--method",
            "joint",
            "replace",
            "--harmony",
            "warm",
            "--leakage",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    columns, rows = read_csv(out / "metrics.csv")
    for col in (
        "sample",
        "setting",
        "method",
        "reference",
        "seed",
        "steps",
        "psnr_out",
        "mae_out",
        "seam",
        "seam_source",
        "sketch_chamfer",
        "stroke_color_de",
        "consistency_de",
        "consistency_dl",
        "harmony_warm",
        "old_hair_de",
        "leak_color",
        "leak_edges",
        "gen_seconds",
        "eval_seconds",
    ):
        assert col in columns, col
    assert sorted((r["sample"], r["setting"]) for r in rows) == sorted(
        (s, m) for s in stems for m in ("joint", "replace")
    )
    for r in rows:
        # Measured on every result; PSNR may be inf (untouched), never NaN here.
        for col in ("psnr_out", "mae_out", "seam", "sketch_chamfer", "consistency_de", "harmony_warm", "leak_color"):
            assert not math.isnan(float(r[col])), (col, r)
        assert float(r["psnr_out"]) > 20.0  # pixels away from the matte are pasted back untouched
        assert r["steps"] == "2"

    summary = (out / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("|")]
    assert table[0].startswith("| metric | joint (n=2) | replace (n=2) |")
    seam_row = next(line for line in table if line.startswith("| seam |"))
    assert seam_row.count("±") == 2
    assert "metrics.csv" not in capsys.readouterr().err  # printed table went to stdout

    for stem in stems:
        sheet = Image.open(out / "sheets" / f"{stem}.png")
        # photo | sketch | matte | joint | replace, each SIZE/SIZE * 256 px wide at height 256.
        assert sheet.width > 5 * 256 and sheet.height > 256
        for setting in ("joint", "replace"):
            assert Image.open(out / "results" / setting / f"{stem}.png").size == (SIZE, SIZE)
    overview = Image.open(out / "contact_sheet.png")
    assert overview.height == 2 * sheet.height


def test_eval_cli_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    rc = hairdiff_cli.main(["eval", "--data", str(tmp_path / "nope"), "--tiny", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "nope" in err and "img/" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_eval_cli_bad_reference_weight_fails_before_loading(tmp_path, capsys):
    write_dataset(tmp_path / "data", n=1)
    rc = hairdiff_cli.main(
        [
            "eval",
            "--data",
            str(tmp_path / "data"),
            "--tiny",
            "--out",
            str(tmp_path / "out"),
            "--reference",
            "once",
            "--ref-weight-inside",
            "-1",
        ]
    )
    assert rc == 2
    assert "weight_inside" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_cli_dataset_without_subfolders(tmp_path, capsys):
    (tmp_path / "data" / "img").mkdir(parents=True)
    rc = hairdiff_cli.main(["eval", "--data", str(tmp_path / "data"), "--tiny", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "matte" in capsys.readouterr().err


def test_settings_grid():
    grid = make_settings(["joint", "replace"], ["off", "once", "per_step"])
    assert [s.label for s in grid] == ["joint", "joint-ref_once", "joint-ref_per_step", "replace"]
    with pytest.raises(InputError, match="reference"):
        EvalSetting("replace", "once")
    with pytest.raises(InputError, match="harmony"):
        EvalOptions(harmony=("sepia",))
    grid = make_settings(["joint", "replace"], ["off", "per_step"], ["clean", "matched"])
    assert [s.label for s in grid] == ["joint", "joint-ref_per_step_clean", "joint-ref_per_step_matched", "replace"]
    with pytest.raises(InputError, match="reference noise"):
        EvalSetting("joint", "once", "noisy")


def test_eval_cli_compares_reference_noises(tmp_path, capsys, monkeypatch):
    from hairdiff_core.pipeline import HairDiffPipeline

    seen = []
    original = HairDiffPipeline.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs["settings"].reference.noise)  # evaluation passes one GenerateSettings
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HairDiffPipeline, "generate", spy)
    write_dataset(tmp_path / "data", n=1)
    out = tmp_path / "out"
    rc = hairdiff_cli.main(
        [
            "eval",
            "--data",
            str(tmp_path / "data"),
            "--tiny",
            "--steps",
            "1",
            "--out",
            str(out),
            "--method",
            "joint",
            "--reference",
            "per_step",
            "--ref-noise",
            "clean",
            "matched",
            "--no-images",
            "--no-sheets",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert seen == ["clean", "matched"]
    _, rows = read_csv(out / "metrics.csv")
    assert [(r["setting"], r["reference_noise"]) for r in rows] == [
        ("joint-ref_per_step_clean", "clean"),
        ("joint-ref_per_step_matched", "matched"),
    ]


def test_evaluate_samples_api_for_training(tmp_path, tiny_transformer, tiny_vae):
    from hairdiff_core.data.datasets import scan_dataset
    from hairdiff_core.pipeline import HairDiffPipeline

    write_dataset(tmp_path / "data", n=1)
    pipe = HairDiffPipeline(tiny_transformer, tiny_vae)
    pipe.transformer.train()  # as in a training loop
    samples = scan_dataset(tmp_path / "data").samples
    settings = [EvalSetting("joint"), EvalSetting("joint", "once")]
    report = evaluate_samples(pipe, samples, settings, EvalOptions(steps=2, resolution=32))
    assert pipe.transformer.training  # mode restored for the next training step
    means = report.means(prefix="val/")
    assert "val/joint/seam" in means and "val/joint-ref_once/sketch_chamfer" in means
    assert all(math.isfinite(v) for v in means.values())
    # Dict samples (already in memory) give the same numbers as the files, at the same size.
    from hairdiff_core.data.datasets import load_sample

    loaded = load_sample(samples[0], 32)
    again = evaluate_samples(pipe, [dict(loaded, stem="s0")], settings[:1], EvalOptions(steps=2))
    first = next(r for r in report.rows if r["setting"] == "joint")
    assert again.rows[0]["seam"] == pytest.approx(first["seam"])
    assert again.rows[0]["sketch_chamfer"] == pytest.approx(first["sketch_chamfer"])


def test_shards_cover_the_dataset_once_and_merge_in_order():
    from hairdiff_core.evaluation.evaluate import merge_reports, shard_samples

    stems = [f"s{i}" for i in range(7)]
    shards = [shard_samples(stems, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == stems and [len(s) for s in shards] == [3, 2, 2]
    settings = make_settings(["joint", "replace"])
    parts = [
        [{"sample": s, "setting": st.label, "psnr_out": 1.0} for s in shard for st in reversed(settings)]
        for shard in shards
    ]
    report = merge_reports(settings, parts, stems)
    assert [(r["sample"], r["setting"]) for r in report.rows] == [(s, st.label) for s in stems for st in settings]
    with pytest.raises(InputError, match="rank 3 is not in a world of 3"):
        shard_samples(stems, 3, 3)
