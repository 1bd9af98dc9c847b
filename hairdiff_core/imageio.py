"""Reading and writing images as (1, C, H, W) float tensors in [0, 1]; contact sheets.

Every image is read at its real range (8-bit / 255, 16-bit / 65535, float as 0..1) and its
displayed orientation (EXIF). Results are written 8 bits per channel in the format of the output
suffix: a 16-bit or float photo comes back quantised to 8 bits (its background equal to the
photo's within half a level, 1/510).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, OutputPathError
from .fileio import atomic_write, check_input_path, check_writable_file
from .imageops import to_rgb

logger = logging.getLogger(__name__)


#: Output suffix -> PIL format and save options. Every result is written 8 bits per channel.
IMAGE_FORMATS = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".jpeg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".webp": ("WEBP", {"lossless": True}),
    ".tif": ("TIFF", {"compression": "tiff_lzw"}),
    ".tiff": ("TIFF", {"compression": "tiff_lzw"}),
}
#: Full range of the integer modes PIL reads 16-bit files into.
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S")


def _read_pixels(im) -> np.ndarray:
    """A PIL image in any mode -> float32 (H, W[, C]) at its real range ([0, 1]).

    8-bit modes are divided by 255 and 16-bit modes by 65535 (never by the image's own maximum,
    which would brighten a dark photo, background included); float images ("F") are taken as
    already in [0, 1]. Palette images keep their transparency as alpha, and CMYK, YCbCr, LAB,
    HSV and 1-bit images are converted to RGB / L by PIL.
    """
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        return np.asarray(im).astype(np.float32) / 65535.0
    if mode == "I":
        arr = np.asarray(im).astype(np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise InputError(
                f"32-bit integer image with values {arr.min():.0f}..{arr.max():.0f}: HairDiff reads "
                f"integer images as 16-bit (0..65535); save it as an 8- or 16-bit PNG"
            )
        return (arr / 65535.0).astype(np.float32)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise InputError("float image holds NaN or inf pixels; save it again without them")
        if arr.size and (arr.min() < -1e-3 or arr.max() > 1 + 1e-3):
            logger.warning(
                "float image has values %.3g..%.3g; HairDiff reads float images as 0..1 and clips the rest",
                arr.min(),
                arr.max(),
            )
        return np.clip(arr, 0.0, 1.0)
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("LA", "La"):
        im = im.convert("RGBA") if mode == "La" else im
        if im.mode == "LA":
            arr = np.asarray(im, dtype=np.float32) / 255.0
            # grey + alpha -> RGBA, the layout the matte and sketch readers know.
            return np.concatenate([arr[..., :1].repeat(3, axis=-1), arr[..., 1:]], axis=-1)
    elif mode == "RGBa":
        im = im.convert("RGBA")
    elif mode not in ("L", "RGB", "RGBA"):
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.float32) / 255.0


def _force_mode(arr: np.ndarray, mode: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if mode == "RGB":
        return arr[..., :3] if arr.shape[-1] >= 3 else arr.repeat(3, axis=-1)
    if mode == "L":
        if arr.shape[-1] == 1:
            return arr
        return (arr[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    raise InputError(f"load_image mode {mode!r}: use None, 'RGB' or 'L'")


def load_image(path, mode: str | None = None) -> torch.Tensor:
    """Load an image file as (1, C, H, W) float in [0, 1] at its real range and orientation.

    Args:
        path: the image file (any format PIL reads).
        mode: None keeps grey (C=1), RGB (3) or RGBA (4) as stored; "RGB" or "L" force one.

    Camera orientation (EXIF) is applied, so the tensor is the image as viewers show it. A file
    larger than PIL's decompression-bomb limit is refused with ``InputError``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = check_input_path(path, "image")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im) or im
            arr = _read_pixels(im)
            if mode is not None:
                arr = _force_mode(arr, mode)
    except Image.DecompressionBombError as exc:
        raise InputError(
            f"cannot read image {path}: it is larger than PIL's safety limit of "
            f"{Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb?); downscale it first"
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]


def to_pil(image: torch.Tensor):
    """(1|C, H, W) float in [0, 1] -> an 8-bit PIL image (L, RGB or RGBA)."""
    from PIL import Image

    if image.ndim == 4:
        image = image[0]
    arr = (image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255.0).round().astype(np.uint8)
    if arr.shape[2] == 1:
        return Image.fromarray(arr[..., 0], mode="L")
    return Image.fromarray(arr)


def image_format(path) -> tuple[str, dict]:
    """The PIL format and save options for an output path's suffix; ``OutputPathError`` if unknown."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise OutputPathError(
            f"cannot write {Path(path).name!s}: unknown image suffix {suffix or '(none)'!r}; use one of "
            f"{', '.join(IMAGE_FORMATS)}",
            input="out",
        )
    return IMAGE_FORMATS[suffix]


def check_output_image(path, inputs=(), what: str = "output") -> Path:
    """Refuse, before any work, an output image path that cannot be written or would overwrite
    an input: empty, a folder, an unknown suffix, an unwritable folder, or one of ``inputs``."""
    p = check_writable_file(path, what)
    image_format(p)
    for other in inputs:
        if other is None:
            continue
        try:
            same = p.exists() and Path(other).exists() and os.path.samefile(p, other)
        except OSError:
            same = False
        if same or p.resolve() == Path(other).expanduser().resolve():
            raise OutputPathError(
                f"the {what} {p} is also an input ({other}); HairDiff never overwrites its "
                f"inputs: choose another output name",
                input=what,
            )
    return p


def save_image(image: torch.Tensor, path, **options) -> Path:
    """Save (1|C, H, W) in [0, 1] as an 8-bit image, atomically (a reader never sees half a file).

    Args:
        image: the image tensor.
        path: the file; its suffix picks the format (.png, .jpg/.jpeg at quality 95, lossless
            .webp, .tif/.tiff); another suffix raises ``OutputPathError`` before anything is written.
        options: extra PIL save options (e.g. ``compress_level=1`` for fast PNGs).
    """
    path = Path(path)
    fmt, defaults = image_format(path)
    pil = to_pil(image)
    if fmt == "JPEG" and pil.mode == "RGBA":
        pil = pil.convert("RGB")
    with atomic_write(path) as tmp:
        pil.save(tmp, format=fmt, **{**defaults, **options})
    return path


def save_pil(pil, path, **options) -> Path:
    """Save a PIL image (e.g. a contact sheet) atomically; the suffix picks the format."""
    path = Path(path)
    fmt, defaults = image_format(path)
    with atomic_write(path) as tmp:
        pil.save(tmp, format=fmt, **{**defaults, **options})
    return path


def contact_sheet(images: list[torch.Tensor], labels: list[str] | None = None, height: int = 256):
    """One row of images (each (1, C, H, W) in [0, 1]) scaled to ``height``, labelled; a PIL image."""
    from PIL import Image, ImageDraw

    tiles = []
    for img in images:
        pil = to_pil(to_rgb(img, "contact sheet tile"))
        w = max(1, round(pil.width * height / pil.height))
        tiles.append(pil.resize((w, height), Image.BILINEAR))
    label_h = 18 if labels else 0
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) + 1), height + label_h + 8), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    x = 4
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (x, 4 + label_h))
        if labels:
            draw.text((x + 2, 3), labels[i], fill=(230, 230, 230))
        x += tile.width + 4
    return sheet
