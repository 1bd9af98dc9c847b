"""Minimal stand-ins for the few ComfyUI modules HairDiff's nodes touch.

Only the names the nodes use exist, with the behaviour the nodes rely on (ComfyUI 0.3.64,
``comfy_api/latest/_io.py``, ``comfy/model_patcher.py``, ``comfy/model_management.py``,
``comfy/utils.py``, ``comfy/lora.py``, ``folder_paths.py``). ``Schema.validate`` keeps ComfyUI's
unique-id rule (inputs and outputs share one id space). ``ModelPatcher`` keeps ComfyUI's
clone/patch semantics: clones share the module, each clone owns its patch list, and loading a
clone restores the weights another clone had patched. Nothing here talks to a GPU.

``install()`` puts the modules into ``sys.modules`` and returns them; ``uninstall()`` removes
exactly what ``install()`` added, so the stand-ins never outlive the tests that asked for them.
"""

from __future__ import annotations

import enum
import os
import sys
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

# --------------------------------------------------------------------------------------------
# comfy_api.latest.io
# --------------------------------------------------------------------------------------------


class _Input:
    def __init__(
        self,
        id: str,
        display_name: str | None = None,
        optional: bool = False,
        tooltip: str | None = None,
        lazy: bool | None = None,
        default: Any = None,
        min: Any = None,
        max: Any = None,
        step: Any = None,
        round: Any = None,
        options: list | None = None,
        multiline: bool = False,
        control_after_generate: bool | None = None,
        display_mode: Any = None,
        upload: Any = None,
        force_input: bool | None = None,
        socketless: bool | None = None,
        **extra: Any,
    ):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.default = default
        self.min = min
        self.max = max
        self.step = step
        self.options = options
        self.multiline = multiline
        self.control_after_generate = control_after_generate
        self.extra = extra

    @property
    def io_type(self) -> str:
        return self.Parent.io_type

    @property
    def is_widget(self) -> bool:
        return self.Parent.io_type in _WIDGET_TYPES


class _Output:
    def __init__(
        self,
        id: str | None = None,
        display_name: str | None = None,
        tooltip: str | None = None,
        is_output_list: bool = False,
    ):
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip
        self.is_output_list = is_output_list

    @property
    def io_type(self) -> str:
        return self.Parent.io_type


_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _comfytype(io_type: str):
    def make(name: str):
        inp = type(f"{name}Input", (_Input,), {})
        out = type(f"{name}Output", (_Output,), {})
        cls = type(name, (), {"io_type": io_type, "Input": inp, "Output": out})
        inp.Parent = cls
        out.Parent = cls
        return cls

    return make


def Custom(io_type: str):  # noqa: N802 - ComfyUI's name
    return _comfytype(io_type)(f"Custom_{io_type}")


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list | None = None
    description: str = ""
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    not_idempotent: bool = False

    def validate(self) -> None:
        input_ids = [i.id for i in self.inputs or []]
        output_ids = [o.id for o in self.outputs or []]
        issues = []
        if len(set(input_ids)) != len(input_ids):
            issues.append(
                f"Input ids must be unique, but {[k for k, c in Counter(input_ids).items() if c > 1]} are not."
            )
        if len(set(output_ids)) != len(output_ids):
            issues.append(
                f"Output ids must be unique, but {[k for k, c in Counter(output_ids).items() if c > 1]} are not."
            )
        both = set(input_ids) & set(output_ids)
        if both:
            issues.append(f"Ids must be unique between inputs and outputs, but {both} are not.")
        if issues:
            raise ValueError("\n".join(issues))

    def finalize(self) -> None:
        for i, output in enumerate(self.outputs or []):
            if output.id is None:
                output.id = f"_{i}_{output.io_type}_"


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None, expand: Any = None, block_execution: Any = None):
        self.args = args
        self.ui = ui

    @property
    def result(self):
        return self.args if self.args else None

    def __getitem__(self, index: int) -> Any:
        return self.args[index]


class ComfyNode:
    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:  # noqa: N802 - ComfyUI's name
        schema = cls.define_schema()
        schema.finalize()
        schema.validate()
        return schema


class ComfyExtension:
    async def on_load(self) -> None:
        return None

    async def get_node_list(self) -> list:
        raise NotImplementedError


class _PreviewImage:
    def __init__(self, image: torch.Tensor, animated: bool = False, cls: Any = None, **kwargs: Any):
        self.image = image

    def as_dict(self) -> dict:
        return {"images": [], "animated": (False,)}


class _PreviewMask(_PreviewImage):
    pass


