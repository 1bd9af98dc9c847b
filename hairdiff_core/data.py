"""Training/evaluation datasets: scan, validate and load (photo, matte, sketch) triples.

Layout of a dataset root::

    root/img/<stem>.png|jpg|jpeg|webp      photos (RGB)
    root/matte/<stem>.*                    hair mattes (white hair on black, or an alpha channel)
    root/sketch/<stem>.*                   sketches (strokes on white or black, or RGBA)
    root/braid.txt                         optional: one stem per line, the braid subset

Files are matched by stem. ``scan_dataset`` checks the *whole* dataset before anything else
runs and names every bad sample with what is wrong with it: a missing or duplicated file, an
unreadable file, photo/matte/sketch sizes that differ, an empty matte, a stem in ``braid.txt``
that has no sample. By default a dataset with problems is refused; ``skip_bad=True`` keeps the
good samples and reports how many were skipped.

Resolution handling (``load_sample(..., resolution=N)``): the short side is resized to N and
the centre N x N square is cut out (N a multiple of 16: SD3's VAE factor 8 x patch 2), so that
every batch is a plain stack. Photos and sketches are resized with antialiasing; the matte is
resized the same way and re-binarised at 0.5, so it stays a hard matte whose feathering is done
later, at the working resolution, by :func:`hairdiff_core.mask.soft_mask`.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import mask as M
from .errors import InputError
from .imageops import to_rgb

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
KINDS = ("img", "matte", "sketch")
BRAID_FILE = "braid.txt"
RESOLUTION_MULTIPLE = M.TOKEN_FACTOR
MATTE_THRESHOLD = 0.5


class DatasetError(InputError):
    """The dataset has bad samples (the message lists each one) or none at all."""


@dataclass(frozen=True)
class Sample:
    stem: str
    img: Path
    matte: Path
    sketch: Path
    is_braid: bool = False


@dataclass(frozen=True)
class Problem:
    stem: str
    what: str

    def __str__(self) -> str:
        return f"{self.stem}: {self.what}"


@dataclass
class DatasetScan:
    root: Path
    samples: list[Sample] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def bad_stems(self) -> list[str]:
        return sorted({p.stem for p in self.problems})

    def one_line(self, limit: int = 5) -> str:
        """The first ``limit`` problems on one line (error messages are one line)."""
        text = "; ".join(str(p) for p in self.problems[:limit])
        if len(self.problems) > limit:
            text += f"; and {len(self.problems) - limit} more"
        return text

    def report(self, limit: int | None = 50) -> str:
        """Human-readable list of problems, one per line (the first ``limit``)."""
        lines = [f"  {p}" for p in self.problems[: limit or None]]
        if limit and len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


def _index_folder(folder: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    files: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
            files.setdefault(path.stem, []).append(path)
    unique = {stem: paths[0] for stem, paths in files.items() if len(paths) == 1}
    duplicates = {stem: paths for stem, paths in files.items() if len(paths) > 1}
    return unique, duplicates


def _read_size(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """Fully decode ``path``; return ((width, height), None) or (None, what is wrong)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decodes every byte: catches truncated files that Image.open accepts
            return im.size, None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return None, f"unreadable {path.parent.name} file {path.name} ({exc})"


def _matte_is_empty(path: Path, threshold: float = MATTE_THRESHOLD) -> bool:
    from .imageio import load_image

    matte = load_image(path)
    binary = M.binarize_matte(matte, threshold, require_nonempty=False)
    return not bool(binary.any())


def read_braid_list(root: Path) -> list[str]:
    path = Path(root) / BRAID_FILE
    if not path.is_file():
        return []
    stems = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            # Tolerate "name.png" as well as "name".
            stems.append(Path(line).stem if Path(line).suffix.lower() in IMAGE_EXTENSIONS else line)
    return stems


