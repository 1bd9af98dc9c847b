"""``hairdiff eval``: measure HairDiff against the latent-replacement baseline on a dataset.

Runs every sample of a dataset in the training layout (img/, matte/, sketch/ matched by stem)
under each setting (``--method`` x ``--reference``) with the same seed and steps, and writes to
``--out``: ``metrics.csv`` (one row per sample and setting), ``summary.md`` (mean ± std per
setting), ``summary.json``, ``results/<setting>/<stem>.png`` and contact sheets
(``sheets/<stem>.png``: photo | sketch | matte | result per setting; ``contact_sheet.png``: the
first rows stacked).

Several processes (``accelerate launch --num_processes N -m hairdiff_cli eval ...``, or torchrun)
split the dataset: each evaluates every N-th sample (``evaluation.shard_samples``) on its own
device (``--device cuda`` becomes ``cuda:<local rank>``) and writes its results and sheets; the
first process gathers the rows and writes metrics.csv and the summaries.
"""

from __future__ import annotations

import argparse
import logging

from hairdiff_core.defaults import DEFAULTS

from .generate import REFERENCE_NOISES, add_model_arguments
from .options import add_reference_field_arguments, add_text_arguments, prompt_kwargs, reference_fields

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset root with img/, matte/ and sketch/ (files matched by stem)")
    p.add_argument("--out", required=True, help="output folder for metrics.csv, summary.md, results and contact sheets")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples (by stem)")
    p.add_argument(
        "--resolution", type=int, help="load samples at about N x N px in their aspect bucket (default: as stored)"
    )
    p.add_argument(
        "--crop",
        choices=("bucket", "center"),
        default="bucket",
        help="with --resolution: bucket (aspect kept, the matte whole; default) or center (N x N centre square)",
    )
    p.add_argument("--skip-bad", action="store_true", help="leave out bad samples instead of refusing the dataset")
    add_model_arguments(p)
    g = p.add_argument_group("settings compared (same model, seed and steps)")
    g.add_argument(
        "--method",
        nargs="+",
        choices=("joint", "replace"),
        default=["joint", "replace"],
        help="samplers to compare (default: joint replace)",
    )
    g.add_argument(
        "--reference",
        nargs="+",
        choices=("off", "once", "per_step"),
        default=["off"],
        help="reference-attention modes for the joint method (default: off)",
    )
    g.add_argument(
        "--ref-noise",
        nargs="+",
        choices=REFERENCE_NOISES,
        default=["auto"],
        help="what the reference pass sees, compared side by side: clean (the photo as is, published), "
        "matched (noised to each step's sigma), auto (clean for per_step, matched for once)",
    )
    add_reference_field_arguments(g)
    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"sampling steps (default {DEFAULTS.steps})")
    s.add_argument("--seed", type=int, default=DEFAULTS.seed)
    s.add_argument("--strength", type=float, default=DEFAULTS.strength)
    s.add_argument("--cfg", type=float, default=DEFAULTS.cfg, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--shift", type=float, default=DEFAULTS.shift)
    s.add_argument("--work-size", type=int, help="side of the working area in px (default: the model's)")
    s.add_argument(
        "--feather",
        type=float,
        help=f"feather sigma in px at 1024 px working size (default {DEFAULTS.feather_at_1024:g})",
    )
    s.add_argument(
        "--matte-add-sketch",
        action="store_true",
        help="add each sketch's region (strokes + what they enclose) to the sample's matte",
    )
    s.add_argument("--prompt-embeds", help="safetensors with prompt_embeds/pooled_prompt_embeds (+ negative_*)")
    add_text_arguments(p, s)
    m = p.add_argument_group("extra comparisons (each costs more generations per sample)")
    m.add_argument(
        "--harmony",
        nargs="*",
        choices=("warm", "cool", "dim"),
        metavar="GAIN",
        help="harmony tracking: regenerate under a colour gain (warm, cool, dim; no value = all three)",
    )
    m.add_argument(
        "--leakage", action="store_true", help="regenerate from a hair-filled photo and report leakage of the old hair"
    )
    m.add_argument("--edge-threshold", type=float, help="Sobel magnitude threshold of the edge detector (default 0.03)")
    o = p.add_argument_group("outputs")
    o.add_argument("--no-images", action="store_true", help="do not write the result PNGs")
    o.add_argument("--no-sheets", action="store_true", help="do not write contact sheets")


def build_options(args):
    from hairdiff_core.evaluation import metrics as Mt
    from hairdiff_core.evaluation.evaluate import EvalOptions

    generate_kwargs = prompt_kwargs(args)
    if args.prompt_embeds:
        from hairdiff_core.models.text import load_prompt_embeds

        generate_kwargs.update(load_prompt_embeds(args.prompt_embeds))
    harmony = () if args.harmony is None else (tuple(args.harmony) or tuple(Mt.GAINS))
    return EvalOptions(
        steps=args.steps,
        seed=args.seed,
        cfg=args.cfg,
        shift=args.shift,
        strength=args.strength,
        work_size=args.work_size,
        feather_sigma=args.feather,
        resolution=args.resolution,
        crop=args.crop,
        harmony=harmony,
        leakage=args.leakage,
        matte_add_sketch=args.matte_add_sketch,
        edge_threshold=Mt.EDGE_THRESHOLD if args.edge_threshold is None else args.edge_threshold,
        reference_fields=reference_fields(args),
        generate_kwargs=generate_kwargs,
    )


def _process_group() -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, whether we started the group) of a launch by
    accelerate/torchrun; (0, 1, 0, False) otherwise. Starts the process group (NCCL on CUDA,
    else gloo) when there are several processes and nobody has started it yet."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, False
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local, started


