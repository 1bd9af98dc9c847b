"""Model nodes: Load HairDiff Model, HairDiff LoRA, HairDiff Reference Attention.

The HAIRDIFF_MODEL value is an immutable ``HairDiffModel``: a ComfyUI ``ModelPatcher`` around
the diffusers transformer (so ComfyUI's model management loads, evicts and offloads it, and
LoRAs are ComfyUI weight patches on a clone), the model's own diffusers VAE when it has one,
and per-run settings (reference attention). Nodes that change it return a new value built with
``dataclasses.replace`` and, for weights, a ``clone()`` of the patcher: ComfyUI caches node
outputs and hands the same object to every branch, so nothing upstream ever changes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from comfy_api.latest import io

from ..hairdiff_core.errors import HairDiffError
from ..hairdiff_core.lora import LORA_KEY_PREFIXES
from ..hairdiff_core.memory import OFFLOADS, WEIGHTS, weights_of
from .convert import check_combos, input_of, node_error

logger = logging.getLogger(__name__)

TINY = "tiny (wiring check)"
TOY = "toy (synthetic portraits + its adapter)"
NONE = "none"
MODEL_FOLDER = "hairdiff"
HairDiffModelType = io.Custom("HAIRDIFF_MODEL")


class HairDiffModule(torch.nn.Module):
    """What the ModelPatcher wraps: ComfyUI sets plain attributes (``device``, load counters) on
    its model, which a diffusers ``ModelMixin`` refuses (its ``device`` is a read-only property).
    The state-dict keys start with ``transformer.``, the prefix of diffusers SD3 LoRA keys."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        self.device = next(transformer.parameters()).device

    def get_dtype(self) -> torch.dtype:
        return self.transformer.pos_embed.proj.weight.dtype


@dataclasses.dataclass(frozen=True)
class HairDiffModel:
    patcher: Any  # comfy.model_patcher.ModelPatcher around HairDiffModule
    vae: Any | None  # the model's own diffusers AutoencoderKL (always for tiny), or None
    family: str
    source: str
    dtype: torch.dtype
    reference: Any | None = None  # hairdiff_core.reference.ReferenceSettings
    loras: tuple[tuple[str, float], ...] = ()
    offload: str = "none"  # none | model | blocks (resolved from "auto" when loaded)
    run_device: Any = None  # where sampling runs (with blocks offload the patcher lives on the CPU)
    compile: Any | None = None  # hairdiff_core.compiling.CompileSettings: blocks compiled while sampling

    @property
    def transformer(self) -> torch.nn.Module:
        return self.patcher.model.transformer

    def replace(self, **changes: Any) -> HairDiffModel:
        return dataclasses.replace(self, **changes)


def check_model(model: Any, node: str) -> HairDiffModel:
    """``model`` when it is a HAIRDIFF_MODEL, else the node's error naming its ``model`` input."""
    if not isinstance(model, HairDiffModel):
        raise node_error(
            node, "model", f"expected a HAIRDIFF_MODEL, got {type(model).__name__}", "connect Load HairDiff Model"
        )
    return model


# --------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------


