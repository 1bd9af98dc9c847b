"""Benchmark: does HairDiff's training teach the sketch? The toy model, end to end, on a CPU.

From the shipped toy base (``hairdiff_core/assets/toy``: a small SD3-shaped transformer and VAE
trained on synthetic portraits), train a HairDiff adapter with the project's own training code
(``hairdiff train --toy``: surgery, LoRA + sketch channels, soft mask, dual loss; the settings of
``tools/make_toy.py``) and measure, on held-out synthetic portraits:

- ``vae_psnr``: the toy VAE's reconstruction PSNR (dB) of held-out photos;
- ``gap`` / ``gap_sigma_ge_0.5``: sketch ablation gap (L_other - L_own) / L_other, with the
  training loss on fixed sigma/noise draws, L_own with the sample's own sketch and L_other with
  another sample's; overall and for sigma >= 0.5;
- on generated images, for held-out edits whose sketch turns the strands by >= 45 degrees away
  from the old hair (so copying the old hair fails): the fraction of results whose dominant
  strand direction inside the matte (structure tensor, ``metrics.strand_orientation``) is within
  15 degrees of the sketch's (``within15``; ``within15_coherent_sketch`` on the edits whose
  sketch has one dominant direction, coherence >= 0.4, apart from wavy ones) and the fraction closer to the old hair's direction
  than to the sketch's (``follows_old``), for the trained adapter, the untrained widened base
  (sketch channels zero) and the ``replace`` inpainting baseline; median angle error;
- ``psnr_out``: preservation outside the matte (metrics.preservation);
- the training loss curve's first and last values (means of the first/last 20 steps).

    PYTHONPATH=$PWD python3 bench/bench_learn.py [--steps N] [--samples 24] [--threads 1]

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

#: What bench/run_all.py passes: the shipped adapter is measured (training one takes ~20 min).
SHORT_ARGS = ["--adapter", "hairdiff_core/assets/toy/toy_adapter.safetensors"]
#: Issue 11's targets.
TARGETS = {"vae_psnr": {"min": 25.0}, "gap_sigma_ge_0.5": {"min": 0.2}, "trained_within15": {"min": 0.8}}

SIGMAS = (0.2, 0.35, 0.5, 0.65, 0.8, 0.95)
#: Sketch coherence (structure tensor, 0..1) from which a sketch has one dominant direction.
COHERENT = 0.4


def held_out_edits(n: int, seed: int = 4242):
    """n held-out scenes: (photo with the old hair, matte, sketch of new hair turned >= 45 deg)
    as uint8 arrays. The sketch is what ``hairdiff prepare --seeding ridges`` traces from a photo
    with the new hair (every other one) or exact level lines of the new field."""
    import numpy as np

    from training.synthetic import (
        hair_matte,
        redirect,
        render_portrait,
        sample_hair_params,
        strand_sketch,
        traced_sketch,
    )

    rng = np.random.default_rng(seed)
    out = []
    to8 = lambda a: (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    for i in range(n):
        params = sample_hair_params(rng, 128)
        matte = hair_matte(params)
        new = redirect(params, rng)
        if i % 2 == 0:
            sketch = traced_sketch(to8(render_portrait(new, matte)), matte, colour=bool(new["stroke_colour"]), seed=i)
        else:
            sketch = strand_sketch(new, matte)
        out.append((to8(render_portrait(params, matte)), to8(matte.astype(np.float32)), to8(sketch)))
    return out


def _stack(items, k):
    import numpy as np
    import torch

    a = np.stack([it[k] for it in items]).astype(np.float32) / 255.0
    if a.ndim == 3:
        a = a[..., None]
    return torch.from_numpy(a.transpose(0, 3, 1, 2).copy())


def ablation_gap(pipe, photos, sketches, mattes, lambda_shape: float, seed: int = 0) -> dict:
    """Training loss with each sample's own sketch vs the next sample's, on fixed draws."""
    import torch

    from hairdiff_core.method import mask as M
    from hairdiff_core.method.flow import NUM_TRAIN_TIMESTEPS, soft_noise
    from hairdiff_core.method.losses import hairdiff_loss
    from hairdiff_core.models.text import zero_text

    tr = pipe.transformer
    with torch.no_grad():
        x0 = pipe.encode(photos)
        sk_own = pipe.encode(sketches)
        sk_other = sk_own.roll(1, dims=0)
        h, w = photos.shape[-2:]
        mask = M.latent_grid(M.soft_mask(mattes, M.feather_sigma(h, w, 10.0)))
        g = torch.Generator().manual_seed(seed)
        b = len(photos)
        embeds, pooled = zero_text(tr, b)
        rows = []
        for sigma in SIGMAS:
            noise = torch.randn(x0.shape, generator=g)
            s = torch.full((b,), sigma)
            x_in = soft_noise(x0, noise, s, mask)
            losses = {}
            for name, sk in (("own", sk_own), ("other", sk_other)):
                v = tr(
                    hidden_states=torch.cat([x_in, sk], 1),
                    encoder_hidden_states=embeds,
                    pooled_projections=pooled,
                    timestep=s * NUM_TRAIN_TIMESTEPS,
                ).sample
                losses[name] = [
                    float(
                        hairdiff_loss(
                            v[i : i + 1],
                            x0[i : i + 1],
                            noise[i : i + 1],
                            x_in[i : i + 1],
                            s[i : i + 1],
                            mask[i : i + 1],
                            lambda_shape,
                        ).total
                    )
                    for i in range(b)
                ]
            rows += [(sigma, o, t) for o, t in zip(losses["own"], losses["other"])]

    def gap(sel):
        own = sum(r[1] for r in sel)
        other = sum(r[2] for r in sel)
        return (other - own) / other

    return {
        "gap": gap(rows),
        "gap_sigma_ge_0.5": gap([r for r in rows if r[0] >= 0.5]),
        "gap_positive_fraction": sum(r[2] > r[1] for r in rows) / len(rows),
    }


def direction_scores(results, sketches, photos, mattes) -> dict:

    from hairdiff_core.evaluation.metrics import orientation_difference, preservation, strand_orientation

    res = strand_orientation(results, mattes, erode=48.0)["angle"]
    sketch = strand_orientation(sketches, mattes)
    sk = sketch["angle"]
    old = strand_orientation(photos, mattes, erode=48.0)["angle"]
    err = orientation_difference(res, sk)
    err_old = orientation_difference(res, old)
    # Wavy strands have no single direction: a sketch whose structure tensor is weakly coherent
    # gives an angle that swings with the phase of a wave. Reported apart, never instead.
    coherent = sketch["coherence"] >= COHERENT
    return {
        "within15": float((err <= 15).float().mean()),
        "within15_coherent_sketch": float((err[coherent] <= 15).float().mean()) if coherent.any() else float("nan"),
        "coherent_sketches": int(coherent.sum()),
        "follows_old": float((err_old < err).float().mean()),
        "median_err_deg": float(err.median()),
        "psnr_out": float(preservation(results, photos, mattes)["psnr_out"].median()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="adapter training steps (default: make_toy's)")
    p.add_argument("--samples", type=int, default=24, help="held-out edits generated per method")
    p.add_argument("--gen-steps", type=int, default=20)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: on a shared CPU more threads mostly wait)"
    )
    p.add_argument("--work", help="folder for the dataset and the run (default: a temporary one)")
    p.add_argument("--adapter", help="measure this adapter instead of training one (e.g. the shipped one)")
    p.add_argument("--n-train", type=int, default=None, help="training portraits (default: make_toy's)")
    p.add_argument(
        "--toy-dir", help="toy weights from this folder (e.g. make_toy.py's --work) instead of the shipped ones"
    )
    args = p.parse_args(argv)
    if args.toy_dir:
        from hairdiff_core.models import toy

        with toy.asset_override(args.toy_dir):
            return run(args)
    return run(args)


def run(args) -> int:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import make_toy

    from hairdiff_core.models.toy import load_toy_vae
    from hairdiff_core.pipeline import HairDiffPipeline

    t_start = time.time()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_learn_"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {}

    # 1. The toy VAE on held-out photos.
    held, _ = make_toy.portraits(32, make_toy.HELDOUT_SEED, style="levels")
    held = torch.from_numpy(held)
    out["vae_psnr"] = make_toy.psnr(make_toy.reconstruct(load_toy_vae(), held), held)

    # 2. Train the adapter with hairdiff train's code, from the shipped toy base.
    settings = dict(make_toy.ADAPTER_TRAIN)
    if args.adapter:
        adapter = Path(args.adapter)
    else:
        from training.config import resolve_config
        from training.trainer import train

        n_train = args.n_train or make_toy.N_TRAIN
        data = make_toy.training_dataset(work / "data", work, n_train)
        steps = args.steps or make_toy.ADAPTER_STEPS
        config = resolve_config(
            {**settings, "toy": True, "data": str(data), "output": str(work / "run"), "max_steps": steps}
        )
        t0 = time.time()
        result = train(config)
        out["train_seconds"] = round(time.time() - t0, 1)
        adapter = result.adapter
        with open(work / "run" / "log.csv", newline="") as f:
            totals = [float(r["total"]) for r in csv.DictReader(f)]
        out["steps"] = steps
        out["loss_first"] = float(np.mean(totals[:20]))
        out["loss_last"] = float(np.mean(totals[-20:]))

    trained = HairDiffPipeline.from_files(toy=True, adapter=adapter)
    untrained = HairDiffPipeline.from_files(toy=True)

    # 3. Sketch ablation gap on held-out portraits (own sketch vs another's).
    arrays = make_toy.portrait_arrays(16, make_toy.HELDOUT_SEED + 1)
    photos = _stack([{"p": a} for a in arrays["photo"]], "p")
    sketches = _stack([{"s": a} for a in arrays["sketch"]], "s")
    mattes = _stack([{"m": a} for a in arrays["matte"]], "m")
    out.update(ablation_gap(trained, photos, sketches, mattes, settings["lambda_shape"]))
    out["gap_untrained"] = ablation_gap(untrained, photos, sketches, mattes, settings["lambda_shape"])["gap"]

    # 4. Generated strands on edits that turn the hair >= 45 degrees.
    edits = held_out_edits(args.samples)
    photos = _stack([{"p": e[0]} for e in edits], "p")
    mattes = _stack([{"m": e[1]} for e in edits], "m")
    sketches = _stack([{"s": e[2]} for e in edits], "s")
    for name, pipe, method in (
        ("trained", trained, "joint"),
        ("untrained", untrained, "joint"),
        ("replace", untrained, "replace"),
    ):
        res = pipe.generate(photos, sketches, mattes, steps=args.gen_steps, seed=0, method=method).image
        scores = direction_scores(res, sketches, photos, mattes)
        for k, v in scores.items():
            out[f"{name}_{k}"] = v
    out["seconds"] = round(time.time() - t_start, 1)
    out["threads"] = torch.get_num_threads()
    out["targets"] = TARGETS

    width = max(len(k) for k in out)
    for k, v in out.items():
        if k == "targets":
            continue
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
