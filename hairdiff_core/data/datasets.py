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

Resolution handling (``load_sample(..., resolution=N, crop=...)``), N a multiple of 16 (SD3's
VAE factor 8 x patch 2):

- ``crop="bucket"`` (default): aspect-ratio buckets as SDXL/SD3 training uses them. The bucket
  set of N (:func:`aspect_buckets`) holds sizes of about N x N pixels, sides multiples of 16,
  up to 2:1 either way (at 1024, as height x width: 1024x1024, 1088x960, 1152x896, 1216x848,
  1280x816, 1344x768, 1408x736 and their transposes). A sample goes to the bucket nearest its
  aspect ratio, is resized to cover it and the few % of one side left over are cut where the
  matte is not (:func:`crop_offset`), so a 3:4 or 2:3 portrait keeps its whole hair. Training
  batches come from one bucket (``training.trainer.EpochPlan``).
- ``crop="center"``: the short side is resized to N and the centre N x N square is cut out
  (the earlier behaviour; cuts the top of the hair or long hair on portraits).

Photos and sketches are resized with antialiasing; the matte is resized the same way and
re-binarised at 0.5, so it stays a hard matte whose feathering is done later, at the working
resolution, by :func:`hairdiff_core.method.mask.soft_mask`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..imageops import to_rgb
from ..method import mask as M

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
    size: tuple[int, int] | None = None  # (width, height) as stored; None: read when needed


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

    from ..fileio import check_input_path

    try:
        check_input_path(path, f"{path.parent.name} file")
        with Image.open(path) as im:
            im.load()  # decodes every byte: catches truncated files that Image.open accepts
            return im.size, None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:  # InputError is a ValueError
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
    from ..fileio import check_input_path

    root = check_input_path(root, "dataset", kind="folder", input="data")
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
                Sample(
                    stem,
                    paths["img"],
                    paths["matte"],
                    paths["sketch"],
                    is_braid=stem in braid_set,
                    size=sizes.get("img"),
                )
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
            len(scan.bad_stems),
            len(scan.bad_stems) + len(scan.samples),
            len(scan.problems),
            scan.report(),
        )
    return scan


