"""Training: trainable parameters, end-to-end run, outputs, exact resume, NaN stop, OOM advice, CLI.

Everything runs on the tiny model at 32 px on a synthetic dataset the tests write.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hairdiff_core.errors import NonFiniteError
from training import checkpoint as ckpt
from training.config import TrainConfig, resolve_config
from training.synthetic import make_synthetic_dataset

RES = 32
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions are dominated by thread start-up on a busy 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "ds", n=4, size=RES, braid=1)


def _config(dataset, output, **kw) -> TrainConfig:
    base = dict(
        data=str(dataset),
        output=str(output),
        tiny=True,
        resolution=RES,
        max_steps=4,
        batch_size=2,
        mixed_precision="no",
        num_workers=0,
        checkpoint_every=2,
        checkpoints_keep=2,
        validate_every=0,
        warmup_steps=0,
        oversample_from_epoch=2,
        oversample_factor=2,
        lr=1e-3,
    )
    base.update(kw)
    return resolve_config(base)


def _train(config, on_step=None):
    from training.trainer import train

    return train(config, on_step=on_step)


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
    """The uninterrupted 4-step reference run (2 epochs, oversampling from epoch 2), with validation."""
    out = tmp_path_factory.mktemp("full")
    # The training set doubles as the held-out set: this checks the wiring, not generalisation.
    result = _train(
        _config(
            dataset,
            out,
            validate_every=4,
            validation_samples=2,
            validation_steps=2,
            eval_data=str(dataset),
            eval_limit=2,
        )
    )
    return out, result


# -- trainable parameters -------------------------------------------------------------------
def test_only_intended_parameters_receive_gradients(tiny_transformer):
    from hairdiff_core.method.surgery import widen_input_channels
    from training.trainer import setup_trainable

    model = widen_input_channels(tiny_transformer.to(torch.bfloat16))
    cfg = TrainConfig(lora_targets=["to_q", "to_v"], rank=4)
    setup_trainable(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "pos_embed.proj.weight" in trainable and "pos_embed.proj.bias" not in trainable
    lora = trainable - {"pos_embed.proj.weight"}
    assert lora and all("lora_" in n and (".to_q." in n or ".to_v." in n) for n in lora)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, n  # LoRA and patch conv in fp32 over a bf16 base
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, 8, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(
            hidden_states=x,
            encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
            pooled_projections=torch.randn(1, 64, generator=g),
            timestep=torch.tensor([500.0]),
            return_dict=False,
        )[0]
    # LoRA B starts at zero, so it is B that gets the first non-zero gradients.
    out.float().square().mean().backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    w = model.pos_embed.proj.weight.grad
    assert torch.count_nonzero(w[:, :16]) == 0
    assert torch.count_nonzero(w[:, 16:]) > 0  # the zero-initialised sketch half can learn
    assert any(
        p.grad is not None and torch.count_nonzero(p.grad) > 0 for n, p in model.named_parameters() if "lora_B" in n
    )


def test_train_base_channels_opens_them(tiny_transformer):
    from hairdiff_core.method.surgery import widen_input_channels
    from training.trainer import setup_trainable

    model = widen_input_channels(tiny_transformer)
    setup_trainable(model, TrainConfig(train_base_channels=True, rank=2))
    assert model.pos_embed.proj.bias.requires_grad
    out = model(
        hidden_states=torch.randn(1, 32, 8, 8),
        encoder_hidden_states=torch.zeros(1, 3, 32),
        pooled_projections=torch.zeros(1, 64),
        timestep=torch.tensor([500.0]),
        return_dict=False,
    )[0]
    out.square().mean().backward()
    assert torch.count_nonzero(model.pos_embed.proj.weight.grad[:, :16]) > 0


# -- end to end -----------------------------------------------------------------------------
def test_end_to_end_outputs(full_run, tiny_transformer):
    out, result = full_run
    assert result.steps == 4 and result.adapter == out / "hairdiff_adapter.safetensors"
    assert result.adapter.is_file()
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert list(rows[0]) == ["step", "epoch", "total", "mse", "shape", "lr", "sigma"]
    for r in rows:
        assert float(r["total"]) == pytest.approx(float(r["mse"]) + 0.1 * float(r["shape"]), rel=1e-4)
        assert 0 < float(r["sigma"]) <= 1
    # Epoch 1: 4 samples / batch 2 = 2 steps; epoch 2 oversamples the braid: 5 items = 3 micro-batches.
    assert [int(r["epoch"]) for r in rows] == [1, 1, 2, 2]
    summary = (out / "epoch_summary.md").read_text()
    assert summary.splitlines()[0] == "| epoch | total | mse | shape |" and "| 1 |" in summary
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "samples" / "step-00000004.png").is_file()
    with open(out / "eval.csv", newline="") as f:
        evals = list(csv.DictReader(f))
    assert [int(r["step"]) for r in evals] == [4]
    assert {"joint/psnr_out", "joint/seam", "joint/sketch_chamfer"} <= set(evals[0])
    assert (out / "eval" / "step-00000004" / "metrics.csv").is_file()
    saved = json.loads((out / "config.json").read_text())
    assert saved["resolution"] == RES and saved["lambda_shape"] == 0.1
    steps = [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")]
    assert steps == [2, 4]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_sketch_channels_learn_base_channels_bit_identical(full_run, tiny_transformer):
    from safetensors.torch import load_file

    out, _ = full_run
    trained = load_file(str(out / "checkpoints" / "checkpoint-00000004" / "trainable.safetensors"))
    w = trained["pos_embed.proj.weight"]
    original = tiny_transformer.pos_embed.proj.weight
    assert torch.equal(w[:, :16], original.float())
    assert torch.count_nonzero(w[:, 16:]) > 0
    assert "pos_embed.proj.bias" not in trained


def test_adapter_loads_into_a_fresh_model(full_run, tiny_transformer):
    from safetensors.torch import load_file

    from hairdiff_core.models.adapter import load_adapter

    out, result = full_run
    meta = load_adapter(tiny_transformer, result.adapter)
    assert meta["step"] == 4 and meta["training"]["resolution"] == RES and meta["lora"]["rank"] == 16
    assert meta["base_channels_trained"] is False  # loaders keep their model's own image channels
    trained = load_file(str(out / "checkpoints" / "checkpoint-00000004" / "trainable.safetensors"))
    params = dict(tiny_transformer.named_parameters())
    assert torch.equal(params["pos_embed.proj.weight"].float(), trained["pos_embed.proj.weight"])
    lora = [k for k in trained if "lora_" in k]
    assert lora and all(torch.equal(params[k].float(), trained[k]) for k in lora)


def test_resume_is_exact(full_run, dataset, tmp_path):
    from safetensors.torch import load_file

    ref_out, _ = full_run
    _train(_config(dataset, tmp_path, max_steps=2))
    # A partial checkpoint left by a kill during writing must be ignored.
    partial = tmp_path / "checkpoints" / ".tmp-checkpoint-00000003"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"half")
    result = _train(_config(dataset, tmp_path, max_steps=4, resume="latest"))
    a = load_file(str(ref_out / "checkpoints" / "checkpoint-00000004" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "checkpoints" / "checkpoint-00000004" / "trainable.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    with open(tmp_path / "log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    with open(ref_out / "log.csv", newline="") as f1, open(tmp_path / "log.csv", newline="") as f2:
        for r1, r2 in zip(csv.DictReader(f1), csv.DictReader(f2)):
            assert float(r1["total"]) == pytest.approx(float(r2["total"]), rel=1e-5)
    assert result.epoch_rows[0]["epoch"] == 1


def test_resume_with_other_settings_is_refused(full_run, dataset, tmp_path):
    ref_out, _ = full_run
    cfg = _config(dataset, tmp_path, max_steps=6, rank=4, resume=str(ref_out / "checkpoints" / "checkpoint-00000004"))
    with pytest.raises(ckpt.CheckpointError, match="rank: checkpoint 16 vs now 4"):
        _train(cfg)


def test_fresh_run_into_a_used_output_is_refused(full_run, dataset):
    ref_out, _ = full_run
    with pytest.raises(ckpt.CheckpointError, match="already holds checkpoints.*--resume latest"):
        _train(_config(dataset, ref_out))


def test_nan_loss_stops_with_last_good_checkpoint(dataset, tmp_path):
    def poison(step, row, trainer):
        if step == 2:
            with torch.no_grad():
                next(p for n, p in trainer.state.transformer.named_parameters() if "lora_A" in n).fill_(float("nan"))

    with pytest.raises(NonFiniteError, match=r"step 3: the loss is NaN or infinite.*checkpoint-00000002 \(step 2\)"):
        _train(_config(dataset, tmp_path, max_steps=6), on_step=poison)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2]
    good = ckpt.read(tmp_path / "checkpoints" / "checkpoint-00000002")
    assert all(torch.isfinite(t).all() for t in good["trainable"].values())
    assert not (tmp_path / "hairdiff_adapter.safetensors").exists()


def test_out_of_memory_names_the_knobs(dataset, tmp_path, monkeypatch):
    from training import trainer as T

    def boom(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(T.Trainer, "_micro_step", boom)
    with pytest.raises(T.TrainingOutOfMemoryError) as info:
        _train(_config(dataset, tmp_path, max_steps=1))
    msg = str(info.value)
    for knob in ("--resolution", "--batch-size", "--gradient-checkpointing", "--adam-8bit"):
        assert knob in msg


def test_seed_mode_caches_photo_latents_and_uses_text_embeds(dataset, tmp_path):
    from safetensors.torch import save_file

    embeds = tmp_path / "text"
    embeds.mkdir()
    for stem in ("s000", "s002"):
        save_file(
            {"prompt_embeds": torch.randn(1, 7, 32), "pooled_prompt_embeds": torch.randn(1, 64)},
            str(embeds / f"{stem}.safetensors"),
        )
    out = tmp_path / "out"
    result = _train(
        _config(
            dataset,
            out,
            augment="seed",
            max_steps=2,
            grad_accum=2,
            batch_size=1,
            text_embeds=str(embeds),
            checkpoint_every=10,
        )
    )
    cached = sorted((out / "cache" / "latents").glob("*.safetensors"))
    assert len(cached) == 4 and all(f"_{RES}_" in p.name for p in cached)
    assert result.adapter.is_file()
    stamp = {p: p.stat().st_mtime_ns for p in cached}
    _train(
        _config(
            dataset, tmp_path / "out2", augment="seed", max_steps=1, cache_dir=str(out / "cache"), checkpoint_every=10
        )
    )
    assert {p: p.stat().st_mtime_ns for p in cached} == stamp  # reused, not recomputed


# -- epoch plan, schedule, config -----------------------------------------------------------
def test_curriculum_oversamples_braids_from_epoch_e():
    from training.trainer import EpochPlan

    plan = EpochPlan(10, [0, 1], seed=3, global_batch=4, from_epoch=3, factor=4)
    for epoch in (1, 2):
        assert sorted(plan.order(epoch)) == list(range(10))
    late = plan.order(3)
    assert late.count(0) == 4 and late.count(1) == 4 and late.count(5) == 1 and len(late) == 16
    assert plan.order(4) != plan.order(5) and plan.order(4) == EpochPlan(10, [0, 1], 3, 4, 3, 4).order(4)
    assert [len(b) for b in plan.batches(1)] == [4, 4, 2]
    padded = EpochPlan(10, [], seed=0, global_batch=4, from_epoch=None, factor=2, pad=True)
    assert [len(b) for b in padded.batches(1)] == [4, 4, 4]


def test_batches_never_mix_buckets_with_curriculum_and_shards():
    from training.trainer import EpochPlan

    buckets = [(64, 64)] * 5 + [(80, 48)] * 4 + [(48, 80)] * 3
    braid = [0, 6, 11]
    for pad, processes in ((False, 1), (True, 2)):
        b = 2
        plan = EpochPlan(
            12, braid, seed=7, global_batch=b * processes, from_epoch=2, factor=3, pad=pad, buckets=buckets
        )
        for epoch in (1, 2, 3):
            batches = plan.batches(epoch)
            for gb in batches:
                assert len({buckets[i] for i in gb}) == 1, gb
                if pad:  # every process gets an equal, non-empty shard of the one bucket
                    assert len(gb) == b * processes
            visited = [i for gb in batches for i in gb]
            if not pad:
                assert sorted(visited) == sorted(plan.order(epoch))  # nothing lost or repeated
            if epoch >= 2:
                assert visited.count(0) >= 3 and visited.count(11) >= 3  # braids oversampled
            # Deterministic per seed, different across seeds and epochs.
            again = EpochPlan(12, braid, 7, b * processes, 2, 3, pad=pad, buckets=buckets).batches(epoch)
            assert again == batches
        assert plan.batches(1) != plan.batches(3)
        assert EpochPlan(12, braid, 8, b * processes, 2, 3, pad=pad, buckets=buckets).batches(1) != plan.batches(1)
    # One bucket: exactly the plain plan's batches (centre-crop runs are unchanged).
    one = EpochPlan(10, [0], 3, 4, 2, 2, buckets=[(32, 32)] * 10)
    assert one.batches(2) == EpochPlan(10, [0], 3, 4, 2, 2).batches(2)


def test_curriculum_default_is_the_middle_when_braids_are_tagged():
    from training.trainer import DEFAULT_EPOCHS, default_oversample_from

    assert DEFAULT_EPOCHS == 20 and TrainConfig().epochs is None  # the published 20 epochs
    auto = TrainConfig()
    assert default_oversample_from(auto, braid_count=5, epochs=20) == 11
    assert default_oversample_from(auto, braid_count=0, epochs=20) is None
    assert default_oversample_from(TrainConfig(oversample_from_epoch=0), 5, 20) is None
    assert default_oversample_from(TrainConfig(oversample_from_epoch=4), 5, 20) == 4


def test_bucketed_training_batches_one_bucket_and_caches_per_bucket(tmp_path):
    """Mixed portrait/landscape data at 64 px: each micro-batch is one bucket (seed mode caches
    one latent per sample at its bucket's latent size); growth on, per-epoch adapters written."""
    from PIL import Image

    from training.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "mixed", n=4, size=64, braid=1)
    for kind in ("img", "matte", "sketch"):  # two portraits (3:5) by cropping
        for stem in ("s000", "s001"):
            path = root / kind / f"{stem}.png"
            with Image.open(path) as im:
                im.crop((12, 0, 52, 64)).save(path)
    seen = []

    def on_step(step, row, trainer):
        seen.append(trainer.last_batch_shape)

    from training import trainer as T

    original = T.Trainer._micro_step

    def spy(self, batch):
        self.last_batch_shape = tuple(batch["image"].shape[-2:])
        return original(self, batch)

    T.Trainer._micro_step = spy
    try:
        cfg = _config(
            root,
            tmp_path / "out",
            resolution=64,
            augment="seed",
            max_steps=None,
            epochs=2,
            checkpoint_every=100,
            checkpoint_every_epoch=True,
            matte_growth=1.0,
            oversample_from_epoch=0,
        )
        result = _train(cfg, on_step=on_step)
    finally:
        T.Trainer._micro_step = original
    assert set(seen) == {(64, 64), (80, 48)}  # batch 2: the two portraits, then the two squares
    assert result.steps == 4
    latents = sorted((tmp_path / "out" / "cache" / "latents").glob("*.safetensors"))
    assert len(latents) == 4 and sum("b80x48" in p.name for p in latents) == 2
    epochs = sorted(p.name for p in (tmp_path / "out" / "epochs").glob("*.safetensors"))
    assert epochs == ["hairdiff_adapter-epoch-001.safetensors", "hairdiff_adapter-epoch-002.safetensors"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "out" / "checkpoints")] == [2, 4]


