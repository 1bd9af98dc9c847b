"""Writes HairDiff's workflows in both of ComfyUI's formats from one description of each graph.

    curl -s http://127.0.0.1:8188/object_info > /tmp/object_info.json   # a ComfyUI with HairDiff installed
    python workflows/build_workflows.py --object-info /tmp/object_info.json
    python workflows/build_workflows.py --from-stubs     # no server: the test stand-ins' definitions

Each template also gets a thumbnail ``<name>.jpg`` beside it (the sample photo with the template's
matte over it, the sketch and the title). ``MODEL`` below is the one place that says which model
the hair-drawing templates load (the toy model); the colour-prompt try-out loads ``PROMPT_MODEL``.

UI format (``workflows/*.json``): what the ComfyUI frontend opens; ComfyUI lists the first-level
``*.json`` of a pack's ``workflows/`` folder as the pack's templates, titled by file name, so the
UI files are named for people (``card``) and say their API twin in ``extra.hairdiff.api``. API format
(``workflows/api/*.json``): what ``/prompt`` and ``hairdiff comfy-run`` take; the subfolder
keeps these out of the template browser. Widget order comes from ``/object_info`` (so the UI
files match the node definitions exactly); Note nodes exist only in the UI format.
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The ComfyUI stand-ins (also the node tests'), for --from-stubs: outside tests/, which product code never imports.
STANDINS = ROOT / "tools" / "comfy_standins"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TOY = "toy (synthetic portraits)"
TINY = "tiny (wiring check)"
#: The built-in models (no files needed) and their built-in adapters; their working sizes (px).
BUILT_IN = {TOY: "toy adapter (built-in)", TINY: "tiny adapter (built-in: zero sketch channels)"}
WORK_SIZE = {TOY: 128, TINY: 256}
#: The model every hair-drawing template loads: the ONE place to switch them all. The toy model
#: (trained on synthetic striped portraits, 128 px) with its shipped adapter. Templates that need
#: real files (colour prompt with SD3.5) say so in their note.
MODEL = TOY
#: The colour-prompt try-out's model: HairDiff Prompt's built-in 'tiny' text encoders make
#: conditioning for the tiny model only (pooled width 64; the toy model takes 32 and was trained
#: without text), so that template stays on the tiny model.
PROMPT_MODEL = TINY
#: The bundled sample images, as the pack copies them into ComfyUI's input folder.
SAMPLES = {
    "photo": "hairdiff_photo.png",
    "sketch": "hairdiff_sketch.png",
    "matte": "hairdiff_matte.png",
    "protect": "hairdiff_face_protect.png",
}
#: Where the templates' protect mask comes from: the Protect Load Image's MASK (1 - alpha: the
#: picture's transparent part, which the mask editor paints).
PROTECT = (10, 1)


#: What the protecting templates' notes say about Protect (the sample sketch's strokes cross the face).
PROTECT_NOTE = (
    "**Protect**: the face is protected: it is transparent in `hairdiff_face_protect.png`; paint more in the "
    "mask editor (right-click Protect > Open in MaskEditor), or load your own. The sample sketch's strokes cross "
    "the face, so without it the face would be redrawn too. The picture fits only the sample photo: **for your "
    "own photo**, load your photo in Protect and paint the face (and anything else that must not change) in the "
    "mask editor."
)


def protect_nodes():
    """The sample photo with its face (plus a small margin) transparent, as the Hair Matte's exclusion:
    as shipped, the sample sketch's strokes cross the face and would otherwise redraw it."""
    return [
        dict(
            id=10,
            type="LoadImage",
            title="Protect (transparent = keep; paint more in the mask editor)",
            widgets={"image": SAMPLES["protect"]},
        ),
    ]


