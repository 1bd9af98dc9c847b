"""Every shipped workflow against the pack's own node schemas and a listed set of ComfyUI core nodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WF = ROOT / "workflows"
UI_FILES = sorted(WF.glob("*.json"))
API_FILES = sorted((WF / "api").glob("*.json"))


def _api_name(ui_path: Path) -> str:
    """A UI template's API twin (UI files are named for people: see build_workflows.card)."""
    return json.loads(ui_path.read_text())["extra"]["hairdiff"]["api"]


def _ui(name: str) -> Path:
    (path,) = [p for p in UI_FILES if _api_name(p) == name]
    return path


WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
REQUIRED = {
    "hairdiff_basic",
    "hairdiff_reference_attention",
    "hairdiff_colour_prompt",
    "hairdiff_matte_from_sketch",
    "hairdiff_shorter_hair",
    "hairdiff_draw_in_comfyui",
    "hairdiff_colour_prompt_tiny",
    "hairdiff_batch",
}
#: The templates whose job is drawing hair: they run the toy model (its shipped adapter) as shipped.
DRAWING = {
    "hairdiff_basic",
    "hairdiff_reference_attention",
    "hairdiff_matte_from_sketch",
    "hairdiff_shorter_hair",
    "hairdiff_draw_in_comfyui",
    "hairdiff_batch",
}
TINY = "tiny (wiring check)"
TOY = "toy (synthetic portraits)"
BUILT_IN = (TINY, TOY)
#: Loaders of model files (a template with one needs files and says which).
FILE_LOADERS = ("CheckpointLoaderSimple", "UNETLoader")
#: Method words that belong in tooltips, not in a template's note for artists.
JARGON = ("K/V", "soft-mask", "soft mask", "latent", "sigma", "attention processor")


@pytest.fixture(scope="module")
def specs(comfy):
    """node type -> {"inputs": [(name, type, optional, extra_widget_values, input)], "outputs": [types]}."""
    core = json.loads((ROOT / "tools" / "comfy_standins" / "core_nodes.json").read_text())
    out = {
        k: {"inputs": [tuple(i) + (None,) for i in v["inputs"]], "outputs": v["outputs"]}
        for k, v in core.items()
        if not k.startswith("_")
    }
    for node in comfy.nodes.NODES:
        schema = node.GET_SCHEMA()
        out[schema.node_id] = {
            "inputs": [(i.id, i.io_type, i.optional, 1 if i.control_after_generate else 0, i) for i in schema.inputs],
            "outputs": [o.io_type for o in schema.outputs],
        }
    out["_ui_only"] = set(core["_ui_only"])
    return out


def test_the_required_workflows_exist_in_both_formats():
    assert {_api_name(p) for p in UI_FILES} >= REQUIRED
    assert {_api_name(p) for p in UI_FILES} == {p.stem for p in API_FILES}


def test_template_cards_have_human_titles():
    """ComfyUI's template browser titles a pack's templates by file name: the UI files carry the
    template's title, the API twins keep their script-friendly names."""
    b = _builder()
    for p in UI_FILES:
        name = _api_name(p)
        assert p.stem == b.card(name) and p.stem.startswith("HairDiff - ") and "_" not in p.stem
        assert b.WORKFLOWS[name]["title"].split(":")[0] in p.stem
        assert not set(p.stem) & set('<>:"/\\|?*+')


def test_ui_workflows_sit_where_comfyui_lists_templates():
    # ComfyUI (app/custom_node_manager.py) serves <pack>/{example_workflows,example,examples,workflow,workflows}/*.json
    # as templates, first level only: the API twins in workflows/api/ are not listed.
    for p in UI_FILES:
        data = json.loads(p.read_text())
        assert "nodes" in data and "links" in data, f"{p.name} is not UI format"
    for p in API_FILES:
        data = json.loads(p.read_text())
        assert all("class_type" in n for n in data.values()), f"{p.name} is not API format"


