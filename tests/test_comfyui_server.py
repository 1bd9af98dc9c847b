"""Integration: a real ComfyUI server on 127.0.0.1 with this pack in custom_nodes/.

Every template that needs no model files runs as shipped (API format, the sample inputs the pack
copies into ComfyUI's input folder, the built-in toy or tiny model); every UI-format template is checked against
the live /object_info (node types, sockets, links, widget values and their options and ranges).

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
import urllib.error
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
    "HairDiff_SketchPreprocess",
    "HairDiff_HairMatte",
    "HairDiff_Prompt",
    "HairDiff_LoadBuiltin",
    "HairDiff_ApplyAdapter",
    "HairDiff_SketchConditioning",
    "HairDiff_Stitch",
    "HairDiff_SoftMaskSampler",
    "HairDiff_Scheduler",
    "HairDiff_Sample",
    "HairDiff_ReferenceAttention",
}
ASSETS = ROOT / "hairdiff_core" / "assets"
TINY = "tiny (wiring check)"
TOY = "toy (synthetic portraits)"
#: Loaders of model files: a template with one needs files (its note says which).
FILE_LOADERS = ("CheckpointLoaderSimple", "UNETLoader", "TripleCLIPLoader")
#: The built-in models: no files needed.
BUILT_IN = (TINY, TOY)
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))
API_FILES = sorted((ROOT / "workflows" / "api").glob("*.json"))


def _api_twin(ui_name: str) -> Path:
    """The API file of a UI template (UI files are named for people; see build_workflows.card)."""
    data = json.loads((ROOT / "workflows" / f"{ui_name}.json").read_text())
    return ROOT / "workflows" / "api" / f"{data['extra']['hairdiff']['api']}.json"


#: Frontend-only node types (notes): never sent to the server, absent from /object_info.
UI_ONLY = set(json.loads((ROOT / "tools" / "comfy_standins" / "core_nodes.json").read_text())["_ui_only"])
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def _needs_model_files(graph: dict) -> bool:
    return any(n["class_type"] in FILE_LOADERS for n in graph.values())


#: Every template that needs no model files: they must run as shipped on a fresh install.
RUNNABLE = [p.stem for p in API_FILES if not _needs_model_files(json.loads(p.read_text()))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from _serve(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="module")
def lowvram_server(tmp_path_factory):
    """ComfyUI with its own low-VRAM streaming: the native route has no memory code of its own.
    (ComfyUI refuses --lowvram beside --cpu; without a GPU it runs on the CPU with the setting.)"""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    probe = subprocess.run(
        [python, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True
    )
    if probe.stdout.strip() != "True":
        pytest.skip("--lowvram needs a CUDA GPU (ComfyUI refuses it beside --cpu); bench/gpu_run.sh runs it")
    yield from _serve(tmp_path_factory.mktemp("comfy_lowvram"), "--lowvram")


def _serve(base: Path, memory: str = "--cpu"):
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "hairdiff").symlink_to(ROOT, target_is_directory=True)
    for sub in ("models/loras", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = open(base / "comfyui.log", "w")
    cmd = [
        os.environ.get("COMFYUI_PYTHON", sys.executable),
        "main.py",
        memory,
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
    """Upload the samples into the graph's Photo/Sketch/Matte nodes (as comfy-run does), run it with 2 steps."""
    from hairdiff_cli import comfy_client as C

    client = C.ComfyClient(server["url"])
    graph = graph or C.load_workflow(ROOT / "workflows" / "api" / f"{name}.json")
    roles = C.role_nodes(graph)
    uploaded = {role: client.upload_image(ASSETS / f"sample_{role}.png") for role in roles}
    return _submit(server, C.prepare_graph(graph, uploaded, ["HairDiff Scheduler.steps=2", *sets]), out)


def _submit(server, graph: dict, out: Path):
    from hairdiff_cli import comfy_client as C

    client = C.ComfyClient(server["url"])
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
    assert HAIRDIFF_NODES == {k for k in info if k.startswith("HairDiff_")}
    for nid in HAIRDIFF_NODES:
        assert info[nid]["category"].startswith("HairDiff/") and info[nid]["description"]
    # One way in ComfyUI: no node takes or gives a model of HairDiff's own.
    assert "HAIRDIFF_MODEL" not in json.dumps(info)
    core = json.loads((ROOT / "tools" / "comfy_standins" / "core_nodes.json").read_text())
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


