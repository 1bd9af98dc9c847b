"""LoRA helpers: adding, scaling, fusing, removing, and reading extra diffusers/peft LoRA files."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from hairdiff_core.errors import AdapterFileError, HairDiffError, InputError
from hairdiff_core.models.lora import (
    DEFAULT_LORA_TARGETS,
    active_adapters,
    add_lora,
    fuse_lora,
    get_lora_scale,
    has_lora,
    is_fused,
    load_lora_file,
    lora_config_of,
    lora_state_dict,
    remove_lora,
    set_lora_scale,
    unfuse_lora,
)

DIFFUSERS_KEY = re.compile(
    r"^transformer\.transformer_blocks\.\d+\.attn2?\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]\.weight$"
)


def _inputs(channels=16):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, channels, 16, 16, generator=g)
    kw = dict(
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 64, generator=g),
        timestep=torch.tensor([500.0]),
        return_dict=False,
    )
    return x, kw


def _out(model, channels=16):
    x, kw = _inputs(channels)
    with torch.no_grad():
        return model(x, **kw)[0]


def _perturb(model, adapter="hairdiff", seed=3, std=0.3):
    """Gaussian init has B = 0 (no effect); give B values so the LoRA changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_add_lora_starts_as_identity_and_targets_attn_and_attn2(tiny_transformer):
    base = _out(tiny_transformer)
    add_lora(tiny_transformer, rank=4)
    assert torch.equal(_out(tiny_transformer), base)
    assert has_lora(tiny_transformer) and has_lora(tiny_transformer, "hairdiff")
    assert lora_config_of(tiny_transformer) == {
        "rank": 4,
        "alpha": 4,
        "targets": sorted(DEFAULT_LORA_TARGETS),
        "init": "gaussian",
    }
    state = lora_state_dict(tiny_transformer)
    assert state and all(DIFFUSERS_KEY.match(k) for k in state), sorted(state)[:4]
    # 2 blocks x 4 projections on attn, plus the dual-attention block's attn2, A and B each.
    assert len(state) == (2 * 4 + 4) * 2
    assert any(".attn2." in k for k in state)
    assert state["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (4, 32)


def test_add_lora_on_bf16_model_makes_bf16_weights(tiny_transformer):
    model = tiny_transformer.to(torch.bfloat16)
    add_lora(model, rank=2)
    assert {v.dtype for v in lora_state_dict(model).values()} == {torch.bfloat16}


def test_add_lora_refuses_bad_arguments(tiny_transformer):
    with pytest.raises(InputError, match="rank"):
        add_lora(tiny_transformer, rank=0)
    with pytest.raises(InputError, match="alpha"):
        add_lora(tiny_transformer, rank=4, alpha=-1)
    with pytest.raises(InputError, match="no Linear layer"):
        add_lora(tiny_transformer, targets=("not_a_layer",))
    with pytest.raises(InputError, match="Conv2d"):
        add_lora(tiny_transformer, targets=("to_q", "proj"))
    with pytest.raises(InputError, match="init"):
        add_lora(tiny_transformer, init="pissa")
    assert not has_lora(tiny_transformer)
    add_lora(tiny_transformer, rank=2)
    with pytest.raises(HairDiffError, match="already has a LoRA named 'hairdiff'"):
        add_lora(tiny_transformer, rank=2)


def test_scale_zero_is_exactly_the_base_model(tiny_transformer):
    base = _out(tiny_transformer)
    add_lora(tiny_transformer, rank=4, alpha=8)
    _perturb(tiny_transformer)
    full = _out(tiny_transformer)
    assert (full - base).abs().max() > 1e-2
    set_lora_scale(tiny_transformer, 0.0)
    assert torch.equal(_out(tiny_transformer), base)
    assert get_lora_scale(tiny_transformer) == 0.0
    set_lora_scale(tiny_transformer, 1.0)
    assert torch.equal(_out(tiny_transformer), full)
    with pytest.raises(HairDiffError, match="no LoRA|only the LoRA"):
        set_lora_scale(tiny_transformer, 1.0, adapter_name="missing")


def test_fuse_then_unfuse_returns_to_unfused_outputs(tiny_transformer):
    add_lora(tiny_transformer, rank=4, alpha=8)
    _perturb(tiny_transformer)
    set_lora_scale(tiny_transformer, 0.5)
    half = _out(tiny_transformer)
    set_lora_scale(tiny_transformer, 1.0)
    full = _out(tiny_transformer)

    fuse_lora(tiny_transformer)
    assert is_fused(tiny_transformer)
    torch.testing.assert_close(_out(tiny_transformer), full, atol=1e-5, rtol=0)
    with pytest.raises(HairDiffError, match="unfuse"):
        set_lora_scale(tiny_transformer, 0.3)
    with pytest.raises(HairDiffError, match="already fused"):
        fuse_lora(tiny_transformer)
    unfuse_lora(tiny_transformer)
    assert not is_fused(tiny_transformer)
    torch.testing.assert_close(_out(tiny_transformer), full, atol=5e-6, rtol=0)

    # A fuse scale multiplies the current scale, and unfusing restores the scale (diffusers'
    # own fuse_lora(lora_scale=...) leaves the layers scaled afterwards).
    fuse_lora(tiny_transformer, scale=0.5)
    torch.testing.assert_close(_out(tiny_transformer), half, atol=1e-5, rtol=0)
    unfuse_lora(tiny_transformer)
    assert get_lora_scale(tiny_transformer) == 1.0
    torch.testing.assert_close(_out(tiny_transformer), full, atol=5e-6, rtol=0)


def test_remove_lora_gives_back_the_plain_model(tiny_transformer):
    base = _out(tiny_transformer)
    plain_keys = set(tiny_transformer.state_dict())
    add_lora(tiny_transformer, rank=4)
    _perturb(tiny_transformer)
    remove_lora(tiny_transformer)
    assert not has_lora(tiny_transformer)
    assert set(tiny_transformer.state_dict()) == plain_keys
    assert torch.equal(_out(tiny_transformer), base)
    # and a LoRA of the same name can be added again
    add_lora(tiny_transformer, rank=2)
    assert lora_config_of(tiny_transformer)["rank"] == 2


def _diffusers_lora_file(tmp_path, source, rank=4, alpha=8):
    """Write a LoRA with diffusers' own writer (the format of the training-script outputs)."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    add_lora(source, rank=rank, alpha=alpha, adapter_name="src")
    _perturb(source, adapter="src", seed=5)
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(source, adapter_name="src"),
        transformer_lora_adapter_metadata=source.peft_config["src"].to_dict(),
        weight_name="extra.safetensors",
    )
    return tmp_path / "extra.safetensors"


def test_load_lora_file_reads_diffusers_written_files(
    tiny_transformer, _tiny_transformer_master, tmp_path, assert_same_output
):
    import copy

    source = copy.deepcopy(_tiny_transformer_master)
    path = _diffusers_lora_file(tmp_path, source, rank=4, alpha=8)
    expected = _out(source)

    name = load_lora_file(tiny_transformer, path)
    assert name == "extra"
    assert lora_config_of(tiny_transformer, "extra")["alpha"] == 8
    assert_same_output(_out(tiny_transformer), expected)
    assert not any(p.requires_grad for n, p in tiny_transformer.named_parameters() if ".extra." in n)
    with pytest.raises(HairDiffError, match="already has a LoRA named 'extra'"):
        load_lora_file(tiny_transformer, path)


def test_extra_lora_stays_active_beside_the_hairdiff_one(tiny_transformer, _tiny_transformer_master, tmp_path):
    import copy

    path = _diffusers_lora_file(tmp_path, copy.deepcopy(_tiny_transformer_master))
    add_lora(tiny_transformer, rank=4)
    _perturb(tiny_transformer)
    own_only = _out(tiny_transformer)

    load_lora_file(tiny_transformer, path, adapter_name="extra", scale=0.7)
    assert set(active_adapters(tiny_transformer)) == {"hairdiff", "extra"}
    both = _out(tiny_transformer)
    assert (both - own_only).abs().max() > 1e-3
    assert get_lora_scale(tiny_transformer, "extra") == pytest.approx(0.7)
    set_lora_scale(tiny_transformer, 0.0, "extra")
    assert torch.equal(_out(tiny_transformer), own_only)
    remove_lora(tiny_transformer, "extra")
    assert active_adapters(tiny_transformer) == ["hairdiff"]
    assert torch.equal(_out(tiny_transformer), own_only)


def test_load_lora_file_uses_comfyui_alpha_tensors_without_metadata(
    tiny_transformer, _tiny_transformer_master, tmp_path, assert_same_output
):
    import copy

    source = copy.deepcopy(_tiny_transformer_master)
    add_lora(source, rank=4, alpha=2)
    _perturb(source)
    state = lora_state_dict(source)
    for key in list(state):
        if key.endswith(".lora_A.weight"):
            state[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(2.0)
    save_file(state, str(tmp_path / "comfy.safetensors"))  # no header metadata at all
    load_lora_file(tiny_transformer, tmp_path / "comfy.safetensors", adapter_name="c")
    assert lora_config_of(tiny_transformer, "c")["alpha"] == 2
    assert_same_output(_out(tiny_transformer), _out(source))


def test_load_lora_file_refusals(tiny_transformer, tmp_path):
    pickled = tmp_path / "lora.pt"
    pickled.write_bytes(b"\x80\x04not really")
    with pytest.raises(AdapterFileError, match="only safetensors"):
        load_lora_file(tiny_transformer, pickled)
    with pytest.raises(FileNotFoundError):
        load_lora_file(tiny_transformer, tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(AdapterFileError, match="corrupted or truncated"):
        load_lora_file(tiny_transformer, garbage)
    foreign = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 32)}, str(foreign))
    with pytest.raises(AdapterFileError, match="no diffusers/peft-format LoRA"):
        load_lora_file(tiny_transformer, foreign)
    wrong = tmp_path / "wrong.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 99),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
        },
        str(wrong),
    )
    with pytest.raises(AdapterFileError, match="do not fit"):
        load_lora_file(tiny_transformer, wrong)
    assert not has_lora(tiny_transformer)


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("r", "4", r"'lora_adapter_metadata.r' is a string \('4'\), expected an integer"),
        ("r", "four", r"'lora_adapter_metadata.r' is a string \('four'\), expected an integer"),
        ("lora_alpha", [8], r"'lora_adapter_metadata.lora_alpha' is a list \(\[8\]\), expected a number"),
        ("use_rslora", "no", r"'lora_adapter_metadata.use_rslora' is a string \('no'\), expected true or false"),
    ],
)
def test_a_wrongly_typed_lora_header_field_is_named_with_its_type(
    tiny_transformer, _tiny_transformer_master, tmp_path, key, value, pattern
):
    """Not "missing", not a traceback from int("four"): the field, its type and the one expected."""
    import copy
    import json

    from safetensors import safe_open

    path = _diffusers_lora_file(tmp_path, copy.deepcopy(_tiny_transformer_master))
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["lora_adapter_metadata"])
    meta[next(k for k in meta if k.endswith(key) and k.rsplit(".", 1)[-1] == key)] = value
    save_file(tensors, str(path), metadata={**header, "lora_adapter_metadata": json.dumps(meta)})
    with pytest.raises(AdapterFileError, match=rf"extra\.safetensors: header field {pattern}"):
        load_lora_file(tiny_transformer, path)
    assert not has_lora(tiny_transformer)
