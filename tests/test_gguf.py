"""GGUF transformers (ComfyUI-GGUF / city96 files: original SD3 keys, no prefix) through diffusers'
GGUFQuantizationConfig. Needs the optional `gguf` package (pip install "hairdiff[gguf]")."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hairdiff_core.errors import ModelLoadError
from hairdiff_core.models.loading import load_transformer

_spec = importlib.util.spec_from_file_location("_single_file_util", Path(__file__).with_name("_single_file_util.py"))
sfu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sfu)


def write_q8_gguf(transformer, path: Path) -> Path:
    """The transformer as a Q8_0 GGUF in the original SD3 layout, as GGUF converters write it:
    2-D weights whose rows split into 32-value blocks are Q8_0, the rest float32."""
    gguf = pytest.importorskip("gguf")
    state = sfu.diffusers_to_original_sd3(
        {k: v.detach().float() for k, v in transformer.state_dict().items()}, prefix=""
    )
    writer = gguf.GGUFWriter(str(path), "sd3")
    for key, tensor in state.items():
        a = tensor.numpy()
        if a.ndim == 2 and a.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(key, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, a.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_q8_gguf_loads_and_generates_with_the_adapter(_tiny_transformer_master, _tiny_vae_master, tmp_path):
    pytest.importorskip("gguf", reason="the optional gguf package is not installed (pip install 'hairdiff[gguf]')")
    from hairdiff_core.pipeline import HairDiffPipeline

    path = write_q8_gguf(_tiny_transformer_master, tmp_path / "sd3.5_tiny-Q8_0.gguf")
    vae = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in _tiny_vae_master.state_dict().items()}, str(vae))
    model, family = load_transformer(path)
    assert family == "tiny"
    q = model.transformer_blocks[0].attn.to_q
    assert type(q).__name__ == "GGUFLinear" and q.weight.dtype == torch.uint8  # stays quantised
    with pytest.raises(ModelLoadError, match="GGUF: its weights keep the file's own quantisation"):
        load_transformer(path, weights="fp8_e4m3fn")

    g = torch.Generator().manual_seed(2)
    photo, matte = torch.rand(1, 3, 64, 64, generator=g), torch.zeros(1, 1, 64, 64)
    matte[..., 16:48, 16:48] = 1
    sketch = torch.zeros(1, 3, 64, 64)
    sketch[..., 20:44, 30:34] = 1
    from hairdiff_core.models.tiny import build_tiny_transformer

    ref_pipe = HairDiffPipeline(build_tiny_transformer(), _tiny_vae_master)
    gguf_pipe = HairDiffPipeline.from_files(model=path, vae=vae)
    kw = dict(steps=3, seed=1, paste_back=False)
    expected = ref_pipe.generate(photo, sketch, matte, **kw).image
    got = gguf_pipe.generate(photo, sketch, matte, **kw).image
    mse = float(((got - expected) ** 2).mean())
    assert torch.isfinite(got).all() and 10 * math.log10(1 / max(mse, 1e-12)) > 30  # Q8_0 is close

    # A LoRA on the quantised layers: it stays in the compute dtype and changes the output.
    from hairdiff_core.models.lora import add_lora

    add_lora(gguf_pipe.transformer, rank=4)
    lora_a = next(iter(gguf_pipe.transformer.transformer_blocks[0].attn.to_q.lora_A.values())).weight
    assert lora_a.dtype == torch.float32
    for name, p in gguf_pipe.transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    changed = gguf_pipe.generate(photo, sketch, matte, **kw).image
    assert not torch.allclose(changed, got, atol=1e-3)

    # Compiled blocks (HairDiff Compile) trace the quantised Linears whole, LoRA included.
    from hairdiff_core.models.compiling import CompileSettings, compiled_blocks

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        with compiled_blocks(gguf_pipe.transformer, CompileSettings(backend="eager")):
            compiled = gguf_pipe.generate(photo, sketch, matte, **kw).image
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
        assert not torch._dynamo.utils.counters["graph_break"]
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, changed, rtol=0, atol=1e-5)


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(ModelLoadError, match=r"needs the 'gguf' package: pip install \"hairdiff\[gguf\]\""):
        load_transformer(path)
