"""Load HairDiff Model with an adapter file, and HairDiff LoRA on top of an adapter's PEFT layers."""

from __future__ import annotations

import importlib

import pytest
import torch


def _inputs(size=64):
    g = torch.Generator().manual_seed(2)
    photo = torch.rand(1, size, size, 3, generator=g)
    sketch = torch.zeros(1, size, size, 3)
    sketch[:, 20:24, 8:56] = 1.0
    matte = torch.zeros(1, size, size)
    matte[:, 10:40, 6:58] = 1.0
    return dict(photo=photo, sketch=sketch, matte=matte)


@pytest.fixture(scope="module")
def adapter_file(comfy):
    """A tiny-model adapter with non-zero LoRA and sketch channels, saved by the core into models/hairdiff."""
    tiny = importlib.import_module("hairdiff_pack.hairdiff_core.tiny")
    lora = importlib.import_module("hairdiff_pack.hairdiff_core.lora")
    adapter = importlib.import_module("hairdiff_pack.hairdiff_core.adapter")
    surgery = importlib.import_module("hairdiff_pack.hairdiff_core.surgery")
    model = surgery.widen_input_channels(tiny.build_tiny_transformer())
    g = torch.Generator().manual_seed(3)
    lora.add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.pos_embed.proj.weight[:, 16:] = torch.randn(model.pos_embed.proj.weight[:, 16:].shape, generator=g) * 0.2
    folder = comfy.models_dir / "hairdiff"
    folder.mkdir(parents=True, exist_ok=True)
    adapter.save_adapter(model, folder / "tiny_adapter.safetensors", step=1)
    return "hairdiff/tiny_adapter.safetensors"


def _run(comfy, model, steps=2):
    return comfy.nodes.HairDiffSampler.execute(model=model, steps=steps, seed=3, **_inputs())[0]


def test_adapter_is_applied_and_listed(comfy, adapter_file):
    assert adapter_file in comfy.nodes.LoadHairDiffModel.GET_SCHEMA().inputs[1].options
    plain = comfy.nodes.LoadHairDiffModel.execute(base_model="tiny (wiring check)", adapter="none")[0]
    adapted = comfy.nodes.LoadHairDiffModel.execute(base_model="tiny (wiring check)", adapter=adapter_file)[0]
    assert "adapter" in adapted.source
    assert not torch.equal(_run(comfy, plain), _run(comfy, adapted))


def test_extra_lora_patches_the_adapters_base_layers(comfy, adapter_file):
    from safetensors.torch import save_file

    adapted = comfy.nodes.LoadHairDiffModel.execute(base_model="tiny (wiring check)", adapter=adapter_file)[0]
    keymap = comfy.nodes.model_nodes.lora_key_map(adapted.patcher.model)
    name = next(
        n for n, m in adapted.transformer.named_modules() if n.endswith("attn.to_q") and hasattr(m, "base_layer")
    )
    assert keymap[f"transformer.{name}"] == f"transformer.{name}.base_layer.weight"
    lin = adapted.transformer.get_submodule(name).base_layer
    g = torch.Generator().manual_seed(4)
    loras = comfy.models_dir / "loras"
    loras.mkdir(exist_ok=True)
    save_file(
        {
            f"transformer.{name}.lora_A.weight": torch.randn(2, lin.in_features, generator=g),
            f"transformer.{name}.lora_B.weight": torch.randn(lin.out_features, 2, generator=g),
        },
        str(loras / "on_adapter.safetensors"),
    )
    before = _run(comfy, adapted)
    extra = comfy.nodes.HairDiffLoRA.execute(model=adapted, lora_name="loras/on_adapter.safetensors", strength=1.0)[0]
    assert not torch.equal(_run(comfy, extra), before)
    assert torch.equal(_run(comfy, adapted), before)


def test_adapter_errors_name_the_input(comfy):
    folder = comfy.models_dir / "hairdiff"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="input 'adapter'"):
        comfy.nodes.LoadHairDiffModel.execute(base_model="tiny (wiring check)", adapter="hairdiff/broken.safetensors")


def test_lora_node_reads_every_key_prefix_the_core_reads(comfy):
    model = comfy.nodes.LoadHairDiffModel.execute(base_model="tiny (wiring check)", adapter="none")[0]
    keymap = comfy.nodes.model_nodes.lora_key_map(model.patcher.model)
    name = next(n for n, _ in model.transformer.named_modules() if n.endswith("attn.to_q"))
    for prefix in comfy.core.lora.LORA_KEY_PREFIXES + ("",):
        assert keymap[prefix + name].endswith(f"{name}.weight"), prefix
