"""One SD3.5 block at its real dimensions: what reference attention costs at true scale.

Every SD3.5 block is the same computation, so one block at real dimensions measures the real
per-layer ratio on this machine. For SD3.5 Large (38 joint blocks, hidden 2,432) and Medium (24
blocks, hidden 1,536; blocks 0-12 also carry the image self-attention ``attn2``), at 1024 px
(4,096 image tokens) with ``--text-tokens`` text tokens (333 = SD3's CLIP 77 + T5 256, what
ComfyUI's SD3 text encoders give; HairDiff's zero text is 77), random weights, one forward of
one block with HairDiff's processor installed:

- ``off``: no reference (the stock computation);
- ``once``: the generation with the reference K/V as ``once`` stores them: only visible keys
  (the matte is a realistic head-top region of ~25% of the image, soft-masked and dilated as the
  defaults do), with and without the key budget (``key_pool=2``, ``key_ring=R``, both);
- ``ref``: the hair-blind reference pass itself (stores the K/V; its last block stops once its
  K/V are stored, as the real pass does, and is timed as such: ``ref_last``);
- each with CFG (generation batch 2, reference batch 1) too; ``once`` also with the grouped
  kernel (what CUDA uses; on the CPU it is a check of its cost, not the default).

Whole-model ratios are predicted from the block costs: a step costs the parts outside the blocks
(measured on the same model with 0 blocks: patch embedding, time/text embedding, final norm and
projection) plus layers x block; ``once`` adds one reference pass per sampling call (over
``--steps`` steps), ``per_step`` one per step. Memory: cache bytes (layers x stored K/V) and
bias bytes (one mask shared by all layers), and an upper bound of the peak ratio that counts
only the weights (bf16) as the plain model's peak: activations would make it smaller.

What is timed: the full block (all heads) without reference, batch 1 and 2; and for every
variant only its attention kernels (the SDPA or grouped-kernel calls the processor makes,
captured once and replayed), on a copy of the block's attention with ``--core-heads`` heads,
scaled to all heads (heads are independent). The rest of a block (projections, norms,
modulation, feed-forward) is the same computation for every variant, so a variant's block
costs the plain block + (its kernels - the plain kernels). This keeps a run of both models
near 10 minutes on 2 busy cores.

Timing: ``--core-repeats`` rounds of the attention kernels (cheap; their differences are a few
percent) and ``--repeats`` rounds of the full blocks, variants in rotating order, medians (and
all times). The
machine may be shared: the load average at start and end is in the JSON. Prints one JSON line.

    python bench/bench_block.py [--models large,medium] [--repeats 2] [--threads 2] [--dtype bf16]
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

from _common import threads_note  # noqa: E402

#: What bench/run_all.py passes for a short run.
SHORT_ARGS = ["--repeats", "2", "--models", "large"]

TARGETS = {
    "large_once_over_off_budget": 1.10,
    "large_per_step_over_off": 2.05,
    "large_per_step_over_off_budget": 2.05,
    "large_mem_once_over_off": 1.05,
    "large_mem_once_over_off_budget": 1.05,
}


def load_transformer_config(name: str) -> dict:
    from hairdiff_core.models.families import transformer_config

    return transformer_config(f"sd3.5-{name}")


def head_top_matte(side: int):
    """A (1, 1, side, side) binary matte: an ellipse over the top of a head, ~25% of the area."""
    import torch

    y, x = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    hair = (((x / 0.62) ** 2 + ((y + 0.25) / 0.55) ** 2) <= 1.0) & (y < 0.15)
    return hair.float()[None, None]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="large,medium")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timing rounds (1 takes ~5 min idle, ~10 min on a busy 2-core machine; 2 doubles the timing part)",
    )
    p.add_argument("--core-repeats", type=int, default=7, help="timing rounds of the attention kernels (cheap, noisy)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--dtype",
        default="bf16",
        choices=("bf16", "fp32"),
        help="bf16 (default: ~1.75x faster than fp32 on this AVX512-BF16 CPU) or fp32",
    )
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (1024 = 4,096 tokens)")
    p.add_argument("--text-tokens", type=int, default=333)
    p.add_argument("--steps", type=int, default=28, help="sampling steps a once-pass is amortised over")
    p.add_argument(
        "--ring", default="4,8", help="key_ring widths of the ring budget variants (tokens, comma-separated)"
    )
    p.add_argument(
        "--core-heads",
        type=int,
        default=8,
        help="attention heads the attention cores are timed on, scaled to all heads (0 = all)",
    )
    p.add_argument("--grouped", action="store_true", help="also time the grouped kernel (CUDA's) on this CPU")
    args = p.parse_args()

    import torch
    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.attention_processor import Attention

    import hairdiff_core.method.reference as R
    from hairdiff_core.method import mask as M
    from hairdiff_core.method.reference import (
        GenerationPassState,
        ReferenceAttnProcessor,
        ReferenceCache,
        ReferenceGating,
        ReferencePassState,
        ReferenceSettings,
    )

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    side = args.size
    tokens_hw = (side // 16, side // 16)
    L = tokens_hw[0] * tokens_hw[1]
    soft = M.soft_mask(head_top_matte(side))
    token_mask = M.token_grid(soft)
    rings = sorted({int(r) for r in str(args.ring).split(",") if r.strip()}, reverse=True)
    if not rings or min(rings) < 1:
        p.error(f"--ring takes ring widths >= 1 in tokens, e.g. 8 or 4,8; got {args.ring!r}")
    budgets = {"none": {}, "pool2": {"key_pool": 2}}
    for r in rings:
        budgets[f"ring{r}"] = {"key_ring": r}
    for r in rings:
        budgets[f"pool2_ring{r}"] = {"key_pool": 2, "key_ring": r}
    result: dict = {
        "bench": "block",
        "dtype": args.dtype,
        "image_tokens": L,
        "text_tokens": args.text_tokens,
        "steps": args.steps,
        "matte_token_share": round(float(token_mask.mean()), 3),
    }
    g = torch.Generator().manual_seed(0)

    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        cfg = load_transformer_config(name)
        heads, hd = cfg["num_attention_heads"], cfg["attention_head_dim"]
        dim = heads * hd
        n_layers = cfg["num_layers"]
        n_dual = len(cfg.get("dual_attention_layers") or ())
        kinds = {"dual": n_dual, "joint": n_layers - n_dual} if n_dual else {"joint": n_layers}
        kinds = {k: v for k, v in kinds.items() if v}

        # ---- the parts outside the blocks: the same model with no blocks
        outside_cfg = dict(cfg, num_layers=0, in_channels=32)
        torch.manual_seed(0)
        outer = SD3Transformer2DModel(**outside_cfg).to(dtype).eval()
        lat = side // 8

        def outer_fwd(batch):
            with torch.no_grad():
                outer(
                    hidden_states=torch.randn(batch, 32, lat, lat, dtype=dtype),
                    encoder_hidden_states=torch.randn(batch, args.text_tokens, cfg["joint_attention_dim"], dtype=dtype),
                    pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], dtype=dtype),
                    timestep=torch.full((batch,), 500.0, dtype=dtype),
                    return_dict=False,
                )

        outer_fwd(1)
        outside = {
            b: statistics.median([_timed(lambda: outer_fwd(b)) for _ in range(max(1, args.repeats))]) for b in (1, 2)
        }
        with torch.device("meta"):
            n_params = sum(p.numel() for p in SD3Transformer2DModel(**dict(cfg, in_channels=32)).parameters())
        del outer

        model_out = {
            "layers": n_layers,
            "attn2_layers": n_dual,
            "hidden": dim,
            "outside_s": {str(b): round(t, 4) for b, t in outside.items()},
            "params": n_params,
        }
        blocks_times = {}
        mem = {}
        for kind, count in kinds.items():
            dual = kind == "dual"
            torch.manual_seed(1)
            # The full block (all heads) for the plain cost; a block with ``core_heads`` heads for
            # the attention cores (heads are independent: cost x heads / core_heads).
            block = (
                JointTransformerBlock(
                    dim, heads, hd, context_pre_only=False, qk_norm=cfg.get("qk_norm"), use_dual_attention=dual
                )
                .to(dtype)
                .eval()
            )
            ch = min(args.core_heads or heads, heads)
            proc = ReferenceAttnProcessor()
            # As JointTransformerBlock builds them, with ``ch`` heads (its out_dim would force all).
            core_attn = (
                Attention(
                    query_dim=dim,
                    added_kv_proj_dim=dim,
                    dim_head=hd,
                    heads=ch,
                    context_pre_only=False,
                    bias=True,
                    processor=proc,
                    qk_norm=cfg.get("qk_norm"),
                    eps=1e-6,
                )
                .to(dtype)
                .eval()
            )
            core_attn2 = (
                Attention(
                    query_dim=dim,
                    dim_head=hd,
                    heads=ch,
                    bias=True,
                    processor=proc,
                    qk_norm=cfg.get("qk_norm"),
                    eps=1e-6,
                )
                .to(dtype)
                .eval()
                if dual
                else None
            )
            if core_attn.heads != ch:
                raise RuntimeError(f"core attention has {core_attn.heads} heads, wanted {ch}")
            block.attn.set_processor(proc)
            if dual:
                block.attn2.set_processor(proc)
            hid = {b: torch.randn(b, L, dim, generator=g).to(dtype) for b in (1, 2)}
            enc = {b: torch.randn(b, args.text_tokens, dim, generator=g).to(dtype) for b in (1, 2)}
            temb = {b: torch.randn(b, dim, generator=g).to(dtype) for b in (1, 2)}
            ref_hidden = torch.randn(1, L, dim, generator=g).to(dtype)

            def fwd(batch):
                with torch.no_grad():
                    block(hid[batch], enc[batch], temb[batch])

            def ref_last():
                """The reference pass's last block: it stops once its K/V are stored (the
                processor raises after the last participating module), so its attention output
                and feed-forward are never computed."""
                state = ReferencePassState(ReferenceCache(), g_last, True, expected=1)
                try:
                    with torch.no_grad():
                        block(ref_hidden, enc[1], temb[1], joint_attention_kwargs={"hairdiff_reference": state})
                except R._ReferenceComplete:
                    return
                raise RuntimeError("the reference pass did not stop after the last K/V")

            g_last = ReferenceGating(ReferenceSettings(mode="once"), token_mask, tokens_hw)

            def attention(batch, state=None, hidden=None):
                """The attention calls of one block forward (joint attention, attn2 on dual blocks)."""
                x = hid[batch] if hidden is None else hidden
                kw = {"hairdiff_reference": state} if state is not None else {}
                with torch.no_grad():
                    core_attn(hidden_states=x, encoder_hidden_states=enc[batch], **kw)
                    if dual:
                        core_attn2(hidden_states=x, **kw)

            # Each variant's attention kernels are captured once and replayed for timing: the rest
            # of a block (projections, norms, feed-forward) is the same computation for every variant.
            cores = {}
            states = {}
            for bname, extra in budgets.items():
                for kernel in ("bias", "grouped") if bname == "none" and args.grouped else ("bias",):
                    s = ReferenceSettings(mode="once", attention_kernel=kernel, **extra)
                    gating = ReferenceGating(s, token_mask, tokens_hw)
                    cache = ReferenceCache()
                    attention(1, ReferencePassState(cache, gating, True), ref_hidden)
                    state = GenerationPassState(cache, gating, True)
                    tag = bname if kernel == "bias" else f"{bname}_grouped"
                    states[tag] = (gating, cache)
                    for b in (1, 2) if bname in ("none", "pool2") and kernel == "bias" else (1,):
                        cores[f"once_{tag}_b{b}"] = _capture(R, lambda b=b, st=state: attention(b, st))
            s_ref = ReferenceSettings(mode="once")
            g_ref = ReferenceGating(s_ref, token_mask, tokens_hw)
            cores["ref_b1"] = _capture(
                R, lambda: attention(1, ReferencePassState(ReferenceCache(), g_ref, True), ref_hidden)
            )
            cores["off_b1"] = _capture(R, lambda: attention(1))
            cores["off_b2"] = _capture(R, lambda: attention(2))
            variants = {f"core_{n}": c for n, c in cores.items()}
            variants["block_off_b1"] = lambda: fwd(1)
            variants["block_off_b2"] = lambda: fwd(2)
            if kind == "joint":  # the model's last block is a joint one
                variants["block_ref_last_b1"] = ref_last
            fwd(1)  # warm-up
            names = list(variants)
            times = {n: [] for n in names}
            # The attention kernels differ by a few percent and cost ~0.3 s: many rounds of them;
            # the full blocks (seconds each) only --repeats rounds.
            for r in range(max(args.repeats, args.core_repeats)):
                k = r % len(names)
                for n in names[k:] + names[:k]:
                    if r < (args.core_repeats if n.startswith("core_") else args.repeats):
                        times[n].append(_timed(variants[n]))
            scale = heads / ch
            med = {n: statistics.median(t) * (scale if n.startswith("core_") else 1.0) for n, t in times.items()}
            # block cost of a variant = the plain block + (its attention kernels - the plain ones)
            per_block = {n: med[f"block_off_b{n[-1]}"] + med[f"core_{n}"] - med[f"core_off_b{n[-1]}"] for n in cores}
            if "block_ref_last_b1" in med:
                per_block["ref_last_b1"] = med["block_ref_last_b1"]
            blocks_times[kind] = {
                "count": count,
                "core_heads": ch,
                "median_s": {n: round(v, 4) for n, v in per_block.items()},
                "measured_median_s": {n: round(v, 4) for n, v in med.items()},
                "all_s": {n: [round(x, 3) for x in t] for n, t in times.items()},
            }
            # Cache and bias sizes at the full head count: the core block stores ch/heads of it.
            mem[kind] = {
                tag: {
                    "cache_bytes_per_layer": int(cache.nbytes() * scale),
                    "bias_bytes": _bias_bytes(gating),
                    "stored_keys": gating.kept,
                }
                for tag, (gating, cache) in states.items()
            }
            del block, core_attn, core_attn2, states, variants, cores

        # ---- whole-model prediction
        def step(kind_key: str, batch: int) -> float:
            return outside[batch] + sum(
                bt["count"] * bt["median_s"][f"{kind_key}_b{batch}"] for bt in blocks_times.values()
            )

        # The reference pass stops after the last block's K/V (``_ReferenceComplete``): that block
        # costs its ``ref_last`` part; the final norm and projection (in ``outside``) are skipped
        # too, but counted here (they are small).
        ref_call = (
            outside[1]
            + sum(bt["count"] * bt["median_s"]["ref_b1"] for bt in blocks_times.values())
            - blocks_times["joint"]["median_s"]["ref_b1"]
            + blocks_times["joint"]["median_s"]["ref_last_b1"]
        )
        model_out["ref_call_over_step"] = round(ref_call / step("off", 1), 4)
        ratios = {}
        for tag in list(budgets) + (["none_grouped"] if args.grouped else []):
            for b in (1, 2) if tag in ("none", "pool2") else (1,):
                off = step("off", b)
                gen = step(f"once_{tag}", b)
                cfg_tag = "" if b == 1 else "_cfg"
                ratios[f"once_over_off_{tag}{cfg_tag}"] = round((args.steps * gen + ref_call) / (args.steps * off), 4)
                ratios[f"per_step_over_off_{tag}{cfg_tag}"] = round((gen + ref_call) / off, 4)
        weights = n_params * 2  # bf16, what users load
        for tag in budgets:
            cache_b = sum(bt["count"] * mem[k][tag]["cache_bytes_per_layer"] for k, bt in blocks_times.items())
            if dtype == torch.float32:
                cache_b //= 2  # the model runs in bf16: its cache is half the fp32 size
            bias_b = max(mem[k][tag]["bias_bytes"] for k in mem)
            model_out[f"cache_mb_{tag}"] = round(cache_b / 2**20, 1)
            model_out[f"bias_mb_{tag}"] = round(bias_b / 2**20, 1)
            model_out[f"stored_keys_{tag}"] = mem[next(iter(mem))][tag]["stored_keys"]
            model_out[f"mem_once_over_off_upper_{tag}"] = round((weights + cache_b + bias_b) / weights, 4)
        model_out["weights_mb_bf16"] = round(weights / 2**20, 1)
        model_out["blocks"] = blocks_times
        model_out.update(ratios)
        result[name] = model_out

    if "large" in result:
        lg = result["large"]
        budget_best = min((lg[f"once_over_off_{t}"], t) for t in budgets if t != "none")
        result["large_once_over_off"] = lg["once_over_off_none"]
        result["large_once_over_off_budget"] = budget_best[0]
        result["large_budget_of_best"] = budget_best[1]
        result["large_per_step_over_off"] = lg["per_step_over_off_none"]
        result["large_per_step_over_off_budget"] = lg[f"per_step_over_off_{budget_best[1]}"]
        result["large_mem_once_over_off"] = lg["mem_once_over_off_upper_none"]
        result["large_mem_once_over_off_budget"] = lg["mem_once_over_off_upper_pool2"]
    result["targets"] = TARGETS
    result["load_avg_start"] = [round(x, 2) for x in load_start]
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result.update(threads_note())
    print(json.dumps(result))


def _bias_bytes(gating) -> int:
    """Bytes of the generation biases one sampling call holds: one per attention kind (joint
    with text, attn2 without), at the largest batch built here (a run uses one batch size)."""
    per_kind = {}
    for k, t in gating._cache.items():
        if isinstance(k, tuple) and k[0] == "gen":
            per_kind[k[2]] = max(per_kind.get(k[2], 0), t.untyped_storage().nbytes())
    return sum(per_kind.values())


def _capture(R, run):
    """Run ``run`` once, recording the processor's attention kernel calls; return a replay."""
    import torch

    calls = []
    real_f, real_grouped = R.F, R.grouped_attention

    class _F:
        def __getattr__(self, name):
            return getattr(real_f, name)

        @staticmethod
        def scaled_dot_product_attention(*a, **kw):
            calls.append((real_f.scaled_dot_product_attention, a, kw))
            return real_f.scaled_dot_product_attention(*a, **kw)

    def grouped(*a, **kw):
        calls.append((real_grouped, a, kw))
        return real_grouped(*a, **kw)

    R.F, R.grouped_attention = _F(), grouped
    try:
        run()
    finally:
        R.F, R.grouped_attention = real_f, real_grouped

    def replay():
        with torch.no_grad():
            for fn, a, kw in calls:
                fn(*a, **kw)

    return replay


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
