"""The one-file HairDiff adapter: round trips, interoperability, refusals."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hairdiff_core.errors import AdapterFileError, AdapterMismatchError, ChannelCountError, InputError
from hairdiff_core.method.surgery import input_channels, widen_input_channels
from hairdiff_core.models.adapter import (
    FORMAT_VERSION,
    PATCH_BIAS_KEY,
    PATCH_WEIGHT_KEY,
    base_signature,
    load_adapter,
    read_adapter_metadata,
    save_adapter,
    signature_hash,
)
from hairdiff_core.models.lora import add_lora, has_lora, lora_config_of, lora_state_dict
from hairdiff_core.models.tiny import TINY_TRANSFORMER_CONFIG

LORA_KEY = re.compile(
    r"^transformer\.transformer_blocks\.\d+\.attn2?\.(to_q|to_k|to_v|to_out\.0)\.(lora_[AB]\.weight|alpha)$"
)


def _inputs(channels):
    g = torch.Generator().manual_seed(7)
    kw = dict(
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 64, generator=g),
        timestep=torch.tensor([500.0]),
        return_dict=False,
    )
    # x last, so the conditioning is the same whatever the channel count
    x = torch.randn(1, channels, 16, 16, generator=g)
    return x, kw


def _out(model, x=None):
    x_default, kw = _inputs(input_channels(model))
    with torch.no_grad():
        return model(x_default if x is None else x, **kw)[0]


def _trained(model, rank=4, alpha=None, lora=True):
    """Widened tiny model whose LoRA B weights and sketch channels are non-zero, so that a load
    that dropped either would change the outputs."""
    widen_input_channels(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if lora:
            add_lora(model, rank=rank, alpha=alpha)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        w = model.pos_embed.proj.weight
        w[:, 16:] = torch.randn(w[:, 16:].shape, generator=g) * 0.2
    return model


@pytest.fixture
def trained(_tiny_transformer_master):
    import copy

    return _trained(copy.deepcopy(_tiny_transformer_master), rank=4, alpha=8)


def _header(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), list(f.keys())


def test_round_trip_reproduces_outputs_and_metadata(trained, tiny_transformer, tmp_path, assert_same_output):
    path = tmp_path / "deep" / "dir" / "hair.safetensors"
    save_adapter(trained, path, step=123, training={"lr": 1e-4, "resolution": 512, "augment": "all"})
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["hair.safetensors"]  # no temp file left

    expected = _out(trained)
    sketch_blind = _out(trained, torch.cat([_inputs(32)[0][:, :16], torch.zeros(1, 16, 16, 16)], 1))
    assert (expected - sketch_blind).abs().max() > 1e-2  # the sketch channels matter

    assert input_channels(tiny_transformer) == 16
    meta = load_adapter(tiny_transformer, path)
    assert input_channels(tiny_transformer) == 32
    assert tiny_transformer.config.in_channels == 32
    assert_same_output(_out(tiny_transformer), expected)

    assert meta["format_version"] == FORMAT_VERSION
    assert meta["in_channels"] == 32
    assert meta["lora"] == {"rank": 4, "alpha": 8, "targets": ["to_k", "to_out.0", "to_q", "to_v"]}
    assert meta["step"] == 123 and meta["training"] == {"lr": 1e-4, "resolution": 512, "augment": "all"}
    assert meta["base"]["dims"] == base_signature(trained)
    assert meta["base"]["family"] == "tiny"
    assert meta["base"]["hash"] == signature_hash(base_signature(trained))
    assert read_adapter_metadata(path) == meta
    assert lora_config_of(tiny_transformer)["alpha"] == 8 and lora_config_of(tiny_transformer)["rank"] == 4

    # Loading again over the loaded adapter replaces it rather than stacking a second one.
    load_adapter(tiny_transformer, path)
    assert list(tiny_transformer.peft_config) == ["hairdiff"]
    assert_same_output(_out(tiny_transformer), expected)


def test_file_layout_keys_and_header(trained, tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(trained, path, step=5)
    header, keys = _header(path)
    assert {PATCH_WEIGHT_KEY, PATCH_BIAS_KEY} <= set(keys)
    lora_keys = [k for k in keys if k not in (PATCH_WEIGHT_KEY, PATCH_BIAS_KEY)]
    assert lora_keys and all(LORA_KEY.match(k) for k in lora_keys), lora_keys[:4]
    # alpha (8) != rank (4): ComfyUI-style alpha scalars are written for ComfyUI's loader.
    assert sum(k.endswith(".alpha") for k in keys) == sum(k.endswith(".lora_A.weight") for k in keys)
    assert set(header) == {"format", "hairdiff", "lora_adapter_metadata"}
    assert header["format"] == "pt"
    peft_meta = json.loads(header["lora_adapter_metadata"])
    assert peft_meta["transformer.r"] == 4 and peft_meta["transformer.lora_alpha"] == 8
    assert sorted(peft_meta["transformer.target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor(PATCH_WEIGHT_KEY), trained.pos_embed.proj.weight)
        state = lora_state_dict(trained)
        assert all(torch.equal(f.get_tensor(k), v) for k, v in state.items())


def test_diffusers_loads_the_lora_part_onto_a_stock_model(trained, tiny_transformer, tmp_path):
    """Other tools read the file: diffusers' own loader takes the LoRA (rank, alpha from the
    header) and skips the patch-embedding tensors, on a plain 16-channel model."""
    path = tmp_path / "a.safetensors"
    save_adapter(trained, path)
    tiny_transformer.load_lora_adapter(str(path), use_safetensors=True, adapter_name="x")
    config = tiny_transformer.peft_config["x"]
    assert (config.r, config.lora_alpha) == (4, 8)
    x32 = _inputs(32)[0]
    x32[:, 16:] = 0  # with no sketch, the widened model reduces to stock weights + LoRA
    torch.testing.assert_close(_out(tiny_transformer, x32[:, :16]), _out(trained, x32), atol=1e-6, rtol=0)


def test_adapter_without_lora(tiny_transformer, _tiny_transformer_master, tmp_path, assert_same_output):
    import copy

    source = _trained(copy.deepcopy(_tiny_transformer_master), lora=False)
    path = tmp_path / "nolora.safetensors"
    save_adapter(source, path)
    header, keys = _header(path)
    assert sorted(keys) == sorted([PATCH_WEIGHT_KEY, PATCH_BIAS_KEY])
    assert "lora_adapter_metadata" not in header
    meta = load_adapter(tiny_transformer, path)
    assert meta["lora"] is None and not has_lora(tiny_transformer)
    assert_same_output(_out(tiny_transformer), _out(source))


def test_alpha_equal_rank_writes_no_alpha_tensors(
    tiny_transformer, _tiny_transformer_master, tmp_path, assert_same_output
):
    import copy

    source = _trained(copy.deepcopy(_tiny_transformer_master), rank=2)
    save_adapter(source, tmp_path / "a.safetensors")
    _, keys = _header(tmp_path / "a.safetensors")
    assert not any(k.endswith(".alpha") for k in keys)
    assert load_adapter(tiny_transformer, tmp_path / "a.safetensors")["lora"]["alpha"] == 2
    assert_same_output(_out(tiny_transformer), _out(source))


def test_foreign_base_is_refused_naming_both_sides(trained, tmp_path):
    from diffusers import SD3Transformer2DModel

    path = tmp_path / "a.safetensors"
    save_adapter(trained, path)
    other = SD3Transformer2DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": 3}).eval()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterMismatchError) as info:
        load_adapter(other, path)
    msg = str(info.value)
    assert "num_layers=2" in msg and "num_layers=3" in msg and "num_layers 2 vs 3" in msg
    assert signature_hash(base_signature(trained)) in msg and signature_hash(base_signature(other)) in msg
    assert "HairDiff tiny" in msg and "custom" in msg
    # the refused model is untouched
    assert input_channels(other) == 16 and not has_lora(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())

    heads = SD3Transformer2DModel(**{**TINY_TRANSFORMER_CONFIG, "num_attention_heads": 2, "caption_projection_dim": 16})
    with pytest.raises(AdapterMismatchError, match="num_attention_heads 4 vs 2"):
        load_adapter(heads, path)


def test_bad_files_are_refused(trained, tiny_transformer, tmp_path):
    good = tmp_path / "good.safetensors"
    save_adapter(trained, good)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="corrupted or truncated"):
        load_adapter(tiny_transformer, truncated)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(AdapterFileError, match="corrupted or truncated"):
        read_adapter_metadata(garbage)

    pickled = tmp_path / "adapter.ckpt"
    pickled.write_bytes(data)
    with pytest.raises(AdapterFileError, match="only safetensors"):
        load_adapter(tiny_transformer, pickled)

    with pytest.raises(FileNotFoundError):
        load_adapter(tiny_transformer, tmp_path / "missing.safetensors")

    plain = tmp_path / "plain_lora.safetensors"
    save_file(lora_state_dict(trained), str(plain), metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match="plain LoRA.*HairDiff LoRA"):
        load_adapter(tiny_transformer, plain)

    header, _ = _header(good)
    with safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    newer = json.loads(header["hairdiff"])
    newer["format_version"] = FORMAT_VERSION + 1
    save_file(tensors, str(tmp_path / "newer.safetensors"), metadata={**header, "hairdiff": json.dumps(newer)})
    with pytest.raises(AdapterFileError, match="Update HairDiff"):
        load_adapter(tiny_transformer, tmp_path / "newer.safetensors")

    missing_b = {k: v for k, v in tensors.items() if not k.endswith("attn.to_q.lora_B.weight")}
    save_file(missing_b, str(tmp_path / "partial.safetensors"), metadata=header)
    with pytest.raises(AdapterFileError, match="has only"):
        load_adapter(tiny_transformer, tmp_path / "partial.safetensors")

    # none of the refusals changed the model
    assert input_channels(tiny_transformer) == 16 and not has_lora(tiny_transformer)


def test_save_refusals_and_atomicity(trained, tiny_transformer, tmp_path, monkeypatch):
    with pytest.raises(ChannelCountError, match="not widened"):
        save_adapter(tiny_transformer, tmp_path / "a.safetensors")
    with pytest.raises(InputError, match="reserved"):
        save_adapter(trained, tmp_path / "a.safetensors", in_channels=3)
    with pytest.raises(InputError, match=r"\.safetensors"):
        save_adapter(trained, tmp_path / "a.pt")

    path = tmp_path / "a.safetensors"
    save_adapter(trained, path, step=1)
    before = path.read_bytes()

    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(trained, path, step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_dtype_mismatch_is_cast(trained, _tiny_transformer_master, tmp_path):
    import copy

    path = tmp_path / "a.safetensors"
    save_adapter(trained, path)
    model = copy.deepcopy(_tiny_transformer_master).to(torch.bfloat16)
    load_adapter(model, path)
    assert model.pos_embed.proj.weight.dtype == torch.bfloat16
    assert {v.dtype for v in lora_state_dict(model).values()} == {torch.bfloat16}
    x, kw = _inputs(32)
    with torch.no_grad():
        out = model(
            x.bfloat16(),
            **{
                **kw,
                "encoder_hidden_states": kw["encoder_hidden_states"].bfloat16(),
                "pooled_projections": kw["pooled_projections"].bfloat16(),
            },
        )[0]
    ref = _out(trained)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_loading_onto_a_widened_model_warns_when_image_channels_differ(
    trained, tiny_transformer, tmp_path, caplog, assert_same_output
):
    path = tmp_path / "a.safetensors"
    save_adapter(trained, path)
    widen_input_channels(tiny_transformer)
    with caplog.at_level(logging.WARNING, logger="hairdiff_core.models.adapter"):
        load_adapter(tiny_transformer, path)
    assert not caplog.records
    with torch.no_grad():
        tiny_transformer.pos_embed.proj.weight[:, :16] += 0.01
    with caplog.at_level(logging.WARNING, logger="hairdiff_core.models.adapter"):
        load_adapter(tiny_transformer, path)
    assert any("differ" in r.getMessage() for r in caplog.records)
    assert_same_output(_out(tiny_transformer), _out(trained))


def test_frozen_image_channels_keep_the_target_models_own(trained, tiny_transformer, tmp_path, caplog):
    """An adapter trained with channels 0-15 frozen, loaded onto another checkpoint of the same
    shape (Large Turbo under a Large adapter): the model keeps its own image channels and bias
    and takes only the sketch channels and the LoRA."""
    path = tmp_path / "a.safetensors"
    save_adapter(trained, path, base_channels_trained=False)
    other = widen_input_channels(tiny_transformer)
    with torch.no_grad():
        other.pos_embed.proj.weight[:, :16] += 0.05  # "another checkpoint"
        other.pos_embed.proj.bias += 0.05
    own_w = other.pos_embed.proj.weight[:, :16].clone()
    own_b = other.pos_embed.proj.bias.clone()
    with caplog.at_level(logging.WARNING, logger="hairdiff_core.models.adapter"):
        load_adapter(other, path)
    assert not caplog.records
    w = other.pos_embed.proj.weight
    assert torch.equal(w[:, :16], own_w) and torch.equal(other.pos_embed.proj.bias, own_b)
    assert torch.equal(w[:, 16:], trained.pos_embed.proj.weight[:, 16:])
    # without the flag (or with trained base channels) the adapter's own are used, as before
    save_adapter(trained, path, base_channels_trained=True)
    load_adapter(other, path)
    assert torch.equal(other.pos_embed.proj.weight, trained.pos_embed.proj.weight)
