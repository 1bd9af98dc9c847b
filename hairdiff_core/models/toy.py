"""The toy model family: a small SD3-shaped transformer and VAE *trained* on synthetic portraits.

Where the tiny model (:mod:`hairdiff_core.models.tiny`) is random and draws noise, the toy model draws:
its autoencoder has the SD3 VAE's interface (diffusers ``AutoencoderKL``, 16 latent channels,
factor 8, scale/shift in its config) and reconstructs the synthetic portraits of
``training/synthetic.py``; its transformer (``SD3Transformer2DModel``, 16 input channels) was
pre-trained as a plain flow-matching image model on them, the stand-in for stock SD3.5; and a
HairDiff adapter was trained on top by ``hairdiff train`` exactly as for SD3.5. So the whole
train -> adapter -> generate loop can be seen working on a CPU, on synthetic data only.

The weights ship in ``hairdiff_core/assets/toy/`` (float16 safetensors, read as float32) and are
reproduced by ``tools/make_toy.py``.
"""

from __future__ import annotations

import contextlib
import logging
from importlib import resources
from pathlib import Path

import torch

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

#: The one line that says what the toy model is, wherever it is used (run-time log, the demo's
#: contact sheet): on a real photo it gives a striped smudge, which otherwise reads as a failure.
LABEL = (
    "built-in TOY model: trained on synthetic portraits only, it draws synthetic striped hair, not real hair "
    "(real results need SD3.5 and a trained adapter)"
)

TOY_TRANSFORMER_CONFIG = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 3,
    "joint_attention_dim": 32,
    "caption_projection_dim": 96,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 32,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}

#: scaling_factor / shift_factor are placeholders here: make_toy.py measures them on the
#: training latents (as SD3's were measured) and the shipped file's metadata carries them.
TOY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 16,
    # One group: with few channels per group GroupNorm acts as instance norm and loses each
    # image's colour; make_toy.py's linear start relies on one group too.
    "norm_num_groups": 1,
    "sample_size": 128,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}

#: The toy model's natural working size in pixels (its training resolution).
TOY_WORK_SIZE = 128

TRANSFORMER_FILE = "toy_transformer.safetensors"
VAE_FILE = "toy_vae.safetensors"
ADAPTER_FILE = "toy_adapter.safetensors"


_override: Path | None = None


def asset_dir() -> Path:
    """The folder of the shipped toy weights (inside the installed package)."""
    if _override is not None:
        return _override
    # The assets are the core's (the demo's samples live beside them), one room up; by module,
    # not by name: inside ComfyUI the core is a subpackage of the pack, not "hairdiff_core".
    from .. import assets

    return Path(str(resources.files(assets).joinpath("toy")))


@contextlib.contextmanager
def asset_override(folder):
    """Read the toy weights from ``folder`` instead of the package (tools/make_toy.py trains
    the adapter on a freshly built base before it is installed)."""
    global _override
    previous, _override = _override, Path(folder)
    try:
        yield
    finally:
        _override = previous


def adapter_path() -> Path:
    """The shipped HairDiff adapter trained on the toy base."""
    return asset_dir() / ADAPTER_FILE


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ModelLoadError(
            f"the toy model's weights {path} are missing; reinstall hairdiff, or rebuild them with "
            f"python tools/make_toy.py"
        )
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        for key in f.keys():
            tensors[key] = f.get_tensor(key).float()
    return tensors, meta


def build_toy_transformer(state_dict: dict[str, torch.Tensor] | None = None):
    """An ``SD3Transformer2DModel`` with the toy config (random init unless ``state_dict``)."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**TOY_TRANSFORMER_CONFIG)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def build_toy_vae(
    state_dict: dict[str, torch.Tensor] | None = None, scaling_factor: float = 1.0, shift_factor: float = 0.0
):
    """An ``AutoencoderKL`` with the toy config and the given SD3-style scale/shift."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        **{**TOY_VAE_CONFIG, "scaling_factor": float(scaling_factor), "shift_factor": float(shift_factor)}
    )
    if state_dict is not None:
        vae.load_state_dict(state_dict, strict=True)
    return vae.eval()


def load_toy_transformer(dtype: torch.dtype = torch.float32):
    """The shipped, pre-trained toy transformer (16 input channels, stock: no adapter)."""
    tensors, _ = _read(asset_dir() / TRANSFORMER_FILE)
    model = build_toy_transformer(tensors)
    return model if dtype == torch.float32 else model.to(dtype=dtype)


def load_toy_vae(dtype: torch.dtype = torch.float32):
    """The shipped toy autoencoder, its scale/shift read from the file's metadata."""
    tensors, meta = _read(asset_dir() / VAE_FILE)
    vae = build_toy_vae(tensors, float(meta.get("scaling_factor", 1.0)), float(meta.get("shift_factor", 0.0)))
    return vae if dtype == torch.float32 else vae.to(dtype=dtype)


def save_half(module: torch.nn.Module, path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``module``'s weights as float16 safetensors (how the toy weights ship: small)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata=metadata or {})
    return path
