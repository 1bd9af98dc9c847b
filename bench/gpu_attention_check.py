"""GPU: the reference-attention kernels of one SD3.5 Large block, float-bias SDPA vs grouped vs folded.

On CUDA, ``scaled_dot_product_attention`` with a float mask cannot use the flash kernel; the
grouped kernel (``attention_kernel="grouped"``: one bias-free SDPA per key group, merged by
log-sum-exp) and the folded kernel (``attention_kernel="folded"``: the biases carried in 8
extra head dimensions, one bias-free SDPA call) can. This times all three at Large dimensions (38 heads of 64, 4,096 image tokens + 333
text tokens, the visible reference keys of a ~25% head-top matte, bf16), batch 1 and CFG batch 2,
for the generation attention (``once``/``per_step``) and the hair-blind reference pass, and checks
that the kernels agree. Kernel time only (captured calls replayed, CUDA events, medians); the
projections around them are the same for both. Target: bias / fused >= 1.5, fused = the faster of grouped and folded.

Without CUDA it prints ``{"skipped": ...}`` and exits 0 (bench/run_all.py lists it as skipped).
``--cpu-dry-run`` runs the same code on the CPU at a small size in fp32 (2 heads, 256 px, 16
text tokens; wall-clock medians instead of CUDA events): wiring and agreement only, no figures.

    python bench/gpu_attention_check.py [--repeats 20] [--model large] [--budget none|pool2]
    python bench/gpu_attention_check.py --cpu-dry-run
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

SHORT_ARGS = ["--repeats", "5"]
TARGETS = {"large_bias_over_fused": {"min": 1.5}}
#: Float-bias SDPA; per-group flash calls merged by log-sum-exp; biases folded into extra head dims.
KERNELS = ("bias", "grouped", "folded")


class _CpuEvent:
    """``torch.cuda.Event``'s timing interface on the CPU (the dry run)."""

    def __init__(self, enable_timing: bool = True):
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _CpuEvent) -> float:
        return (end.t - self.t) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--model", default="large", choices=("large", "medium"))
    p.add_argument("--budget", default="none", choices=("none", "pool2"))
    p.add_argument("--text-tokens", type=int, default=333)
    p.add_argument("--cpu-dry-run", action="store_true", help="small fp32 attention on the CPU: wiring only")
    args = p.parse_args(argv)
    import torch

    dry = args.cpu_dry_run
    if not torch.cuda.is_available() and not dry:
        print(
            json.dumps(
                {
                    "bench": "gpu_attention_check",
                    "skipped": "no CUDA device: run this on a GPU machine",
                    "torch": torch.__version__,
                    "targets": TARGETS,
                }
            )
        )
        return 0

    from bench_block import _capture, head_top_matte, load_transformer_config
    from diffusers.models.attention_processor import Attention

    import hairdiff_core.method.reference as R
    from hairdiff_core.method import mask as M

    cfg = load_transformer_config(args.model)
    heads, hd = cfg["num_attention_heads"], cfg["attention_head_dim"]
    side = 1024
    if dry:
        dev, dtype = torch.device("cpu"), torch.float32
        heads, side, args.text_tokens, args.repeats = 2, 256, 16, min(args.repeats, 2)
        sync, Event, peak_mb = (lambda: None), _CpuEvent, (lambda: None)
    else:
        dev, dtype = torch.device("cuda"), torch.bfloat16
        sync, Event = torch.cuda.synchronize, torch.cuda.Event

        def peak_mb():
            return round(torch.cuda.max_memory_allocated() / 2**20, 1)

    dim = heads * hd
    tokens_hw = (side // 16, side // 16)
    L = tokens_hw[0] * tokens_hw[1]
    token_mask = M.token_grid(M.soft_mask(head_top_matte(side)))
    proc = R.ReferenceAttnProcessor()
    attn = (
        Attention(
            query_dim=dim,
            added_kv_proj_dim=dim,
            dim_head=hd,
            heads=heads,
            out_dim=dim,
            context_pre_only=False,
            bias=True,
            processor=proc,
            qk_norm=cfg.get("qk_norm"),
            eps=1e-6,
        )
        .to(dev, dtype)
        .eval()
    )
    g = torch.Generator(device=dev).manual_seed(0)
    hid = {b: torch.randn(b, L, dim, generator=g, device=dev, dtype=dtype) for b in (1, 2)}
    enc = {b: torch.randn(b, args.text_tokens, dim, generator=g, device=dev, dtype=dtype) for b in (1, 2)}
    ref_hidden = torch.randn(1, L, dim, generator=g, device=dev, dtype=dtype)
    extra = {"key_pool": 2} if args.budget == "pool2" else {}

    def time_replay(fn) -> float:
        fn()
        sync()
        times = []
        for _ in range(args.repeats):
            start, end = Event(enable_timing=True), Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            sync()
            times.append(start.elapsed_time(end) / 1000)
        return statistics.median(times)

    result = {
        "bench": "gpu_attention_check",
        "device": "cpu (dry run: wiring only, no figures)" if dry else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "model": args.model,
        "budget": args.budget,
        "dtype": "fp32" if dry else "bf16",
        "heads": heads,
        "image_tokens": L,
        "text_tokens": args.text_tokens,
    }
    outs = {}
    with torch.no_grad():
        off = {b: _capture(R, lambda b=b: attn(hidden_states=hid[b], encoder_hidden_states=enc[b])) for b in (1, 2)}
        for b in (1, 2):
            result[f"off_b{b}_ms"] = round(time_replay(off[b]) * 1e3, 3)
        for kernel in KERNELS:
            s = R.ReferenceSettings(mode="once", attention_kernel=kernel, **extra)
            gating = R.ReferenceGating(s, token_mask, tokens_hw)
            cache = R.ReferenceCache()
            ref_state = R.ReferencePassState(cache, gating, True)
            ref = _capture(
                R, lambda: attn(hidden_states=ref_hidden, encoder_hidden_states=enc[1], hairdiff_reference=ref_state)
            )
            result[f"ref_{kernel}_ms"] = round(time_replay(ref) * 1e3, 3)
            gen_state = R.GenerationPassState(cache, gating, True)
            for b in (1, 2):
                outs[(kernel, b)] = attn(
                    hidden_states=hid[b], encoder_hidden_states=enc[b], hairdiff_reference=gen_state
                )[0]
                gen = _capture(
                    R,
                    lambda b=b: attn(hidden_states=hid[b], encoder_hidden_states=enc[b], hairdiff_reference=gen_state),
                )
                result[f"once_{kernel}_b{b}_ms"] = round(time_replay(gen) * 1e3, 3)
            result["stored_keys"] = gating.kept
            result[f"{kernel}_peak_mb"] = peak_mb()
    for b in (1, 2):
        result[f"max_abs_diff_b{b}"] = float((outs[("grouped", b)].float() - outs[("bias", b)].float()).abs().max())
        result[f"max_abs_diff_folded_b{b}"] = float(
            (outs[("folded", b)].float() - outs[("bias", b)].float()).abs().max()
        )
    # Same result either way: exact up to fp32 rounding, or bf16's (outputs are O(1)).
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    result["kernels_agree"] = max(v for k, v in result.items() if k.startswith("max_abs_diff")) <= tolerance
    result[f"{args.model}_bias_over_grouped"] = round(result["once_bias_b1_ms"] / result["once_grouped_b1_ms"], 3)
    result[f"{args.model}_bias_over_grouped_cfg"] = round(result["once_bias_b2_ms"] / result["once_grouped_b2_ms"], 3)
    result[f"{args.model}_grouped_once_over_off"] = round(result["once_grouped_b1_ms"] / result["off_b1_ms"], 3)
    result[f"{args.model}_bias_over_folded"] = round(result["once_bias_b1_ms"] / result["once_folded_b1_ms"], 3)
    result[f"{args.model}_bias_over_folded_cfg"] = round(result["once_bias_b2_ms"] / result["once_folded_b2_ms"], 3)
    result[f"{args.model}_folded_once_over_off"] = round(result["once_folded_b1_ms"] / result["off_b1_ms"], 3)
    # The fused path is whichever of the two bias-free kernels is faster here (auto picks grouped
    # on CUDA until a GPU run says otherwise).
    result[f"{args.model}_bias_over_fused"] = max(
        result[f"{args.model}_bias_over_grouped"], result[f"{args.model}_bias_over_folded"]
    )
    if dry:  # agreement is all a dry run shows; its times are not the kernels the target is about
        result = {k: v for k, v in result.items() if not k.startswith(args.model)}
    else:
        result["targets"] = TARGETS
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