def _io_module() -> types.ModuleType:
    io = types.ModuleType("comfy_api.latest.io")
    for name, io_type in {
        "Image": "IMAGE",
        "Mask": "MASK",
        "Latent": "LATENT",
        "Conditioning": "CONDITIONING",
        "Vae": "VAE",
        "Model": "MODEL",
        "Sampler": "SAMPLER",
        "Sigmas": "SIGMAS",
        "Clip": "CLIP",
        "Int": "INT",
        "Float": "FLOAT",
        "String": "STRING",
        "Boolean": "BOOLEAN",
        "Combo": "COMBO",
    }.items():
        setattr(io, name, _comfytype(io_type)(name))
    io.Custom = Custom
    io.Schema = Schema
    io.NodeOutput = NodeOutput
    io.ComfyNode = ComfyNode
    io.NumberDisplay = enum.Enum("NumberDisplay", {"number": "number", "slider": "slider"})
    return io


# --------------------------------------------------------------------------------------------
# comfy.model_management, comfy.model_patcher, comfy.lora, comfy.utils, comfy.latent_formats
# --------------------------------------------------------------------------------------------


class InterruptProcessingException(Exception):
    pass


class VRAMState(enum.Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


class _LoadedModel:
    def __init__(self, patcher: ModelPatcher):
        self.model = patcher

    def model_unload(self, memory_to_free=None, unpatch_weights=True) -> bool:
        self.model.unpatch_model(self.model.offload_device)
        return True


def _model_management() -> types.ModuleType:
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.VRAMState = VRAMState
    mm.vram_state = VRAMState.NORMAL_VRAM
    mm.DISABLE_SMART_MEMORY = False
    mm.current_loaded_models = []
    mm.interrupt_processing = False
    mm.load_calls = []  # (patcher, memory_required, force_full_load): what the nodes asked for

    def get_torch_device():
        return torch.device("cpu")

    def unet_offload_device():
        return torch.device("cpu")

    def intermediate_device():
        return torch.device("cpu")

    def is_device_cpu(device) -> bool:
        return torch.device(device).type == "cpu"

    def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False) -> bool:
        return False

    def throw_exception_if_processing_interrupted():
        if mm.interrupt_processing:
            mm.interrupt_processing = False
            raise InterruptProcessingException()

    def load_models_gpu(
        models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False
    ):
        for patcher in models:
            mm.load_calls.append((patcher, memory_required, force_full_load))
            # ComfyUI unloads other clones of the same module before loading this one.
            for lm in list(mm.current_loaded_models):
                if lm.model is not patcher and lm.model.model is patcher.model:
                    lm.model.unpatch_model(lm.model.offload_device)
                    mm.current_loaded_models.remove(lm)
            if not any(lm.model is patcher for lm in mm.current_loaded_models):
                patcher.patch_model(patcher.load_device)
                mm.current_loaded_models.insert(0, _LoadedModel(patcher))

    def soft_empty_cache(force=False):
        return None

    mm.free_vram = 24 * 2**30  # what get_free_memory reports; tests set it
    mm.reserved_vram = 400 * 2**20  # ComfyUI's default reserve on Linux; --reserve-vram sets it

    def extra_reserved_memory():
        return mm.reserved_vram

    mm.free_calls = []  # (memory_required, device): room the nodes asked ComfyUI to make

    def get_free_memory(dev=None, torch_free_too=False):
        return (mm.free_vram, mm.free_vram) if torch_free_too else mm.free_vram

    def free_memory(memory_required, device, keep_loaded=[]):  # noqa: B006 - ComfyUI's signature
        mm.free_calls.append((memory_required, device))
        return []

    mm.get_torch_device = get_torch_device
    mm.unet_offload_device = unet_offload_device
    mm.intermediate_device = intermediate_device
    mm.is_device_cpu = is_device_cpu
    mm.should_use_bf16 = should_use_bf16
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.load_models_gpu = load_models_gpu
    mm.soft_empty_cache = soft_empty_cache
    mm.get_free_memory = get_free_memory
    mm.extra_reserved_memory = extra_reserved_memory
    mm.free_memory = free_memory
    return mm


