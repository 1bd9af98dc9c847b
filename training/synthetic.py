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

    from hairdiff_core.data.imageio import save_pil
    from hairdiff_core.fileio import atomic_write_text

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


# -- richer synthetic portraits (the toy model family's training data) -------------------------
# Hair is a striped field whose strands follow a known direction: the stripes are the level
# lines of a phase phi(x, y) = (n . p) / period + curl * sin(2 pi (t . p) / wavelength + psi),
# t = (cos a, sin a) the strand direction, n its normal. Sketch strokes are drawn along chosen
# level lines of the same phi (streamlines of the strand field), so a sample's strand direction is
# known exactly: ``angle`` (radians in [0, pi), image axes: x right, y down).


def sample_hair_params(rng: np.random.Generator, size: int = 128) -> dict:
    """Random hair/scene parameters for :func:`render_portrait` (all plain floats and lists)."""
    s = float(size)
    blobs = []
    for _ in range(int(rng.integers(1, 4))):
        blobs.append(
            [
                s * rng.uniform(0.3, 0.5),
                s * rng.uniform(0.3, 0.7),  # centre y, x
                s * rng.uniform(0.16, 0.3),
                s * rng.uniform(0.18, 0.34),  # radii y, x
                rng.uniform(1.6, 3.0),  # superellipse exponent (round .. boxy)
            ]
        )
    return {
        "size": int(size),
        "angle": float(rng.uniform(0, np.pi)),
        "curl": float(rng.choice([0.0, rng.uniform(0.1, 0.6)])),
        "wavelength": float(s * rng.uniform(0.25, 0.6)),
        "curl_phase": float(rng.uniform(0, 2 * np.pi)),
        # Stripes 20-31 px: 2.5-4 latent pixels (factor 8), so a 16-channel latent and the
        # transformer's 16 px tokens can carry them; 10-14 px stripes were finer than a latent
        # pixel and the toy VAE and base model blurred them away.
        "period": float(s * rng.uniform(0.16, 0.24)),
        "phase": float(rng.uniform(0, 1)),
        "hair_colour": rng.uniform(0.05, 0.85, size=3).round(4).tolist(),
        "bg": rng.uniform(0.25, 0.9, size=3).round(4).tolist(),
        "bg_grad": rng.uniform(-0.25, 0.25, size=3).round(4).tolist(),
        "skin": (np.array([0.85, 0.66, 0.55]) * rng.uniform(0.55, 1.1)).round(4).tolist(),
        "face": [
            s * rng.uniform(0.55, 0.65),
            s * rng.uniform(0.42, 0.58),
            s * rng.uniform(0.2, 0.26),
            s * rng.uniform(0.15, 0.2),
        ],
        "blobs": blobs,
        # One stroke on each bright stripe: the sketch then says where the strands are, not
        # only which way they run (with 2-3 strokes per period the phase is ambiguous, the
        # best guess at high noise is flat colour, and generation loses the direction).
        "strokes_per_period": 1,
        "stroke_colour": bool(rng.uniform() < 0.5),
    }


def hair_phase(params: dict) -> np.ndarray:
    """The stripe phase phi (H x W, in periods) of :func:`sample_hair_params`' strand field."""
    h = w = int(params["size"])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    a = params["angle"]
    along = np.cos(a) * xx + np.sin(a) * yy
    across = -np.sin(a) * xx + np.cos(a) * yy
    wave = params["curl"] * params["period"] * np.sin(2 * np.pi * along / params["wavelength"] + params["curl_phase"])
    return (across + wave) / params["period"] + params["phase"]


def hair_matte(params: dict) -> np.ndarray:
    """Boolean hair region: the union of superellipse blobs, minus the face."""
    h = w = int(params["size"])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    inside = np.zeros((h, w), bool)
    for cy, cx, ry, rx, p in params["blobs"]:
        inside |= (np.abs((yy - cy) / ry) ** p + np.abs((xx - cx) / rx) ** p) <= 1.0
    return inside & ~_face(params, yy, xx)