def loaders(photo=True, matte=True, photo_title="Photo"):
    nodes = []
    if photo:
        nodes.append(dict(id=1, type="LoadImage", title=photo_title, widgets={"image": SAMPLES["photo"]}))
    nodes.append(dict(id=2, type="LoadImage", title="Sketch", widgets={"image": SAMPLES["sketch"]}))
    if matte:
        nodes.append(dict(id=3, type="LoadImage", title="Matte", widgets={"image": SAMPLES["matte"]}))
        nodes.append(
            dict(id=4, type="ImageToMask", title="Matte To Mask", widgets={"channel": "red"}, links={"image": (3, 0)})
        )
    return nodes


def model(base=None):
    """HairDiff Built-in Model (5) -> HairDiff Apply Adapter (14) with the model's own adapter."""
    base = base or MODEL
    return [
        dict(id=5, type="HairDiff_LoadBuiltin", title="HairDiff Built-in Model", widgets={"model": base}),
        dict(
            id=14,
            type="HairDiff_ApplyAdapter",
            title="HairDiff Apply Adapter",
            widgets={"adapter": BUILT_IN[base], "strength": 1.0},
            links={"model": (5, 0)},
        ),
    ]


def sd35_model(checkpoint, adapter):
    """Load Checkpoint (5: MODEL, CLIP, VAE) -> HairDiff Apply Adapter (14)."""
    return [
        dict(id=5, type="CheckpointLoaderSimple", title="Load Checkpoint", widgets={"ckpt_name": checkpoint}),
        dict(
            id=14,
            type="HairDiff_ApplyAdapter",
            title="HairDiff Apply Adapter",
            widgets={"adapter": adapter, "strength": 1.0},
            links={"model": (5, 0)},
        ),
    ]


def conditioning(positive=(5, 2), negative=(5, 2), vae=(5, 1), photo_from=(1, 0), matte_from=(7, 0), work=None):
    """HairDiff Sketch Conditioning (15): the sketch into positive/negative, the photo's latent, the stitch."""
    return dict(
        id=15,
        type="HairDiff_SketchConditioning",
        title="HairDiff Sketch Conditioning",
        widgets={"work_size": work or WORK_SIZE[MODEL], "feather": 10.0},
        links={
            "positive": positive,
            "negative": negative,
            "vae": vae,
            "photo": photo_from,
            "sketch": (6, 0),
            "matte": matte_from,
        },
    )


def sketch_node():
    return dict(
        id=6,
        type="HairDiff_SketchPreprocess",
        title="HairDiff Sketch Preprocess",
        widgets={"background": "auto", "invert": False, "threshold": 0.2, "thickness_px": 0},
        links={"sketch": (2, 0), "photo": (1, 0)},
    )


def sampler(model_from=14, steps=20, cfg=1.0, vae=(5, 1)):
    """RandomNoise + CFGGuider + HairDiff Soft-Mask Sampler + HairDiff Scheduler -> SamplerCustomAdvanced
    (8) -> VAE Decode (16) -> HairDiff Stitch (17): ComfyUI's own custom sampling with HairDiff's parts."""
    return [
        dict(id=18, type="RandomNoise", title="Random Noise", widgets={"noise_seed": 42}),
        dict(
            id=19,
            type="CFGGuider",
            title="CFG Guider",
            widgets={"cfg": cfg},
            links={"model": (model_from, 0), "positive": (15, 0), "negative": (15, 1)},
        ),
        dict(id=20, type="HairDiff_SoftMaskSampler", title="HairDiff Soft-Mask Sampler", widgets={}),
        dict(
            id=21,
            type="HairDiff_Scheduler",
            title="HairDiff Scheduler",
            widgets={"steps": steps, "strength": 1.0},
            links={"model": (model_from, 0)},
        ),
        dict(
            id=8,
            type="SamplerCustomAdvanced",
            title="Sampler Custom Advanced",
            widgets={},
            links={"noise": (18, 0), "guider": (19, 0), "sampler": (20, 0), "sigmas": (21, 0), "latent_image": (15, 2)},
        ),
        dict(id=16, type="VAEDecode", title="VAE Decode", widgets={}, links={"samples": (8, 0), "vae": vae}),
        dict(
            id=17,
            type="HairDiff_Stitch",
            title="HairDiff Stitch",
            widgets={"paste_back": True},
            links={"stitch": (15, 3), "image": (16, 0)},
        ),
    ]