def run(args) -> int:
    from tqdm.auto import tqdm

    from hairdiff_core.evaluation.evaluate import (
        evaluate_samples,
        make_settings,
        merge_reports,
        scan_samples,
        shard_samples,
    )

    from .generate import build_pipeline, compiled
    from .preflight import check_eval_args

    # Everything that can be checked without the model is checked first.
    check_eval_args(args)
    settings = make_settings(args.method, args.reference, args.ref_noise)
    options = build_options(args)
    samples = scan_samples(args.data, limit=args.limit, skip_bad=args.skip_bad)
    if options.resolution is not None:
        from hairdiff_core.data.datasets import check_resolution

        check_resolution(options.resolution)
    rank, world, local, started = _process_group()
    if world > 1 and args.device == "cuda":
        args.device = f"cuda:{local}"
    mine = shard_samples(samples, rank, world)
    pipe = build_pipeline(args)
    total = len(mine) * len(settings)
    logger.info(
        "evaluating %d sample(s) x %d setting(s): %s%s",
        len(mine),
        len(settings),
        ", ".join(s.label for s in settings),
        f" (process {rank} of {world}, {len(samples)} sample(s) in all)" if world > 1 else "",
    )
    bar = tqdm(total=total, desc="hairdiff eval", unit="result", disable=rank != 0)

    def on_result(done: int, row: dict) -> None:
        bar.update(done - bar.n)

    try:
        with compiled(args, pipe):
            report = evaluate_samples(
                pipe,
                mine,
                settings,
                options,
                out_dir=args.out,
                write_report=world == 1,
                save_results=not args.no_images,
                contact_sheets=not args.no_sheets,
                on_result=on_result,
            )
    finally:
        bar.close()
    if world > 1:
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, report.rows)
        if rank == 0:
            report = merge_reports(settings, parts, [s.stem for s in samples], options)
            report.write(args.out)
        dist.barrier()
        if started:
            dist.destroy_process_group()
        if rank != 0:
            return 0
    print(report.markdown())
    logger.info("wrote %s/metrics.csv and %s/summary.md", args.out, args.out)
    return 0
