"""Dataset preparation: a folder of photos and a folder of hair mattes -> a training set.

Output layout (what :mod:`hairdiff_core.data.datasets` reads)::

    out/img/<stem>.png       the photo, upright (EXIF orientation applied), at most max_side px
    out/matte/<stem>.png     the matte, binarised (white hair on black), same size
    out/sketch/<stem>.png    the synthesised sketch (strands or edges, see hairdiff_core.data.strands):
                             white strokes on black, or hair-coloured strokes with an alpha channel
    out/braid.txt            the braid subset (when --braids / --braid-pattern selects any)
    out/prepare.json         settings and per-sample stats

With ``variants`` K > 1 every photo gives K samples ``<stem>_v0`` .. ``<stem>_v<K-1>`` whose
sketches differ (seed, density, length); their photo and matte files are hard links of one
file where the file system allows it. Keep variants of one photo on one side of a train/eval
split: prepare the evaluation photos into their own folder.

Everything is checked before anything is written: a photo without a matte, a matte without a
photo, an unreadable file, photo and matte sizes that differ, an empty matte, a braid name with
no photo. Each is named with its problem; ``skip_bad`` leaves those samples out instead.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..fileio import atomic_write, atomic_write_text, disk_full_error, is_disk_full
from ..method import mask as M
from .datasets import BRAID_FILE, DatasetError, Problem
from .imageio import load_image, save_image

logger = logging.getLogger(__name__)

PREPARE_FILE = "prepare.json"
FORMAT_VERSION = 1
DEFAULT_MAX_SIDE = 2048
MATTE_THRESHOLD = 0.5
#: Spread of the per-variant sketch settings around the chosen ones (log-uniform factors).
VARIANT_DENSITY_SPREAD = 0.5
VARIANT_LENGTH_SPREAD = 0.35
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


@dataclass
class PrepareOptions:
    sketch: str = "strands"
    colour: bool = False
    max_side: int | None = DEFAULT_MAX_SIDE
    variants: int = 1
    seed: int = 0
    density: float = 1.0
    length: float = 1.0
    thickness: float = 1.0
    seeding: str = "grid"
    braids_file: str | None = None
    braid_pattern: str | None = None
    skip_bad: bool = False
    overwrite: bool = False

    def validate(self) -> PrepareOptions:
        from .strands import SEEDINGS, STYLES

        if self.sketch not in STYLES:
            raise InputError(f"unknown sketch style {self.sketch!r}; choose one of {', '.join(STYLES)}")
        if self.seeding not in SEEDINGS:
            raise InputError(f"unknown --seeding {self.seeding!r}; choose one of {', '.join(SEEDINGS)}")
        if self.variants < 1:
            raise InputError(f"--variants must be >= 1, got {self.variants}")
        if self.max_side is not None and self.max_side != 0 and self.max_side < 16:
            raise InputError(f"--max-side must be >= 16 px (or 0 to keep the size), got {self.max_side}")
        for name in ("density", "length", "thickness"):
            if not getattr(self, name) > 0:
                raise InputError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.braids_file and self.braid_pattern:
            raise InputError("give --braids FILE or --braid-pattern GLOB, not both")
        return self


@dataclass
class Pair:
    stem: str
    photo: Path
    matte: Path
    size: tuple[int, int]  # upright (width, height)
    exif_rotated: bool
    braid: bool = False


@dataclass
class PrepareReport:
    out: Path
    samples: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def sample_count(self) -> int:
        return sum(len(s["variants"]) for s in self.samples)


# -- scanning ------------------------------------------------------------------------------------
def _image_extensions() -> set[str]:
    from PIL import Image

    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def _index(folder: Path, extensions: set[str]) -> tuple[dict[str, Path], list[Problem]]:
    files: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in extensions:
            files.setdefault(path.stem, []).append(path)
    problems = [
        Problem(stem, f"several files with this stem in {folder} ({', '.join(p.name for p in paths)}); keep one")
        for stem, paths in files.items()
        if len(paths) > 1
    ]
    return {stem: paths[0] for stem, paths in files.items() if len(paths) == 1}, problems


def _read_upright_size(path: Path) -> tuple[tuple[int, int] | None, bool, str | None]:
    """Decode ``path`` fully; ((width, height) after EXIF rotation, rotated?, None) or the problem."""
    from PIL import Image, UnidentifiedImageError

    from ..fileio import check_input_path

    try:
        check_input_path(path, f"{path.parent.name} file")
        with Image.open(path) as im:
            im.load()
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return None, False, f"unreadable {path.parent.name} file {path.name} ({exc})"
    if orientation in _SWAPPING_ORIENTATIONS:
        w, h = h, w
    return (w, h), orientation not in (1, None), None


def _braid_stems(options: PrepareOptions, extensions: set[str]) -> list[str]:
    """Stems of the --braids file: one a line, ``#`` comments, ``name.jpg`` read as ``name``."""
    if not options.braids_file:
        return []
    path = Path(options.braids_file)
    if not path.is_file():
        raise FileNotFoundError(2, "braid list not found", str(path))
    stems = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            stems.append(Path(line).stem if Path(line).suffix.lower() in extensions else line)
    return stems


