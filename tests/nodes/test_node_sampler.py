"""HairDiff Sampler (and the model nodes feeding it) on the tiny model, with ComfyUI stood in."""

from __future__ import annotations

import pytest
import torch

SIZE = 64


def _inputs(batch: int = 1, size: int = SIZE):
    g = torch.Generator().manual_seed(1)
    photo = torch.rand(batch, size, size, 3, generator=g)
    sketch = torch.zeros(batch, size, size, 3)
    sketch[:, 10:14, 8:56] = torch.tensor([0.9, 0.6, 0.2])
    matte = torch.zeros(batch, size, size)
    matte[:, 4:30, 6:58] = 1.0
    return photo, sketch, matte


@pytest.fixture(scope="module")
def tiny_model(comfy):
    return comfy.nodes.LoadHairDiffModel.execute(base_model="tiny (wiring check)", adapter="none")[0]


def _sample(comfy, model, steps=3, **kw):
    photo, sketch, matte = kw.pop("inputs", None) or _inputs()
    return comfy.nodes.HairDiffSampler.execute(
        model=model, photo=photo, sketch=sketch, matte=matte, steps=steps, seed=kw.pop("seed", 7), **kw
    )


class _ComfyVAE:
    """ComfyUI's VAE contract: encode(BHWC [0,1]) -> raw latent, decode(raw latent) -> BHWC [0,1]."""

    def __init__(self, vae):
        self.vae = vae
        self.calls = {"encode": 0, "decode": 0}

    @torch.no_grad()
    def encode(self, pixels):
        self.calls["encode"] += 1
        return self.vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mode()

    @torch.no_grad()
    def decode(self, latent):
        self.calls["decode"] += 1
        return ((self.vae.decode(latent).sample + 1) / 2).clamp(0, 1).movedim(1, -1)


def test_loader_tiny_outputs_a_managed_32_channel_model(comfy, tiny_model):
    assert tiny_model.family == "tiny"
    assert tiny_model.transformer.pos_embed.proj.weight.shape[1] == 32
    assert isinstance(tiny_model.patcher, comfy.stubs.ModelPatcher)
    assert tiny_model.vae is not None and tiny_model.reference is None


