"""Cost of ``hairdiff prepare`` per photo: sketch synthesis against the file work it does anyway.

Builds a synthetic portrait (striped, noisy "hair" in an elliptic matte, ~20% of the picture)
at ``--size``, then times, per photo: the baseline (what prepare does for any sketch style:
decode the photo and matte files, write the photo, matte and a sketch PNG) and
``synthesize_sketch`` for each style x colour. Ratios are sketch time / baseline time.
Warm-up call first (imports, allocator), then the median of ``--repeats`` runs.
Prints one JSON line last.

    python bench/bench_prepare.py [--size 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import median_time, threads_note  # noqa: E402


def make_inputs(size: int):
    import torch

    from hairdiff_core.method.mask import gaussian_blur

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    background = (gaussian_blur(torch.rand(1, 3, size, size, generator=g), 4.0) * 0.4 + 0.4).clamp(0, 1)
    matte = ((((yy - 0.35 * size) / (0.25 * size)) ** 2 + ((xx - 0.5 * size) / (0.3 * size)) ** 2) <= 1).float()
    phase = (xx + 0.3 * yy + 0.02 * size * torch.sin(yy / size * 6)) / (size / 60)
    noise = gaussian_blur(torch.rand(1, 1, size, size, generator=g), 1.0)
    hair = torch.tensor([0.35, 0.22, 0.12]).view(1, 3, 1, 1) * (0.6 + 0.3 * torch.sin(phase) + 0.2 * noise)
    photo = torch.where(matte.bool(), hair.clamp(0, 1), background)
    return photo, matte.view(1, 1, size, size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import shutil
    import tempfile
    from pathlib import Path

    import torch

    from hairdiff_core.data.imageio import load_image, save_image
    from hairdiff_core.data.strands import synthesize_sketch

    photo, matte = make_inputs(args.size)
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    save_image(photo, tmp / "photo.png")
    save_image(matte, tmp / "matte.png")
    sketch = synthesize_sketch(photo, matte)

    def files():
        p = load_image(tmp / "photo.png", mode="RGB")
        m = load_image(tmp / "matte.png")
        save_image(p, tmp / "out_img.png")
        save_image(m, tmp / "out_matte.png")
        save_image(sketch, tmp / "out_sketch.png")

    files()
    t_files = median_time(files, args.repeats)
    figures = {}
    for style in ("strands", "edges"):
        for colour in (False, True):

            def fn(style=style, colour=colour):
                synthesize_sketch(photo, matte, style=style, colour=colour, seed=0)

            fn()
            t = median_time(fn, args.repeats)
            key = f"{style}_{'colour' if colour else 'white'}"
            figures[f"{key}_seconds"] = round(t, 3)
            figures[f"{key}_ratio_to_files"] = round(t / t_files, 2)
    shutil.rmtree(tmp, ignore_errors=True)
    stroke_fraction = float((sketch.amax(1) > 0).float().sum() / matte.sum())
    out = {
        "bench": "prepare_sketch",
        "size": args.size,
        "repeats": args.repeats,
        "files_seconds": round(t_files, 3),
        **figures,
        "strands_stroke_fraction_of_matte": round(stroke_fraction, 3),
        **threads_note(),
        "torch": torch.__version__,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
