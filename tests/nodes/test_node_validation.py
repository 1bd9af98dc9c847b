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
    """At submit (validate_inputs, a node with one COMBO) or first thing in execute (check_widgets,
    a node with several): an unknown value names its input and the allowed values."""
    from hairdiff_pack.nodes.convert import check_widgets

    checked = 0
    for node in comfy.nodes.NODES:
        combos = _combos(node)
        if not combos:
            continue
        params = inspect.signature(node.validate_inputs).parameters if hasattr(node, "validate_inputs") else {}
        for inp in combos:
            if inp.id in params:
                good = {c.id: c.options[0] for c in combos if c.options}
                assert node.validate_inputs(**good) is True
                verdict = node.validate_inputs(**{**good, inp.id: "purple"})
                assert isinstance(verdict, str), (node.__name__, inp.id)
            else:
                with pytest.raises(ValueError) as info:
                    check_widgets(node, {inp.id: "purple"})
                verdict = str(info.value)
                assert inspect.getsource(node.execute).count("check_widgets(") == 1, node.__name__
            assert f"input '{inp.id}'" in verdict and "'purple'" in verdict and "\n" not in verdict
            for option in inp.options[:3]:
                assert repr(option) in verdict  # the allowed values are listed
            checked += 1
    # background, mode, encoders, model, adapter; mode, reference_input, reference_noise, key_pool
    assert checked >= 9


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


def test_each_validation_message_appears_once(comfy):
    """ComfyUI repeats a validate_inputs message once per argument of validate_inputs: every node's
    takes at most one (several inputs are checked first thing in execute instead)."""
    for node in comfy.nodes.NODES:
        fn = getattr(node, "validate_inputs", None)
        if fn is None:
            continue
        params = [p for p in inspect.signature(fn).parameters if p != "cls"]
        assert len(params) <= 1, (node.__name__, params)


@pytest.mark.parametrize(
    "node, values, name",
    [
        ("native_reference.HairDiffReferenceAttention", {"weight_outside": float("nan")}, "weight_outside"),
        ("native_nodes.HairDiffSample", {"cfg": float("nan")}, "cfg"),
        ("native_nodes.HairDiffScheduler", {"strength": float("inf")}, "strength"),
        ("native_nodes.HairDiffSketchConditioning", {"feather": 1e308}, "feather"),
        ("native_reference.HairDiffReferenceAttention", {"mode": "sometimes"}, "mode"),
    ],
)
def test_nan_and_out_of_range_widgets_are_refused_with_the_widgets_range(comfy, node, values, name):
    from hairdiff_pack.nodes.convert import check_widgets

    module, cls = node.split(".")
    node_cls = getattr(getattr(comfy.nodes, module), cls)
    with pytest.raises(ValueError) as info:
        check_widgets(node_cls, values)
    text = str(info.value)
    assert info.value.input == name and f"input '{name}'" in text and "\n" not in text
    spec = next(i for i in node_cls.define_schema().inputs if i.id == name)
    if getattr(spec, "options", None) is None:
        assert f"{spec.min} to {spec.max}" in text
    assert check_widgets(node_cls, {name: spec.default}) is None
