"""Preprocessing nodes: Sketch Preprocess and Hair Matte (pure tensor work, no model)."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io, ui

from ..hairdiff_core.errors import HairDiffError
from ..hairdiff_core.imageops import resize_same_aspect
from ..hairdiff_core.method import mask as M
from .convert import check_batch, check_combos, image_to_nchw, mask_to_nchw, nchw_to_image, nchw_to_mask, node_error

logger = logging.getLogger(__name__)

CATEGORY = "HairDiff/preprocess"
MAX_PX = 256


def _intermediate():
    import comfy.model_management as mm

    return mm.intermediate_device()


def _resize_to(x: torch.Tensor, size: tuple[int, int], node: str, what: str, ref: str, mode: str) -> torch.Tensor:
    try:
        out = resize_same_aspect(x, size, what, f"'{ref}'", mode)
    except HairDiffError as exc:
        raise node_error(node, what, exc) from exc
    return out if mode == "nearest" else out.clamp(0, 1)


def _thicken(rgb: torch.Tensor, alpha: torch.Tensor, px: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow strokes by ``px``: strokes are colour on black, so a max filter spreads each colour."""
    if px <= 0:
        return rgb, alpha
    return M.dilate(rgb, px), M.dilate(alpha, px)


class SketchPreprocess(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_SketchPreprocess",
            display_name="HairDiff Sketch Preprocess",
            category=CATEGORY,
            description=(
                "Turns any sketch (pencil on white, chalk on black, coloured strokes, or a transparent "
                "PNG) into HairDiff's canonical form: strokes in their own colour on black. Optionally "
                "thickens strokes and resizes the sketch to the photo. Shows the result."
            ),
            inputs=[
                io.Image.Input(
                    "sketch", tooltip="The sketch image: strokes on a plain background (white, black or transparent)."
                ),
                io.Combo.Input(
                    "background",
                    options=list(M.SKETCH_BACKGROUNDS),
                    default="auto",
                    tooltip="The sketch's background: auto detects it from the image border; light = "
                    "strokes drawn on white paper, dark = strokes on black.",
                ),
                io.Boolean.Input(
                    "invert",
                    default=False,
                    tooltip="Invert the sketch's values before anything else (for a negative scan).",
                ),
                io.Float.Input(
                    "threshold",
                    default=0.2,
                    min=0.01,
                    max=0.99,
                    step=0.01,
                    tooltip="Colour distance from the background above which a pixel counts as a stroke; "
                    "higher ignores faint marks and paper texture, lower keeps light strokes.",
                ),
                io.Int.Input(
                    "thickness_px",
                    default=0,
                    min=0,
                    max=MAX_PX,
                    tooltip="Grow every stroke by this many pixels (at the sketch's size); thin pen lines "
                    "from a tablet often need 1-3 px to survive the 8x downsampling of the VAE.",
                ),
                io.Image.Input(
                    "photo",
                    optional=True,
                    tooltip="Optional: the photo; the sketch is resized to its size (same aspect ratio required).",
                ),
            ],
            outputs=[
                io.Image.Output(
                    "canonical_sketch",
                    display_name="sketch",
                    tooltip="Strokes in their colour on black, the form the sampler encodes.",
                ),
                io.Mask.Output("strokes", display_name="strokes", tooltip="Where the strokes are (1) and are not (0)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, background=None) -> bool | str:
        return check_combos(cls, {"background": background})

    @classmethod
    def execute(
        cls, sketch, background="auto", invert=False, threshold=0.2, thickness_px=0, photo=None
    ) -> io.NodeOutput:
        node = "HairDiff Sketch Preprocess"
        x = image_to_nchw(sketch, node, "sketch")
        if photo is not None:
            p = image_to_nchw(photo, node, "photo")
            x = _resize_to(x, tuple(p.shape[-2:]), node, "sketch", "photo", "bilinear")
        if invert:
            rgb = 1.0 - x[:, :3]
            x = torch.cat([rgb, x[:, 3:]], 1) if x.shape[1] == 4 else rgb
        try:
            # The declared background (light/dark) is the core's option: the node only converts.
            rgb, alpha = M.normalize_sketch(x, threshold=float(threshold), declared_background=background)
        except HairDiffError as exc:
            raise node_error(node, "sketch", exc) from exc
        rgb, alpha = _thicken(rgb, alpha, int(thickness_px))
        out_image = nchw_to_image(rgb, _intermediate())
        out_mask = nchw_to_mask(alpha, _intermediate())
        return io.NodeOutput(out_image, out_mask, ui=ui.PreviewImage(out_image, cls=cls))


class HairMatte(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_HairMatte",
            display_name="HairDiff Hair Matte",
            category=CATEGORY,
            description=(
                "Makes the hair matte, the region that gets redrawn. Connect the old hair's mask, the sketch, or "
                "both: for shorter hair use both (the old hair must go, the new hair is drawn); for longer hair "
                "the sketch's outline says how far it reaches. An 'exclude' mask keeps the face (or anything "
                "else) untouched. Connect the photo to preview the matte over it."
            ),
            inputs=[
                io.Int.Input(
                    "grow_px",
                    default=0,
                    min=-MAX_PX,
                    max=MAX_PX,
                    tooltip="Grow (positive) or shrink (negative) the matte by this many pixels; grow it "
                    "when the new hair should reach past the old hairline.",
                ),
                io.Float.Input(
                    "feather_sigma",
                    default=4.0,
                    min=0.0,
                    max=100.0,
                    step=0.5,
                    tooltip="Gaussian feather of the output in pixels at the mask's size (0 = hard edge); "
                    "the sampler applies its own feather too, this mainly smooths the contour.",
                ),
                io.Float.Input(
                    "threshold",
                    default=0.5,
                    min=0.01,
                    max=0.99,
                    step=0.01,
                    tooltip="Mask values above this count as hair before growing/feathering; lower "
                    "includes soft, semi-transparent edges of a painted matte.",
                ),
                io.Int.Input(
                    "sketch_dilate_px",
                    default=16,
                    min=0,
                    max=MAX_PX,
                    tooltip="For the sketch's region: close gaps between strokes and pad the region by "
                    "this many pixels; raise it for sparse, open sketches.",
                ),
                io.Combo.Input(
                    "mode",
                    options=list(M.MATTE_MODES),
                    default="union",
                    tooltip="union = the old hair's mask plus the sketch's region (whatever is connected); "
                    "mask = the mask alone; sketch = the region the strokes outline alone.",
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="The old hair (white = hair), e.g. from a segmentation node or the mask editor.",
                ),
                io.Image.Input(
                    "sketch",
                    optional=True,
                    tooltip="The sketch: its strokes and what they enclose become part of the matte.",
                ),
                io.Mask.Input(
                    "exclude",
                    optional=True,
                    tooltip="What must stay as it is (1 = protected; from Load Image's MASK, the picture's "
                    "transparent part, what the mask editor paints): the face, eyes, a hand. Taken out of the matte "
                    "last, after growing.",
                ),
                io.Image.Input(
                    "photo", optional=True, tooltip="Optional: the photo, for the preview (the matte tinted over it)."
                ),
            ],
            outputs=[io.Mask.Output("matte", display_name="matte", tooltip="The soft hair matte (B, H, W) in [0, 1].")],
        )

    @classmethod
    def validate_inputs(cls, mode=None) -> bool | str:
        return check_combos(cls, {"mode": mode})

    @classmethod
    def execute(
        cls,
        grow_px=0,
        feather_sigma=4.0,
        threshold=0.5,
        sketch_dilate_px=16,
        mode="union",
        mask=None,
        sketch=None,
        exclude=None,
        photo=None,
    ) -> io.NodeOutput:
        node = "HairDiff Hair Matte"
        if mask is None and sketch is None:
            raise node_error(
                node,
                "mask",
                "neither 'mask' nor 'sketch' is connected",
                "connect the old hair's MASK, a sketch outlining the new hair, or both",
            )
        m = mask_to_nchw(mask, node, "mask") if mask is not None else None
        s = image_to_nchw(sketch, node, "sketch") if sketch is not None else None
        x = mask_to_nchw(exclude, node, "exclude") if exclude is not None else None
        p = image_to_nchw(photo, node, "photo") if photo is not None else None
        # LoadImage gives a 64x64 zero MASK for a picture without alpha (nothing painted yet): an
        # empty mask adds nothing to a union and an empty exclusion protects nothing.
        if m is not None and s is not None and mode == "union" and not bool(m.any()):
            logger.info("%s: the mask is empty (nothing painted); using the sketch's region", node)
            m = None
        if x is not None and not bool(x.any()):
            logger.warning(
                "%s: the exclude mask is empty, nothing is protected (Load Image's MASK is the transparent part: "
                "paint what to keep in the mask editor, or load a picture with it transparent)",
                node,
            )
            x = None
        try:
            composed = M.compose_matte(
                m,
                s,
                x,
                mode=mode,
                threshold=float(threshold),
                sketch_dilate_px=int(sketch_dilate_px),
                grow_px=int(grow_px),
                feather_px=float(feather_sigma),
                size=tuple(p.shape[-2:]) if p is not None else None,
            )
        except HairDiffError as exc:
            text = str(exc)
            bad = (
                "grow_px"
                if "shrinking" in text
                else "exclude"
                if "exclusion" in text
                else "mode"
                if "mode" in text
                else "sketch"
                if m is None or "sketch" in text.split(";")[0]
                else "mask"
            )
            raise node_error(node, bad, exc) from exc
        for line in composed.warnings:
            logger.warning("%s: %s", node, line)
        out = nchw_to_mask(composed.soft, _intermediate())
        if p is not None:
            preview = ui.PreviewImage(nchw_to_image(M.matte_preview(p, composed.soft), _intermediate()), cls=cls)
        else:
            preview = ui.PreviewMask(out, cls=cls)
        return io.NodeOutput(out, ui=preview)


__all__ = ["SketchPreprocess", "HairMatte", "check_batch"]
