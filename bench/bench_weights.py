"""Weight storage and offloading on the CPU: bf16 vs fp8 storage vs block offload (and both).

Every variant computes in bf16 on the mid-size random config of ``bench/_common.py`` (widened to
32 channels): ``bf16`` keeps the weights in bf16; ``fp8`` stores the Linears in float8_e4m3fn
(``memory.apply_weights``: upcast one layer at a time); ``blocks`` adds diffusers' block
offloading (``memory.apply_offload``) with the CPU as both homes, so it measures the hooks'
overhead only: the memory it saves on a GPU cannot show on a CPU (see bench/gpu_memory_check.py).
Per-step time: one denoiser call (``TransformerDenoiser``, cfg 1), minimum over repeats.
Peak memory: each variant in its own process, peak RSS of the steps after building the model
(weights included: what fp8 saves shows there); ``weights_mb`` is the exact stored size.
Quality: fp8 vs bf16 velocity on the same input (relative error, and PSNR of the velocity
scaled to its range). Prints one JSON line last.

    python bench/bench_weights.py [--size 64] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import build_mid_transformer, peak_rss_bytes, reset_peak_rss, run_isolated, threads_note  # noqa: E402

VARIANTS = {
    "bf16": ("bf16", "none"),
    "fp8": ("fp8_e4m3fn", "none"),
    "blocks": ("bf16", "blocks"),
    "fp8_blocks": ("fp8_e4m3fn", "blocks"),
}


def build(variant: str):
    import torch

    from hairdiff_core.method.surgery import widen_input_channels
    from hairdiff_core.models.memory import apply_offload, apply_weights

    weights, offload = VARIANTS[variant]
    model = widen_input_channels(build_mid_transformer()).to(torch.bfloat16)
    apply_weights(model, weights, torch.bfloat16)
    apply_offload(model, offload, "cpu")
    return model


def make_step(model, size: int):
    import torch

    from hairdiff_core.method.sampler import TransformerDenoiser

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, size, size, generator=g)
    sketch = torch.randn(1, 16, size, size, generator=g)
    embeds = torch.zeros(1, 77, model.config.joint_attention_dim)
    pooled = torch.zeros(1, model.config.pooled_projection_dim)
    denoise = TransformerDenoiser(model, sketch, embeds, pooled)

    def step():
        with torch.no_grad():
            return denoise(x, 0.7, 0)

    return step


def _trim() -> None:
    gc.collect()
    try:  # hand freed heap pages back, so the peak below starts from what is really held
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def child(variant: str, size: int, steps: int) -> None:
    model = build(variant)
    step = make_step(model, size)
    step()  # warm-up
    _trim()
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    reset_peak_rss()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"variant": variant, "step_s": min(times), "peak_rss": peak_rss_bytes(), "weights": weights}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px, 1024 tokens)")
    p.add_argument("--steps", type=int, default=3, help="timed denoiser calls per variant")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=4, metavar=("VARIANT", "SIZE", "STEPS", "THREADS"))
    args = p.parse_args()
    import torch

    if args.child:
        variant, size, steps, threads = args.child
        torch.set_num_threads(int(threads))
        child(variant, int(size), int(steps))
        return
    torch.set_num_threads(args.threads)

    # Quality, in this process: the same input through bf16 and fp8 storage.
    ref = make_step(build("bf16"), args.size)()
    got = make_step(build("fp8"), args.size)()
    rel = float((got - ref).norm() / ref.norm())
    span = float(ref.max() - ref.min())
    mse = float(((got - ref) ** 2).mean())
    psnr = 10 * math.log10(span * span / mse) if mse > 0 else math.inf

    runs = {v: run_isolated(__file__, [v, str(args.size), str(args.steps), str(args.threads)]) for v in VARIANTS}
    mb = 2**20
    base = runs["bf16"]
    result = {
        "bench": "weights",
        "latent": args.size,
        "tokens": (args.size // 2) ** 2,
        "steps": args.steps,
        "step_s": {v: round(r["step_s"], 4) for v, r in runs.items()},
        "peak_mb": {v: round(r["peak_rss"] / mb, 1) for v, r in runs.items()},
        "weights_mb": {v: round(r["weights"] / mb, 2) for v, r in runs.items()},
        "fp8_rel_error": round(rel, 5),
        "fp8_velocity_psnr_db": round(psnr, 2),
        **threads_note(),
        "fp8_time_over_bf16": round(runs["fp8"]["step_s"] / base["step_s"], 3),
        "blocks_time_over_bf16": round(runs["blocks"]["step_s"] / base["step_s"], 3),
        "fp8_blocks_time_over_bf16": round(runs["fp8_blocks"]["step_s"] / base["step_s"], 3),
        "fp8_weights_over_bf16": round(runs["fp8"]["weights"] / base["weights"], 3),
        "fp8_peak_over_bf16": round(runs["fp8"]["peak_rss"] / base["peak_rss"], 3),
        "blocks_peak_over_bf16": round(runs["blocks"]["peak_rss"] / base["peak_rss"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
