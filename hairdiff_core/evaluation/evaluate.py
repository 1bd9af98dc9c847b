"""Evaluate HairDiff on a dataset: generate per sample and setting, measure, summarise.

One function serves the ``hairdiff eval`` command and training's periodic validation:
``evaluate_samples(pipeline, samples, settings, options)`` runs every sample (photo, sketch,
matte) under every setting (sampler ``method`` x reference-attention mode) with the same seed
and steps, measures each result with :mod:`hairdiff_core.evaluation.metrics` and returns an
:class:`EvalReport` (rows, mean ± std per setting, a flat dict of means for a training log).
With ``out_dir`` it also writes ``metrics.csv``, ``summary.md``, ``summary.json``, the results
as PNGs and contact sheets (photo | sketch | matte | result per setting).

Two optional comparisons cost extra generations per sample and setting, so they are off unless
asked for: ``harmony`` (one more generation per colour gain: the photo under a warm/cool/dim
gain, same seed; reports ``harmony_<gain>``) and ``leakage`` (one more generation from a copy of
the photo whose hair region is filled; reports ``leak_color``/``leak_edges``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.imageio import save_pil
from ..defaults import DEFAULTS
from ..errors import InputError
from . import metrics as Mt

logger = logging.getLogger(__name__)

METHODS = ("joint", "replace")
REFERENCE_MODES = ("off", "once", "per_step")
REFERENCE_NOISES = ("auto", "clean", "matched")

#: Metric columns in report order, with the direction that is better (for the summary table).
METRIC_INFO: dict[str, str] = {
    "psnr_out": "higher is better (inf = untouched)",
    "mae_out": "lower is better",
    "seam": "~1 = no seam, higher = visible seam",
    "seam_source": "the photo's own value on the same matte (reference)",
    "sketch_chamfer": "lower is better (fraction of the image side)",
    "stroke_color_de": "lower is better (Delta E under coloured strokes)",
    "consistency_de": "lower = hair colour closer to its surroundings (Delta E)",
    "consistency_dl": "signed lightness offset of the hair edge vs its surroundings",
    "harmony_warm": "1 = hair follows a warm light, 0 = ignores it",
    "harmony_cool": "1 = hair follows a cool light, 0 = ignores it",
    "harmony_dim": "1 = hair follows a dimmer light, 0 = ignores it",
    "old_hair_de": "Delta E of the result to the old hair (from the photo)",
    "old_hair_chamfer": "edge distance of the result to the old hair (from the photo)",
    "leak_color": "lower is better: how much closer to the old hair than a run without it (Delta E)",
    "leak_edges": "lower is better: same, edge chamfer",
    "gen_seconds": "sampling time of the result",
    "eval_seconds": "metric time of the result",
}


@dataclass(frozen=True)
class EvalSetting:
    """One column of the comparison: a sampler method and a reference-attention mode."""

    method: str = "joint"
    reference: str = "off"
    #: What the reference pass sees (``ReferenceSettings.reference_noise``): auto, clean or matched.
    reference_noise: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose from {list(METHODS)}")
        if self.reference not in REFERENCE_MODES:
            raise InputError(f"unknown reference mode {self.reference!r}; choose from {list(REFERENCE_MODES)}")
        if self.method == "replace" and self.reference != "off":
            raise InputError("the replace baseline has no reference attention; use reference='off' with it")
        if self.reference_noise not in REFERENCE_NOISES:
            raise InputError(f"unknown reference noise {self.reference_noise!r}; choose from {list(REFERENCE_NOISES)}")

    @property
    def label(self) -> str:
        """Short name, also used as a folder name: ``joint``, ``joint-ref_once``, ``replace``."""
        if self.reference == "off":
            return self.method
        noise = "" if self.reference_noise == "auto" else f"_{self.reference_noise}"
        return f"{self.method}-ref_{self.reference}{noise}"


def make_settings(
    methods: Sequence[str] = ("joint", "replace"),
    references: Sequence[str] = ("off",),
    reference_noises: Sequence[str] = ("auto",),
) -> list[EvalSetting]:
    """The grid: every joint x reference mode (x reference noise, for modes other than off), and
    the replace baseline once (it has no reference)."""
    settings: list[EvalSetting] = []
    for method in dict.fromkeys(methods):
        refs = dict.fromkeys(references) if method == "joint" else ("off",)
        for ref in refs:
            for noise in ("auto",) if ref == "off" else dict.fromkeys(reference_noises or ("auto",)):
                s = EvalSetting(method, ref, noise)
                if s not in settings:
                    settings.append(s)
    if not settings:
        raise InputError("nothing to evaluate: give at least one method (joint, replace)")
    return settings


@dataclass
class EvalOptions:
    """Sampling and measurement options shared by every setting (same seed, same steps)."""

    steps: int = DEFAULTS.steps
    seed: int = DEFAULTS.seed
    cfg: float = DEFAULTS.cfg
    shift: float = DEFAULTS.shift
    strength: float = DEFAULTS.strength
    work_size: int | None = None
    feather_sigma: float | None = None
    context_margin: float = DEFAULTS.context_margin
    #: Load dataset samples at this resolution (None: as stored), in its aspect bucket or, with
    #: ``crop="center"``, as the N x N centre square (``data.load_sample``).
    resolution: int | None = None
    crop: str = "bucket"
    #: Colour gains for harmony tracking (names of ``metrics.GAINS``); empty = skip.
    harmony: tuple[str, ...] = ()
    leakage: bool = False
    edge_threshold: float = Mt.EDGE_THRESHOLD
    #: Extra ``ReferenceSettings`` fields for the reference modes (weights etc.).
    reference_fields: dict[str, Any] = field(default_factory=dict)
    #: Add each sample's sketch region (strokes + what they enclose) to its matte (``mask.compose_matte``).
    matte_add_sketch: bool = False
    #: Extra keyword arguments for ``HairDiffPipeline.generate`` (e.g. prompt embeddings).
    generate_kwargs: dict[str, Any] = field(default_factory=dict)  # the prompt: text or embeddings

    def settings(self):
        """The run's ``GenerateSettings`` (validated when made)."""
        from ..settings import GenerateSettings

        return GenerateSettings(
            steps=int(self.steps),
            seed=int(self.seed),
            cfg=self.cfg,
            shift=self.shift,
            strength=self.strength,
            work_size=self.work_size,
            feather_sigma=self.feather_sigma,
            context_margin=self.context_margin,
        )

    def __post_init__(self) -> None:
        self.harmony = tuple(self.harmony)
        unknown = [g for g in self.harmony if g not in Mt.GAINS]
        if unknown:
            raise InputError(f"unknown harmony gain(s) {unknown}; choose from {sorted(Mt.GAINS)}")
        from ..data.datasets import check_crop

        check_crop(self.crop)
        # The checks and messages of generate itself, before any sample runs: the run's one
        # GenerateSettings (each setting of the comparison is a copy of it).
        checked = self.settings()
        for name in ("steps", "seed", "cfg", "shift", "strength", "work_size", "feather_sigma", "context_margin"):
            setattr(self, name, getattr(checked, name))
        if self.reference_fields:
            from ..method.reference import ReferenceSettings

            ReferenceSettings(mode="once", **self.reference_fields)  # bad values fail here, before any model runs


