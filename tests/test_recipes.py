"""The shipped training recipes (training/recipes/*.toml) parse, validate and say what they expect."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

from training.config import resolve_config

RECIPES = sorted((Path(__file__).resolve().parent.parent / "training" / "recipes").glob("*.toml"))


def test_the_three_recipes_are_shipped():
    assert {p.stem for p in RECIPES} >= {"sd35-large-1xa100", "sd35-large-8xa100", "sd35-medium-24gb"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_validates(recipe, tmp_path):
    # What a recipe leaves to the command line: the model, the data and the output folder.
    config = resolve_config(
        {"model": "/models/sd3.5", "data": str(tmp_path), "output": str(tmp_path / "out")}, str(recipe)
    )
    assert config.epochs == 20 and config.max_steps is None  # the source material's 20 epochs
    assert config.resolution == 1024 and config.crop == "bucket"
    assert 0 < config.matte_growth <= 1 and config.checkpoint_every_epoch
    assert config.oversample_from_epoch is None  # curriculum: the middle epoch when braid.txt exists
    assert config.gradient_checkpointing and config.mixed_precision == "bf16"
    raw = tomllib.loads(recipe.read_text(encoding="utf-8"))
    estimate = raw["estimate"]
    # Expected figures are there, and flagged as estimates until a GPU run measures them.
    assert estimate["measured"] is False and "estimate" in recipe.read_text().lower()
    assert estimate["peak_memory_gb"] > 0 and estimate["seconds_per_step"] > 0
    gpus = int(re.match(r"(\d+)x", estimate["gpus"]).group(1))
    vram = 80 if "80GB" in estimate["gpus"].replace(" ", "") else 24
    assert estimate["peak_memory_gb"] < vram
    # Every recipe optimises with the same effective batch, so runs on either set-up compare.
    assert config.batch_size * config.grad_accum * gpus == 16


# -- bench/gpu_train_check.py (its GPU run is a benchmark; these check its arithmetic and exit) --
def _gpu_check():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_train_check.py"
    spec = importlib.util.spec_from_file_location("gpu_train_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_flop_count_matches_torch_counter():
    from hairdiff_core.models.families import shipped_config

    bench = _gpu_check()
    # Medium's widths, 4 of its layers (2 with dual attention): the count is per layer.
    config = dict(shipped_config(bench.CONFIG_FILES["medium"]), num_layers=4, dual_attention_layers=[0, 1])
    analytic = bench.model_flops(config, 512, 384, 77)
    counted = bench.counted_forward_flops(config, 512, 384, 77)
    assert analytic["forward"] == pytest.approx(counted, rel=2e-3)  # adaLN's per-sample matmuls left out
    assert analytic["image_tokens"] == 32 * 24
    # Training (frozen base): linear layers x2, attention x3 of the forward.
    assert 2 * analytic["forward"] < analytic["step"] < 3 * analytic["forward"]


def test_gpu_check_without_cuda_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert _gpu_check().main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_check_dry_run_takes_the_trainers_own_step(capsys):
    # The same code path as on a GPU (the trainer's micro step and optimiser step, the recipe's
    # settings) on a tiny model: a change of the trainer's internals breaks it here, not on an A100.
    import json

    assert _gpu_check().main(["--cpu-dry-run", "--steps", "1", "--warmup", "0"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["device"] == "cpu" and row["recipe"] == "sd35-large-1xa100.toml"
