"""Probe of HairDiff Reference Attention inside a real ComfyUI, on the built-in toy (CPU).

Run by tests/test_comfyui_reference.py with ComfyUI's Python:

    COMFYUI_DIR=/path/to/ComfyUI python tests/comfyui_reference_probe.py

Prints one JSON line of measured figures; the test asserts on them. Not collected by pytest
(its name does not start with ``test_``): it needs ComfyUI importable, and imports the pack
through a temporary folder holding a link named ``hairdiff`` (ComfyUI loads packs by path).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]
STEPS = 8


def _boot() -> None:
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        raise SystemExit("set COMFYUI_DIR to a ComfyUI checkout")
    packs = Path(tempfile.mkdtemp(prefix="hairdiff_probe_"))
    (packs / "hairdiff").symlink_to(PACK, target_is_directory=True)
    sys.path.insert(0, comfy_dir)
    sys.path.insert(1, str(packs))
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.argv = [sys.argv[0], "--cpu"]


def _image(path: Path, mask: bool = False):
    import numpy as np
    import torch
    from PIL import Image

    a = np.asarray(Image.open(path).convert("L" if mask else "RGB")).astype(np.float32) / 255
    return torch.from_numpy(a)[None]


def _live_runs() -> int:
    from hairdiff.nodes.native_reference import ReferenceRun

    gc.collect()
    return sum(isinstance(o, ReferenceRun) for o in gc.get_objects())


def _live_caches() -> int:
    from hairdiff.hairdiff_core.method.reference import ReferenceCache

    gc.collect()
    return sum(isinstance(o, ReferenceCache) and len(o) > 0 for o in gc.get_objects())


def _no_state(patcher) -> bool:
    """Nothing of a run is left: not on the ModelPatcher, no run object, no stored K/V."""
    from hairdiff.nodes.native_reference import PASS_KEY, RUN_KEY

    options = patcher.model_options.get("transformer_options", {})
    return RUN_KEY not in options and PASS_KEY not in options and _live_runs() == 0 and _live_caches() == 0


def main() -> dict:
    _boot()
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    import torch
    from hairdiff.hairdiff_core.models import toy
    from hairdiff.hairdiff_core.pipeline import HairDiffPipeline
    from hairdiff.nodes import native_nodes as N
    from hairdiff.nodes import native_reference as NR
    from hairdiff.nodes.native_sampling import sample_soft_mask

    assets = PACK / "hairdiff_core" / "assets" / "toy"
    photo = _image(assets / "demo_photo.png")
    sketch = _image(assets / "demo_sketch_b.png")
    matte = _image(assets / "demo_matte.png", mask=True)

    base, vae, empty = N.HairDiffLoadBuiltin.execute(N.BUILTIN_TOY).result
    model = N.HairDiffApplyAdapter.execute(base, N.BUILTIN_TOY_ADAPTER, 1.0).result[0]
    pos, neg, latent, stitch = N.HairDiffSketchConditioning.execute(
        empty, empty, vae, photo, sketch, matte, 128, 10.0
    ).result
    fmt = model.model.latent_format

    def sample(m, **settings):
        return N.HairDiffSample.execute(m, pos, neg, latent, 0, STEPS, 1.0, 1.0).result[0]["samples"]

    def ref(mode, **kw):
        return NR.HairDiffReferenceAttention.execute(model, mode, **kw).result[0]

    def image_of(samples):
        return N.HairDiffStitch.execute(stitch, vae.decode(samples), True).result[0].movedim(-1, 1)

    out: dict = {"steps": STEPS}
    plain = sample(model)

    # 1. Reference weights 0: the plain model.
    zero = sample(ref("once", weight_inside=0.0, weight_outside=0.0))
    out["weight0_latent_diff"] = (zero - plain).abs().max().item()
    zero_ps = sample(ref("per_step", weight_inside=0.0, weight_outside=0.0))
    out["weight0_per_step_latent_diff"] = (zero_ps - plain).abs().max().item()

    # 2. Reference input = generation input, unit weights, no suppression, no exclusion: the plain
    # model (duplicated keys do not change softmax). ComfyUI's euler on the stock toy (no sketch
    # channels), one step from sigma0 with the matte all ones: the model's input is
    # (1 - s0)·x0 + s0·noise, exactly what a "matched" reference pass at s0 sees.
    samples = fmt.process_out(fmt.process_in(latent["samples"]))
    ones = torch.ones_like(latent["noise_mask"])
    sigmas = N.model_sigmas(base, 1, 0.6)
    noise = comfy.sample.prepare_noise(samples, 0)

    def euler(m, mask):
        return comfy.sample.sample_custom(
            m,
            noise,
            1.0,
            comfy.samplers.sampler_object("euler"),
            sigmas,
            empty,
            empty,
            samples,
            noise_mask=mask,
            seed=0,
        )

    unit = dict(weight_inside=1.0, weight_outside=1.0, key_weight_inside=1.0, reference_noise="matched")
    dup = euler(NR.HairDiffReferenceAttention.execute(base, "per_step", **unit).result[0], ones)
    base_plain = euler(base, ones)
    out["duplicate_latent_diff"] = (dup - base_plain).abs().max().item()
    out["duplicate_latent_scale"] = base_plain.abs().max().item()

    # 3. The native route against the core pipeline (the CLI's), once and per_step; the plain
    # route's figures beside them.
    pipe = HairDiffPipeline.from_files(toy=True, adapter=toy.adapter_path())
    args = (photo.movedim(-1, 1), sketch.movedim(-1, 1), matte[:, None])
    core_plain = pipe.generate(*args, steps=STEPS, seed=0, cfg=1.0)
    out["plain_latent_diff"] = (fmt.process_in(plain) - core_plain.latent).abs().max().item()
    out["plain_image_diff"] = (image_of(plain) - core_plain.image).abs().max().item()
    for mode in ("once", "per_step"):
        native = sample(ref(mode))
        core = pipe.generate(*args, steps=STEPS, seed=0, cfg=1.0, reference=mode)
        out[f"{mode}_latent_diff"] = (fmt.process_in(native) - core.latent).abs().max().item()
        out[f"{mode}_image_diff"] = (image_of(native) - core.image).abs().max().item()
        out[f"{mode}_changes_output"] = (native - plain).abs().max().item()
        out[f"{mode}_core_reference_passes"] = core.info.get("reference_passes")
    out["latent_scale"] = core_plain.latent.abs().max().item()
    native = sample(ref("once", reference_input="filled"))
    core = pipe.generate(*args, steps=STEPS, seed=0, cfg=1.0, reference={"mode": "once", "reference_input": "filled"})
    out["filled_latent_diff"] = (fmt.process_in(native) - core.latent).abs().max().item()
    out["filled_image_diff"] = (image_of(native) - core.image).abs().max().item()
    out["filled_vs_photo"] = (native - sample(ref("once"))).abs().max().item()

    # 4. Counting the reference passes (once: 1 per run; per_step: 1 per step).
    counts = {}
    original = NR.ReferenceRun.reference_pass

    def counted(self, sigma, options):
        counts[self.settings.mode] = counts.get(self.settings.mode, 0) + 1
        return original(self, sigma, options)

    NR.ReferenceRun.reference_pass = counted
    try:
        once_model, per_step_model = ref("once"), ref("per_step")
        sample(once_model)
        sample(per_step_model)
    finally:
        NR.ReferenceRun.reference_pass = original
    out["once_passes"] = counts.get("once", 0)
    out["per_step_passes"] = counts.get("per_step", 0)

    # 5. No reference state after a run, and after Cancel mid-run; the next run is unaffected.
    out["no_state_after_run"] = _no_state(once_model) and _no_state(per_step_model) and _no_state(model)
    cancelled = None
    sigmas8 = N.model_sigmas(model, STEPS, 1.0)
    noise8 = comfy.sample.prepare_noise(latent["samples"], 0)

    def cancel(step, x0, x, total):
        if step == 2:
            mm.interrupt_current_processing(True)

    for m in (once_model, per_step_model):
        try:
            comfy.sample.sample_custom(
                m,
                noise8,
                1.0,
                comfy.samplers.KSAMPLER(sample_soft_mask),
                sigmas8,
                pos,
                neg,
                latent["samples"],
                noise_mask=latent["noise_mask"],
                callback=cancel,
                seed=0,
            )
        except mm.InterruptProcessingException:
            cancelled = (cancelled or 0) + 1
        finally:
            mm.interrupt_current_processing(False)
    out["cancelled_runs"] = cancelled or 0
    out["no_state_after_cancel"] = _no_state(once_model) and _no_state(per_step_model)
    again = sample(once_model)
    out["rerun_after_cancel_diff"] = (again - sample(ref("once"))).abs().max().item()

    # 6. ComfyUI's own samplers: euler (KSampler's inpaint blend with the soft noise_mask) works with
    # the patch, and the reference changes its result.
    eul_plain = comfy.sample.sample_custom(
        model, noise8, 1.0, comfy.samplers.sampler_object("euler"), sigmas8, pos, neg, latent["samples"],
        noise_mask=latent["noise_mask"], seed=0,
    )  # fmt: skip
    eul_ref = comfy.sample.sample_custom(
        once_model, noise8, 1.0, comfy.samplers.sampler_object("euler"), sigmas8, pos, neg, latent["samples"],
        noise_mask=latent["noise_mask"], seed=0,
    )  # fmt: skip
    out["euler_reference_changes_output"] = (eul_ref - eul_plain).abs().max().item()
    out["euler_finite"] = bool(torch.isfinite(eul_ref).all())
    out["no_state_after_euler"] = _no_state(once_model)

    # The cache counts in ComfyUI's memory estimate while the patched model prepares to sample.
    from hairdiff.nodes.native_reference import cache_bytes, prepare_sampling_wrapper

    shape = tuple(latent["samples"].shape)
    plain_estimate = once_model.model.memory_required(shape)
    seen = {}

    def executor(model, noise_shape, conds, model_options=None, force_full_load=False):
        seen["estimate"] = model.model.memory_required(noise_shape)
        return "prepared"

    assert prepare_sampling_wrapper(executor, once_model, shape, {}) == "prepared"
    out["estimate_extra"] = seen["estimate"] - plain_estimate
    out["cache_bytes"] = cache_bytes(once_model, shape)
    out["estimate_restored"] = once_model.model.memory_required(shape) == plain_estimate and (
        "memory_required" not in once_model.model.__dict__
    )
    return out


if __name__ == "__main__":
    result = main()
    print(json.dumps(result))