# -- samples -----------------------------------------------------------------------------------
@dataclass
class EvalSample:
    stem: str
    image: torch.Tensor  # (1, 3, H, W) in [0, 1]
    sketch: torch.Tensor  # (1, 3, H, W) canonical sketch
    matte: torch.Tensor  # (1, 1, H, W) in {0, 1}


def _batch1(t: torch.Tensor, what: str, stem: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.ndim not in (3, 4):
        raise InputError(f"sample {stem}: {what} must be a (C, H, W) or (1, C, H, W) tensor")
    return (t if t.ndim == 4 else t.unsqueeze(0)).float()


def as_eval_sample(item, resolution: int | None = None, index: int = 0, crop: str = "bucket") -> EvalSample:
    """A ``data.Sample`` (loaded here), a dict with image/sketch/matte tensors (+ stem), or an
    ``EvalSample``."""
    if isinstance(item, EvalSample):
        return item
    if isinstance(item, dict):
        stem = str(item.get("stem", item.get("name", f"sample{index:04d}")))
        missing = [k for k in ("image", "sketch", "matte") if k not in item]
        if missing:
            raise InputError(f"sample {stem} lacks {missing}; give image, sketch and matte tensors")
        return EvalSample(
            stem,
            _batch1(item["image"], "image", stem),
            _batch1(item["sketch"], "sketch", stem),
            _batch1(item["matte"], "matte", stem),
        )
    from ..data.datasets import load_sample

    loaded = load_sample(item, resolution, crop)
    return EvalSample(item.stem, loaded["image"][None], loaded["sketch"][None], loaded["matte"][None])


# -- measuring one result --------------------------------------------------------------------
def score_result(result, photo, sketch, matte, edge_threshold: float = Mt.EDGE_THRESHOLD) -> dict[str, torch.Tensor]:
    """Every single-result metric of one result (see ``metrics.compute_metrics``), the photo's
    own seam score included."""
    return Mt.compute_metrics(result, photo, sketch, matte, edge_threshold=edge_threshold, source_seam=True)


# -- the report --------------------------------------------------------------------------------
@dataclass
class Stat:
    mean: float
    std: float
    n: int  # finite values
    n_inf: int = 0  # +inf values (PSNR of untouched pixels), not in mean/std

    def cell(self, digits: int = 4) -> str:
        if self.n == 0:
            return "inf" if self.n_inf else "–"
        text = f"{self.mean:.{digits}g} ± {self.std:.{digits - 1}g}"
        return f"{text} (+{self.n_inf} inf)" if self.n_inf else text


def _stat(values: list[float]) -> Stat:
    finite = [v for v in values if math.isfinite(v)]
    n_inf = sum(1 for v in values if v == math.inf)
    if not finite:
        return Stat(math.nan, math.nan, 0, n_inf)
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
    return Stat(mean, std, len(finite), n_inf)


@dataclass
class EvalReport:
    settings: list[EvalSetting]
    rows: list[dict[str, Any]] = field(default_factory=list)
    options: EvalOptions | None = None

    @property
    def metric_names(self) -> list[str]:
        present = {k for row in self.rows for k in row}
        ordered = [k for k in METRIC_INFO if k in present]
        extra = sorted(k for k in present if k not in METRIC_INFO and k not in _ID_COLUMNS)
        return ordered + extra

    @property
    def columns(self) -> list[str]:
        return list(_ID_COLUMNS) + self.metric_names

    def summary(self) -> dict[str, dict[str, Stat]]:
        """setting label -> metric -> Stat (mean ± sample std over samples; NaN skipped)."""
        out: dict[str, dict[str, Stat]] = {}
        for s in self.settings:
            rows = [r for r in self.rows if r["setting"] == s.label]
            out[s.label] = {m: _stat([float(r[m]) for r in rows if m in r]) for m in self.metric_names}
        return out

    def means(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{prefix + "<setting>/<metric>": mean}`` of the finite means, for a training log."""
        flat = {}
        for label, stats in self.summary().items():
            for metric, st in stats.items():
                if st.n:
                    flat[f"{prefix}{label}/{metric}"] = st.mean
        return flat

    def markdown(self) -> str:
        summary = self.summary()
        labels = [s.label for s in self.settings]
        n = {label: sum(1 for r in self.rows if r["setting"] == label) for label in labels}
        lines = ["| metric | " + " | ".join(f"{label} (n={n[label]})" for label in labels) + " | meaning |"]
        lines.append("|---|" + "---|" * len(labels) + "---|")
        for metric in self.metric_names:
            cells = [summary[label][metric].cell() for label in labels]
            lines.append(f"| {metric} | " + " | ".join(cells) + f" | {METRIC_INFO.get(metric, '')} |")
        head = "# HairDiff evaluation\n\n"
        if self.options is not None:
            o = self.options
            head += f"steps {o.steps}, seed {o.seed}, cfg {o.cfg}, shift {o.shift}, strength {o.strength}"
            if o.harmony:
                head += f", harmony gains {', '.join(o.harmony)}"
            if o.leakage:
                head += ", leakage on"
            head += ". Mean ± std over samples.\n\n"
        return head + "\n".join(lines) + "\n"

    def write(self, out_dir) -> dict[str, Path]:
        """Write ``metrics.csv``, ``summary.md`` and ``summary.json`` under ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / "metrics.csv", "summary": out / "summary.md", "json": out / "summary.json"}
        from ..fileio import atomic_write, atomic_write_text

        with atomic_write(paths["csv"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: _csv_value(row.get(k, "")) for k in self.columns})
        atomic_write_text(paths["summary"], self.markdown())
        js = {
            label: {
                m: {"mean": _json_num(st.mean), "std": _json_num(st.std), "n": st.n, "n_inf": st.n_inf}
                for m, st in stats.items()
            }
            for label, stats in self.summary().items()
        }
        atomic_write_text(paths["json"], json.dumps(js, indent=2))
        return paths


_ID_COLUMNS = ("sample", "setting", "method", "reference", "reference_noise", "seed", "steps")


def _csv_value(v):
    if isinstance(v, float):
        return "inf" if v == math.inf else ("nan" if math.isnan(v) else f"{v:.6g}")
    return v


def _json_num(v: float):
    return None if not math.isfinite(v) else v


# -- running -----------------------------------------------------------------------------------
def _reference_settings(setting: EvalSetting, options: EvalOptions):
    if setting.reference == "off":
        return None
    from ..method.reference import ReferenceSettings

    fields = dict(options.reference_fields)
    if setting.reference_noise != "auto":
        fields["reference_noise"] = setting.reference_noise
    return ReferenceSettings(mode=setting.reference, **fields)


def _fill(image: torch.Tensor, matte: torch.Tensor) -> torch.Tensor:
    from ..method.reference import fill_hair_region

    return fill_hair_region(image, (matte > 0.5).float())


def save_result_png(image: torch.Tensor, path: Path) -> None:
    """PNG with fast compression (4x faster than the default level at 1024², ~25% larger);
    written to a temporary name and renamed, so an interrupted run leaves no half file."""
    from ..data.imageio import save_image

    save_image(image, path, compress_level=1)


def contact_row(sample: EvalSample, results: dict[str, torch.Tensor], height: int):
    """One contact-sheet row (a PIL image): photo, sketch, matte, then each setting's result."""
    from ..data.imageio import contact_sheet

    images = [sample.image, sample.sketch, sample.matte] + list(results.values())
    labels = ["photo", "sketch", "matte"] + list(results)
    return contact_sheet(images, labels, height=height)


def _stack_rows(rows: list) -> Any:
    from PIL import Image

    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows)), (24, 24, 24))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    return sheet


