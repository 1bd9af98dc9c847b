"""HairDiff's ComfyUI nodes (V3 API). Imported by the pack root's ``comfy_entrypoint``.

Imports are relative: ComfyUI loads the pack by file path and never puts it on ``sys.path``
(and has a top-level ``nodes`` module of its own).
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .image_nodes import HairMatte, SketchPreprocess
from .model_folders import register_model_folder
from .native_nodes import NATIVE_NODES
from .native_reference import REFERENCE_NODES
from .template_inputs import install_template_inputs
from .text_nodes import HairDiffPrompt

#: One way in ComfyUI: preprocessing, then patches, conditioning and a SAMPLER on ComfyUI's own model.
NODES: list[type[io.ComfyNode]] = [
    SketchPreprocess,
    HairMatte,
    HairDiffPrompt,
    *NATIVE_NODES,
    *REFERENCE_NODES,
]

register_model_folder()
install_template_inputs()


class HairDiffExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> HairDiffExtension:
    return HairDiffExtension()
