"""The ComfyUI side of a HairDiff sampling call, in one place.

``HairDiffSampler.execute`` converts its inputs, opens :func:`sampling_session`, makes one core
call (``pipe.generate``) and converts the result. Everything ComfyUI-specific about running the
core lives here: loading the transformer through ComfyUI's memory management, ComfyUI's VAE and
SD3 latent format (:class:`ComfyVAECodec`), the progress bar with previews (which is also where
Cancel raises), and giving memory back afterwards, also on error or Cancel.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .convert import latent_from_comfy, latent_to_comfy


def memory_estimate(model, photo: torch.Tensor, cfg: float):
    """The core's peak-VRAM estimate for this call (``hairdiff_core.memory``): resolution (the
    context box, at most the model's work area), cfg, reference mode, weights and offload."""
    from ..hairdiff_core.memory import estimate_for

    B, _, H, W = photo.shape
    work = int(model.transformer.config.sample_size) * 8
    scale = min(1.0, math.sqrt(work * work / (H * W)))
    mode = model.reference.mode if model.reference is not None else "off"
    return estimate_for(
        model.transformer,
        model.family,
        offload=model.offload,
        height=max(16, int(H * scale)),
        width=max(16, int(W * scale)),
        cfg=cfg,
        reference=mode,
        batch=B,
    )


def memory_required(model, photo: torch.Tensor, cfg: float) -> int:
    """What ComfyUI should keep free beside the weights it loads (bytes): the estimate's peak
    minus the weights ComfyUI already counts (all of them, except with blocks offload, where the
    weights stay on the CPU and the streamed blocks count as working memory)."""
    est = memory_estimate(model, photo, cfg)
    return int(est.total if model.offload == "blocks" else est.beyond_weights)


def offload_if_asked(patcher, always: bool = False) -> None:
    """Under --lowvram/--novram/--disable-smart-memory (or offload "model": ``always``), give the
    GPU back right after sampling.

    Otherwise the transformer stays loaded and ComfyUI evicts it when something else needs the
    room (its usual smart-memory behaviour, as after a KSampler). ComfyUI 0.3.x has no public
    call that unloads one given model (``unload_all_models`` would drop the text encoders and
    VAE too), so the entry is taken off ``current_loaded_models`` the way ComfyUI's own
    ``free_memory`` does it.
    """
    import comfy.model_management as mm

    low = mm.vram_state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM)
    if not (low or mm.DISABLE_SMART_MEMORY or always):
        return
    for i, loaded in enumerate(list(mm.current_loaded_models)):
        if loaded.model is patcher:
            loaded.model_unload()
            mm.current_loaded_models.pop(i)
            mm.soft_empty_cache()
            break


@dataclass
class ComfyVAECodec:
    """ComfyUI's VAE as the pipeline's latent codec (``HairDiffPipeline(codec=...)``).

    ComfyUI's LATENTs are raw VAE latents; SD3's scale and shift are applied here, at the
    boundary (``latent_format``). Encoding may evict the transformer under memory pressure, so
    ``reload`` brings it back before sampling continues.
    """

    vae: object
    latent_format: object
    device: torch.device
    reload: Callable[[], None]

    def encode(self, image01: torch.Tensor) -> torch.Tensor:
        raw = self.vae.encode(image01.movedim(1, -1).cpu())
        self.reload()
        return latent_from_comfy(raw, self.latent_format).to(self.device)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latent_to_comfy(latent, self.latent_format))
        if image.ndim == 5:  # video VAEs add a time axis
            image = image[:, 0]
        return image.movedim(-1, 1).float().clamp(0, 1)


@dataclass
class Session:
    """What :func:`sampling_session` yields: the pipeline, the ``on_step`` callback and the
    latent format for the node's LATENT output."""

    pipe: object
    on_step: Callable[[int, int, torch.Tensor], None]
    latent_format: object


@contextlib.contextmanager
def sampling_session(model, photo: torch.Tensor, cfg: float, steps: int, vae=None) -> Iterator[Session]:
    """Load ``model`` through ComfyUI's memory management and yield a pipeline wired to ComfyUI.

    Args:
        model: the node's ``HairDiffModel``.
        photo: the photo (B, 3, H, W), for the memory estimate.
        cfg: guidance scale (cfg > 1 doubles the activations).
        steps: for the progress bar.
        vae: ComfyUI's VAE, or None for the model's own.

    On exit (also on error or Cancel) block offloading hooks come off, a model-owned VAE goes
    back to where it was, and the GPU is given back when ComfyUI's settings ask for it.
    """
    import comfy.latent_formats
    import comfy.model_management as mm
    import comfy.utils
    import latent_preview

    from ..hairdiff_core.compiling import compiled_blocks
    from ..hairdiff_core.pipeline import HairDiffPipeline

    patcher = model.patcher
    need = memory_required(model, photo, float(cfg))

    def load() -> None:
        # ComfyUI frees what it holds (text encoders, VAE, other models) as needed, then loads the
        # whole transformer: ComfyUI cannot partially load a module without its cast-weight ops.
        mm.load_models_gpu([patcher], memory_required=need, force_full_load=True)

    load()
    transformer = model.transformer
    device = next(transformer.parameters()).device
    if model.offload == "blocks":
        # The patcher (and its LoRA patches) lives on the CPU; make room on the GPU for the
        # streamed blocks and activations, which ComfyUI cannot see as a loaded model.
        device = torch.device(model.run_device)
        mm.free_memory(need, device)
    latent_format = comfy.latent_formats.SD3()
    own_vae = model.vae if vae is None else None
    own_vae_device = next(own_vae.parameters()).device if own_vae is not None else None
    codec = ComfyVAECodec(vae, latent_format, device, reload=load) if vae is not None else None
    try:
        pipe = HairDiffPipeline(
            transformer,
            own_vae,
            device=device,
            dtype=model.dtype,
            offload="blocks" if model.offload == "blocks" else "none",
            codec=codec,
        )
        pbar = comfy.utils.ProgressBar(int(steps))
        previewer = latent_preview.get_previewer(device, latent_format)

        def on_step(step: int, total: int, latent: torch.Tensor) -> None:
            mm.throw_exception_if_processing_interrupted()
            preview = previewer.decode_latent_to_preview_image("JPEG", latent) if previewer is not None else None
            pbar.update_absolute(step, total, preview)

        with compiled_blocks(transformer, model.compile):
            yield Session(pipe, on_step, latent_format)
    finally:
        if own_vae is not None and next(own_vae.parameters()).device != own_vae_device:
            own_vae.to(own_vae_device)
        if model.offload == "blocks":
            from ..hairdiff_core.memory import remove_offload

            remove_offload(transformer, patcher.offload_device)
        offload_if_asked(patcher, always=model.offload == "model")