def save(prefix):
    return dict(
        id=9, type="SaveImage", title="Save Image", widgets={"filename_prefix": prefix}, links={"images": (17, 0)}
    )


def matte_node(from_sketch=False, links=None, grow_px=0, dilate=16, mode="union"):
    if from_sketch:
        return dict(
            id=7,
            type="HairDiff_HairMatte",
            title="HairDiff Hair Matte",
            widgets={"grow_px": 8, "feather_sigma": 4.0, "threshold": 0.5, "sketch_dilate_px": 24, "mode": "sketch"},
            links=links or {"sketch": (2, 0), "photo": (1, 0)},
        )
    return dict(
        id=7,
        type="HairDiff_HairMatte",
        title="HairDiff Hair Matte",
        widgets={"grow_px": grow_px, "feather_sigma": 4.0, "threshold": 0.5, "sketch_dilate_px": dilate, "mode": mode},
        links=links or {"mask": (4, 0), "photo": (1, 0)},
    )


def prompt_node(nid, title, text):
    return dict(id=nid, type="HairDiff_Prompt", title=title, widgets={"text": text, "encoders": TINY})


HEADLESS = (
    "Headless: `hairdiff comfy-run --workflow workflows/api/{name}.json --image P --sketch S --matte M --out DIR`."
)
#: The note of every template that runs the toy model (MODEL).
TOY_NOTE = (
    "This template runs a small **toy model** trained on synthetic striped hair, so you can see the sketch "
    "steer the strands without downloading anything. It draws stripes, not real hair, and works on a small "
    "picture (about 128 px around the region, scaled back to your photo).\n\n"
    "**For real hair:** replace HairDiff Built-in Model with ComfyUI's Load Diffusion Model (an SD3.5 file in "
    "models/diffusion_models; any weight dtype) or Load Checkpoint, pick your HairDiff adapter (models/hairdiff) "
    "in HairDiff Apply Adapter, connect the SD3.5 VAE and CLIP Text Encode prompts to HairDiff Sketch "
    "Conditioning, set its work_size to 1024, and load your "
    "own pictures.\n\n" + HEADLESS
)
#: The note of a template that runs the tiny model (PROMPT_MODEL).
TINY_NOTE = (
    "It runs as shipped with the built-in **tiny (wiring check)** model and the sample pictures: no model "
    "files needed, and the 'hair' it draws is noise. It only shows that everything is connected. (The toy "
    "model, which draws striped hair in the other templates, never learned words, so it cannot take a "
    "prompt.)\n\n"
    "**For real results:** load SD3.5 with Load Diffusion Model or Load Checkpoint in place of HairDiff "
    "Built-in Model, pick a HairDiff adapter (models/hairdiff) in HairDiff Apply Adapter, and load your "
    "own pictures.\n\n" + HEADLESS
)