def test_only_the_sd35_colour_prompt_template_needs_model_files():
    assert sorted({p.stem for p in API_FILES} - set(RUNNABLE)) == ["hairdiff_colour_prompt"]


def _photos(graph: dict, link: list) -> int:
    """How many pictures reach an IMAGE input: the Load Image nodes upstream of it (Image Batch adds them up)."""
    node = graph[link[0]]
    if node["class_type"] == "LoadImage":
        return 1
    return sum(_photos(graph, v) for v in node["inputs"].values() if isinstance(v, list))


@pytest.mark.parametrize("name", RUNNABLE)
def test_template_runs_as_shipped(server, name, tmp_path):
    """The API file exactly as shipped: the inputs the pack copied into ComfyUI's input folder, every
    setting (steps included) as in the file, the built-in model it names (toy, or tiny for the prompt try-out)."""
    from PIL import Image, ImageChops

    graph = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    sampler = next(n for n in graph.values() if n["class_type"] == "HairDiff_SketchConditioning")
    saved = _submit(server, graph, tmp_path)
    assert len(saved) == _photos(graph, sampler["inputs"]["photo"])
    for path in saved:
        with Image.open(path) as im, Image.open(ASSETS / "sample_photo.png") as photo:
            assert im.size == photo.size
            # Something was drawn: the hair region is not the photo's.
            assert ImageChops.difference(im.convert("RGB"), photo.convert("RGB")).getbbox() is not None
    matte = next(n for n in graph.values() if n["class_type"] == "HairDiff_HairMatte")
    if "exclude" in matte["inputs"]:
        _assert_face_kept(saved[0])


@pytest.mark.parametrize("name", RUNNABLE)
def test_template_runs_again_with_another_photo_uploaded(server, name, tmp_path):
    """Uploaded pictures in place of the shipped ones (as comfy-run and an artist do): another photo
    (the samples mirrored and cropped to another size, with their sketch, matte and protect picture
    made the same way) gives a picture of that photo's size, redrawn, the rest the photo's."""
    import numpy as np
    from PIL import Image, ImageOps

    from hairdiff_cli import comfy_client as C

    client = C.ComfyClient(server["url"])
    graph = C.load_workflow(ROOT / "workflows" / "api" / f"{name}.json")
    uploaded = {}
    for role in C.role_nodes(graph):
        with Image.open(ASSETS / f"sample_{'face_' if role == 'protect' else ''}{role}.png") as im:
            other = ImageOps.mirror(im).crop((0, 20, im.width, im.height))  # 300x352: another size
            other.save(tmp_path / f"other_{role}.png")
        uploaded[role] = client.upload_image(tmp_path / f"other_{role}.png")
    saved = _submit(server, C.prepare_graph(graph, uploaded, ["HairDiff Scheduler.steps=2"]), tmp_path / "out")
    with Image.open(saved[0]) as im, Image.open(tmp_path / "other_photo.png") as photo:
        got, src = np.asarray(im.convert("RGB")).astype(int), np.asarray(photo.convert("RGB")).astype(int)
    assert got.shape == src.shape
    changed = np.abs(got - src).max(-1) > 0
    assert 0.01 < changed.mean() < 0.95, changed.mean()  # hair redrawn, not the whole picture


def _assert_face_kept(path: Path) -> None:
    """The shipped Protect picture's transparent face (Load Image's MASK = 1 - alpha, straight into Hair
    Matte's exclude) is the photo's in the saved picture, but for the sampler's feathered seam: measured
    at this size, it reaches 8 px into the protected region (the face + 4 px), so the visible face's
    outer pixels change slightly (as shipped on the toy model up to 7/255, 96% within 1/255; on the
    tiny model up to 16/255, 91%), and deeper in it is the photo's (within 1/255)."""
    import numpy as np
    from PIL import Image

    from hairdiff_core.data.imageio import load_image
    from hairdiff_core.method.mask import dilate, protect_mask

    protected = protect_mask(load_image(ASSETS / "sample_face_protect.png"))
    visible = dilate(protected, -4)[0, 0].numpy() > 0.5  # the face without the protect margin
    deep = dilate(protected, -8)[0, 0].numpy() > 0.5
    assert visible.sum() > 12000
    with Image.open(path) as im, Image.open(ASSETS / "sample_photo.png") as photo:
        diff = np.abs(np.asarray(im.convert("RGB")).astype(np.int16) - np.asarray(photo.convert("RGB"))).max(-1)
    kept = diff[visible]
    assert kept.max() < 24 and (kept <= 1).mean() > 0.88, (int(kept.max()), float((kept <= 1).mean()))
    assert int(diff[deep].max()) <= 2, int(diff[deep].max())


