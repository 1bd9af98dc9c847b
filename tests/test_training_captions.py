"""Caption conditioning: encoded once through SD3's text encoders, cached, encoders released.

Real SD3 encoders cannot be had offline, so the diffusers pipeline is replaced by a stand-in
that records how it is used; what is tested is HairDiff's side: keying, caching, reuse, dims.
"""

import json
import types
from pathlib import Path

import pytest
import torch

from hairdiff_core.errors import InputError
from hairdiff_core.models.tiny import build_tiny_transformer


class _FakeSD3Pipeline:
    loads = 0
    prompts: list = []

    def __init__(self, dim=32, pooled=64):
        self.dim, self.pooled = dim, pooled

    @classmethod
    def from_pretrained(cls, folder, **kw):
        assert kw.get("transformer", "x") is None and kw.get("vae", "x") is None  # encoders only
        assert kw.get("local_files_only") is True
        cls.loads += 1
        return cls()

    def to(self, device):
        return self

    def encode_prompt(self, prompt, max_sequence_length, **kw):
        _FakeSD3Pipeline.prompts.append(prompt)
        seed = sum(map(ord, prompt))
        e = torch.randn(1, 77 + max_sequence_length, self.dim, generator=torch.Generator().manual_seed(seed))
        p = torch.randn(1, self.pooled, generator=torch.Generator().manual_seed(seed + 1))
        return e, None, p, None


@pytest.fixture
def fake_pipeline(monkeypatch):
    import diffusers

    _FakeSD3Pipeline.loads, _FakeSD3Pipeline.prompts = 0, []
    monkeypatch.setattr(diffusers, "StableDiffusion3Pipeline", _FakeSD3Pipeline)
    return _FakeSD3Pipeline


def _samples(*stems):
    return [types.SimpleNamespace(stem=s) for s in stems]


def _acc():
    return types.SimpleNamespace(is_main_process=True, device="cpu", wait_for_everyone=lambda: None)


def test_captions_encoded_once_cached_and_reused(fake_pipeline, tmp_path):
    from training.text import load_text_embeddings

    model_dir = tmp_path / "sd35"
    model_dir.mkdir()
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"a": "long wavy red hair", "c": "short braids"}))
    config = types.SimpleNamespace(
        captions=str(captions), text_embeds=None, cache_dir=None, model=str(model_dir), mixed_precision="no"
    )
    tr = build_tiny_transformer()
    first = load_text_embeddings(config, _samples("a", "b", "c"), tr, tmp_path / "out", _acc())
    assert fake_pipeline.loads == 1 and sorted(fake_pipeline.prompts) == ["long wavy red hair", "short braids"]
    assert set(first.by_index) == {0, 2} and first.tokens == 77 + 77  # "b" has no caption: zero text later
    cached = sorted(Path(tmp_path / "out" / "cache" / "text").glob("*.safetensors"))
    assert len(cached) == 2
    again = load_text_embeddings(config, _samples("a", "b", "c"), tr, tmp_path / "out", _acc())
    assert fake_pipeline.loads == 1  # the cache answered: encoders not loaded again
    assert torch.equal(again.by_index[0][0], first.by_index[0][0])
    captions.write_text(json.dumps({"a": "long wavy red hair", "c": "a bob"}))
    load_text_embeddings(config, _samples("a", "b", "c"), tr, tmp_path / "out", _acc())
    assert fake_pipeline.loads == 2 and fake_pipeline.prompts[-1] == "a bob"  # only the changed caption


def test_captions_need_a_diffusers_folder_and_matching_dims(fake_pipeline, tmp_path):
    from training.text import load_text_embeddings

    captions = tmp_path / "captions.txt"
    captions.write_text("a\tlong hair\n")
    config = types.SimpleNamespace(
        captions=str(captions), text_embeds=None, cache_dir=None, model=None, mixed_precision="no"
    )
    with pytest.raises(InputError, match="--text-embeds"):
        load_text_embeddings(config, _samples("a"), build_tiny_transformer(), tmp_path / "out", _acc())
    (tmp_path / "m").mkdir()
    config.model = str(tmp_path / "m")
    fake_pipeline.__init__.__defaults__ = (4096, 2048)  # real SD3 dims onto the tiny transformer
    try:
        with pytest.raises(InputError, match="another model"):
            load_text_embeddings(config, _samples("a"), build_tiny_transformer(), tmp_path / "out2", _acc())
    finally:
        fake_pipeline.__init__.__defaults__ = (32, 64)
