"""Load HairDiff Model's weights/offload options and the memory the sampler asks ComfyUI for."""

from __future__ import annotations

import pytest
import torch

TINY = "tiny (wiring check)"


def _inputs(size: int, batch: int = 1):
    g = torch.Generator().manual_seed(1)
    photo = torch.rand(batch, size, size, 3, generator=g)
    sketch = torch.zeros(batch, size, size, 3)
    sketch[:, size // 4 : size // 4 + 3, 8 : size - 8] = 1.0
    matte = torch.zeros(batch, size, size)
    matte[:, size // 8 : size // 2, size // 8 : size - size // 8] = 1.0
    return photo, sketch, matte


def _sample(comfy, model, size=64, **kw):
    photo, sketch, matte = _inputs(size)
    return comfy.nodes.HairDiffSampler.execute(
        model=model, photo=photo, sketch=sketch, matte=matte, steps=2, seed=3, **kw
    )


@pytest.fixture(scope="module")
def fp8_model(comfy):
    return comfy.nodes.LoadHairDiffModel.execute(base_model=TINY, adapter="none", weights="fp8_e4m3fn", offload="none")[
        0
    ]


def test_memory_required_follows_the_core_estimate(comfy, fp8_model):
    from hairdiff_pack.hairdiff_core import memory as core
    from hairdiff_pack.nodes import sampler_node

    model = fp8_model

    def need(size, cfg=1.0, reference=None):
        m = model.replace(reference=reference)
        photo = torch.zeros(1, 3, size, size)
        est = core.estimate_for(
            m.transformer,
            m.family,
            offload="none",
            height=size,
            width=size,
            cfg=cfg,
            reference=reference.mode if reference else "off",
        )
        got = sampler_node.memory_required(m, photo, cfg)
        assert got == est.beyond_weights  # ComfyUI already counts the (fp8) weights themselves
        return got

    from hairdiff_pack.hairdiff_core.reference import ReferenceSettings

    once = ReferenceSettings(mode="once")
    assert need(64) < need(128) < need(256)  # resolution
    assert need(128) < need(128, cfg=3.0)  # cfg doubles the batch
    assert need(128) < need(128, reference=once)  # reference cache and bias
    # What the sampler hands to ComfyUI is that figure.
    _sample(comfy, model)
    patcher, required, _ = comfy.mm.load_calls[-1]
    assert patcher is model.patcher and required == sampler_node.memory_required(model, torch.zeros(1, 3, 64, 64), 1.0)


def test_fp8_weights_run_and_comfyui_lora_patches_still_apply(comfy, fp8_model):
    from safetensors.torch import save_file

    t = fp8_model.transformer
    assert t.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert t.pos_embed.proj.weight.dtype == fp8_model.dtype  # the patch embedding computes as is
    # ComfyUI sizes the model by its stored bytes: 1 instead of 4 per fp8 weight.
    fp32 = comfy.nodes.LoadHairDiffModel.execute(base_model=TINY, adapter="none", weights="auto")[0]
    stored = sum(p.numel() for p in t.parameters() if p.dtype == torch.float8_e4m3fn)
    assert stored > 0.5 * sum(p.numel() for p in t.parameters())
    assert fp32.patcher.model_size() - fp8_model.patcher.model_size() == 3 * stored

    loras = comfy.models_dir / "loras"
    loras.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, mod in t.named_modules():
        if name.endswith("attn.to_q"):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(2, mod.in_features, generator=g) * 0.5
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 2, generator=g) * 0.5
    save_file(sd, str(loras / "fp8_extra.safetensors"))
    plain = _sample(comfy, fp8_model)[0]
    patched = comfy.nodes.HairDiffLoRA.execute(model=fp8_model, lora_name="loras/fp8_extra.safetensors", strength=1.0)[
        0
    ]
    with_lora = _sample(comfy, patched)[0]
    assert torch.isfinite(with_lora).all() and not torch.allclose(with_lora, plain, atol=1e-3)
    # The fp8 weights are restored for the unpatched model.
    assert torch.equal(_sample(comfy, fp8_model)[0], plain)


def test_block_offload_matches_none_and_asks_comfyui_for_room(comfy, fp8_model):
    blocks = comfy.nodes.LoadHairDiffModel.execute(
        base_model=TINY, adapter="none", weights="fp8_e4m3fn", offload="blocks"
    )[0]
    assert blocks.offload == "blocks" and blocks.patcher.load_device.type == "cpu"
    comfy.mm.free_calls.clear()
    expected = _sample(comfy, fp8_model)[0]
    got = _sample(comfy, blocks)[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # ComfyUI was asked to make room for the whole estimate (the weights are not on its books) ...
    from hairdiff_pack.nodes import sampler_node

    assert comfy.mm.free_calls[-1][0] == sampler_node.memory_required(blocks, torch.zeros(1, 3, 64, 64), 1.0)
    # ... and the offload hooks are gone after sampling.
    from hairdiff_pack.hairdiff_core.memory import is_offloaded

    assert not is_offloaded(blocks.transformer)


def test_auto_picks_from_the_free_vram(comfy, monkeypatch):
    from hairdiff_pack.hairdiff_core import memory

    # A "GPU" the loader never runs on: only the choice is checked.
    monkeypatch.setattr(comfy.mm, "get_torch_device", lambda: torch.device("meta"))
    monkeypatch.setattr(comfy.mm, "free_vram", 64 * 2**30)
    roomy = comfy.nodes.LoadHairDiffModel.execute(base_model=TINY, adapter="none")[0]
    assert roomy.offload == "none" and memory.weights_of(roomy.transformer) == "fp32"
    monkeypatch.setattr(comfy.mm, "free_vram", 2**20)  # 1 MB: nothing fits
    tight = comfy.nodes.LoadHairDiffModel.execute(base_model=TINY, adapter="none")[0]
    assert tight.offload == "blocks" and memory.weights_of(tight.transformer) == "fp8_e4m3fn"
    assert tight.patcher.load_device.type == "cpu" and tight.run_device.type == "meta"
    fixed = comfy.nodes.LoadHairDiffModel.execute(base_model=TINY, adapter="none", weights="bf16", offload="none")[0]
    assert fixed.offload == "none" and memory.weights_of(fixed.transformer) == "bf16"


def test_auto_plans_with_the_vram_left_after_comfyuis_reserve(comfy, monkeypatch):
    # --reserve-vram: ComfyUI's get_free_memory still reports the whole card free, but
    # load_models_gpu keeps the reserve free beside every model; auto must plan without it.
    from hairdiff_pack.hairdiff_core import memory

    monkeypatch.setattr(comfy.mm, "get_torch_device", lambda: torch.device("meta"))
    need = memory.estimate_peak_vram("tiny", weights="auto", compute_dtype=torch.float32, reference="once").total
    monkeypatch.setattr(comfy.mm, "free_vram", 4 * need)  # everything fits ...
    monkeypatch.setattr(comfy.mm, "reserved_vram", 0)
    roomy = comfy.nodes.LoadHairDiffModel.execute(base_model=TINY, adapter="none")[0]
    assert roomy.offload == "none" and memory.weights_of(roomy.transformer) == "fp32"
    monkeypatch.setattr(comfy.mm, "reserved_vram", 4 * need - 2**20)  # ... until the reserve leaves 1 MB
    tight = comfy.nodes.LoadHairDiffModel.execute(base_model=TINY, adapter="none")[0]
    assert tight.offload == "blocks" and memory.weights_of(tight.transformer) == "fp8_e4m3fn"


def test_gguf_transformers_are_listed_and_load(comfy):
    pytest.importorskip("gguf", reason="the optional gguf package is not installed (pip install 'hairdiff[gguf]')")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_gguf_test", Path(__file__).parents[1] / "test_gguf.py")
    gguf_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gguf_test)
    from hairdiff_core.tiny import build_tiny_transformer

    folder = comfy.models_dir / "diffusion_models"
    folder.mkdir(exist_ok=True)
    gguf_test.write_q8_gguf(build_tiny_transformer(), folder / "tiny-Q8_0.gguf")
    choice = "diffusion_models/tiny-Q8_0.gguf"
    assert choice in comfy.nodes.LoadHairDiffModel.define_schema().inputs[0].options
    model = comfy.nodes.LoadHairDiffModel.execute(base_model=choice, adapter="none")[0]
    assert model.family == "tiny" and model.vae is None  # GGUF files hold the transformer only
    assert type(model.transformer.transformer_blocks[0].attn.to_q).__name__ == "GGUFLinear"


def test_model_offload_gives_the_gpu_back_after_sampling(comfy):
    model = comfy.nodes.LoadHairDiffModel.execute(base_model=TINY, adapter="none", offload="model")[0]
    assert model.offload == "model" and model.patcher.load_device == model.run_device
    _sample(comfy, model)
    assert comfy.mm.load_calls[-1][0] is model.patcher  # loaded through ComfyUI for the call ...
    assert not any(lm.model is model.patcher for lm in comfy.mm.current_loaded_models)  # ... and unloaded after


def test_cancel_during_block_offload_removes_the_hooks(comfy):
    from hairdiff_pack.hairdiff_core.memory import is_offloaded

    model = comfy.nodes.LoadHairDiffModel.execute(base_model=TINY, adapter="none", offload="blocks")[0]
    before = {k: type(v) for k, v in model.transformer.attn_processors.items()}
    comfy.mm.interrupt_processing = True  # Cancel: raised from the progress bar after the first step
    with pytest.raises(comfy.mm.InterruptProcessingException):
        _sample(comfy, model)
    assert not is_offloaded(model.transformer)
    assert {k: type(v) for k, v in model.transformer.attn_processors.items()} == before


def test_unknown_weights_or_offload_are_refused_at_prompt_time(comfy):
    validate = comfy.nodes.LoadHairDiffModel.validate_inputs
    assert validate(base_model=TINY, adapter="none", weights="fp8_e5m2", offload="blocks") is True
    # The same message as every other COMBO (convert.check_combos): the input, its value, the allowed values.
    assert "input 'weights' is 'int4'; allowed: 'auto', 'bf16'" in validate(
        base_model=TINY, adapter="none", weights="int4"
    )
    assert "input 'offload' is 'disk'; allowed: 'auto', 'none', 'model', 'blocks'" in validate(
        base_model=TINY, offload="disk"
    )


def test_compiled_blocks_run_with_block_offload_and_fp8(comfy, fp8_model):
    """Compilation traces through the offload hooks (diffusers keeps them out of the graph) and
    through fp8 storage (the cast happens inside each Linear's forward)."""
    blocks = comfy.nodes.LoadHairDiffModel.execute(
        base_model=TINY, adapter="none", weights="fp8_e4m3fn", offload="blocks"
    )[0]
    compiled = comfy.nodes.HairDiffCompile.execute(model=blocks, backend="eager")[0]
    expected = _sample(comfy, fp8_model)[0]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = _sample(comfy, compiled)[0]
    reasons = list(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert not [r for r in reasons if "Parameter" in r]  # no Linear split its block
    assert all(block._compiled_call_impl is None for block in blocks.transformer.transformer_blocks)