def test_a_stroke_painted_on_protect_in_the_mask_editor_is_kept_too(server, tmp_path):
    """The mask editor saves the Protect picture with the painted stroke transparent as well; Load Image's
    MASK (1 - alpha) then holds the face and the stroke, and neither is redrawn. Without the stroke those
    hair pixels are redrawn (2 steps on the toy model)."""
    import numpy as np
    from PIL import Image

    from hairdiff_cli import comfy_client as C

    with Image.open(ASSETS / "sample_face_protect.png") as im:
        alpha = np.asarray(im.getchannel("A")).copy()
        alpha[40:80, :] = 0  # a band across the top of the hair
        painted = im.copy()
    painted.putalpha(Image.fromarray(alpha))
    painted.save(tmp_path / "painted_protect.png")
    with Image.open(ASSETS / "sample_photo.png") as photo:
        rgb = np.asarray(photo.convert("RGB")).astype(np.int16)
    client = C.ComfyClient(server["url"])
    graph = C.load_workflow(ROOT / "workflows" / "api" / "hairdiff_shorter_hair.json")
    samples = {"photo": "sample_photo.png", "sketch": "sample_sketch.png", "matte": "sample_matte.png"}
    inside = np.zeros(rgb.shape[:2], dtype=bool)
    inside[50:70, :] = True  # the band less the sampler's feathered seam
    diffs = {}
    for label, protect in (("shipped", None), ("painted", tmp_path / "painted_protect.png")):
        uploaded = {role: client.upload_image(ASSETS / f) for role, f in samples.items()}
        if protect is not None:
            uploaded["protect"] = client.upload_image(protect)
        run = C.prepare_graph(graph, uploaded, ["HairDiff Scheduler.steps=2", f"Save Image.filename_prefix={label}"])
        (saved,) = _submit(server, run, tmp_path / label)
        with Image.open(saved) as im:
            diffs[label] = np.abs(np.asarray(im.convert("RGB")).astype(np.int16) - rgb).max(-1)
        _assert_face_kept(saved)
    redrawn = inside & (diffs["shipped"] > 1)
    assert redrawn.sum() > 1000  # the shipped protect lets the band's hair be redrawn
    assert int(diffs["painted"][redrawn].max()) <= 1, int(diffs["painted"][redrawn].max())


def _real_inputs(spec: dict) -> list[tuple[str, str, dict]]:
    """(name, type, config) of a node's inputs in /object_info order; a V1 combo (a list of
    options as its type) comes back as COMBO with those options."""
    out = []
    for section in ("required", "optional"):
        for name in spec["input_order"].get(section, []):
            kind, *rest = spec["input"][section][name]
            cfg = dict(rest[0]) if rest else {}
            if isinstance(kind, list):
                kind, cfg["options"] = "COMBO", kind
            out.append((name, kind, cfg))
    return out