def scan_inputs(images, mattes, options: PrepareOptions) -> tuple[list[Pair], list[Problem]]:
    """Match photos and mattes by stem and check every pair (decoding each file once)."""
    images, mattes = Path(images), Path(mattes)
    from ..fileio import check_input_path

    for folder, what in ((images, "--images"), (mattes, "--mattes")):
        check_input_path(folder, what, kind="folder", input=what.strip("-"))
    extensions = _image_extensions()
    photos, problems = _index(images, extensions)
    matte_files, matte_problems = _index(mattes, extensions)
    problems += matte_problems
    duplicated = {p.stem for p in problems}
    braid_list = set(_braid_stems(options, extensions))
    pairs: list[Pair] = []
    for stem in sorted(set(photos) | set(matte_files)):
        if stem in duplicated:
            continue
        if stem not in matte_files:
            problems.append(Problem(stem, f"photo {photos[stem].name} has no matte ({mattes}/{stem}.png is missing)"))
            continue
        if stem not in photos:
            problems.append(Problem(stem, f"matte {matte_files[stem].name} has no photo in {images}"))
            continue
        photo_size, rotated, error = _read_upright_size(photos[stem])
        matte_size, _, matte_error = _read_upright_size(matte_files[stem])
        found = [e for e in (error, matte_error) if e]
        if found:
            problems.extend(Problem(stem, e) for e in found)
            continue
        if photo_size != matte_size:
            hint = ""
            if rotated and photo_size == matte_size[::-1]:
                hint = " (the matte looks made from the photo before its EXIF rotation: rotate the matte to the upright photo)"
            problems.append(
                Problem(
                    stem,
                    f"sizes differ: photo {photo_size[0]}x{photo_size[1]}{' (upright, EXIF-rotated)' if rotated else ''}, "
                    f"matte {matte_size[0]}x{matte_size[1]}{hint}; the matte must cover the photo pixel for pixel",
                )
            )
            continue
        braid = stem in braid_list or bool(
            options.braid_pattern
            and (
                fnmatch.fnmatch(photos[stem].name, options.braid_pattern)
                or fnmatch.fnmatch(stem, options.braid_pattern)
            )
        )
        pairs.append(Pair(stem, photos[stem], matte_files[stem], photo_size, rotated, braid))
    known = set(photos)
    for stem in sorted(braid_list - known):
        problems.append(Problem(stem, f"listed in {options.braids_file} but there is no photo with this stem"))
    return pairs, problems


