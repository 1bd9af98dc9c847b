"""Shared bits of the benchmarks: a mid-size random SD3-shaped config, a synthetic edit and
peak-RSS measurement.

Peak memory on the CPU is measured per process: Linux's peak resident set (VmHWM) is reset by
writing 5 to /proc/self/clear_refs right before the measured work, so a figure covers that work
only (plus what was resident before it, e.g. the weights, which both sides of a ratio share).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

MID_CONFIG = {
    "sample_size": 64,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 6,
    "attention_head_dim": 64,
    "num_attention_heads": 6,
    "joint_attention_dim": 256,
    "caption_projection_dim": 384,
    "pooled_projection_dim": 128,
    "pos_embed_max_size": 96,
    "qk_norm": "rms_norm",
}


def build_mid_transformer(seed: int = 0, config: dict | None = None):
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**(config or MID_CONFIG)).eval()


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_isolated(script: str, args: list[str]) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter; it prints one JSON line last."""
    out = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def threads_note() -> dict:
    import torch

    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def synthetic_edit(size: int, comfy_layout: bool = False, seed: int = 1):
    """(photo, sketch, matte) of one random photo: an 8-px stroke and a head-top box matte.

    Core layout (1, 3, H, W) / (1, 3, H, W) / (1, 1, H, W), or ComfyUI's IMAGE/MASK layout
    (1, H, W, 3) / (1, H, W, 3) / (1, H, W) with ``comfy_layout``.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    photo = torch.rand(1, 3, size, size, generator=g)
    sketch = torch.zeros(1, 3, size, size)
    sketch[..., size // 4 : size // 4 + max(1, size // 128), size // 4 : 3 * size // 4] = 1
    matte = torch.zeros(1, 1, size, size)
    matte[..., size // 8 : size // 2, size // 8 : 7 * size // 8] = 1
    if comfy_layout:
        return photo.movedim(1, -1), sketch.movedim(1, -1), matte[:, 0]
    return photo, sketch, matte


class Meter:
    """What the GPU checks measure around a call: synchronisation and peak memory on CUDA;
    no-ops (and no figures) on a CPU dry run."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset(self) -> int:
        """Start a peak; returns the bytes already allocated (0 on the CPU)."""
        if not self.cuda:
            return 0
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()
        return self.torch.cuda.memory_allocated()

    def peak_bytes(self) -> int | None:
        return self.torch.cuda.max_memory_allocated() if self.cuda else None

    def peak_gb(self) -> float | None:
        return round(self.torch.cuda.max_memory_allocated() / 2**30, 3) if self.cuda else None

    def reserved_gb(self) -> float | None:
        return round(self.torch.cuda.max_memory_reserved() / 2**30, 3) if self.cuda else None


def boot_comfyui(work, bench: str, loras=None) -> None:
    """Import a real ComfyUI (``COMFYUI_DIR``) with this pack as the package ``hairdiff`` (a link in
    ``work``); without one, print the bench's skipped line and exit 0 (run_all records it)."""
    from pathlib import Path

    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        print(json.dumps({"bench": bench, "skipped": "needs a real ComfyUI: set COMFYUI_DIR, run with its Python"}))
        sys.exit(0)
    packs = Path(work) / "packs"
    packs.mkdir(parents=True, exist_ok=True)
    if not (packs / "hairdiff").exists():
        (packs / "hairdiff").symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    sys.path[:0] = [comfy_dir, str(packs)]
    import comfy.cli_args
    import torch

    comfy.cli_args.args.cpu = not torch.cuda.is_available()  # main.py would parse --cpu
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(loras or work))