def _widget_problem(kind: str, cfg: dict, value) -> str | None:
    if kind == "COMBO":
        return None if value in cfg.get("options", []) else f"{value!r} is not one of {cfg.get('options')}"
    ok = {
        "INT": isinstance(value, int) and not isinstance(value, bool),
        "FLOAT": isinstance(value, (int, float)) and not isinstance(value, bool),
        "BOOLEAN": isinstance(value, bool),
        "STRING": isinstance(value, str),
    }[kind]
    if not ok:
        return f"{value!r} is not a {kind}"
    if kind in ("INT", "FLOAT") and not (cfg.get("min", value) <= value <= cfg.get("max", value)):
        return f"{value!r} is outside [{cfg.get('min')}, {cfg.get('max')}]"
    return None


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_template_matches_the_real_servers_node_definitions(server, path):
    """What the frontend does with a template, checked against the live /object_info: every node type
    exists, every socket and link has the server's type, and the widget values line up with the
    server's widgets (one extra value after a seed's control_after_generate and after an image upload
    combo) and are valid for them (combo options, ranges, types). A template that needs model files
    may name files this server does not have, nothing else."""
    info = _get(server["url"] + "/object_info")
    data = json.loads(path.read_text())
    needs_files = _needs_model_files(json.loads(_api_twin(path.stem).read_text()))
    nodes = {n["id"]: n for n in data["nodes"]}
    problems, missing_files = [], []
    for nid, n in nodes.items():
        if n["type"] in UI_ONLY:
            continue
        where = f"{path.name} node {nid} ({n['type']})"
        if n["type"] not in info:
            problems.append(f"{where}: not a node type of this server")
            continue
        spec = info[n["type"]]
        real = {name: (kind, cfg) for name, kind, cfg in _real_inputs(spec)}
        sockets = {x["name"] for x in n.get("inputs", [])}
        for x in n.get("inputs", []):
            if x["name"] not in real:
                problems.append(f"{where}: input {x['name']!r} does not exist on the server")
            elif x["type"] != real[x["name"]][0]:
                problems.append(f"{where}: input {x['name']!r} is {x['type']} here, {real[x['name']][0]} on the server")
        if [o["type"] for o in n.get("outputs", [])] != spec["output"][: len(n.get("outputs", []))]:
            problems.append(f"{where}: outputs {[o['type'] for o in n['outputs']]} vs the server's {spec['output']}")
        widgets = [
            (name, kind, cfg) for name, kind, cfg in _real_inputs(spec) if kind in WIDGETS and name not in sockets
        ]
        values = list(n.get("widgets_values", []))
        expected = sum(1 + bool(cfg.get("control_after_generate") or cfg.get("image_upload")) for _, _, cfg in widgets)
        if len(values) != expected:
            problems.append(f"{where}: {len(values)} widget values for the server's {expected}")
            continue
        pos = 0
        for name, kind, cfg in widgets:
            bad = _widget_problem(kind, cfg, values[pos])
            if bad and needs_files and kind == "COMBO" and str(values[pos]).endswith(".safetensors"):
                missing_files.append(values[pos])
            elif bad:
                problems.append(f"{where}.{name}: {bad}")
            if cfg.get("control_after_generate") and values[pos + 1] not in CONTROL_VALUES:
                problems.append(f"{where}.{name}: control value {values[pos + 1]!r}")
            pos += 1 + bool(cfg.get("control_after_generate") or cfg.get("image_upload"))
    for lid, src, slot, dst, dst_slot, kind in data["links"]:
        if nodes[src]["type"] not in info or nodes[dst]["type"] not in info:
            continue  # reported above
        out_type = info[nodes[src]["type"]]["output"][slot]
        in_name = nodes[dst]["inputs"][dst_slot]["name"]
        in_type = dict((name, k) for name, k, _ in _real_inputs(info[nodes[dst]["type"]])).get(in_name)
        if not kind == out_type == in_type:
            problems.append(f"{path.name} link {lid}: {kind} from {out_type} into {in_type}")
    assert not problems, "\n".join(problems)
    assert not missing_files or needs_files


def _with_lora(graph: dict, lora_name: str) -> dict:
    """ComfyUI's LoraLoaderModelOnly between HairDiff Apply Adapter (14) and the sampling nodes."""
    graph["50"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["14", 0], "lora_name": lora_name, "strength_model": 1.0},
        "_meta": {"title": "LoRA"},
    }
    for nid in ("19", "21"):  # CFG Guider, HairDiff Scheduler
        graph[nid]["inputs"]["model"] = ["50", 0]
    return graph


def test_lora_graph_runs_and_changes_the_result(server, tmp_path):
    import torch
    from safetensors.torch import save_file

    from hairdiff_cli import comfy_client as C
    from hairdiff_core.models.toy import build_toy_transformer

    # ComfyUI's own LoRA Loader after HairDiff Apply Adapter: its patches stack on the adapter's (diffusers
    # SD3 keys through ComfyUI's key map). The toy config gives the keys and shapes.
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, mod in build_toy_transformer().named_modules():
        if name.endswith(("attn.to_q", "attn.to_v")):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, mod.in_features, generator=g)
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 4, generator=g)
    save_file(sd, str(server["base"] / "models" / "loras" / "toy_test_lora.safetensors"))
    graph = _with_lora(C.load_workflow(ROOT / "workflows" / "api" / "hairdiff_basic.json"), "toy_test_lora.safetensors")
    with_lora = _run(server, "", tmp_path / "a", graph=graph, sets=["Save Image.filename_prefix=lora"])
    plain = _run(server, "hairdiff_basic", tmp_path / "b", sets=["Save Image.filename_prefix=plain"])
    assert with_lora[0].read_bytes() != plain[0].read_bytes()


