"""GenerateSettings: one object for a generation's settings, validated once, run by generate."""

from __future__ import annotations

import pytest
import torch

from hairdiff_core.defaults import DEFAULTS
from hairdiff_core.errors import InputError, SettingsError
from hairdiff_core.pipeline import HairDiffPipeline
from hairdiff_core.settings import GenerateSettings


def test_defaults_are_the_cores_and_every_generate_setting_is_a_field():
    s = GenerateSettings()
    for name in ("steps", "seed", "strength", "cfg", "shift", "matte_threshold", "context_margin"):
        assert getattr(s, name) == getattr(DEFAULTS, name), name
    import inspect

    params = inspect.signature(HairDiffPipeline.generate).parameters
    assert set(GenerateSettings.fields()) <= set(params)  # the keywords it stands for
    assert s.as_kwargs()["paste_back"] is True and s.reference is None


@pytest.mark.parametrize(
    "changes, name",
    [
        ({"steps": 0}, "steps"),
        ({"shift": 1e-300}, "shift"),
        ({"cfg": float("nan")}, "cfg"),
        ({"work_size": 100}, "work_size"),
        ({"method": "magic"}, "method"),
    ],
)
def test_a_bad_setting_is_refused_when_the_settings_are_made(changes, name):
    with pytest.raises((SettingsError, InputError)) as info:
        GenerateSettings(**changes)
    assert info.value.input == name
    with pytest.raises((SettingsError, InputError)):
        GenerateSettings().replace(**changes)  # a changed copy is validated like a new one


def test_a_reference_by_name_becomes_reference_settings():
    s = GenerateSettings(reference="once")
    assert s.reference.mode == "once" and GenerateSettings(reference=s.reference).reference is s.reference


def test_generate_runs_the_settings_and_reuses_prepared_inputs(tiny_transformer, tiny_vae):
    pipe = HairDiffPipeline(tiny_transformer, tiny_vae)
    g = torch.Generator().manual_seed(0)
    photo = torch.rand(1, 3, 64, 64, generator=g)
    sketch = torch.zeros(1, 3, 64, 64)
    sketch[..., 20:40, 30:33] = 1
    matte = torch.zeros(1, 1, 64, 64)
    matte[..., 10:50, 10:54] = 1
    settings = GenerateSettings(steps=2, seed=3, cfg=1.0)
    by_keywords = pipe.generate(photo, sketch, matte, **settings.as_kwargs())
    by_settings = pipe.generate(photo, sketch, matte, settings=settings)
    prepared = HairDiffPipeline.prepare_inputs(photo, sketch, matte, settings.matte_threshold)
    reused = pipe.generate(photo, sketch, matte, settings=settings, prepared=prepared)
    assert torch.equal(by_settings.latent, by_keywords.latent) and torch.equal(reused.latent, by_keywords.latent)
    other = pipe.generate(photo, sketch, matte, settings=settings.replace(seed=4))
    assert not torch.equal(other.latent, by_keywords.latent)
    with pytest.raises(InputError, match="GenerateSettings"):
        pipe.generate(photo, sketch, matte, settings={"steps": 2})
