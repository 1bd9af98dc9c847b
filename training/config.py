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

from hairdiff_core.errors import InputError

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
    toy: bool = False  # the shipped toy base (hairdiff_core.toy) as the model to train on
    model: str | None = None
    vae: str | None = None
    # data
    resolution: int | None = None  # None: the model's native size (sample_size x 8)
    skip_bad: bool = False
    num_workers: int = 2
    # length
    max_steps: int | None = None
    epochs: int | None = None  # used when max_steps is None; default 10
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
    sigma_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 3.0
    # trainable parameters
    rank: int = 16
    lora_alpha: float | None = None  # None: = rank
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    train_base_channels: bool = False
    # text
    captions: str | None = None  # file: {stem: caption} JSON or "stem<TAB>caption" lines
    text_embeds: str | None = None  # folder of <stem>.safetensors SD3 prompt embeddings
    # curriculum
    oversample_from_epoch: int | None = None  # 1-based; None: uniform throughout
    oversample_factor: int = 3
    # engine
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    cpu: bool = False
    # outputs
    checkpoint_every: int = 500
    checkpoints_keep: int = 3
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
            "tiny", "toy", "model", "resolution", "batch_size", "grad_accum", "rank", "lora_alpha", "lora_targets",
            "train_base_channels", "augment", "seed", "sigma_sampling", "oversample_from_epoch",
            "oversample_factor", "mixed_precision",
        )
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        if not self.data:
            raise InputError("no dataset: pass --data DIR (a folder with img/, matte/ and sketch/)")
        if not self.output:
            raise InputError("no output folder: pass --output DIR")
        if int(bool(self.tiny)) + int(bool(self.toy)) + int(bool(self.model)) != 1:
            raise InputError(
                "pass exactly one of --model PATH (an SD3.5 diffusers folder or .safetensors checkpoint), "
                "--tiny (the built-in tiny model, for wiring checks) and --toy (the shipped toy model)"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise InputError(f"--mixed-precision {self.mixed_precision!r}: choose one of {MIXED_PRECISION}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"--lr-schedule {self.lr_schedule!r}: choose one of {LR_SCHEDULES}")
        from hairdiff_core.augment import AUGMENT_MODES
        from hairdiff_core.losses import WEIGHTING_SCHEMES

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
            from hairdiff_core.data import check_resolution

            check_resolution(self.resolution)
        if self.oversample_from_epoch is not None and self.oversample_from_epoch < 1:
            raise InputError("--oversample-from-epoch counts epochs from 1")
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


FIELD_NAMES = {f.name for f in dataclasses.fields(TrainConfig)}


def read_config_file(path) -> dict[str, Any]:
    """Read a JSON (.json) or TOML (.toml) file of TrainConfig fields (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "config file not found", str(path))
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def fingerprint_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
