"""Several processes on the CPU: ``accelerate launch --num_processes 2`` (torchrun workers, gloo).

One launch runs a small driver that calls the ``hairdiff`` entry point in both processes, as
``accelerate launch -m hairdiff_cli ...`` would: a 4-step training, a 2-step training resumed to
4, and ``hairdiff eval`` split over the two processes. (accelerate's ``--cpu`` launcher starts
several CPU processes only through MPI; ``--multi_gpu`` starts torchrun workers, and
``hairdiff train --cpu`` makes accelerate use gloo on the CPU.)
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

DRIVER = textwrap.dedent("""
    import sys
    import hairdiff_cli

    data, out = sys.argv[1], sys.argv[2]
    common = ["--data", data, "--tiny", "--resolution", "32", "--batch-size", "1", "--mixed-precision", "no",
              "--num-workers", "0", "--validate-every", "0", "--warmup-steps", "0", "--cpu", "--lr", "1e-3"]
    runs = [
        ["train", *common, "--output", out + "/full", "--max-steps", "4", "--checkpoint-every", "2"],
        ["train", *common, "--output", out + "/part", "--max-steps", "2", "--checkpoint-every", "2"],
        ["train", *common, "--output", out + "/part", "--max-steps", "4", "--checkpoint-every", "2", "--resume", "latest"],
        ["eval", "--data", data, "--out", out + "/eval", "--tiny", "--steps", "1", "--method", "joint",
         "--resolution", "32", "--no-images"],
    ]
    for argv in runs:
        code = hairdiff_cli.main(argv)
        if code:
            sys.exit(code)
""")


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher is not installed")
def test_accelerate_launch_two_processes_train_resume_and_eval(tmp_path, assert_same_output):
    from training.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "ds", n=5, size=32, braid=1)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29500 + os.getpid() % 2000),
        str(driver),
        str(data),
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "batch 1 x 2 process(es)" in log  # really two processes
    # The adapter is written once per run, by the main process only.
    assert log.count("saved the adapter") == 3
    full, part = tmp_path / "out" / "full", tmp_path / "out" / "part"
    for out in (full, part):
        assert (out / "hairdiff_adapter.safetensors").is_file()
        with open(out / "log.csv", newline="") as f:
            assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]  # one row per step, not per process
    # Resume across two processes replays the uninterrupted run.
    from safetensors.torch import load_file

    a, b = load_file(str(full / "hairdiff_adapter.safetensors")), load_file(str(part / "hairdiff_adapter.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert_same_output(a[key], b[key])
    # Eval split over the processes: every sample once in the merged report.
    with open(tmp_path / "out" / "eval" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["sample"] for r in rows] == [f"s{i:03d}" for i in range(5)]
    assert "process 1 of 2" in log
