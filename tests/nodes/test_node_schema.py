"""Node schemas and registration: the conventions every HairDiff node keeps."""

from __future__ import annotations

import asyncio
import importlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_one_v3_entrypoint_lists_every_node(comfy):
    pack_root = importlib.import_module("hairdiff_pack.nodes")
    ext = asyncio.run(pack_root.comfy_entrypoint())
    nodes = asyncio.run(ext.get_node_list())
    assert nodes == comfy.nodes.NODES and len(nodes) == 11
    root_src = (ROOT / "__init__.py").read_text()
    assert "NODE_CLASS_MAPPINGS" not in root_src  # a V1 export would hide the V3 entry point


def test_schemas_follow_the_conventions(comfy):
    ids = []
    for node in comfy.nodes.NODES:
        schema = node.GET_SCHEMA()  # includes ComfyUI's unique-id validation
        ids.append(schema.node_id)
        assert re.fullmatch(r"HairDiff_[A-Za-z]+", schema.node_id)
        assert schema.category.startswith("HairDiff/")
        words = schema.display_name.split()
        assert all(w[0].isupper() for w in words), schema.display_name
        assert len(schema.description) > 40
        for inp in schema.inputs:
            assert inp.tooltip and len(inp.tooltip) > 15, f"{schema.node_id}.{inp.id} has no tooltip"
        for out in schema.outputs:
            assert out.tooltip, f"{schema.node_id} output {out.id}"
    assert len(set(ids)) == len(ids)


def test_model_folder_is_registered_and_listed(comfy):
    fp = comfy.folder_paths
    assert "hairdiff" in fp.folder_names_and_paths
    folder = Path(fp.folder_names_and_paths["hairdiff"][0][0])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_adapter.safetensors").write_bytes(b"")
    (folder / "notes.txt").write_text("x")
    native = comfy.nodes.native_nodes
    options = native.HairDiffApplyAdapter.GET_SCHEMA().inputs[1].options
    assert "hairdiff/my_adapter.safetensors" in options and options[0] == native.BUILTIN_TOY_ADAPTER
    assert not any(o.endswith("notes.txt") for o in options)


def test_root_init_is_import_safe_without_comfyui():
    code = (
        "import importlib.util, sys;"
        f"spec = importlib.util.spec_from_file_location('hairdiff_root', r'{ROOT / '__init__.py'}', "
        f"submodule_search_locations=[r'{ROOT}']);"
        "m = importlib.util.module_from_spec(spec); sys.modules['hairdiff_root'] = m; spec.loader.exec_module(m);"
        "assert not hasattr(m, 'comfy_entrypoint'); assert 'comfy' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_missing_model_files_are_refused_at_validation(comfy):
    adapter = comfy.nodes.native_nodes.HairDiffApplyAdapter
    assert adapter.validate_inputs(adapter=comfy.nodes.native_nodes.BUILTIN_TOY_ADAPTER) is True
    msg = adapter.validate_inputs(adapter="hairdiff/nope.safetensors")
    assert "input 'adapter' is 'hairdiff/nope.safetensors'" in msg


def test_sampling_node_defaults_are_the_cores(comfy):
    defaults = comfy.core.defaults.DEFAULTS
    native = comfy.nodes.native_nodes

    def defaults_of(node):
        return {inp.id: inp.default for inp in node.GET_SCHEMA().inputs if getattr(inp, "default", None) is not None}

    sample, scheduler = defaults_of(native.HairDiffSample), defaults_of(native.HairDiffScheduler)
    for name in ("seed", "steps", "cfg", "strength"):
        assert sample[name] == getattr(defaults, name), name
    assert scheduler["steps"] == defaults.steps and scheduler["strength"] == defaults.strength
    assert defaults_of(native.HairDiffSketchConditioning)["feather"] == defaults.feather_at_1024