def test_comfyuis_torch_compile_model_runs_the_native_model_and_draws_the_same(server, tmp_path):
    """Compiling is ComfyUI's own (TorchCompileModel): it compiles the MMDiT with HairDiff's patches on."""
    import numpy as np
    from PIL import Image

    from hairdiff_cli import comfy_client as C

    graph = C.load_workflow(ROOT / "workflows" / "api" / "hairdiff_basic.json")
    graph["51"] = {
        "class_type": "TorchCompileModel",
        "inputs": {"model": ["14", 0], "backend": "inductor"},
        "_meta": {"title": "TorchCompileModel"},
    }
    for nid in ("19", "21"):
        graph[nid]["inputs"]["model"] = ["51", 0]
    compiled = _run(server, "", tmp_path / "a", graph=graph, sets=["Save Image.filename_prefix=compiled"])
    plain = _run(server, "hairdiff_basic", tmp_path / "b", sets=["Save Image.filename_prefix=eager"])
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (compiled[0], plain[0]))
    assert np.abs(a - b).max() <= 2  # compiled kernels round differently; the picture is the same


def test_colour_prompt_workflow_fails_only_on_missing_model_files(server):
    from hairdiff_cli import comfy_client as C

    client = C.ComfyClient(server["url"])
    graph = C.load_workflow(ROOT / "workflows" / "api" / "hairdiff_colour_prompt.json")
    uploaded = {role: client.upload_image(ASSETS / f"sample_{role}.png") for role in C.role_nodes(graph)}
    graph = C.prepare_graph(graph, uploaded, [])
    with pytest.raises(C.ComfyServerError) as info:
        client.submit(graph)
    lines = [line for line in str(info.value).splitlines()[1:] if line.startswith("node")]
    # Every other node and link of the graph passed ComfyUI's validation; only the model files are absent:
    # the checkpoint and the text encoders (ComfyUI's own lists), and the adapter (ours, said once).
    ours = [line for line in lines if line.startswith("node 14 (HairDiff_ApplyAdapter")]
    files = [
        line
        for line in lines
        if line.startswith(("node 5 (CheckpointLoaderSimple", "node 11 (TripleCLIPLoader")) and "not in list" in line
    ]
    assert len(ours) == 1 and len(ours) + len(files) == len(lines), str(info.value)
    assert any("sd3.5_medium.safetensors" in line for line in files), str(info.value)
    assert "input 'adapter' is 'hairdiff/hairdiff_sd3.5_medium.safetensors'" in ours[0]


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
    assert main(args + ["--set", "HairDiff Scheduler.steps=0"]) == 2
    err = capsys.readouterr().err
    assert "node 21 (HairDiff_Scheduler 'HairDiff Scheduler') input 'steps'" in err and "smaller than min" in err
    assert main(args + ["--set", "HairDiff Scheduler.steps=2"]) == 0
    assert len(list((tmp_path / "cli").glob("*.png"))) == 1
    shutil.rmtree(tmp_path / "cli")


def test_adapter_from_models_hairdiff_with_an_extra_lora(server, tmp_path):
    """A user's adapter from models/hairdiff, then ComfyUI's LoRA Loader: both are weight patches."""
    import torch
    from safetensors.torch import save_file

    from hairdiff_cli import comfy_client as C
    from hairdiff_core.method.surgery import widen_input_channels
    from hairdiff_core.models.adapter import save_adapter
    from hairdiff_core.models.lora import add_lora
    from hairdiff_core.models.toy import build_toy_transformer

    # An adapter of the user's own for the basic template's toy base (it replaces the shipped one).
    model = widen_input_channels(build_toy_transformer())
    add_lora(model, rank=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    (server["base"] / "models" / "hairdiff").mkdir(parents=True, exist_ok=True)
    save_adapter(model, server["base"] / "models" / "hairdiff" / "toy_user_adapter.safetensors")
    lin = model.transformer_blocks[0].attn.to_q.base_layer
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, lin.in_features, generator=g),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(lin.out_features, 2, generator=g),
        },
        str(server["base"] / "models" / "loras" / "on_adapter.safetensors"),
    )
    graph = C.load_workflow(ROOT / "workflows" / "api" / "hairdiff_basic.json")
    graph["14"]["inputs"]["adapter"] = "hairdiff/toy_user_adapter.safetensors"
    adapted = _run(server, "", tmp_path / "a", graph=graph, sets=["Save Image.filename_prefix=adapted"])
    graph = _with_lora(graph, "on_adapter.safetensors")
    both = _run(server, "", tmp_path / "b", graph=graph, sets=["Save Image.filename_prefix=both"])
    assert adapted[0].read_bytes() != both[0].read_bytes()


