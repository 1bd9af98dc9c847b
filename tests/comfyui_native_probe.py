"""Checks of HairDiff's native route inside a real ComfyUI, run by ComfyUI's own Python.

    COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python tests/comfyui_native_probe.py OUT_DIR

Imports ComfyUI in-process (``--cpu``), loads this pack as a package, runs every check below and
prints one JSON object: figures and yes/no facts that ``tests/test_comfyui_native.py`` asserts
on. The graphs are the ones an artist wires (HairDiff Built-in Model or Load Diffusion Model ->
HairDiff Apply Adapter -> SamplerCustomAdvanced with HairDiff's sampler), called through the
nodes' own ``execute``; the reference is the core pipeline (``hairdiff generate --toy``'s path).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _boot(comfy_dir: str, work: Path) -> None:
    packs = work / "packs"
    packs.mkdir(parents=True, exist_ok=True)
    link = packs / "hairdiff"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    sys.path[:0] = [comfy_dir, str(packs)]
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.argv = [sys.argv[0], "--cpu"]
    import folder_paths

    folder_paths.add_model_folder_path("diffusion_models", str(work / "diffusion_models"))
    folder_paths.add_model_folder_path("loras", str(work / "loras"))


def _images():
    import numpy as np
    import torch
    from PIL import Image

    assets = ROOT / "hairdiff_core" / "assets" / "toy"

    def read(name: str, mode: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(Image.open(assets / name).convert(mode)).astype(np.float32) / 255)[None]

    return read("demo_photo.png", "RGB"), read("demo_sketch_b.png", "RGB"), read("demo_matte.png", "L")


def _sample_advanced(model, pos, neg, latent, seed, sigmas, cfg=1.0, sampler=None):
    """RandomNoise + CFGGuider + SamplerCustomAdvanced, ComfyUI's own nodes."""
    from comfy_extras.nodes_custom_sampler import CFGGuider, RandomNoise, SamplerCustomAdvanced
    from hairdiff.nodes import native_nodes as N

    noise = RandomNoise.execute(seed).result[0]
    guider = CFGGuider.execute(model, pos, neg, cfg).result[0]
    sampler = sampler or N.HairDiffSoftMaskSampler.execute().result[0]
    return SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent).result[0]