def _get_attr(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set_param(obj, key: str, value: torch.Tensor) -> None:
    *parents, last = key.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, torch.nn.Parameter(value, requires_grad=False))


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size
        self.patches: dict[str, list] = {}
        self.backup: dict[str, torch.Tensor] = {}
        self.parent = None
        self.model_options = {"transformer_options": {}}
        if not hasattr(model, "device"):
            model.device = offload_device

    def model_size(self) -> int:
        if self.size <= 0:
            self.size = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        return self.size

    def clone(self) -> ModelPatcher:
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.backup = self.backup  # shared, as in ComfyUI: the module's original weights
        n.parent = self
        return n

    def is_clone(self, other) -> bool:
        return getattr(other, "model", None) is self.model

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        model_sd = self.model.state_dict()
        added = []
        for key, value in patches.items():
            if key in model_sd:
                self.patches.setdefault(key, []).append((strength_patch, value, strength_model, None, None))
                added.append(key)
        return added

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        for key, plist in self.patches.items():
            weight = _get_attr(self.model, key)
            if key not in self.backup:
                self.backup[key] = weight.detach().clone()
            out = self.backup[key].float().clone()
            for strength, value, strength_model, _offset, _fn in plist:
                out = out * strength_model
                out = value.calculate_weight(out, key, strength, strength_model, None, None)
            _set_param(self.model, key, out.to(weight.dtype))
        if device_to is not None:
            self.model.to(device_to)
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True) -> None:
        for key in list(self.backup):
            _set_param(self.model, key, self.backup.pop(key))
        if device_to is not None:
            self.model.to(device_to)


class LoRAAdapter:
    """comfy.weight_adapter.LoRAAdapter's maths for plain (up, down, alpha) LoRAs."""

    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    def calculate_weight(
        self,
        weight,
        key,
        strength,
        strength_model,
        offset,
        function,
        intermediate_dtype=torch.float32,
        original_weight=None,
    ):
        up, down, alpha = self.weights[0], self.weights[1], self.weights[2]
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = (up.float().flatten(1) @ down.float().flatten(1)).reshape(weight.shape)
        return weight + strength * scale * diff.to(weight.dtype)


def load_lora(lora: dict, to_load: dict, log_missing: bool = True) -> dict:
    patch_dict = {}
    for prefix, model_key in to_load.items():
        up = lora.get(f"{prefix}.lora_B.weight")
        down = lora.get(f"{prefix}.lora_A.weight")
        if up is None or down is None:
            continue
        alpha = lora.get(f"{prefix}.alpha")
        alpha = float(alpha.item()) if alpha is not None else None
        patch_dict[model_key] = LoRAAdapter(
            {f"{prefix}.lora_B.weight", f"{prefix}.lora_A.weight"}, (up, down, alpha, None, None, None)
        )
    return patch_dict


class ProgressBar:
    """comfy.utils.ProgressBar; records updates (the server's hook is where Cancel raises)."""

    instances: list[ProgressBar] = []

    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.updates: list[tuple[int, int, Any]] = []
        ProgressBar.instances.append(self)

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        self.updates.append((self.current, self.total, preview))
        sys.modules["comfy.model_management"].throw_exception_if_processing_interrupted()

    def update(self, value):
        self.update_absolute(self.current + value)


class SD3LatentFormat:
    latent_channels = 16

    def __init__(self):
        self.scale_factor = 1.5305
        self.shift_factor = 0.0609
        self.latent_rgb_factors = None
        self.latent_rgb_factors_bias = None
        self.taesd_decoder_name = "taesd3_decoder"

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent):
        return (latent / self.scale_factor) + self.shift_factor


# --------------------------------------------------------------------------------------------
# folder_paths, latent_preview
# --------------------------------------------------------------------------------------------