def register_model_folder() -> None:
    """Register ``models/hairdiff`` (adapters), keeping any paths the user configured for it."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    if MODEL_FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[MODEL_FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, set(exts) | {".safetensors"})
    else:
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = ([default], {".safetensors"})


def _safetensors(folder: str) -> list[str]:
    import folder_paths

    try:
        names = folder_paths.get_filename_list(folder)
    except KeyError:
        return []
    return [f"{folder}/{n}" for n in names if n.lower().endswith((".safetensors", ".sft"))]


# The options are listed whenever ComfyUI builds the node list (at startup and on refresh), so the
# walk is bounded: a model folder sits at most this many levels below models/diffusers (e.g.
# vendor/sd3.5_large), and hidden folders (caches, .git) are never entered, so a deep or linked-in
# tree (a dataset folder) costs nothing at startup.
DIFFUSERS_MAX_DEPTH = 2


def _diffusers_folders() -> list[str]:
    import folder_paths

    out = []
    for base in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(base):
            continue
        base_depth = base.rstrip(os.sep).count(os.sep)
        for root, dirs, files in os.walk(base, followlinks=True):
            if "model_index.json" in files or ("config.json" in files and root != base) or "transformer" in dirs:
                out.append("diffusers/" + os.path.relpath(root, base).replace(os.sep, "/"))
                dirs.clear()
            elif root.rstrip(os.sep).count(os.sep) - base_depth >= DIFFUSERS_MAX_DEPTH:
                dirs.clear()
            else:
                dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(out)


def _gguf_files() -> list[str]:
    """GGUF transformers in diffusion_models/ (and ComfyUI-GGUF's unet_gguf when registered):
    ComfyUI's own listing filters them out by extension."""
    import folder_paths

    out = []
    for folder in ("diffusion_models", "unet_gguf"):
        if folder not in folder_paths.folder_names_and_paths:
            continue
        for base in folder_paths.get_folder_paths(folder):
            for root, _dirs, files in os.walk(base, followlinks=True):
                for name in files:
                    if name.lower().endswith(".gguf"):
                        rel = os.path.relpath(os.path.join(root, name), base).replace(os.sep, "/")
                        out.append(f"{folder}/{rel}")
    return sorted(set(out))


def base_model_options() -> list[str]:
    return (
        [TINY, TOY]
        + _safetensors("checkpoints")
        + _safetensors("diffusion_models")
        + _gguf_files()
        + _diffusers_folders()
    )


def adapter_options() -> list[str]:
    return [NONE] + _safetensors(MODEL_FOLDER) + _safetensors("loras")


def lora_options() -> list[str]:
    return _safetensors("loras") + _safetensors(MODEL_FOLDER)


def resolve(choice: str, node: str, input_name: str) -> str:
    """'<folder>/<name>' as listed by the options above -> a full path."""
    import folder_paths

    folder, _, name = choice.partition("/")
    if not name:
        raise node_error(node, input_name, f"{choice!r} is not a model file choice", "pick one from the list")
    if folder == "diffusers":
        for base in folder_paths.get_folder_paths("diffusers"):
            path = os.path.join(base, name)
            if os.path.isdir(path):
                return path
        raise node_error(node, input_name, f"diffusers folder {name!r} not found", "refresh the node list (press R)")
    try:
        return folder_paths.get_full_path_or_raise(folder, name)
    except (FileNotFoundError, KeyError) as exc:
        raise node_error(node, input_name, f"{choice!r} not found ({exc})", "refresh the node list (press R)") from exc


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice != "auto":
        from ..hairdiff_core.checks import parse_dtype

        return parse_dtype(choice)
    import comfy.model_management as mm

    if device.type == "cpu":
        return torch.float32
    # SD3.5 overflows in fp16; bf16 where the device has it, else fp32.
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


def _settle_memory(transformer: torch.nn.Module, family: str, weights: str, offload: str, device: torch.device) -> str:
    """Resolve "auto" weights/offload from the VRAM ComfyUI reports free, less what it keeps in
    reserve (``--reserve-vram``), for a 1024² call with reference attention; fp8 storage is
    applied here when auto picks it. Returns the offload."""
    import comfy.model_management as mm

    from ..hairdiff_core.memory import apply_weights, choose_settings, weights_of

    if device.type == "cpu":
        return "none" if offload == "auto" else offload
    if weights != "auto" and offload != "auto":
        return offload
    current = weights_of(transformer)
    # An fp8 file loaded with auto is already fp8; bf16/fp16 files may still go to fp8.
    fixed = "auto" if weights == "auto" and current in ("bf16", "fp16", "fp32") else current
    side = int(transformer.config.sample_size) * 8
    known = (
        family if family != "custom" else {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    )
    # --reserve-vram (and ComfyUI's default few hundred MB) is not subtracted by get_free_memory;
    # load_models_gpu keeps it free beside every model, so auto must not plan with it.
    chosen_weights, chosen_offload, est = choose_settings(
        known,
        max(0, mm.get_free_memory(device) - mm.extra_reserved_memory()),
        weights=fixed,
        offload=offload,
        compute_dtype=transformer.pos_embed.proj.weight.dtype,
        height=side,
        width=side,
        reference="once",
    )
    if chosen_weights not in (current, "auto"):
        apply_weights(transformer, chosen_weights)
    logger.info(
        "HairDiff memory: weights %s, offload %s, predicted peak %.1f GB",
        chosen_weights,
        chosen_offload,
        est.total / 2**30,
    )
    return chosen_offload


def make_patcher(transformer: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    from comfy.model_patcher import ModelPatcher

    return ModelPatcher(HairDiffModule(transformer), load_device=load_device, offload_device=offload_device)


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


class LoadHairDiffModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_LoadModel",
            display_name="Load HairDiff Model",
            category="HairDiff/loaders",
            description=(
                "Loads a stock SD3.5 transformer from ComfyUI's model folders (single-file checkpoints in "
                "checkpoints/ or diffusion_models/, diffusers folders in diffusers/), widens it to 32 input "
                "channels and applies a HairDiff adapter from models/hairdiff (or loras). "
                f"'{TINY}' is a built-in random model that needs no files: it proves the graph runs, the hair it "
                "draws is noise. "
                f"'{TOY}' is a small model trained on synthetic striped portraits (128 px) with its shipped "
                "adapter (used when adapter is 'none'): the sketch steers its strands."
            ),
            inputs=[
                io.Combo.Input(
                    "base_model",
                    options=base_model_options(),
                    default=TINY,
                    tooltip="The SD3/SD3.5 base model (folder/name), or the built-in tiny model for a "
                    "wiring check without any files.",
                ),
                io.Combo.Input(
                    "adapter",
                    options=adapter_options(),
                    default=NONE,
                    tooltip="The trained HairDiff adapter (.safetensors: LoRA + sketch channels) from "
                    "models/hairdiff or models/loras; 'none' runs the widened base model untrained.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=["auto", "bf16", "fp16", "fp32"],
                    default="auto",
                    tooltip="Weight precision: auto = bf16 on GPUs that support it, else fp32; fp16 can "
                    "overflow (NaN) on SD3.5.",
                ),
                io.Combo.Input(
                    "device",
                    options=["auto", "cpu"],
                    default="auto",
                    tooltip="auto = ComfyUI's device with ComfyUI's memory management; cpu = always run "
                    "on the CPU (slow, for machines without a GPU).",
                ),
                io.Combo.Input(
                    "weights",
                    options=list(WEIGHTS),
                    default="auto",
                    optional=True,
                    tooltip="How the transformer's weights are stored (computed in 'dtype'): fp8 halves "
                    "bf16's memory (SD3.5 Large 16 -> 8 GB). auto = an fp8 file's own fp8; other "
                    "files stay in 'dtype' unless they would not fit the free VRAM, then fp8.",
                ),
                io.Combo.Input(
                    "offload",
                    options=list(OFFLOADS),
                    default="auto",
                    optional=True,
                    tooltip="blocks = only one or two transformer blocks on the GPU at a time (SD3.5 Large "
                    "in about 3 GB, slower); model = the whole transformer on the GPU while "
                    "sampling, given back after; none = stays loaded (ComfyUI evicts it when "
                    "needed); auto = none if it fits the free VRAM, else blocks.",
                ),
            ],
            outputs=[
                HairDiffModelType.Output(
                    "hairdiff_model", display_name="model", tooltip="The HairDiff model for the HairDiff nodes."
                )
            ],
        )

    @classmethod
    def validate_inputs(
        cls, base_model=None, adapter=None, dtype=None, device=None, weights=None, offload=None
    ) -> bool | str:
        """Refuse unknown choices and missing model files at /prompt time (ComfyUI does not check
        V3 combo values itself): each wrong input is named with its allowed values."""
        verdict = check_combos(
            cls,
            {
                "base_model": base_model,
                "adapter": adapter,
                "dtype": dtype,
                "device": device,
                "weights": weights,
                "offload": offload,
            },
        )
        if verdict is True:
            return True
        return verdict + " -> for a model file: put it in ComfyUI's model folders (press R to refresh) or pick another"

    @classmethod
    def execute(
        cls, base_model=TINY, adapter=NONE, dtype="auto", device="auto", weights="auto", offload="auto"
    ) -> io.NodeOutput:
        import comfy.model_management as mm

        from ..hairdiff_core.loading import load_models

        node = "Load HairDiff Model"
        load_device = torch.device("cpu") if device == "cpu" else mm.get_torch_device()
        offload_device = torch.device("cpu") if device == "cpu" else mm.unet_offload_device()
        torch_dtype = pick_dtype(dtype, load_device)
        tiny = base_model == TINY
        try:
            if tiny:
                loaded = load_models(
                    tiny=True, dtype=torch_dtype, device=offload_device, vae_dtype=torch.float32, weights=weights
                )
            elif base_model == TOY:
                loaded = load_models(
                    toy=True, dtype=torch_dtype, device=offload_device, vae_dtype=torch.float32, weights=weights
                )
            elif base_model.startswith(("diffusion_models/", "unet_gguf/")):
                # Transformer-only files (GGUF too): the sampler takes ComfyUI's VAE.
                from ..hairdiff_core.loading import FAMILY_NAMES, LoadedModels, load_transformer

                path = resolve(base_model, node, "base_model")
                transformer, family = load_transformer(path, dtype=torch_dtype, device=offload_device, weights=weights)
                loaded = LoadedModels(
                    transformer=transformer,
                    vae=None,
                    family=family,
                    source=f"{FAMILY_NAMES[family]}: transformer file {path}",
                )
            else:
                path = resolve(base_model, node, "base_model")
                loaded = load_models(
                    path, dtype=torch_dtype, device=offload_device, vae_dtype=torch.float32, weights=weights
                )
        except HairDiffError as exc:
            raise node_error(
                node,
                input_of(exc, {"model": "base_model"}, "base_model"),
                exc,
                "pick an SD3/SD3.5 model, or the tiny model",
            ) from exc
        transformer = loaded.transformer
        if base_model == TOY and adapter == NONE:
            from ..hairdiff_core.adapter import load_adapter
            from ..hairdiff_core.toy import adapter_path

            load_adapter(transformer, adapter_path())
            adapter = "toy (shipped)"  # named in the model's source line below
        elif adapter != NONE:
            from ..hairdiff_core.adapter import load_adapter

            path = resolve(adapter, node, "adapter")
            try:
                load_adapter(transformer, path)
            except HairDiffError as exc:
                raise node_error(node, "adapter", exc, "pick the adapter trained for this base model") from exc
        from ..hairdiff_core.surgery import widen_input_channels

        widen_input_channels(transformer)
        transformer.eval().requires_grad_(False)
        offload = _settle_memory(transformer, loaded.family, weights, offload, load_device)
        # With blocks offload the weights rest on the CPU: ComfyUI applies LoRA patches there, and
        # the sampler streams the blocks to run_device (see nodes/sampler_node.py).
        patcher_device = offload_device if offload == "blocks" else load_device
        model = HairDiffModel(
            patcher=make_patcher(transformer, patcher_device, offload_device),
            vae=loaded.vae.eval().requires_grad_(False) if loaded.vae is not None else None,
            family=loaded.family,
            source=loaded.source + (f" + adapter {adapter}" if adapter != NONE else ""),
            dtype=torch_dtype,
            offload=offload,
            run_device=load_device,
        )
        logger.info(
            "HairDiff model ready: %s (%s, %s, weights %s, offload %s)",
            model.source,
            model.family,
            torch_dtype,
            weights_of(transformer),
            offload,
        )
        return io.NodeOutput(model)


def lora_key_map(module: torch.nn.Module) -> dict[str, str]:
    """LoRA key prefix -> weight key of the wrapped module, for diffusers/PEFT SD3 LoRA files.

    Prefixes come with and without the ``transformer.`` of diffusers' SD3 LoRA format; a layer
    that already carries a PEFT LoRA (the HairDiff adapter) is patched on its ``base_layer``.
    """
    keys = set(module.state_dict().keys())
    out: dict[str, str] = {}
    for name, sub in module.named_modules():
        if name.endswith(".base_layer") or ".lora_" in name:
            continue
        if f"{name}.base_layer.weight" in keys:  # a PEFT LoRA layer (not an nn.Linear itself)
            weight = f"{name}.base_layer.weight"
        elif isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)) and f"{name}.weight" in keys:
            weight = f"{name}.weight"
        else:
            continue
        bare = name[len("transformer.") :] if name.startswith("transformer.") else name
        out[bare] = weight
        for prefix in LORA_KEY_PREFIXES:
            out[prefix + bare] = weight
    return out


class HairDiffLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_LoRA",
            display_name="HairDiff LoRA",
            category="HairDiff/loaders",
            description=(
                "Adds an extra SD3/SD3.5 LoRA (diffusers/PEFT key format) to a HairDiff model with a strength, "
                "as ComfyUI weight patches on a copy: the incoming model is never changed."
            ),
            inputs=[
                HairDiffModelType.Input("model", tooltip="The HairDiff model to add the LoRA to (it stays unchanged)."),
                io.Combo.Input(
                    "lora_name",
                    options=lora_options(),
                    tooltip="The LoRA file from models/loras or models/hairdiff (.safetensors).",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="How strongly the LoRA applies: 0 = not at all, 1 = as trained, negative "
                    "values push away from it.",
                ),
            ],
            outputs=[
                HairDiffModelType.Output(
                    "model_with_lora", display_name="model", tooltip="A new HairDiff model with the LoRA applied."
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None) -> bool | str:
        verdict = check_combos(cls, {"lora_name": lora_name})
        if verdict is True:
            return True
        return verdict + " -> put the file in models/loras or models/hairdiff (press R to refresh) or pick another"

    @classmethod
    def execute(cls, model, lora_name, strength=1.0) -> io.NodeOutput:
        import comfy.lora

        node = "HairDiff LoRA"
        check_model(model, node)
        path = resolve(lora_name, node, "lora_name")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise node_error(node, "lora_name", f"cannot read {path}: {exc}", "pick a .safetensors LoRA") from exc
        if float(strength) == 0.0:
            return io.NodeOutput(model)
        patches = comfy.lora.load_lora(sd, lora_key_map(model.patcher.model), log_missing=False)
        if not patches:
            sample = ", ".join(sorted(sd)[:3])
            raise node_error(
                node,
                "lora_name",
                f"{lora_name} has no LoRA weights for this SD3 transformer (keys look like: {sample})",
                "use a diffusers/PEFT-format SD3/SD3.5 LoRA made for this base model",
            )
        patcher = model.patcher.clone()
        added = patcher.add_patches(patches, float(strength))
        logger.info("HairDiff LoRA %s: %d weights patched at strength %s", lora_name, len(added), strength)
        return io.NodeOutput(model.replace(patcher=patcher, loras=model.loras + ((lora_name, float(strength)),)))


class HairDiffCompile(io.ComfyNode):
    """ComfyUI's TorchCompileModel for HAIRDIFF_MODEL: regional compilation, applied while sampling."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..hairdiff_core.compiling import COMPILE_BACKENDS, COMPILE_MODES

        return io.Schema(
            node_id="HairDiff_Compile",
            display_name="HairDiff Compile",
            category="HairDiff/sampling",
            description=(
                "Compiles the transformer's blocks with torch.compile while the HairDiff Sampler runs (one block "
                "kind at a time, so the first run compiles once, in seconds to minutes, and later runs reuse it). "
                "Returns a new model value; the incoming model runs uncompiled elsewhere."
            ),
            inputs=[
                HairDiffModelType.Input("model", tooltip="The HairDiff model to compile (it stays unchanged)."),
                io.Combo.Input(
                    "backend",
                    options=list(COMPILE_BACKENDS),
                    default="inductor",
                    tooltip="inductor = generated fused code (the speedup; needs a C compiler on the CPU, Triton "
                    "on CUDA); eager = trace only, a quick check that the model compiles (no speedup).",
                ),
                io.Combo.Input(
                    "mode",
                    options=["default" if m is None else m for m in COMPILE_MODES],
                    default="default",
                    optional=True,
                    tooltip="torch.compile mode: max-autotune-no-cudagraphs searches faster kernels (a much longer "
                    "first run). CUDA-graph modes are not offered: the reference cache changes per run.",
                ),
            ],
            outputs=[
                HairDiffModelType.Output(
                    "compiled_model", display_name="model", tooltip="A new HairDiff model that samples compiled."
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, backend=None, mode=None) -> bool | str:
        return check_combos(cls, {"backend": backend, "mode": mode})

    @classmethod
    def execute(cls, model, backend="inductor", mode="default") -> io.NodeOutput:
        from ..hairdiff_core.compiling import CompileSettings

        node = "HairDiff Compile"
        check_model(model, node)
        try:
            settings = CompileSettings(backend=backend, mode=None if mode == "default" else mode)
        except HairDiffError as exc:
            raise node_error(node, input_of(exc), exc) from exc
        return io.NodeOutput(model.replace(compile=settings))


class HairDiffReferenceAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_ReferenceAttention",
            display_name="HairDiff Reference Attention",
            category="HairDiff/sampling",
            description=(
                "Makes the generated hair attend to the original photo's keys and values (K/V sharing, gated by "
                "the soft mask), so it takes the photo's light and colour. Returns a new model with the settings "
                "attached; the incoming model is unchanged."
            ),
            inputs=[
                HairDiffModelType.Input(
                    "model", tooltip="The HairDiff model to attach the settings to (it stays unchanged)."
                ),
                io.Combo.Input(
                    "mode",
                    options=["once", "per_step", "off"],
                    default="once",
                    tooltip="once = one reference pass reused for every step (about 1x cost); per_step = a "
                    "reference pass at every step (faithful, about 2x cost); off = no reference.",
                ),
                io.Float.Input(
                    "weight_inside",
                    default=0.5,
                    min=0.0,
                    max=4.0,
                    step=0.05,
                    tooltip="How strongly the new hair sees the photo: higher takes more of its light, "
                    "too high pulls toward copying it; 0 = not at all.",
                ),
                io.Float.Input(
                    "weight_outside",
                    default=1.0,
                    min=0.0,
                    max=4.0,
                    step=0.05,
                    tooltip="How strongly pixels outside the hair see the photo (1 = like their own keys).",
                ),
                io.Float.Input(
                    "suppress_self_outside",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Down-weights the generation's own keys outside the hair (1 = they read the "
                    "photo almost only from the reference).",
                ),
                io.Float.Input(
                    "key_weight_inside",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Weight of the photo's keys inside the matte, which carry the OLD hair: 0 "
                    "excludes them (no old style leaks in), 1 keeps them.",
                ),
                io.Combo.Input(
                    "reference_input",
                    options=["photo", "filled"],
                    default="photo",
                    tooltip="photo = the original photo; filled = a copy with the hair region filled from "
                    "its surroundings (even less of the old hair).",
                ),
                io.Combo.Input(
                    "reference_noise",
                    options=["auto", "clean", "matched"],
                    default="auto",
                    optional=True,
                    tooltip="What the look at the photo sees: clean = the photo itself at every step (the "
                    "published method), matched = the photo as noisy as the image being drawn; "
                    "auto = clean for per_step, matched for once.",
                ),
                io.Combo.Input(
                    "key_pool",
                    options=["1", "2", "4"],
                    default="1",
                    optional=True,
                    tooltip="Key budget: average the photo's keys over NxN token cells (2 = 4x fewer "
                    "reference keys, cheaper attention; 1 = every key).",
                ),
                io.Int.Input(
                    "key_ring",
                    default=0,
                    min=0,
                    max=256,
                    optional=True,
                    tooltip="Key budget: only the photo's keys within this many tokens (16 px each) of the "
                    "matte; 0 = all of them.",
                ),
            ],
            outputs=[
                HairDiffModelType.Output(
                    "model_with_reference",
                    display_name="model",
                    tooltip="A new HairDiff model carrying the reference settings.",
                )
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        mode="once",
        weight_inside=0.5,
        weight_outside=1.0,
        suppress_self_outside=0.0,
        key_weight_inside=0.0,
        reference_input="photo",
        reference_noise="auto",
        key_pool="1",
        key_ring=0,
    ) -> io.NodeOutput:
        from ..hairdiff_core.reference import ReferenceSettings

        node = "HairDiff Reference Attention"
        check_model(model, node)
        values = dict(
            mode=mode,
            weight_inside=weight_inside,
            weight_outside=weight_outside,
            suppress_self_outside=suppress_self_outside,
            key_weight_inside=key_weight_inside,
            reference_input=reference_input,
            reference_noise=reference_noise,
            key_pool=int(key_pool),
            key_ring=key_ring,
        )
        try:
            settings = ReferenceSettings(**values)
        except HairDiffError as exc:
            raise node_error(node, input_of(exc), exc) from exc
        return io.NodeOutput(model.replace(reference=settings))

    @classmethod
    def validate_inputs(cls, mode=None, reference_input=None, reference_noise=None, key_pool=None) -> bool | str:
        return check_combos(
            cls,
            {
                "mode": mode,
                "reference_input": reference_input,
                "reference_noise": reference_noise,
                "key_pool": key_pool,
            },
        )
