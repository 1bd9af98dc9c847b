"""HairDiff core: the method (surgery, soft mask, sampler, reference attention, adapter).

Importing this package is cheap: heavy modules (torch, diffusers) are imported by the
submodules that need them. This package never imports ComfyUI.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    AdapterFileError,
    AdapterMismatchError,
    ChannelCountError,
    EmptyMaskError,
    HairDiffError,
    InputError,
    ModelLoadError,
    NonFiniteError,
)
