"""``hairdiff demo``: the toy model redraws one synthetic portrait's hair from two sketches.

Default: the shipped toy model (:mod:`hairdiff_core.models.toy`) with its shipped adapter, one photo,
two sketches whose strands run in different directions, and the two results side by side in a
contact sheet, with each result's measured strand direction next to its sketch's. ``--tiny``: the
old wiring check (tiny random model + bundled samples; the hair it draws is noise).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# The bundled samples ship with the core package (hairdiff_core/assets).
ASSETS = Path(importlib.util.find_spec("hairdiff_core").origin).parent / "assets"
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
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20 toy, 8 tiny)")
    p.add_argument("--tiny", action="store_true", help="wiring check: the tiny random model on the bundled sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", choices=("off", "once", "per_step"), default="off")


TOY_NOTICE = (
    "TOY MODEL: a small SD3-shaped transformer and VAE trained on synthetic striped 'portraits' at 128 px, "
    "with a HairDiff adapter trained by `hairdiff train --toy`. It shows the train -> adapter -> generate "
    "loop working and the sketch steering the strands; it knows nothing of real hair (that needs SD3.5 and "
    "a real dataset)."
)
TOY_SKETCHES = ("a", "b")


def toy_sample_paths() -> dict[str, Path]:
    """The toy demo's photo, matte and two sketches (written by tools/make_toy.py)."""
    from hairdiff_core.models.toy import asset_dir

    folder = asset_dir()
    paths = {"photo": folder / "demo_photo.png", "matte": folder / "demo_matte.png"}
    paths.update({f"sketch_{k}": folder / f"demo_sketch_{k}.png" for k in TOY_SKETCHES})
    return paths


def strand_labels(k: str, sketch_angle: float, result_angle: float) -> tuple[str, str, str]:
    """The sheet's labels of sketch ``k`` and its result, and the summary line, from the strands'
    orientations (radians). Orientations are undirected (0 and 176 deg are 4 deg apart), so
    the result says how far it is from its sketch: the two bare angles read like a miss."""
    import torch

    from hairdiff_core.evaluation.metrics import orientation_difference

    s_deg, r_deg = math.degrees(sketch_angle), math.degrees(result_angle)
    off = float(orientation_difference(torch.tensor([sketch_angle]), torch.tensor([result_angle]))[0])
    return (
        f"sketch {k} ({s_deg:.0f} deg)",
        f"result {k} ({r_deg:.0f} deg; {off:.0f} deg apart)",
        f"sketch {k}: strands at {s_deg:.0f} deg, result {k}: {r_deg:.0f} deg ({off:.0f} deg apart)",
    )


def run_toy(args) -> int:
    import torch

    from hairdiff_cli.commands.generate import tqdm_callback
    from hairdiff_core.data.imageio import contact_sheet, load_image, save_image, save_pil
    from hairdiff_core.evaluation.metrics import strand_orientation
    from hairdiff_core.models.toy import adapter_path
    from hairdiff_core.pipeline import HairDiffPipeline, builtin_model_label

    print(TOY_NOTICE, file=sys.stderr)
    out = Path(args.out)
    paths = toy_sample_paths()
    photo, matte = load_image(paths["photo"]), load_image(paths["matte"])
    sketches = torch.cat([load_image(paths[f"sketch_{k}"])[:, :3] for k in TOY_SKETCHES])
    pipe = HairDiffPipeline.from_files(toy=True, adapter=adapter_path())
    reference = None
    if args.reference != "off":
        from hairdiff_core.method.reference import ReferenceSettings

        reference = ReferenceSettings(mode=args.reference)
    steps = args.steps or 20
    bar, on_step = tqdm_callback(steps, "demo")
    try:
        # One call, a batch of two: the same photo and matte with each sketch.
        n = len(sketches)
        result = pipe.generate(
            photo.expand(n, -1, -1, -1),
            sketches,
            matte.expand(n, -1, -1, -1),
            steps=steps,
            seed=args.seed,
            reference=reference,
            on_step=on_step,
        )
    finally:
        bar.close()
    tiles, labels, lines = [photo, matte], ["photo", "matte"], []
    sketch_dir = strand_orientation(sketches, matte)["angle"]
    result_dir = strand_orientation(result.image, matte, erode=48.0)["angle"]
    old_dir = float(strand_orientation(photo, matte, erode=48.0)["angle"][0])
    for i, k in enumerate(TOY_SKETCHES):
        save_image(result.image[i : i + 1], out / f"result_{k}.png")
        tiles += [sketches[i : i + 1], result.image[i : i + 1]]
        sketch_label, result_label, line = strand_labels(k, float(sketch_dir[i]), float(result_dir[i]))
        labels += [sketch_label, result_label]
        lines.append(line)
    save_pil(contact_sheet(tiles, labels, title=builtin_model_label("toy")), out / "contact_sheet.png")
    print(f"old hair: strands at {math.degrees(old_dir):.0f} deg\n" + "\n".join(lines), file=sys.stderr)
    print(f"wrote {out / 'result_a.png'}, {out / 'result_b.png'} and {out / 'contact_sheet.png'}", file=sys.stderr)
    return 0


def run(args) -> int:
    from .preflight import check_demo_args

    check_demo_args(args)
    if not args.tiny:
        return run_toy(args)
    from hairdiff_core.data.imageio import contact_sheet, load_image, save_image, save_pil
    from hairdiff_core.models.tiny import build_tiny_transformer, build_tiny_vae
    from hairdiff_core.pipeline import HairDiffPipeline, builtin_model_label

    print(NOTICE, file=sys.stderr)
    out = Path(args.out)
    paths = sample_paths()
    photo, sketch, matte = (load_image(paths[k]) for k in ("photo", "sketch", "matte"))
    pipe = HairDiffPipeline(build_tiny_transformer(), build_tiny_vae())
    reference = None
    if args.reference != "off":
        from hairdiff_core.method.reference import ReferenceSettings

        reference = ReferenceSettings(mode=args.reference)
    from hairdiff_cli.commands.generate import tqdm_callback

    steps = args.steps or 8
    bar, on_step = tqdm_callback(steps, "demo")
    try:
        result = pipe.generate(photo, sketch, matte, steps=steps, seed=args.seed, reference=reference, on_step=on_step)
    finally:
        bar.close()
    save_image(result.image, out / "result.png")
    sheet = contact_sheet(
        [photo, sketch, matte, result.image], ["photo", "sketch", "matte", "result"], title=builtin_model_label("tiny")
    )
    save_pil(sheet, out / "contact_sheet.png")
    changed = (result.image != photo[:, :3]).any(dim=1).float().mean().item()
    print(
        f"wrote {out / 'result.png'} and {out / 'contact_sheet.png'} "
        f"({changed:.1%} of pixels changed, all inside the feathered matte)",
        file=sys.stderr,
    )
    return 0