# -- one sample ------------------------------------------------------------------------------------
def _fit(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    w, h = size
    if not max_side or max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _load_pair(pair: Pair, max_side: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Upright photo (1, 3, H, W) and binary matte (1, 1, H, W) at most ``max_side`` px."""
    photo = load_image(pair.photo, mode="RGB")
    matte = M.binarize_matte(load_image(pair.matte), MATTE_THRESHOLD, require_nonempty=False)
    w, h = _fit((photo.shape[-1], photo.shape[-2]), max_side)
    if (h, w) != tuple(photo.shape[-2:]):
        photo = F.interpolate(photo, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        # Area-resize the hard matte and cut at 0.5 again: the matte stays hard, its edge where
        # half of each new pixel is hair.
        matte = (F.interpolate(matte, size=(h, w), mode="area") > MATTE_THRESHOLD).float()
    return photo, matte


def variant_settings(options: PrepareOptions, stem: str) -> list[dict]:
    """Seed, density and length of each sketch variant of ``stem``: a function of the run's
    seed and the stem only (not of the other photos or their order). Variant 0 uses the chosen
    density and length; the others spread around them."""
    rng = np.random.default_rng([int(options.seed) & 0xFFFFFFFF, zlib.crc32(stem.encode("utf-8"))])
    out = []
    for k in range(options.variants):
        sketch_seed = int(rng.integers(0, 2**31 - 1))
        dens_f = math.exp(rng.uniform(-VARIANT_DENSITY_SPREAD, VARIANT_DENSITY_SPREAD)) if k else 1.0
        len_f = math.exp(rng.uniform(-VARIANT_LENGTH_SPREAD, VARIANT_LENGTH_SPREAD)) if k else 1.0
        out.append({"seed": sketch_seed, "density": options.density * dens_f, "length": options.length * len_f})
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes the same file as ``src`` (a hard link; a copy where links fail), atomically."""
    import shutil

    with atomic_write(dst, fsync=False) as tmp:
        tmp.unlink()  # atomic_write's unique name, taken over by the link
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _sample_stems(stem: str, variants: int) -> list[str]:
    return [stem] if variants == 1 else [f"{stem}_v{k}" for k in range(variants)]


def prepare_sample(pair: Pair, out: Path, options: PrepareOptions) -> dict:
    """Write the sample(s) of one photo; return its stats for prepare.json."""
    from .strands import synthesize_sketch

    photo, matte = _load_pair(pair, options.max_side)
    h, w = photo.shape[-2:]
    matte_px = float(matte.sum())
    stems = _sample_stems(pair.stem, options.variants)
    first_img, first_matte = out / "img" / f"{stems[0]}.png", out / "matte" / f"{stems[0]}.png"
    save_image(photo, first_img)
    save_image(matte, first_matte)
    variants = []
    for stem, settings in zip(stems, variant_settings(options, pair.stem)):
        if stem != stems[0]:
            _link_or_copy(first_img, out / "img" / f"{stem}.png")
            _link_or_copy(first_matte, out / "matte" / f"{stem}.png")
        sketch, alpha = synthesize_sketch(
            photo,
            matte,
            style=options.sketch,
            colour=options.colour,
            seed=settings["seed"],
            density=settings["density"],
            length=settings["length"],
            thickness=options.thickness,
            seeding=options.seeding,
            return_alpha=True,
        )
        # Coloured strokes of dark hair are nearly black: an alpha channel keeps them strokes.
        save_image(torch.cat([sketch, alpha], dim=1) if options.colour else sketch, out / "sketch" / f"{stem}.png")
        variants.append(
            {
                "stem": stem,
                **{k: round(v, 6) if isinstance(v, float) else v for k, v in settings.items()},
                "stroke_fraction_of_matte": round(float(alpha.sum()) / max(matte_px, 1.0), 6),
            }
        )
    return {
        "stem": pair.stem,
        "photo": str(pair.photo),
        "matte": str(pair.matte),
        "source_size": list(pair.size),
        "size": [int(w), int(h)],
        "exif_rotated": pair.exif_rotated,
        "matte_fraction": round(matte_px / float(h * w), 6),
        "braid": pair.braid,
        "variants": variants,
    }


# -- whole folder ----------------------------------------------------------------------------------
def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix a new dataset into an old one; with ``overwrite`` remove the files the old
    run listed in its prepare.json (nothing else)."""
    previous = out / PREPARE_FILE
    occupied = [k for k in ("img", "matte", "sketch") if (out / k).is_dir() and any((out / k).iterdir())]
    if not occupied and not previous.exists():
        return
    if not overwrite:
        raise InputError(
            f"output folder {out} already holds a dataset ({', '.join(occupied) or PREPARE_FILE}); "
            "choose an empty --out, or pass --overwrite to replace the files of the earlier prepare run"
        )
    if previous.exists():
        try:
            old = json.loads(previous.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {previous} ({exc}); remove the old output by hand") from exc
        for sample in old.get("samples", []):
            for variant in sample.get("variants", []):
                for kind in ("img", "matte", "sketch"):
                    (out / kind / f"{variant['stem']}.png").unlink(missing_ok=True)
        (out / BRAID_FILE).unlink(missing_ok=True)
    else:
        logger.warning("%s has no %s: files of an earlier run that this one does not rewrite stay", out, PREPARE_FILE)


def prepare_dataset(
    images, mattes, out, options: PrepareOptions | None = None, on_sample: Callable[[int, int], None] | None = None
) -> PrepareReport:
    """Turn photos + hair mattes into a training set (see the module docstring).

    Args:
        images: folder of photos (any format PIL reads; EXIF orientation is applied).
        mattes: folder of mattes matched by stem (L, RGB or RGBA-alpha; white = hair).
        out: output folder (created).
        options: :class:`PrepareOptions` (sketch style, colour, size, variants, braids, seed).
        on_sample: called as ``on_sample(done, total)`` after each photo (a progress bar).

    Returns:
        A :class:`PrepareReport`; ``out/prepare.json`` holds the same.

    Raises:
        DatasetError: naming every bad pair, unless ``options.skip_bad`` (then they are left
            out and listed in the report); also when no pair is usable.
    """
    options = (options or PrepareOptions()).validate()
    out = Path(out)
    started = time.time()
    pairs, problems = scan_inputs(images, mattes, options)
    # The matte must select something: checked now, so that a bad sample stops the run before
    # anything is written.
    good: list[Pair] = []
    for pair in pairs:
        matte = M.binarize_matte(load_image(pair.matte), MATTE_THRESHOLD, require_nonempty=False)
        if not bool(matte.any()):
            problems.append(
                Problem(
                    pair.stem,
                    f"empty matte ({pair.matte.name} has no pixel above {MATTE_THRESHOLD}); paint the hair white on black",
                )
            )
        else:
            good.append(pair)
    problems.sort(key=lambda p: p.stem)
    if problems and not options.skip_bad:
        lines = "\n".join(f"  {p}" for p in problems)
        raise DatasetError(
            f"{len(problems)} problem(s) in the photos and mattes ({len(good)} good pair(s)):\n{lines}\n"
            "Fix or remove these files, or pass --skip-bad to prepare the good ones."
        )
    if not good:
        raise DatasetError(f"no usable photo + matte pair in {images} and {mattes}")
    if problems:
        logger.warning("skipping %d bad sample(s):\n%s", len(problems), "\n".join(f"  {p}" for p in problems))
    _check_out(out, options.overwrite)
    created = [d for d in (out, *(out / k for k in ("img", "matte", "sketch"))) if not d.exists()]
    for kind in ("img", "matte", "sketch"):
        (out / kind).mkdir(parents=True, exist_ok=True)

    report = PrepareReport(out=out, problems=problems)
    if on_sample is not None:
        on_sample(0, len(good))
    try:
        for i, pair in enumerate(good):
            report.samples.append(prepare_sample(pair, out, options))
            if on_sample is not None:
                on_sample(i + 1, len(good))
        braid_stems = [v["stem"] for s in report.samples if s["braid"] for v in s["variants"]]
        if braid_stems:
            atomic_write_text(out / BRAID_FILE, "\n".join(braid_stems) + "\n")
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise _disk_full_midway(out, report, good, created) from exc
    settings = asdict(options)
    settings.pop("overwrite")
    record = {
        "format_version": FORMAT_VERSION,
        "images": str(images),
        "mattes": str(mattes),
        "settings": settings,
        "samples": report.samples,
        "skipped": [{"stem": p.stem, "problem": p.what} for p in problems],
        "totals": {
            "photos": len(report.samples),
            "samples": report.sample_count,
            "braid_samples": len(braid_stems),
            "skipped": len({p.stem for p in problems}),
            "seconds": round(time.time() - started, 2),
        },
    }
    try:
        atomic_write_text(out / PREPARE_FILE, json.dumps(record, indent=1) + "\n")
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise _disk_full_midway(out, report, good, created) from exc
    return report


def _disk_full_midway(out: Path, report: PrepareReport, good: list, created: list[Path]):
    """A full disk during the writing: the photo being written loses its partial files, the
    folders this run created and left empty go, and the message says how far it got."""
    done = {v["stem"] for s in report.samples for v in s["variants"]}
    for kind in ("img", "matte", "sketch"):
        folder = out / kind
        for f in folder.glob("*.png") if folder.is_dir() else ():
            if f.stem not in done and any(f.stem == p.stem or f.stem.startswith(f"{p.stem}_v") for p in good):
                f.unlink(missing_ok=True)
    for folder in sorted(created, key=lambda d: len(d.parts), reverse=True):
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass
    kept = f"{len(report.samples)} of {len(good)} photo(s) ({len(done)} sample(s)) are complete in {out}"
    if not report.samples:
        kept = f"no sample was complete, {out} is left as it was"
    return disk_full_error(
        out, f"{kept}, without {PREPARE_FILE}", "out", "free some space and run again with --overwrite"
    )
