"""Exception classes of HairDiff.

Every error a user can cause subclasses ``HairDiffError`` (a ``ValueError``), so a caller
(the CLI, a ComfyUI node) can turn it into one readable line without catching bugs as well.
Messages name what was wrong, both sides of a mismatch, and the fix.
"""
from __future__ import annotations


class HairDiffError(ValueError):
    """Base class of errors caused by user input or user files."""


class InputError(HairDiffError):
    """An input image, mask or tensor has the wrong size, channels or content."""


class EmptyMaskError(InputError):
    """The hair matte has no pixel above the threshold."""


class ChannelCountError(HairDiffError):
    """A transformer has an input channel count HairDiff cannot handle."""


class AdapterMismatchError(HairDiffError):
    """An adapter file was made for another base transformer."""


class AdapterFileError(HairDiffError):
    """An adapter file is missing, corrupted or not a HairDiff adapter."""


class ModelLoadError(HairDiffError):
    """A model file or folder cannot be loaded or recognised."""


class NonFiniteError(HairDiffError):
    """NaN or inf appeared during sampling or training."""
