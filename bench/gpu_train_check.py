"""GPU check of a training recipe: seconds/step, peak memory and MFU of HairDiff training.

Builds a random-initialised SD3.5 Large (or ``--family medium``) transformer from the shipped
configs (``hairdiff_core/models/configs``) directly on the GPU in bf16, and a random SD3 VAE, and runs
``--steps`` training steps at 1024² through the trainer's own code path
(``training.trainer``: ``setup_trainable``, ``Trainer._micro_step`` = augmentation, matte
growth, soft mask, VAE encode, per-pixel noising, forward on 32 channels, dual loss; then
``accelerate`` backward and ``Trainer._apply_gradients``) with the recipe's settings (batch,
gradient checkpointing, LoRA rank/targets, augmentation, bf16). Random weights do not change
the cost of a step.

    python bench/gpu_train_check.py                       # Large, training/recipes/sd35-large-1xa100.toml
    python bench/gpu_train_check.py --family medium       # Medium, training/recipes/sd35-medium-24gb.toml
    python bench/gpu_train_check.py --recipe R.toml --batch-size 2 --steps 10
    python bench/gpu_train_check.py --cpu-dry-run         # the same code path, tiny config, CPU (wiring only)

Prints one JSON line: seconds per micro-batch (mean of the timed steps after ``--warmup``),
seconds per optimiser step (x the recipe's gradient accumulation), samples/s, peak GPU memory
(``torch.cuda.max_memory_allocated``, and reserved), and MFU.

FLOPs are counted honestly (:func:`model_flops`): the matmuls of one forward pass from the
architecture (patch embedding, every joint block's image and text streams, the extra image
attention of dual-attention layers, the attention products over image + text tokens, the
output projection), times 2 for the backward pass's input gradients of the linear layers and
times 3 for attention (the base is frozen: no weight gradients; the LoRA's are < 0.5% and left
out). The recompute of gradient checkpointing is *not* counted as model FLOPs (it is hardware
work, HFU); neither is the VAE. MFU = model FLOPs per second / the GPU's dense bf16 peak
(A100 312, H100/H200 SXM 989 TFLOP/s; ``--peak-tflops`` for others). The forward count is
checked against ``torch.utils.flop_counter`` on a meta-device copy (``flops_counted_forward``;
they agree within 0.02% for Large and Medium at 1024²).
Without CUDA (and without ``--cpu-dry-run``) it exits with code 2 and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RECIPES = {
    "large": REPO / "training" / "recipes" / "sd35-large-1xa100.toml",
    "medium": REPO / "training" / "recipes" / "sd35-medium-24gb.toml",
}
CONFIG_FILES = {"large": "sd3.5-large-transformer.json", "medium": "sd3.5-medium-transformer.json"}
#: Dense bf16 tensor-core peaks, TFLOP/s (no sparsity).
PEAK_TFLOPS = {
    "A100": 312.0,
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "L40S": 362.0,
    "RTX 4090": 165.0,
    "A10": 125.0,
    "L4": 121.0,
}
#: Tiny stand-in for --cpu-dry-run.
DRY_CONFIG = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 16,
    "pos_embed_max_size": 32,
    "dual_attention_layers": [0],
    "qk_norm": "rms_norm",
}


def model_flops(config: dict, height: int, width: int, text_tokens: int, batch: int = 1) -> dict[str, float]:
    """Forward and training-step model FLOPs of an SD3 transformer (see the module docstring)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    layers = config["num_layers"]
    p = config["patch_size"]
    dual = set(config.get("dual_attention_layers") or ())
    ti = (height // 8 // p) * (width // 8 // p)  # image tokens (VAE factor 8, patch p)
    tt = text_tokens
    t = ti + tt
    linear = 2 * ti * (2 * config["in_channels"] * p * p) * d  # patch embedding (32 channels after surgery)
    linear += 2 * tt * config["joint_attention_dim"] * d  # context embedder
    linear += 2 * ti * d * (p * p * config["out_channels"])  # final projection
    attention = 0.0
    for i in range(layers):
        last = i == layers - 1
        linear += 2 * ti * 12 * d * d  # image stream: q, k, v, out (4 d²) + MLP d->4d->d (8 d²)
        linear += 2 * tt * (3 * d * d if last else 12 * d * d)  # text stream (the last block: q, k, v only)
        attention += 4 * t * t * d  # QK^T and PV over image + text tokens
        if i in dual:
            linear += 2 * ti * 4 * d * d
            attention += 4 * ti * ti * d
    forward = (linear + attention) * batch
    step = (2 * linear + 3 * attention) * batch
    return {"forward": forward, "step": step, "image_tokens": ti, "text_tokens": tt}


def counted_forward_flops(config: dict, height: int, width: int, text_tokens: int) -> float:
    """One forward's FLOPs by ``torch.utils.flop_counter`` on a meta-device copy of the widened
    architecture (shapes only: instant, no memory, and every attention kernel is counted)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = SD3Transformer2DModel(**dict(config, in_channels=32))
        args = dict(
            hidden_states=torch.zeros(1, 32, height // 8, width // 8),
            encoder_hidden_states=torch.zeros(1, text_tokens, config["joint_attention_dim"]),
            pooled_projections=torch.zeros(1, config["pooled_projection_dim"]),
            timestep=torch.tensor([500.0]),
        )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**args, return_dict=False)
    return float(counter.get_total_flops())


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=("large", "medium"), default="large")
    ap.add_argument("--recipe", help="recipe TOML (default: the family's)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when not recognised")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny config on the CPU: checks the code path only")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print(
            "gpu_train_check: no CUDA device is visible (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}); run it on a machine with an NVIDIA GPU and a CUDA build of torch, "
            "or pass --cpu-dry-run to check the code path on a tiny model",
            file=sys.stderr,
        )
        return 2

    from hairdiff_core.data.augment import AugmentSettings, MatteGrowth
    from hairdiff_core.models.families import VAE_CONFIG_FILE, shipped_config
    from hairdiff_core.pipeline import HairDiffPipeline
    from training.config import resolve_config
    from training.trainer import RunSetup, Trainer, setup_trainable

    dry = args.cpu_dry_run
    tmp = Path(tempfile.mkdtemp(prefix="gpu_train_check_"))
    recipe = args.recipe or str(RECIPES[args.family])
    cli = {"model": "random-init", "data": str(tmp), "output": str(tmp / "out"), "batch_size": args.batch_size}
    if dry:
        cli.update(cpu=True, mixed_precision="no", resolution=64)
    cfg = resolve_config(cli, recipe)
    resolution = 64 if dry else int(args.resolution)
    dtype = torch.float32 if dry else torch.bfloat16

    trainer = Trainer(cfg)
    acc = trainer._accelerator()
    device = acc.device
    tconfig = dict(DRY_CONFIG) if dry else shipped_config(CONFIG_FILES[args.family])

    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch.manual_seed(0)
    t0 = time.perf_counter()
    # Built on the device (an 8B float32 CPU init takes minutes): in float32 then cast, as a
    # loaded checkpoint would be; where 32 GB of float32 does not fit, directly in bf16.
    try:
        with torch.device(device):
            transformer = SD3Transformer2DModel(**tconfig).to(dtype)
    except torch.OutOfMemoryError:
        transformer = None
        torch.cuda.empty_cache()
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                transformer = SD3Transformer2DModel(**tconfig)
        finally:
            torch.set_default_dtype(default_dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if dry:
        from hairdiff_core.models.tiny import build_tiny_vae

        vae = build_tiny_vae()
    else:
        with torch.device(device):
            vae = AutoencoderKL(**shipped_config(VAE_CONFIG_FILE))
    build_s = time.perf_counter() - t0

    pipe = HairDiffPipeline(transformer, vae, device=device, dtype=dtype)
    transformer = pipe.transformer
    groups = setup_trainable(transformer, cfg)
    transformer.train()
    optimizer = trainer._optimizer(
        [
            {"params": groups["lora"], "weight_decay": cfg.weight_decay},
            {"params": groups["proj"], "weight_decay": 0.0},
        ]
    )
    model, optimizer = acc.prepare(transformer, optimizer)
    # Only what _micro_step and _apply_gradients read: no dataset, plan or logs in this check.
    trainer.state = RunSetup(
        acc=acc,
        out=tmp,
        ckdir=tmp / "checkpoints",
        gen=torch.Generator().manual_seed(0),
        family=None,
        pipe=pipe,
        transformer=transformer,
        model=model,
        optimizer=optimizer,
        trainable_params=groups["lora"] + groups["proj"],
        base_channels=transformer.pos_embed.proj.weight.detach()[:, :16].clone(),
        resolution=resolution,
        samples=[],
        dataset=None,
        plan=None,
        max_steps=args.warmup + args.steps,
        aug=AugmentSettings(mode=cfg.augment, sketch_jitter_px=cfg.sketch_jitter),
        growth=MatteGrowth(p=cfg.matte_growth),
        latent_cache=None,
        sketch_cache=None,
        text=None,
        skipped=0,
    )

    b = cfg.batch_size
    g = torch.Generator().manual_seed(1)
    matte = torch.zeros(b, 1, resolution, resolution)
    matte[..., resolution // 8 : resolution * 5 // 8, resolution // 4 : resolution * 3 // 4] = 1
    batch = {
        "image": torch.rand(b, 3, resolution, resolution, generator=g),
        "sketch": (torch.rand(b, 3, resolution, resolution, generator=g) > 0.97).float(),
        "matte": matte,
        "index": torch.arange(b),
    }

    from hairdiff_core.models.text import ZERO_TEXT_TOKENS

    flops = model_flops(tconfig | {"in_channels": 16}, resolution, resolution, ZERO_TEXT_TOKENS, batch=b)
    # The analytic forward count, checked against torch's counter.
    counted = counted_forward_flops(tconfig, resolution, resolution, ZERO_TEXT_TOKENS)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        terms, _ = trainer._micro_step(batch)
        acc.backward(terms.total)
        trainer._apply_gradients(i, terms.detached())
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(terms.total.detach()))
    micro = sum(times) / len(times)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, args.peak_tflops)
    result = {
        "bench": "gpu_train_check",
        "family": args.family if not dry else "dry-run",
        "device": name,
        "recipe": Path(recipe).name,
        "resolution": resolution,
        "batch_size": b,
        "grad_accum": cfg.grad_accum,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "augment": cfg.augment,
        "matte_growth": cfg.matte_growth,
        "params_b": round(sum(p.numel() for p in transformer.parameters()) / 1e9, 3),
        "trainable_m": round(sum(p.numel() for p in trainer.state.trainable_params) / 1e6, 2),
        "build_seconds": round(build_s, 1),
        "seconds_per_micro_batch": round(micro, 4),
        "seconds_per_step": round(micro * cfg.grad_accum, 3),
        "samples_per_second": round(b / micro, 3),
        "model_tflops_per_micro_batch": round(flops["step"] / 1e12, 2),
        "flops_forward_analytic": flops["forward"] / b,
        "flops_counted_forward": counted,
        "flops_analytic_vs_counted": round(flops["forward"] / b / counted, 4) if counted else None,
        "achieved_tflops": round(flops["step"] / micro / 1e12, 1),
        "mfu": round(flops["step"] / micro / (peak * 1e12), 4) if peak and device.type == "cuda" else None,
        "peak_tflops_bf16": peak,
        "peak_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 2**30, 2) if device.type == "cuda" else None,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "finite": all(x == x and abs(x) != float("inf") for x in losses),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
