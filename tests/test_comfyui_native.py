"""The native route inside a real ComfyUI, checked in-process by ``tests/comfyui_native_probe.py``.

Skipped unless COMFYUI_DIR points at a ComfyUI checkout (CI has none). The probe runs once with
COMFYUI_PYTHON (default: this interpreter) and reports figures; each test asserts one fact. The
HTTP side (the graph through /prompt, --lowvram, Cancel) is in test_comfyui_server.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(
    not COMFY or not (Path(COMFY) / "main.py").is_file(),
    reason="set COMFYUI_DIR to a ComfyUI checkout to run the native-route checks",
)
#: ComfyUI's MMDiT and diffusers' SD3 transformer are two float32 implementations of the same
#: maths (other attention kernels and summation orders): ~1e-6 apart per call here, through 8
#: steps and the VAE 5e-6 in pixels. The bounds leave room for other CPUs' kernels (AVX2 vs 512).
IMAGE_TOLERANCE = 1e-4
LATENT_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    work = tmp_path_factory.mktemp("native_probe")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    run = subprocess.run(
        [python, str(ROOT / "tests" / "comfyui_native_probe.py"), str(work)],
        env={**os.environ, "COMFYUI_DIR": COMFY},
        capture_output=True,
        text=True,
        timeout=900,
    )
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, run.stdout[-2000:] + run.stderr[-4000:]
    out = json.loads(line[len("PROBE ") :])
    crashed = {k: v for k, v in out.items() if k.endswith("_crashed")}
    assert not crashed, "\n".join(crashed.values())
    return out


def test_toy_native_equals_the_cli_route(probe):
    assert probe["toy_image_max_diff"] <= IMAGE_TOLERANCE
    assert probe["toy_latent_max_diff"] <= LATENT_TOLERANCE
    assert probe["toy_inside_changed"] > 0.1  # hair was drawn
    assert probe["toy_one_node_equals_advanced"]


def test_toy_native_keeps_the_photo_outside_the_matte_bit_for_bit(probe):
    assert probe["toy_outside_exact"] and probe["toy_outside_pixels"] > 1000


def test_the_incoming_model_is_unchanged(probe):
    assert probe["toy_base_patches"] == 0
    assert probe["toy_base_weights_unchanged"]


def test_cancel_then_the_same_run_gives_the_same_latent(probe):
    assert probe["toy_cancel_raised"] and probe["toy_after_cancel_equal"]


def test_zero_sketch_channels_and_strength_zero_sample_exactly_like_the_base(probe):
    assert probe["zero_channels_max_diff"] == 0.0
    assert probe["strength_0_max_diff"] == 0.0
    assert probe["trained_differs_from_base"] > 0.01


@pytest.mark.parametrize("dtype", ["default", "fp8_e4m3fn"])
def test_load_diffusion_model_then_apply_adapter_samples(probe, dtype):
    assert probe[f"small_{dtype}_detected"] == "SD3"
    assert probe[f"small_{dtype}_finite"]
    assert probe[f"small_{dtype}_outside_max_diff"] <= 1e-6  # x0 exactly, up to the raw<->scaled round trip
    assert probe[f"small_{dtype}_inside_changed"] > 0.1


def test_an_adapter_of_another_family_names_both_sides(probe):
    msg = probe["family_mismatch_error"]
    assert msg and "HairDiff Apply Adapter" in msg and "HairDiff toy" in msg and "connected MODEL" in msg


@pytest.mark.parametrize(
    "key, words",
    [
        ("error_not_sd3", ("input 'model'", "SD3", "Load Diffusion Model")),
        ("error_no_adapter", ("input 'model'", "HairDiff Apply Adapter")),
        ("error_no_sketch", ("input 'positive'", "HairDiff Sketch Conditioning")),
        ("error_no_sketch_euler", ("HairDiff Apply Adapter", "HairDiff Sketch Conditioning")),
        ("error_no_mask", ("input 'latent_image'", "HairDiff Sketch Conditioning")),
        ("error_twice", ("already has a HairDiff adapter",)),
        ("error_text_width", ("input 'positive'", "4096 wide", "takes 32")),
    ],
)
def test_miswired_graphs_are_node_errors(probe, key, words):
    msg = probe[key]
    assert msg and msg != "TRACEBACK" and "\n" not in msg
    for w in words:
        assert w in msg, msg