def _weights_digest(patcher) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(patcher.model.diffusion_model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_toy(out: dict) -> None:
    """The toy through the native nodes against the core pipeline; background exact; the incoming
    MODEL unchanged; Cancel mid-run, then the same run gives the same image."""
    import comfy.model_management as mm
    import torch
    from hairdiff.hairdiff_core.models import toy
    from hairdiff.hairdiff_core.pipeline import HairDiffPipeline
    from hairdiff.nodes import native_nodes as N

    photo, sketch, matte = _images()
    steps, seed = 8, 7
    base, vae, empty = N.HairDiffLoadBuiltin.execute(N.BUILTIN_TOY).result
    before = _weights_digest(base)
    model = N.HairDiffApplyAdapter.execute(base, N.BUILTIN_TOY_ADAPTER, 1.0).result[0]
    pos, neg, latent, stitch = N.HairDiffSketchConditioning.execute(
        empty, empty, vae, photo, sketch, matte, 128, 10.0
    ).result
    sigmas = N.HairDiffScheduler.execute(model, steps, 1.0).result[0]

    def finish(sampled):
        decoded = vae.decode(sampled["samples"])
        return N.HairDiffStitch.execute(stitch, decoded, True).result[0]

    advanced = _sample_advanced(model, pos, neg, latent, seed, sigmas)
    one_node = N.HairDiffSample.execute(model, pos, neg, latent, seed, steps, 1.0, 1.0).result[0]
    image = finish(advanced)

    pipe = HairDiffPipeline.from_files(toy=True, adapter=toy.adapter_path())
    ref = pipe.generate(photo.movedim(-1, 1), sketch.movedim(-1, 1), matte[:, None], steps=steps, seed=seed)
    native = image.movedim(-1, 1)
    outside = (ref.mask == 0).expand_as(native)
    scaled = model.model.latent_format.process_in(advanced["samples"])
    out["toy_image_max_diff"] = float((native - ref.image).abs().max())
    out["toy_latent_max_diff"] = float((scaled - ref.latent).abs().max())
    out["toy_one_node_equals_advanced"] = bool(torch.equal(one_node["samples"], advanced["samples"]))
    out["toy_outside_exact"] = bool(torch.equal(native[outside], photo.movedim(-1, 1)[outside]))
    out["toy_outside_pixels"] = int(outside.sum())
    out["toy_inside_changed"] = float((native - photo.movedim(-1, 1)).abs().max())
    # ComfyUI patches the shared module while a clone is loaded and restores it when another
    # patcher loads (or on unload): the incoming MODEL keeps no patch of ours, and once unloaded
    # its weights are the loader's, bit for bit.
    out["toy_base_patches"] = len(base.patches) + len(base.object_patches)
    mm.unload_all_models()
    out["toy_base_weights_unchanged"] = _weights_digest(base) == before

    # KSampler-side alternative: BasicScheduler + the same conditioning (the 'simple' ladder).
    from comfy_extras.nodes_custom_sampler import BasicScheduler

    simple = BasicScheduler.execute(model, "simple", steps, 1.0).result[0]
    basic = finish(_sample_advanced(model, pos, neg, latent, seed, simple)).movedim(-1, 1)
    out["toy_basic_scheduler_mean_diff"] = float((basic - ref.image).abs().mean())

    # KSampler's way: euler + DifferentialDiffusion on the same conditioning and latent (the
    # latent's noise_mask as ComfyUI's denoise mask: the outside re-noised to sigma, not sigma*m).
    import comfy.samplers
    from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion

    dd_model = DifferentialDiffusion.execute(model, 1.0).result[0]
    dd = finish(
        _sample_advanced(dd_model, pos, neg, latent, seed, sigmas, sampler=comfy.samplers.sampler_object("euler"))
    )
    dd = dd.movedim(-1, 1)
    soft = ref.mask.expand_as(native) > 0
    out["dd_inside_mean_diff"] = float((dd - native)[soft].abs().mean())
    out["dd_inside_max_diff"] = float((dd - native)[soft].abs().max())
    out["dd_outside_exact"] = bool(torch.equal(dd[outside], native[outside]))

    # Cancel at step 3 (ComfyUI's interrupt flag, raised from the progress hook), then the same run.
    calls = {"n": 0}

    def interrupt_at_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    import comfy.utils

    comfy.utils.set_progress_bar_global_hook(interrupt_at_3)
    try:
        _sample_advanced(model, pos, neg, latent, seed, sigmas)
        out["toy_cancel_raised"] = False
    except mm.InterruptProcessingException:
        out["toy_cancel_raised"] = True
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    again = _sample_advanced(model, pos, neg, latent, seed, sigmas)
    out["toy_after_cancel_equal"] = bool(torch.equal(again["samples"], advanced["samples"]))


def check_zero_adapter(out: dict, work: Path) -> None:
    """A 32-channel adapter with zero sketch channels and no LoRA samples exactly like the base
    (any sketch); strength 0 of a trained adapter too."""
    import comfy.sample
    import comfy.samplers
    from hairdiff.hairdiff_core.method.surgery import widen_input_channels
    from hairdiff.hairdiff_core.models import toy
    from hairdiff.hairdiff_core.models.adapter import save_adapter
    from hairdiff.nodes import native_nodes as N

    widened = widen_input_channels(toy.load_toy_transformer())
    path = work / "loras" / "zero_sketch.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(widened, path)
    photo, sketch, matte = _images()
    base, vae, empty = N.HairDiffLoadBuiltin.execute(N.BUILTIN_TOY).result
    pos, neg, latent, _ = N.HairDiffSketchConditioning.execute(
        empty, empty, vae, photo, sketch, matte, 128, 10.0
    ).result
    sigmas = N.HairDiffScheduler.execute(base, 6, 1.0).result[0]
    euler = comfy.samplers.sampler_object("euler")
    lat = {"samples": latent["samples"]}
    plain = _sample_advanced(base, empty, empty, lat, 3, sigmas, sampler=euler)["samples"]
    for name, model in (
        ("zero_channels", N.HairDiffApplyAdapter.execute(base, "loras/zero_sketch.safetensors", 1.0).result[0]),
        ("strength_0", N.HairDiffApplyAdapter.execute(base, N.BUILTIN_TOY_ADAPTER, 0.0).result[0]),
    ):
        got = _sample_advanced(model, pos, neg, lat, 3, sigmas, sampler=euler)["samples"]
        out[f"{name}_max_diff"] = float((got - plain).abs().max())
    trained = N.HairDiffApplyAdapter.execute(base, N.BUILTIN_TOY_ADAPTER, 1.0).result[0]
    got = _sample_advanced(trained, pos, neg, lat, 3, sigmas, sampler=euler)["samples"]
    out["trained_differs_from_base"] = float((got - plain).abs().max())


def _small_sd3(work: Path):
    """A small SD3 of SD3's widths (hidden = 64 x depth, 2 blocks, SD3's text widths) saved in
    ComfyUI's key layout, plus a HairDiff adapter (random LoRA, random sketch channels) for it."""
    import torch
    from diffusers import SD3Transformer2DModel
    from hairdiff.hairdiff_core.method.surgery import widen_input_channels
    from hairdiff.hairdiff_core.models.adapter import save_adapter
    from hairdiff.hairdiff_core.models.lora import add_lora
    from hairdiff.nodes.builtin_models import to_comfy_layout
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = dict(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=2,
        joint_attention_dim=4096,
        caption_projection_dim=128,
        pooled_projection_dim=2048,
        pos_embed_max_size=32,
        qk_norm="rms_norm",
    )
    t = SD3Transformer2DModel(**config).eval()
    ckpt = work / "diffusion_models" / "small_sd3.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in to_comfy_layout(dict(t.state_dict()), config).items()}, str(ckpt))
    widen_input_channels(t)
    with torch.no_grad():
        t.pos_embed.proj.weight[:, 16:].normal_(0, 0.02)
    add_lora(t, rank=4, alpha=4, targets=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    adapter = work / "loras" / "small_sd3_adapter.safetensors"
    adapter.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(t, adapter)
    return ckpt.name, adapter.name


def check_small_sd3(out: dict, work: Path) -> None:
    """Load Diffusion Model (ComfyUI's detection; default and fp8 weight dtype) -> Apply Adapter ->
    SamplerCustomAdvanced; an adapter of another family is refused naming both sides."""
    import torch
    from hairdiff.nodes import native_nodes as N

    from nodes import UNETLoader

    ckpt, adapter = _small_sd3(work)
    photo, sketch, matte = _images()
    _toy, vae, _ = N.HairDiffLoadBuiltin.execute(N.BUILTIN_TOY).result
    text = [[torch.zeros(1, 77, 4096), {"pooled_output": torch.zeros(1, 2048)}]]
    short = [[torch.zeros(1, 154, 4096), {"pooled_output": torch.zeros(1, 2048)}]]
    for dtype in ("default", "fp8_e4m3fn"):
        (model,) = UNETLoader().load_unet(ckpt, dtype)
        out[f"small_{dtype}_detected"] = type(model.model).__name__
        patched = N.HairDiffApplyAdapter.execute(model, f"loras/{adapter}", 1.0).result[0]
        pos, neg, latent, stitch = N.HairDiffSketchConditioning.execute(
            text, short, vae, photo, sketch, matte, 128, 10.0
        ).result
        sigmas = N.HairDiffScheduler.execute(patched, 4, 1.0).result[0]
        sampled = _sample_advanced(patched, pos, neg, latent, 1, sigmas, cfg=2.0)["samples"]
        keep = latent["noise_mask"].expand_as(sampled) == 0
        x0 = patched.model.latent_format.process_in(latent["samples"])
        got = patched.model.latent_format.process_in(sampled)
        out[f"small_{dtype}_finite"] = bool(torch.isfinite(sampled).all())
        out[f"small_{dtype}_outside_max_diff"] = float((got - x0)[keep].abs().max())
        out[f"small_{dtype}_inside_changed"] = float((got - x0)[~keep].abs().max())
    try:
        (model,) = UNETLoader().load_unet(ckpt, "default")
        N.HairDiffApplyAdapter.execute(model, N.BUILTIN_TOY_ADAPTER, 1.0)
        out["family_mismatch_error"] = None
    except Exception as exc:  # the node's error, whatever its class
        out["family_mismatch_error"] = str(exc)


def check_errors(out: dict) -> None:
    """Miswired graphs: each a node error that names the input and what to connect."""
    import comfy.model_patcher
    import torch
    from hairdiff.nodes import native_nodes as N

    photo, sketch, matte = _images()
    base, vae, empty = N.HairDiffLoadBuiltin.execute(N.BUILTIN_TOY).result
    model = N.HairDiffApplyAdapter.execute(base, N.BUILTIN_TOY_ADAPTER, 1.0).result[0]
    pos, neg, latent, _ = N.HairDiffSketchConditioning.execute(
        empty, empty, vae, photo, sketch, matte, 128, 10.0
    ).result
    sigmas = N.HairDiffScheduler.execute(model, 2, 1.0).result[0]

    def error_of(fn) -> str | None:
        try:
            fn()
        except Exception as exc:
            text = str(exc)
            return text if "Traceback" not in text else "TRACEBACK"
        return None

    import comfy.samplers

    not_sd3 = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    out["error_not_sd3"] = error_of(lambda: N.HairDiffApplyAdapter.execute(not_sd3, N.BUILTIN_TOY_ADAPTER, 1.0))
    out["error_no_adapter"] = error_of(lambda: _sample_advanced(base, pos, neg, latent, 0, sigmas))
    out["error_no_sketch"] = error_of(lambda: _sample_advanced(model, empty, empty, latent, 0, sigmas))
    euler = comfy.samplers.sampler_object("euler")
    out["error_no_sketch_euler"] = error_of(
        lambda: _sample_advanced(model, empty, empty, {"samples": latent["samples"]}, 0, sigmas, sampler=euler)
    )
    out["error_no_mask"] = error_of(
        lambda: _sample_advanced(model, pos, neg, {"samples": latent["samples"]}, 0, sigmas)
    )
    wide = [[torch.zeros(1, 77, 4096), {"pooled_output": torch.zeros(1, 2048)}]]
    wrong = N.HairDiffSketchConditioning.execute(wide, wide, vae, photo, sketch, matte, 128, 10.0).result
    out["error_text_width"] = error_of(lambda: _sample_advanced(model, wrong[0], wrong[1], wrong[2], 0, sigmas))
    out["error_twice"] = error_of(lambda: N.HairDiffApplyAdapter.execute(model, N.BUILTIN_TOY_ADAPTER, 1.0))


CHECKS = {"toy": check_toy, "zero": check_zero_adapter, "small_sd3": check_small_sd3, "errors": check_errors}


def main() -> None:
    work = Path(sys.argv[1])
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CHECKS)
    _boot(os.environ["COMFYUI_DIR"], work)
    out: dict = {}
    import torch

    for name in names:
        fn = CHECKS[name]
        try:
            with torch.inference_mode():  # as ComfyUI's executor runs every node
                fn(out, work) if fn.__code__.co_argcount == 2 else fn(out)
        except Exception:
            out[f"{name}_crashed"] = traceback.format_exc()
    print("PROBE " + json.dumps(out))


if __name__ == "__main__":
    main()
