"""Exception classes of HairDiff.

Every error a user can cause subclasses ``HairDiffError`` (a ``ValueError``), so a caller
(the CLI, a ComfyUI node) can turn it into one readable line without catching bugs as well.
Messages name what was wrong, both sides of a mismatch, and the fix.
"""

from __future__ import annotations


class HairDiffError(ValueError):
    """Base class of errors caused by user input or user files.

    Args:
        message: what was wrong, both sides of a mismatch, and the fix.
        input: the name of the argument (Python API) or node input the error is about, e.g.
            ``"sketch"`` or ``"steps"``; ``None`` when it is about no single input. The ComfyUI
            nodes map it to the node input to highlight; the CLI ignores it.
    """

    def __init__(self, message: str = "", *args, input: str | None = None):
        super().__init__(message, *args)
        self.input = input

    def __reduce__(self):
        # Keeps ``input`` across pickling (multiprocessing data loaders re-raise in the parent).
        return (_rebuild, (type(self), self.args, self.input))


def _rebuild(cls, args, input):
    err = cls(*args)
    err.input = input
    return err


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


class SettingsError(InputError):
    """A numeric or named setting is out of range, not finite, or of the wrong type."""


class CompileError(HairDiffError):
    """``torch.compile`` could not compile the transformer's blocks (no C++ compiler, no Triton)."""


class OutputPathError(HairDiffError):
    """An output path cannot be written (a folder, an input file, an unsupported suffix...)."""


class DiskFullError(OutputPathError):
    """The disk (or quota) ran out while writing; nothing half-written is left."""
