"""The model families HairDiff knows: their names, their shipped diffusers configs and the keys
that identify an architecture.

One registry, read by loading (which family a file is), adapters (which family an adapter was
trained on), the memory estimate (how big a family's blocks are) and the benches. It lives apart
from ``loading`` so that ``memory`` and ``adapter`` can read it without importing the loader
(``loading`` itself imports ``memory`` to place weights: reading the registry from ``loading``
made the two modules import each other). Light to import: json and the shipped files only.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

#: Human names of the families ``identify_transformer`` returns.
FAMILY_NAMES = {
    "sd3.5-large": "SD3.5 Large",
    "sd3.5-large-turbo": "SD3.5 Large Turbo",
    "sd3.5-medium": "SD3.5 Medium",
    "sd3-medium": "SD3 Medium",
    "tiny": "HairDiff tiny",
    "toy": "HairDiff toy",
    "custom": "custom SD3-shaped",
}

#: Shipped transformer configs (Large Turbo uses the Large one: same architecture).
TRANSFORMER_CONFIG_FILES = {
    "sd3.5-large": "sd3.5-large-transformer.json",
    "sd3.5-medium": "sd3.5-medium-transformer.json",
    "sd3-medium": "sd3-medium-transformer.json",
}
VAE_CONFIG_FILE = "sd3-vae.json"

#: The 13 ``SD3Transformer2DModel.__init__`` keys.
TRANSFORMER_CONFIG_KEYS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "pos_embed_max_size",
    "dual_attention_layers",
    "qk_norm",
)
# What identifies an architecture; sample_size only sets a default size and in_channels is 16
# (stock) or 32 (widened for HairDiff) within one family.
ARCH_KEYS = tuple(k for k in TRANSFORMER_CONFIG_KEYS if k not in ("sample_size", "in_channels"))

# --------------------------------------------------------------------------------------------
# Shipped configs


def shipped_config(filename: str) -> dict[str, Any]:
    """Return a config shipped in ``hairdiff_core/models/configs`` (``_``-keys dropped, lists kept)."""
    # Relative to this package: inside ComfyUI the core is a subpackage of the pack, not "hairdiff_core".
    text = resources.files(__package__).joinpath("configs", filename).read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def transformer_config(family: str) -> dict[str, Any]:
    """The diffusers config of a known model family (``FAMILY_NAMES``): the shipped SD3/SD3.5
    configs, or the built-in tiny and toy models'. One registry for loading, adapters, memory
    estimates and the benches."""
    if family == "tiny":
        from .tiny import TINY_TRANSFORMER_CONFIG

        config = dict(TINY_TRANSFORMER_CONFIG)
    elif family == "toy":
        from .toy import TOY_TRANSFORMER_CONFIG

        config = dict(TOY_TRANSFORMER_CONFIG)
    else:
        config = shipped_config(TRANSFORMER_CONFIG_FILES[family])
    config["dual_attention_layers"] = tuple(config.get("dual_attention_layers") or ())
    config.setdefault("qk_norm", None)
    return config
