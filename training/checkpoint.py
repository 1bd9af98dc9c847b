"""Atomic training checkpoints that resume exactly, without pickles.

A checkpoint is a folder ``checkpoints/checkpoint-<step>/`` holding

- ``trainable.safetensors``: every trainable parameter, by name, at full precision;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimiser state, its tensors and the rest;
- ``rng-rank<r>.safetensors`` + ``rng-rank<r>.json``: per process, the training generator and
  torch's (CPU and CUDA), numpy's and Python's RNG states;
- ``state.json`` (written last): step, data position, epoch sums, schedule, config fingerprint.

It is written under a temporary name in the same folder and renamed into place, so a kill at
any moment leaves either no new checkpoint or a complete one; older ones are pruned only after.
Nothing here unpickles: tensors are safetensors, everything else JSON.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hairdiff_core.errors import InputError

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.json"


class CheckpointError(InputError):
    """A checkpoint to resume from is missing, incomplete or made by another configuration."""


# -- helpers ---------------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- optimizer state <-> (tensors, json) -----------------------------------------------------
def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict] = {}
    for pid, pstate in state_dict["state"].items():
        entry = {}
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value
                entry[key] = {"__tensor__": f"state.{pid}.{key}"}
            else:
                entry[key] = value
        plain_state[str(pid)] = entry
    return tensors, {"state": plain_state, "param_groups": state_dict["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state = {}
    for pid, entry in plain["state"].items():
        state[int(pid)] = {
            k: tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v for k, v in entry.items()
        }
    groups = []
    for g in plain["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# -- RNG ------------------------------------------------------------------------------------
def capture_rng(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state(legacy=False)
    np_json = {
        "bit_generator": np_state["bit_generator"],
        "key": np_state["state"]["key"].tolist(),
        "pos": int(np_state["state"]["pos"]),
        "has_gauss": int(np_state["has_gauss"]),
        "gauss": float(np_state["gauss"]),
    }
    py = random.getstate()
    return tensors, {"numpy": np_json, "python": [py[0], list(py[1]), py[2]]}


def restore_rng(generator: torch.Generator, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    generator.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = plain["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    p = plain["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# -- folders --------------------------------------------------------------------------------
def list_checkpoints(folder) -> list[tuple[int, Path]]:
    """Complete checkpoints (with ``state.json``) in ``folder``, sorted by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(resume: str, checkpoints_dir) -> Path | None:
    """``latest`` -> the newest complete checkpoint (None when there is none); else a folder."""
    if resume == "latest":
        found = list_checkpoints(checkpoints_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"{path} is not a complete HairDiff checkpoint (no {STATE_FILE}); pass a "
            f"checkpoints/checkpoint-<step> folder or --resume latest"
        )
    return path


def begin(checkpoints_dir: Path, step: int) -> Path:
    """Create the temporary folder a checkpoint is written into."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoints_dir / f".tmp-checkpoint-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_process_part(tmp: Path, rank: int, generator: torch.Generator) -> None:
    tensors, plain = capture_rng(generator)
    _save_tensors(tensors, tmp / f"rng-rank{rank}.safetensors")
    _write_json(tmp / f"rng-rank{rank}.json", plain)


def write_main_part(
    tmp: Path,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    state: dict,
    scaler_state: dict | None = None,
) -> None:
    _save_tensors(trainable, tmp / "trainable.safetensors")
    opt_tensors, opt_plain = flatten_optimizer_state(optimizer_state)
    _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    if scaler_state is not None:
        opt_plain["scaler"] = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in scaler_state.items()}
    _write_json(tmp / "optimizer.json", opt_plain)
    _write_json(tmp / STATE_FILE, state)  # last: its presence marks a complete checkpoint


def commit(tmp: Path, step: int, keep: int) -> Path:
    """Rename the finished temporary folder into place, then prune to the newest ``keep``."""
    final = tmp.parent / f"checkpoint-{step:08d}"
    _fsync_dir(tmp)
    old = None
    if final.exists():  # re-written after a resume: swap, never leaving nothing behind
        old = tmp.parent / f".old-checkpoint-{step:08d}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(tmp.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for _, path in list_checkpoints(tmp.parent)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def read(path: Path, rank: int = 0) -> dict[str, Any]:
    """Everything of a checkpoint for one process."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        trainable = _load_tensors(path / "trainable.safetensors")
        opt = unflatten_optimizer_state(
            _load_tensors(path / "optimizer.safetensors"), json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        )
        rng_file = path / f"rng-rank{rank}.safetensors"
        rng = (_load_tensors(rng_file), json.loads((path / f"rng-rank{rank}.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    scaler = json.loads((path / "optimizer.json").read_text(encoding="utf-8")).get("scaler")
    return {"state": state, "trainable": trainable, "optimizer": opt, "rng": rng, "scaler": scaler}
