"""Reading and writing images as (1, C, H, W) float tensors in [0, 1]; contact sheets.

Every image is read at its real range (8-bit / 255, 16-bit / 65535, float as 0..1) and its
displayed orientation (EXIF). Results are written 8 bits per channel in the format of the output
suffix: a 16-bit or float photo comes back quantised to 8 bits (its background equal to the
photo's within half a level, 1/510).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch

from ..defaults import DEFAULTS
from ..errors import InputError, OutputPathError
from ..fileio import atomic_write, check_input_path, check_writable_file
from ..imageops import to_rgb

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
    """A PIL image in any mode -> float32 (H, W[, C]) at its real range ([0, 1]), or uint8 for
    8-bit modes (to be divided by 255).

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
    # 8 bits stay 8 bits here: load_image scales them into its one float tensor.
    return np.asarray(im)


def _force_mode(arr: np.ndarray, mode: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if mode == "RGB":
        return arr[..., :3] if arr.shape[-1] >= 3 else arr.repeat(3, axis=-1)
    if mode == "L":
        if arr.shape[-1] == 1:
            return arr
        scale = np.float32(1 / 255.0) if arr.dtype == np.uint8 else np.float32(1.0)
        return (arr[..., :3] @ (np.array([0.299, 0.587, 0.114], dtype=np.float32) * scale))[..., None]
    raise InputError(f"load_image mode {mode!r}: use None, 'RGB' or 'L'")


def check_megapixels(size: tuple[int, int], path, max_megapixels: float | None) -> None:
    """Refuse an image of ``size`` (width, height) above ``max_megapixels`` (None: no limit)."""
    w, h = size
    if max_megapixels is not None and w * h > max_megapixels * 1e6:
        raise InputError(
            f"the image {path} is {w}x{h} px = {w * h / 1e6:.1f} MP, more than the limit of {max_megapixels:g} MP "
            f"(--max-megapixels, max_megapixels=); downscale it, or raise the limit if this machine has the RAM "
            f"(about 4 GB per 100 MP)",
            input="max_megapixels",
        )


_PIL_LIMIT_LOCK = threading.Lock()


def _open(path, max_megapixels: float | None):
    """``Image.open`` (header only), with HairDiff's limit in place of PIL's bomb check when set."""
    from PIL import Image

    if max_megapixels is None:
        return Image.open(path)
    # Our limit, checked from the header by the caller, is the one enforced: PIL's warning
    # (above 89.5 MP) and error (above 179 MP) would contradict it. Image.open reads only the
    # header, so the lock around PIL's global is held briefly.
    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old


#: EXIF orientations that turn the stored picture by 90 degrees (width and height swap on display).
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


def image_size(path, what: str = "image", max_megapixels: float | None = DEFAULTS.max_megapixels) -> tuple[int, int]:
    """The (width, height) ``load_image`` would return, read from the header only (EXIF rotation
    applied), so sizes can be checked before any image is decoded. Refuses what ``load_image``
    refuses: a special file, an unreadable file, more than ``max_megapixels``."""
    from PIL import Image, UnidentifiedImageError

    path = check_input_path(path, what)
    try:
        with _open(path, max_megapixels) as im:
            check_megapixels(im.size, path, max_megapixels)
            w, h = im.size
            orientation = im.getexif().get(0x0112)
    except Image.DecompressionBombError as exc:
        raise InputError(f"cannot read image {path}: {exc}; downscale it first") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc
    return (h, w) if orientation in _TRANSPOSED_ORIENTATIONS else (w, h)


def load_image(path, mode: str | None = None, max_megapixels: float | None = DEFAULTS.max_megapixels) -> torch.Tensor:
    """Load an image file as (1, C, H, W) float in [0, 1] at its real range and orientation.

    Args:
        path: the image file (any format PIL reads).
        mode: None keeps grey (C=1), RGB (3) or RGBA (4) as stored; "RGB" or "L" force one.
        max_megapixels: refuse, from the header and before decoding, an image of more pixels
            (``InputError``); None leaves only PIL's decompression-bomb limit.

    Camera orientation (EXIF) is applied, so the tensor is the image as viewers show it.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = check_input_path(path, "image")
    try:
        with _open(path, max_megapixels) as im:
            check_megapixels(im.size, path, max_megapixels)
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
    # One (1, C, H, W) float tensor filled from the pixels: no float HWC copy to transpose.
    out = torch.empty((1, arr.shape[2], arr.shape[0], arr.shape[1]), dtype=torch.float32)
    out[0].copy_(torch.from_numpy(np.require(arr, requirements=["C", "W"])).permute(2, 0, 1))
    if arr.dtype == np.uint8:
        out.div_(255.0)
    return out


def to_pil(image: torch.Tensor):
    """(1|C, H, W) float in [0, 1] -> an 8-bit PIL image (L, RGB or RGBA)."""
    from PIL import Image

    if image.ndim == 4:
        image = image[0]
    image = image.detach().cpu()
    C, H, W = image.shape
    arr = np.empty((H, W, C), dtype=np.uint8)
    # In bands of rows: the float temporaries of a 100 MP photo stay a few MB, not 1.2 GB.
    band = max(1, (1 << 22) // max(1, C * W))
    for top in range(0, H, band):
        rows = image[:, top : top + band].float().clamp(0, 1).mul_(255.0).round_().to(torch.uint8)
        arr[top : top + band] = rows.permute(1, 2, 0).numpy()
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
    if fmt == "PNG" and pil.info.get("title") and "pnginfo" not in options:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Title", str(pil.info["title"]))
        options = {**options, "pnginfo": info}
    with atomic_write(path) as tmp:
        pil.save(tmp, format=fmt, **{**defaults, **options})
    return path


def contact_sheet(
    images: list[torch.Tensor], labels: list[str] | None = None, height: int = 256, title: str | None = None
):
    """One row of images (each (1, C, H, W) in [0, 1]) scaled to ``height``, labelled; a PIL image.

    ``title``: one line above the row (e.g. what a built-in model is), kept in the PNG's text too
    (``sheet.info["title"]``, saved by ``save_pil``) so a reader of the file can tell.
    """
    from PIL import Image, ImageDraw

    tiles = []
    for img in images:
        pil = to_pil(to_rgb(img, "contact sheet tile"))
        w = max(1, round(pil.width * height / pil.height))
        tiles.append(pil.resize((w, height), Image.BILINEAR))
    label_h = 18 if labels else 0
    title_h = 18 if title else 0
    width = sum(t.width for t in tiles) + 4 * (len(tiles) + 1)
    if title:
        # The default bitmap font is about 6 px a character: the row is widened to fit the line.
        width = max(width, 8 + 6 * len(title))
    sheet = Image.new("RGB", (width, height + label_h + title_h + 8), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 3), title, fill=(255, 210, 90))
        sheet.info["title"] = title
    x = 4
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (x, 4 + label_h + title_h))
        if labels:
            draw.text((x + 2, 3 + title_h), labels[i], fill=(230, 230, 230))
        x += tile.width + 4
    return sheet