WORKFLOWS = {
    "hairdiff_basic": dict(
        title="Redraw hair from a sketch",
        note="Load a portrait, a sketch of the new hair and a matte (white where the hair may change). HairDiff "
        "redraws the hair inside the matte so it follows your strokes; everything outside stays as it was.",
        nodes=loaders()
        + model()
        + [sketch_node(), matte_node(), conditioning()]
        + sampler()
        + [save("hairdiff/basic")],
    ),
    "hairdiff_reference_attention": dict(
        title="Hair lit like the photo",
        note="The same as the basic template, plus **HairDiff Reference Attention**: while drawing, the new hair "
        "keeps looking at the original photo, so it picks up its light and colour. 'once' is quick; "
        "'per_step' looks at every step (about twice the time) and is the published method.",
        nodes=loaders()
        + model()
        + [
            sketch_node(),
            matte_node(),
            conditioning(),
            dict(
                id=10,
                type="HairDiff_ReferenceAttention",
                title="HairDiff Reference Attention",
                widgets={
                    "mode": "once",
                    "weight_inside": 0.5,
                    "weight_outside": 1.0,
                    "suppress_self_outside": 0.0,
                    "key_weight_inside": 0.0,
                    "reference_input": "photo",
                    "reference_noise": "auto",
                    "key_pool": "1",
                    "key_ring": 0,
                },
                links={"model": (14, 0)},
            ),
        ]
        + sampler(model_from=10)
        + [save("hairdiff/reference")],
    ),
    "hairdiff_colour_prompt": dict(
        title="Hair colour from a prompt (SD3.5 files)",
        note="Say the colour in words: the prompt (e.g. 'copper red hair') tells the model what colour and "
        "texture to draw, the sketch still gives the shape.\n\n**Needs model files** (for a try-out without "
        "files use *hairdiff_colour_prompt_tiny*):\n- `models/checkpoints/sd3.5_medium.safetensors` (SD3.5 "
        "Medium, VAE inside)\n- `models/hairdiff/hairdiff_sd3.5_medium.safetensors` (a HairDiff adapter "
        "trained for it)\n- `models/text_encoders/clip_l.safetensors`, `clip_g.safetensors`, "
        "`t5xxl_fp16.safetensors`\n\ncfg 4 uses the negative prompt. Headless: `hairdiff comfy-run --workflow "
        "workflows/api/hairdiff_colour_prompt.json --image P --sketch S --matte M --set 'Hair Colour "
        "Prompt.text=copper red hair' --out DIR`.",
        runnable=False,
        nodes=loaders()
        + sd35_model("sd3.5_medium.safetensors", "hairdiff/hairdiff_sd3.5_medium.safetensors")
        + [
            sketch_node(),
            matte_node(),
            dict(
                id=11,
                type="TripleCLIPLoader",
                title="SD3 Text Encoders",
                widgets={
                    "clip_name1": "clip_l.safetensors",
                    "clip_name2": "clip_g.safetensors",
                    "clip_name3": "t5xxl_fp16.safetensors",
                },
            ),
            dict(
                id=12,
                type="CLIPTextEncode",
                title="Hair Colour Prompt",
                widgets={"text": "platinum blonde hair"},
                links={"clip": (11, 0)},
            ),
            dict(id=13, type="CLIPTextEncode", title="Negative Prompt", widgets={"text": ""}, links={"clip": (11, 0)}),
            conditioning(positive=(12, 0), negative=(13, 0), vae=(5, 2), work=1024),
        ]
        + sampler(steps=28, cfg=4.0, vae=(5, 2))
        + [save("hairdiff/colour")],
    ),
    "hairdiff_colour_prompt_tiny": dict(
        title="Hair colour from a prompt (try-out)",
        note="Type the hair colour you want in **Hair Colour Prompt** ('copper red hair', 'platinum blonde'); the "
        "sketch gives the shape, the words the colour. This copy uses the tiny built-in text encoders, so it "
        "runs anywhere but ignores what the words mean.\n\n**For real results:** switch both prompt nodes' "
        "encoders to 'sd3 files' (clip_l, clip_g, t5xxl in models/text_encoders) or use ComfyUI's Triple CLIP "
        "Loader + CLIP Text Encode as in *hairdiff_colour_prompt*, and pick an SD3.5 model and adapter.",
        nodes=loaders()
        + model(PROMPT_MODEL)
        + [
            sketch_node(),
            matte_node(),
            prompt_node(11, "Hair Colour Prompt", "copper red hair"),
            prompt_node(12, "Negative Prompt", "blurry, dull"),
            conditioning(positive=(11, 0), negative=(12, 0), work=WORK_SIZE[PROMPT_MODEL]),
        ]
        + sampler(cfg=2.0)
        + [save("hairdiff/colour_tiny")],
    ),
    "hairdiff_matte_from_sketch": dict(
        title="Longer hair: the sketch sets the region",
        note="No matte needed: draw the outline of the new hair and HairDiff Hair Matte (mode 'sketch') takes the "
        "strokes plus everything they enclose as the region to redraw. Good for longer hair: the sketch says "
        "how far it reaches. Raise 'sketch_dilate_px' if your outline has gaps.\n\n" + PROTECT_NOTE,
        note_drop=" --matte M",
        nodes=loaders(matte=False)
        + protect_nodes()
        + model()
        + [
            sketch_node(),
            matte_node(from_sketch=True, links={"sketch": (2, 0), "exclude": PROTECT, "photo": (1, 0)}),
            conditioning(),
        ]
        + sampler()
        + [save("hairdiff/matte_from_sketch")],
    ),
    "hairdiff_shorter_hair": dict(
        title="Shorter hair: old hair + sketch",
        note="To make hair **shorter**, the old hair must go where the new hair does not reach, so the region to "
        "redraw is the old hair's matte *plus* the sketch's region (Hair Matte, mode 'union'); the model paints "
        "skin or background where there is no stroke.\n\n" + PROTECT_NOTE + " The Hair Matte preview shows the "
        "final region over the photo.",
        nodes=loaders()
        + protect_nodes()
        + model()
        + [
            sketch_node(),
            matte_node(links={"mask": (4, 0), "sketch": (2, 0), "exclude": PROTECT, "photo": (1, 0)}, grow_px=4),
            conditioning(),
        ]
        + sampler()
        + [save("hairdiff/shorter")],
    ),
    "hairdiff_draw_in_comfyui": dict(
        title="Paint the matte in ComfyUI",
        note="Everything inside ComfyUI, no other program: right-click the **Photo** node > Open in MaskEditor and "
        "paint over the hair you want to change (and where the new hair should go). Load your sketch in "
        "**Sketch** (or paint strokes on a blank image in any paint app). Hair Matte adds the painted area to "
        "the sketch's region.\n\nAs shipped nothing is painted yet, so only the sketch's region is used. "
        + PROTECT_NOTE
        + " Or delete Protect and set Hair Matte's mode to 'mask', so that only what you paint is redrawn.",
        note_drop=" --matte M",
        nodes=loaders(matte=False, photo_title="Photo (paint the hair in the mask editor)")
        + protect_nodes()
        + model()
        + [
            sketch_node(),
            matte_node(links={"mask": (1, 1), "sketch": (2, 0), "exclude": PROTECT, "photo": (1, 0)}, dilate=24),
            conditioning(),
        ]
        + sampler()
        + [save("hairdiff/painted")],
    ),
    "hairdiff_batch": dict(
        title="Several photos at once",
        note="Two portraits go through one graph: **Image Batch** stacks them (the second is resized to the "
        "first's size) and the sampler draws the same sketch and matte on each; one sketch/matte is shared, "
        "or give one per photo with batches of the same size. As shipped both are the sample photo; swap the "
        "**Second Portrait** for another one.\n\n**A whole folder** (photos of different sizes): run this "
        "API workflow once per photo, e.g. `for p in photos/*.jpg; do hairdiff comfy-run --workflow "
        'workflows/api/hairdiff_basic.json --image "$p" --sketch S --matte M --out out/; done`, or '
        "`hairdiff generate` on the command line.",
        nodes=loaders()
        + [
            dict(id=10, type="LoadImage", title="Second Portrait", widgets={"image": SAMPLES["photo"]}),
            dict(
                id=11, type="ImageBatch", title="Image Batch", widgets={}, links={"image1": (1, 0), "image2": (10, 0)}
            ),
            sketch_node(),
            matte_node(),
            conditioning(photo_from=(11, 0)),
        ]
        + model()
        + sampler()
        + [save("hairdiff/batch")],
    ),
}


