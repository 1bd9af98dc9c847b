"""Integration: a real ComfyUI server on 127.0.0.1 with this pack in custom_nodes/, every API workflow run.

Skipped unless COMFYUI_DIR points at a ComfyUI checkout (CI cannot fetch ComfyUI). The server
runs with ``--cpu`` from ``COMFYUI_PYTHON`` (default: this interpreter) in a throwaway base
directory (custom_nodes/hairdiff -> this repo, models/, input/, output/), so nothing is written
into the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(
    not COMFY or not (Path(COMFY) / "main.py").is_file(),
    reason="set COMFYUI_DIR to a ComfyUI checkout to run the server integration test",
)
HAIRDIFF_NODES = {
    "HairDiff_LoadModel",
    "HairDiff_LoRA",
    "HairDiff_SketchPreprocess",
    "HairDiff_HairMatte",
    "HairDiff_ReferenceAttention",
    "HairDiff_Sampler",
}
TINY_WORKFLOWS = ["hairdiff_basic", "hairdiff_reference_attention", "hairdiff_matte_from_sketch"]
ASSETS = ROOT / "hairdiff_core" / "assets"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "hairdiff").symlink_to(ROOT, target_is_directory=True)
    for sub in ("models/loras", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = open(base / "comfyui.log", "w")
    cmd = [
        os.environ.get("COMFYUI_PYTHON", sys.executable),
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base),
        "--database-url",
        "sqlite:///:memory:",
        "--disable-auto-launch",
    ]
    proc = subprocess.Popen(cmd, cwd=COMFY, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{(base / 'comfyui.log').read_text()[-3000:]}")
            try:
                _get(url + "/system_stats")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("ComfyUI did not start within 240 s")
                time.sleep(1)
        yield {"url": url, "base": base, "log": base / "comfyui.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _run(server, name: str, out: Path, sets=(), graph=None):
    from hairdiff_cli import comfy_client as C

    client = C.ComfyClient(server["url"])
    graph = graph or C.load_workflow(ROOT / "workflows" / "api" / f"{name}.json")
    roles = C.role_nodes(graph)
    uploaded = {role: client.upload_image(ASSETS / f"sample_{role}.png") for role in roles}
    graph = C.prepare_graph(graph, uploaded, ["HairDiff Sampler.steps=2", *sets])
    ws = client.open_progress()
    try:
        pid = client.submit(graph)
        entry = C.follow(client, pid, ws, timeout=600)
    finally:
        if ws is not None:
            ws.close()
    failure = C.execution_error(entry)
    assert failure is None, failure + "\n" + server["log"].read_text()[-3000:]
    return C.save_outputs(client, entry, out)


def test_object_info_lists_every_hairdiff_node_and_core_table_is_current(server):
    info = _get(server["url"] + "/object_info")
    assert HAIRDIFF_NODES <= set(info)
    for nid in HAIRDIFF_NODES:
        assert info[nid]["category"].startswith("HairDiff/") and info[nid]["description"]
    core = json.loads((ROOT / "tests" / "nodes" / "core_nodes.json").read_text())
    for kind, spec in core.items():
        if kind.startswith("_"):
            continue
        real = info[kind]
        names = [n for sec in ("required", "optional") for n in real["input_order"].get(sec, [])]
        assert names == [i[0] for i in spec["inputs"]], kind
        assert real["output"] == spec["outputs"], kind


def test_templates_are_listed_without_the_api_twins(server):
    templates = _get(server["url"] + "/workflow_templates")
    assert sorted(templates.get("hairdiff", [])) == sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))


@pytest.mark.parametrize("name", TINY_WORKFLOWS)
def test_api_workflow_runs_end_to_end_with_the_tiny_model(server, name, tmp_path):
    from PIL import Image

    saved = _run(server, name, tmp_path)
    assert len(saved) == 1
    with Image.open(saved[0]) as im, Image.open(ASSETS / "sample_photo.png") as photo:
        assert im.size == photo.size


def test_lora_graph_runs_and_changes_the_result(server, tmp_path):
    import torch
    from safetensors.torch import save_file

    from hairdiff_cli import comfy_client as C
    from hairdiff_core.tiny import build_tiny_transformer

    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, mod in build_tiny_transformer().named_modules():
        if name.endswith(("attn.to_q", "attn.to_v")):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, mod.in_features, generator=g)
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 4, generator=g)
    save_file(sd, str(server["base"] / "models" / "loras" / "tiny_test_lora.safetensors"))
    graph = C.load_workflow(ROOT / "workflows" / "api" / "hairdiff_basic.json")
    graph["50"] = {
        "class_type": "HairDiff_LoRA",
        "inputs": {"model": ["5", 0], "lora_name": "loras/tiny_test_lora.safetensors", "strength": 1.0},
        "_meta": {"title": "HairDiff LoRA"},
    }
    graph["8"]["inputs"]["model"] = ["50", 0]
    with_lora = _run(server, "", tmp_path / "a", graph=graph, sets=["Save Image.filename_prefix=lora"])
    plain = _run(server, "hairdiff_basic", tmp_path / "b", sets=["Save Image.filename_prefix=plain"])
    assert with_lora[0].read_bytes() != plain[0].read_bytes()


def test_colour_prompt_workflow_fails_only_on_missing_model_files(server):
    from hairdiff_cli import comfy_client as C

    client = C.ComfyClient(server["url"])
    graph = C.load_workflow(ROOT / "workflows" / "api" / "hairdiff_colour_prompt.json")
    uploaded = {role: client.upload_image(ASSETS / f"sample_{role}.png") for role in C.role_nodes(graph)}
    graph = C.prepare_graph(graph, uploaded, [])
    with pytest.raises(C.ComfyServerError) as info:
        client.submit(graph)
    lines = [line for line in str(info.value).splitlines()[1:] if line.startswith("node")]
    # Every other node and link of the graph passed ComfyUI's validation; only the model files are absent.
    # (ComfyUI < 0.3.64 also checks the V1 combo lists of Triple CLIP Loader; later versions do not.)
    ours = [line for line in lines if line.startswith("node 5 (HairDiff_LoadModel")]
    clips = [line for line in lines if line.startswith("node 11 (TripleCLIPLoader") and "Value not in list" in line]
    assert ours and len(ours) + len(clips) == len(lines), str(info.value)
    assert "base_model 'checkpoints/sd3.5_medium.safetensors' is not in ComfyUI's model folders" in ours[0]


def test_validation_errors_are_readable_and_cli_runs(server, tmp_path, capsys):
    from hairdiff_cli import main

    wf = ROOT / "workflows" / "api" / "hairdiff_basic.json"
    args = [
        "comfy-run",
        "--server",
        server["url"],
        "--workflow",
        str(wf),
        "--image",
        str(ASSETS / "sample_photo.png"),
        "--sketch",
        str(ASSETS / "sample_sketch.png"),
        "--matte",
        str(ASSETS / "sample_matte.png"),
        "--out",
        str(tmp_path / "cli"),
    ]
    assert main(args + ["--set", "HairDiff Sampler.steps=0"]) == 2
    err = capsys.readouterr().err
    assert "node 8 (HairDiff_Sampler 'HairDiff Sampler') input 'steps'" in err and "smaller than min" in err
    assert main(args + ["--set", "HairDiff Sampler.steps=2"]) == 0
    assert len(list((tmp_path / "cli").glob("*.png"))) == 1
    shutil.rmtree(tmp_path / "cli")


def test_adapter_from_models_hairdiff_with_an_extra_lora(server, tmp_path):
    """The adapter's PEFT layers and a ComfyUI LoRA patch on their base weights, on the real ModelPatcher."""
    import torch
    from safetensors.torch import save_file

    from hairdiff_cli import comfy_client as C
    from hairdiff_core.adapter import save_adapter
    from hairdiff_core.lora import add_lora
    from hairdiff_core.surgery import widen_input_channels
    from hairdiff_core.tiny import build_tiny_transformer

    model = widen_input_channels(build_tiny_transformer())
    add_lora(model, rank=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    (server["base"] / "models" / "hairdiff").mkdir(parents=True, exist_ok=True)
    save_adapter(model, server["base"] / "models" / "hairdiff" / "tiny_adapter.safetensors")
    lin = model.transformer_blocks[0].attn.to_q.base_layer
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, lin.in_features, generator=g),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(lin.out_features, 2, generator=g),
        },
        str(server["base"] / "models" / "loras" / "on_adapter.safetensors"),
    )
    graph = C.load_workflow(ROOT / "workflows" / "api" / "hairdiff_basic.json")
    graph["5"]["inputs"]["adapter"] = "hairdiff/tiny_adapter.safetensors"
    adapted = _run(server, "", tmp_path / "a", graph=graph, sets=["Save Image.filename_prefix=adapted"])
    graph["50"] = {
        "class_type": "HairDiff_LoRA",
        "inputs": {"model": ["5", 0], "lora_name": "loras/on_adapter.safetensors", "strength": 1.0},
        "_meta": {"title": "HairDiff LoRA"},
    }
    graph["8"]["inputs"]["model"] = ["50", 0]
    both = _run(server, "", tmp_path / "b", graph=graph, sets=["Save Image.filename_prefix=both"])
    assert adapted[0].read_bytes() != both[0].read_bytes()


