"""``hairdiff train``: fine-tune a HairDiff adapter (LoRA + sketch channels) on a dataset.

Settings come from the defaults, then ``--config FILE`` (JSON or TOML), then the command line.
Several GPUs: ``accelerate launch -m hairdiff_cli train ...`` (same flags).
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Every default is None: "not given", so a config file value is not overridden by a default.
    a = p.add_argument
    a("--config", help="JSON or TOML file of settings (names as below, dashes or underscores); the command line wins")
    g = p.add_argument_group("data and model")
    g.add_argument("--data", help="dataset folder with img/, matte/, sketch/ (matched by stem) and optional braid.txt")
    g.add_argument("--output", help="output folder (adapter, checkpoints, logs, samples)")
    g.add_argument("--tiny", action="store_true", default=None, help="the built-in tiny model (wiring checks)")
    g.add_argument(
        "--toy",
        action="store_true",
        default=None,
        help="the shipped toy model (trained on synthetic portraits) as the base",
    )
    g.add_argument("--model", help="SD3.5 diffusers folder or single-file .safetensors checkpoint")
    g.add_argument("--vae", help="VAE folder or .safetensors (when the model has none)")
    g.add_argument(
        "--resolution",
        type=int,
        help="training size N, a multiple of 16 (default: the model's, 1024 for SD3.5): aspect buckets of about N x N px",
    )
    g.add_argument(
        "--crop",
        choices=("bucket", "center"),
        help="bucket: nearest aspect bucket, the matte kept whole (default); center: short side to N, centre N x N square",
    )
    g.add_argument(
        "--skip-bad", action="store_true", default=None, help="train on the good samples of a dataset with bad ones"
    )
    g.add_argument("--num-workers", type=int, help="data loading processes (default 2)")
    g = p.add_argument_group("length and optimiser")
    g.add_argument("--max-steps", type=int, help="optimiser steps (wins over --epochs)")
    g.add_argument("--epochs", type=int, help="epochs when --max-steps is not given (default 20, the published recipe)")
    g.add_argument("--batch-size", type=int, help="per device (default 1)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step (default 1)")
    g.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    g.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), help="after warm-up (default constant)")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 100)")
    g.add_argument(
        "--weight-decay", type=float, help="AdamW weight decay of the LoRA (default 0.01; the patch conv gets none)"
    )
    g.add_argument("--adam-8bit", action="store_true", default=None, help="bitsandbytes AdamW8bit")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping (default 1.0; 0 = off)")
    g.add_argument("--seed", type=int, help="seed of data order, augmentation, noise (default 0)")
    g = p.add_argument_group("method")
    g.add_argument("--lambda-shape", type=float, help="weight of the Sobel shape loss (default 0.1)")
    g.add_argument(
        "--augment",
        choices=("all", "seed", "none"),
        help="all: photo+sketch+matte warped together (default); seed: the published mode, photo fixed and its latent cached",
    )
    g.add_argument("--sketch-jitter", type=float, help="sketch-only jitter in px at 1024 (all mode, default 4)")
    g.add_argument("--feather-sigma", type=float, help="soft-mask blur sigma in px at 1024 (default 10)")
    g.add_argument(
        "--matte-growth",
        type=float,
        metavar="P",
        help="probability of growing the training matte beyond the hair (dilation + blobs; the sketch unchanged) so the model learns to shorten hair (default 0.5; 0 = off, the published method)",
    )
    g.add_argument(
        "--sigma-sampling",
        choices=("logit_normal", "mode", "cosmap", "uniform"),
        help="sigma density (default logit_normal, as diffusers' SD3 script)",
    )
    g.add_argument("--logit-mean", type=float)
    g.add_argument("--logit-std", type=float)
    g.add_argument("--mode-scale", type=float)
    g.add_argument(
        "--shift", type=float, help="flow-match shift of the sigma table (default: hairdiff_core.defaults, 3.0)"
    )
    g.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default = rank)")
    g.add_argument("--lora-targets", nargs="+", help="module names (default to_q to_k to_v to_out.0)")
    g.add_argument(
        "--train-base-channels",
        action="store_true",
        default=None,
        help="also train channels 0-15 and the bias of pos_embed.proj",
    )
    g.add_argument(
        "--captions",
        help="captions file (JSON {stem: caption} or stem<TAB>caption), encoded once with the model's SD3 text encoders",
    )
    g.add_argument("--text-embeds", help="folder of <stem>.safetensors precomputed SD3 prompt embeddings")
    g.add_argument(
        "--oversample-from-epoch",
        type=int,
        help="from this epoch (1-based) draw braid.txt samples --oversample-factor times as often (default: the middle epoch when braid.txt tags braids; 0 = off)",
    )
    g.add_argument("--oversample-factor", type=int, help="(default 3)")
    g = p.add_argument_group("engine and outputs")
    g.add_argument("--mixed-precision", choices=("bf16", "fp16", "no"), help="default bf16 (fp16 uses loss scaling)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None, help="default on")
    g.add_argument("--cpu", action="store_true", default=None, help="train on the CPU even when a GPU is present")
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    g.add_argument("--checkpoints-keep", type=int, help="checkpoints kept (default 3)")
    g.add_argument(
        "--checkpoint-every-epoch",
        action="store_true",
        default=None,
        help="also a checkpoint at each epoch's end and its adapter in <output>/epochs/ (kept, to compare epochs)",
    )
    g.add_argument("--resume", help="'latest' or a checkpoints/checkpoint-<step> folder")
    g.add_argument("--validate-every", type=int, help="steps between validation contact sheets (default 500; 0 = off)")
    g.add_argument("--validation-samples", type=int, help="(default 2)")
    g.add_argument("--validation-steps", type=int, help="sampler steps of validation (default 20)")
    g.add_argument(
        "--eval-data", help="held-out dataset (same layout); its metrics (hairdiff eval) are logged at each validation"
    )
    g.add_argument("--eval-limit", type=int, help="samples of --eval-data measured per validation (default 8)")
    g.add_argument("--cache-dir", help="latent/text cache (default <output>/cache)")


def run(args) -> int:
    from training.config import resolve_config
    from training.trainer import train

    cli = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("config", "command", "verbose")}
    config = resolve_config(cli, args.config)
    result = train(config)
    if not result.main_process:
        return 0
    msg = [f"trained {result.steps} step(s); adapter: {result.adapter}"]
    if result.skipped:
        msg.append(f"skipped {result.skipped} bad sample(s) (--skip-bad)")
    if result.last:
        msg.append(
            f"last step: total {result.last['total']:.4f}, mse {result.last['mse']:.4f}, shape {result.last['shape']:.4f}"
        )
    logs = [result.output / "log.csv", result.output / "epoch_summary.md", result.output / "loss_curve.png"]
    msg.append("logs: " + ", ".join(str(p) for p in logs if p.is_file()))
    print("\n".join(msg), file=sys.stderr)
    return 0
