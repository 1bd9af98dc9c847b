"""Sample images for the bundled workflow templates, put where ComfyUI's LoadImage looks.

The templates load ``hairdiff_photo.png``, ``hairdiff_sketch.png``, ``hairdiff_matte.png`` and
``hairdiff_face_protect.png`` (the sample photo with its face transparent: Load Image's MASK,
1 - alpha, is the face to keep, and the mask editor paints more) from ComfyUI's input folder;
on a fresh install they are not there and every template fails with "Invalid image file". At pack
load the bundled samples are copied there under those names when absent (four small files, never
overwriting what a user put there).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "hairdiff_core" / "assets"
#: name the templates use -> bundled sample
TEMPLATE_INPUTS = {
    "hairdiff_photo.png": "sample_photo.png",
    "hairdiff_sketch.png": "sample_sketch.png",
    "hairdiff_matte.png": "sample_matte.png",
    "hairdiff_face_protect.png": "sample_face_protect.png",
}


def install_template_inputs(input_dir: str | os.PathLike | None = None) -> list[Path]:
    """Copy the missing template inputs into ``input_dir`` (default: ComfyUI's input folder).

    Returns the files written. Never overwrites; a failure (read-only folder) is logged, not
    raised, so the pack still loads.
    """
    if input_dir is None:
        try:
            import folder_paths

            input_dir = folder_paths.get_input_directory()
        except (ImportError, AttributeError):
            return []
    folder = Path(input_dir)
    written = []
    for name, sample in TEMPLATE_INPUTS.items():
        target = folder / name
        if target.exists():
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # O_EXCL: a file another process created meanwhile is kept, not replaced.
            with open(ASSETS / sample, "rb") as src, open(target, "xb") as dst:
                shutil.copyfileobj(src, dst)
            written.append(target)
        except FileExistsError:
            continue
        except OSError as exc:
            logger.warning(
                "HairDiff: could not copy the template sample %s into %s (%s); the templates need it there",
                name,
                folder,
                exc,
            )
    if written:
        logger.info("HairDiff: copied %d template sample image(s) into %s", len(written), folder)
    return written
