"""--resume latest verifies checkpoints and falls back to the newest intact one, naming the ones
it skipped; with none intact it fails with one line. Damage: truncation, a deleted file, a
garbage header, an empty file."""

from __future__ import annotations

import logging

import pytest
import torch

from training import checkpoint as ckpt


def _write(folder, step: int):
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    opt.step()
    tmp = ckpt.begin(folder, step)
    ckpt.write_process_part(tmp, 0, torch.Generator().manual_seed(step))
    ckpt.write_main_part(tmp, {"w": p.detach()}, opt.state_dict(), {"version": 1, "step": step, "num_processes": 1})
    return ckpt.commit(tmp, step, keep=10)


def test_checkpoint_files_follow_the_umask(tmp_path):
    import os

    mask = os.umask(0)
    os.umask(mask)
    path = _write(tmp_path / "checkpoints", 1)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, modes


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_header(path):
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff\xfe{{not"
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated trainable": ("trainable.safetensors", _truncate, r"trainable.safetensors: .*truncated"),
    "truncated optimizer": ("optimizer.safetensors", _truncate, r"optimizer.safetensors: .*truncated"),
    "deleted rng": ("rng-rank0.safetensors", lambda p: p.unlink(), r"rng-rank0.safetensors is missing"),
    "garbage header": ("trainable.safetensors", _garbage_header, r"trainable.safetensors: .*garbage|not valid JSON"),
    "empty optimizer json": ("optimizer.json", lambda p: p.write_text(""), r"optimizer.json: unreadable"),
    "deleted state": ("state.json", lambda p: p.unlink(), r"state.json is missing"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_latest_skips_a_damaged_newest_checkpoint(tmp_path, caplog, kind):
    folder = tmp_path / "checkpoints"
    good = _write(folder, 2)
    newest = _write(folder, 4)
    name, damage, pattern = DAMAGE[kind]
    damage(newest / name)
    assert ckpt.verify_checkpoint(good) is None
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume("latest", folder) == good
    assert "skipping damaged checkpoint" in caplog.text and newest.name in caplog.text
    import re

    assert re.search(pattern, caplog.text), caplog.text
    with pytest.raises(ckpt.CheckpointError, match="cannot resume from|not a complete"):
        ckpt.resolve_resume(str(newest), folder)  # named explicitly: refused, not silently replaced


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        _truncate(_write(folder, step) / "trainable.safetensors")
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.resolve_resume("latest", folder)
    msg = str(info.value)
    assert "\n" not in msg and "no intact checkpoint" in msg
    assert "checkpoint-00000001" in msg and "checkpoint-00000002" in msg
    assert ckpt.resolve_resume("latest", tmp_path / "none") is None  # nothing yet: a fresh start


def test_read_turns_a_damaged_file_into_a_checkpoint_error(tmp_path):
    path = _write(tmp_path / "checkpoints", 1)
    _garbage_header(path / "optimizer.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.read(path)