def check_resolution(resolution: int) -> int:
    from ..checks import Bound, check_number

    resolution = check_number(
        resolution, Bound("resolution", integer=True, lo=RESOLUTION_MULTIPLE, hi=4096), "resolution"
    )
    if resolution < RESOLUTION_MULTIPLE or resolution % RESOLUTION_MULTIPLE:
        lower = max(RESOLUTION_MULTIPLE, resolution // RESOLUTION_MULTIPLE * RESOLUTION_MULTIPLE)
        raise InputError(
            f"resolution {resolution} is not a multiple of {RESOLUTION_MULTIPLE} (SD3's VAE factor 8 x "
            f"patch 2); use {lower} or {lower + RESOLUTION_MULTIPLE}"
        )
    return resolution


CROP_MODES = ("bucket", "center")
#: Widest bucket aspect ratio (long side / short side), as SDXL's and SD3's bucket sets.
MAX_BUCKET_ASPECT = 2.0


def check_crop(crop: str) -> str:
    if crop not in CROP_MODES:
        raise InputError(f"crop mode {crop!r}: choose one of {list(CROP_MODES)} (bucket keeps the aspect ratio)")
    return crop


def aspect_buckets(resolution: int, max_aspect: float = MAX_BUCKET_ASPECT) -> list[tuple[int, int]]:
    """The bucket set of ``resolution``: (height, width) pairs of at most ``resolution``² pixels,
    sides multiples of 16, from 1:``max_aspect`` to ``max_aspect``:1, sorted by aspect (h / w).

    The long side grows from N in steps of N/16 (64 px at 1024, as SDXL's list; at least 16 px)
    and the short side is the largest multiple of 16 that keeps the area within N², so 1024 gives
    1024x1024, 1088x960, 1152x896, 1216x848, 1280x816, 1344x768, 1408x736 and their transposes
    (13 buckets). Small resolutions have few buckets (64 px: 3; 32 px: the square only).
    """
    resolution = check_resolution(resolution)
    step = max(RESOLUTION_MULTIPLE, round(resolution / 16 / RESOLUTION_MULTIPLE) * RESOLUTION_MULTIPLE)
    area = resolution * resolution
    found = {(resolution, resolution)}
    long = resolution + step
    while True:
        short = area // long // RESOLUTION_MULTIPLE * RESOLUTION_MULTIPLE
        if short < RESOLUTION_MULTIPLE or long / short > max_aspect + 1e-9:
            break
        found.add((long, short))
        found.add((short, long))
        long += step
    return sorted(found, key=lambda hw: (hw[0] / hw[1], hw[0]))


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to height / width."""
    target = math.log(height / width)
    return min(buckets, key=lambda hw: (abs(math.log(hw[0] / hw[1]) - target), -hw[0] * hw[1]))


def check_resolution_fits(resolution: int, max_side: int | None, crop: str = "bucket") -> int:
    """Refuse a training ``resolution`` whose largest bucket (or square, for ``crop="center"``)
    has a side longer than the transformer's positions (``max_side`` px, see
    ``pipeline.max_work_side``); the message gives the largest resolution that fits."""

    def longest(r: int) -> int:
        return max(max(b) for b in aspect_buckets(r)) if crop == "bucket" else r

    if max_side is None or longest(resolution) <= max_side:
        return resolution
    fits = resolution
    while fits > RESOLUTION_MULTIPLE and longest(fits) > max_side:
        fits -= RESOLUTION_MULTIPLE
    raise InputError(
        f"--resolution {resolution}: its {crop} crops reach {longest(resolution)} px a side, more than this "
        f"model's position embeddings cover ({max_side} px = pos_embed_max_size x 16); use --resolution {fits} "
        f"or less",
        input="resolution",
    )


def sample_bucket(size: tuple[int, int], resolution: int, crop: str = "bucket") -> tuple[int, int]:
    """(height, width) a sample of stored ``size`` = (width, height) is loaded at."""
    if check_crop(crop) == "center":
        return (resolution, resolution)
    w, h = size
    return nearest_bucket(h, w, aspect_buckets(resolution))


def crop_offset(length: int, window: int, coverage: torch.Tensor | None) -> int:
    """Start of a ``window``-long crop of ``length`` that keeps the matte: centred on the matte's
    extent (``coverage``: per-position matte presence along this axis) and clamped to the image,
    so nothing of the matte is cut when its extent fits the window; centred without a matte."""
    spare = length - window
    if spare <= 0:
        return 0
    if coverage is None or not bool((coverage > 0).any()):
        return spare // 2
    where = torch.nonzero(coverage > 0).flatten()
    first, last = int(where[0]), int(where[-1])
    start = (first + last + 1 - window) // 2
    if last - first + 1 <= window:
        # Fits: shift as little as possible from the centred crop, and keep all of it.
        start = min(max(spare // 2, last + 1 - window), first)
    return int(min(max(start, 0), spare))


def resize_to_bucket(x: torch.Tensor, size: tuple[int, int], matte: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, h, w) for ``size`` = (h, w): resize (antialiased) to cover the
    bucket, then crop the excess where ``matte`` (B, 1, H, W; None: centre) is not."""
    th, tw = size
    h, w = x.shape[-2:]
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        if matte is not None:
            matte = F.interpolate(matte.float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    rows = cols = None
    if matte is not None:
        present = matte.float() > MATTE_THRESHOLD
        rows, cols = present.any(dim=-1).flatten(0, -2).any(0), present.any(dim=-2).flatten(0, -2).any(0)
    top, left = crop_offset(nh, th, rows), crop_offset(nw, tw, cols)
    return x[..., top : top + th, left : left + tw]


def resize_center_crop(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, N, N): short side to N (antialiased), centre crop."""
    return resize_to_bucket(x, (resolution, resolution))


def load_sample(sample: Sample, resolution: int | None = None, crop: str = "bucket") -> dict[str, torch.Tensor]:
    """One sample as tensors: ``image`` (3, h, w) in [0,1], ``sketch`` (3, h, w) canonical sketch
    (strokes on black, see :func:`hairdiff_core.method.mask.normalize_sketch`), ``matte`` (1, h, w) in
    {0, 1}.

    Args:
        sample: a sample of :func:`scan_dataset`.
        resolution: the bucket set's side N (see the module docstring); None keeps the stored size.
        crop: ``"bucket"`` (the nearest aspect bucket of about N² pixels, the matte kept whole)
            or ``"center"`` (N x N centre square).
    """
    from .imageio import load_image

    image = load_image(sample.img)
    image = to_rgb(image, f"photo {sample.img}")
    # The sketch is made canonical at its stored size: its background is detected from the border.
    sketch, _ = M.normalize_sketch(load_image(sample.sketch))
    matte = M.binarize_matte(load_image(sample.matte), MATTE_THRESHOLD, require_nonempty=False)
    if resolution is not None:
        resolution = check_resolution(resolution)
        h, w = image.shape[-2:]
        bucket = sample_bucket((w, h), resolution, crop)
        # The crop is placed from the matte at the stored size, the same window for all three.
        keep = matte if crop == "bucket" else None
        image = resize_to_bucket(image, bucket, keep).clamp(0, 1)
        sketch = resize_to_bucket(sketch, bucket, keep).clamp(0, 1)
        matte = (resize_to_bucket(matte, bucket, keep) > MATTE_THRESHOLD).float()
    return {"image": image[0].contiguous(), "sketch": sketch[0].contiguous(), "matte": matte[0].contiguous()}


def file_digest(path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (cache keys follow content, not names or dates)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stored_size(sample: Sample) -> tuple[int, int]:
    """(width, height) of the sample's photo: from the scan, or read from the file's header."""
    if sample.size is not None:
        return tuple(sample.size)
    from PIL import Image

    with Image.open(sample.img) as im:
        return im.size


class HairDataset(torch.utils.data.Dataset):
    """Samples of a scan as tensors at ``resolution`` (see :func:`load_sample`); ``buckets[i]``
    is the (height, width) sample i is loaded at, known before any image is decoded."""

    def __init__(self, samples: list[Sample], resolution: int, crop: str = "bucket"):
        self.samples = list(samples)
        self.resolution = check_resolution(resolution)
        self.crop = check_crop(crop)
        self.buckets = [sample_bucket(stored_size(s), self.resolution, self.crop) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        item = load_sample(self.samples[index], self.resolution, self.crop)
        item["index"] = index
        return item
