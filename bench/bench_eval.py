"""Cost of evaluating one result beyond the sampling itself (issue 5 target: < 1 s at 1024², CPU).

Builds a synthetic 1024x1024 photo, matte, sketch and an edited result (no model), then times
what ``hairdiff eval`` does per result once the image exists: ``evaluation.score_result`` (all
single-result metrics, the source's seam included) and, separately, the metric parts of the
optional harmony (per gain) and leakage comparisons, whose extra generations are sampling and
not counted, and the outputs written per result (the result PNG and its contact-sheet row).
Warm-up call first (imports, allocator), then the median of ``--repeats`` runs.
Prints one JSON line last.

    python bench/bench_eval.py [--size 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import median_time, threads_note  # noqa: E402

TARGET_S = 1.0


def make_inputs(size: int):
    import torch

    from hairdiff_core.method.mask import gaussian_blur, soft_mask

    g = torch.Generator().manual_seed(0)
    photo = (gaussian_blur(torch.rand(1, 3, size, size, generator=g), 2.0) * 0.6 + 0.2).clamp(0, 1)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx, ry, rx = 0.38 * size, 0.5 * size, 0.26 * size, 0.3 * size
    matte = ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1).float().view(1, 1, size, size)
    stripes = 0.5 + 0.5 * torch.sin(2 * torch.pi * (xx + 0.4 * yy).float() / (size / 40))
    hair = torch.tensor([0.35, 0.22, 0.12]).view(1, 3, 1, 1) * (0.6 + 0.4 * stripes)
    m = soft_mask(matte)
    result = photo * (1 - m) + hair * m
    sketch = torch.zeros(1, 3, size, size)
    strokes = (matte > 0) & (torch.sin(2 * torch.pi * (xx + 0.4 * yy).float() / (size / 40)).abs() < 0.1).view(
        1, 1, size, size
    )
    sketch = torch.where(strokes, torch.tensor([0.9, 0.6, 0.3]).view(1, 3, 1, 1), sketch)
    return photo, sketch, matte, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from hairdiff_core.evaluation import metrics as Mt
    from hairdiff_core.evaluation.evaluate import score_result

    photo, sketch, matte, result = make_inputs(args.size)
    photo_g = Mt.apply_gain(photo, "warm")
    result_g = Mt.apply_gain(result, "warm")
    other = result.flip(-1)

    def base():
        score_result(result, photo, sketch, matte)

    def harmony():
        Mt.harmony_tracking(result, result_g, photo, photo_g, matte)

    def leak():
        Mt.leakage(result, other, photo, matte)

    import shutil
    import tempfile
    from pathlib import Path

    from hairdiff_core.evaluation.evaluate import EvalSample, contact_row, save_result_png

    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    sample = EvalSample("bench", photo, sketch, matte)

    def outputs():
        save_result_png(result, tmp / "result.png")
        contact_row(sample, {"joint": result, "replace": result}, 256).save(tmp / "sheet.png", compress_level=1)

    for fn in (base, harmony, leak, outputs):
        fn()  # warm-up
    t_base = median_time(base, args.repeats)
    t_harmony = median_time(harmony, args.repeats)
    t_leak = median_time(leak, args.repeats)
    t_io = median_time(outputs, args.repeats)
    shutil.rmtree(tmp, ignore_errors=True)
    metrics = {k: round(float(v[0]), 4) for k, v in score_result(result, photo, sketch, matte).items()}
    out = {
        "bench": "eval_metrics",
        "size": args.size,
        "repeats": args.repeats,
        "seconds_per_result": round(t_base, 4),
        "harmony_seconds_per_gain": round(t_harmony, 4),
        "leakage_seconds": round(t_leak, 4),
        "seconds_per_result_all_options": round(t_base + 3 * t_harmony + t_leak, 4),
        "outputs_seconds": round(t_io, 4),
        "seconds_per_result_with_outputs": round(t_base + t_io, 4),
        "target_s": TARGET_S,
        "ok": t_base + t_io < TARGET_S,
        "metrics": metrics,
        **threads_note(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