def _one_node(graph: dict) -> dict:
    """The same template with HairDiff Sample (8) in place of its custom-sampling nodes: the same
    latent bit for bit, and other nodes, so ComfyUI's cache does not answer for them."""
    graph = {k: dict(v, inputs=dict(v["inputs"])) for k, v in graph.items()}
    guider, scheduler = graph.pop("19"), graph.pop("21")
    seed = graph.pop("18")["inputs"]["noise_seed"]
    graph.pop("20")
    graph["8"] = {
        "class_type": "HairDiff_Sample",
        "inputs": {
            "model": guider["inputs"]["model"],
            "positive": guider["inputs"]["positive"],
            "negative": guider["inputs"]["negative"],
            "latent": graph["8"]["inputs"]["latent_image"],
            "seed": seed,
            "steps": scheduler["inputs"]["steps"],
            "cfg": guider["inputs"]["cfg"],
            "strength": scheduler["inputs"]["strength"],
        },
        "_meta": {"title": "HairDiff Sample"},
    }
    return graph


def test_cancel_during_sampling_stops_it_and_the_next_run_works(server, tmp_path):
    """Reference attention on: Cancel mid-run, then a run the server never made (a new seed) draws
    exactly what the same settings drew before the cancel, through other nodes."""
    from PIL import Image, ImageChops

    from hairdiff_cli import comfy_client as C

    client = C.ComfyClient(server["url"])
    template = C.load_workflow(ROOT / "workflows" / "api" / "hairdiff_reference_attention.json")
    uploaded = {role: client.upload_image(ASSETS / f"sample_{role}.png") for role in C.role_nodes(template)}
    settings = ["Save Image.filename_prefix=cancel", "HairDiff Scheduler.steps=2", "Random Noise.noise_seed=77"]
    clean = _submit(server, _one_node(C.prepare_graph(template, uploaded, settings)), tmp_path / "before")
    graph = C.prepare_graph(template, uploaded, ["HairDiff Scheduler.steps=200", "Random Noise.noise_seed=99"])
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
    after = _submit(server, C.prepare_graph(template, uploaded, settings), tmp_path / "after")
    with Image.open(after[0]) as a, Image.open(clean[0]) as b:
        assert ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None  # pixels identical


def test_draw_in_comfyui_takes_the_region_painted_in_the_mask_editor(server, tmp_path):
    """The mask editor saves the photo with the painted strokes transparent; ComfyUI's Load Image gives
    1 - alpha as its MASK, which the template adds to the sketch's region. Painted far from the
    sketch's region, those pixels are redrawn; unpainted, they stay the photo's, bit for bit."""
    import numpy as np
    from PIL import Image

    from hairdiff_cli import comfy_client as C
    from hairdiff_core.data.imageio import load_image
    from hairdiff_core.method.mask import compose_matte, dilate

    # The template's sketch region (its Hair Matte: sketch_dilate_px 24), padded past both feathers.
    region = compose_matte(None, load_image(ASSETS / "sample_sketch.png"), mode="sketch", sketch_dilate_px=24)
    clear = dilate(region.binary, 32)[0, 0].numpy() == 0
    with Image.open(ASSETS / "sample_photo.png") as photo:
        rgb = np.asarray(photo.convert("RGB")).astype(np.int16)
        painted_area = np.zeros(rgb.shape[:2], dtype=bool)
        painted_area[-40:, :] = True  # a band along the bottom (the sample sketch's region reaches y = 312 of 372)
        painted = photo.convert("RGB")
        painted.putalpha(Image.fromarray(np.where(painted_area, 0, 255).astype(np.uint8)))
    painted.save(tmp_path / "painted_photo.png")
    far = painted_area & clear
    assert far.sum() > 2000

    client = C.ComfyClient(server["url"])
    graph = C.load_workflow(ROOT / "workflows" / "api" / "hairdiff_draw_in_comfyui.json")
    changed = {}
    for label, photo_file in (("painted", tmp_path / "painted_photo.png"), ("plain", ASSETS / "sample_photo.png")):
        uploaded = {
            "photo": client.upload_image(photo_file),
            "sketch": client.upload_image(ASSETS / "sample_sketch.png"),
        }
        run = C.prepare_graph(graph, uploaded, ["HairDiff Scheduler.steps=2", f"Save Image.filename_prefix={label}"])
        (saved,) = _submit(server, run, tmp_path / label)
        with Image.open(saved) as im:
            out = np.asarray(im.convert("RGB")).astype(np.int16)
        changed[label] = float(np.abs(out - rgb)[far].mean())
    assert changed["plain"] == 0.0 and changed["painted"] > 5.0, changed


