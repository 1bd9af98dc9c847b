"""Regional compilation: ``torch.compile`` each transformer block, HairDiff's attention core eager.

SD3's blocks are one computation repeated, so compiling each block (instead of the whole model)
compiles once per block *kind* (joint; Medium's dual-attention blocks are a second kind) and
reuses the code for every layer: the time to first image stays small and recompiles stay rare.
That holds only while nothing per-module sits in a block's path: a diffusers hook is a
``forward`` object per module that dynamo guards on by identity (one graph per block), which is
why fp8 storage is a Linear subclass (``memory.StoredLinear``) rather than such a hook.

HairDiff's attention processor (``reference.ReferenceAttnProcessor``) keeps its attention core,
``_attend``, out of tracing (``torch.compiler.disable``): its per-call state (reference K/V
cache, gating, a new state object every step) would otherwise be guarded on and recompile per
step, and its kernels are already single fused calls (SDPA, or the grouped kernel on CUDA).
The block breaks its graph there; the norms, modulation, Q/K/V and output projections and the
feed-forward compile. Result: reference off, ``once`` and ``per_step`` run the same compiled
code, with no recompilation from step to step (tests/test_compiling.py counts the graphs).

``reference._ReferenceComplete``: the reference pass ends early by raising this exception from
the processor once the last layer's K/V are stored (nothing after it is used). It propagates
through compiled blocks like any exception (``_attend`` runs eagerly), and
``reference.reference_pass`` catches it. Forward hooks of the modules it unwinds through do not
run their post-forward part for that pass (e.g. an offload hook's "move back" of the last
block): hooks that must run should be pre-forward hooks, as block streaming's are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from collections.abc import Iterator

from ..errors import CompileError, InputError

logger = logging.getLogger(__name__)

#: ``torch.compile`` backends offered to users: inductor generates fused code (the speedup);
#: eager only traces (checks that a model compiles, in seconds, with no speedup).
COMPILE_BACKENDS = ("inductor", "eager")
#: What each backend name hands to ``torch.compile`` (the tests swap in a failing backend).
_BACKENDS: dict = {"inductor": "inductor", "eager": "eager"}
#: ``torch.compile`` modes that work with HairDiff (None = torch's default).
COMPILE_MODES = (None, "max-autotune-no-cudagraphs")


def _refuse_cuda_graphs(mode: str | None) -> None:
    if mode is not None and "reduce-overhead" in mode:
        raise InputError(
            f"compile mode {mode!r} uses CUDA graphs, which replay fixed memory while the reference "
            f"K/V cache changes per call; use the default mode or 'max-autotune-no-cudagraphs'",
            input="mode",
        )


@dataclasses.dataclass(frozen=True)
class CompileSettings:
    """How to compile the transformer's blocks for sampling (``compiled_blocks``).

    Args:
        backend: one of ``COMPILE_BACKENDS``.
        mode: one of ``COMPILE_MODES``; CUDA-graph modes (``"reduce-overhead"``) are refused:
            they replay fixed memory while the reference K/V cache changes per call.
    """

    backend: str = "inductor"
    mode: str | None = None

    def __post_init__(self) -> None:
        _refuse_cuda_graphs(self.mode)
        if self.backend not in COMPILE_BACKENDS:
            raise InputError(
                f"compile backend {self.backend!r} is not one of {', '.join(COMPILE_BACKENDS)}", input="backend"
            )
        if self.mode not in COMPILE_MODES:
            allowed = ", ".join("default" if m is None else m for m in COMPILE_MODES)
            raise InputError(f"compile mode {self.mode!r} is not one of {allowed}", input="mode")


def compile_blocks(
    transformer, *, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = None
) -> int:
    """Compile every transformer block in place (regional compilation); returns how many.

    Args:
        transformer: an ``SD3Transformer2DModel`` (HairDiff's processors may be installed later:
            they run eagerly inside the compiled blocks).
        backend: ``torch.compile`` backend (``"inductor"``; ``"eager"`` traces only, for tests).
        mode: ``torch.compile`` mode (e.g. ``"max-autotune-no-cudagraphs"``); None = default.
            CUDA graphs (``"reduce-overhead"``) are refused: the reference cache changes per call.
        dynamic: ``torch.compile``'s ``dynamic`` (None: recompile once if the token count
            changes, then generalise).
    """
    blocks = _blocks_of(transformer)
    _refuse_cuda_graphs(mode)
    for block in blocks:
        block.compile(backend=backend, mode=mode, dynamic=dynamic)
    logger.info("compiled %d transformer blocks (backend %s, mode %s)", len(blocks), backend, mode or "default")
    return len(blocks)


#: The settings each live transformer was already compiled with (for the first-run message).
_COMPILED_BEFORE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _blocks_of(transformer) -> list:
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise InputError(
            f"compiling blocks needs an SD3 transformer with transformer_blocks, got {type(transformer).__name__}"
        )
    return list(blocks)


@contextlib.contextmanager
def compiled_blocks(transformer, settings: CompileSettings | None) -> Iterator[int]:
    """Run the transformer's blocks compiled inside the ``with``, as they were after it.

    For a model that lives on (ComfyUI keeps loaded models between runs, and a graph without the
    compile node must run the same model eagerly). Dynamo keeps compiled code per code object,
    so entering again with the same settings reuses it: only the first entry compiles
    (tests/test_compiling.py counts the graphs). Yields the number of blocks compiled (0 when
    ``settings`` is None).

    Args:
        transformer: an ``SD3Transformer2DModel`` (processors and offload hooks may be installed).
        settings: how to compile, or None for no change.
    """
    if settings is None:
        yield 0
        return
    import torch

    blocks = _blocks_of(transformer)
    seen = _COMPILED_BEFORE.setdefault(transformer, set())
    if settings not in seen:
        # The compiler runs inside the first step: say why that step is slow.
        logger.info(
            "compiling %d transformer blocks (torch.compile, backend %s, mode %s): the first step waits for "
            "the compiler, later steps and runs reuse its code",
            len(blocks),
            settings.backend,
            settings.mode or "default",
        )
        seen.add(settings)
    before = [block.__dict__.get("_compiled_call_impl") for block in blocks]
    backend = _BACKENDS[settings.backend]
    try:
        for block in blocks:
            # What nn.Module.compile does; a fresh wrapper per entry, so a copied model never
            # runs another copy's block.
            block._compiled_call_impl = torch.compile(block._call_impl, backend=backend, mode=settings.mode)
        try:
            yield len(blocks)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            # Raised from the first step, many frames deep in dynamo: say what it means.
            cause = str(getattr(exc, "inner_exception", None) or exc).strip().splitlines()
            raise CompileError(
                f"torch.compile (backend {settings.backend}) could not compile the transformer's blocks: "
                f"{cause[0] if cause else type(exc).__name__}. inductor needs a C++ compiler on the CPU and "
                f"Triton on CUDA: install them, or use backend 'eager' (a check, no speedup), or sample "
                f"without compiling",
                input="model",
            ) from exc
    finally:
        for block, previous in zip(blocks, before):
            block._compiled_call_impl = previous
