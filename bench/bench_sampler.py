"""Soft-mask sampler vs a plain diffusers Euler loop: same transformer, steps and size, one run.

Target (issue 2): wall-time ratio <= 1.05 and peak-memory ratio <= 1.10. The plain loop is
diffusers' FlowMatchEulerDiscreteScheduler.step over the same 32-channel transformer with the
same inputs; the HairDiff side is TransformerDenoiser + soft_mask_sample (per-pixel step, mask
bookkeeping, on_step). Wall time: interleaved repeats, medians. Memory: each side in its own
process, peak RSS during sampling. Prints one JSON line last.

    python bench/bench_sampler.py [--steps 8] [--size 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import build_mid_transformer, peak_rss_bytes, reset_peak_rss, run_isolated, threads_note  # noqa: E402


def setup(size: int, steps: int):
    import torch

    from hairdiff_core.method.flow import sampling_sigmas
    from hairdiff_core.method.surgery import widen_input_channels

    model = widen_input_channels(build_mid_transformer())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, size, size, generator=g)
    sketch = torch.randn(1, 16, size, size, generator=g)
    noise = torch.randn(1, 16, size, size, generator=g)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    embeds = torch.zeros(1, 77, model.config.joint_attention_dim)
    pooled = torch.zeros(1, model.config.pooled_projection_dim)
    return model, x0, sketch, noise, mask, embeds, pooled, sampling_sigmas(steps)


def make_runners(size: int, steps: int):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hairdiff_core.method.sampler import TransformerDenoiser, soft_mask_sample

    model, x0, sketch, noise, mask, embeds, pooled, sigmas = setup(size, steps)

    @torch.no_grad()
    def plain():
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        sched.set_timesteps(steps)
        x = noise.clone()
        for t in sched.timesteps:
            v = model(
                hidden_states=torch.cat([x, sketch], 1),
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                timestep=t.expand(1),
                return_dict=False,
            )[0]
            x = sched.step(v, t, x, return_dict=False)[0]
        return x

    @torch.no_grad()
    def hairdiff():
        denoise = TransformerDenoiser(model, sketch, embeds, pooled)
        return soft_mask_sample(denoise, x0, mask, sigmas, noise, on_step=lambda i, n, x: None)

    return plain, hairdiff


def child(which: str, size: int, steps: int) -> None:
    plain, hairdiff = make_runners(size, steps)
    fn = plain if which == "plain" else hairdiff
    fn()  # warm-up: allocator pools and lazy inits are not the loop's cost
    ok = reset_peak_rss()
    fn()
    print(json.dumps({"peak_rss": peak_rss_bytes(), "reset_ok": ok}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", nargs=3, metavar=("WHICH", "SIZE", "STEPS"))
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    plain, hairdiff = make_runners(args.size, args.steps)
    plain(), hairdiff()  # warm-up
    t_plain, t_ours = [], []
    for _ in range(args.repeats):
        for fn, acc in ((plain, t_plain), (hairdiff, t_ours)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    t_plain.sort(), t_ours.sort()
    med_plain, med_ours = t_plain[len(t_plain) // 2], t_ours[len(t_ours) // 2]
    mem_plain = run_isolated(__file__, ["plain", str(args.size), str(args.steps)])
    mem_ours = run_isolated(__file__, ["hairdiff", str(args.size), str(args.steps)])
    result = {
        "bench": "sampler",
        "steps": args.steps,
        "latent": args.size,
        "plain_s": round(med_plain, 4),
        "hairdiff_s": round(med_ours, 4),
        "time_ratio": round(med_ours / med_plain, 4),
        "plain_peak_mb": round(mem_plain["peak_rss"] / 2**20, 1),
        "hairdiff_peak_mb": round(mem_ours["peak_rss"] / 2**20, 1),
        "mem_ratio": round(mem_ours["peak_rss"] / mem_plain["peak_rss"], 4),
        "targets": {"time_ratio": 1.05, "mem_ratio": 1.10},
        **threads_note(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
