"""GPU check: peak VRAM and seconds per step of each (weights, offload) on a real-size model.

A random-initialised SD3.5 Large (or Medium) transformer, widened to 32 channels, runs
HairDiff's full sampling call (``HairDiffPipeline.generate``: soft-mask sampler, reference
attention ``once``) at 1024² for 28 steps. The VAE is replaced by fixed random latents (its
memory is not the transformer's; ComfyUI loads it at other times). Each (weights, offload) runs
in its own process; peak VRAM is ``torch.cuda.max_memory_allocated`` over the call, next to
``hairdiff_core.models.memory.estimate_peak_vram``'s prediction. Targets (issue 14): Large fits 12 GB
with fp8 + blocks at <= 1.5x the bf16 all-in-VRAM step time; Medium fits 8 GB.

    python bench/gpu_memory_check.py [--family sd3.5-large] [--steps 28] [--size 1024]
        [--variants bf16:none,fp8_e4m3fn:none,bf16:blocks,fp8_e4m3fn:blocks]

    python bench/gpu_memory_check.py --cpu-dry-run   # the same code path, tiny model, CPU (wiring only)

Without CUDA (and without ``--cpu-dry-run``) it prints one JSON line saying so and exits with
code 2. Prints one JSON line last. ``--cpu-dry-run`` runs every variant's child process on the
tiny family at 128 px for 2 steps on the CPU (no memory figures): a change that would break the
GPU run breaks it here first, where it costs no device time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Meter, synthetic_edit  # noqa: E402

DEFAULT_VARIANTS = "bf16:none,fp8_e4m3fn:none,bf16:blocks,fp8_e4m3fn:blocks"
TARGET_GB = {"sd3.5-large": 12.0, "sd3.5-medium": 8.0}


def random_transformer(family: str, device: str):
    """The family's transformer with N(0, 0.02) weights, built straight into bf16 on ``device``."""
    import torch
    from diffusers import SD3Transformer2DModel

    from hairdiff_core.models.memory import family_config

    config = family_config(family)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # meta parameters in bf16: to_empty then allocates bf16
    try:
        with torch.device("meta"):
            model = SD3Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    model.pos_embed.pos_embed = model.pos_embed.pos_embed.to(torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        model.pos_embed.pos_embed.normal_(0.0, 0.02, generator=g)
    return model.eval()


def child(family: str, weights: str, offload: str, size: int, steps: int, device: str = "cuda") -> dict:
    import torch

    from hairdiff_core.models.memory import apply_weights, estimate_peak_vram
    from hairdiff_core.pipeline import HairDiffPipeline

    dev = torch.device(device)
    meter = Meter(dev)
    # Blocks rest on the CPU; otherwise build on the GPU directly (fast, no 16 GB host copy).
    model = random_transformer(family, "cpu" if offload == "blocks" else device)
    apply_weights(model, weights, torch.bfloat16)
    g = torch.Generator().manual_seed(1)

    class RandomCodec:  # no VAE at this size: random latents in, blank images out
        def encode(self, image01):
            return torch.randn(image01.shape[0], 16, image01.shape[2] // 8, image01.shape[3] // 8, generator=g).to(dev)

        def decode(self, latent):
            return torch.zeros(latent.shape[0], 3, latent.shape[2] * 8, latent.shape[3] * 8)

    pipe = HairDiffPipeline(model, None, device=dev, dtype=torch.bfloat16, offload=offload, codec=RandomCodec())
    photo, sketch, matte = synthetic_edit(size)
    stamps = []

    def on_step(step, total, latent):
        meter.sync()
        stamps.append(time.perf_counter())

    base = meter.reset()
    t0 = time.perf_counter()
    out = pipe.generate(photo, sketch, matte, steps=steps, seed=0, reference="once", work_size=size, on_step=on_step)
    total = time.perf_counter() - t0
    if len(stamps) != steps or not torch.isfinite(out.latent).all():
        raise RuntimeError(f"the sampling call reported {len(stamps)} of {steps} steps or a non-finite result")
    # Step time without the first step (it also runs the one reference pass).
    per_step = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    est = estimate_peak_vram(
        family, weights=weights, offload=offload, height=size, width=size, reference="once", text_tokens=77
    )
    return {
        "weights": weights,
        "offload": offload,
        "peak_gb": meter.peak_gb(),
        "resident_before_gb": round(base / 2**30, 3),
        "predicted_gb": round(est.total / 2**30, 3),
        "s_per_step": round(per_step, 4),
        "total_s": round(total, 2),
        "reserved_gb": meter.reserved_gb(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="sd3.5-large", choices=("sd3.5-large", "sd3.5-medium", "sd3-medium"))
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated weights:offload pairs")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny model, 128 px, 2 steps on the CPU: wiring only")
    p.add_argument("--child", nargs=6, metavar=("FAMILY", "WEIGHTS", "OFFLOAD", "SIZE", "STEPS", "DEVICE"))
    args = p.parse_args(argv)
    import torch

    from hairdiff_core.models.memory import WEIGHTS

    pairs = []
    for pair in args.variants.split(","):
        weights, _, offload = pair.strip().partition(":")
        if weights not in WEIGHTS or weights == "auto" or offload not in ("none", "model", "blocks"):
            p.error(
                f"--variants: {pair!r} is not weights:offload with weights in {WEIGHTS[1:]} and offload none|model|blocks"
            )
        pairs.append((weights, offload))
    if args.child:
        family, weights, offload, size, steps, device = args.child
        print(json.dumps(child(family, weights, offload, int(size), int(steps), device)))
        return 0
    device = "cuda"
    if args.cpu_dry_run:
        device, args.family, args.size, args.steps = "cpu", "tiny", 128, 2
    elif not torch.cuda.is_available():
        print(
            json.dumps(
                {"bench": "gpu_memory_check", "error": "no CUDA device: this check needs a GPU; nothing was measured"}
            )
        )
        return 2
    rows = []
    for weights, offload in pairs:
        cmd = [sys.executable, __file__, "--child", args.family, weights, offload, str(args.size), str(args.steps)]
        out = subprocess.run(cmd + [device], capture_output=True, text=True)
        if out.returncode != 0:
            rows.append({"weights": weights, "offload": offload, "error": out.stderr.strip().splitlines()[-3:]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    ok = {(r["weights"], r["offload"]): r for r in rows if "error" not in r}
    target = TARGET_GB.get(args.family)
    result = {
        "bench": "gpu_memory_check",
        "family": args.family,
        "size": args.size,
        "steps": args.steps,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run: wiring only, no figures)",
        "torch": torch.__version__,
        "rows": rows,
    }
    base = ok.get(("bf16", "none"))
    frugal = ok.get(("fp8_e4m3fn", "blocks"))
    if target is not None and device == "cuda":
        result["target_gb"] = target
        result["fits_target"] = {f"{w}:{o}": r["peak_gb"] <= target for (w, o), r in ok.items()}
    if base and frugal:
        result["fp8_blocks_time_over_bf16_none"] = round(frugal["s_per_step"] / base["s_per_step"], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
