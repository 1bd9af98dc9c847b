"""Model loading: diffusers folders, single-file checkpoints (original SD3/LDM key layouts),
recognition from shapes, refusals. Tiny models only; the real SD3.5 shapes come from models
built on the meta device (no memory)."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hairdiff_core.errors import ModelLoadError
from hairdiff_core.method.surgery import widen_input_channels
from hairdiff_core.models.families import TRANSFORMER_CONFIG_FILES, shipped_config
from hairdiff_core.models.loading import (
    identify_transformer,
    identify_vae,
    load_models,
    load_transformer,
    load_vae,
)
from hairdiff_core.models.tiny import TINY_TRANSFORMER_CONFIG, TINY_VAE_CONFIG

_spec = importlib.util.spec_from_file_location("_single_file_util", Path(__file__).with_name("_single_file_util.py"))
sfu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sfu)


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def _forward(transformer) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    cfg = transformer.config
    x = torch.randn(1, cfg.in_channels, 16, 16, generator=g)
    txt = torch.randn(1, 5, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return transformer(x, txt, pooled, torch.tensor([500.0]), return_dict=False)[0]


def _decode(vae) -> torch.Tensor:
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return vae.decode(z).sample


@pytest.fixture
def files(tmp_path, tiny_transformer, tiny_vae):
    """The tiny pair written every way a user may have it."""
    t_orig = sfu.diffusers_to_original_sd3(tiny_transformer.state_dict())
    v_ldm = sfu.diffusers_to_ldm_vae(tiny_vae.state_dict())
    clip_junk = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8)}
    tiny_transformer.save_pretrained(tmp_path / "pipe" / "transformer")
    tiny_vae.save_pretrained(tmp_path / "pipe" / "vae")
    return {
        "pipe": tmp_path / "pipe",
        "full": _save(tmp_path / "ckpt" / "tiny_full.safetensors", {**t_orig, **v_ldm, **clip_junk}),
        "transformer_only": _save(tmp_path / "ckpt" / "tiny_mmdit.safetensors", t_orig),
        "transformer_bare": _save(
            tmp_path / "ckpt" / "tiny_mmdit_noprefix.safetensors",
            sfu.diffusers_to_original_sd3(tiny_transformer.state_dict(), prefix=""),
        ),
        "vae_ldm": _save(
            tmp_path / "vae" / "tiny_vae_ldm.safetensors", sfu.diffusers_to_ldm_vae(tiny_vae.state_dict(), prefix="")
        ),
        "vae_diffusers": _save(tmp_path / "vae" / "tiny_vae_diffusers.safetensors", tiny_vae.state_dict()),
        "tmp": tmp_path,
    }


def test_test_util_inverts_the_diffusers_converters(tiny_transformer, tiny_vae):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    ref = tiny_transformer.state_dict()
    orig = sfu.diffusers_to_original_sd3(ref)
    assert all(k.startswith("model.diffusion_model.joint_blocks.") or "blocks" not in k for k in orig)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(orig))
    assert set(back) == set(ref)
    assert max((back[k] - ref[k]).abs().max().item() for k in ref) == 0.0

    vref = tiny_vae.state_dict()
    vback = convert_ldm_vae_checkpoint(sfu.diffusers_to_ldm_vae(vref), TINY_VAE_CONFIG)
    assert set(vback) == set(vref)
    assert max((vback[k] - vref[k]).abs().max().item() for k in vref) == 0.0


def _no_network(*args, **kwargs):
    raise AssertionError("model loading tried to open a network connection")


def test_single_file_with_vae_equals_diffusers_folder(
    files, tiny_transformer, tiny_vae, caplog, monkeypatch, assert_same_output
):
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    with caplog.at_level(logging.INFO, logger="hairdiff_core.models.loading"):
        single = load_models(files["full"])
    assert "recognised HairDiff tiny transformer (2 blocks, dual attention 0)" in caplog.text
    assert str(files["full"]) in caplog.text
    folder = load_models(files["pipe"])
    assert single.family == folder.family == "tiny"
    assert _max_diff(single.transformer, tiny_transformer) == 0.0
    assert _max_diff(single.vae, tiny_vae) == 0.0
    assert _max_diff(folder.transformer, tiny_transformer) == 0.0
    assert _max_diff(folder.vae, tiny_vae) == 0.0
    assert_same_output(_forward(single.transformer), _forward(folder.transformer))
    assert_same_output(_decode(single.vae), _decode(folder.vae))
    assert single.transformer.config.in_channels == 16
    assert str(files["full"]) in single.source


def test_bare_transformer_folder_with_vae_given_or_sibling(files, tiny_vae):
    tdir = files["pipe"] / "transformer"
    given = load_models(tdir, vae=files["vae_ldm"])
    assert _max_diff(given.vae, tiny_vae) == 0.0
    sibling = load_models(tdir)  # pipe/vae sits next to pipe/transformer
    assert _max_diff(sibling.vae, tiny_vae) == 0.0
    assert "pipe/vae" in sibling.source.replace("\\", "/")


@pytest.mark.parametrize(
    "transformer_kind, vae_kind",
    [
        ("transformer_only", "vae_ldm"),
        ("transformer_only", "vae_diffusers"),
        ("transformer_only", "pipe"),
        ("transformer_bare", "vae_ldm"),
    ],
)
def test_single_file_plus_separate_vae(files, tiny_transformer, tiny_vae, transformer_kind, vae_kind):
    loaded = load_models(files[transformer_kind], vae=files[vae_kind])
    assert _max_diff(loaded.transformer, tiny_transformer) == 0.0
    assert _max_diff(loaded.vae, tiny_vae) == 0.0


def test_explicit_vae_overrides_the_one_inside(files, tiny_vae):
    other = copy.deepcopy(tiny_vae)
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(1.0)
    path = _save(files["tmp"] / "other_vae.safetensors", other.state_dict())
    loaded = load_models(files["full"], vae=path)
    assert torch.equal(loaded.vae.decoder.conv_out.bias, other.decoder.conv_out.bias)


def test_missing_vae_says_how_to_pass_one(files, tmp_path):
    with pytest.raises(ModelLoadError, match=r"no VAE found .*tiny_mmdit\.safetensors.*vae="):
        load_models(files["transformer_only"])
    lone = tmp_path / "lone" / "transformer"  # a transformer folder with no vae/ beside it
    shutil.copytree(files["pipe"] / "transformer", lone)
    with pytest.raises(ModelLoadError, match="no VAE found"):
        load_models(lone)


def test_widened_single_file_keeps_32_channels(tmp_path, tiny_transformer, tiny_vae, assert_same_output):
    wide = widen_input_channels(tiny_transformer)
    path = _save(
        tmp_path / "wide.safetensors",
        {
            **sfu.diffusers_to_original_sd3(wide.state_dict()),
            **sfu.diffusers_to_ldm_vae(tiny_vae.state_dict()),
        },
    )
    loaded = load_models(path)
    assert loaded.transformer.config.in_channels == 32
    assert loaded.transformer.pos_embed.proj.weight.shape[1] == 32
    assert loaded.transformer.config.out_channels == 16
    assert _max_diff(loaded.transformer, wide) == 0.0
    assert_same_output(_forward(loaded.transformer), _forward(wide))
    wide.save_pretrained(tmp_path / "wide_folder")
    from_folder, _ = load_transformer(tmp_path / "wide_folder")
    assert from_folder.config.in_channels == 32
    assert _max_diff(from_folder, wide) == 0.0


def test_diffusers_layout_single_file_and_load_transformer(tmp_path, tiny_transformer):
    path = _save(tmp_path / "t.safetensors", {"transformer." + k: v for k, v in tiny_transformer.state_dict().items()})
    model, family = load_transformer(path)
    assert family == "tiny"
    assert _max_diff(model, tiny_transformer) == 0.0


def test_dtype_is_honoured(files):
    loaded = load_models(files["full"], dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.vae.parameters()} == {torch.bfloat16}
    assert load_vae(files["vae_ldm"], dtype=torch.bfloat16).dtype == torch.bfloat16
    mixed = load_models(files["pipe"], dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert {p.dtype for p in mixed.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in mixed.vae.parameters()} == {torch.float32}


def test_tiny_flag():
    loaded = load_models(tiny=True)
    assert loaded.family == "tiny"
    assert loaded.transformer.config.num_layers == TINY_TRANSFORMER_CONFIG["num_layers"]
    assert loaded.vae.config.latent_channels == 16
    with pytest.raises(ModelLoadError, match="tiny=True"):
        load_models("x.safetensors", tiny=True)
    with pytest.raises(ModelLoadError, match="no model given"):
        load_models()


# --- recognition from shapes ------------------------------------------------------------


def _meta_state(config: dict) -> dict[str, torch.Tensor]:
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel(**config).state_dict()


@pytest.mark.parametrize("family", sorted(TRANSFORMER_CONFIG_FILES))
@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_identifies_shipped_families_from_shapes(family, layout):
    config = shipped_config(TRANSFORMER_CONFIG_FILES[family])
    state = _meta_state(config)
    if layout == "original":
        state = sfu.diffusers_to_original_sd3(state)
        state["first_stage_model.decoder.conv_in.weight"] = torch.empty(512, 16, 3, 3, device="meta")
    shapes = {k: tuple(v.shape) for k, v in state.items()}  # shapes alone, no tensors
    got_family, got_config = identify_transformer(shapes, name_hint="sd3.5_model.safetensors")
    assert got_family == family
    assert got_config == {**config, "dual_attention_layers": tuple(config["dual_attention_layers"])}


def test_large_and_turbo_share_shapes_name_decides():
    state = _meta_state(shipped_config("sd3.5-large-transformer.json"))
    assert identify_transformer(state, name_hint="sd3.5_large_turbo.safetensors")[0] == "sd3.5-large-turbo"
    assert identify_transformer(state, name_hint="sd3.5_large.safetensors")[0] == "sd3.5-large"


def test_identifies_widened_medium():
    config = shipped_config("sd3.5-medium-transformer.json")
    family, got = identify_transformer(_meta_state({**config, "in_channels": 32}))
    assert family == "sd3.5-medium"
    assert got["in_channels"] == 32 and got["out_channels"] == 16


@pytest.mark.parametrize(
    "config",
    [
        # q/k norm present: head size read from its weight
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=3,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            caption_projection_dim=32,
            pooled_projection_dim=40,
            pos_embed_max_size=24,
            dual_attention_layers=(1,),
            qk_norm="rms_norm",
        ),
        # no q/k norm (like SD3 Medium): head size 64 assumed
        dict(
            sample_size=128,
            patch_size=1,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=64,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=128,
            pooled_projection_dim=8,
            pos_embed_max_size=20,
            dual_attention_layers=(),
            qk_norm=None,
        ),
    ],
)
def test_derives_config_for_unknown_sizes_and_loads_them(tmp_path, config):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(3)
    model = SD3Transformer2DModel(**config).eval()
    original = sfu.diffusers_to_original_sd3(model.state_dict())
    assert identify_transformer(original) == ("custom", config)
    assert identify_transformer(model.state_dict()) == ("custom", config)
    loaded, family = load_transformer(_save(tmp_path / "custom.safetensors", original))
    assert family == "custom"
    assert _max_diff(loaded, model) == 0.0


def test_identify_vae_kinds(tiny_vae):
    assert identify_vae(sfu.diffusers_to_ldm_vae(tiny_vae.state_dict()))[0] == "tiny"
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        sd3 = AutoencoderKL(**shipped_config("sd3-vae.json")).state_dict()
        sdxl = AutoencoderKL(
            **{**shipped_config("sd3-vae.json"), "latent_channels": 4, "use_quant_conv": True}
        ).state_dict()
    kind, config = identify_vae(sfu.diffusers_to_ldm_vae(sd3))
    assert kind == "sd3" and config["scaling_factor"] == 1.5305 and config["shift_factor"] == 0.0609
    with pytest.raises(ModelLoadError, match=r"4 latent channels.*SD1\.x/SDXL"):
        identify_vae(sdxl, source="sdxl_vae.safetensors")


# --- refusals -----------------------------------------------------------------------------


def test_refuses_pickle_checkpoints(tmp_path):
    ckpt = tmp_path / "sd3.5_medium.ckpt"
    ckpt.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match=r"sd3\.5_medium\.ckpt is a pickle .*safetensors"):
        load_models(ckpt)
    with pytest.raises(ModelLoadError, match="pickle"):
        load_vae(tmp_path / "sd3.5_medium.ckpt")


def test_refuses_pickle_only_folder(tmp_path, tiny_transformer):
    folder = tmp_path / "transformer"
    tiny_transformer.save_pretrained(folder, safe_serialization=False)
    with pytest.raises(ModelLoadError, match=r"only pickle weights.*\.bin"):
        load_transformer(folder)


def test_corrupted_and_truncated_files_name_the_file(files, tmp_path):
    data = files["full"].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    for bad in (truncated, garbage):
        with pytest.raises(ModelLoadError, match=rf"{bad.name}.*not a valid safetensors file"):
            load_models(bad)


def test_missing_path_is_file_not_found(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_models(missing)
    with pytest.raises(FileNotFoundError, match="nope_vae"):
        load_vae(tmp_path / "nope_vae")


def test_unknown_state_dict_names_what_was_seen(tmp_path):
    flux_like = {"double_blocks.0.img_attn.qkv.weight": (9, 3), "img_in.weight": (3, 64)}
    with pytest.raises(ModelLoadError, match=r"no SD3/SD3\.5 transformer.*2 tensors.*double_blocks\.0.*Flux"):
        identify_transformer(flux_like)
    path = _save(tmp_path / "flux.safetensors", {k: torch.zeros(s) for k, s in flux_like.items()})
    with pytest.raises(ModelLoadError, match=r"flux\.safetensors"):
        load_models(path, vae=path)


def test_partial_transformer_is_refused(tmp_path, tiny_transformer, tiny_vae):
    orig = sfu.diffusers_to_original_sd3(tiny_transformer.state_dict())
    del orig["model.diffusion_model.joint_blocks.0.x_block.mlp.fc1.weight"]
    path = _save(tmp_path / "partial.safetensors", orig)
    with pytest.raises(ModelLoadError, match=r"partial\.safetensors.*fc1\.weight"):
        load_models(path, vae=_save(tmp_path / "v.safetensors", tiny_vae.state_dict()))


def test_wrong_vae_is_refused(tmp_path, files):
    from diffusers import AutoencoderKL

    four = AutoencoderKL(**{**TINY_VAE_CONFIG, "latent_channels": 4})
    four.save_pretrained(tmp_path / "sdxl_vae")
    with pytest.raises(ModelLoadError, match=r"sdxl_vae.*4 latent channels"):
        load_models(files["pipe"] / "transformer", vae=tmp_path / "sdxl_vae")


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"empty is not a diffusers model folder"):
        load_models(tmp_path / "empty")
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelLoadError, match="UNet2DConditionModel, not an SD3Transformer2DModel"):
        load_models(other)