def card(name: str) -> str:
    """The UI file's name, which is what ComfyUI's template browser shows as a pack template's
    title and description (frontend 1.35: no other field is read for custom-node templates):
    "HairDiff - <the template's title>", in characters every file system takes."""
    # ':' is not allowed on Windows and '+' is read as a space by some URL decoders.
    title = WORKFLOWS[name]["title"].replace(": ", " - ").replace(":", " ").replace(" + ", " and ")
    return "HairDiff - " + "".join(c for c in title if c not in '<>"/\\|?*')


def ui_path(name: str) -> Path:
    """Where the UI format of API template ``name`` lives (its thumbnail beside it, same stem)."""
    return HERE / f"{card(name)}.json"


def note_text(name: str, wf: dict) -> str:
    text = f"## {wf['title']}\n{wf['note']}\n\n"
    if wf.get("runnable", True):
        base = next(n["widgets"]["model"] for n in wf["nodes"] if n["type"] == "HairDiff_LoadBuiltin")
        text += (TOY_NOTE if base == TOY else TINY_NOTE).replace(
            " --matte M", "" if wf.get("note_drop") else " --matte M"
        )
        if any(n.get("links", {}).get("exclude") == PROTECT for n in wf["nodes"]):
            text = text.replace(" --out DIR", " --protect F --out DIR")  # F: transparent (or white) = keep
    return text.replace("{name}", name)


