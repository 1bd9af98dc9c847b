"""Reading and writing images as (1, C, H, W) float tensors in [0, 1]; contact sheets."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

logger = logging.getLogger(__name__)


def load_image(path, mode: str | None = None, exif_transpose: bool = False) -> torch.Tensor:
    """Load an image file as (1, C, H, W) float in [0, 1].

    ``mode`` None keeps L / RGB / RGBA as stored (palette and 16-bit images are converted to
    RGB(A) / L); "RGB" or "L" force a mode. ``exif_transpose`` turns the pixels upright as the
    EXIF orientation tag says (camera photos are often stored sideways), as image viewers do.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "No such file", str(path))
    try:
        with Image.open(path) as im:
            im.load()
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            if mode is not None:
                im = im.convert(mode)
            elif im.mode in ("P", "PA"):
                im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
            elif im.mode in ("I;16", "I", "F"):
                arr = np.asarray(im, dtype=np.float32)
                arr = arr / max(float(arr.max()), 1.0)
                return torch.from_numpy(arr)[None, None]
            elif im.mode == "LA":
                im = im.convert("RGBA")
            elif im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]


def to_pil(image: torch.Tensor):
    from PIL import Image

    if image.ndim == 4:
        image = image[0]
    arr = (image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255.0).round().astype(np.uint8)
    if arr.shape[2] == 1:
        return Image.fromarray(arr[..., 0], mode="L")
    return Image.fromarray(arr)


def save_image(image: torch.Tensor, path) -> Path:
    """Save (1|C, H, W) in [0, 1] as PNG (atomically: a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    to_pil(image).save(tmp, format="PNG" if path.suffix.lower() in ("", ".png") else None)
    os.replace(tmp, path)
    return path


def save_text(text: str, path) -> Path:
    """Write a text file atomically (a temporary name, then a rename), like :func:`save_image`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def contact_sheet(images: list[torch.Tensor], labels: list[str] | None = None, height: int = 256):
    """One row of images (each (1, C, H, W) in [0, 1]) scaled to ``height``, labelled; a PIL image."""
    from PIL import Image, ImageDraw

    tiles = []
    for img in images:
        if img.shape[1] == 1:
            img = img.repeat(1, 3, 1, 1)
        elif img.shape[1] == 4:
            img = img[:, :3]
        pil = to_pil(img)
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