def _check_value(spec_input, value, where):
    _name, kind, _opt, _extra, inp = spec_input
    if inp is None:
        return
    if kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    if kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    if kind == "BOOLEAN":
        assert isinstance(value, bool), where
    if kind in ("INT", "FLOAT"):
        assert inp.min is None or value >= inp.min, where
        assert inp.max is None or value <= inp.max, where
    if kind == "COMBO" and inp.id not in ("base_model", "adapter", "lora_name"):  # model lists depend on the machine
        assert value in inp.options, f"{where}: {value!r} not in {inp.options}"


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_api_workflow_matches_the_schemas(specs, path):
    graph = json.loads(path.read_text())
    for nid, node in graph.items():
        kind = node["class_type"]
        assert kind in specs, f"{path.name} node {nid}: unknown node type {kind}"
        spec = specs[kind]
        names = {i[0]: i for i in spec["inputs"]}
        for name, value in node["inputs"].items():
            assert name in names, f"{path.name} node {nid} ({kind}): no input {name!r}"
            where = f"{path.name} node {nid} ({kind}).{name}"
            if isinstance(value, list):
                src, slot = value
                assert src in graph, f"{where}: link from missing node {src}"
                out_type = specs[graph[src]["class_type"]]["outputs"][slot]
                assert out_type == names[name][1], f"{where}: {out_type} linked into {names[name][1]}"
            else:
                assert names[name][1] in WIDGETS, f"{where}: a value for a socket input"
                _check_value(names[name], value, where)
        for name, _itype, optional, _extra, _inp in spec["inputs"]:
            assert optional or name in node["inputs"], (
                f"{path.name} node {nid} ({kind}): required input {name!r} missing"
            )


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_matches_the_schemas_and_its_api_twin(specs, path):
    data = json.loads(path.read_text())
    nodes = {n["id"]: n for n in data["nodes"]}
    links = {l[0]: l for l in data["links"]}
    api = json.loads((WF / "api" / f"{_api_name(path)}.json").read_text())
    real = {nid: n for nid, n in nodes.items() if n["type"] not in specs["_ui_only"]}
    assert {str(i): n["type"] for i, n in real.items()} == {k: v["class_type"] for k, v in api.items()}
    assert any(n["type"] == "MarkdownNote" for n in nodes.values()), "each workflow explains itself in a note"
    for nid, n in real.items():
        spec = specs[n["type"]]
        sockets = [
            i for i in spec["inputs"] if i[1] not in WIDGETS or isinstance(api[str(nid)]["inputs"].get(i[0]), list)
        ]
        widgets = [i for i in spec["inputs"] if i not in sockets]
        assert [x["name"] for x in n["inputs"]] == [i[0] for i in sockets], f"{path.name} node {nid} socket inputs"
        assert len(n["widgets_values"]) == sum(1 + i[3] for i in widgets), f"{path.name} node {nid} widget count"
        pos = 0
        for w in widgets:
            assert n["widgets_values"][pos] == api[str(nid)]["inputs"][w[0]], f"{path.name} node {nid}.{w[0]}"
            pos += 1 + w[3]
        for slot, x in enumerate(n["inputs"]):
            if x["link"] is None:
                assert x["name"] not in api[str(nid)]["inputs"]
                continue
            lid, src, src_slot, dst, dst_slot, ltype = links[x["link"]]
            assert (dst, dst_slot) == (nid, slot) and ltype == x["type"] == specs[nodes[src]["type"]]["outputs"][
                src_slot
            ]
            assert api[str(nid)]["inputs"][x["name"]] == [str(src), src_slot]
            assert lid in nodes[src]["outputs"][src_slot]["links"]
    assert data["last_link_id"] == max(links, default=0) and data["last_node_id"] == max(nodes)


def _models(graph: dict) -> list[str]:
    """What a graph loads: the built-in model's name, or the file loader's node type."""
    return [
        n["inputs"]["model"] if n["class_type"] == "HairDiff_LoadBuiltin" else n["class_type"]
        for n in graph.values()
        if n["class_type"] in ("HairDiff_LoadBuiltin", *FILE_LOADERS)
    ]


def test_a_built_in_model_by_default_or_says_which_files(specs):
    for path in API_FILES:
        graph = json.loads(path.read_text())
        models = _models(graph)
        assert len(models) == 1, path.name
        if models[0] not in BUILT_IN:
            note = next(n for n in json.loads(_ui(path.stem).read_text())["nodes"] if n["type"] == "MarkdownNote")
            text = note["widgets_values"][0]
            assert "Needs model files" in text
            files = [
                v
                for n in graph.values()
                for k, v in n["inputs"].items()
                if isinstance(v, str) and v.endswith(".safetensors")
            ]
            assert files and all(Path(f).name in text for f in files), files


