"""A built-in model says what it is when used: one line at run time, the same line on the demo's
contact sheet; and the sheet gives the angle between a sketch's strands and its result's."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parent.parent / "hairdiff_core" / "assets"


@pytest.mark.parametrize(
    "flag,words", [("--tiny", "TINY model: random weights, a wiring check"), ("--toy", "TOY model")]
)
def test_generate_with_a_builtin_model_says_what_it_is(tmp_path, caplog, flag, words):
    import hairdiff_cli
    from hairdiff_core.pipeline import builtin_model_label

    argv = ["generate", flag, "--steps", "1", "--out", str(tmp_path / "r.png")]
    for k in ("image", "sketch", "matte"):
        argv += [f"--{k}", str(ASSETS / f"sample_{'photo' if k == 'image' else k}.png")]
    with caplog.at_level(logging.INFO):
        assert hairdiff_cli.main(argv) == 0
    said = [r for r in caplog.records if r.levelno >= logging.WARNING and words in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert said[0].getMessage() == builtin_model_label(flag[2:])
    assert "\n" not in said[0].getMessage()
    assert builtin_model_label(None) is None and builtin_model_label("sd3.5-large") is None


def test_orientations_are_compared_undirected():
    from hairdiff_core.evaluation.metrics import orientation_difference

    deg = [(0, 176, 4), (176, 0, 4), (10, 100, 90), (45, 45, 0), (179, 1, 2), (0, 90, 90), (30, 200, 10)]
    a = torch.tensor([math.radians(x) for x, _, _ in deg])
    b = torch.tensor([math.radians(y) for _, y, _ in deg])
    assert torch.allclose(orientation_difference(a, b), torch.tensor([float(d) for _, _, d in deg]), atol=1e-3)


def test_the_sheet_labels_give_the_angle_between_sketch_and_result():
    from hairdiff_cli.commands.demo import strand_labels

    sketch, result, line = strand_labels("a", 0.0, math.radians(176))
    assert sketch == "sketch a (0 deg)"
    assert result == "result a (176 deg; 4 deg apart)"
    assert line.endswith("(4 deg apart)")


def test_a_contact_sheet_title_is_drawn_and_kept_in_the_png(tmp_path):
    from PIL import Image

    from hairdiff_core.data.imageio import contact_sheet, save_pil
    from hairdiff_core.pipeline import builtin_model_label

    tile = torch.zeros(1, 3, 32, 32)
    plain = contact_sheet([tile], ["x"], height=32)
    titled = contact_sheet([tile], ["x"], height=32, title=builtin_model_label("toy"))
    assert titled.height == plain.height + 18
    assert titled.width >= 6 * len(builtin_model_label("toy"))  # widened so the line fits
    band = titled.crop((0, 0, titled.width, 16)).convert("L")
    assert band.getextrema()[1] > 100  # text was drawn in the title band
    save_pil(titled, tmp_path / "sheet.png")
    assert Image.open(tmp_path / "sheet.png").text["Title"] == builtin_model_label("toy")
