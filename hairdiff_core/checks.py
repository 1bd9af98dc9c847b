"""Up-front checks of settings: one place for the CLI, the Python API and the nodes.

Every setting a user gives is checked here *before* any model is loaded (for SD3.5 that is
several GB): type, finiteness and range of numbers, the device, the dtype name. The checks
raise ``SettingsError`` whose message names the setting, the value given, the allowed range
and, where it helps, the fix; its ``input`` is the Python argument name.

``check_generate_settings`` is what ``HairDiffPipeline.generate`` and ``hairdiff generate/eval``
run; ``parse_dtype`` is the one dtype-name map; ``check_device`` the one device check.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from typing import Any

from .errors import SettingsError

#: The largest seed: the ComfyUI node's maximum and torch's generator range.
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class Bound:
    """Allowed values of one numeric setting.

    Args:
        label: how messages name it (neutral: the CLI flag is ``--`` + dashes of the Python name).
        integer: whole numbers only.
        lo, hi: inclusive bounds (``None``: unbounded).
        lo_open: ``lo`` itself is excluded.
        hint: what the setting means, added to the message.
    """

    label: str
    integer: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hint: str = ""

    def describe(self) -> str:
        kind = "a whole number" if self.integer else "a number"
        if self.lo is not None and self.hi is not None:
            left = f"above {_fmt(self.lo)}" if self.lo_open else f"from {_fmt(self.lo)}"
            return f"{kind} {left} {'up ' if self.lo_open else ''}to {_fmt(self.hi)}"
        if self.lo is not None:
            return f"{kind} {'above' if self.lo_open else 'of at least'} {_fmt(self.lo)}"
        if self.hi is not None:
            return f"{kind} of at most {_fmt(self.hi)}"
        return f"a finite {kind[2:] if kind.startswith('a ') else kind}"


def _fmt(v) -> str:
    if isinstance(v, int):
        return str(v)
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(v)


#: Bounds of the sampling settings (Python argument name -> bound). Size-like settings are
#: bounded so that nothing they size can exhaust memory; the image size bounds them further.
GENERATE_BOUNDS: dict[str, Bound] = {
    "steps": Bound("steps", integer=True, lo=1, hi=1000, hint="sampling steps; SD3.5: 28, Turbo: 4-8"),
    "seed": Bound("seed", integer=True, lo=0, hi=MAX_SEED),
    "strength": Bound("strength", lo=0.0, hi=1.0, hint="denoise strength"),
    "cfg": Bound("cfg", lo=0.0, hi=100.0, hint="guidance scale, 1 = off"),
    # Below 0.01 the schedule's sigmas underflow (1e-300 ends in NaN), which the NaN check
    # would otherwise blame on the weights.
    "shift": Bound("shift", lo=0.01, hi=100.0, lo_open=True, hint="flow-match schedule shift, SD3: 3"),
    "feather_sigma": Bound("feather", lo=0.0, hi=1024.0, hint="feather sigma in px at 1024 px, default 10"),
    "context_margin": Bound("margin", lo=0.0, hi=16.0, hint="context around the matte, a fraction of its size"),
    "matte_threshold": Bound("matte threshold", lo=0.0, hi=0.999, hint="matte values above it are hair"),
    "style_weight": Bound(
        "style weight", lo=0.0, hi=100.0, hint="how strongly the new hair sees the style photo's hair, 1 = as its own"
    ),
    "work_size": Bound(
        "work size", integer=True, lo=16, hi=4096, hint="side of the working area in px, a multiple of 16; SD3.5: 1024"
    ),
}


def check_number(value: Any, bound: Bound, input: str | None = None):
    """``value`` as an int or float within ``bound``, or ``SettingsError`` naming it.

    Refuses bools, strings ("2" is not 2: the API takes numbers, the CLI parses them), None,
    NaN and infinities.
    """
    name = input or bound.label
    extra = f" ({bound.hint})" if bound.hint else ""

    def refuse(shown: str):
        return SettingsError(f"{bound.label} must be {bound.describe()}, got {shown}{extra}", input=name)

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise refuse(f"{value!r} (a {type(value).__name__})")
    if bound.integer:
        if isinstance(value, numbers.Integral):
            value = int(value)
        elif math.isfinite(float(value)) and float(value).is_integer():
            value = int(value)
        else:
            raise refuse(repr(value))
    else:
        value = float(value)
        if not math.isfinite(value):
            raise refuse(repr(value))
    below = bound.lo is not None and (value <= bound.lo if bound.lo_open else value < bound.lo)
    above = bound.hi is not None and value > bound.hi
    if below or above:
        raise refuse(_fmt(value))
    return value


def check_generate_settings(**settings: Any) -> dict[str, Any]:
    """Check sampling settings by their ``generate`` argument names; returns them normalised.

    ``None`` means "the default" for ``feather_sigma`` and ``work_size``. ``work_size`` must
    also be a multiple of 16 (the VAE's 8 x the transformer's 2x2 patches).
    """
    out = dict(settings)
    for name, value in settings.items():
        bound = GENERATE_BOUNDS.get(name)
        if bound is None or (value is None and name in ("feather_sigma", "work_size")):
            continue
        out[name] = check_number(value, bound, input=name)
    ws = out.get("work_size")
    if ws is not None and ws % 16:
        raise SettingsError(
            f"work size must be a multiple of 16, got {ws}; e.g. {max(16, round(ws / 16) * 16)}", input="work_size"
        )
    return out


# -- dtype names ----------------------------------------------------------------------------
#: The one map of precision names (CLI flags, node options, config files) to torch dtypes.
DTYPE_NAMES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
}


def parse_dtype(value: Any, input: str = "dtype"):
    """A torch dtype from a name ("fp32", "bf16", "fp16", or torch's names) or a torch dtype."""
    import torch

    if isinstance(value, torch.dtype):
        if value in (torch.float32, torch.bfloat16, torch.float16):
            return value
        raise SettingsError(
            f"dtype {value} is not a float precision HairDiff runs in; use fp32, bf16 or fp16", input=input
        )
    if isinstance(value, str) and value.lower() in DTYPE_NAMES:
        return getattr(torch, DTYPE_NAMES[value.lower()])
    raise SettingsError(f"unknown dtype {value!r}; use fp32, bf16 or fp16 (or a torch float dtype)", input=input)


def dtype_name(dtype) -> str:
    """The short name ("fp32", "bf16", "fp16") of a torch float dtype."""
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(dtype).replace("torch.", ""), str(dtype))