def _folder_paths(models_dir: str) -> types.ModuleType:

    fp = types.ModuleType("folder_paths")
    fp.models_dir = models_dir
    fp.supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
    fp.folder_names_and_paths = {
        name: ([os.path.join(models_dir, sub)], fp.supported_pt_extensions)
        for name, sub in (
            ("checkpoints", "checkpoints"),
            ("loras", "loras"),
            ("vae", "vae"),
            ("diffusion_models", "diffusion_models"),
            ("text_encoders", "text_encoders"),
        )
    }
    fp.folder_names_and_paths["diffusers"] = ([os.path.join(models_dir, "diffusers")], ["folder"])

    def get_folder_paths(folder_name):
        return fp.folder_names_and_paths[folder_name][0][:]

    def get_filename_list(folder_name):
        paths, exts = fp.folder_names_and_paths[folder_name]
        out = []
        for base in paths:
            if not os.path.isdir(base):
                continue
            for root, _dirs, files in os.walk(base, followlinks=True):
                for f in files:
                    if not exts or os.path.splitext(f)[1].lower() in exts:
                        out.append(os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/"))
        return sorted(out)

    def get_full_path(folder_name, filename):
        for base in fp.folder_names_and_paths[folder_name][0]:
            p = os.path.join(base, filename)
            if os.path.isfile(p):
                return p
        return None

    def get_full_path_or_raise(folder_name, filename):
        p = get_full_path(folder_name, filename)
        if p is None:
            raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
        return p

    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.get_full_path_or_raise = get_full_path_or_raise
    fp.get_temp_directory = lambda: os.path.join(models_dir, "..", "temp")
    return fp


class _RecordingPreviewer:
    def __init__(self):
        self.calls = 0

    def decode_latent_to_preview_image(self, preview_format, x0):
        self.calls += 1
        return ("JPEG", None, 512)


# --------------------------------------------------------------------------------------------
# install / uninstall
# --------------------------------------------------------------------------------------------

_NAMES = (
    "comfy",
    "comfy.model_management",
    "comfy.model_patcher",
    "comfy.utils",
    "comfy.lora",
    "comfy.weight_adapter",
    "comfy.latent_formats",
    "comfy.model_base",
    "comfy.patcher_extension",
    "node_helpers",
    "comfy_api",
    "comfy_api.latest",
    "folder_paths",
    "latent_preview",
)


def install(models_dir: str) -> types.SimpleNamespace:
    taken = [n for n in _NAMES if n in sys.modules]
    if taken:
        raise RuntimeError(f"refusing to shadow real modules {taken}: the node tests need ComfyUI absent")
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    mm = _model_management()
    patcher_mod = types.ModuleType("comfy.model_patcher")
    patcher_mod.ModelPatcher = ModelPatcher
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    lora = types.ModuleType("comfy.lora")
    lora.load_lora = load_lora
    weight_adapter = types.ModuleType("comfy.weight_adapter")
    weight_adapter.LoRAAdapter = LoRAAdapter
    latent_formats = types.ModuleType("comfy.latent_formats")
    latent_formats.SD3 = SD3LatentFormat
    model_base = types.ModuleType("comfy.model_base")
    model_base.SD3 = type("SD3", (torch.nn.Module,), {})  # ComfyUI's SD3 model class (isinstance checks)
    patcher_extension = types.ModuleType("comfy.patcher_extension")
    patcher_extension.WrappersMP = types.SimpleNamespace(APPLY_MODEL="apply_model")
    node_helpers = types.ModuleType("node_helpers")

    def conditioning_set_values(conditioning, values=None):
        return [[t[0], {**t[1], **(values or {})}] for t in conditioning]

    node_helpers.conditioning_set_values = conditioning_set_values
    for name, mod in (
        ("model_base", model_base),
        ("patcher_extension", patcher_extension),
        ("model_management", mm),
        ("model_patcher", patcher_mod),
        ("utils", utils),
        ("lora", lora),
        ("weight_adapter", weight_adapter),
        ("latent_formats", latent_formats),
    ):
        setattr(comfy, name, mod)

    comfy_api = types.ModuleType("comfy_api")
    comfy_api.__path__ = []
    latest = types.ModuleType("comfy_api.latest")
    latest.io = _io_module()
    latest.ui = types.SimpleNamespace(PreviewImage=_PreviewImage, PreviewMask=_PreviewMask)
    latest.ComfyExtension = ComfyExtension
    comfy_api.latest = latest

    previewers: list[_RecordingPreviewer] = []
    preview = types.ModuleType("latent_preview")

    def get_previewer(device, latent_format):
        previewers.append(_RecordingPreviewer())
        return previewers[-1]

    preview.get_previewer = get_previewer
    fp = _folder_paths(models_dir)

    modules = {
        "comfy": comfy,
        "comfy.model_management": mm,
        "comfy.model_patcher": patcher_mod,
        "comfy.utils": utils,
        "comfy.lora": lora,
        "comfy.weight_adapter": weight_adapter,
        "comfy.latent_formats": latent_formats,
        "comfy.model_base": model_base,
        "comfy.patcher_extension": patcher_extension,
        "node_helpers": node_helpers,
        "comfy_api": comfy_api,
        "comfy_api.latest": latest,
        "folder_paths": fp,
        "latent_preview": preview,
    }
    sys.modules.update(modules)
    ProgressBar.instances.clear()
    return types.SimpleNamespace(
        mm=mm, folder_paths=fp, io=latest.io, ProgressBar=ProgressBar, previewers=previewers, modules=modules
    )


def uninstall() -> None:
    for name in _NAMES:
        sys.modules.pop(name, None)
