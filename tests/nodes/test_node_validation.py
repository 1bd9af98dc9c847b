"""Every COMBO of every node is checked at validation; errors name their input through the
error's ``input`` field; users see the exception's short class name; the templates' sample
images are installed into ComfyUI's input folder when absent."""

from __future__ import annotations

import inspect
import types

import pytest
import torch


def _combos(node):
    return [inp for inp in node.define_schema().inputs if isinstance(getattr(inp, "options", None), list)]


def test_every_combo_of_every_node_refuses_an_unknown_value(comfy):
    checked = 0
    for node in comfy.nodes.NODES:
        combos = _combos(node)
        if not combos:
            continue
        params = inspect.signature(node.validate_inputs).parameters
        for inp in combos:
            assert inp.id in params, f"{node.__name__}.validate_inputs does not take the COMBO '{inp.id}'"
            good = {c.id: c.options[0] for c in combos if c.options}
            assert node.validate_inputs(**good) is True
            verdict = node.validate_inputs(**{**good, inp.id: "purple"})
            assert isinstance(verdict, str), (node.__name__, inp.id)
            assert f"input '{inp.id}' is 'purple'" in verdict
            for option in inp.options[:3]:
                assert repr(option) in verdict  # the allowed values are listed
            others = [c.id for c in combos if c.id != inp.id]
            assert not any(f"input '{o}'" in verdict for o in others)  # only the wrong input is named
            checked += 1
    # background, base_model, adapter, dtype, device, lora_name, mode, reference_input
    assert checked >= 7


def test_core_errors_map_to_the_node_input_by_field(comfy):
    native = comfy.nodes.native_nodes
    photo = torch.rand(1, 32, 48, 3)
    matte = torch.zeros(1, 32, 48)  # empty: the core's EmptyMaskError says input="matte"
    text = [[torch.zeros(1, 77, 32), {"pooled_output": torch.zeros(1, 32)}]]
    vae = types.SimpleNamespace(encode=lambda x: torch.zeros(x.shape[0], 16, x.shape[1] // 8, x.shape[2] // 8))
    with pytest.raises(ValueError) as info:
        native.HairDiffSketchConditioning.execute(text, text, vae, photo, photo, matte, 64, 10.0)
    err = info.value
    assert err.input == "matte" and "input 'matte'" in str(err)
    assert type(err).__module__ == "builtins" and type(err).__name__ == "EmptyMaskError"
    assert isinstance(err, comfy.core.errors.EmptyMaskError)
    with pytest.raises(ValueError) as info:
        comfy.nodes.native_reference.HairDiffReferenceAttention.execute(
            model=types.SimpleNamespace(), mode="once", weight_outside=-1.0
        )
    assert info.value.input == "weight_outside" and "input 'weight_outside'" in str(info.value)


def test_short_exception_type_as_comfyui_prints_it(comfy):
    from hairdiff_pack.nodes.convert import node_error

    err = node_error("Node", "x", comfy.core.errors.InputError("bad"))
    twice = node_error("Node", "x", err)
    # ComfyUI's full_type_name: module + "." + qualname unless the module is builtins.
    for e in (err, twice):
        cls = type(e)
        shown = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
        assert shown == "InputError"


def test_a_missing_model_file_is_reported_once(comfy):
    # resolve() raises the node's own error; it must reach the user as is, not wrapped in a second
    # "HairDiff Apply Adapter: input 'adapter':" with a second fix.
    from hairdiff_pack.nodes.model_folders import resolve

    with pytest.raises(ValueError) as info:
        resolve("hairdiff/gone.safetensors", "HairDiff Apply Adapter", "adapter")
    text = str(info.value)
    assert text.count("HairDiff Apply Adapter") == 1 and text.count(" -> ") == 1, text
    assert "gone.safetensors" in text and info.value.input == "adapter"


def test_template_samples_are_installed_once_never_overwritten(comfy, tmp_path):
    from hairdiff_pack.nodes.template_inputs import TEMPLATE_INPUTS, install_template_inputs

    (tmp_path / "hairdiff_photo.png").write_bytes(b"mine")
    written = install_template_inputs(tmp_path)
    assert sorted(p.name for p in written) == sorted(set(TEMPLATE_INPUTS) - {"hairdiff_photo.png"})
    assert "hairdiff_face_protect.png" in TEMPLATE_INPUTS  # the shorter-hair and draw-in-ComfyUI protect mask
    assert (tmp_path / "hairdiff_photo.png").read_bytes() == b"mine"
    assert install_template_inputs(tmp_path) == []
    from PIL import Image

    with Image.open(tmp_path / "hairdiff_sketch.png") as im:
        im.load()
