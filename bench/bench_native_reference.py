"""Reference attention on the native ComfyUI route at SD3.5 Large block dimensions.

Targets (issue 23): ``once`` with the key budget <= 1.10x the time of the plain model, ``per_step``
<= 2.05x, memory <= 1.05x, next to the core's figures (``bench/bench_block.py`` measures the
diffusers route's blocks; the attention kernels are the same core function on both routes).

A ComfyUI SD3 model of SD3.5 Large's block dimensions (hidden 2,432, 38 heads of 64, SD3's text
widths; ``--blocks`` joint blocks, random bf16 weights) -> HairDiff Apply Adapter -> [HairDiff
Reference Attention] -> HairDiff Sample at 1024² (4,096 image tokens, 77 zero text tokens), a
head-top matte. Each variant is sampled for ``--steps-lo`` and ``--steps-hi`` steps: the
difference gives the time per step, the rest the per-run part (``once``'s single reference pass).
A 28-step run's ratio is predicted from those. Blocks dominate a step at these sizes (the parts
outside them are ~2% in bench_block), so the ratio of a few blocks is the ratio of 38.

Memory: the core's prediction for the whole SD3.5 Large (``memory.estimate_peak_vram``, bf16
weights, 1024², reference ``once`` vs ``off``) and, measured, the reference cache this run held
(``native_reference.cache_bytes`` per block x 38).

    COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python bench/bench_native_reference.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import boot_comfyui, synthetic_edit, threads_note  # noqa: E402

LARGE_BLOCKS = 38
RUN_STEPS = 28
TARGETS = {"once_budget_over_off": 1.10, "per_step_over_off": 2.05, "memory_once_over_off": 1.05}


def _boot(work: Path) -> None:
    boot_comfyui(work, "native_reference")


def _large_config(blocks: int) -> dict:
    from hairdiff.hairdiff_core.models.families import transformer_config

    return {**transformer_config("sd3.5-large"), "num_layers": blocks, "in_channels": 16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps-lo", type=int, default=1)
    parser.add_argument("--steps-hi", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import torch

    work = Path(tempfile.mkdtemp(prefix="bench_native_ref_"))
    _boot(work)
    from diffusers import SD3Transformer2DModel
    from hairdiff.hairdiff_core.method.surgery import widen_input_channels
    from hairdiff.hairdiff_core.models import tiny
    from hairdiff.hairdiff_core.models.adapter import save_adapter
    from hairdiff.hairdiff_core.models.memory import estimate_peak_vram
    from hairdiff.nodes import native_nodes as N
    from hairdiff.nodes.builtin_models import comfy_model, comfy_vae
    from hairdiff.nodes.native_reference import HairDiffReferenceAttention, cache_bytes

    torch.manual_seed(0)
    config = _large_config(args.blocks)
    dtype = torch.bfloat16
    transformer = SD3Transformer2DModel(**config).eval().to(dtype)
    adapter = work / "large_blocks_adapter.safetensors"
    save_adapter(widen_input_channels(SD3Transformer2DModel(**config).eval().to(dtype)), adapter)
    vae = tiny.build_tiny_vae().eval()
    base = comfy_model(transformer, float(vae.config.scaling_factor), float(vae.config.shift_factor), 3.0)
    model = N.HairDiffApplyAdapter.execute(base, f"loras/{adapter.name}", 1.0).result[0]
    cvae = comfy_vae(vae)
    photo, sketch, matte = synthetic_edit(args.size, comfy_layout=True, seed=0)
    text = [[torch.zeros(1, 77, 4096), {"pooled_output": torch.zeros(1, 2048)}]]
    pos, neg, latent, _ = N.HairDiffSketchConditioning.execute(
        text, text, cvae, photo, sketch, matte, args.size, 10.0
    ).result
    variants = {
        "off": model,
        "once_budget": HairDiffReferenceAttention.execute(model, "once", key_pool="2").result[0],
        "once": HairDiffReferenceAttention.execute(model, "once").result[0],
        "per_step": HairDiffReferenceAttention.execute(model, "per_step", key_pool="2").result[0],
    }

    def run(m, steps: int) -> float:
        t0 = time.perf_counter()
        N.HairDiffSample.execute(m, pos, neg, latent, 1, steps, 1.0, 1.0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.inference_mode():
        run(variants["off"], 1)  # loads and warms the model
        per_step, fixed = {k: [] for k in variants}, {k: [] for k in variants}
        for _ in range(args.repeats):
            for name, m in variants.items():
                lo, hi = run(m, args.steps_lo), run(m, args.steps_hi)
                step = (hi - lo) / (args.steps_hi - args.steps_lo)
                per_step[name].append(step)
                fixed[name].append(lo - args.steps_lo * step)
        cache_per_block = cache_bytes(model, tuple(latent["samples"].shape)) / max(1, args.blocks)
    s = {k: statistics.median(v) for k, v in per_step.items()}
    f = {k: statistics.median(v) for k, v in fixed.items()}

    def run_ratio(name: str) -> float:
        # A 28-step run: every step's cost, plus what the variant adds once per run (once's pass).
        extra = max(0.0, f[name] - f["off"])
        return (RUN_STEPS * s[name] + extra) / (RUN_STEPS * s["off"])

    core = {mode: estimate_peak_vram("sd3.5-large", weights="bf16", reference=mode) for mode in ("off", "once")}
    result = {
        "bench": "native_reference",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "model": f"SD3.5 Large block dims, {args.blocks} blocks, bf16, random",
        "size": args.size,
        "steps": [args.steps_lo, args.steps_hi],
        "step_s": {k: round(v, 3) for k, v in s.items()},
        "per_run_s": {k: round(v, 3) for k, v in f.items()},
        "once_budget_over_off": round(run_ratio("once_budget"), 4),
        "once_over_off": round(run_ratio("once"), 4),
        "per_step_over_off": round(run_ratio("per_step"), 4),
        "large_cache_mb": round(cache_per_block * LARGE_BLOCKS / 2**20, 1),
        "memory_once_over_off": round(core["once"].total / core["off"].total, 4),
        "memory_source": "core estimate_peak_vram (sd3.5-large, bf16, 1024², once vs off)",
        "targets": TARGETS,
        **threads_note(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
