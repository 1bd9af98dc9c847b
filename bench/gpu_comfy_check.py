"""GPU check: the pack's nodes inside ComfyUI's own memory management, on a card of --usable-gb.

What a user with a 12 GB card does: put Comfy-Org's ``sd3.5_large_fp8_scaled.safetensors`` in
``models/diffusion_models``, pick it in Load HairDiff Model (weights and offload ``auto``), add
Reference Attention (``once``) and run HairDiff Sampler at 1024² for 28 steps. This check does
exactly that with the real ComfyUI modules (``comfy.model_management``, ``comfy.model_patcher``,
``comfy.utils``' progress bar, ``folder_paths``) imported from ``--comfyui`` and started with
``--reserve-vram`` so that ComfyUI plans with only ``--usable-gb``; PyTorch is capped at the
same amount (``set_per_process_memory_fraction``), so a run that needs more fails with an
out-of-memory error instead of quietly using the rest of a big card.

The checkpoint is a random-initialised transformer of the family written in ComfyUI's
fp8-scaled layout (``tests/_fp8_util.py``: the ``scaled_fp8`` marker, float8 weights and a
``scale_weight`` per layer) or as a plain bf16 file. Its VAE is a stand-in that returns random
latents (ComfyUI loads and frees the VAE around the sampler; its memory is not the transformer's).
Each variant runs in its own process. Reported per variant: what ``auto`` chose, peak VRAM
(``max_memory_allocated``), the core's prediction, seconds per step (from ComfyUI's progress
hook, first step excluded: it also runs the reference pass), and the load time.

    python bench/gpu_comfy_check.py --comfyui /path/to/ComfyUI [--family sd3.5-large]
        [--usable-gb 12] [--file fp8_scaled|bf16] [--variants auto:auto,fp8_e4m3fn:blocks]
        [--steps 28] [--size 1024]
    python bench/gpu_comfy_check.py --comfyui /path/to/ComfyUI --cpu-dry-run   # wiring only

Targets (issue 14): SD3.5 Large runs with 12 GB usable (``--family sd3.5-large --usable-gb
12``), Medium with 8 (``--family sd3.5-medium --usable-gb 8``). The interpreter needs
ComfyUI's own imports (``comfy_api`` needs ``av``) besides the pack's. Without CUDA (and
without ``--cpu-dry-run``), or without ``--comfyui``/``COMFYUI_DIR``, it prints
``{"skipped": ...}`` and exits 0. ``--cpu-dry-run`` runs ComfyUI with ``--cpu`` on the tiny
family at 256 px for 2 steps. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _common import Meter, synthetic_edit  # noqa: E402

#: What bench/run_all.py passes (it skips without COMFYUI_DIR or CUDA).
SHORT_ARGS = ["--steps", "8"]
DEFAULT_VARIANTS = "auto:auto,fp8_e4m3fn:blocks"
TARGET_GB = {"sd3.5-large": 12.0, "sd3.5-medium": 8.0}
ALIAS = "hairdiff_pack"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_checkpoint(family: str, fmt: str, path: Path, device: str) -> dict:
    """A random transformer of ``family`` as a ComfyUI single file (``fp8_scaled`` or ``bf16``)."""
    import torch

    random_transformer = _load(HERE / "gpu_memory_check.py", "gpu_memory_check").random_transformer
    fp8 = _load(ROOT / "tests" / "_fp8_util.py", "_fp8_util")
    t0 = time.perf_counter()
    model = random_transformer(family, device)
    if fmt == "fp8_scaled":
        fp8.write_fp8_checkpoint(model, path, dtype=torch.float8_e4m3fn, scaled=True, marker=True)
    else:
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        save_file(fp8.diffusers_to_original_sd3(state), str(path))
    return {
        "file": path.name,
        "file_gb": round(path.stat().st_size / 2**30, 3),
        "write_s": round(time.perf_counter() - t0, 1),
    }


def _start_comfyui(comfyui: str, base: Path, reserve_gb: float | None, cpu: bool) -> None:
    """Import ComfyUI's modules as its main.py would: its argument parser sees these flags."""
    sys.path.insert(0, comfyui)
    argv = ["main.py", "--base-directory", str(base)]
    if reserve_gb is not None:
        argv += ["--reserve-vram", f"{reserve_gb:.3f}"]
    if cpu:
        argv += ["--cpu"]
    sys.argv = argv
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses sys.argv now)
    import folder_paths  # noqa: F401  (reads --base-directory)


