"""Benchmark: one HairDiff training step on the CPU, with and without gradient checkpointing.

A mid-size random SD3-shaped transformer (default 6 layers, 4 heads x 32 = 128 wide, one
dual-attention block, 64x64 latents = a 512 px image, 1024 image tokens + 77 zero text tokens),
widened to 32 channels, LoRA r16 + sketch channels trainable exactly as ``hairdiff train`` sets
them up, batch 1. A step is: soft-mask noising, forward on cat([x_in, sketch_latent]), the dual
loss, backward, gradient clipping, AdamW. The VAE and data loading are left out (they do not
depend on checkpointing). Each mode runs in its own process so peak RSS is its own.

    python bench/bench_train.py [--steps 5] [--latent 64] [--layers 6] [--threads 1]

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from diffusers import SD3Transformer2DModel

    from hairdiff_core.method.flow import soft_noise
    from hairdiff_core.method.losses import hairdiff_loss, sample_sigmas
    from hairdiff_core.method.surgery import widen_input_channels
    from training.config import TrainConfig
    from training.trainer import setup_trainable

    torch.manual_seed(0)
    inner = args.heads * args.head_dim
    model = SD3Transformer2DModel(
        sample_size=args.latent,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=args.layers,
        attention_head_dim=args.head_dim,
        num_attention_heads=args.heads,
        joint_attention_dim=64,
        caption_projection_dim=inner,
        pooled_projection_dim=64,
        pos_embed_max_size=96,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    widen_input_channels(model)
    cfg = TrainConfig(rank=16, gradient_checkpointing=args.mode == "ckpt")
    groups = setup_trainable(model, cfg)
    model.train()
    params = groups["lora"] + groups["proj"]
    opt = torch.optim.AdamW([{"params": groups["lora"]}, {"params": groups["proj"], "weight_decay": 0.0}], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    b, h = 1, args.latent
    x0 = torch.randn(b, 16, h, h, generator=g)
    sketch = torch.randn(b, 16, h, h, generator=g)
    mask = torch.zeros(b, 1, h, h)
    mask[..., h // 4 : 3 * h // 4, h // 4 : 3 * h // 4] = 1
    text = torch.zeros(b, 77, 64)
    pooled = torch.zeros(b, 64)

    def step():
        sigma = sample_sigmas(b, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_in = soft_noise(x0, noise, sigma, mask)
        v = model(
            hidden_states=torch.cat([x_in, sketch], 1),
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=sigma * 1000,
            return_dict=False,
        )[0]
        terms = hairdiff_loss(v, x0, noise, x_in, sigma, mask, 0.1)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    rss_model = _rss_mb()  # model built, no step taken: what a step adds is measured from here
    step()  # warm-up (allocations, Adam state)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times.sort()
    median = times[len(times) // 2]
    return {
        "mode": args.mode,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in params),
        "step_s_median": median,
        "steps_per_s": 1.0 / median,
        "peak_rss_mb": peak,
        "rss_model_mb": rss_model,
        "step_peak_mb": max(0.0, peak - rss_model),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--latent", type=int, default=64, help="latent side (image side / 8)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: stable figures on a shared machine)"
    )
    p.add_argument("--mode", choices=("ckpt", "nockpt"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return 0
    results = {}
    for mode in ("nockpt", "ckpt"):
        cmd = [sys.executable, __file__, "--mode", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "mode"
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            return out.returncode
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'mode':<8} {'step s':>8} {'steps/s':>8} {'peak RSS MB':>12} {'step peak MB':>13}")
    for mode, r in results.items():
        print(
            f"{mode:<8} {r['step_s_median']:>8.3f} {r['steps_per_s']:>8.2f} {r['peak_rss_mb']:>12.0f} {r['step_peak_mb']:>13.0f}"
        )
    a, c = results["nockpt"], results["ckpt"]
    summary = {
        "bench": "train_step_cpu",
        "config": {k: v for k, v in vars(args).items() if k != "mode"},
        "image_px": args.latent * 8,
        "params_total": a["params_total"],
        "params_trainable": a["params_trainable"],
        "steps_per_s_no_ckpt": round(a["steps_per_s"], 3),
        "steps_per_s_ckpt": round(c["steps_per_s"], 3),
        "peak_rss_mb_no_ckpt": round(a["peak_rss_mb"], 1),
        "peak_rss_mb_ckpt": round(c["peak_rss_mb"], 1),
        "step_peak_mb_no_ckpt": round(a["step_peak_mb"], 1),
        "step_peak_mb_ckpt": round(c["step_peak_mb"], 1),
        "ckpt_time_ratio": round(a["steps_per_s"] / c["steps_per_s"], 3),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