def test_matte_growth_in_training_grows_the_loss_region_not_the_sketch(dataset, tmp_path, monkeypatch):
    """One step with growth always on vs off, same seed: the sketch the model sees is the same,
    the mask the loss counts is larger (and contains the other)."""
    from hairdiff_core.pipeline import HairDiffPipeline
    from training import trainer as T

    seen: dict[float, dict] = {}
    original_encode, original_latent_grid = HairDiffPipeline.encode, T.M.latent_grid

    for p in (0.0, 1.0):
        record = seen.setdefault(p, {"encoded": []})
        monkeypatch.setattr(
            HairDiffPipeline,
            "encode",
            lambda self, x, r=record: (r["encoded"].append(x.clone()), original_encode(self, x))[1],
        )
        monkeypatch.setattr(
            T.M, "latent_grid", lambda m, r=record: (r.setdefault("mask", m.clone()), original_latent_grid(m))[1]
        )
        _train(_config(dataset, tmp_path / f"p{p}", augment="seed", max_steps=1, matte_growth=p))
    # Seed mode: the photos are cached first; the step encodes the sketch last.
    assert torch.equal(seen[0.0]["encoded"][-1], seen[1.0]["encoded"][-1])
    off, on = seen[0.0]["mask"], seen[1.0]["mask"]
    assert float(on.sum()) > float(off.sum()) and bool((on >= off - 1e-6).all())