def _spec(info: dict, node_type: str) -> tuple[list[tuple[str, str, dict, bool]], list[str], list[str]]:
    """(inputs as (name, type, options, optional) in widget order, output types, output names)."""
    spec = info[node_type]
    inputs = []
    for section in ("required", "optional"):
        for name in spec.get("input_order", {}).get(section, []):
            raw = spec["input"][section][name]
            kind = raw[0]
            opts = raw[1] if len(raw) > 1 else {}
            kind = "COMBO" if isinstance(kind, list) else kind
            inputs.append((name, kind, opts, section == "optional"))
    return inputs, list(spec["output"]), list(spec["output_name"])


def build(info: dict, name: str, wf: dict) -> tuple[dict, dict]:
    nodes, links, api = [], [], {}
    by_id = {n["id"]: n for n in wf["nodes"]}
    out_links: dict[tuple[int, int], list[int]] = {}
    link_id = 0
    pending = []
    for n in wf["nodes"]:
        for inp, (src, slot) in n.get("links", {}).items():
            link_id += 1
            out_links.setdefault((src, slot), []).append(link_id)
            pending.append((link_id, src, slot, n["id"], inp))
    columns = {}
    for order, n in enumerate(wf["nodes"]):
        inputs, out_types, out_names = _spec(info, n["type"])
        ui_inputs, widgets = [], []
        for inp, kind, opts, optional in inputs:
            linked = inp in n.get("links", {})
            if kind in WIDGET_TYPES and not linked:
                value = n["widgets"].get(inp, opts.get("default"))
                if kind == "COMBO" and opts.get("image_upload"):
                    widgets += [value, "image"]
                    continue
                widgets.append(value)
                if opts.get("control_after_generate"):
                    widgets.append("fixed")
            else:
                lid = next((l[0] for l in pending if l[3] == n["id"] and l[4] == inp), None)
                entry = {"name": inp, "type": kind, "link": lid}
                if optional:
                    entry["shape"] = 7
                ui_inputs.append(entry)
        missing = set(n["widgets"]) - {i[0] for i in inputs}
        if missing:
            raise SystemExit(f"{name}: {n['type']} has no inputs {sorted(missing)}")
        ui_outputs = [
            {"name": out_names[i], "type": t, "links": out_links.get((n["id"], i), []), "slot_index": i}
            for i, t in enumerate(out_types)
        ]
        col = _column(n, by_id)
        row = columns.get(col, 0)
        columns[col] = row + 1
        nodes.append(
            {
                "id": n["id"],
                "type": n["type"],
                "title": n["title"],
                "pos": [40 + 380 * col, 60 + 300 * row],
                "size": [340, 260],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": ui_inputs,
                "outputs": ui_outputs,
                "properties": {"Node name for S&R": n["type"]},
                "widgets_values": widgets,
            }
        )
        api[str(n["id"])] = {
            "class_type": n["type"],
            "inputs": {
                **{k: v for k, v in n["widgets"].items()},
                **{k: [str(src), slot] for k, (src, slot) in n.get("links", {}).items()},
            },
            "_meta": {"title": n["title"]},
        }
    for lid, src, slot, dst, inp in pending:
        kind = _spec(info, by_id[src]["type"])[1][slot]
        dst_inputs = next(x for x in nodes if x["id"] == dst)["inputs"]
        dst_slot = next(i for i, x in enumerate(dst_inputs) if x["name"] == inp)
        links.append([lid, src, slot, dst, dst_slot, kind])
    note_id = max(by_id) + 1
    nodes.append(
        {
            "id": note_id,
            "type": "MarkdownNote",
            "title": wf["title"],
            "pos": [40, -260],
            "size": [700, 240],
            "flags": {},
            "order": len(nodes),
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {},
            "widgets_values": [note_text(name, wf)],
        }
    )
    ui = {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"hairdiff/{name}")),
        "revision": 0,
        "last_node_id": note_id,
        "last_link_id": link_id,
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 300]}, "hairdiff": {"title": wf["title"], "api": name}},
        "version": 0.4,
    }
    return ui, api