def test_sampler_outputs_image_and_raw_latent(comfy, tiny_model):
    out = _sample(comfy, tiny_model)
    image, latent = out[0], out[1]
    assert image.shape == (1, SIZE, SIZE, 3) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert set(latent) == {"samples"} and latent["samples"].shape == (1, 16, SIZE // 8, SIZE // 8)
    # Pixels far from the matte are the photo's, bit for bit.
    photo = _inputs()[0]
    assert torch.equal(image[:, 50:, :, :], photo[:, 50:, :, :])
    # The transformer was loaded through ComfyUI's model management, as one full load.
    assert comfy.mm.load_calls and comfy.mm.load_calls[0][0] is tiny_model.patcher and comfy.mm.load_calls[0][2] is True


def test_sampler_is_deterministic_and_seed_matters(comfy, tiny_model):
    a = _sample(comfy, tiny_model, seed=3)[0]
    b = _sample(comfy, tiny_model, seed=3)[0]
    c = _sample(comfy, tiny_model, seed=4)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_comfy_vae_path_matches_the_models_own_vae(comfy, tiny_model):
    """SD3's scale/shift is applied at the node boundary: ComfyUI's raw-latent VAE gives the same result."""
    vae = _ComfyVAE(tiny_model.vae)
    own = _sample(comfy, tiny_model)
    via_comfy = _sample(comfy, tiny_model, vae=vae)
    assert vae.calls["encode"] == 2 and vae.calls["decode"] == 1  # photo + sketch, result
    torch.testing.assert_close(via_comfy[0], own[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(via_comfy[1]["samples"], own[1]["samples"], atol=2e-5, rtol=0)
    # LATENT holds the raw latent: the model-space latent is process_in of it.
    sd3 = comfy.modules["comfy.latent_formats"].SD3()
    assert not torch.allclose(sd3.process_in(own[1]["samples"]), own[1]["samples"])


def test_progress_bar_and_previews_follow_the_steps(comfy, tiny_model):
    _sample(comfy, tiny_model, steps=4)
    (bar,) = comfy.ProgressBar.instances
    assert [u[0] for u in bar.updates] == [1, 2, 3, 4] and all(u[1] == 4 for u in bar.updates)
    assert comfy.previewers[0].calls == 4


def test_cancel_stops_promptly_and_leaves_the_model_clean(comfy, tiny_model):
    reference = comfy.nodes.HairDiffReferenceAttention.execute(model=tiny_model, mode="per_step")[0]
    before = {k: type(v) for k, v in reference.transformer.attn_processors.items()}
    weights = {k: v.clone() for k, v in reference.transformer.state_dict().items()}
    clean = _sample(comfy, reference, steps=5)[0]

    calls = {"n": 0}
    original = comfy.mm.throw_exception_if_processing_interrupted

    def cancel_on_second_step():
        calls["n"] += 1
        if calls["n"] == 2:
            comfy.mm.interrupt_processing = True
        original()

    comfy.mm.throw_exception_if_processing_interrupted = cancel_on_second_step
    try:
        with pytest.raises(comfy.mm.InterruptProcessingException):
            _sample(comfy, reference, steps=5)
    finally:
        comfy.mm.throw_exception_if_processing_interrupted = original
    assert calls["n"] == 2  # stopped at the second step, not at the end
    assert {k: type(v) for k, v in reference.transformer.attn_processors.items()} == before
    for k, v in reference.transformer.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert torch.equal(_sample(comfy, reference, steps=5)[0], clean)


def test_reference_node_is_non_destructive_and_changes_the_result(comfy, tiny_model):
    ref = comfy.nodes.HairDiffReferenceAttention.execute(model=tiny_model, mode="once", weight_inside=2.0)[0]
    assert tiny_model.reference is None and ref.reference.mode == "once" and ref.reference.weight_inside == 2.0
    assert ref.patcher is tiny_model.patcher  # settings only: the weights are shared
    plain = _sample(comfy, tiny_model)[0]
    with_ref = _sample(comfy, ref)[0]
    assert not torch.equal(plain, with_ref)
    assert torch.equal(_sample(comfy, tiny_model)[0], plain)


def test_reference_node_key_budget_reaches_the_settings(comfy, tiny_model):
    ref = comfy.nodes.HairDiffReferenceAttention.execute(model=tiny_model, mode="once", key_pool="2", key_ring=3)[0]
    assert (ref.reference.key_pool, ref.reference.key_ring) == (2, 3)
    assert comfy.nodes.HairDiffReferenceAttention.execute(model=tiny_model)[0].reference.key_pool == 1


def test_reference_node_names_the_bad_input(comfy, tiny_model):
    with pytest.raises(ValueError, match="input 'mode'"):
        comfy.nodes.HairDiffReferenceAttention.execute(model=tiny_model, mode="sometimes")
    with pytest.raises(ValueError, match="input 'reference_noise'"):
        comfy.nodes.HairDiffReferenceAttention.execute(model=tiny_model, mode="per_step", reference_noise="noisy")


def test_reference_node_reference_noise_reaches_the_sampler(comfy, tiny_model):
    node = comfy.nodes.HairDiffReferenceAttention
    auto = node.execute(model=tiny_model, mode="per_step")[0]
    matched = node.execute(model=tiny_model, mode="per_step", reference_noise="matched")[0]
    assert auto.reference.noise == "clean" and matched.reference.noise == "matched"
    assert not torch.equal(_sample(comfy, auto)[0], _sample(comfy, matched)[0])


def test_compile_node_samples_compiled_and_leaves_the_model_eager(comfy, tiny_model):
    torch._dynamo.reset()
    stats = torch._dynamo.utils.counters["stats"]
    graphs = stats["unique_graphs"]
    compiled = comfy.nodes.HairDiffCompile.execute(model=tiny_model, backend="eager")[0]
    assert tiny_model.compile is None and compiled.compile.backend == "eager" and compiled.compile.mode is None
    assert compiled.patcher is tiny_model.patcher  # settings only: the weights are shared
    ref = comfy.nodes.HairDiffReferenceAttention.execute(model=compiled, mode="once")[0]
    assert ref.compile == compiled.compile  # the settings travel through the other model nodes
    plain = _sample(comfy, tiny_model)[0]
    out = _sample(comfy, compiled)[0]
    assert stats["unique_graphs"] > graphs  # the blocks went through dynamo while sampling
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    assert all(block._compiled_call_impl is None for block in tiny_model.transformer.transformer_blocks)
    _sample(comfy, ref)
    torch._dynamo.reset()


def test_a_compiler_that_fails_names_the_model_input(comfy, tiny_model, monkeypatch):
    import importlib

    compiling = importlib.import_module("hairdiff_pack.hairdiff_core.compiling")

    def no_compiler(graph_module, example_inputs):
        raise RuntimeError("Cannot find a working triton installation")

    monkeypatch.setitem(compiling._BACKENDS, "eager", no_compiler)
    compiled = comfy.nodes.HairDiffCompile.execute(model=tiny_model, backend="eager")[0]
    torch._dynamo.reset()
    try:
        with pytest.raises(ValueError, match=r"HairDiff Sampler: input 'model': torch.compile \(backend eager\)"):
            _sample(comfy, compiled)
    finally:
        torch._dynamo.reset()
    assert all(block._compiled_call_impl is None for block in tiny_model.transformer.transformer_blocks)


def test_compile_node_names_the_bad_input(comfy, tiny_model):
    node = comfy.nodes.HairDiffCompile
    with pytest.raises(ValueError, match="HairDiff Compile: input 'backend': compile backend 'cudagraphs'"):
        node.execute(model=tiny_model, backend="cudagraphs")
    with pytest.raises(ValueError, match="HairDiff Compile: input 'model': expected a HAIRDIFF_MODEL"):
        node.execute(model=object(), backend="eager")
    assert "mode" in node.validate_inputs(backend="eager", mode="reduce-overhead")


def _write_lora(path, transformer, rank=2, scale=0.5):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, mod in transformer.named_modules():
        if name.endswith("attn.to_q") and isinstance(mod, torch.nn.Linear):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * scale
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * scale
    save_file(sd, str(path))


def test_lora_node_patches_a_clone_and_never_the_input(comfy, tiny_model):
    loras = comfy.models_dir / "loras"
    loras.mkdir(exist_ok=True)
    _write_lora(loras / "extra.safetensors", tiny_model.transformer)
    plain = _sample(comfy, tiny_model)[0]
    zero = comfy.nodes.HairDiffLoRA.execute(model=tiny_model, lora_name="loras/extra.safetensors", strength=0.0)[0]
    one = comfy.nodes.HairDiffLoRA.execute(model=tiny_model, lora_name="loras/extra.safetensors", strength=1.0)[0]
    assert one.patcher is not tiny_model.patcher and one.patcher.model is tiny_model.patcher.model
    assert not tiny_model.patcher.patches and one.patcher.patches
    assert one.loras == (("loras/extra.safetensors", 1.0),) and tiny_model.loras == ()
    assert torch.equal(_sample(comfy, zero)[0], plain)
    with_lora = _sample(comfy, one)[0]
    assert not torch.equal(with_lora, plain)
    # The upstream model still samples as before: the patches left with the clone.
    assert torch.equal(_sample(comfy, tiny_model)[0], plain)
    assert torch.equal(_sample(comfy, one)[0], with_lora)


def test_lora_node_refuses_a_file_without_matching_keys(comfy, tiny_model):
    from safetensors.torch import save_file

    loras = comfy.models_dir / "loras"
    loras.mkdir(exist_ok=True)
    save_file({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(2, 2)}, str(loras / "sdxl.safetensors"))
    with pytest.raises(ValueError, match="input 'lora_name'.*no LoRA weights"):
        comfy.nodes.HairDiffLoRA.execute(model=tiny_model, lora_name="loras/sdxl.safetensors", strength=1.0)


def test_batches_broadcast_or_are_refused_clearly(comfy, tiny_model):
    photo, sketch, matte = _inputs(batch=2)
    out = _sample(comfy, tiny_model, inputs=(photo, sketch[:1], matte[:1]))
    assert out[0].shape == (2, SIZE, SIZE, 3) and out[1]["samples"].shape[0] == 2
    photo3 = torch.rand(3, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="input 'sketch'.*batch of 2.*'photo' has 3"):
        _sample(comfy, tiny_model, inputs=(photo3, sketch, matte[:1]))


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda p, s, m: (p, s, torch.zeros_like(m)), r"input 'matte'.*empty"),
        (lambda p, s, m: (p, s[:, :, :40], m), r"input 'sketch'.*aspect"),
        (lambda p, s, m: (p, s, m[..., None].expand(-1, -1, -1, 3)), r"input 'matte'.*\(B, H, W\)"),
        (lambda p, s, m: (p[..., 0], s, m), r"input 'photo'"),
    ],
)
def test_errors_name_the_input_and_the_fix(comfy, tiny_model, change, pattern):
    with pytest.raises(ValueError, match=pattern):
        _sample(comfy, tiny_model, inputs=change(*_inputs()))


