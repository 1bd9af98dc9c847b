"""normalize_sketch's declared background (light/dark): the user's word where detection guesses wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hairdiff_core.errors import InputError
from hairdiff_core.method import mask as M


def _strokes_on_white_touching_the_border() -> torch.Tensor:
    x = torch.ones(1, 3, 24, 24)
    x[:, :, :, :14] = 0.0  # a dark fill over most of the border: detection reads "dark"
    x[:, :, 10:14, 16:20] = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1)
    return x


@pytest.mark.parametrize("declared", ["light", "dark"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_declared_background_is_a_frame_of_that_colour(declared, channels):
    """The same result as framing the sketch in the declared colour, detecting, and cutting the
    frame off again (how the ComfyUI node did it before the core took the option)."""
    x = _strokes_on_white_touching_the_border()
    x = {1: x[:, :1], 3: x, 4: torch.cat([x, torch.ones(1, 1, 24, 24)], 1)}[channels]
    value = 1.0 if declared == "light" else 0.0
    rgb, alpha = M.normalize_sketch(F.pad(x, (1, 1, 1, 1), value=value), threshold=0.2)
    want = rgb[..., 1:-1, 1:-1], alpha[..., 1:-1, 1:-1]
    got = M.normalize_sketch(x, threshold=0.2, declared_background=declared)
    assert got[0].shape[-2:] == x.shape[-2:]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_declared_light_reads_what_detection_misreads():
    x = _strokes_on_white_touching_the_border()
    _, detected = M.normalize_sketch(x)
    _, declared = M.normalize_sketch(x, declared_background="light")
    # Detection takes the dark fill for the background: the white paper becomes "strokes".
    assert detected[..., 12, 5].item() == 0.0 and detected[..., 2, 20].item() == 1.0
    # Declared light: the paper is background, the dark fill and the red stroke are strokes.
    assert declared[..., 2, 20].item() == 0.0 and declared[..., 12, 5].item() == 1.0
    assert declared[..., 12, 18].item() == 1.0


def test_auto_is_the_default_and_bad_values_are_refused():
    x = _strokes_on_white_touching_the_border()
    assert all(
        torch.equal(a, b) for a, b in zip(M.normalize_sketch(x), M.normalize_sketch(x, declared_background="auto"))
    )
    with pytest.raises(InputError):
        M.normalize_sketch(x, declared_background="grey")
    with pytest.raises(InputError):
        M.normalize_sketch(x, background=torch.ones(1, 3, 1, 1), declared_background="light")