def evaluate_samples(
    pipeline,
    samples: Iterable,
    settings: Sequence[EvalSetting] | None = None,
    options: EvalOptions | None = None,
    *,
    out_dir=None,
    save_results: bool = True,
    write_report: bool = True,
    contact_sheets: bool = True,
    sheet_height: int = 256,
    overview_rows: int = 16,
    on_result: Callable[[int, dict], None] | None = None,
) -> EvalReport:
    """Generate and measure every sample under every setting; see the module docstring.

    ``samples``: ``data.Sample`` items, dicts of tensors or ``EvalSample``. ``on_result(i, row)``
    is called after each (sample, setting) with the running count. ``write_report=False`` writes
    only the per-sample files (results, sheets): one process's share of a split evaluation, whose
    rows :func:`merge_reports` joins. The transformer's train/eval
    mode is restored on return, so training can call this between steps.
    """
    settings = list(settings) if settings else [EvalSetting()]
    options = options or EvalOptions()
    report = EvalReport(settings=settings, options=options)
    out = Path(out_dir) if out_dir is not None else None
    overview: list = []
    transformer = getattr(pipeline, "transformer", None)
    was_training = bool(getattr(transformer, "training", False))
    count = 0
    # One validated GenerateSettings per run; each setting (method, reference) is a copy of it.
    base = options.settings()
    text = dict(options.generate_kwargs)
    try:
        if transformer is not None:
            transformer.eval()
        for index, item in enumerate(samples):
            sample = as_eval_sample(item, options.resolution, index, options.crop)
            image, sketch, matte = sample.image, sample.sketch, sample.matte
            if options.matte_add_sketch:
                from ..method.mask import compose_matte

                composed = compose_matte(matte, sketch, size=tuple(image.shape[-2:]))
                for line in composed.warnings:
                    logger.warning("sample %s: %s", sample.stem, line)
                matte = composed.binary
            filled = _fill(image, matte) if options.leakage else None
            gained = {g: Mt.apply_gain(image, g) for g in options.harmony}
            results: dict[str, torch.Tensor] = {}
            for setting in settings:
                run_settings = base.replace(method=setting.method, reference=_reference_settings(setting, options))
                kw = dict(text, settings=run_settings)
                t0 = time.perf_counter()
                result = pipeline.generate(image, sketch, matte, **kw).image
                gen_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                scores = score_result(result, image, sketch, matte, options.edge_threshold)
                eval_s = time.perf_counter() - t0
                row: dict[str, Any] = {
                    "sample": sample.stem,
                    "setting": setting.label,
                    "method": setting.method,
                    "reference": setting.reference,
                    "seed": options.seed,
                    "steps": options.steps,
                    "reference_noise": "" if run_settings.reference is None else run_settings.reference.noise,
                }
                row.update({k: float(v[0]) for k, v in scores.items()})
                for gain, photo_g in gained.items():
                    result_g = pipeline.generate(photo_g, sketch, matte, **kw).image
                    t1 = time.perf_counter()
                    row[f"harmony_{gain}"] = float(Mt.harmony_tracking(result, result_g, image, photo_g, matte)[0])
                    eval_s += time.perf_counter() - t1
                if filled is not None:
                    result_b = pipeline.generate(filled, sketch, matte, **kw).image
                    t1 = time.perf_counter()
                    leak = Mt.leakage(result, result_b, image, matte, edge_threshold=options.edge_threshold)
                    row.update({k: float(v[0]) for k, v in leak.items()})
                    eval_s += time.perf_counter() - t1
                row["gen_seconds"] = gen_s
                row["eval_seconds"] = eval_s
                report.rows.append(row)
                results[setting.label] = result
                if out is not None and save_results:
                    save_result_png(result, out / "results" / setting.label / f"{sample.stem}.png")
                count += 1
                if on_result is not None:
                    on_result(count, row)
            if out is not None and contact_sheets:
                sheet = contact_row(sample, results, sheet_height)
                save_pil(sheet, out / "sheets" / f"{sample.stem}.png", compress_level=1)
                if len(overview) < overview_rows:
                    overview.append(sheet)
    finally:
        if transformer is not None and was_training:
            transformer.train()
    if not report.rows:
        raise InputError("no sample was evaluated: the sample list is empty")
    if out is not None and write_report:
        report.write(out)
        if contact_sheets and overview:
            save_pil(_stack_rows(overview), out / "contact_sheet.png")
    return report


