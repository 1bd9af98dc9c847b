"""HairDiff Prompt: a text prompt -> SD3 CONDITIONING, with the tiny wiring-check encoders or
SD3's files in ``models/text_encoders`` (for real use ComfyUI's own Triple CLIP Loader + CLIP Text
Encode give the same CONDITIONING)."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..hairdiff_core.errors import HairDiffError
from .convert import check_combos, node_error

logger = logging.getLogger(__name__)

TINY = "tiny (wiring check)"
SD3_FILES = "sd3 files (models/text_encoders)"


class HairDiffPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_Prompt",
            display_name="HairDiff Prompt",
            category="HairDiff/conditioning",
            description=(
                "Describe the hair in words (a colour, a texture) for the HairDiff Sampler's positive or negative "
                "input. 'tiny' needs no files and goes with the tiny model; for SD3.5 pick the files in "
                "models/text_encoders, or use ComfyUI's Triple CLIP Loader + CLIP Text Encode."
            ),
            inputs=[
                io.String.Input(
                    "text",
                    default="copper red hair",
                    multiline=True,
                    tooltip="What the new hair should look like, e.g. 'platinum blonde hair' or "
                    "'glossy black curls'. Leave empty for a neutral prompt.",
                ),
                io.Combo.Input(
                    "encoders",
                    options=[TINY, SD3_FILES],
                    default=TINY,
                    tooltip="tiny = built-in random encoders for the tiny model (a wiring check); sd3 files = "
                    "clip_l, clip_g and (optional) t5xxl .safetensors from models/text_encoders.",
                ),
            ],
            outputs=[
                io.Conditioning.Output(
                    "conditioning",
                    display_name="conditioning",
                    tooltip="SD3 conditioning for the HairDiff Sampler's positive or negative input.",
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, encoders=None) -> bool | str:
        return check_combos(cls, {"encoders": encoders})

    @classmethod
    def execute(cls, text="", encoders=TINY) -> io.NodeOutput:
        from ..hairdiff_core.models.text import PromptCache
        from ..hairdiff_core.models.text_encoders import TextEncoderSource, load_text_encoders

        node = "HairDiff Prompt"
        if encoders == TINY:
            source = TextEncoderSource(tiny=True)
        else:
            import folder_paths

            folders = [p for p in folder_paths.get_folder_paths("text_encoders")]
            source = TextEncoderSource(folder=folders[0] if folders else None)
        import torch

        # On a GPU the encoders run in bf16 (T5-XXL ~9 GB) and are freed right after encoding.
        device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
        try:
            embeds, pooled = PromptCache().encode(
                [text], lambda: load_text_encoders(source, device=device, dtype=dtype)
            )[text]
        except HairDiffError as exc:
            raise node_error(node, "encoders", exc) from exc
        return io.NodeOutput([[embeds, {"pooled_output": pooled}]])