# -- devices --------------------------------------------------------------------------------
def check_device(device: Any, input: str = "device"):
    """A usable ``torch.device`` from a name or device; refuses unknown names and missing GPUs."""
    import torch

    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, TypeError, ValueError):
        raise SettingsError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps", input=input) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(
                f"device {device!r} asked for, but this torch sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                f"use --device cpu or install a CUDA build of torch",
                input=input,
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise SettingsError(
                f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}", input=input
            )
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SettingsError(f"device {device!r}: MPS is not available here; use --device cpu", input=input)
    elif dev.type != "cpu":
        raise SettingsError(f"device {device!r}: HairDiff runs on cpu, cuda or mps", input=input)
    return dev


# -- typed fields of file headers -------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: What a header field may be -> its test. JSON has no int/float distinction of its own, so a
#: "2.0" written by another tool is not an integer either: shapes are built from these.
HEADER_KINDS = {
    "an integer": _is_int,
    "a number": lambda v: _is_int(v) or (isinstance(v, float) and math.isfinite(v)),
    "true or false": lambda v: isinstance(v, bool),
    "a string": lambda v: isinstance(v, str),
    "an object": lambda v: isinstance(v, dict),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a list of integers": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
}


def json_kind(value: Any) -> str:
    """How a message names a header value's JSON type: "a string ('32')", "null"..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, list):
        return f"a list ({json.dumps(value)[:40]})"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def header_field(
    header: Any,
    key: str,
    expected: str,
    source: str,
    error: type[Exception],
    fix: str,
    prefix: str = "",
    required: bool = True,
) -> Any:
    """``header[key]`` when it is of the ``expected`` kind (a key of ``HEADER_KINDS``); else
    ``error`` naming the file, the field, what it is and what it should be: a field of the wrong
    type is not reported as missing. A missing optional field is None."""
    if key not in header:
        if not required:
            return None
        raise error(f"{source}: header field '{prefix}{key}' is missing ({expected}); {fix}")
    value = header[key]
    if not HEADER_KINDS[expected](value):
        raise error(f"{source}: header field '{prefix}{key}' is {json_kind(value)}, expected {expected}; {fix}")
    return value
