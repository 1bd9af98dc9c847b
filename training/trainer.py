"""The HairDiff training loop (accelerate): LoRA + the sketch channels of ``pos_embed.proj``.

One step, per micro-batch (DESIGN.md, "The method"):

1. load photo, canonical sketch and binary matte in their aspect bucket of about
   ``resolution``² px (``hairdiff_core.data.datasets``; every batch is one bucket, see :class:`EpochPlan`);
2. augment on the device (``hairdiff_core.data.augment``: ``all`` or ``seed``), then grow the matte
   beyond the hair with probability ``matte_growth`` (the sketch unchanged);
3. feather the matte into the soft mask and area-resize it to the latent grid (``mask``);
4. VAE-encode the (warped) photo, or read its cached latent in ``seed`` mode, and the sketch;
5. draw sigma (SD3's logit-normal by default) and eps, noise per pixel at sigma * m
   (``flow.soft_noise``), run the transformer on cat([x_in, sketch_latent]) at timestep
   sigma * 1000 with zero (or cached caption) text;
6. soft-mask MSE against eps - x0 + lambda_shape x Sobel shape loss (``losses``), float32.

Every random draw of a step (augmentation, sigma, eps) comes from one CPU ``torch.Generator``
per process whose state is checkpointed with the torch/numpy/python states, and the data order
is a pure function of (seed, epoch), so a resumed run replays exactly what the uninterrupted
run would have done.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hairdiff_core.checks import parse_dtype
from hairdiff_core.data.augment import AugmentSettings, MatteGrowth, augment_batch, grow_matte
from hairdiff_core.data.datasets import HairDataset, check_resolution_fits, file_digest, scan_dataset
from hairdiff_core.data.imageio import save_pil
from hairdiff_core.errors import HairDiffError, NonFiniteError
from hairdiff_core.fileio import atomic_write, disk_full_error, is_disk_full
from hairdiff_core.method import mask as M
from hairdiff_core.method.flow import soft_noise, timestep_from_sigma
from hairdiff_core.method.losses import hairdiff_loss, sample_sigmas
from hairdiff_core.method.surgery import BASE_CHANNELS

from . import checkpoint as ckpt
from .config import TrainConfig, fingerprint_hash, save_config
from .logs import TrainingLogs

logger = logging.getLogger(__name__)

DEFAULT_EPOCHS = 20  # the published recipe
CHECKPOINT_VERSION = 1


class TrainingOutOfMemoryError(HairDiffError):
    """The device ran out of memory during a training step."""


@dataclass
class TrainResult:
    output: Path
    adapter: Path | None
    steps: int
    last: dict = field(default_factory=dict)
    epoch_rows: list = field(default_factory=list)
    skipped: int = 0
    main_process: bool = True


# -- data order and curriculum ---------------------------------------------------------------
class EpochPlan:
    """Which sample indices each epoch visits, in which order and in which batches; a pure
    function of the seed (a deterministic batch sampler, resumable by position).

    From ``oversample_from_epoch`` (1-based) on, every braid sample appears ``factor`` times
    per epoch (the others once), so braids are drawn ``factor`` times as often.

    ``buckets`` (one hashable key per sample, e.g. its (height, width)): every global batch
    holds samples of one bucket. The shuffled epoch order is split by bucket, each bucket's list
    cut into global batches, and the batches shuffled again; the shards of the processes are
    slices of one global batch, so every micro-batch of every process is from one bucket. With
    ``pad`` (several processes) a bucket's last, short global batch is filled from the start of
    the same bucket's list, so every process gets an equal, non-empty shard.
    """

    def __init__(
        self,
        n: int,
        braid: list[int],
        seed: int,
        global_batch: int,
        from_epoch: int | None,
        factor: int,
        pad: bool = False,
        buckets: list | None = None,
    ):
        self.n, self.braid, self.seed = n, list(braid), int(seed)
        self.global_batch, self.from_epoch, self.factor, self.pad = global_batch, from_epoch, int(factor), pad
        if buckets is not None and len(buckets) != n:
            raise ValueError(f"{len(buckets)} bucket keys for {n} samples")
        self.buckets = list(buckets) if buckets is not None else [None] * n

    def oversampling(self, epoch: int) -> bool:
        return self.from_epoch is not None and epoch >= self.from_epoch and self.factor > 1 and bool(self.braid)

    def order(self, epoch: int) -> list[int]:
        idx = list(range(self.n))
        if self.oversampling(epoch):
            idx += self.braid * (self.factor - 1)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]

    def _cut(self, order: list[int]) -> list[list[int]]:
        out = [order[i : i + self.global_batch] for i in range(0, len(order), self.global_batch)]
        if self.pad and len(out[-1]) < self.global_batch:
            # Several processes need equal shards: wrap around to fill the last global batch.
            need = self.global_batch - len(out[-1])
            out[-1] = out[-1] + (order * (need // len(order) + 1))[:need]
        return out

    def batches(self, epoch: int) -> list[list[int]]:
        order = self.order(epoch)
        groups: dict = {}
        for i in order:
            groups.setdefault(self.buckets[i], []).append(i)
        if len(groups) == 1:
            return self._cut(order)
        out = [b for members in groups.values() for b in self._cut(members)]
        # Bucket by bucket would run all portraits, then all landscapes: mix the batches.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 500_009)
        return [out[i] for i in torch.randperm(len(out), generator=g).tolist()]

    def micro_batches(self, epoch: int) -> int:
        return len(self.batches(epoch))


def default_oversample_from(config: TrainConfig, braid_count: int, epochs: int) -> int | None:
    """The curriculum's first oversampling epoch: the configured one (0 = off), or, when the
    dataset tags braids and none is configured, the middle of the run (the published recipe:
    uniform for the first half, braids oversampled in the second)."""
    if config.oversample_from_epoch is not None:
        return None if config.oversample_from_epoch == 0 else int(config.oversample_from_epoch)
    if braid_count == 0 or epochs < 2:
        return None
    return epochs // 2 + 1


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """LR multiplier for optimiser step ``step`` (0-based); stateless so resume needs nothing."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([it["image"] for it in items]),
        "sketch": torch.stack([it["sketch"] for it in items]),
        "matte": torch.stack([it["matte"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
    }


def _is_oom(exc: BaseException) -> bool:
    oom_types = tuple(
        t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t
    )
    if oom_types and isinstance(exc, oom_types):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


# -- trainable parameters --------------------------------------------------------------------
def setup_trainable(transformer, config: TrainConfig) -> dict[str, list[torch.nn.Parameter]]:
    """Freeze everything, add the LoRA, open the sketch channels of ``pos_embed.proj``.

    The LoRA and ``pos_embed.proj`` are kept in float32 whatever the base dtype (bf16 weights
    cannot hold small Adam updates). Channels 0-15 of the patch conv (and its bias) stay frozen
    unless ``train_base_channels``: the weight is one tensor, so its gradient is masked (hook)
    and its optimiser group has no weight decay; the trainer also restores channels 0-15 after
    each step, which keeps them bit-identical even with a quantised (8-bit) optimiser.
    """
    from hairdiff_core.models.lora import add_lora

    transformer.requires_grad_(False)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    add_lora(transformer, rank=config.rank, alpha=config.lora_alpha, targets=tuple(config.lora_targets))
    lora = []
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            lora.append(p)
    if not lora:
        raise HairDiffError(f"no LoRA parameters were created for targets {config.lora_targets}; check --lora-targets")
    proj = transformer.pos_embed.proj
    proj.float()
    proj.weight.requires_grad_(True)
    proj_params = [proj.weight]
    if config.train_base_channels:
        if proj.bias is not None:
            proj.bias.requires_grad_(True)
            proj_params.append(proj.bias)
    else:

        def _sketch_channels_only(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[:, :BASE_CHANNELS] = 0
            return grad

        proj.weight.register_hook(_sketch_channels_only)
    return {"lora": lora, "proj": proj_params}


def trainable_state(transformer) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in transformer.named_parameters() if p.requires_grad}


# -- the trainer -----------------------------------------------------------------------------
@dataclass
class RunSetup:
    """Everything a run builds before its first step, made once by :meth:`Trainer._setup`.

    The methods of the loop read it from ``Trainer.state`` (set once, complete, before the loop
    starts), so none of them depends on the order in which attributes were assigned.
    """

    acc: Any  # accelerate.Accelerator
    out: Path
    ckdir: Path
    gen: torch.Generator  # every random draw of a step; checkpointed
    family: str | None
    pipe: Any  # HairDiffPipeline: owns the VAE scale/shift, samples validation
    transformer: torch.nn.Module  # the unwrapped, widened transformer with its LoRA
    model: torch.nn.Module  # ``transformer`` as prepared by accelerate (DDP wrapper when distributed)
    optimizer: Any  # prepared by accelerate
    trainable_params: list[torch.nn.Parameter]
    base_channels: torch.Tensor  # channels 0-15 of pos_embed.proj, restored after each step
    resolution: int
    samples: list
    dataset: HairDataset
    plan: EpochPlan
    max_steps: int
    aug: AugmentSettings
    growth: MatteGrowth
    latent_cache: list[Path] | None  # photo latents ('seed' and 'none' augment)
    sketch_cache: list[Path] | None  # sketch latents ('none' augment)
    text: Any  # TextEmbeddings, or None for zero text
    skipped: int  # bad samples left out by --skip-bad
    logs: TrainingLogs | None = None  # main process only; made after resume (it needs the step)


@dataclass
class Progress:
    """Where the loop starts: 0/1/0 for a fresh run, the checkpoint's position on resume."""

    step: int = 0
    epoch: int = 1
    position: int = 0
    epoch_sums: dict = field(default_factory=lambda: {"total": 0.0, "mse": 0.0, "shape": 0.0, "n": 0})


class Trainer:
    def __init__(self, config: TrainConfig, on_step: Callable | None = None):
        self.config = config
        self.on_step = on_step
        self._state: RunSetup | None = None

    @property
    def state(self) -> RunSetup:
        """The run's :class:`RunSetup`; exists once :meth:`run` has set the run up."""
        if self._state is None:
            raise RuntimeError("the trainer is not set up: call run() first")
        return self._state

    @state.setter
    def state(self, value: RunSetup) -> None:
        self._state = value

    # setup ------------------------------------------------------------------------------
    def _accelerator(self):
        try:
            from accelerate import Accelerator
            from accelerate.state import AcceleratorState
        except ImportError as exc:
            raise HairDiffError("training needs accelerate: pip install 'hairdiff[train]'") from exc
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            # One process (tests, notebooks): let a new run choose its own precision. accelerate
            # (1.15) has no public way to drop its shared state (AcceleratorState is a borg whose
            # first mixed_precision sticks; clear_environment only touches os.environ), so this
            # uses the private reset its own test utilities use, keeping the PartialState.
            AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(mixed_precision=self.config.mixed_precision, cpu=self.config.cpu)

    def _weight_dtype(self) -> torch.dtype:
        mp = self.config.mixed_precision
        return torch.float32 if mp == "no" else parse_dtype(mp)

    def _setup(self) -> tuple[RunSetup, Progress]:
        """Check the inputs, load the models, data, caches and text, resume: everything the loop
        needs, in one object, and where the loop starts."""
        cfg = self.config
        acc = self._accelerator()
        main = acc.is_main_process
        out = Path(cfg.output)
        ckdir = out / "checkpoints"

        # Everything that can be refused is refused before the output folder is touched and
        # before the model loads: the dataset, the checkpoint to resume from.
        scan = scan_dataset(cfg.data, skip_bad=cfg.skip_bad)
        skipped = len(scan.bad_stems)
        existing = ckpt.list_checkpoints(ckdir)
        if not cfg.resume and existing:
            # A fresh run would interleave its checkpoints and logs with the old run's.
            raise ckpt.CheckpointError(
                f"{out} already holds checkpoints of a run (latest: step {existing[-1][0]}); pass --resume latest "
                f"to continue it, or choose another --output folder"
            )
        resume_from = ckpt.resolve_resume(cfg.resume, ckdir) if cfg.resume else None
        from hairdiff_core.pipeline import check_model_files

        check_model_files(model=cfg.model, vae=cfg.vae, tiny=cfg.tiny, toy=cfg.toy)
        for value, what in ((cfg.captions, "--captions"), (cfg.text_embeds, "--text-embeds")):
            if value is not None and not Path(value).exists():
                raise HairDiffError(f"{what} {value} not found", input=what.strip("-").replace("-", "_"))
        if main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.json")
        if skipped and main:
            logger.warning("--skip-bad: training on %d sample(s), skipped %d bad one(s)", len(scan.samples), skipped)

        seed = int(cfg.seed)
        random.seed(seed + acc.process_index)
        np.random.seed(seed + acc.process_index)
        torch.manual_seed(seed + acc.process_index)
        gen = torch.Generator().manual_seed(seed * 7919 + acc.process_index)

        from hairdiff_core.models.loading import load_models
        from hairdiff_core.pipeline import HairDiffPipeline, max_work_side

        weight_dtype = self._weight_dtype()
        # The SD3 VAE runs in float32 (force_upcast): load it so, without a bf16 round trip.
        loaded = load_models(
            cfg.model,
            vae=cfg.vae,
            tiny=cfg.tiny,
            toy=cfg.toy,
            dtype=weight_dtype,
            device="cpu",
            vae_dtype=torch.float32,
        )
        if loaded.vae is None:
            raise HairDiffError("training needs a VAE: the model has none; pass --vae PATH")
        # The pipeline widens the transformer, owns the VAE scale/shift and samples validation.
        pipe = HairDiffPipeline(loaded.transformer, loaded.vae, device=acc.device, dtype=weight_dtype)
        transformer = pipe.transformer
        resolution = int(cfg.resolution or pipe.default_work_size)
        check_resolution_fits(resolution, max_work_side(transformer), cfg.crop)
        groups = setup_trainable(transformer, cfg)
        transformer.train()
        base_channels = transformer.pos_embed.proj.weight.detach()[:, :BASE_CHANNELS].clone()

        param_groups = [
            {"params": groups["lora"], "weight_decay": cfg.weight_decay},
            {"params": groups["proj"], "weight_decay": 0.0},
        ]
        optimizer = self._optimizer(param_groups)
        model, optimizer = acc.prepare(transformer, optimizer)

        # Data.
        samples = scan.samples
        dataset = HairDataset(samples, resolution, crop=cfg.crop)
        braid = [i for i, s in enumerate(samples) if s.is_braid]
        plan = EpochPlan(
            len(samples),
            braid,
            seed,
            cfg.batch_size * acc.num_processes,
            None,
            cfg.oversample_factor,
            pad=acc.num_processes > 1,
            buckets=dataset.buckets,
        )
        if cfg.max_steps is not None:
            # The run's length in epochs (for the curriculum's middle), counted before oversampling.
            epochs = math.ceil(int(cfg.max_steps) * cfg.grad_accum / plan.micro_batches(1))
        else:
            epochs = int(cfg.epochs or DEFAULT_EPOCHS)
        plan.from_epoch = default_oversample_from(cfg, len(braid), epochs)
        if cfg.max_steps is not None:
            max_steps = int(cfg.max_steps)
        else:
            micro = sum(plan.micro_batches(e) for e in range(1, epochs + 1))
            max_steps = math.ceil(micro / cfg.grad_accum)

        def cache(kind: str) -> list[Path]:
            return self._prepare_latent_cache(
                kind, acc=acc, pipe=pipe, samples=samples, dataset=dataset, resolution=resolution, out=out
            )

        latent_cache = cache("image") if cfg.augment in ("seed", "none") else None
        # Nothing warps the sketch in 'none' mode either: its latent is cached too (CPU runs).
        sketch_cache = cache("sketch") if cfg.augment == "none" else None
        from .text import load_text_embeddings

        text = load_text_embeddings(cfg, samples, transformer, out, acc)

        s = RunSetup(
            acc=acc,
            out=out,
            ckdir=ckdir,
            gen=gen,
            family=loaded.family,
            pipe=pipe,
            transformer=transformer,
            model=model,
            optimizer=optimizer,
            trainable_params=groups["lora"] + groups["proj"],
            base_channels=base_channels,
            resolution=resolution,
            samples=samples,
            dataset=dataset,
            plan=plan,
            max_steps=max_steps,
            aug=AugmentSettings(mode=cfg.augment, sketch_jitter_px=cfg.sketch_jitter),
            growth=MatteGrowth(p=cfg.matte_growth),
            latent_cache=latent_cache,
            sketch_cache=sketch_cache,
            text=text,
            skipped=skipped,
        )

        # Resume.
        start = Progress()
        epoch_rows: list[dict] = []
        if cfg.resume == "latest" and resume_from is None and main:
            logger.info("--resume latest: no checkpoint in %s yet, starting from step 0", ckdir)
        if resume_from is not None:
            state = self._load_checkpoint(s, resume_from)
            start = Progress(state["step"], state["epoch"], state["position"], state["epoch_sums"])
            epoch_rows = state["epoch_rows"]
            if main:
                logger.info("resumed from %s (step %d, epoch %d)", resume_from, start.step, start.epoch)

        s.logs = TrainingLogs(out, start_step=start.step, epoch_rows=epoch_rows) if main else None
        if main:
            used = sorted(set(dataset.buckets))
            logger.info(
                "training %s on %d sample(s) (%d braid) at ~%dx%d (%s crop: %s), %d step(s), batch %d x %d process(es) "
                "x %d accumulation, augment=%s, matte growth p=%s, curriculum %s, %s",
                loaded.family,
                len(samples),
                len(braid),
                resolution,
                resolution,
                cfg.crop,
                ", ".join(f"{h}x{w}" for h, w in used),
                max_steps,
                cfg.batch_size,
                acc.num_processes,
                cfg.grad_accum,
                cfg.augment,
                cfg.matte_growth,
                f"from epoch {plan.from_epoch} (x{cfg.oversample_factor})" if plan.from_epoch else "off",
                cfg.mixed_precision,
            )
        return s, start

    def run(self) -> TrainResult:
        s, start = self._setup()
        self.state = s
        try:
            last = self._loop(start)
        except Exception as exc:
            if _is_oom(exc):
                raise TrainingOutOfMemoryError(self._oom_message()) from exc
            if is_disk_full(exc):
                raise self._disk_full() from exc
            raise
        finally:
            if s.logs is not None:
                try:
                    s.logs.plot()
                    s.logs.close()
                except Exception as exc:
                    # The loss plot must not hide why the run stopped (a full disk fails it too).
                    if not is_disk_full(exc):
                        raise
                    logger.warning("could not write the loss plot: the disk is full")

        main = s.acc.is_main_process
        adapter = None
        if main:
            try:
                adapter = self._save_adapter()
            except Exception as exc:
                if is_disk_full(exc):
                    raise self._disk_full("the adapter was not written") from exc
                raise
        s.acc.wait_for_everyone()
        return TrainResult(
            s.out, adapter, s.max_steps, last, list(s.logs.epoch_rows) if s.logs else [], s.skipped, main
        )

    def _optimizer(self, param_groups):
        cfg = self.config
        kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        if cfg.adam_8bit:
            try:
                import bitsandbytes as bnb
            except ImportError as exc:
                raise HairDiffError("--adam-8bit needs bitsandbytes: pip install bitsandbytes (CUDA only)") from exc
            return bnb.optim.AdamW8bit(param_groups, **kwargs)
        return torch.optim.AdamW(param_groups, **kwargs)

    def _disk_full(self, what: str = "training stopped") -> HairDiffError:
        """A full disk: no temporary checkpoint is left, the last complete one is named."""
        import shutil

        s = self.state
        for stale in s.ckdir.glob(".tmp-checkpoint-*") if s.ckdir.is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True)
        found = ckpt.list_checkpoints(s.ckdir)
        if found:
            last = f"the last good checkpoint {found[-1][1]} (step {found[-1][0]}) is intact"
            fix = "free some space and continue with --resume latest"
        else:
            last, fix = "no checkpoint was written yet", "free some space and run again"
        return disk_full_error(s.out, f"{what}; {last}", "output", fix)

    def _oom_message(self) -> str:
        cfg, s = self.config, self.state
        return (
            f"out of memory during a training step at about {s.resolution}x{s.resolution} px, batch {cfg.batch_size}, "
            f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, "
            f"{'8-bit' if cfg.adam_8bit else '32-bit'} AdamW, {cfg.mixed_precision}. Turn these knobs: a lower "
            f"--resolution, a smaller --batch-size (with a larger --grad-accum to keep the effective batch), "
            f"--gradient-checkpointing, --adam-8bit (needs bitsandbytes), --mixed-precision bf16, --augment seed "
            f"(no photo re-encoding). The last good checkpoint in {s.ckdir} is intact."
        )

    # seed-mode photo latents ---------------------------------------------------------------
    @staticmethod
    def _vae_fingerprint(vae) -> str:
        import hashlib
        import json

        h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
        first = next(vae.parameters()).detach().float().cpu().flatten()[:4096]
        h.update(first.numpy().tobytes())
        return h.hexdigest()[:12]

    def _prepare_latent_cache(
        self, kind: str, *, acc, pipe, samples: list, dataset: HairDataset, resolution: int, out: Path
    ) -> list[Path]:
        """Encode every photo (or sketch: ``kind``) once (unaugmented, at its bucket) and cache the
        latent on disk, keyed by the file's content, the resolution, the bucket (and crop) and the VAE."""
        from safetensors.torch import save_file

        cfg = self.config
        cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
        folder = cache / "latents"
        vae_fp = self._vae_fingerprint(pipe.vae)
        # The bucket (and, in bucket mode, the matte that places the crop) decide the pixels encoded.
        field, tag = ("img", "") if kind == "image" else (kind, f"_{kind}")
        paths = []
        for sample, (bh, bw) in zip(samples, dataset.buckets):
            crop = f"c{bh}x{bw}" if cfg.crop == "center" else f"b{bh}x{bw}m{file_digest(sample.matte)[:12]}"
            paths.append(
                folder / f"{file_digest(getattr(sample, field))[:32]}_{resolution}_{crop}_{vae_fp}{tag}.safetensors"
            )
        if acc.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            todo = [i for i, p in enumerate(paths) if not p.is_file()]
            for i in todo:
                item = dataset[i][kind][None]  # the sketch is canonical already
                latent = pipe.encode(item).cpu()[0].contiguous()
                with atomic_write(paths[i], fsync=False) as tmp:
                    save_file({"latent": latent}, str(tmp))
            logger.info(
                "%s mode: %d %s latent(s) cached in %s (%d new)", cfg.augment, len(paths), kind, folder, len(todo)
            )
        acc.wait_for_everyone()
        return paths

    @staticmethod
    def _cached_latents(indices: torch.Tensor, cache: list[Path]) -> torch.Tensor:
        from safetensors.torch import load_file

        return torch.stack([load_file(str(cache[int(i)]))["latent"] for i in indices])

    # text -----------------------------------------------------------------------------------
    def _text_batch(self, indices: torch.Tensor, device):
        from hairdiff_core.models.text import zero_text

        s = self.state
        b = len(indices)
        if s.text is None:
            return zero_text(s.transformer, b, device, torch.float32)
        embeds, pooled = [], []
        for i in indices.tolist():
            e, p = s.text.get(i, (None, None))
            if e is None:
                e, p = (t[0] for t in zero_text(s.transformer, 1, "cpu", torch.float32, tokens=s.text.tokens))
            embeds.append(e)
            pooled.append(p)
        return torch.stack(embeds).to(device), torch.stack(pooled).to(device)

    # the step -------------------------------------------------------------------------------
    def _micro_step(self, batch: dict):
        cfg, s = self.config, self.state
        acc, dev = s.acc, s.acc.device
        photo = batch["image"].to(dev)
        sketch = batch["sketch"].to(dev)
        matte = batch["matte"].to(dev)
        b, _, h, w = photo.shape
        photo_a, sketch_a, matte_a = augment_batch(photo, sketch, matte, s.aug, generator=s.gen)
        # The sketch keeps showing the real hair; only the region where loss counts grows.
        matte_a = grow_matte(matte_a, s.growth, generator=s.gen)
        soft = M.soft_mask(matte_a, M.feather_sigma(h, w, cfg.feather_sigma))
        mask = M.latent_grid(soft)
        with torch.no_grad():
            x0 = (
                self._cached_latents(batch["index"], s.latent_cache).to(dev)
                if s.latent_cache is not None
                else s.pipe.encode(photo_a)
            )
            if s.sketch_cache is not None:
                sketch_latent = self._cached_latents(batch["index"], s.sketch_cache).to(dev)
            else:
                sketch_latent = s.pipe.encode(sketch_a)
        sigma = sample_sigmas(
            b,
            cfg.sigma_sampling,
            shift=cfg.shift,
            generator=s.gen,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale,
        )
        noise = torch.randn(x0.shape, generator=s.gen).to(dev)
        sigma_d = sigma.to(dev)
        x_in = soft_noise(x0, noise, sigma_d, mask)
        embeds, pooled = self._text_batch(batch["index"], dev)
        with acc.autocast():
            v = s.model(
                hidden_states=torch.cat([x_in, sketch_latent], dim=1),
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                timestep=timestep_from_sigma(sigma, b, device=dev, dtype=sigma_d.dtype),
                return_dict=False,
            )[0]
        terms = hairdiff_loss(v, x0, noise, x_in, sigma_d, mask, cfg.lambda_shape)
        return terms, float(sigma.mean())

    def _stream(self, epoch: int, position: int):
        """Yield (epoch, position, micro-batches in epoch, batch) forever from (epoch, position)."""
        cfg, s = self.config, self.state
        acc = s.acc
        b, r = cfg.batch_size, acc.process_index
        while True:
            batches = s.plan.batches(epoch)
            shards = [gb[r * b : (r + 1) * b] for gb in batches]
            remaining = [shard for shard in shards[position:] if shard]
            loader = torch.utils.data.DataLoader(
                s.dataset,
                batch_sampler=remaining,
                num_workers=cfg.num_workers,
                collate_fn=_collate,
                persistent_workers=False,
            )
            for i, batch in enumerate(loader):
                yield epoch, position + i, len(batches), batch
            epoch, position = epoch + 1, 0

    def _all_finite(self, value: torch.Tensor) -> bool:
        s = self.state
        flag = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=s.acc.device)
        if s.acc.num_processes > 1:
            flag = s.acc.reduce(flag, "sum")
        return float(flag) == 0.0

    def _nonfinite(self, step: int, what: str, terms: dict | None = None) -> NonFiniteError:
        found = ckpt.list_checkpoints(self.state.ckdir)
        last = (
            f"the last good checkpoint is {found[-1][1]} (step {found[-1][0]})"
            if found
            else "no checkpoint was written yet"
        )
        detail = f" (total={terms['total']}, mse={terms['mse']}, shape={terms['shape']})" if terms else ""
        fp16 = ", use --mixed-precision bf16 rather than fp16" if self.config.mixed_precision == "fp16" else ""
        return NonFiniteError(
            f"training stopped at step {step}: the {what} is NaN or infinite{detail}; {last}. "
            f"Lower --lr (now {self.config.lr}), keep --max-grad-norm{fp16}, and check the data; then continue "
            f"with --resume latest."
        )

    def _apply_gradients(self, step: int, sums: dict) -> None:
        """Clip, check, step the optimiser and keep channels 0-15 of the patch conv as they were."""
        cfg, s = self.config, self.state
        acc = s.acc
        grad_norm = acc.clip_grad_norm_(s.trainable_params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        if grad_norm is not None and cfg.mixed_precision != "fp16" and not self._all_finite(torch.as_tensor(grad_norm)):
            raise self._nonfinite(step + 1, "gradient norm", sums)
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        if not cfg.train_base_channels:
            with torch.no_grad():
                s.transformer.pos_embed.proj.weight[:, :BASE_CHANNELS].copy_(s.base_channels)

    def _loop(self, start: Progress) -> dict:
        cfg, s = self.config, self.state
        acc = s.acc
        step, epoch, position, epoch_sums = start.step, start.epoch, start.position, dict(start.epoch_sums)
        main = acc.is_main_process
        stream = self._stream(epoch, position)
        bar = None
        if main:
            from tqdm.auto import tqdm

            bar = tqdm(total=s.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
        last: dict = {}
        try:
            while step < s.max_steps:
                factor = lr_factor(step, s.max_steps, cfg.warmup_steps, cfg.lr_schedule)
                for g in s.optimizer.param_groups:
                    g["lr"] = cfg.lr * factor
                sums = {"total": 0.0, "mse": 0.0, "shape": 0.0, "sigma": 0.0}
                finished_epochs = []
                for k in range(cfg.grad_accum):
                    ep, pos, n_in_epoch, batch = next(stream)
                    sync = k == cfg.grad_accum - 1
                    ctx = nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(s.model)
                    with ctx:
                        terms, sigma_mean = self._micro_step(batch)
                        if not self._all_finite(terms.total.detach()):
                            raise self._nonfinite(step + 1, "loss", terms.detached())
                        acc.backward(terms.total / cfg.grad_accum)
                    d = terms.detached()
                    if acc.num_processes > 1:
                        vals = acc.reduce(torch.tensor([d["total"], d["mse"], d["shape"]], device=acc.device), "mean")
                        d = dict(zip(("total", "mse", "shape"), vals.tolist()))
                    for key in ("total", "mse", "shape"):
                        sums[key] += d[key] / cfg.grad_accum
                        epoch_sums[key] += d[key]
                    sums["sigma"] += sigma_mean / cfg.grad_accum
                    epoch_sums["n"] += 1
                    epoch, position, last_ep = ep, pos + 1, ep
                    if position >= n_in_epoch:
                        n = max(1, epoch_sums["n"])
                        finished_epochs.append(
                            {"epoch": ep, **{k: epoch_sums[k] / n for k in ("total", "mse", "shape")}}
                        )
                        epoch_sums = {"total": 0.0, "mse": 0.0, "shape": 0.0, "n": 0}
                        epoch, position = ep + 1, 0
                self._apply_gradients(step, sums)
                step += 1
                row = {"step": step, "epoch": last_ep, **sums, "lr": cfg.lr * factor}
                last = row
                if main:
                    s.logs.log_step(row)
                    for er in finished_epochs:
                        s.logs.log_epoch(er)
                    bar.update(1)
                    bar.set_postfix(
                        total=f"{sums['total']:.4f}",
                        mse=f"{sums['mse']:.4f}",
                        shape=f"{sums['shape']:.4f}",
                        ep=row["epoch"],
                    )
                epoch_end = bool(finished_epochs) and cfg.checkpoint_every_epoch
                if step % cfg.checkpoint_every == 0 or step == s.max_steps or epoch_end:
                    self._save_checkpoint(step, epoch, position, epoch_sums)
                if epoch_end and main:
                    self._save_adapter(epoch=finished_epochs[-1]["epoch"], step=step)
                if main and cfg.validate_every and (step % cfg.validate_every == 0 or step == s.max_steps):
                    self.validate(step)
                if self.on_step is not None:
                    self.on_step(step, row, self)
        finally:
            if bar is not None:
                bar.close()
        return last

    # checkpoints ----------------------------------------------------------------------------
    def _save_checkpoint(self, step: int, epoch: int, position: int, epoch_sums: dict) -> None:
        cfg, s = self.config, self.state
        acc = s.acc
        tmp = s.ckdir / f".tmp-checkpoint-{step:08d}"
        if acc.is_main_process:
            ckpt.begin(s.ckdir, step)
        acc.wait_for_everyone()
        ckpt.write_process_part(tmp, acc.process_index, s.gen)
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "version": CHECKPOINT_VERSION,
                "step": step,
                "epoch": epoch,
                "position": position,
                "epoch_sums": epoch_sums,
                "epoch_rows": list(s.logs.epoch_rows) if s.logs else [],
                "fingerprint": cfg.fingerprint(),
                "fingerprint_hash": fingerprint_hash(cfg.fingerprint()),
                "num_processes": acc.num_processes,
                "max_steps": s.max_steps,
                "time": time.time(),
            }
            scaler = acc.scaler.state_dict() if getattr(acc, "scaler", None) is not None else None
            ckpt.write_main_part(tmp, trainable_state(s.transformer), s.optimizer.state_dict(), state, scaler)
            ckpt.commit(tmp, step, cfg.checkpoints_keep)
        acc.wait_for_everyone()

    def _load_checkpoint(self, s: RunSetup, path: Path) -> dict:
        """Restore the trainable weights, optimiser, scaler and generator of ``s`` from ``path``
        (during :meth:`_setup`, before ``state`` is set); returns the checkpoint's state."""
        acc, cfg = s.acc, self.config
        data = ckpt.read(path, acc.process_index)
        state = data["state"]
        if state.get("version") != CHECKPOINT_VERSION:
            raise ckpt.CheckpointError(
                f"{path} has checkpoint version {state.get('version')}; this HairDiff writes {CHECKPOINT_VERSION}"
            )
        theirs, ours = state.get("fingerprint", {}), cfg.fingerprint()
        diff = {
            k: (theirs.get(k), ours.get(k))
            for k in ours
            if theirs.get(k) != ours.get(k)
            and not (isinstance(ours.get(k), list) and list(theirs.get(k) or []) == ours.get(k))
        }
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ckpt.CheckpointError(
                f"cannot resume exactly from {path}: settings differ ({lines}); use the same settings, "
                f"or start a new --output folder"
            )
        if state.get("num_processes") != acc.num_processes:
            raise ckpt.CheckpointError(
                f"{path} was written by {state.get('num_processes')} process(es), this run has {acc.num_processes}; "
                "resume with the same number of processes"
            )
        params = {n: p for n, p in s.transformer.named_parameters() if p.requires_grad}
        saved = data["trainable"]
        if set(saved) != set(params):
            missing, extra = sorted(set(params) - set(saved))[:5], sorted(set(saved) - set(params))[:5]
            raise ckpt.CheckpointError(
                f"{path} does not match this model's trainable parameters (missing {missing}, unexpected {extra})"
            )
        with torch.no_grad():
            for n, p in params.items():
                if tuple(saved[n].shape) != tuple(p.shape):
                    raise ckpt.CheckpointError(
                        f"{path}: {n} has shape {tuple(saved[n].shape)}, the model {tuple(p.shape)}"
                    )
                p.copy_(saved[n].to(p.dtype))
        s.base_channels = s.transformer.pos_embed.proj.weight.detach()[:, :BASE_CHANNELS].clone()
        s.optimizer.load_state_dict(data["optimizer"])
        if data.get("scaler") and getattr(acc, "scaler", None) is not None:
            acc.scaler.load_state_dict(data["scaler"])
        ckpt.restore_rng(s.gen, *data["rng"])
        return state

    # outputs ---------------------------------------------------------------------------------
    def _adapter_metadata(self) -> dict:
        cfg, s = self.config, self.state
        keep = (
            "resolution",
            "crop",
            "matte_growth",
            "lambda_shape",
            "augment",
            "lr",
            "batch_size",
            "grad_accum",
            "seed",
            "mixed_precision",
            "sigma_sampling",
            "oversample_from_epoch",
            "oversample_factor",
            "lora_targets",
            "rank",
            "lora_alpha",
        )
        training = {k: getattr(cfg, k) for k in keep}
        training["resolution"] = s.resolution
        training["oversample_from_epoch"] = s.plan.from_epoch
        training["dataset_samples"] = len(s.samples)
        return training

    def _save_adapter(self, epoch: int | None = None, step: int | None = None) -> Path:
        """The final adapter, or with ``epoch`` the adapter after that epoch in ``epochs/`` (kept
        for comparing epochs, never pruned)."""
        from hairdiff_core.models.adapter import save_adapter

        s = self.state
        name = self.config.adapter_name
        path = s.out / name
        training = self._adapter_metadata()
        if epoch is not None:
            path = s.out / "epochs" / f"{name[: -len('.safetensors')]}-epoch-{epoch:03d}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            training["epoch"] = epoch
        extra = {"family": s.family} if s.family not in (None, "custom") else {}
        save_adapter(
            s.transformer,
            path,
            step=s.max_steps if step is None else step,
            training=training,
            base_channels_trained=bool(self.config.train_base_channels),
            **extra,
        )
        logger.info("saved the adapter %s", path)
        return path

    @torch.no_grad()
    def validate(self, step: int) -> Path | None:
        """Contact sheet of the first ``validation_samples`` samples through the nodes' sampler."""
        from PIL import Image

        from hairdiff_core.data.imageio import contact_sheet

        cfg, s = self.config, self.state
        k = min(cfg.validation_samples, len(s.samples))
        if k <= 0:
            return None
        was_training = s.transformer.training
        s.transformer.eval()
        rows = []
        try:
            for i in range(k):
                item = s.dataset[i]
                photo, sketch, matte = item["image"][None], item["sketch"][None], item["matte"][None]
                with s.acc.autocast():
                    result = s.pipe.generate(
                        photo,
                        sketch,
                        matte,
                        steps=cfg.validation_steps,
                        seed=cfg.seed,
                        work_size=s.resolution,
                    )
                rows.append(
                    contact_sheet(
                        [photo, sketch, matte, result.image],
                        ["photo", "sketch", "matte", f"step {step}"],
                        height=min(256, max(64, s.resolution)),
                    )
                )
        finally:
            s.transformer.train(was_training)
        sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (24, 24, 24))
        y = 0
        for r in rows:
            sheet.paste(r, (0, y))
            y += r.height
        path = save_pil(sheet, s.out / "samples" / f"step-{step:08d}.png")
        if s.logs is not None and s.logs.tb is not None:
            s.logs.tb.add_image("validation", np.asarray(sheet), step, dataformats="HWC")
        if cfg.eval_data:
            self.evaluate(step)
        return path

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """The metrics of ``hairdiff eval`` on the held-out set, appended to ``eval.csv``."""
        import csv

        from hairdiff_core.evaluation.evaluate import EvalOptions, EvalSetting, evaluate_samples, scan_samples

        cfg, s = self.config, self.state
        samples = scan_samples(cfg.eval_data, limit=cfg.eval_limit, skip_bad=True)
        options = EvalOptions(
            steps=cfg.validation_steps, seed=cfg.seed, resolution=s.resolution, crop=cfg.crop, work_size=s.resolution
        )
        with s.acc.autocast():
            report = evaluate_samples(
                s.pipe,
                samples,
                [EvalSetting("joint")],
                options,
                out_dir=s.out / "eval" / f"step-{step:08d}",
                save_results=False,
            )
        means = report.means(prefix="")
        path = s.out / "eval.csv"
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            f.write(old)  # one row per validation: rewriting keeps the file whole after a kill
            writer = csv.DictWriter(f, fieldnames=["step", *sorted(means)])
            if not old:
                writer.writeheader()
            writer.writerow({"step": step, **means})
        if s.logs is not None and s.logs.tb is not None:
            for key, value in means.items():
                s.logs.tb.add_scalar(f"eval/{key}", value, step)
        logger.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(means.items())))
        return means


def train(config: TrainConfig, on_step: Callable | None = None) -> TrainResult:
    """Run a training; see :class:`Trainer`. ``on_step(step, row, trainer)`` is called after each
    optimiser step (progress reporting, tests). The configuration is validated first (the same
    checks and messages as ``hairdiff train``), so a hand-built ``TrainConfig`` is checked too."""
    return Trainer(config.validate(), on_step=on_step).run()
