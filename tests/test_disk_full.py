"""A full disk (ENOSPC injected into the writers) is one line and exit 2 in generate, prepare and
train; nothing half-written stays, and training resumes from its last good checkpoint."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

import hairdiff_cli

ASSETS = Path(__file__).resolve().parent.parent / "hairdiff_core" / "assets"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _full(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _run(argv, capsys):
    rc = hairdiff_cli.main(argv)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip() and not x.startswith("INFO")]
    lines = [x for x in lines if not x.startswith(("WARNING", "hairdiff:", "\r"))]
    return rc, lines


def _one_error_line(rc, lines, pattern):
    import re

    errors = [x for x in lines if "error:" in x]
    assert rc == 2, lines
    assert len(errors) == 1 and not any("Traceback" in x for x in lines), lines
    assert re.search(pattern, errors[0]), errors[0]


def _no_temps(folder: Path):
    left = [p for p in folder.rglob("*") if p.name.startswith((".tmp-checkpoint-", ".")) and p.name != "."]
    assert not [p for p in left if ".tmp" in p.name or p.name.endswith(".tmp")], left


def test_generate_on_a_full_disk(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "r.png").write_bytes(b"the earlier result")
    argv = ["generate", "--tiny", "--steps", "1", "--out", str(out / "r.png")]
    for k in ("image", "sketch", "matte"):
        argv += [f"--{k}", str(ASSETS / f"sample_{'photo' if k == 'image' else k}.png")]
    import PIL.Image

    monkeypatch.setattr(PIL.Image.Image, "save", _full)  # the image writer hits ENOSPC mid-file
    rc, lines = _run(argv, capsys)
    _one_error_line(rc, lines, r"no space left on the disk holding .*r\.png .*MB free.*earlier one is kept.*free some")
    assert [p.name for p in out.iterdir()] == ["r.png"] and (out / "r.png").read_bytes() == b"the earlier result"


def test_prepare_on_a_full_disk_says_how_far_it_got(tmp_path, capsys, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_prepare_tests", Path(__file__).with_name("test_prepare.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    images, mattes = helpers.write_inputs(tmp_path, n=3)[:2]
    from hairdiff_core import fileio

    calls = {"n": 0}
    real = fileio.apply_umask

    def fills_up(path):  # every write passes here once, before its rename
        calls["n"] += 1
        if calls["n"] > 4:  # photo 1's three files, then one file of photo 2
            _full()
        real(path)

    monkeypatch.setattr(fileio, "apply_umask", fills_up)
    out = tmp_path / "ds"
    rc, lines = _run(["prepare", "--images", str(images), "--mattes", str(mattes), "--out", str(out)], capsys)
    _one_error_line(rc, lines, r"no space left .*1 of 3 photo\(s\) \(1 sample\(s\)\) are complete .*--overwrite")
    for kind in ("img", "matte", "sketch"):
        assert sorted(p.name for p in (out / kind).iterdir()) == ["p0.png"]  # photo 2's half is gone
    _no_temps(out)

    calls["n"] = -(10**9)  # the disk is free again
    rc, lines = _run(
        ["prepare", "--images", str(images), "--mattes", str(mattes), "--out", str(out), "--overwrite"], capsys
    )
    assert rc == 0, lines
    assert len(list((out / "img").iterdir())) == 3

    # Full before anything was complete: no empty tree is left behind.
    calls["n"] = 10**9
    empty = tmp_path / "never"
    rc, lines = _run(["prepare", "--images", str(images), "--mattes", str(mattes), "--out", str(empty)], capsys)
    _one_error_line(rc, lines, r"no sample was complete")
    assert not empty.exists()


def test_train_on_a_full_disk_keeps_the_last_checkpoint_and_resumes(tmp_path, capsys, monkeypatch):
    from training import checkpoint as ckpt
    from training.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", n=4, size=32, braid=0)
    out = tmp_path / "run"
    argv = ["train", "--tiny", "--data", str(data), "--output", str(out), "--resolution", "32", "--max-steps", "6"]
    argv += ["--batch-size", "2", "--checkpoint-every", "2", "--mixed-precision", "no", "--num-workers", "0"]
    real = ckpt._save_tensors

    def fills_up(tensors, path, metadata=None):
        if "00000004" in str(path):  # the second checkpoint meets a full disk
            raise RuntimeError(
                f"Error while serializing: IoError(Os {{ code: 28, kind: StorageFull, message: "
                f'"No space left on device" }}) writing {path}'
            )  # safetensors' own words
        real(tensors, path, metadata)

    monkeypatch.setattr(ckpt, "_save_tensors", fills_up)
    rc, lines = _run(argv, capsys)
    _one_error_line(rc, lines, r"no space left .*checkpoint-00000002 \(step 2\) is intact.*--resume latest")
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2]
    assert not list((out / "checkpoints").glob(".tmp-checkpoint-*"))
    assert not (out / "hairdiff_adapter.safetensors").exists()

    monkeypatch.setattr(ckpt, "_save_tensors", real)
    rc, lines = _run(argv + ["--resume", "latest"], capsys)
    assert rc == 0, lines
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")][-1] == 6
    assert (out / "hairdiff_adapter.safetensors").exists()
