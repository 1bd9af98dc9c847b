"""Prompts from Python and the CLI: SD3's three text encoders (tiny ones built in code), loaded from
a diffusers folder or single files, encoded once per prompt, freed before sampling."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from hairdiff_core.errors import InputError, ModelLoadError
from hairdiff_core.models.text import PromptCache, load_prompt_embeds
from hairdiff_core.models.text_encoders import (
    CLIP_TOKENS,
    TextEncoderSource,
    build_tiny_text_encoders,
    load_text_encoders,
)


@pytest.fixture(scope="module")
def tiny_encoders():
    return build_tiny_text_encoders()


def test_tiny_encoders_have_the_tiny_transformers_dims_and_are_deterministic(
    tiny_encoders, tiny_transformer, assert_same_output
):
    e, p = tiny_encoders.encode("Copper red hair")
    cfg = tiny_transformer.config
    assert e.shape == (1, CLIP_TOKENS + 77, cfg.joint_attention_dim) and p.shape == (1, cfg.pooled_projection_dim)
    e2, p2 = build_tiny_text_encoders().encode("copper red hair")  # rebuilt; the tokenizer lower-cases
    assert_same_output(e2, e)  # a second copy of the encoders: equal within 1e-5, not bit for bit
    assert_same_output(p2, p)
    e3, p3 = tiny_encoders.encode("platinum blonde bob")
    assert (e3 - e).abs().max() > 1e-3 and (p3 - p).abs().max() > 1e-3
    # Without T5 its part is zeros of 77 tokens, as SD3 allows.
    no_t5 = type(tiny_encoders)(
        tiny_encoders.clip_l,
        tiny_encoders.tokenizer_l,
        tiny_encoders.clip_g,
        tiny_encoders.tokenizer_g,
        joint_dim=cfg.joint_attention_dim,
    )
    e4, p4 = no_t5.encode("copper red hair")
    assert torch.equal(e4[:, :CLIP_TOKENS], e[:, :CLIP_TOKENS]) and torch.equal(p4, p)
    assert e4.shape[1] == 2 * CLIP_TOKENS and not e4[:, CLIP_TOKENS:].any()


def _save_single_files(enc, folder, tokenizers):
    from safetensors.torch import save_file

    folder.mkdir()
    for name, model in (
        ("clip_l.safetensors", enc.clip_l),
        ("clip_g.safetensors", enc.clip_g),
        ("t5xxl_fp16.safetensors", enc.t5),
    ):
        # T5 ties shared/embed_tokens: clone so safetensors stores two tensors, as real files do.
        save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(folder / name))
    for sub, tok in (
        ("tokenizer", enc.tokenizer_l),
        ("tokenizer_2", enc.tokenizer_g),
        ("tokenizer_3", enc.tokenizer_t5),
    ):
        tok.save_pretrained(str(tokenizers / sub))


def test_single_files_and_diffusers_folder_give_the_same_embeddings(tiny_encoders, tmp_path, assert_same_output):
    expected = tiny_encoders.encode("long wavy auburn hair")
    files, toks = tmp_path / "text_encoders", tmp_path / "sd3"
    _save_single_files(tiny_encoders, files, toks)
    from_files = load_text_encoders(TextEncoderSource(folder=str(files), tokenizers=str(toks)))
    for a, b in zip(from_files.encode("long wavy auburn hair"), expected):
        assert_same_output(a, b)
    # A diffusers SD3 folder: text_encoder(_2,_3) next to tokenizer(_2,_3).
    for sub, model in (
        ("text_encoder", tiny_encoders.clip_l),
        ("text_encoder_2", tiny_encoders.clip_g),
        ("text_encoder_3", tiny_encoders.t5),
    ):
        model.save_pretrained(str(toks / sub))
    from_folder = load_text_encoders(TextEncoderSource(folder=str(toks)))
    for a, b in zip(from_folder.encode("long wavy auburn hair"), expected):
        assert_same_output(a, b)
    no_t5 = load_text_encoders(
        TextEncoderSource(
            clip_l=str(files / "clip_l.safetensors"), clip_g=str(files / "clip_g.safetensors"), tokenizers=str(toks)
        ),
        joint_dim=32,
    )
    assert no_t5.t5 is None and no_t5.encode("red hair")[0].shape == (1, 2 * CLIP_TOKENS, 32)


def test_missing_encoders_and_tokenizers_are_named(tiny_encoders, tmp_path):
    files, toks = tmp_path / "text_encoders", tmp_path / "sd3"
    _save_single_files(tiny_encoders, files, toks)
    (files / "clip_g.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no clip_g text encoder in .*text_encoders.*--clip-l/--clip-g"):
        load_text_encoders(TextEncoderSource(folder=str(files), tokenizers=str(toks)))
    with pytest.raises(ModelLoadError, match="text encoder file not found: .*nope.safetensors"):
        load_text_encoders(
            TextEncoderSource(clip_l=str(files / "clip_l.safetensors"), clip_g=str(tmp_path / "nope.safetensors"))
        )
    with pytest.raises(ModelLoadError, match="carry no tokenizer.*--tokenizers DIR"):
        load_text_encoders(
            TextEncoderSource(clip_l=str(files / "clip_l.safetensors"), clip_g=str(files / "clip_l.safetensors"))
        )
    with pytest.raises(ModelLoadError, match="none were given"):
        load_text_encoders(TextEncoderSource())
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot read the CLIP-L text encoder"):
        load_text_encoders(
            TextEncoderSource(
                clip_l=str(tmp_path / "junk.safetensors"),
                clip_g=str(files / "clip_l.safetensors"),
                tokenizers=str(toks),
            )
        )


def test_prompt_cache_loads_the_encoders_once_and_frees_them(tmp_path):
    loaded = []

    def load():
        enc = build_tiny_text_encoders()
        loaded.append(weakref.ref(enc.clip_l))
        return enc

    cache = PromptCache(tmp_path / "cache", model_key="tiny")
    first = cache.encode(["red hair", "red hair", "a bob"], load)
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None  # loaded once, and gone after encoding
    assert cache.encode(["a bob"], load)["a bob"] is first["a bob"]  # answered from memory
    assert len(loaded) == 1
    disk = PromptCache(tmp_path / "cache", model_key="tiny")  # a later run: answered from disk
    assert torch.equal(disk.encode(["red hair"], load)["red hair"][0], first["red hair"][0]) and len(loaded) == 1
    assert PromptCache(tmp_path / "cache", model_key="other").path("red hair") != disk.path("red hair")


def test_pipeline_prompt_equals_its_embeddings_and_is_cached(tiny_transformer, tiny_vae, monkeypatch):
    from hairdiff_core.models import text_encoders as TE
    from hairdiff_core.pipeline import HairDiffPipeline

    pipe = HairDiffPipeline(tiny_transformer, tiny_vae)
    photo = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    sketch = torch.zeros(1, 3, 32, 48)
    sketch[..., 10:12, 8:40] = 1.0
    matte = torch.zeros(1, 1, 32, 48)
    matte[..., 6:26, 10:38] = 1.0
    kw = dict(steps=2, seed=3, cfg=2.0)
    with pytest.raises(InputError, match="a prompt needs SD3's text encoders, and this pipeline has none"):
        pipe.generate(photo, sketch, matte, prompt="red hair", **kw)
    pipe.text_encoders = TextEncoderSource(tiny=True)
    loads = []
    original = TE.load_text_encoders
    monkeypatch.setattr(TE, "load_text_encoders", lambda *a, **k: loads.append(1) or original(*a, **k))
    with_prompt = pipe.generate(photo, sketch, matte, prompt="copper red hair", negative_prompt="blurry", **kw)
    again = pipe.generate(photo, sketch, matte, prompt="copper red hair", negative_prompt="blurry", **kw)
    assert len(loads) == 1  # both prompts encoded in one load; the second call used the cache
    assert torch.equal(again.latent, with_prompt.latent)
    embeds = pipe.encode_prompt("copper red hair", "blurry")
    direct = pipe.generate(photo, sketch, matte, **embeds, **kw)
    assert torch.equal(direct.latent, with_prompt.latent)
    plain = pipe.generate(photo, sketch, matte, **kw)
    assert not torch.equal(plain.latent, with_prompt.latent)  # the prompt reached the transformer
    with pytest.raises(InputError, match="not both"):
        pipe.generate(photo, sketch, matte, prompt="red", **embeds, **kw)


def test_cli_encode_prompt_writes_what_prompt_embeds_reads(tmp_path, capsys, tiny_encoders):
    import hairdiff_cli

    out = tmp_path / "p.safetensors"
    assert (
        hairdiff_cli.main(
            ["encode-prompt", "--tiny", "--prompt", "copper red hair", "--negative-prompt", "blurry", "--out", str(out)]
        )
        == 0
    )
    t = load_prompt_embeds(out)
    assert set(t) == {
        "prompt_embeds",
        "pooled_prompt_embeds",
        "negative_prompt_embeds",
        "negative_pooled_prompt_embeds",
    }
    e, p = tiny_encoders.encode("copper red hair")
    assert torch.equal(t["prompt_embeds"], e) and torch.equal(t["pooled_prompt_embeds"], p)
    assert hairdiff_cli.main(["encode-prompt", "--prompt", "red", "--out", str(out)]) == 2
    assert "no text encoders: pass --model" in capsys.readouterr().err
    assert (
        hairdiff_cli.main(
            [
                "encode-prompt",
                "--prompt",
                "red",
                "--out",
                str(out),
                "--clip-l",
                str(tmp_path / "x.safetensors"),
                "--clip-g",
                str(tmp_path / "y.safetensors"),
            ]
        )
        == 2
    )
    assert "text encoder file not found" in capsys.readouterr().err


def test_eval_flags_pass_the_prompt_to_generate(tmp_path, capsys):
    import hairdiff_cli
    from hairdiff_cli.commands.evaluate import build_options

    parser = hairdiff_cli.build_parser()
    args = parser.parse_args(
        ["eval", "--data", "d", "--out", "o", "--tiny", "--prompt", "red hair", "--negative-prompt", "blurry"]
    )
    assert build_options(args).generate_kwargs == {"prompt": "red hair", "negative_prompt": "blurry"}
    args = parser.parse_args(
        ["eval", "--data", "d", "--out", "o", "--prompt", "red", "--prompt-embeds", "p.safetensors"]
    )
    with pytest.raises(InputError, match="not both"):
        build_options(args)


def test_cli_prompt_without_encoders_fails_before_loading_the_model(tmp_path, capsys, monkeypatch):
    from PIL import Image

    import hairdiff_cli
    from hairdiff_core.pipeline import HairDiffPipeline

    for name, colour in (("photo", (120, 90, 60)), ("sketch", (255, 255, 255)), ("matte", (255, 255, 255))):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{name}.png")
    monkeypatch.setattr(HairDiffPipeline, "from_files", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = hairdiff_cli.main(
        [
            "generate",
            "--model",
            str(tmp_path / "sd35.safetensors"),
            "--prompt",
            "red hair",
            "--image",
            str(tmp_path / "photo.png"),
            "--sketch",
            str(tmp_path / "sketch.png"),
            "--matte",
            str(tmp_path / "matte.png"),
            "--out",
            str(tmp_path / "out.png"),
        ]
    )
    assert rc == 2
    assert "--prompt needs SD3's text encoders" in capsys.readouterr().err


def test_fp8_and_scaled_fp8_files_are_cast_up(tmp_path):
    from safetensors.torch import save_file

    from hairdiff_core.models.text_encoders import _read_state_dict

    w = torch.randn(8, 4)
    w8 = w.to(torch.float8_e4m3fn)
    save_file(
        {"a.weight": w8, "b.weight": w8.clone(), "b.scale_weight": torch.tensor(0.5), "scaled_fp8": torch.zeros(0)},
        str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"),
    )
    sd = _read_state_dict(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", "T5", torch.float32)
    assert set(sd) == {"a.weight", "b.weight"}
    assert torch.equal(sd["a.weight"], w8.float()) and torch.equal(sd["b.weight"], w8.float() * 0.5)
    torch.testing.assert_close(sd["a.weight"], w, atol=0.5, rtol=0.1)
