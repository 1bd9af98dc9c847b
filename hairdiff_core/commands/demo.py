"""``hairdiff demo``: the wiring check. Tiny random model + bundled samples -> result + contact sheet."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
NOTICE = (
    "WIRING CHECK: this demo runs HairDiff's whole path (sketch/matte preparation, 32-channel "
    "surgery, soft-mask sampler, VAE, crop-and-stitch, composite) on a TINY RANDOM model, so the "
    "hair it draws is noise. For real results use SD3.5 weights and a trained adapter:\n"
    "  hairdiff generate --model /path/to/sd3.5_large.safetensors --adapter hairdiff.safetensors "
    "--image photo.png --sketch sketch.png --matte matte.png --out result.png --device cuda --dtype bf16"
)


def sample_paths() -> dict[str, Path]:
    return {k: ASSETS / f"sample_{k}.png" for k in ("photo", "sketch", "matte")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="hairdiff_demo", help="output folder (default ./hairdiff_demo)")
    p.add_argument("--steps", type=int, default=8, help="sampling steps (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", choices=("off", "once", "per_step"), default="off")


def run(args) -> int:
    from hairdiff_core.imageio import contact_sheet, load_image, save_image, save_pil
    from hairdiff_core.pipeline import HairDiffPipeline
    from hairdiff_core.tiny import build_tiny_transformer, build_tiny_vae

    from .preflight import check_demo_args

    check_demo_args(args)
    print(NOTICE, file=sys.stderr)
    out = Path(args.out)
    paths = sample_paths()
    photo, sketch, matte = (load_image(paths[k]) for k in ("photo", "sketch", "matte"))
    pipe = HairDiffPipeline(build_tiny_transformer(), build_tiny_vae())
    reference = None
    if args.reference != "off":
        from hairdiff_core.reference import ReferenceSettings

        reference = ReferenceSettings(mode=args.reference)
    from hairdiff_core.commands.generate import tqdm_callback

    bar, on_step = tqdm_callback(args.steps, "demo")
    try:
        result = pipe.generate(photo, sketch, matte, steps=args.steps, seed=args.seed, reference=reference, on_step=on_step)
    finally:
        bar.close()
    save_image(result.image, out / "result.png")
    sheet = contact_sheet([photo, sketch, matte, result.image], ["photo", "sketch", "matte", "result"])
    save_pil(sheet, out / "contact_sheet.png")
    changed = (result.image != photo[:, :3]).any(dim=1).float().mean().item()
    print(f"wrote {out / 'result.png'} and {out / 'contact_sheet.png'} "
          f"({changed:.1%} of pixels changed, all inside the feathered matte)", file=sys.stderr)
    return 0