def test_every_template_samples_natively_with_hairdiffs_parts(specs):
    """One way in ComfyUI: ComfyUI's MODEL through HairDiff Apply Adapter, SamplerCustomAdvanced with
    HairDiff's sampler, scheduler and sketch conditioning, VAE Decode, HairDiff Stitch; no HAIRDIFF_MODEL."""
    for path in API_FILES:
        graph = json.loads(path.read_text())
        kinds = [n["class_type"] for n in graph.values()]
        for kind in (
            "HairDiff_ApplyAdapter",
            "HairDiff_SketchConditioning",
            "SamplerCustomAdvanced",
            "HairDiff_SoftMaskSampler",
            "HairDiff_Scheduler",
            "VAEDecode",
            "HairDiff_Stitch",
        ):
            assert kinds.count(kind) == 1, (path.name, kind)
        assert not [k for k in kinds if "HAIRDIFF_MODEL" in specs[k]["outputs"]], path.name
        sca = next(n for n in graph.values() if n["class_type"] == "SamplerCustomAdvanced")
        assert graph[sca["inputs"]["sampler"][0]]["class_type"] == "HairDiff_SoftMaskSampler"
        assert graph[sca["inputs"]["latent_image"][0]]["class_type"] == "HairDiff_SketchConditioning"


def test_comfy_run_roles_are_titled(specs):
    from hairdiff_cli.comfy_client import role_nodes

    for path in API_FILES:
        roles = role_nodes(json.loads(path.read_text()))
        assert {"photo", "sketch"} <= set(roles), path.name


def _builder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hairdiff_build_workflows", WF / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_each_template_has_a_thumbnail_a_title_and_a_plain_note(path):
    from PIL import Image

    with Image.open(path.with_suffix(".jpg")) as im:
        assert im.format == "JPEG" and im.width == 512 and 200 < im.height < 512
    data = json.loads(path.read_text())
    note = next(n for n in data["nodes"] if n["type"] == "MarkdownNote")
    text = note["widgets_values"][0]
    title = data["extra"]["hairdiff"]["title"]
    assert note["title"] == title and text.startswith(f"## {title}\n") and len(title.split()) >= 3
    assert not [w for w in JARGON if w.lower() in text.lower()], text


def test_runnable_templates_use_the_one_model_constant_and_the_bundled_samples():
    b = _builder()
    assert set(b.WORKFLOWS) == {_api_name(p) for p in UI_FILES}  # every template comes from the builder
    for name, wf in b.WORKFLOWS.items():
        graph = json.loads((WF / "api" / f"{name}.json").read_text())
        if wf.get("runnable", True):
            assert _models(graph) == [b.MODEL if name in DRAWING else b.PROMPT_MODEL], name
            images = {n["inputs"]["image"] for n in graph.values() if n["class_type"] == "LoadImage"}
            assert images <= set(b.SAMPLES.values()), (name, images)
            assert not [n for n in graph.values() if n["class_type"] in ("TripleCLIPLoader", *FILE_LOADERS)]
            (cond,) = [n for n in graph.values() if n["class_type"] == "HairDiff_SketchConditioning"]
            assert cond["inputs"]["work_size"] == b.WORK_SIZE[_models(graph)[0]], name