def scan_dataset(root, skip_bad: bool = False) -> DatasetScan:
    """Check every sample of the dataset at ``root``; see the module docstring.

    Raises ``DatasetError`` listing each bad sample unless ``skip_bad``; with ``skip_bad`` the
    bad samples are left out of ``.samples`` and listed in ``.problems``. A dataset with no good
    sample is refused either way. A missing root or sub-folder raises ``FileNotFoundError``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(2, "dataset folder not found", str(root))
    missing_dirs = [k for k in KINDS if not (root / k).is_dir()]
    if missing_dirs:
        raise DatasetError(
            f"dataset {root} lacks the sub-folder(s) {missing_dirs}; expected {root}/img, {root}/matte "
            f"and {root}/sketch with files matched by stem ({', '.join(IMAGE_EXTENSIONS)})"
        )
    indexed = {k: _index_folder(root / k) for k in KINDS}
    stems = sorted(set().union(*(set(u) | set(d) for u, d in indexed.values())))
    braid = read_braid_list(root)
    braid_set = set(braid)

    scan = DatasetScan(root=root)
    for stem in stems:
        problems: list[str] = []
        paths: dict[str, Path] = {}
        for kind in KINDS:
            unique, dups = indexed[kind]
            if stem in dups:
                names = ", ".join(p.name for p in dups[stem])
                problems.append(f"several {kind} files with this stem ({names}); keep one")
            elif stem in unique:
                paths[kind] = unique[stem]
            else:
                problems.append(f"no {kind} file ({kind}/{stem}.png|jpg|webp is missing)")
        sizes: dict[str, tuple[int, int]] = {}
        for kind, path in paths.items():
            size, error = _read_size(path)
            if error is not None:
                problems.append(error)
            else:
                sizes[kind] = size
        if len(sizes) > 1 and len(set(sizes.values())) > 1:
            desc = ", ".join(f"{k} {w}x{h}" for k, (w, h) in sizes.items())
            problems.append(f"sizes differ ({desc}); photo, matte and sketch must be the same size")
        if "matte" in sizes and _matte_is_empty(paths["matte"]):
            problems.append(
                f"empty matte ({paths['matte'].name} has no pixel above {MATTE_THRESHOLD}); "
                "paint the hair white on black"
            )
        if problems:
            scan.problems.extend(Problem(stem, p) for p in problems)
        else:
            scan.samples.append(
                Sample(stem, paths["img"], paths["matte"], paths["sketch"], is_braid=stem in braid_set)
            )
    known = set(stems)
    for stem in braid:
        if stem not in known:
            scan.problems.append(Problem(stem, f"listed in {BRAID_FILE} but there is no sample with this stem"))

    if scan.problems and not skip_bad:
        raise DatasetError(
            f"dataset {root} has {len(scan.problems)} problem(s) in {len(scan.bad_stems)} sample(s) "
            f"({len(scan.samples)} good): {scan.one_line(10)}. "
            "Fix or remove these samples, or pass --skip-bad to use only the good ones."
        )
    if not scan.samples:
        detail = f": {scan.one_line()}" if scan.problems else ""
        raise DatasetError(f"dataset {root} has no usable sample{detail}")
    if scan.problems:
        logger.warning(
            "skipping %d bad sample(s) of %d (%d problem(s)):\n%s",
            len(scan.bad_stems), len(scan.bad_stems) + len(scan.samples), len(scan.problems), scan.report(),
        )
    return scan


def check_resolution(resolution: int) -> int:
    from .checks import Bound, check_number

    resolution = check_number(resolution, Bound("resolution", integer=True, lo=RESOLUTION_MULTIPLE, hi=4096),
                              "resolution")
    if resolution < RESOLUTION_MULTIPLE or resolution % RESOLUTION_MULTIPLE:
        lower = max(RESOLUTION_MULTIPLE, resolution // RESOLUTION_MULTIPLE * RESOLUTION_MULTIPLE)
        raise InputError(
            f"resolution {resolution} is not a multiple of {RESOLUTION_MULTIPLE} (SD3's VAE factor 8 x "
            f"patch 2); use {lower} or {lower + RESOLUTION_MULTIPLE}"
        )
    return resolution


def resize_center_crop(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, N, N): short side to N (antialiased), centre crop."""
    h, w = x.shape[-2:]
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return x[..., top : top + resolution, left : left + resolution]


def load_sample(sample: Sample, resolution: int | None = None) -> dict[str, torch.Tensor]:
    """One sample as tensors: ``image`` (3, N, N) in [0,1], ``sketch`` (3, N, N) canonical sketch
    (strokes on black, see :func:`hairdiff_core.mask.normalize_sketch`), ``matte`` (1, N, N) in
    {0, 1}. Without ``resolution`` the stored size is kept."""
    from .imageio import load_image

    image = load_image(sample.img)
    image = to_rgb(image, f"photo {sample.img}")
    # The sketch is made canonical at its stored size: its background is detected from the border.
    sketch, _ = M.normalize_sketch(load_image(sample.sketch))
    matte = M.binarize_matte(load_image(sample.matte), MATTE_THRESHOLD, require_nonempty=False)
    if resolution is not None:
        resolution = check_resolution(resolution)
        image = resize_center_crop(image, resolution).clamp(0, 1)
        sketch = resize_center_crop(sketch, resolution).clamp(0, 1)
        matte = (resize_center_crop(matte, resolution) > MATTE_THRESHOLD).float()
    return {"image": image[0].contiguous(), "sketch": sketch[0].contiguous(), "matte": matte[0].contiguous()}


def file_digest(path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (cache keys follow content, not names or dates)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class HairDataset(torch.utils.data.Dataset):
    """Samples of a scan as tensors at a fixed square resolution (see :func:`load_sample`)."""

    def __init__(self, samples: list[Sample], resolution: int):
        self.samples = list(samples)
        self.resolution = check_resolution(resolution)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        item = load_sample(self.samples[index], self.resolution)
        item["index"] = index
        return item