class _Browser:
    """Headless Chromium through chromedriver's W3C WebDriver HTTP API (standard library only).

    Host names resolve to nothing (the frontend's update and news checks stay off the network);
    the server is reached by its IP address.
    """

    def __init__(self, chromium: str, chromedriver: str):
        port = _free_port()
        self.proc = subprocess.Popen(
            [chromedriver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if _get(self.url + "/status")["value"]["ready"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail("chromedriver did not start within 30 s")
            time.sleep(0.2)
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        args += ["--window-size=1600,1000", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
        options = {"binary": chromium, "args": args}
        caps = {"browserName": "chrome", "goog:chromeOptions": options, "timeouts": {"script": 120_000}}
        try:
            self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        except BaseException:
            self.proc.kill()
            raise

    def _call(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=180) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"WebDriver {method} {path}: {exc.read()[:2000].decode(errors='replace')}") from exc

    def open(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def run(self, script: str, *args, wait: bool = False):
        """Run JavaScript in the page; with ``wait`` the script calls its last argument with the result."""
        kind = "async" if wait else "sync"
        return self._call("POST", f"/session/{self.session}/execute/{kind}", {"script": script, "args": list(args)})

    def close(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)


LOAD_AND_CONVERT = """
const [name, done] = arguments;
(async () => {
  try {
    const wf = await (await fetch('/api/workflow_templates/hairdiff/' + name + '.json')).json();
    await window.app.loadGraphData(wf, true, true, name);
    done({output: (await window.app.graphToPrompt()).output});
  } catch (e) { done({error: String((e && e.stack) || e)}); }
})();
"""


def test_the_real_frontend_opens_each_template_and_makes_its_api_twin(server):
    """ComfyUI's own frontend (the comfyui-frontend-package the server serves) opens every template
    as the template browser does (the server's /api/workflow_templates/hairdiff/<name>.json route),
    and its graphToPrompt, what the Run button sends, is the shipped API file exactly.

    Needs Chromium and chromedriver (on PATH, or CHROMIUM / CHROMEDRIVER); skipped otherwise.
    """
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("google-chrome")
    chromedriver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("Chromium and chromedriver are needed to run ComfyUI's frontend")
    browser = _Browser(chromium, chromedriver)
    try:
        browser.open(server["url"])
        deadline = time.monotonic() + 120
        while not browser.run("return !!(window.app && window.app.graph && window.app.canvas)"):
            assert time.monotonic() < deadline, "ComfyUI's frontend did not start within 120 s"
            time.sleep(0.5)
        names = sorted(_get(server["url"] + "/workflow_templates")["hairdiff"])
        assert names == sorted(p.stem for p in UI_FILES)
        for name in names:
            result = browser.run(LOAD_AND_CONVERT, name, wait=True)
            assert "error" not in result, f"{name}: {result['error']}"
            api = json.loads(_api_twin(name).read_text())
            assert result["output"] == api, name
    finally:
        browser.close()


# --------------------------------------------------------------------------------------------
# The native route: ComfyUI's own MODEL, SAMPLER and samplers


def native_graph(steps: int = 8, seed: int = 5, one_node: bool = False) -> dict:
    """HairDiff Built-in Model (toy) -> HairDiff Apply Adapter -> SamplerCustomAdvanced with
    HairDiff's sampler, scheduler and sketch conditioning -> VAE Decode -> HairDiff Stitch
    (``one_node``: HairDiff Sample in place of the custom-sampling nodes)."""
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "hairdiff_photo.png"}, "_meta": {"title": "Photo"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "hairdiff_sketch.png"}, "_meta": {"title": "Sketch"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "hairdiff_matte.png"}, "_meta": {"title": "Matte"}},
        "4": {"class_type": "ImageToMask", "inputs": {"image": ["3", 0], "channel": "red"}},
        "5": {"class_type": "HairDiff_LoadBuiltin", "inputs": {"model": "toy (synthetic portraits)"}},
        "6": {
            "class_type": "HairDiff_ApplyAdapter",
            "inputs": {"model": ["5", 0], "adapter": "toy adapter (built-in)", "strength": 1.0},
        },
        "7": {
            "class_type": "HairDiff_SketchConditioning",
            "inputs": {
                "positive": ["5", 2],
                "negative": ["5", 2],
                "vae": ["5", 1],
                "photo": ["1", 0],
                "sketch": ["2", 0],
                "matte": ["4", 0],
                "work_size": 128,
                "feather": 10.0,
            },
        },
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "9": {
            "class_type": "CFGGuider",
            "inputs": {"model": ["6", 0], "positive": ["7", 0], "negative": ["7", 1], "cfg": 1.0},
        },
        "10": {"class_type": "HairDiff_SoftMaskSampler", "inputs": {}},
        "11": {"class_type": "HairDiff_Scheduler", "inputs": {"model": ["6", 0], "steps": steps, "strength": 1.0}},
        "12": {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {
                "noise": ["8", 0],
                "guider": ["9", 0],
                "sampler": ["10", 0],
                "sigmas": ["11", 0],
                "latent_image": ["7", 2],
            },
        },
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["5", 1]}},
        "14": {"class_type": "HairDiff_Stitch", "inputs": {"stitch": ["7", 3], "image": ["13", 0], "paste_back": True}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "hairdiff_native"}},
    }
    if one_node:
        for nid in ("8", "9", "10", "11"):
            del graph[nid]
        graph["12"] = {
            "class_type": "HairDiff_Sample",
            "inputs": {
                "model": ["6", 0],
                "positive": ["7", 0],
                "negative": ["7", 1],
                "latent": ["7", 2],
                "seed": seed,
                "steps": steps,
                "cfg": 1.0,
                "strength": 1.0,
            },
        }
    return graph