def test_every_drawing_template_loads_the_toy_model_with_its_shipped_adapter(comfy):
    """The hair-drawing templates show the sketch steering the strands without any files: the toy model
    and its built-in adapter, no extra LoRA on top; their notes say so and where to pick SD3.5 for real
    hair. The prompt try-out stays on the tiny model (its zero-sketch adapter)."""
    b = _builder()
    native = comfy.nodes.native_nodes
    assert b.MODEL == TOY == native.BUILTIN_TOY and b.PROMPT_MODEL == TINY == native.BUILTIN_TINY
    assert b.BUILT_IN == {TOY: native.BUILTIN_TOY_ADAPTER, TINY: native.BUILTIN_TINY_ADAPTER}
    assert DRAWING == {p.stem for p in API_FILES} - {"hairdiff_colour_prompt", "hairdiff_colour_prompt_tiny"}
    for name in sorted(DRAWING):
        graph = json.loads((WF / "api" / f"{name}.json").read_text())
        assert _models(graph) == [TOY], name
        (adapter,) = [n for n in graph.values() if n["class_type"] == "HairDiff_ApplyAdapter"]
        assert adapter["inputs"]["adapter"] == native.BUILTIN_TOY_ADAPTER, name
        assert not [n for n in graph.values() if n["class_type"] == "LoraLoader"], name
        note = next(n for n in json.loads(_ui(name).read_text())["nodes"] if n["type"] == "MarkdownNote")
        text = note["widgets_values"][0]
        assert "toy model" in text and "synthetic striped hair" in text and "SD3.5" in text, name
    graph = json.loads((WF / "api" / "hairdiff_colour_prompt_tiny.json").read_text())
    assert _models(graph) == [TINY]


class _CoreNodes:
    """ComfyUI's core nodes the templates use, as ComfyUI computes them (nodes.py)."""

    def __init__(self):
        self.saved = []

    def LoadImage(self, image):
        from hairdiff_pack.nodes.template_inputs import TEMPLATE_INPUTS  # what the pack copies into input/
        from PIL import Image

        # A bundled sample by the name the pack copies it under, or (a test's own picture) a path.
        path = ROOT / "hairdiff_core" / "assets" / TEMPLATE_INPUTS[image] if image in TEMPLATE_INPUTS else image
        with Image.open(path) as full:
            # Half size keeps the test fast: below the tiny model's work area nothing is cropped.
            im = full.resize((full.width // 2, full.height // 2), Image.NEAREST)
            rgb = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]
            if "A" in im.getbands():
                alpha = torch.from_numpy(np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0)
                mask = 1.0 - alpha  # painted (erased) in the mask editor = 1
            else:
                mask = torch.zeros(64, 64)  # ComfyUI's placeholder for a picture without alpha
        return rgb, mask.unsqueeze(0)

    def ImageToMask(self, image, channel):
        return (image[..., ["red", "green", "blue", "alpha"].index(channel)],)

    def ImageBatch(self, image1, image2):
        return (torch.cat([image1, image2]),)  # same size here; ComfyUI resizes image2 otherwise

    def SaveImage(self, images, filename_prefix):
        self.saved.append((filename_prefix, images))
        return ()

    # The model side needs ComfyUI itself (tests/test_comfyui_server.py runs every template on it):
    # here the built-in model brings a pooling VAE, and sampling returns the photo's latent with its
    # box decoded to black, so what the graph does around the model can be checked.
    def HairDiff_LoadBuiltin(self, model):
        text = [[torch.zeros(1, 77, 32), {"pooled_output": torch.zeros(1, 64 if model == TINY else 32)}]]
        return ("MODEL", _PoolVAE(), text)

    def HairDiff_ApplyAdapter(self, model, adapter, strength):
        return (model,)

    def HairDiff_ReferenceAttention(self, model, **settings):
        return (model,)

    def RandomNoise(self, noise_seed):
        return ("NOISE",)

    def CFGGuider(self, model, positive, negative, cfg):
        assert "noise_concat" in positive[0][1] and "noise_concat" in negative[0][1]
        return ("GUIDER",)

    def HairDiff_SoftMaskSampler(self):
        return ("SAMPLER",)

    def HairDiff_Scheduler(self, model, steps, strength):
        return (torch.linspace(1, 0, steps + 1),)

    def SamplerCustomAdvanced(self, noise, guider, sampler, sigmas, latent_image):
        assert latent_image["noise_mask"].shape[-2:] == latent_image["samples"].shape[-2:]
        return (latent_image, latent_image)

    def VAEDecode(self, samples, vae):
        return (vae.decode(samples["samples"]),)


class _PoolVAE:
    """ComfyUI's VAE interface with no weights: 8x average pooling in, black pictures out."""

    def encode(self, pixels):
        return torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8).repeat(1, 6, 1, 1)[:, :16]

    def decode(self, latent):
        B, _, h, w = latent.shape
        return torch.zeros(B, h * 8, w * 8, 3)


