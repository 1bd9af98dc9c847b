"""One atomic-write helper: unique temporary names, umask permissions, no half files, stale
temporary files of killed writers cleaned; several processes writing one output path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hairdiff_core.errors import OutputPathError
from hairdiff_core.fileio import atomic_write, atomic_write_text, clean_stale_temps

REPO = Path(__file__).resolve().parent.parent


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = atomic_write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == 0o640


def test_stale_temp_of_a_dead_writer_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".a.safetensors.hd{dead_pid}-xyz.tmp"
    stale.write_bytes(b"half")
    live = tmp_path / f".a.safetensors.hd{os.getppid()}-abc.tmp"  # a running process's
    live.write_bytes(b"busy")
    other = tmp_path / ".b.safetensors.hd1-abc.tmp"  # another target's: not ours to judge
    other.write_bytes(b"x")
    atomic_write_text(tmp_path / "a.safetensors", "new")
    assert not stale.exists() and live.exists() and other.exists()
    assert clean_stale_temps(tmp_path / "a.safetensors") == []


def test_a_folder_target_is_refused(tmp_path):
    with pytest.raises(OutputPathError, match="existing folder"):
        with atomic_write(tmp_path):
            pass


# The writer is what save_image does (PIL into atomic_write), without torch's start-up cost.
WRITER = """
import sys
import numpy as np
from PIL import Image
from hairdiff_core.fileio import atomic_write
seed, path = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(seed)
for _ in range(8):
    with atomic_write(path) as tmp:
        Image.fromarray(rng.integers(0, 256, (240, 240, 3), dtype=np.uint8)).save(tmp, format="PNG")
print("ok")
"""


def test_concurrent_writers_of_one_path_all_succeed_and_the_file_decodes(tmp_path):
    from PIL import Image

    out = tmp_path / "same.png"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(i), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0 and stdout.strip() == "ok", stderr  # no false "file not found"
    with Image.open(out) as im:
        im.load()  # complete, decodable
        assert im.size == (240, 240)
    assert [p.name for p in tmp_path.iterdir()] == ["same.png"]  # no temp file left
