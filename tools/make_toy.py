"""Builds the toy model family shipped in hairdiff_core/assets/toy/ (see hairdiff_core/models/toy.py).

Three stages, each cached in --work so a stage can be rerun alone (--stages vae,base,adapter):

1. ``vae``: the toy autoencoder (SD3 VAE interface: AutoencoderKL, 16 latent channels, factor 8)
   trained on synthetic portraits *and* their sketches (the sketch latent goes through the same
   VAE) to reconstruct them; its SD3-style scale/shift are measured on the training latents.
2. ``base``: the toy SD3Transformer2DModel pre-trained as a plain, unconditional flow-matching
   image model on the portraits' latents: the stand-in for stock SD3.5.
3. ``adapter``: the HairDiff adapter, trained on the toy base by ``hairdiff train`` (training's
   own code: surgery, LoRA + sketch channels, soft mask, dual loss), exactly as for SD3.5.

Everything is seeded. On 2 CPU cores (one other job running), with one torch thread, the run
takes about 40 minutes (VAE 13, base 8, adapter 15). Keep one thread: with two threads and one
other busy process, a VAE step took over 3 s instead of 0.22 s.
    PYTHONPATH=$PWD python3 tools/make_toy.py [--work build/toy] [--stages vae,base,adapter]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hairdiff_core.models import toy  # noqa: E402
from training.synthetic import make_portrait_arrays, sample_hair_params  # noqa: E402

logger = logging.getLogger("make_toy")

SIZE = toy.TOY_WORK_SIZE
TRAIN_SEED, HELDOUT_SEED = 11, 12345
N_TRAIN = 512
CROP = 64
VAE_LR = 1.5e-4

#: Settings of the adapter stage (``hairdiff train`` flags); bench_learn.py reuses them.
ADAPTER_TRAIN = dict(
    resolution=SIZE,
    batch_size=8,
    lr=3e-3,
    lr_schedule="cosine",
    warmup_steps=50,
    rank=16,
    lora_targets=[
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "ff.net.0.proj",
        "ff.net.2",
    ],
    augment="none",
    mixed_precision="no",
    gradient_checkpointing=False,
    cpu=True,
    num_workers=0,
    validate_every=0,
    checkpoint_every=100000,
    sketch_jitter=2.0,
    lambda_shape=0.1,
    seed=0,
)


_CACHE: dict[tuple[int, int, str], dict] = {}


def portrait_arrays(n: int, seed: int, work: Path | None = None, style: str = "strands") -> dict:
    """{photo, matte, sketch: uint8 arrays (n, S, S[, 3]), params: list} of ``n`` portraits,
    the same ones ``make_portrait_dataset(n=n, seed=seed, sketch_style=style)`` writes; cached
    in ``work``. Photos and mattes do not depend on ``style``."""
    key = (n, seed, style)
    if key in _CACHE:
        return _CACHE[key]
    path = work / f"portraits_{n}_{seed}_{style}.npz" if work is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            out = {k: z[k] for k in ("photo", "matte", "sketch")}
        out["params"] = json.loads((path.with_suffix(".json")).read_text())
    elif style == "strands" and (n, seed, "levels") in _CACHE:
        # Same photos and mattes: only the sketches are traced.
        from training.synthetic import traced_sketch

        levels = _CACHE[(n, seed, "levels")]
        sketches = [
            traced_sketch(levels["photo"][i], levels["matte"][i], colour=bool(prm.get("stroke_colour")), seed=i)
            for i, prm in enumerate(levels["params"])
        ]
        out = {
            "photo": levels["photo"],
            "matte": levels["matte"],
            "params": levels["params"],
            "sketch": (np.clip(np.stack(sketches), 0, 1) * 255 + 0.5).astype(np.uint8),
        }
        if path is not None:
            np.savez_compressed(path, **{k: out[k] for k in ("photo", "matte", "sketch")})
            path.with_suffix(".json").write_text(json.dumps(out["params"]))
    else:
        rng = np.random.default_rng(seed)
        rows = {"photo": [], "matte": [], "sketch": [], "params": []}
        for _ in range(n):
            params = sample_hair_params(rng, SIZE)
            for k, a in zip(
                ("photo", "matte", "sketch"), make_portrait_arrays(params, style, seed=len(rows["params"]))
            ):
                rows[k].append(a)
            rows["params"].append(params)
        out = {k: np.stack(v) for k, v in rows.items() if k != "params"}
        out["params"] = rows["params"]
        if path is not None:
            np.savez_compressed(path, **{k: out[k] for k in ("photo", "matte", "sketch")})
            path.with_suffix(".json").write_text(json.dumps(out["params"]))
    _CACHE[key] = out
    return out


ADAPTER_STEPS = 6000


def portraits(n: int, seed: int, work: Path | None = None, style: str = "strands") -> tuple[np.ndarray, np.ndarray]:
    """(photos, sketches) as float arrays (n, 3, S, S) in [0, 1]."""
    arrays = portrait_arrays(n, seed, work, style)
    to = lambda a: a.astype(np.float32).transpose(0, 3, 1, 2) / 255.0  # noqa: E731
    return to(arrays["photo"]), to(arrays["sketch"])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(0, 1) - b.clamp(0, 1)).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch] * 2 - 1
        out.append((vae.decode(vae.encode(x).latent_dist.mode()).sample + 1) / 2)
    return torch.cat(out).clamp(0, 1)


# -- stage 1: the autoencoder ---------------------------------------------------------------------
# Channels of the linear start: the RGB signal, a constant _C (steadies GroupNorm's std) and the
# negated signal (keeps GroupNorm's mean free of the signal); _BIAS moves SiLU to its linear part.
_SIG, _CONST, _NEG = (0, 1, 2), 3, (4, 5, 6)
_C, _BIAS = 20.0, 8.0


@torch.no_grad()
def linear_init(vae, eps: float = 0.1):
    """Start the autoencoder as (almost) a linear one, about 24 dB on held-out portraits before any
    step: the encoder's shortcut path takes 8x8 averages of RGB to latent channels 0-2, the
    decoder's upsamples them smoothly back; every residual branch and attention output starts at
    zero (SkipInit) and the other weights at ``eps`` times their default. Trained from a random
    start, this autoencoder stayed below an image's mean colour (16 dB) for thousands of steps.

    Args:
        vae: a ``toy.build_toy_vae()`` (norm_num_groups 1), changed in place and returned.
        eps: scale of the default random weights off the linear path.
    """
    carry = _SIG + (_CONST,) + _NEG
    for name, m in vae.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.weight.mul_(eps)
            if m.bias is not None:
                m.bias.zero_()
            if name.endswith("conv2") or name.endswith("to_out.0"):
                m.weight.zero_()
            elif name.endswith("conv_shortcut"):
                for c in carry:
                    m.weight[:, c].zero_()
                    m.weight[c].zero_()
                    m.weight[c, c] = 1.0
            elif name.endswith("downsamplers.0.conv"):
                for c in carry:
                    m.weight[:, c].zero_()
                    m.weight[c].zero_()
                    m.weight[c, c, :2, :2] = 0.25
            elif name.endswith("upsamplers.0.conv"):
                k = torch.tensor([1.0, 2.0, 1.0])
                k = (k[:, None] * k[None, :]) / 16
                for c in carry:
                    m.weight[:, c].zero_()
                    m.weight[c].zero_()
                    if c == _CONST:  # the constant stays constant (a blur would dim it at the border)
                        m.weight[c, c, 1, 1] = 1.0
                    else:
                        m.weight[c, c] = k
    enc, dec = vae.encoder, vae.decoder
    # encoder: x -> channels 0-2, -x -> 4-6 (keeps GroupNorm's mean free of the signal), _C -> 3
    w = enc.conv_in.weight
    for c in carry:
        w[c].zero_()
    for i, (s, n) in enumerate(zip(_SIG, _NEG)):
        w[s, i, 1, 1] = 1.0
        w[n, i, 1, 1] = -1.0
    enc.conv_in.bias[_CONST] = _C
    _linear_out(enc.conv_norm_out, enc.conv_out, _SIG, range(3))
    # decoder: latent 0-2 -> channels 0-2 and their negatives, _C -> 3
    w = dec.conv_in.weight
    for c in carry:
        w[c].zero_()
    for i in range(3):
        w[:, i].zero_()
        w[_SIG[i], i, 1, 1] = 1.0
        w[_NEG[i], i, 1, 1] = -1.0
    dec.conv_in.bias[_CONST] = _C
    _linear_out(dec.conv_norm_out, dec.conv_out, _SIG, range(3))
    return vae


def _linear_out(norm, conv, src, dst):
    # GroupNorm(1 group) over n channels where one holds _C and the signal cancels in the mean:
    # mean = _C/n, std ~= _C*sqrt(n-1)/n; weight=std undoes it, bias moves SiLU to its linear part.
    n = norm.weight.numel()
    mean, std = _C / n, _C * (n - 1) ** 0.5 / n
    for s in src:
        norm.weight[s] = std
        norm.bias[s] = _BIAS
    w = conv.weight
    for d, s in zip(dst, src):
        w[d].zero_()
        w[:, s].zero_()
        w[d, s, 1, 1] = 1.0
        conv.bias[d] = mean - _BIAS


def train_vae(work: Path, steps: int, full_steps: int) -> dict:
    torch.manual_seed(0)
    # The VAE learns strokes from exact level-line sketches (cheap to draw); the adapter's
    # training sketches are also traced as `hairdiff prepare --seeding ridges` traces them.
    photos, sketches = portraits(N_TRAIN, TRAIN_SEED, work, "levels")
    photos_t, sketches_t = torch.from_numpy(photos), torch.from_numpy(sketches)
    held, held_sk = portraits(32, HELDOUT_SEED, work, "levels")
    held = torch.from_numpy(held)
    vae = linear_init(toy.build_toy_vae()).train()
    logger.info("vae linear start: held-out PSNR %.2f dB", psnr(reconstruct(vae.eval(), held), held))
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    total = steps + full_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(total):
        crop = step < steps
        bs = 8 if crop else 4
        # A quarter sketches: only the sketch's *encoding* matters to HairDiff, the photo's decoding.
        n_sk = bs // 4
        x = torch.cat(
            [
                photos_t[torch.randint(0, len(photos_t), (bs - n_sk,), generator=g)],
                sketches_t[torch.randint(0, len(sketches_t), (n_sk,), generator=g)],
            ]
        )
        if crop:  # random 64 px crops: 4x cheaper, the VAE is fully convolutional
            oy, ox = (int(v) for v in torch.randint(0, (SIZE - CROP) // 8 + 1, (2,), generator=g) * 8)
            x = x[..., oy : oy + CROP, ox : ox + CROP]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        x = x * 2 - 1
        post = vae.encode(x).latent_dist
        # The posterior mode, as HairDiffPipeline.encode uses it: a sampled latent blurs the decoder.
        y = vae.decode(post.mode()).sample
        rec = F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x)
        kl = post.kl().mean() / x[0].numel()
        loss = rec + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == total - 1:
            logger.info("vae step %d/%d rec %.5f kl %.3f (%.0fs)", step, total, rec.item(), kl.item(), time.time() - t0)
    vae.eval()
    figures = {
        "vae_psnr_heldout": psnr(reconstruct(vae, held), held),
        "vae_psnr_heldout_sketch": psnr(reconstruct(vae, torch.from_numpy(held_sk)), torch.from_numpy(held_sk)),
    }
    # SD3-style scale/shift measured on the training photos' latents (as SD3's were).
    with torch.no_grad():
        lat = torch.cat(
            [
                vae.encode(torch.from_numpy(photos[i : i + 32]) * 2 - 1).latent_dist.mode()
                for i in range(0, min(256, len(photos)), 32)
            ]
        )
    shift = float(lat.mean())
    scale = float(1.0 / (lat - shift).std())
    figures.update(scaling_factor=scale, shift_factor=shift, vae_seconds=time.time() - t0)
    logger.info("vae: %s", figures)
    meta = {
        "scaling_factor": repr(scale),
        "shift_factor": repr(shift),
        "psnr_heldout": f"{figures['vae_psnr_heldout']:.2f}",
    }
    toy.save_half(vae, work / toy.VAE_FILE, meta)
    return figures


# -- stage 2: the base transformer --------------------------------------------------------------
def train_base(work: Path, steps: int) -> dict:
    from hairdiff_core.method.flow import timestep_from_sigma
    from hairdiff_core.method.losses import sample_sigmas
    from hairdiff_core.models.text import zero_text
    from hairdiff_core.pipeline import HairDiffPipeline

    torch.manual_seed(0)
    vae = _load_work_vae(work)
    photos, _ = portraits(N_TRAIN, TRAIN_SEED, work, "levels")  # photos only: the cheap sketch style
    photos = torch.from_numpy(photos)
    photos = torch.cat([photos, photos.flip(-1)])  # mirrored portraits are portraits too
    pipe = HairDiffPipeline(toy.build_toy_transformer(), vae)  # for encode(): scale/shift in one place
    with torch.no_grad():
        latents = torch.cat([pipe.encode(photos[i : i + 64]) for i in range(0, len(photos), 64)])
    model = toy.build_toy_transformer().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    g = torch.Generator().manual_seed(1)
    bs = 16
    embeds, pooled = zero_text(model, bs)
    t0 = time.time()
    curve = []
    for step in range(steps):
        x0 = latents[torch.randint(0, len(latents), (bs,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        sigma = sample_sigmas(bs, "logit_normal", generator=g)
        s = sigma.view(-1, 1, 1, 1)
        x = (1 - s) * x0 + s * noise
        v = model(
            hidden_states=x,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=timestep_from_sigma(sigma, bs),
        ).sample
        loss = F.mse_loss(v.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            logger.info(
                "base step %d/%d loss %.4f (avg100 %.4f, %.0fs)",
                step,
                steps,
                loss.item(),
                float(np.mean(curve[-100:])),
                time.time() - t0,
            )
    model.eval()
    toy.save_half(model, work / toy.TRANSFORMER_FILE, {"trained_steps": str(steps)})
    return {
        "base_loss_first100": float(np.mean(curve[:100])),
        "base_loss_last100": float(np.mean(curve[-100:])),
        "base_seconds": time.time() - t0,
    }


def _load_work_vae(work: Path):
    from safetensors import safe_open

    with safe_open(str(work / toy.VAE_FILE), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    return toy.build_toy_vae(state, float(meta["scaling_factor"]), float(meta["shift_factor"]))


# -- stage 3: the adapter, by hairdiff train ------------------------------------------------------
def write_dataset(root: Path, arrays: dict, prefix: str = "p") -> Path:
    """The training layout (img/, matte/, sketch/, params.json) from ``portrait_arrays``; the
    same files ``make_portrait_dataset`` writes, without drawing the portraits again."""
    from PIL import Image

    for kind in ("img", "matte", "sketch"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    table_path = root / "params.json"
    table = json.loads(table_path.read_text()) if table_path.is_file() else {}
    for i, params in enumerate(arrays["params"]):
        stem = f"{prefix}{i:04d}"
        Image.fromarray(arrays["photo"][i]).save(root / "img" / f"{stem}.png")
        Image.fromarray(arrays["matte"][i], mode="L").save(root / "matte" / f"{stem}.png")
        Image.fromarray(arrays["sketch"][i]).save(root / "sketch" / f"{stem}.png")
        table[stem] = params
    (root / "params.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
    return root


def training_dataset(data: Path, work: Path, n: int | None = None) -> Path:
    """The adapter's dataset: each portrait twice, with the sketch ``hairdiff prepare --seeding
    ridges`` would trace from it (stems p*) and with exact level lines of its strand field, one on
    each bright stripe (stems l*: long clean strokes, closer to what people draw)."""
    n = n or N_TRAIN
    if not (data / "params.json").is_file():
        write_dataset(data, portrait_arrays(n, TRAIN_SEED, work, "levels"), prefix="l")
        write_dataset(data, portrait_arrays(n, TRAIN_SEED, work, "strands"), prefix="p")
    return data


def train_adapter(work: Path, steps: int) -> dict:
    from training.config import resolve_config
    from training.trainer import train

    data = training_dataset(work / "data", work)
    out = work / "adapter_run"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    with toy.asset_override(work):
        config = resolve_config(
            {**ADAPTER_TRAIN, "toy": True, "data": str(data), "output": str(out), "max_steps": steps}
        )
        t0 = time.time()
        result = train(config)
    import shutil

    shutil.copyfile(result.adapter, work / toy.ADAPTER_FILE)
    return {"adapter_seconds": time.time() - t0, "adapter_last": result.last}


def write_demo_assets(folder: Path) -> None:
    """The demo's photo (diagonal old hair), matte and two sketches (horizontal, vertical wavy
    strands): both 45 degrees from the old hair, 90 from each other."""
    from PIL import Image

    from training.synthetic import hair_matte, render_portrait, strand_sketch

    rng = np.random.default_rng(HELDOUT_SEED + 99)
    params = {
        **sample_hair_params(rng, SIZE),
        "angle": math.pi / 4,
        "curl": 0.0,
        "stroke_colour": False,
        "blobs": [[0.38 * SIZE, 0.5 * SIZE, 0.28 * SIZE, 0.32 * SIZE, 2.2]],
    }
    matte = hair_matte(params)
    sketch_a = strand_sketch({**params, "angle": 0.0}, matte)
    sketch_b = strand_sketch({**params, "angle": math.pi / 2, "curl": 0.3}, matte)
    to8 = lambda a: (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to8(render_portrait(params, matte))).save(folder / "demo_photo.png")
    Image.fromarray(to8(matte.astype(np.float32)), mode="L").save(folder / "demo_matte.png")
    Image.fromarray(to8(sketch_a)).save(folder / "demo_sketch_a.png")
    Image.fromarray(to8(sketch_b)).save(folder / "demo_sketch_b.png")


def main(argv=None) -> int:
    global N_TRAIN
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "build" / "toy"), help="stage outputs (default build/toy)")
    p.add_argument("--stages", default="vae,base,adapter")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-full-steps", type=int, default=150)
    p.add_argument("--base-steps", type=int, default=3000)
    p.add_argument("--adapter-steps", type=int, default=ADAPTER_STEPS)
    p.add_argument("--install", action="store_true", help="copy the results into hairdiff_core/assets/toy/")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: on a shared CPU more threads mostly wait)"
    )
    p.add_argument("--n-train", type=int, default=N_TRAIN, help=f"training portraits (default {N_TRAIN})")
    args = p.parse_args(argv)
    N_TRAIN = args.n_train
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    figures = {}
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if "vae" in stages:
        figures.update(train_vae(work, args.vae_steps, args.vae_full_steps))
    if "base" in stages:
        figures.update(train_base(work, args.base_steps))
    if "adapter" in stages:
        figures.update(train_adapter(work, args.adapter_steps))
    (work / f"figures_{'_'.join(stages)}.json").write_text(json.dumps(figures, indent=1, default=str))
    print(json.dumps(figures, default=str))
    if args.install:
        import shutil

        for name in (toy.VAE_FILE, toy.TRANSFORMER_FILE, toy.ADAPTER_FILE):
            if (work / name).is_file():
                shutil.copyfile(work / name, toy.asset_dir() / name)
        write_demo_assets(toy.asset_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