def test_cancel_during_sampling_stops_it_and_the_next_run_works(server, tmp_path):
    from hairdiff_cli import comfy_client as C

    # Reference: a separate model object (device=cpu is the same weights on this CPU-only server).
    clean = _run(
        server,
        "hairdiff_reference_attention",
        tmp_path / "before",
        sets=["Save Image.filename_prefix=cancel", "HairDiff Sampler.seed=77", "Load HairDiff Model.device=cpu"],
    )
    client = C.ComfyClient(server["url"])
    graph = C.load_workflow(ROOT / "workflows" / "api" / "hairdiff_reference_attention.json")
    uploaded = {role: client.upload_image(ASSETS / f"sample_{role}.png") for role in C.role_nodes(graph)}
    graph = C.prepare_graph(graph, uploaded, ["HairDiff Sampler.steps=200", "HairDiff Sampler.seed=99"])
    ws = client.open_progress()
    assert ws is not None, "ComfyUI's websocket should accept the client"
    try:
        pid = client.submit(graph)
        deadline = time.monotonic() + 300
        step = 0
        while step < 2 and time.monotonic() < deadline:
            msg = ws.recv_json(timeout=1.0)
            if msg and msg.get("type") == "progress" and msg["data"].get("node") == "8":
                step = msg["data"]["value"]
        assert step >= 2, "no sampler progress seen on the websocket"
        urllib.request.urlopen(
            urllib.request.Request(server["url"] + "/interrupt", data=b"", method="POST"), timeout=30
        )
        entry = C.follow(client, pid, None, timeout=120)
    finally:
        ws.close()
    assert C.execution_error(entry) == "the workflow was interrupted (Cancel)"
    # The cancelled model object (the cached loader output) came back clean: with a seed it never ran, it gives
    # exactly the reference model's image.
    after = _run(
        server,
        "hairdiff_reference_attention",
        tmp_path / "after",
        sets=["Save Image.filename_prefix=cancel", "HairDiff Sampler.seed=77"],
    )
    from PIL import Image, ImageChops

    with Image.open(after[0]) as a, Image.open(clean[0]) as b:
        assert ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None  # pixels identical
