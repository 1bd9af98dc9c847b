"""HairDiff core: sketch-guided hair editing with a 32-channel SD3/SD3.5 transformer.

The public surface is this module; the rooms hold the parts:

- ``hairdiff_core.method``: the method (input-channel surgery, soft mask, flow schedule, sampler,
  reference attention, training losses);
- ``hairdiff_core.models``: model I/O (loading, model families, adapters and LoRA, memory policy,
  compiling, text encoders, the built-in tiny and toy models);
- ``hairdiff_core.data``: image files, dataset preparation, sketch synthesis, datasets, augmentation;
- ``hairdiff_core.evaluation``: metrics and evaluation runs;
- at the top: the pipeline and the basics every room uses (errors, defaults, checks, fileio, imageops).

Importing this package is cheap: the errors and defaults are imported now, every other name below
on first use (its module brings torch and diffusers). This package never imports ComfyUI.

    from hairdiff_core import HairDiffPipeline
    pipe = HairDiffPipeline.from_files(model="sd3.5_large.safetensors", adapter="hair.safetensors")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__
from .defaults import DEFAULTS
from .errors import (
    AdapterFileError,
    AdapterMismatchError,
    ChannelCountError,
    CompileError,
    DiskFullError,
    EmptyMaskError,
    HairDiffError,
    InputError,
    ModelLoadError,
    NonFiniteError,
    OutputPathError,
    SettingsError,
)

#: Lazily exported name -> the module (under this package) that defines it.
_LAZY = {
    "HairDiffPipeline": "pipeline",
    "GenerateResult": "pipeline",
    "LoadedModels": "models.loading",
    "load_models": "models.loading",
    "load_adapter": "models.adapter",
    "save_adapter": "models.adapter",
    "read_adapter_metadata": "models.adapter",
    "ReferenceSettings": "method.reference",
    "compose_matte": "method.mask",
    "normalize_sketch": "method.mask",
    "load_image": "data.imageio",
    "save_image": "data.imageio",
    "PrepareOptions": "data.prepare",
    "prepare_dataset": "data.prepare",
    "EvalOptions": "evaluation.evaluate",
    "evaluate_samples": "evaluation.evaluate",
}

__all__ = [
    "__version__",
    "DEFAULTS",
    "AdapterFileError",
    "AdapterMismatchError",
    "ChannelCountError",
    "CompileError",
    "DiskFullError",
    "EmptyMaskError",
    "HairDiffError",
    "InputError",
    "ModelLoadError",
    "NonFiniteError",
    "OutputPathError",
    "SettingsError",
    # the lazy ones (_LAZY), spelled out so linters and readers see them
    "HairDiffPipeline",
    "GenerateResult",
    "LoadedModels",
    "load_models",
    "load_adapter",
    "save_adapter",
    "read_adapter_metadata",
    "ReferenceSettings",
    "compose_matte",
    "normalize_sketch",
    "load_image",
    "save_image",
    "PrepareOptions",
    "prepare_dataset",
    "EvalOptions",
    "evaluate_samples",
]

if TYPE_CHECKING:  # what the lazy names are, for type checkers and readers
    from .data.imageio import load_image, save_image
    from .data.prepare import PrepareOptions, prepare_dataset
    from .evaluation.evaluate import EvalOptions, evaluate_samples
    from .method.mask import compose_matte, normalize_sketch
    from .method.reference import ReferenceSettings
    from .models.adapter import load_adapter, read_adapter_metadata, save_adapter
    from .models.loading import LoadedModels, load_models
    from .pipeline import GenerateResult, HairDiffPipeline


def __getattr__(name: str):
    # PEP 562: the heavy modules load on first use, so `import hairdiff_core` (and every
    # `from hairdiff_core.errors import ...`, which runs this file first) stays torch-free.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
