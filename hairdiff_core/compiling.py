"""Regional compilation: ``torch.compile`` each transformer block, HairDiff's attention eager.

SD3's blocks are one computation repeated, so compiling each block (instead of the whole model)
compiles once per block *kind* (joint; Medium's dual-attention blocks are a second kind) and
reuses the code for every layer: the time to first image stays small and recompiles stay rare.

HairDiff's attention processor (``reference.ReferenceAttnProcessor``) is excluded from tracing
(``torch.compiler.disable``): its per-call state (reference K/V cache, gating, a new state object
every step) would otherwise be guarded on and recompile per step, and its kernels are already
single fused calls (SDPA, or the grouped kernel on CUDA). The compiled regions are the norms,
modulation, projections around the attention and the feed-forward; the block breaks its graph
at the attention call. Result: reference off, ``once`` and ``per_step`` run the same compiled
code, with no recompilation from step to step (tests/test_compiling.py counts the graphs).

``reference._ReferenceComplete``: the reference pass ends early by raising this exception from
the processor once the last layer's K/V are stored (nothing after it is used). It propagates
through compiled blocks like any exception (the processor runs eagerly), and
``reference.reference_pass`` catches it. Forward hooks of the modules it unwinds through do not
run their post-forward part for that pass (e.g. an offload hook's "move back" of the last
block): hooks that must run should be pre-forward hooks, as block streaming's are.
"""

from __future__ import annotations

import logging

from .errors import InputError

logger = logging.getLogger(__name__)


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
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise InputError(
            f"compile_blocks needs an SD3 transformer with transformer_blocks, got {type(transformer).__name__}"
        )
    if mode is not None and "reduce-overhead" in mode:
        raise InputError(
            f"compile mode {mode!r} uses CUDA graphs, which replay fixed memory while the reference K/V "
            f"cache changes per call; use the default mode or 'max-autotune-no-cudagraphs'"
        )
    for block in blocks:
        block.compile(backend=backend, mode=mode, dynamic=dynamic)
    logger.info("compiled %d transformer blocks (backend %s, mode %s)", len(blocks), backend, mode or "default")
    return len(blocks)