def _column(n: dict, by_id: dict) -> int:
    srcs = [src for src, _ in n.get("links", {}).values()]
    return 0 if not srcs else 1 + max(_column(by_id[s], by_id) for s in srcs)


def object_info_from_stubs() -> dict:
    """/object_info as the test stand-ins define it: HairDiff's schemas + tools/comfy_standins/core_nodes.json.

    For building without a ComfyUI server; ``tests/test_comfyui_server.py`` checks the core table
    against a live one.
    """
    import importlib
    import importlib.util
    import sys
    import tempfile
    import types

    spec = importlib.util.spec_from_file_location("hairdiff_comfy_stubs", STANDINS / "comfy_stubs.py")
    stubs = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = stubs
    spec.loader.exec_module(stubs)
    stubs.install(tempfile.mkdtemp())
    pack = types.ModuleType("hairdiff_pack")
    pack.__path__ = [str(ROOT)]
    sys.modules["hairdiff_pack"] = pack
    nodes = importlib.import_module("hairdiff_pack.nodes")
    info = {}
    for node in nodes.NODES:
        schema = node.GET_SCHEMA()
        entry = {
            "input": {"required": {}, "optional": {}},
            "input_order": {"required": [], "optional": []},
            "output": [o.io_type for o in schema.outputs],
            "output_name": [o.display_name or o.id for o in schema.outputs],
        }
        for i in schema.inputs:
            section = "optional" if i.optional else "required"
            opts = {"default": i.default} if i.default is not None else {}
            if i.control_after_generate:
                opts["control_after_generate"] = True
            entry["input"][section][i.id] = [i.io_type, opts]
            entry["input_order"][section].append(i.id)
        info[schema.node_id] = entry
    core = json.loads((STANDINS / "core_nodes.json").read_text())
    for name, spec_ in core.items():
        if name.startswith("_"):
            continue
        entry = {
            "input": {"required": {}, "optional": {}},
            "input_order": {"required": [], "optional": []},
            "output": spec_["outputs"],
            "output_name": spec_["outputs"],
        }
        for inp, kind, optional, extra in spec_["inputs"]:
            section = "optional" if optional else "required"
            opts = {}
            if extra and kind == "COMBO":
                opts["image_upload"] = True
            elif extra:
                opts["control_after_generate"] = True
            entry["input"][section][inp] = [kind, opts]
            entry["input_order"][section].append(inp)
        info[name] = entry
    return info


