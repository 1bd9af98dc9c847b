"""Regional compilation (``compiling.compile_blocks``) against eager, reference off and ``once``.

Mid-size random config of ``bench/_common.py`` (widened to 32 channels, 77 zero text tokens),
one transformer forward per call; the ``once`` side runs the generation forward with a stored
reference (HairDiff's processor installed, eager inside the compiled blocks). Reports the time
of the first compiled calls (compilation), the steady-state speedups, the number of graphs
after all modes ran, and whether a second round added any (recompilation). Prints one JSON line.

    python bench/bench_compile.py [--size 64] [--repeats 3] [--threads 1] [--backend inductor]
    python bench/bench_compile.py --device cuda --dtype bf16 --family sd3.5-large --layers 4 --size 128
    python bench/bench_compile.py --dtype bf16 --weights fp8_e4m3fn   # fp8 storage: see graph_breaks

``--family`` takes SD3.5's real block dimensions (random weights, ``--layers`` of its blocks: every
block is the same computation, so a few measure the per-block speedup); ``--size 128`` is 1024².
On CUDA each timing is synchronised.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import build_mid_transformer, threads_note  # noqa: E402

SHORT_ARGS = ["--size", "32", "--repeats", "2"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px, 1024 tokens)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--family", default="mid", help="mid (bench/_common) or a family key, e.g. sd3.5-large")
    p.add_argument("--layers", type=int, default=None, help="blocks of --family to keep (default: all)")
    p.add_argument("--weights", default="auto", help="weight storage (memory.WEIGHTS, e.g. fp8_e4m3fn); auto = --dtype")
    args = p.parse_args()
    import torch

    from hairdiff_core.method import mask as M
    from hairdiff_core.method.flow import timestep_from_sigma
    from hairdiff_core.method.reference import ReferenceSettings, reference_attention
    from hairdiff_core.method.surgery import widen_input_channels
    from hairdiff_core.models.compiling import compile_blocks

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.family == "mid":
        model = widen_input_channels(build_mid_transformer())
    else:
        from diffusers import SD3Transformer2DModel

        from hairdiff_core.models.memory import family_config

        config = family_config(args.family)
        if args.layers:
            config["num_layers"] = args.layers
            config["dual_attention_layers"] = tuple(
                i for i in config.get("dual_attention_layers") or () if i < args.layers
            )
        torch.manual_seed(0)
        with dev:
            model = SD3Transformer2DModel(**config)
    model = model.to(dev, dtype).eval().requires_grad_(False)
    if args.weights != "auto":
        from hairdiff_core.models.memory import apply_weights

        apply_weights(model, args.weights)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    n = args.size
    g = torch.Generator().manual_seed(0)
    x0, noise, sketch = (torch.randn(1, 16, n, n, generator=g).to(dev, dtype) for _ in range(3))
    binary = torch.zeros(1, 1, 8 * n, 8 * n)
    binary[..., 2 * n : 6 * n, 2 * n : 6 * n] = 1
    token_mask = M.token_grid(M.soft_mask(binary))
    text = torch.zeros(1, 77, model.config.joint_attention_dim, device=dev, dtype=dtype)
    pooled = torch.zeros(1, model.config.pooled_projection_dim, device=dev, dtype=dtype)
    inp = torch.cat([0.5 * x0 + 0.5 * noise, sketch], 1)
    t = timestep_from_sigma(0.5, 1).to(dev)

    def run(mode: str) -> float:
        with (
            torch.no_grad(),
            reference_attention(
                model,
                ReferenceSettings(mode=mode),
                reference_latent=x0,
                token_mask=token_mask,
                noise=noise,
                encoder_hidden_states=text,
                pooled_projections=pooled,
            ) as hook,
        ):
            kwargs = hook.step_kwargs(0.5, 0) or None  # the once pass runs here, outside the timing
            sync()
            t0 = time.perf_counter()
            model(
                hidden_states=inp,
                encoder_hidden_states=text,
                pooled_projections=pooled,
                timestep=t,
                joint_attention_kwargs=kwargs,
                return_dict=False,
            )
            sync()
            return time.perf_counter() - t0

    modes = ("off", "once")

    def timings() -> dict:
        times = {m: [] for m in modes}
        for _ in range(args.repeats):
            for m in modes:
                times[m].append(run(m))
        return {m: statistics.median(v) for m, v in times.items()}

    for m in modes:
        run(m)  # warm-up
    eager = timings()
    torch._dynamo.reset()
    compile_blocks(model, backend=args.backend)
    t0 = time.perf_counter()
    for m in modes:
        run(m)
    compile_s = time.perf_counter() - t0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = timings()
    recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    print(
        json.dumps(
            {
                "bench": "compile",
                "backend": args.backend,
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "dtype": args.dtype,
                "weights": args.weights,
                "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
                "model": args.family if args.layers is None else f"{args.family} ({args.layers} blocks)",
                "latent": n,
                "tokens": (n // 2) ** 2,
                "eager_s": {m: round(v, 4) for m, v in eager.items()},
                "compiled_s": {m: round(v, 4) for m, v in compiled.items()},
                "first_calls_s": round(compile_s, 1),
                "graphs": graphs,
                "graphs_added_after_first_calls": recompiled,
                "speedup_off": round(eager["off"] / compiled["off"], 3),
                "speedup_once": round(eager["once"] / compiled["once"], 3),
                "load_avg": [round(x, 2) for x in os.getloadavg()],
                "targets": {"graphs_added_after_first_calls": 0},
                **threads_note(),
            }
        )
    )


if __name__ == "__main__":
    main()
