"""The native ComfyUI route against the core's diffusers route: per-step time and peak memory.

Target (issue 22): native <= 1.02x the time per step and <= 1.0x the peak memory of the route it
replaced, same model, same edit, one run. The HAIRDIFF_MODEL nodes ran the core pipeline on a
diffusers transformer inside ComfyUI; they are gone, so the baseline is that pipeline itself (the
CLI's route). Both start from the same random mid-size SD3-shaped transformer
(``_common.MID_CONFIG``) and one HairDiff adapter saved from it:

- core: ``HairDiffPipeline.generate`` on the diffusers transformer with the adapter loaded;
- native: ComfyUI's own SD3 model (``comfy.model_base.SD3``, its MMDiT) -> HairDiff Apply Adapter
  -> HairDiff Sketch Conditioning -> HairDiff Sample -> VAE Decode -> HairDiff Stitch.

Per-step time is (t(steps_hi) - t(steps_lo)) / (steps_hi - steps_lo): encoding, decoding and
set-up cancel out. Interleaved repeats, median of each round's ratio. Peak memory: each route in
a fresh process (peak RSS on the CPU, peak CUDA allocation on a GPU) for one steps_lo run. Needs
a real ComfyUI; prints one JSON line last.

    COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python bench/bench_native.py [--size 384]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MID_CONFIG,
    boot_comfyui,
    build_mid_transformer,
    peak_rss_bytes,
    reset_peak_rss,
    synthetic_edit,
    threads_note,
)


def _boot(work: Path) -> None:
    boot_comfyui(work, "native")


def _routes(work: Path, size: int, only: str | None = None):
    """Both routes' generate(steps) callables (or ``only`` one), from one transformer and one adapter file."""
    import comfy.model_management as mm
    import torch
    from hairdiff.hairdiff_core.method.surgery import widen_input_channels
    from hairdiff.hairdiff_core.models import tiny
    from hairdiff.hairdiff_core.models.adapter import load_adapter, save_adapter
    from hairdiff.nodes import native_nodes as N
    from hairdiff.nodes.builtin_models import comfy_model, comfy_vae

    adapter = work / "bench_mid_adapter.safetensors"
    if not adapter.exists():
        t = widen_input_channels(build_mid_transformer())
        with torch.no_grad():
            t.pos_embed.proj.weight[:, 16:].normal_(0, 0.02)
        save_adapter(t, adapter)
    vae = tiny.build_tiny_vae().eval().requires_grad_(False)
    photo, sketch, matte = synthetic_edit(size, comfy_layout=True, seed=0)
    device = mm.get_torch_device()

    routes = {}
    pipe = None
    if only != "native":
        from hairdiff.hairdiff_core.pipeline import HairDiffPipeline

        core_t = build_mid_transformer().requires_grad_(False)
        load_adapter(core_t, adapter)
        pipe = HairDiffPipeline(core_t, vae, device=device)

    def core(steps: int):
        result = pipe.generate(
            photo.movedim(-1, 1), sketch.movedim(-1, 1), matte[:, None], steps=steps, seed=1, feather_sigma=10.0
        )
        return result.image.movedim(1, -1)

    if only != "native":
        routes["core"] = core
    if only == "core":
        return routes, device
    base = comfy_model(build_mid_transformer(), float(vae.config.scaling_factor), float(vae.config.shift_factor), 3.0)
    native_model = N.HairDiffApplyAdapter.execute(base, f"loras/{adapter.name}", 1.0).result[0]
    cvae = comfy_vae(vae)
    text = [[torch.zeros(1, 77, 256), {"pooled_output": torch.zeros(1, 128)}]]
    work_size = int(MID_CONFIG["sample_size"]) * 8

    def native(steps: int):
        pos, neg, lat, st = N.HairDiffSketchConditioning.execute(
            text, text, cvae, photo, sketch, matte, work_size, 10.0
        ).result
        sampled = N.HairDiffSample.execute(native_model, pos, neg, lat, 1, steps, 1.0, 1.0).result[0]
        return N.HairDiffStitch.execute(st, cvae.decode(sampled["samples"]), True).result[0]

    routes["native"] = native
    return routes, device


def _peak_child(route: str, work: Path, size: int, steps: int) -> None:
    import torch

    _boot(work)
    with torch.inference_mode():
        routes, device = _routes(work, size, only=route)
        fn = routes[route]
        fn(1)  # weights in place, first-call allocations done
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            before = _rss_bytes()
        fn(steps)
        peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    # Working memory: the run's peak above what was resident when it started (weights, and on the
    # CPU whatever the allocator kept from building the model, which is not the run's).
    print(
        json.dumps(
            {
                "route": route,
                "peak_bytes": int(peak),
                "work_bytes": int(peak - before),
                "kind": "cuda" if cuda else "rss",
            }
        )
    )


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384, help="photo side in px")
    parser.add_argument("--steps-lo", type=int, default=2)
    parser.add_argument("--steps-hi", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("ROUTE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _peak_child(args.child[0], Path(args.child[1]), args.size, args.steps_lo)
        return

    import torch

    work = Path(tempfile.mkdtemp(prefix="bench_native_"))
    _boot(work)
    with torch.inference_mode():
        routes, device = _routes(work, args.size)
        a, b = routes["core"](args.steps_hi), routes["native"](args.steps_hi)  # warm-up; they agree
        max_diff = float((a - b).abs().max())
        per_step = {name: [] for name in routes}
        for i in range(args.repeats):
            order = list(routes.items()) if i % 2 == 0 else list(routes.items())[::-1]
            for name, fn in order:
                t = []
                for steps in (args.steps_lo, args.steps_hi):
                    t0 = time.perf_counter()
                    fn(steps)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t.append(time.perf_counter() - t0)
                per_step[name].append((t[1] - t[0]) / (args.steps_hi - args.steps_lo))
    ratio = statistics.median(n / o for n, o in zip(per_step["native"], per_step["core"]))
    peaks = {}
    for route in routes:
        cmd = [sys.executable, __file__, "--size", str(args.size), "--steps-lo", str(args.steps_lo)]
        out = subprocess.run([*cmd, "--child", route, str(work)], capture_output=True, text=True, check=True)
        peaks[route] = json.loads(out.stdout.strip().splitlines()[-1])
    mem_ratio = peaks["native"]["peak_bytes"] / peaks["core"]["peak_bytes"]
    work_ratio = peaks["native"]["work_bytes"] / max(1, peaks["core"]["work_bytes"])
    print(
        json.dumps(
            {
                "bench": "native",
                "device": str(device),
                "model": "mid (bench/_common.MID_CONFIG)",
                "size": args.size,
                "steps": [args.steps_lo, args.steps_hi],
                "repeats": args.repeats,
                "core_step_s": round(statistics.median(per_step["core"]), 4),
                "native_step_s": round(statistics.median(per_step["native"]), 4),
                "native_over_core_time": round(ratio, 4),
                "memory_kind": peaks["native"]["kind"],
                "core_peak_mb": round(peaks["core"]["peak_bytes"] / 2**20, 1),
                "native_peak_mb": round(peaks["native"]["peak_bytes"] / 2**20, 1),
                "native_over_core_memory": round(mem_ratio, 4),
                "core_work_mb": round(peaks["core"]["work_bytes"] / 2**20, 1),
                "native_work_mb": round(peaks["native"]["work_bytes"] / 2**20, 1),
                "native_over_core_work_memory": round(work_ratio, 4),
                "image_max_diff": round(max_diff, 6),
                "targets": {"time": 1.02, "memory": 1.0},
                **threads_note(),
            }
        )
    )


if __name__ == "__main__":
    main()
