"""fp8 weight storage (layerwise casting) and block offloading on the tiny model, on the CPU.

bf16 compute runs on the CPU (fp16 matmuls are far too slow there, so fp16 storage is only
checked for its dtypes). Shapes are small: 64x64 photos, 3 steps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hairdiff_core.errors import HairDiffError, InputError
from hairdiff_core.method.reference import ReferenceSettings
from hairdiff_core.method.surgery import widen_input_channels
from hairdiff_core.models.lora import add_lora
from hairdiff_core.models.memory import (
    apply_offload,
    apply_weights,
    current_storage_dtype,
    is_offloaded,
    prime_offload,
    remove_offload,
)
from hairdiff_core.pipeline import HairDiffPipeline

#: fp8 storage of the tiny model's weights vs bf16, on decoded images (measured ~40 dB).
MIN_PSNR_DB = 30.0


def _inputs(size=64):
    g = torch.Generator().manual_seed(11)
    photo = torch.rand(1, 3, size, size, generator=g)
    matte = torch.zeros(1, 1, size, size)
    matte[..., 12:52, 16:48] = 1
    sketch = torch.zeros(1, 3, size, size)
    sketch[..., 20:44, 30:34] = 1
    return photo, sketch, matte


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _trained_adapter(master, path):
    """A tiny adapter whose LoRA and sketch channels are far from zero (clearly changes outputs)."""
    from hairdiff_core.models.adapter import save_adapter

    model = copy.deepcopy(master)
    widen_input_channels(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        add_lora(model, rank=4, alpha=4)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        w = model.pos_embed.proj.weight
        w[:, 16:] = torch.randn(w[:, 16:].shape, generator=g) * 0.2
    save_adapter(model, path)
    return path


def _generate(pipe, **kw):
    photo, sketch, matte = _inputs()
    return pipe.generate(photo, sketch, matte, steps=2, seed=4, paste_back=False, **kw)


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    from hairdiff_core.models.tiny import build_tiny_transformer

    return _trained_adapter(build_tiny_transformer(), tmp_path_factory.mktemp("adapter") / "a.safetensors")


@pytest.fixture(scope="module")
def fp8_pipe(adapter_file):
    return HairDiffPipeline.from_files(tiny=True, adapter=adapter_file, dtype=torch.bfloat16, weights="fp8_e4m3fn")


def _with_and_without_lora(pipe):
    from hairdiff_core.models.lora import set_lora_scale

    with_lora = _generate(pipe)
    set_lora_scale(pipe.transformer, 0.0)
    try:
        without = _generate(pipe)
    finally:
        set_lora_scale(pipe.transformer, 1.0)
    return with_lora, without


def test_fp8_storage_is_close_to_bf16_and_the_lora_still_applies(adapter_file, fp8_pipe):
    bf16_pipe = HairDiffPipeline.from_files(tiny=True, adapter=adapter_file, dtype=torch.bfloat16, weights="bf16")
    assert current_storage_dtype(bf16_pipe.transformer) is None
    fp8_lora, fp8_plain = _with_and_without_lora(fp8_pipe)
    bf16_lora, bf16_plain = _with_and_without_lora(bf16_pipe)

    t = fp8_pipe.transformer
    assert current_storage_dtype(t) == torch.float8_e4m3fn
    q = t.transformer_blocks[0].attn.to_q
    assert q.base_layer.weight.dtype == torch.float8_e4m3fn  # stored in fp8 at rest
    assert t.transformer_blocks[0].norm1.linear.weight.dtype == torch.float8_e4m3fn  # adaLN too
    # ... while the patch embedding, the final layer and the LoRA compute in bf16.
    for kept in (
        t.pos_embed.proj.weight,
        t.proj_out.weight,
        t.norm_out.linear.weight,
        next(iter(q.lora_A.values())).weight,
        next(iter(q.lora_B.values())).weight,
    ):
        assert kept.dtype == torch.bfloat16

    assert _psnr(fp8_plain.image, bf16_plain.image) >= MIN_PSNR_DB
    assert _psnr(fp8_lora.image, bf16_lora.image) >= MIN_PSNR_DB
    # The LoRA changes the fp8 latent as it changes the bf16 one: same direction and size, and
    # far more than fp8 rounding changes it.
    d8, d16 = (fp8_lora.latent - fp8_plain.latent).flatten(), (bf16_lora.latent - bf16_plain.latent).flatten()
    rounding = (fp8_plain.latent - bf16_plain.latent).norm()
    assert d16.norm() > 3 * rounding
    assert float(torch.nn.functional.cosine_similarity(d8, d16, dim=0)) > 0.95
    assert 0.8 < float(d8.norm() / d16.norm()) < 1.25


def test_storage_dtypes_and_refusals(_tiny_transformer_master):
    model = copy.deepcopy(_tiny_transformer_master).to(torch.bfloat16)
    assert apply_weights(model, "auto") == torch.bfloat16 and current_storage_dtype(model) is None
    assert apply_weights(model, "bf16") == torch.bfloat16 and current_storage_dtype(model) is None
    assert apply_weights(model, "fp8_e5m2") == torch.float8_e5m2
    assert model.transformer_blocks[0].ff.net[2].weight.dtype == torch.float8_e5m2
    assert apply_weights(model, "fp8_e5m2") == torch.float8_e5m2  # again: no-op
    with pytest.raises(HairDiffError, match=r"already stored as fp8_e5m2.*Reload the model"):
        apply_weights(model, "fp8_e4m3fn")
    with pytest.raises(InputError, match="unknown weights 'int4'.*fp8_e4m3fn"):
        apply_weights(model, "int4")
    half = copy.deepcopy(_tiny_transformer_master)
    assert apply_weights(half, "fp16", torch.float32) == torch.float16
    assert half.transformer_blocks[0].attn.to_k.weight.dtype == torch.float16
    assert half.pos_embed.proj.weight.dtype == torch.float32


def test_block_offload_gives_the_same_output_and_restores_processors(tiny_transformer, tiny_vae):
    """On the CPU the "GPU" is the CPU too: the hooks still move every block in and out."""
    photo, sketch, matte = _inputs()
    reference = ReferenceSettings(mode="once")
    pipe = HairDiffPipeline(tiny_transformer, tiny_vae)
    before = dict(pipe.transformer.attn_processors)
    plain = pipe.generate(photo, sketch, matte, steps=3, seed=4, reference=reference).image

    apply_offload(pipe.transformer, "blocks", "cpu")
    assert is_offloaded(pipe.transformer)
    prime_offload(pipe.transformer)  # what CUDA streams get first (not used on the CPU): harmless
    blocks = pipe.generate(photo, sketch, matte, steps=3, seed=4, reference=reference).image
    torch.testing.assert_close(blocks, plain, atol=1e-6, rtol=0)
    # reference attention put its processors back on the offloaded model ...
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == {k: type(v) for k, v in before.items()}
    # ... and the offload hooks survive it and come off cleanly.
    assert is_offloaded(pipe.transformer)
    remove_offload(pipe.transformer)
    assert not is_offloaded(pipe.transformer)
    again = pipe.generate(photo, sketch, matte, steps=3, seed=4).image
    assert torch.isfinite(again).all()


def test_offload_through_from_files_with_fp8(adapter_file, fp8_pipe):
    expected = _generate(fp8_pipe).image
    for offload in ("blocks", "model"):
        pipe = HairDiffPipeline.from_files(
            tiny=True, adapter=adapter_file, dtype=torch.bfloat16, weights="fp8_e4m3fn", offload=offload
        )
        assert is_offloaded(pipe.transformer) == (offload == "blocks")
        torch.testing.assert_close(_generate(pipe).image, expected, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="unknown offload 'disk'"):
        HairDiffPipeline.from_files(tiny=True, offload="disk")


def test_cli_weights_and_offload_flags(tmp_path, monkeypatch, capsys):
    from PIL import Image

    import hairdiff_cli

    Image.new("RGB", (48, 48), (120, 90, 60)).save(tmp_path / "photo.png")
    Image.new("RGB", (48, 48), (255, 255, 255)).save(tmp_path / "sketch.png")
    matte = Image.new("L", (48, 48), 0)
    matte.paste(255, (10, 10, 38, 30))
    matte.save(tmp_path / "matte.png")

    def run(out, *extra):
        argv = [
            "generate",
            "--tiny",
            "--steps",
            "2",
            "--dtype",
            "bf16",
            "--image",
            str(tmp_path / "photo.png"),
            "--sketch",
            str(tmp_path / "sketch.png"),
            "--matte",
            str(tmp_path / "matte.png"),
            "--out",
            str(tmp_path / out),
            *extra,
        ]
        return hairdiff_cli.main(argv)

    assert run("fp8.png", "--weights", "fp8_e4m3fn") == 0
    assert run("fp8_blocks.png", "--weights", "fp8_e4m3fn", "--offload", "blocks") == 0
    import numpy as np

    a, b = (np.asarray(Image.open(tmp_path / name)) for name in ("fp8.png", "fp8_blocks.png"))
    assert a.shape == (48, 48, 3) and (a == b).all()
    # --compile: the blocks really go through dynamo, and the picture is the same.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        assert run("fp8_compiled.png", "--weights", "fp8_e4m3fn", "--compile", "eager") == 0
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    finally:
        torch._dynamo.reset()
    c = np.asarray(Image.open(tmp_path / "fp8_compiled.png")).astype(int)
    assert np.abs(c - a.astype(int)).max() <= 1
    # A compiler that fails is the contract's one line and exit 2, not dynamo's traceback.
    from hairdiff_core.models import compiling

    def no_compiler(graph_module, example_inputs):
        raise RuntimeError("Compiler: cc not found")

    monkeypatch.setitem(compiling._BACKENDS, "eager", no_compiler)
    capsys.readouterr()
    try:
        assert run("broken.png", "--compile", "eager") == 2
    finally:
        torch._dynamo.reset()
    err = capsys.readouterr().err
    assert "could not compile the transformer's blocks: Compiler: cc not found" in err and "Traceback" not in err
    assert not (tmp_path / "broken.png").exists()
    with pytest.raises(SystemExit):  # argparse refuses an unknown choice
        run("x.png", "--weights", "int4")