def _run_graph(comfy, graph, only=None):
    """Run an API graph on the stand-ins (the model side stood in, see _CoreNodes): (outputs by node
    id, the core nodes). ``only``: run just that node and what it needs."""
    ours = {node.GET_SCHEMA().node_id: node for node in comfy.nodes.NODES}
    core = _CoreNodes()
    outputs = {}

    def run(nid):
        if nid in outputs:
            return outputs[nid]
        node = graph[nid]
        kwargs = {k: (run(v[0])[v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
        kind = node["class_type"]
        stand_in = getattr(core, kind, None)
        outputs[nid] = stand_in(**kwargs) if stand_in is not None else ours[kind].execute(**kwargs)
        return outputs[nid]

    for nid in [only] if only else graph:
        run(nid)
    return outputs, core


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_runnable_templates_run_as_shipped_on_the_stand_ins(comfy, path):
    """Each template that needs no model files runs end to end around the stood-in model."""
    graph = json.loads(path.read_text())
    if [m for m in _models(graph) if m not in BUILT_IN]:
        pytest.skip("needs model files (its note says which)")
    _outputs, core = _run_graph(comfy, graph)
    assert len(core.saved) == 1
    images = core.saved[0][1]
    batch = 2 if path.stem == "hairdiff_batch" else 1
    assert images.shape == (batch, 186, 150, 3) and torch.isfinite(images).all()


def test_the_basic_template_redraws_inside_the_matte_only(comfy):
    """As shipped (the sample pictures at the stand-in's half size): the photo is worked at the toy's
    size, and what the sampler's box holds (black, here) lands inside the matte and nowhere away from
    it: the saved picture is the photo's bit for bit there."""
    from hairdiff_core.method.mask import dilate

    graph = json.loads((WF / "api" / "hairdiff_basic.json").read_text())
    assert _models(graph) == [TOY]
    outputs, core = _run_graph(comfy, graph)
    photo = outputs["1"][0][0]  # (H, W, 3)
    matte = outputs["7"][0][0]  # Hair Matte's output (H, W)
    latent = outputs["15"][2]
    assert max(latent["samples"].shape[-2:]) * 8 <= 2 * 128  # the toy's work area, not the photo's
    ((_prefix, images),) = core.saved
    assert images.shape == (1, *photo.shape) and torch.isfinite(images).all()
    diff = (images[0] - photo).abs().amax(-1)
    inside = matte > 0.9
    outside = dilate((matte > 0)[None, None].float(), 12)[0, 0] == 0  # past the stitch's feathered seam
    assert inside.sum() > 1000 and outside.sum() > 5000, (int(inside.sum()), int(outside.sum()))
    assert float((diff[inside] > 2 / 255).float().mean()) > 0.5
    assert float(diff[outside].max()) == 0.0


def test_every_image_a_template_loads_is_copied_into_comfyuis_input_folder(comfy):
    from hairdiff_pack.nodes.template_inputs import ASSETS, TEMPLATE_INPUTS

    b = _builder()
    assert set(b.SAMPLES.values()) <= set(TEMPLATE_INPUTS)
    assert all((ASSETS / sample).is_file() for sample in TEMPLATE_INPUTS.values())


@pytest.mark.parametrize("name", ["hairdiff_shorter_hair", "hairdiff_draw_in_comfyui"])
def test_templates_whose_sketch_crosses_the_face_keep_the_face_as_shipped(comfy, name, caplog):
    """The sample sketch's strokes sweep across the face (their region spans most of the photo): the
    template's protect mask (the bundled face) is taken out of the Hair Matte's output, feather
    included, the node says how much of the face the matte reached over, and the saved picture
    keeps the face (only the sampler's feathered seam reaches a few pixels into it)."""
    import logging

    from PIL import Image

    from hairdiff_core.method.mask import dilate

    b = _builder()
    graph = json.loads((WF / "api" / f"{name}.json").read_text())
    (matte_id,) = [k for k, n in graph.items() if n["class_type"] == "HairDiff_HairMatte"]
    exclude = graph[matte_id]["inputs"]["exclude"]
    assert exclude == [str(b.PROTECT[0]), 1]  # Load Image's MASK output, straight in: what the mask editor paints
    loader = graph[exclude[0]]
    assert loader["class_type"] == "LoadImage" and loader["inputs"]["image"] == b.SAMPLES["protect"]
    with caplog.at_level(logging.WARNING):
        outputs, core = _run_graph(comfy, graph)
    matte = outputs[matte_id][0][0]  # (H, W) at the stand-in's half size
    with Image.open(ROOT / "hairdiff_core" / "assets" / "sample_face_protect.png") as im:
        assert im.mode == "RGBA"  # the sample photo, the face transparent
        half = im.resize((im.width // 2, im.height // 2), Image.NEAREST)
        face = torch.from_numpy(np.asarray(half.getchannel("A"), dtype=np.float32) / 255.0) < 0.5
        with Image.open(ROOT / "hairdiff_core" / "assets" / "sample_photo.png") as photo:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(photo.convert("RGB")))
    assert matte.shape == face.shape and face.sum() > 1000
    assert float(matte[face].max()) == 0.0  # zero overlap with the face, feathered edge included
    assert float((matte > 0.5).float().mean()) > 0.2  # the hair region is still there
    (line,) = [r.getMessage() for r in caplog.records if "protected region" in r.getMessage()]
    assert "reached over 100% of the protected region" in line and "that part is kept as the photo's" in line

    # The same graph without the protect input redraws the whole face.
    bare_graph = {k: dict(n, inputs=dict(n["inputs"])) for k, n in graph.items()}
    del bare_graph[matte_id]["inputs"]["exclude"]
    bare_outputs, bare_core = _run_graph(comfy, bare_graph)
    assert float((bare_outputs[matte_id][0][0][face] > 0.5).float().mean()) == 1.0
    photo = outputs["1"][0][0]
    inner = dilate(face[None, None].float(), -2)[0, 0] > 0.5  # the face without the protect margin
    kept = (core.saved[0][1][0] - photo).abs().amax(-1)[inner]
    redrawn = (bare_core.saved[0][1][0] - photo).abs().amax(-1)[inner]
    assert float(redrawn.mean()) > 0.1 and float((redrawn > 1 / 255).float().mean()) == 1.0
    # Measured on the tiny model (before the templates moved to toy): 91% of the face within 1/255 of the
    # photo, at most 12/255 off at the seam (unprotected: all of it redrawn, on average far more).
    assert float(kept.max()) < 0.1 and float((kept <= 1 / 255).float().mean()) > 0.85


def test_painting_in_the_mask_editor_on_protect_adds_to_the_protected_face(comfy, tmp_path):
    """The mask editor saves the Protect picture with the painted strokes transparent too; Load Image's
    MASK (1 - alpha) then holds the face and the strokes, and the Hair Matte keeps both out."""
    from PIL import Image

    graph = json.loads((WF / "api" / "hairdiff_shorter_hair.json").read_text())
    (matte_id,) = [k for k, n in graph.items() if n["class_type"] == "HairDiff_HairMatte"]
    protect_id = graph[matte_id]["inputs"]["exclude"][0]
    shipped = _run_graph(comfy, graph, only=matte_id)[0][matte_id][0][0]
    with Image.open(ROOT / "hairdiff_core" / "assets" / "sample_face_protect.png") as im:
        alpha = np.asarray(im.getchannel("A")).copy()
        alpha[40:80, :] = 0  # a stroke across the top of the hair, painted in the mask editor
        painted = im.copy()
    painted.putalpha(Image.fromarray(alpha))
    painted.save(tmp_path / "painted_protect.png")
    graph[protect_id]["inputs"]["image"] = str(tmp_path / "painted_protect.png")
    outputs = _run_graph(comfy, graph, only=matte_id)[0]
    matte = outputs[matte_id][0][0]
    stroke = torch.zeros_like(matte, dtype=torch.bool)
    stroke[20:40, :] = True  # the stroke at the stand-in's half size
    assert float((shipped[stroke] > 0.5).float().mean()) > 0.3  # the shipped matte redraws there
    assert float(matte[stroke].max()) == 0.0  # painted: kept as the photo's
    half = painted.resize((painted.width // 2, painted.height // 2), Image.NEAREST)  # as the stand-in reads it
    face = torch.from_numpy(np.asarray(half.getchannel("A")) == 0)  # the face is still protected too
    assert float(matte[face].max()) == 0.0 and float((matte > 0.5).float().mean()) > 0.1