def _face(params: dict, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    fy, fx, ry, rx = params["face"]
    return ((yy - fy) / ry) ** 2 + ((xx - fx) / rx) ** 2 <= 1.0


def render_portrait(params: dict, matte: np.ndarray | None = None) -> np.ndarray:
    """Photo (H x W x 3 float in [0, 1]) of the scene in ``params``; hair drawn inside ``matte``
    (default: the params' own hair region), so one scene can be re-haired along another field."""
    h = w = int(params["size"])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    bg = np.asarray(params["bg"]) + (xx / w)[..., None] * np.asarray(params["bg_grad"])
    photo = np.clip(bg, 0, 1)
    face = _face(params, yy, xx)
    fy, fx, ry, rx = params["face"]
    shade = 1.0 - 0.25 * np.clip((xx - fx) / rx, -1, 1)[..., None] * 0.5
    photo = np.where(face[..., None], np.asarray(params["skin"]) * shade, photo)
    inside = hair_matte(params) if matte is None else matte.astype(bool)
    stripes = 0.5 + 0.5 * np.cos(2 * np.pi * hair_phase(params))
    hair = np.asarray(params["hair_colour"]) * (0.5 + 0.5 * stripes[..., None]) + 0.1 * stripes[..., None] ** 4
    photo = np.where(inside[..., None], hair, photo)
    return np.clip(photo, 0, 1)


def strand_sketch(params: dict, matte: np.ndarray, width: float = 0.9) -> np.ndarray:
    """Sketch (H x W x 3 float): strokes along level lines of the strand field inside ``matte``,
    ``strokes_per_period`` per stripe period (one on each bright stripe's centre), ``width`` px
    half-width, antialiased; white strokes on black, or strokes in the hair colour when
    ``stroke_colour``."""
    phi = hair_phase(params) * max(1, int(params.get("strokes_per_period", 1)))
    gy, gx = np.gradient(phi)
    grad = np.maximum(np.hypot(gx, gy), 1e-6)
    dist = np.abs(phi - np.round(phi)) / grad  # px to the nearest drawn level line
    alpha = np.clip(width + 0.5 - dist, 0, 1) * matte.astype(bool)
    colour = np.asarray(params["hair_colour"]) * 1.2 + 0.1 if params.get("stroke_colour") else np.ones(3)
    return np.clip(alpha[..., None] * np.clip(colour, 0, 1), 0, 1)


SKETCH_STYLES = ("strands", "levels")


def traced_sketch(photo: np.ndarray, matte: np.ndarray, colour: bool = False, seed: int = 0) -> np.ndarray:
    """The sketch ``hairdiff prepare --seeding ridges`` draws for this photo (HxWx3 uint8) and matte
    (HxW): strands traced along the hair's estimated orientation field from its highlights
    (:mod:`hairdiff_core.data.strands`), so the synthetic training sketches look like the ones users'
    datasets get, with each stroke on a visible stripe. Float HxWx3 in [0, 1]."""
    import torch

    from hairdiff_core.data.strands import synthesize_sketch

    p = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1)[None].float() / 255.0
    m = torch.from_numpy(np.ascontiguousarray(matte > (127 if matte.dtype == np.uint8 else 0.5))).float()[None, None]
    return synthesize_sketch(p, m, colour=colour, seed=seed, seeding="ridges")[0].permute(1, 2, 0).numpy()


def make_portrait_arrays(
    params: dict, sketch_style: str = "strands", seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(photo HxWx3 uint8, matte HxW uint8, sketch HxWx3 uint8) of one scene.

    ``sketch_style``: ``strands`` (default) traces the photo's strands as ``hairdiff prepare``
    does (:func:`traced_sketch`, ``seed`` its seed); ``levels`` draws level lines of the known
    field (:func:`strand_sketch`: exact, no estimation).
    """
    if sketch_style not in SKETCH_STYLES:
        raise ValueError(f"unknown sketch style {sketch_style!r}; choose one of {SKETCH_STYLES}")
    matte = hair_matte(params)
    to8 = lambda a: (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    photo = to8(render_portrait(params, matte))
    if sketch_style == "levels":
        sketch = strand_sketch(params, matte)
    else:
        sketch = traced_sketch(photo, matte, colour=bool(params.get("stroke_colour")), seed=seed)
    return photo, to8(matte.astype(np.float32)), to8(sketch)


def redirect(params: dict, rng: np.random.Generator, min_turn: float = np.pi / 4) -> dict:
    """A copy of ``params`` whose strands turn by at least ``min_turn`` (up to 90 degrees): the
    'new hair' of a held-out edit, drawn on the same scene and matte."""
    turn = rng.uniform(min_turn, np.pi / 2) * rng.choice([-1.0, 1.0])
    new = dict(params)
    new["angle"] = float((params["angle"] + turn) % np.pi)
    new["phase"] = float(rng.uniform(0, 1))
    return new


def angle_difference(a: float, b: float) -> float:
    """Smallest difference in radians between two undirected orientations (0 .. pi/2)."""
    d = abs(a - b) % np.pi
    return float(min(d, np.pi - d))


def make_portrait_dataset(
    root, n: int = 16, size: int = 128, seed: int = 0, braid: int = 0, sketch_style: str = "strands"
) -> Path:
    """Write ``n`` rich synthetic portraits under ``root``/{img,matte,sketch} plus
    ``params.json`` ({stem: params}, the known strand field of each). Returns ``root``."""
    import json

    from PIL import Image

    root = Path(root)
    for kind in ("img", "matte", "sketch"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    table = {}
    for i in range(n):
        stem = f"p{i:04d}"
        params = sample_hair_params(rng, size)
        photo, matte, sketch = make_portrait_arrays(params, sketch_style, seed=i)
        Image.fromarray(photo).save(root / "img" / f"{stem}.png")
        Image.fromarray(matte, mode="L").save(root / "matte" / f"{stem}.png")
        Image.fromarray(sketch).save(root / "sketch" / f"{stem}.png")
        table[stem] = params
    (root / "params.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
    if braid:
        (root / "braid.txt").write_text("\n".join(list(table)[:braid]) + "\n", encoding="utf-8")
    return root
