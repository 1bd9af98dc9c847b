"""The GPU checks' CPU dry runs: the code a CUDA machine runs, on a tiny model here.

A device is lent rarely and briefly; a GPU check that breaks on a renamed argument wastes it. Each
``bench/gpu_*.py`` has a ``--cpu-dry-run`` that takes the same path (processes, pipeline call,
kernels, JSON) at a small size on the CPU; these tests run it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_memory_check_dry_run_runs_each_variant_in_its_own_process(capsys):
    bench = _bench("gpu_memory_check")
    assert bench.main(["--cpu-dry-run", "--variants", "bf16:none,fp8_e4m3fn:blocks"]) == 0
    result = _last_json(capsys)
    rows = result["rows"]
    assert [(r["weights"], r["offload"]) for r in rows] == [("bf16", "none"), ("fp8_e4m3fn", "blocks")]
    assert all("error" not in r for r in rows), rows
    assert all(r["s_per_step"] > 0 and r["predicted_gb"] > 0 for r in rows)
    assert "target_gb" not in result  # a dry run claims nothing about fitting a card


def test_memory_check_refuses_a_bad_variant_before_starting_anything():
    with pytest.raises(SystemExit):
        _bench("gpu_memory_check").main(["--cpu-dry-run", "--variants", "fp8:none"])


def test_memory_check_without_cuda_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert _bench("gpu_memory_check").main([]) == 2
    assert "no CUDA device" in _last_json(capsys)["error"]


def test_attention_check_dry_run_compares_both_kernels(capsys):
    assert _bench("gpu_attention_check").main(["--cpu-dry-run"]) == 0
    result = _last_json(capsys)
    assert result["kernels_agree"] is True
    assert result["max_abs_diff_b1"] < 1e-5 and result["max_abs_diff_b2"] < 1e-5
    assert result["stored_keys"] > 0
    assert not any("_bias_over_" in k for k in result)  # no ratio from a dry run
    assert result["max_abs_diff_folded_b1"] < 1e-5 and result["max_abs_diff_folded_b2"] < 1e-5