def test_conditioning_of_the_wrong_width_names_the_input(comfy, tiny_model):
    cond = [[torch.zeros(1, 154, 4096), {"pooled_output": torch.zeros(1, 2048)}]]
    with pytest.raises(ValueError, match=r"input 'positive'.*4096.*32"):
        _sample(comfy, tiny_model, positive=cond)


def test_conditioning_is_used(comfy, tiny_model):
    g = torch.Generator().manual_seed(5)
    cond = [[torch.randn(1, 20, 32, generator=g), {"pooled_output": torch.randn(1, 64, generator=g)}]]
    plain = _sample(comfy, tiny_model)[0]
    prompted = _sample(comfy, tiny_model, positive=cond)[0]
    guided = _sample(comfy, tiny_model, positive=cond, cfg=3.0)[0]
    assert not torch.equal(plain, prompted) and not torch.equal(prompted, guided)


def test_lowvram_offloads_after_sampling(comfy, tiny_model):
    comfy.mm.vram_state = comfy.mm.VRAMState.LOW_VRAM
    try:
        _sample(comfy, tiny_model, steps=1)
    finally:
        comfy.mm.vram_state = comfy.mm.VRAMState.NORMAL_VRAM
    assert not any(lm.model is tiny_model.patcher for lm in comfy.mm.current_loaded_models)
    _sample(comfy, tiny_model, steps=1)
    assert any(lm.model is tiny_model.patcher for lm in comfy.mm.current_loaded_models)


def test_unknown_model_file_is_refused_by_name(comfy):
    with pytest.raises(ValueError, match="input 'base_model'"):
        comfy.nodes.LoadHairDiffModel.execute(base_model="checkpoints/missing.safetensors")


def test_prompt_node_tiny_conditioning_drives_the_sampler(comfy, tiny_model):
    cond = comfy.nodes.HairDiffPrompt.execute(text="copper red hair")[0]
    embeds, pooled = cond[0][0], cond[0][1]["pooled_output"]
    assert embeds.shape == (1, 154, 32) and pooled.shape == (1, 64)
    plain = _sample(comfy, tiny_model)[0]
    with_prompt = _sample(comfy, tiny_model, positive=cond)[0]
    assert not torch.equal(plain, with_prompt)
    negative = comfy.nodes.HairDiffPrompt.execute(text="")[0]
    assert not torch.equal(_sample(comfy, tiny_model, positive=cond, negative=negative, cfg=3.0)[0], with_prompt)
    with pytest.raises(ValueError, match="input 'encoders'"):
        comfy.nodes.HairDiffPrompt.execute(text="red hair", encoders="sd3 files (models/text_encoders)")