def thumbnail(name: str, wf: dict, path: Path) -> None:
    """A 512-px-wide JPEG: the sample photo with this template's matte tinted over it, the sketch, the title."""
    import sys

    sys.path.insert(0, str(ROOT))
    import torch
    from PIL import Image, ImageDraw

    from hairdiff_core.data.imageio import load_image, to_pil
    from hairdiff_core.method.mask import compose_matte, matte_preview, protect_mask

    assets = ROOT / "hairdiff_core" / "assets"
    photo, sketch = load_image(assets / "sample_photo.png"), load_image(assets / "sample_sketch.png")
    matte = load_image(assets / "sample_matte.png")
    kinds = {n["type"]: n for n in wf["nodes"]}
    hm = kinds.get("HairDiff_HairMatte", {})
    links = hm.get("links", {})
    use_mask = "mask" in links and links["mask"][0] == 4
    use_sketch = "sketch" in links
    # Protect: Load Image's MASK, 1 - alpha (the face is transparent).
    protect = protect_mask(load_image(assets / "sample_face_protect.png")) if links.get("exclude") == PROTECT else None
    composed = compose_matte(
        matte if use_mask else None,
        sketch if use_sketch else None,
        protect,
        mode=hm.get("widgets", {}).get("mode", "union"),
        sketch_dilate_px=hm.get("widgets", {}).get("sketch_dilate_px", 16),
        grow_px=hm.get("widgets", {}).get("grow_px", 0),
        feather_px=2.0,
    )
    colour = (0.85, 0.35, 0.1) if "colour" in name else (0.2, 0.5, 1.0)
    tiles = [matte_preview(photo, composed.soft, colour=colour), sketch]
    if name == "hairdiff_batch":
        tiles.insert(
            1, matte_preview(torch.flip(photo, dims=(-1,)), torch.flip(composed.soft, dims=(-1,)), colour=colour)
        )
    h = 300
    images = [to_pil(t).resize((round(t.shape[-1] * h / t.shape[-2]), h)) for t in tiles]
    width = sum(im.width for im in images) + 8 * (len(images) + 1)
    canvas = Image.new("RGB", (width, h + 56), (24, 24, 28))
    x = 8
    for im in images:
        canvas.paste(im, (x, 8))
        x += im.width + 8
    ImageDraw.Draw(canvas).text((12, h + 20), wf["title"], fill=(235, 235, 235))
    canvas = canvas.resize((512, round(canvas.height * 512 / canvas.width)))
    canvas.save(path, quality=88)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--object-info", help="ComfyUI's /object_info JSON (HairDiff installed)")
    src.add_argument(
        "--from-stubs",
        action="store_true",
        help="take the node definitions from the ComfyUI stand-ins (HairDiff's schemas + tools/comfy_standins/core_nodes.json), no server",
    )
    parser.add_argument("--no-thumbnails", action="store_true", help="do not (re)write the <name>.jpg thumbnails")
    args = parser.parse_args()
    info = object_info_from_stubs() if args.from_stubs else json.loads(Path(args.object_info).read_text())
    (HERE / "api").mkdir(exist_ok=True)
    for name, wf in WORKFLOWS.items():
        ui, api = build(info, name, wf)
        ui_path(name).write_text(json.dumps(ui, indent=2) + "\n")
        (HERE / "api" / f"{name}.json").write_text(json.dumps(api, indent=2) + "\n")
        if not args.no_thumbnails:
            thumbnail(name, wf, ui_path(name).with_suffix(".jpg"))
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