def _check_native_result(path: Path) -> None:
    """Same size as the photo; pixels well away from the matte the photo's, bit for bit; hair drawn."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im, Image.open(ASSETS / "sample_photo.png") as photo:
        got = np.asarray(im.convert("RGB")).astype(int)
        src = np.asarray(photo.convert("RGB")).astype(int)
    with Image.open(ASSETS / "sample_matte.png") as m:
        hair = np.asarray(m.convert("L").resize(im.size)) > 127
    ys, xs = np.nonzero(hair)
    far = np.ones_like(hair)
    pad = max(hair.shape) // 8  # the feather reaches a few sigmas past the matte
    far[max(0, ys.min() - pad) : ys.max() + pad, max(0, xs.min() - pad) : xs.max() + pad] = False
    assert got.shape == src.shape
    assert (got[far] == src[far]).all()
    assert np.abs(got[hair] - src[hair]).mean() > 2


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("which", ["server", "lowvram_server"])
def test_native_graph_runs_and_keeps_the_photo(request, which, tmp_path):
    srv = request.getfixturevalue(which)
    saved = _submit(srv, native_graph(), tmp_path)
    assert len(saved) == 1
    _check_native_result(saved[0])
    info = _get(srv["url"] + "/object_info/SamplerCustomAdvanced")
    assert "SamplerCustomAdvanced" in info


def test_native_cancel_mid_run_then_the_same_run_gives_the_same_image(server, tmp_path):
    """Cancel a run mid-way, run it again to the end: the image of an uncancelled run (HairDiff
    Sample draws bit for bit what the custom-sampling graph draws, and is not in ComfyUI's cache)."""
    from hairdiff_cli import comfy_client as C

    steps = 400  # the toy takes ~20 ms a step here: long enough to cancel after step 2
    reference = _pixels(_submit(server, native_graph(steps, 11, one_node=True), tmp_path / "ref")[0])
    client = C.ComfyClient(server["url"])
    ws = client.open_progress()
    assert ws is not None, "ComfyUI's websocket should accept the client"
    try:
        pid = client.submit(native_graph(steps, 11))
        deadline, step = time.monotonic() + 300, 0
        while step < 2 and time.monotonic() < deadline:  # cancel mid-run, not before it starts
            msg = ws.recv_json(timeout=1.0)
            if msg and msg.get("type") == "progress" and msg["data"].get("node") == "12":
                step = msg["data"]["value"]
        assert step >= 2, "no sampler progress seen on the websocket"
        urllib.request.urlopen(
            urllib.request.Request(server["url"] + "/interrupt", data=b"", method="POST"), timeout=30
        )
    finally:
        ws.close()
    deadline = time.monotonic() + 120
    while pid not in _get(server["url"] + f"/history/{pid}") and time.monotonic() < deadline:
        time.sleep(0.5)
    status = _get(server["url"] + f"/history/{pid}")[pid]["status"]
    assert any(m[0] == "execution_interrupted" for m in status.get("messages", [])), status
    again = _pixels(_submit(server, native_graph(steps, 11), tmp_path / "again")[0])
    assert (again == reference).all()  # pixels: the PNG's text chunks carry each graph
