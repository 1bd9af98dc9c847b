"""Writes HairDiff's workflows in both of ComfyUI's formats from one description of each graph.

    curl -s http://127.0.0.1:8188/object_info > /tmp/object_info.json   # a ComfyUI with HairDiff installed
    python workflows/build_workflows.py --object-info /tmp/object_info.json

UI format (``workflows/*.json``): what the ComfyUI frontend opens; ComfyUI lists the first-level
``*.json`` of a pack's ``workflows/`` folder as the pack's templates. API format
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
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TINY = "tiny (wiring check)"


def loaders(photo=True, matte=True):
    nodes = []
    if photo:
        nodes.append(dict(id=1, type="LoadImage", title="Photo", widgets={"image": "hairdiff_photo.png"}))
    nodes.append(dict(id=2, type="LoadImage", title="Sketch", widgets={"image": "hairdiff_sketch.png"}))
    if matte:
        nodes.append(dict(id=3, type="LoadImage", title="Matte", widgets={"image": "hairdiff_matte.png"}))
        nodes.append(dict(id=4, type="ImageToMask", title="Matte To Mask", widgets={"channel": "red"}, links={"image": (3, 0)}))
    return nodes


def model(base=TINY, adapter="none"):
    return dict(id=5, type="HairDiff_LoadModel", title="Load HairDiff Model",
                widgets={"base_model": base, "adapter": adapter, "dtype": "auto", "device": "auto"})


def sketch_node():
    return dict(id=6, type="HairDiff_SketchPreprocess", title="HairDiff Sketch Preprocess",
                widgets={"background": "auto", "invert": False, "threshold": 0.2, "thickness_px": 0},
                links={"sketch": (2, 0), "photo": (1, 0)})


def sampler(model_from=5, matte_from=(7, 0), steps=20, cfg=1.0, extra_links=None):
    links = {"model": (model_from, 0), "photo": (1, 0), "sketch": (6, 0), "matte": matte_from}
    links.update(extra_links or {})
    return dict(id=8, type="HairDiff_Sampler", title="HairDiff Sampler",
                widgets={"seed": 42, "steps": steps, "cfg": cfg, "shift": 3.0, "strength": 1.0, "paste_back": True,
                         "feather": 10.0},
                links=links)


def save(prefix):
    return dict(id=9, type="SaveImage", title="Save Image", widgets={"filename_prefix": prefix}, links={"images": (8, 0)})


def matte_node(from_sketch=False):
    if from_sketch:
        return dict(id=7, type="HairDiff_HairMatte", title="HairDiff Hair Matte",
                    widgets={"grow_px": 8, "feather_sigma": 4.0, "threshold": 0.5, "sketch_dilate_px": 24},
                    links={"sketch": (2, 0)})
    return dict(id=7, type="HairDiff_HairMatte", title="HairDiff Hair Matte",
                widgets={"grow_px": 0, "feather_sigma": 4.0, "threshold": 0.5, "sketch_dilate_px": 16},
                links={"mask": (4, 0)})


TINY_NOTE = ("Runs with the built-in **tiny (wiring check)** model: no model files needed, the 'hair' it draws "
             "is noise. For real results pick an SD3.5 model (models/checkpoints, models/diffusion_models or "
             "models/diffusers) and a HairDiff adapter (models/hairdiff) in Load HairDiff Model.\n\n"
             "Inputs: put your photo, sketch and matte (white = hair) in ComfyUI's input folder, or run it "
             "headless: `hairdiff comfy-run --workflow workflows/api/{name}.json --image P --sketch S --matte M --out DIR`.")

WORKFLOWS = {
    "hairdiff_basic": dict(
        note="## HairDiff: sketch + matte to hair\n" + TINY_NOTE,
        nodes=loaders() + [model(), sketch_node(), matte_node(), sampler(), save("hairdiff/basic")],
    ),
    "hairdiff_reference_attention": dict(
        note="## HairDiff with reference attention\nThe new hair attends to the photo's keys/values and takes its "
             "light and colour ('once' costs about 1x, 'per_step' about 2x).\n" + TINY_NOTE,
        nodes=loaders() + [model(), sketch_node(), matte_node(),
                           dict(id=10, type="HairDiff_ReferenceAttention", title="HairDiff Reference Attention",
                                widgets={"mode": "once", "weight_inside": 0.5, "weight_outside": 1.0,
                                         "suppress_self_outside": 0.0, "key_weight_inside": 0.0,
                                         "reference_input": "photo", "key_pool": "1", "key_ring": 0},
                                links={"model": (5, 0)}),
                           sampler(model_from=10), save("hairdiff/reference")],
    ),
    "hairdiff_colour_prompt": dict(
        note="## HairDiff with a colour prompt (SD3 text encoders)\n**Needs model files** (the tiny model takes no "
             "prompt):\n- `models/checkpoints/sd3.5_medium.safetensors` (SD3.5 Medium, VAE inside)\n"
             "- `models/hairdiff/hairdiff_sd3.5_medium.safetensors` (a HairDiff adapter trained for it)\n"
             "- `models/text_encoders/clip_l.safetensors`, `clip_g.safetensors`, `t5xxl_fp16.safetensors`\n\n"
             "The prompt names the hair colour; cfg 4 uses the negative prompt. The sampler's 'vae' input is "
             "left open: the checkpoint's own VAE is used (connect Load VAE to use ComfyUI's instead).\n"
             "Headless: `hairdiff comfy-run --workflow workflows/api/hairdiff_colour_prompt.json --image P "
             "--sketch S --matte M --set 'Hair Colour Prompt.text=copper red hair' --out DIR`.",
        nodes=loaders() + [
            model(base="checkpoints/sd3.5_medium.safetensors", adapter="hairdiff/hairdiff_sd3.5_medium.safetensors"),
            sketch_node(), matte_node(),
            dict(id=11, type="TripleCLIPLoader", title="SD3 Text Encoders",
                 widgets={"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                          "clip_name3": "t5xxl_fp16.safetensors"}),
            dict(id=12, type="CLIPTextEncode", title="Hair Colour Prompt", widgets={"text": "platinum blonde hair"},
                 links={"clip": (11, 0)}),
            dict(id=13, type="CLIPTextEncode", title="Negative Prompt", widgets={"text": ""}, links={"clip": (11, 0)}),
            sampler(steps=28, cfg=4.0, extra_links={"positive": (12, 0), "negative": (13, 0)}),
            save("hairdiff/colour")],
    ),
    "hairdiff_matte_from_sketch": dict(
        note="## HairDiff without a matte\nHair Matte makes a rough matte from the sketch: the strokes plus the "
             "region they enclose, closed and grown by a few pixels. Draw the outline of the new hair.\n"
             + TINY_NOTE.replace(" --matte M", ""),
        nodes=loaders(matte=False) + [model(), sketch_node(), matte_node(from_sketch=True), sampler(),
                                      save("hairdiff/matte_from_sketch")],
    ),
}


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
        ui_outputs = [{"name": out_names[i], "type": t, "links": out_links.get((n["id"], i), []), "slot_index": i}
                      for i, t in enumerate(out_types)]
        col = _column(n, by_id)
        row = columns.get(col, 0)
        columns[col] = row + 1
        nodes.append({
            "id": n["id"], "type": n["type"], "title": n["title"], "pos": [40 + 380 * col, 60 + 300 * row],
            "size": [340, 260], "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs, "outputs": ui_outputs,
            "properties": {"Node name for S&R": n["type"]}, "widgets_values": widgets,
        })
        api[str(n["id"])] = {
            "class_type": n["type"],
            "inputs": {**{k: v for k, v in n["widgets"].items()},
                       **{k: [str(src), slot] for k, (src, slot) in n.get("links", {}).items()}},
            "_meta": {"title": n["title"]},
        }
    for lid, src, slot, dst, inp in pending:
        kind = _spec(info, by_id[src]["type"])[1][slot]
        dst_inputs = next(x for x in nodes if x["id"] == dst)["inputs"]
        dst_slot = next(i for i, x in enumerate(dst_inputs) if x["name"] == inp)
        links.append([lid, src, slot, dst, dst_slot, kind])
    note_id = max(by_id) + 1
    nodes.append({"id": note_id, "type": "MarkdownNote", "title": "About this workflow", "pos": [40, -260],
                  "size": [700, 240], "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                  "properties": {}, "widgets_values": [wf["note"].format(name=name)]})
    ui = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"hairdiff/{name}")), "revision": 0, "last_node_id": note_id,
          "last_link_id": link_id, "nodes": nodes, "links": links, "groups": [], "config": {},
          "extra": {"ds": {"scale": 0.8, "offset": [0, 300]}}, "version": 0.4}
    return ui, api


def _column(n: dict, by_id: dict) -> int:
    srcs = [src for src, _ in n.get("links", {}).values()]
    return 0 if not srcs else 1 + max(_column(by_id[s], by_id) for s in srcs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--object-info", required=True, help="ComfyUI's /object_info JSON (HairDiff installed)")
    args = parser.parse_args()
    info = json.loads(Path(args.object_info).read_text())
    (HERE / "api").mkdir(exist_ok=True)
    for name, wf in WORKFLOWS.items():
        ui, api = build(info, name, wf)
        (HERE / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
        (HERE / "api" / f"{name}.json").write_text(json.dumps(api, indent=2) + "\n")
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