def _import_pack():
    """The pack as ComfyUI loads it: a package whose path is the repo root (relative imports)."""
    pack = types.ModuleType(ALIAS)
    pack.__path__ = [str(ROOT)]
    sys.modules[ALIAS] = pack
    return importlib.import_module(f"{ALIAS}.nodes")


def child(args) -> dict:
    import torch

    cpu = args.cpu_dry_run
    base = Path(args.base)
    reserve = None
    ctx_bytes = 0
    if not cpu:
        torch.cuda.init()
        free0, total = torch.cuda.mem_get_info()
        ctx_bytes = total - free0  # the CUDA context (and anything else on the card)
        usable = args.usable_gb * 2**30
        # A card of ``usable`` bytes: ComfyUI sees total - reserve; PyTorch may allocate what the
        # context leaves of it.
        reserve = (total - usable) / 2**30
        torch.cuda.set_per_process_memory_fraction(max(0.01, (usable - ctx_bytes) / total))
    _start_comfyui(args.comfyui, base, reserve, cpu)
    import comfy.model_management as mm
    import comfy.utils

    nodes = _import_pack()
    from hairdiff_pack.hairdiff_core.memory import weights_of

    stamps: list[float] = []
    meter = Meter(torch.device("cpu" if cpu else "cuda"))

    def hook(value, total, preview, node_id=None, **kw):
        meter.sync()
        stamps.append(time.perf_counter())

    comfy.utils.set_progress_bar_global_hook(hook)
    weights, offload = args.variant.split(":")
    t0 = time.perf_counter()
    model = nodes.LoadHairDiffModel.execute(
        base_model=f"diffusion_models/{args.file_name}", adapter="none", weights=weights, offload=offload
    )[0]
    model = nodes.HairDiffReferenceAttention.execute(model=model, mode="once")[0]
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)

    class RandomVAE:
        """ComfyUI's VAE interface (BHWC pixels in, raw latents out), with random latents."""

        def encode(self, pixels):
            return torch.randn(pixels.shape[0], 16, pixels.shape[1] // 8, pixels.shape[2] // 8, generator=g)

        def decode(self, latent):
            return torch.zeros(latent.shape[0], latent.shape[2] * 8, latent.shape[3] * 8, 3)

    photo, sketch, matte = synthetic_edit(args.size, comfy_layout=True)
    meter.reset()
    t1 = time.perf_counter()
    out = nodes.HairDiffSampler.execute(
        model=model, photo=photo, sketch=sketch, matte=matte, steps=args.steps, seed=0, vae=RandomVAE()
    )
    sample_s = time.perf_counter() - t1
    image = out[0]
    if len(stamps) < args.steps or not torch.isfinite(image).all():
        raise RuntimeError(f"the sampler reported {len(stamps)} of {args.steps} steps or a non-finite image")
    per_step = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    est = nodes.sampler_node.memory_estimate(model, photo.movedim(-1, 1), 1.0)
    row = {
        "variant": args.variant,
        "chosen_weights": weights_of(model.transformer),
        "chosen_offload": model.offload,
        "comfyui_reserve_gb": None if reserve is None else round(reserve, 2),
        "comfyui_free_gb": round((mm.get_free_memory(mm.get_torch_device()) - mm.extra_reserved_memory()) / 2**30, 2),
        "predicted_gb": round(est.total / 2**30, 3),
        "s_per_step": round(per_step, 4),
        "load_s": round(load_s, 1),
        "sample_s": round(sample_s, 1),
    }
    if not cpu:
        row["peak_gb"] = meter.peak_gb()
        row["peak_with_context_gb"] = round((meter.peak_bytes() + ctx_bytes) / 2**30, 3)
        row["fits"] = row["peak_with_context_gb"] <= args.usable_gb
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--comfyui", default=os.environ.get("COMFYUI_DIR"), help="a ComfyUI checkout (default: $COMFYUI_DIR)"
    )
    p.add_argument("--family", default="sd3.5-large", choices=("sd3.5-large", "sd3.5-medium", "sd3-medium", "tiny"))
    p.add_argument("--usable-gb", type=float, default=None, help="the card to act as (default: the family's target)")
    p.add_argument("--file", default="fp8_scaled", choices=("fp8_scaled", "bf16"), help="checkpoint format to write")
    p.add_argument(
        "--variants", default=DEFAULT_VARIANTS, help="comma-separated weights:offload for Load HairDiff Model"
    )
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--cpu-dry-run", action="store_true", help="ComfyUI --cpu, tiny family, 256 px, 2 steps")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--file-name", help=argparse.SUPPRESS)
    p.add_argument("--device-for-write", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    from hairdiff_core.memory import OFFLOADS, WEIGHTS

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        w, _, o = v.partition(":")
        if w not in WEIGHTS or o not in OFFLOADS:
            p.error(f"--variants: {v!r} is not weights:offload with weights in {WEIGHTS} and offload in {OFFLOADS}")
    if args.cpu_dry_run:
        args.family, args.size, args.steps = "tiny", 256, 2
    if args.usable_gb is None:
        args.usable_gb = TARGET_GB.get(args.family, 12.0)
    if args.write:
        print(
            json.dumps(
                write_checkpoint(
                    args.family,
                    args.file,
                    Path(args.base) / "models" / "diffusion_models" / args.file_name,
                    args.device_for_write,
                )
            )
        )
        return 0
    if args.child:
        print(json.dumps(child(args)))
        return 0
    skipped = None
    if not args.comfyui or not (Path(args.comfyui) / "comfy" / "model_management.py").is_file():
        skipped = "no ComfyUI checkout: pass --comfyui DIR or set COMFYUI_DIR"
    elif not args.cpu_dry_run and not torch.cuda.is_available():
        skipped = "no CUDA device: run this on a GPU machine (or --cpu-dry-run)"
    if skipped:
        print(json.dumps({"bench": "gpu_comfy_check", "skipped": skipped, "targets": {}}))
        return 0

    with tempfile.TemporaryDirectory(prefix="gpu_comfy_check_") as tmp:
        base = Path(tmp)
        (base / "models" / "diffusion_models").mkdir(parents=True)
        name = f"random_{args.family.replace('.', '')}_{args.file}.safetensors"
        common = [
            "--family", args.family, "--file", args.file, "--steps", str(args.steps), "--size", str(args.size),
            "--usable-gb", str(args.usable_gb), "--base", str(base), "--file-name", name, "--comfyui", args.comfyui,
        ]  # fmt: skip
        if args.cpu_dry_run:
            common.append("--cpu-dry-run")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        # The file is written in a process of its own, so the variants start on an empty card.
        write_device = "cpu" if args.cpu_dry_run else "cuda"
        out = subprocess.run(
            [sys.executable, __file__, "--write", *common, "--device-for-write", write_device],
            capture_output=True,
            text=True,
            env=env,
        )
        if out.returncode != 0:
            print(json.dumps({"bench": "gpu_comfy_check", "error": out.stderr.strip().splitlines()[-3:]}))
            return 1
        written = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(written), file=sys.stderr, flush=True)
        rows = []
        for v in variants:
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--variant", v, *common], capture_output=True, text=True, env=env
            )
            if out.returncode != 0:
                rows.append({"variant": v, "error": out.stderr.strip().splitlines()[-3:]})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {
        "bench": "gpu_comfy_check",
        "family": args.family,
        "size": args.size,
        "steps": args.steps,
        "usable_gb": args.usable_gb,
        "device": "cpu (dry run: wiring only, no figures)" if args.cpu_dry_run else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "checkpoint": written,
        "rows": rows,
    }
    if not args.cpu_dry_run:
        result[f"{args.family.replace('.', '').replace('-', '_')}_fits_{args.usable_gb:g}gb"] = all(
            r.get("fits") for r in rows
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
