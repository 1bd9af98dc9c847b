"""``hairdiff prepare``: photos and hair mattes in, a training set (img/ matte/ sketch/) out.

The sketches are synthesised (see :mod:`hairdiff_core.data.strands`); see
:mod:`hairdiff_core.data.prepare` for the layout and the checks.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    # No import of hairdiff_core.data.prepare here (it imports torch): `hairdiff --help` stays instant.
    # tests/test_prepare.py checks that the default named below is the library's.
    p.add_argument("--images", required=True, help="folder of photos (any format PIL reads; EXIF rotation applied)")
    p.add_argument(
        "--mattes", required=True, help="folder of hair mattes matched by stem (L/RGB/RGBA-alpha PNG, white = hair)"
    )
    p.add_argument(
        "--out", required=True, help="output dataset folder (img/, matte/, sketch/, braid.txt, prepare.json)"
    )
    p.add_argument(
        "--sketch",
        choices=("strands", "edges"),
        default="strands",
        help="strands: streamlines along the hair's orientation (default); edges: Canny edges of the hair",
    )
    p.add_argument(
        "--colour",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="strokes take the hair's colour (teaches colour); default --no-colour: white strokes (shape only)",
    )
    p.add_argument(
        "--max-side", type=int, help="downscale photos whose longer side exceeds N px (default 2048; 0 keeps the size)"
    )
    braids = p.add_mutually_exclusive_group()
    braids.add_argument(
        "--braids", metavar="FILE", help="text file of photo stems (one a line) that form the braid subset"
    )
    braids.add_argument(
        "--braid-pattern",
        metavar="GLOB",
        help="photo names or stems matching this glob form the braid subset, e.g. 'braid_*'",
    )
    p.add_argument("--variants", type=int, default=1, help="sketches per photo, each a sample <stem>_v<k> (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sketches (default 0): same seed, same dataset")
    p.add_argument("--density", type=float, default=1.0, help="stroke density relative to the default (default 1)")
    p.add_argument("--length", type=float, default=1.0, help="strand length relative to the default (default 1)")
    p.add_argument(
        "--thickness", type=float, default=1.0, help="stroke width relative to the default, 3 px at 1024 (default 1)"
    )
    p.add_argument(
        "--seeding",
        choices=["grid", "ridges"],
        default="grid",
        help="where strand strokes start: grid (spread evenly, default) or ridges (on the hair's highlights, "
        "so a stroke marks a visible strand; the toy model's sketches are drawn this way)",
    )
    p.add_argument("--skip-bad", action="store_true", help="leave out bad photo/matte pairs instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier prepare run in --out")


def run(args) -> int:
    from tqdm.auto import tqdm

    from hairdiff_core.data.prepare import PrepareOptions, prepare_dataset

    options = PrepareOptions(
        sketch=args.sketch,
        colour=args.colour,
        variants=args.variants,
        max_side=PrepareOptions.max_side if args.max_side is None else (args.max_side or None),
        seed=args.seed,
        density=args.density,
        length=args.length,
        thickness=args.thickness,
        seeding=args.seeding,
        braids_file=args.braids,
        braid_pattern=args.braid_pattern,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
    )
    bar = None

    def on_sample(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="hairdiff prepare", unit="photo")
        if done > bar.n:
            bar.update(done - bar.n)

    try:
        report = prepare_dataset(args.images, args.mattes, args.out, options, on_sample=on_sample)
    finally:
        if bar is not None:
            bar.close()
    skipped = len({p.stem for p in report.problems})
    logger.info(
        "wrote %d sample(s) from %d photo(s) to %s%s",
        report.sample_count,
        len(report.samples),
        args.out,
        f" (skipped {skipped} bad)" if skipped else "",
    )
    return 0