def scan_samples(root, limit: int | None = None, skip_bad: bool = False) -> list:
    """The dataset's valid samples (``data.scan_dataset``), the first ``limit`` by stem."""
    from ..data.datasets import scan_dataset

    root = Path(root)
    if not root.is_dir():
        raise InputError(
            f"dataset folder {root} does not exist; expected a folder with img/, matte/ and sketch/ "
            f"sub-folders whose files match by stem"
        )
    if limit is not None and int(limit) < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    samples = scan_dataset(root, skip_bad=skip_bad).samples
    return samples[: int(limit)] if limit is not None else samples


# -- one dataset over several processes ------------------------------------------------------
def shard_samples(samples: Sequence, rank: int, world: int) -> list:
    """Process ``rank``'s share of ``samples`` (every ``world``-th, starting at ``rank``): the
    shares are disjoint, cover every sample, and differ in size by at most one."""
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"process rank {rank} is not in a world of {world} process(es)")
    return list(samples)[rank::world]


def merge_reports(
    settings: Sequence[EvalSetting],
    rows_per_process: Sequence[list[dict]],
    stems: Sequence[str],
    options: EvalOptions | None = None,
) -> EvalReport:
    """One report from the rows of every process, in the dataset's sample order and the
    settings' order (the same rows a single process would have produced)."""
    order = {stem: i for i, stem in enumerate(stems)}
    labels = {s.label: i for i, s in enumerate(settings)}
    rows = [row for part in rows_per_process for row in part]
    rows.sort(key=lambda r: (order.get(r["sample"], len(order)), labels.get(r["setting"], len(labels))))
    return EvalReport(settings=list(settings), rows=rows, options=options)
