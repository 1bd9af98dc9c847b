"""Training configuration: defaults < config file (JSON or TOML) < command line.

The resolved configuration is written as ``config.json`` beside the outputs, and its
``fingerprint`` (the settings a resumed run must share) is stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hairdiff_core.defaults import DEFAULTS
from hairdiff_core.errors import InputError
from hairdiff_core.fileio import check_input_path

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("bf16", "fp16", "no")
LR_SCHEDULES = ("constant", "linear", "cosine")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class TrainConfig:
    data: str | None = None
    output: str | None = None
    # model
    tiny: bool = False
    toy: bool = False  # the shipped toy base (hairdiff_core.models.toy) as the model to train on
    model: str | None = None
    vae: str | None = None
    # data
    resolution: int | None = None  # None: the model's native size (sample_size x 8)
    crop: str = "bucket"  # bucket: aspect buckets of about resolution² px; center: N x N centre square
    skip_bad: bool = False
    num_workers: int = 2
    # length
    max_steps: int | None = None
    epochs: int | None = None  # used when max_steps is None; default 20 (the published recipe)
    batch_size: int = 1
    grad_accum: int = 1
    # optimiser
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    adam_8bit: bool = False
    max_grad_norm: float = 1.0
    seed: int = 0
    # method
    lambda_shape: float = 0.1
    augment: str = "all"
    sketch_jitter: float = 4.0  # px at 1024, 'all' mode
    feather_sigma: float = 10.0  # px at 1024
    matte_growth: float = 0.5  # probability of growing the training matte beyond the hair (0 = off)
    sigma_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = DEFAULTS.shift
    # trainable parameters
    rank: int = 16
    lora_alpha: float | None = None  # None: = rank
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    train_base_channels: bool = False
    # text
    captions: str | None = None  # file: {stem: caption} JSON or "stem<TAB>caption" lines
    text_embeds: str | None = None  # folder of <stem>.safetensors SD3 prompt embeddings
    # curriculum
    oversample_from_epoch: int | None = None  # 1-based; 0: off; None: the middle epoch when braid.txt tags braids
    oversample_factor: int = 3
    # engine
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    cpu: bool = False
    # outputs
    checkpoint_every: int = 500
    checkpoints_keep: int = 3
    checkpoint_every_epoch: bool = False  # also a checkpoint and epochs/<adapter>-epoch-NNN.safetensors per epoch
    resume: str | None = None  # "latest" or a checkpoint folder
    validate_every: int = 500  # 0: off
    validation_samples: int = 2
    validation_steps: int = 20
    eval_data: str | None = None  # held-out dataset (training layout) measured at each validation
    eval_limit: int | None = 8  # samples of eval_data per validation (None: all)
    cache_dir: str | None = None  # default <output>/cache
    adapter_name: str = "hairdiff_adapter.safetensors"

    # -- derived -------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        keys = (
            "tiny",
            "toy",
            "model",
            "resolution",
            "batch_size",
            "grad_accum",
            "rank",
            "lora_alpha",
            "lora_targets",
            "train_base_channels",
            "augment",
            "seed",
            "sigma_sampling",
            "oversample_from_epoch",
            "oversample_factor",
            "mixed_precision",
            "crop",
            "matte_growth",
        )
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        self._check_types_and_ranges()
        if not self.data:
            raise InputError("no dataset: pass --data DIR (a folder with img/, matte/ and sketch/)")
        if not self.output:
            raise InputError("no output folder: pass --output DIR")
        from hairdiff_core.fileio import check_writable_folder

        check_writable_folder(self.output, "training output")
        if Path(self.output).expanduser().resolve() == Path(self.data).expanduser().resolve():
            raise InputError(
                "--output is the dataset folder; write the training outputs to another folder", input="output"
            )
        if int(bool(self.tiny)) + int(bool(self.toy)) + int(bool(self.model)) != 1:
            raise InputError(
                "pass exactly one of --model PATH (an SD3.5 diffusers folder or .safetensors checkpoint), "
                "--tiny (the built-in tiny model, for wiring checks) and --toy (the shipped toy model)"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise InputError(f"--mixed-precision {self.mixed_precision!r}: choose one of {MIXED_PRECISION}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"--lr-schedule {self.lr_schedule!r}: choose one of {LR_SCHEDULES}")
        from hairdiff_core.data.augment import AUGMENT_MODES
        from hairdiff_core.method.losses import WEIGHTING_SCHEMES

        if self.augment not in AUGMENT_MODES:
            raise InputError(f"--augment {self.augment!r}: choose one of {AUGMENT_MODES}")
        if self.sigma_sampling not in WEIGHTING_SCHEMES:
            raise InputError(f"--sigma-sampling {self.sigma_sampling!r}: choose one of {WEIGHTING_SCHEMES}")
        for name in ("batch_size", "grad_accum", "rank", "checkpoints_keep", "oversample_factor"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "epochs"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.checkpoint_every < 1:
            raise InputError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")
        if self.lr <= 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.resolution is not None:
            from hairdiff_core.data.datasets import check_resolution

            check_resolution(self.resolution)
        if self.oversample_from_epoch is not None and self.oversample_from_epoch < 0:
            raise InputError("--oversample-from-epoch counts epochs from 1 (0 turns the curriculum off)")
        from hairdiff_core.data.datasets import CROP_MODES

        if self.crop not in CROP_MODES:
            raise InputError(f"--crop {self.crop!r}: choose one of {CROP_MODES}")
        if not 0.0 <= float(self.matte_growth) <= 1.0:
            raise InputError(f"--matte-growth is a probability in [0, 1], got {self.matte_growth} (0 turns it off)")
        if not self.lora_targets:
            raise InputError("--lora-targets is empty; give module names such as to_q to_k to_v to_out.0")
        if self.eval_data is not None and not Path(self.eval_data).is_dir():
            raise InputError(f"--eval-data {self.eval_data}: not a folder (expected img/, matte/, sketch/)")
        if self.eval_limit is not None and int(self.eval_limit) < 1:
            raise InputError(f"--eval-limit must be at least 1, got {self.eval_limit}")
        if not str(self.adapter_name).endswith(".safetensors"):
            # Checked up front: save_adapter would refuse it only after the whole run.
            raise InputError(f"adapter_name {self.adapter_name!r} must end in .safetensors")
        return self

    def _check_types_and_ranges(self) -> None:
        """Types, finiteness and ranges of every setting (a config file may hold "sixteen" or NaN)."""
        from hairdiff_core.checks import Bound, check_number

        for name, (integer, lo, hi, lo_open) in TRAIN_BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL_NUMBERS:
                continue
            label = "--" + name.replace("_", "-")
            setattr(self, name, check_number(value, Bound(label, integer=integer, lo=lo, hi=hi, lo_open=lo_open), name))
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise InputError(
                    f"--{name.replace('_', '-')} is a switch: true or false, got {getattr(self, name)!r}", input=name
                )
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise InputError(f"--{name.replace('_', '-')} must be a path (text), got {value!r}", input=name)
        if not isinstance(self.lora_targets, list) or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise InputError(
                f"--lora-targets must be module names such as to_q to_k, got {self.lora_targets!r}",
                input="lora_targets",
            )


#: Numeric settings: name -> (whole number, low, high, low excluded). The training seed feeds
#: numpy's seed, which takes 32 bits.
TRAIN_BOUNDS: dict[str, tuple[bool, float | None, float | None, bool]] = {
    "resolution": (True, 16, 4096, False),
    "num_workers": (True, 0, 64, False),
    "max_steps": (True, 1, 10**9, False),
    "epochs": (True, 1, 10**6, False),
    "batch_size": (True, 1, 4096, False),
    "grad_accum": (True, 1, 4096, False),
    "lr": (False, 0.0, 1.0, True),
    "warmup_steps": (True, 0, 10**9, False),
    "weight_decay": (False, 0.0, 10.0, False),
    "adam_beta1": (False, 0.0, 0.9999, False),
    "adam_beta2": (False, 0.0, 0.99999, False),
    "adam_eps": (False, 0.0, 1.0, True),
    "max_grad_norm": (False, 0.0, 1e6, False),
    "seed": (True, 0, 2**31 - 1, False),
    "lambda_shape": (False, 0.0, 1000.0, False),
    "sketch_jitter": (False, 0.0, 256.0, False),
    "feather_sigma": (False, 0.0, 1024.0, False),
    "logit_mean": (False, -10.0, 10.0, False),
    "logit_std": (False, 0.0, 10.0, True),
    "mode_scale": (False, 0.0, 10.0, False),
    "shift": (False, 0.0, 100.0, True),
    "rank": (True, 1, 1024, False),
    "lora_alpha": (False, 0.0, 1e5, True),
    "oversample_from_epoch": (True, 0, 10**6, False),
    "oversample_factor": (True, 1, 1000, False),
    "checkpoint_every": (True, 1, 10**9, False),
    "checkpoints_keep": (True, 1, 10**6, False),
    "validate_every": (True, 0, 10**9, False),
    "validation_samples": (True, 1, 1000, False),
    "validation_steps": (True, 1, 1000, False),
    "eval_limit": (True, 1, 10**6, False),
}
OPTIONAL_NUMBERS = ("resolution", "max_steps", "epochs", "lora_alpha", "oversample_from_epoch", "eval_limit")
BOOL_FIELDS = ("tiny", "skip_bad", "adam_8bit", "train_base_channels", "gradient_checkpointing", "cpu")
PATH_FIELDS = ("data", "output", "model", "vae", "captions", "text_embeds", "resume", "eval_data", "cache_dir")

FIELD_NAMES = {f.name for f in dataclasses.fields(TrainConfig)}


def read_config_file(path) -> dict[str, Any]:
    """Read a JSON (.json) or TOML (.toml) file of TrainConfig fields (dashes or underscores)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "config file not found", str(path))
    check_input_path(path, "config file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            raw = tomllib.loads(text)
            raw = raw.get("train", raw)
        else:
            raw = json.loads(text)
    except (ValueError, ImportError) as exc:
        raise InputError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise InputError(f"config file {path} must hold a table/object of settings")
    out = {}
    unknown = []
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELD_NAMES:
            unknown.append(key)
        else:
            out[name] = value
    if unknown:
        raise InputError(f"config file {path} has unknown setting(s) {unknown}; known: {sorted(FIELD_NAMES)}")
    return out


def resolve_config(cli: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """Merge defaults, the config file and the command line (``None`` = not given)."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(read_config_file(config_file))
    values.update({k: v for k, v in cli.items() if k in FIELD_NAMES and v is not None})
    if "lora_targets" in values and isinstance(values["lora_targets"], str):
        values["lora_targets"] = [t for t in values["lora_targets"].replace(",", " ").split() if t]
    return TrainConfig(**values).validate()


def save_config(config: TrainConfig, path) -> Path:
    from hairdiff_core.fileio import atomic_write_text

    return atomic_write_text(Path(path), json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def fingerprint_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
