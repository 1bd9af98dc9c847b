"""The sampling defaults, written once.

The pipeline's keyword defaults, the CLI flags, the ComfyUI sampler node, evaluation and
training all read :data:`DEFAULTS`, so that "28 steps, shift 3.0, feather 10 px at 1024" cannot
drift apart between the entry points.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingDefaults:
    #: Euler steps of the flow-match schedule (SD3.5 Large's published default).
    steps: int = 28
    #: Flow-match schedule shift (SD3's scheduler config).
    shift: float = 3.0
    #: Classifier-free guidance scale; 1 = off, one model call per step (training uses zero text).
    cfg: float = 1.0
    #: Denoise strength: 1 = the hair region starts from pure noise.
    strength: float = 1.0
    seed: int = 0
    #: Soft-mask feather sigma in px at a 1024-px working size (scaled with the working size).
    feather_at_1024: float = 10.0
    #: A matte pixel is hair above this value.
    matte_threshold: float = 0.5
    #: Context box margin around the matte, as a fraction of the matte's size.
    context_margin: float = 0.25
    #: Weight of the style photo's hair keys for the new hair's queries (0 = the style photo is
    #: ignored; 1 = like the image's own keys; up to 100 like the reference weights).
    style_weight: float = 1.0
    #: The largest photo (or sketch, matte) read, in megapixels, checked from the file's header
    #: before decoding. 120 MP takes 100-108 MP camera and phone sensors; each 100 MP costs
    #: about 4 GB of RAM in a run (float pixels, result and masks at full size).
    max_megapixels: float = 120.0


DEFAULTS = SamplingDefaults()
