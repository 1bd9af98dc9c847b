"""The settings of one generation, in one object, validated once.

The command line (``hairdiff generate``, its preflight), evaluation and Python callers describe a
generation with the same dozen sampling settings; ``GenerateSettings`` holds them, checks every
one when it is made (the ranges and messages of ``checks.GENERATE_BOUNDS``; an unknown method; a
reference given by name, dict or object becomes a ``ReferenceSettings``), and is what
``HairDiffPipeline.generate(settings=...)`` runs. A frozen dataclass: ``replace`` gives a changed,
re-validated copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .checks import check_generate_settings
from .defaults import DEFAULTS
from .errors import InputError

#: The sampling methods: HairDiff's soft-mask sampler and the latent-replacement baseline.
METHODS = ("joint", "replace")


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    """Every sampling setting of one ``generate`` call (see its docstring for each)."""

    steps: int = DEFAULTS.steps
    seed: int = DEFAULTS.seed
    strength: float = DEFAULTS.strength
    cfg: float = DEFAULTS.cfg
    shift: float = DEFAULTS.shift
    method: str = "joint"
    reference: Any = None
    feather_sigma: float | None = None
    matte_threshold: float = DEFAULTS.matte_threshold
    paste_back: bool = True
    work_size: int | None = None
    context_margin: float = DEFAULTS.context_margin
    #: The style photo's weight (``generate(style_image=...)``; the photo itself is an input).
    style_weight: float = DEFAULTS.style_weight

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {sorted(METHODS)}", input="method")
        checked = check_generate_settings(
            steps=self.steps,
            seed=self.seed,
            strength=self.strength,
            cfg=self.cfg,
            shift=self.shift,
            feather_sigma=self.feather_sigma,
            matte_threshold=self.matte_threshold,
            work_size=self.work_size,
            context_margin=self.context_margin,
            style_weight=self.style_weight,
        )
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if self.reference is not None:
            from .method.reference import ReferenceSettings  # torch: only once a reference is given

            object.__setattr__(self, "reference", ReferenceSettings.coerce(self.reference))
        object.__setattr__(self, "paste_back", bool(self.paste_back))

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> GenerateSettings:
        """A copy with ``changes``, validated like a new one."""
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as ``generate``'s keyword arguments."""
        return {name: getattr(self, name) for name in self.fields()}