def test_lr_schedule():
    from training.trainer import lr_factor

    assert [lr_factor(s, 10, 4, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)
    assert lr_factor(0, 10, 0, "cosine") == 1.0 and lr_factor(10, 10, 0, "cosine") == pytest.approx(0.0)


def test_config_file_and_command_line(tmp_path):
    from hairdiff_core.errors import InputError

    f = tmp_path / "train.json"
    f.write_text(
        json.dumps(
            {"data": "d", "output": "o", "tiny": True, "lambda-shape": 0.5, "rank": 8, "lora_targets": "to_q,to_k"}
        )
    )
    cfg = resolve_config({"rank": 4, "lr": None}, str(f))
    assert (cfg.lambda_shape, cfg.rank, cfg.lr, cfg.lora_targets) == (0.5, 4, 1e-4, ["to_q", "to_k"])
    t = tmp_path / "train.toml"
    t.write_text('[train]\ndata = "d"\noutput = "o"\nmodel = "m"\nresolution = 512\n')
    assert resolve_config({}, str(t)).resolution == 512
    f.write_text(json.dumps({"data": "d", "output": "o", "tiny": True, "lamda_shape": 1}))
    with pytest.raises(InputError, match=r"unknown setting\(s\) \['lamda_shape'\]"):
        resolve_config({}, str(f))
    with pytest.raises(InputError, match="exactly one of --model PATH"):
        resolve_config({"data": "d", "output": "o"})
    with pytest.raises(InputError, match="not a multiple of 16"):
        resolve_config({"data": "d", "output": "o", "tiny": True, "resolution": 100})
    with pytest.raises(InputError, match="must end in .safetensors"):
        resolve_config({"data": "d", "output": "o", "tiny": True, "adapter_name": "adapter.pt"})


def test_checkpoint_commit_is_atomic_and_pruned(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        tmp = ckpt.begin(folder, step)
        ckpt.write_process_part(tmp, 0, torch.Generator().manual_seed(step))
        ckpt.write_main_part(
            tmp, {"w": torch.full((2,), float(step))}, {"state": {}, "param_groups": []}, {"step": step}
        )
        ckpt.commit(tmp, step, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [2, 3]
    ckpt.begin(folder, 4)  # a kill while writing step 4: never "latest"
    assert ckpt.resolve_resume("latest", folder).name == "checkpoint-00000003"
    tmp = ckpt.begin(folder, 3)  # rewriting an existing step swaps it in whole
    ckpt.write_process_part(tmp, 0, torch.Generator())
    ckpt.write_main_part(tmp, {"w": torch.zeros(2)}, {"state": {}, "param_groups": []}, {"step": 3})
    ckpt.commit(tmp, 3, keep=2)
    assert torch.equal(ckpt.read(folder / "checkpoint-00000003")["trainable"]["w"], torch.zeros(2))
    with pytest.raises(ckpt.CheckpointError, match="not a complete HairDiff checkpoint"):
        ckpt.resolve_resume(str(tmp_path), folder)


def test_rng_states_round_trip():
    import random

    import numpy as np

    g = torch.Generator().manual_seed(5)
    tensors, plain = ckpt.capture_rng(g)
    plain = json.loads(json.dumps(plain))
    a = (torch.rand(3, generator=g), torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng(g, tensors, plain)
    b = (torch.rand(3, generator=g), torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and (a[2] == b[2]).all() and a[3] == b[3]


# -- command line ---------------------------------------------------------------------------
def test_cli_refuses_bad_dataset_naming_samples(dataset, tmp_path, capsys):
    import shutil

    from hairdiff_cli import main

    bad = tmp_path / "bad"
    shutil.copytree(dataset, bad)
    (bad / "sketch" / "s001.png").unlink()
    rc = main(["train", "--data", str(bad), "--output", str(tmp_path / "o"), "--tiny", "--resolution", str(RES)])
    err = capsys.readouterr().err
    assert rc == 2 and "s001: no sketch file" in err and "--skip-bad" in err


def test_cli_subprocess_trains_with_skip_bad(dataset, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(dataset, bad)
    (bad / "matte" / "s003.png").unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "hairdiff_cli",
        "train",
        "--data",
        str(bad),
        "--output",
        str(tmp_path / "o"),
        "--tiny",
        "--resolution",
        str(RES),
        "--max-steps",
        "1",
        "--mixed-precision",
        "no",
        "--num-workers",
        "0",
        "--validate-every",
        "0",
        "--skip-bad",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped 1 bad sample(s)" in proc.stderr
    assert (tmp_path / "o" / "hairdiff_adapter.safetensors").is_file()


def test_new_settings_are_checked(tmp_path):
    from hairdiff_core.errors import InputError

    base = dict(data=str(tmp_path), output=str(tmp_path / "o"), tiny=True)
    with pytest.raises(InputError, match=r"--matte-growth is a probability in \[0, 1\], got 1.5"):
        resolve_config(dict(base, matte_growth=1.5))
    with pytest.raises(InputError, match=r"--crop 'middle'"):
        resolve_config(dict(base, crop="middle"))
    with pytest.raises(InputError, match="--oversample-from-epoch must be a whole number from 0 to"):
        resolve_config(dict(base, oversample_from_epoch=-1))
    assert resolve_config(dict(base, oversample_from_epoch=0)).oversample_from_epoch == 0


def test_resolution_beyond_the_position_embeddings_is_refused(dataset, tmp_path, capsys):
    """The tiny model covers 1536 px a side; 1216's buckets reach 1520 and 1232's 1728."""
    from hairdiff_cli import main

    rc = main(["train", "--data", str(dataset), "--output", str(tmp_path / "o"), "--tiny", "--resolution", "2048"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1, lines
    assert re.search(
        r"--resolution 2048: its bucket crops reach \d+ px .*1536 px.*use --resolution \d+ or less", lines[0]
    )
    assert not (tmp_path / "o" / "checkpoints").exists() or not any((tmp_path / "o" / "checkpoints").iterdir())
