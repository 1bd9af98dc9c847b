"""A small synthetic HairDiff dataset (for tests, benchmarks and a first dry run of a config).

Each sample is a smooth "portrait" background with a hair-like striped blob at the top, its
matte (the blob) and a sketch of dark strokes on white that follow the stripes. Deterministic
for a given seed; no network, no real faces.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def make_sample_arrays(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(photo HxWx3 uint8, matte HxW uint8, sketch HxWx3 uint8)."""
    h = w = int(size)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0.2, 0.8, size=3).astype(np.float32)
    grad = (xx / w)[..., None] * rng.uniform(-0.2, 0.2, size=3).astype(np.float32)
    photo = np.clip(base + grad, 0, 1)
    cy, cx = h * rng.uniform(0.3, 0.45), w * rng.uniform(0.4, 0.6)
    ry, rx = h * rng.uniform(0.18, 0.3), w * rng.uniform(0.22, 0.35)
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    angle = rng.uniform(0, np.pi)
    period = max(3.0, size / rng.uniform(6, 12))
    phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * phase)
    hair_colour = rng.uniform(0.05, 0.6, size=3).astype(np.float32)
    hair = hair_colour * (0.6 + 0.4 * stripes[..., None])
    photo = np.where(inside[..., None], hair, photo)
    matte = inside.astype(np.float32)
    sketch = np.ones((h, w, 3), np.float32)
    strokes = inside & (np.abs(np.sin(2 * np.pi * phase)) < 0.15)
    sketch[strokes] = 0.05
    to8 = lambda a: (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    return to8(photo), to8(matte), to8(sketch)


def make_synthetic_dataset(root, n: int = 4, size: int = 64, braid: int = 1, seed: int = 0) -> Path:
    """Write ``n`` samples (``size`` px) under ``root``/{img,matte,sketch}; the first ``braid``
    stems go to ``braid.txt``. Returns ``root``."""
    from PIL import Image

    from hairdiff_core.fileio import atomic_write_text
    from hairdiff_core.imageio import save_pil

    root = Path(root)
    for kind in ("img", "matte", "sketch"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stems = []
    for i in range(n):
        stem = f"s{i:03d}"
        photo, matte, sketch = make_sample_arrays(size, rng)
        save_pil(Image.fromarray(photo), root / "img" / f"{stem}.png")
        save_pil(Image.fromarray(matte, mode="L"), root / "matte" / f"{stem}.png")
        save_pil(Image.fromarray(sketch), root / "sketch" / f"{stem}.png")
        stems.append(stem)
    if braid:
        atomic_write_text(root / "braid.txt", "\n".join(stems[:braid]) + "\n")
    return root
