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
from hairdiff_core.fileio import apply_umask

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
    apply_umask(path)  # save_file creates 0600; the JSON files beside it follow the umask
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


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is damaged (from its size and header alone), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, truncated"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            return f"{size} bytes but its header alone claims {n}: truncated or garbage"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "its header is not valid JSON: garbage"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"tensor {key!r} has no valid data_offsets in the header"
        end = max(end, offsets[1])
    if 8 + n + end != size:
        return f"{size} bytes, its header says {8 + n + end}: truncated or damaged"
    return None


def verify_checkpoint(path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from (a missing file, a truncated
    or garbage safetensors file, unreadable JSON), or None when every file is intact.

    Cheap: reads the JSON files and the safetensors headers, checks each file's size against
    its header, loads no tensor.
    """
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} is unreadable ({exc})"
    if not isinstance(state, dict):
        return f"{STATE_FILE} is not a JSON object"
    ranks = state.get("num_processes", 1)
    ranks = ranks if isinstance(ranks, int) and ranks >= 1 else 1
    names = ["trainable.safetensors", "optimizer.safetensors", "optimizer.json"]
    for r in range(ranks):
        names += [f"rng-rank{r}.safetensors", f"rng-rank{r}.json"]
    for name in names:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        try:
            if name.endswith(".json"):
                json.loads(f.read_text(encoding="utf-8"))
                continue
            problem = _safetensors_problem(f)
        except (OSError, ValueError) as exc:
            problem = f"unreadable ({exc})"
        if problem:
            return f"{name}: {problem}"
    return None


def _checkpoint_folders(folder) -> list[tuple[int, Path]]:
    """Every ``checkpoint-<step>`` folder, complete or not, sorted by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def resolve_resume(resume: str, checkpoints_dir) -> Path | None:
    """The checkpoint to resume from, verified (``verify_checkpoint``).

    ``latest``: the newest intact checkpoint; damaged newer ones are skipped with a warning that
    names each one and why. None when there is no checkpoint at all; ``CheckpointError`` when
    there are some but none is intact. Otherwise ``resume`` is a checkpoint folder, refused with
    ``CheckpointError`` when it is damaged.
    """
    if resume == "latest":
        skipped = []
        for _, path in reversed(_checkpoint_folders(checkpoints_dir)):
            problem = verify_checkpoint(path)
            if problem is None:
                for bad, why in skipped:
                    logger.warning(
                        "--resume latest: skipping damaged checkpoint %s (%s); resuming from %s", bad, why, path.name
                    )
                return path
            skipped.append((path, problem))
        if skipped:
            details = "; ".join(f"{p.name}: {why}" for p, why in skipped)
            raise CheckpointError(
                f"--resume latest: no intact checkpoint in {checkpoints_dir} ({details}); "
                f"start again in a new --output folder, or remove the damaged checkpoints"
            )
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"{path} is not a complete HairDiff checkpoint (no {STATE_FILE}); pass a "
            f"checkpoints/checkpoint-<step> folder or --resume latest"
        )
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"cannot resume from {path}: {problem}; pick an earlier checkpoint or --resume latest")
    return path


def begin(checkpoints_dir: Path, step: int) -> Path:
    """Create the temporary folder a checkpoint is written into."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    # One run owns an output folder (the trainer refuses a second one), so any temporary
    # folder here is a leftover of a killed save of this run's lineage: remove it.
    for stale in list(checkpoints_dir.glob(".tmp-checkpoint-*")) + list(checkpoints_dir.glob(".old-checkpoint-*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = checkpoints_dir / f".tmp-checkpoint-{step:08d}"
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
    from safetensors import SafetensorError

    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        trainable = _load_tensors(path / "trainable.safetensors")
        opt = unflatten_optimizer_state(
            _load_tensors(path / "optimizer.safetensors"),
            json.loads((path / "optimizer.json").read_text(encoding="utf-8")),
        )
        rng_file = path / f"rng-rank{rank}.safetensors"
        rng = (_load_tensors(rng_file), json.loads((path / f"rng-rank{rank}.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    scaler = json.loads((path / "optimizer.json").read_text(encoding="utf-8")).get("scaler")
    return {"state": state, "trainable": trainable, "optimizer": opt, "rng": rng, "scaler": scaler}
