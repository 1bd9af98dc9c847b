"""``hairdiff eval``: measure HairDiff against the latent-replacement baseline on a dataset.

Runs every sample of a dataset in the training layout (img/, matte/, sketch/ matched by stem)
under each setting (``--method`` x ``--reference``) with the same seed and steps, and writes to
``--out``: ``metrics.csv`` (one row per sample and setting), ``summary.md`` (mean ± std per
setting), ``summary.json``, ``results/<setting>/<stem>.png`` and contact sheets
(``sheets/<stem>.png``: photo | sketch | matte | result per setting; ``contact_sheet.png``: the
first rows stacked).
"""
from __future__ import annotations

import argparse
import logging

from .generate import (
    REFERENCE_NOISES,
    add_model_arguments,
    add_reference_field_arguments,
    add_text_arguments,
    check_prompt_source,
    prompt_kwargs,
    reference_fields,
)

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset root with img/, matte/ and sketch/ (files matched by stem)")
    p.add_argument("--out", required=True, help="output folder for metrics.csv, summary.md, results and contact sheets")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples (by stem)")
    p.add_argument("--resolution", type=int, help="load samples at N x N (short side to N, centre crop; default: as stored)")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad samples instead of refusing the dataset")
    add_model_arguments(p)
    g = p.add_argument_group("settings compared (same model, seed and steps)")
    g.add_argument("--method", nargs="+", choices=("joint", "replace"), default=["joint", "replace"],
                   help="samplers to compare (default: joint replace)")
    g.add_argument("--reference", nargs="+", choices=("off", "once", "per_step"), default=["off"],
                   help="reference-attention modes for the joint method (default: off)")
    g.add_argument("--ref-noise", nargs="+", choices=REFERENCE_NOISES, default=["auto"],
                   help="what the reference pass sees, compared side by side: clean (the photo as is, published), "
                        "matched (noised to each step's sigma), auto (clean for per_step, matched for once)")
    add_reference_field_arguments(g)
    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=int, default=28, help="sampling steps (default 28)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--strength", type=float, default=1.0)
    s.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--shift", type=float, default=3.0)
    s.add_argument("--work-size", type=int, help="side of the working area in px (default: the model's)")
    s.add_argument("--feather", type=float, help="feather sigma in px at 1024 px working size (default 10)")
    s.add_argument("--matte-add-sketch", action="store_true",
                   help="add each sketch's region (strokes + what they enclose) to the sample's matte")
    s.add_argument("--prompt-embeds", help="safetensors with prompt_embeds/pooled_prompt_embeds (+ negative_*)")
    add_text_arguments(p, s)
    m = p.add_argument_group("extra comparisons (each costs more generations per sample)")
    m.add_argument("--harmony", nargs="*", choices=("warm", "cool", "dim"), metavar="GAIN",
                   help="harmony tracking: regenerate under a colour gain (warm, cool, dim; no value = all three)")
    m.add_argument("--leakage", action="store_true", help="regenerate from a hair-filled photo and report leakage of the old hair")
    m.add_argument("--edge-threshold", type=float, help="Sobel magnitude threshold of the edge detector (default 0.03)")
    o = p.add_argument_group("outputs")
    o.add_argument("--no-images", action="store_true", help="do not write the result PNGs")
    o.add_argument("--no-sheets", action="store_true", help="do not write contact sheets")


def build_options(args):
    from hairdiff_core import metrics as Mt
    from hairdiff_core.evaluation import EvalOptions

    generate_kwargs = prompt_kwargs(args)
    if args.prompt_embeds:
        from hairdiff_core.text import load_prompt_embeds

        generate_kwargs.update(load_prompt_embeds(args.prompt_embeds))
    harmony = () if args.harmony is None else (tuple(args.harmony) or tuple(Mt.GAINS))
    return EvalOptions(
        steps=args.steps, seed=args.seed, cfg=args.cfg, shift=args.shift, strength=args.strength,
        work_size=args.work_size, feather_sigma=args.feather, resolution=args.resolution,
        harmony=harmony, leakage=args.leakage, matte_add_sketch=args.matte_add_sketch,
        edge_threshold=Mt.EDGE_THRESHOLD if args.edge_threshold is None else args.edge_threshold,
        reference_fields=reference_fields(args),
        generate_kwargs=generate_kwargs,
    )


def run(args) -> int:
    from tqdm.auto import tqdm

    from hairdiff_core.evaluation import evaluate_samples, make_settings, scan_samples

    from .generate import build_pipeline

    # Everything that can be checked without the model is checked first.
    settings = make_settings(args.method, args.reference, args.ref_noise)
    options = build_options(args)
    check_prompt_source(args)
    samples = scan_samples(args.data, limit=args.limit, skip_bad=args.skip_bad)
    if options.resolution is not None:
        from hairdiff_core.data import check_resolution

        check_resolution(options.resolution)
    pipe = build_pipeline(args)
    total = len(samples) * len(settings)
    logger.info("evaluating %d sample(s) x %d setting(s): %s", len(samples), len(settings), ", ".join(s.label for s in settings))
    bar = tqdm(total=total, desc="hairdiff eval", unit="result")

    def on_result(done: int, row: dict) -> None:
        bar.update(done - bar.n)

    try:
        report = evaluate_samples(
            pipe, samples, settings, options, out_dir=args.out,
            save_results=not args.no_images, contact_sheets=not args.no_sheets, on_result=on_result,
        )
    finally:
        bar.close()
    print(report.markdown())
    logger.info("wrote %s/metrics.csv and %s/summary.md", args.out, args.out)
    return 0
