"""Reference attention (K/V sharing) for SD3/SD3.5 joint attention, gated by the soft mask.

A *reference pass* runs the source photo's latent (sketch channels zero) through the
transformer and stores every attention layer's image-token K and V, taken after ``norm_k``
(and after any LoRA on ``to_k``/``to_v``), i.e. exactly what that layer's attention uses. The
*generation pass* appends them to its own keys and values and adds one additive logit bias,
so each layer is still one fused ``scaled_dot_product_attention`` call.

Weights are probabilities, biases their logs: a weight ``w`` on a key adds ``log(w)`` to its
logit (``w = 0`` -> ``-inf``: exactly invisible; ``w = 1`` -> ``0``: a reference key that
duplicates one of the generation's own keys leaves the softmax unchanged). For an image query
token i with token-grid soft mask ``m_i`` and a reference key j:

    bias[i, ref j] = log((1 - m_i) * weight_outside + m_i * weight_inside) + log(kw_j)
    kw_j           = key_weight_inside if key j lies in the dilated matte else 1
    bias[i, own j] = log(s_i),  s_i = max(1 - suppress_self_outside * (1 - m_i), 1e-6)
    bias[i, text]  = log(s_i + w_i)        (w_i the query weight above; keeps the text's share)
    bias[text query, ref j] = -inf         (text never sees the reference)

The text term makes a reference that duplicates the generation's own keys an exact no-op: the
image context then appears (s_i + w_i) times and so does the text, so the softmax is unchanged.

Leakage: the reference photo still carries the *old* hair. Its keys inside the (dilated)
matte are excluded by default (``key_weight_inside = 0``), and the reference pass itself is
*hair-blind* (``blind_reference``): every query of the reference pass sees those keys with the
same ``key_weight_inside``, so with the default nothing of the old hair reaches the reference
K/V outside the matte either (exactly: changing the reference inside the excluded tokens
changes no output). Excluded keys are not even stored: the cache holds only visible tokens,
which also makes the generation's attention cheaper by the excluded share. ``reference_input="filled"`` instead feeds the reference pass a copy of the
photo whose hair region was filled from its surroundings (``fill_hair_region``).

Style reference (``StyleKeys``): a second pass runs a *style photo* (cropped around its own hair
matte) on the same schedule, sigma and noise mode and stores the K/V of its tokens inside its
(slightly shrunk) matte. They are appended after the reference keys with

    bias[i, style j]    = log(m_i * style_weight) + log(cell weight_j)   (key_pool cells)
    bias[text, style j] = -inf

so only the new hair's queries see them (m_i = 0: exactly invisible), the text balance is the
reference's, and ``style_weight = 0`` runs no style pass at all. One attention call per layer as
before (the grouped and folded kernels carry the style group too).

SD3.5 Medium's extra image self-attention (``attn2``, blocks 0-12) takes part by default
(``include_attn2``): it is image-only, so it is where appearance is shared most directly, and
the hair-blind reference pass needs it gated anyway. Its cache costs 13/24 more on Medium.

State never lives on the processor: mode, cache and gating travel in ``joint_attention_kwargs``
(key ``hairdiff_reference``), so gradient checkpointing recomputes a block with the same state.
One processor instance serves every layer (the layer's cache key is the attention module).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..errors import InputError
from . import mask as M
from .flow import timestep_from_sigma
from .surgery import BASE_CHANNELS, input_channels

logger = logging.getLogger(__name__)

MODES = ("off", "once", "per_step")
#: The largest reference weight (inside or outside the matte).
REFERENCE_WEIGHT_MAX = 100.0
REFERENCE_INPUTS = ("photo", "filled")
#: What the reference pass sees: ``clean`` = the photo latent as is, with the step's timestep (the
#: published dual pass); ``matched`` = the photo re-noised to the step's sigma with the
#: generation's noise ("reference-only" UNet methods). ``auto``: clean for per_step, matched for once.
REFERENCE_NOISES = ("auto", "clean", "matched")
#: Reference key pooling factors (cells of k x k tokens; 1 = no pooling).
KEY_POOLS = (1, 2, 4)
#: ``auto`` = ``grouped`` on CUDA (flash kernels), ``bias`` elsewhere (one fused CPU call);
#: ``folded`` = the biases carried in extra head dimensions (one bias-free SDPA call).
ATTENTION_KERNELS = ("auto", "grouped", "bias", "folded")
#: The folded kernel's stand-in for -inf: exp(-1000) is 0 in every float format, and 1000 divided
#: by the softmax scale stays finite in fp16 (head dims up to 4096).
_FOLD_NEG = 1.0e3
#: Extra head dimensions of the folded kernel (4 used); a multiple of 8 keeps flash kernels eligible.
_FOLD_DIMS = 8
#: The ``joint_attention_kwargs`` key the processor reads (it must be a named parameter).
KWARG = "hairdiff_reference"
#: Floor of the own-key weight under suppression: a finite bias keeps every row non-empty.
SUPPRESS_FLOOR = 1e-6
#: A reference key counts as "in the matte" when its token's soft-mask coverage exceeds this
#: (before dilation): partly covered border tokens hold old hair too.
KEY_COVERAGE_THRESHOLD = 0.1
#: Mask last dims are padded to this many elements so CUDA's memory-efficient kernel gets an
#: aligned bias without copying it (it pads misaligned masks itself, on every call).
_ALIGN = 16


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclass
class ReferenceSettings:
    """How reference attention behaves. ``mode="off"`` leaves the model untouched.

    - ``weight_outside`` / ``weight_inside``: how strongly image queries outside / inside the
      mask see the reference (0 = not at all, 1 = like their own keys; > 1 over-weights).
      Inside defaults to 0.5: new hair takes the photo's light without being pulled to copy it.
    - ``suppress_self_outside`` in [0, 1]: down-weights the generation's own image keys for
      queries outside the mask (1 = they read the photo almost only from the reference).
    - ``key_weight_inside`` in [0, 1]: weight of reference keys inside the dilated matte
      (0 = excluded, the default: they carry the old hair).
    - ``key_dilate_tokens``: dilation of that key region in tokens (16 px each).
    - ``reference_input``: ``"photo"`` or ``"filled"`` (hair region filled from its surroundings).
    - ``once_sigma``: the noise level of the single reference pass in ``once`` mode (0.1: low
      enough that K/V describe the photo rather than noise, non-zero so the pass stays in the
      distribution the timestep embedding was trained on).
    - ``include_attn2``: SD3.5 Medium's image self-attention shares the reference too.
    - ``blind_reference``: the reference pass does not attend to the excluded keys either.
    - ``reference_noise``: ``clean`` (the photo latent unnoised, the transformer told the step's
      timestep: the published method), ``matched`` (the photo noised to the step's sigma with
      the generation's noise; at sigma 1 that is pure noise) or ``auto`` (``clean`` for
      ``per_step``, ``matched`` for ``once``, whose single pass sits at the low ``once_sigma``).
    - ``key_pool``: key budget, 1 (off) or 2/4: reference K/V averaged over ``key_pool`` x
      ``key_pool`` cells of the token grid (weighted by each key's weight); a cell's logit
      gets ``log(sum of its keys' weights)``, so a cell of identical keys attends exactly like
      its keys did. 2 stores and attends to 4x fewer reference keys.
    - ``key_ring``: key budget, 0 (off) or R > 0: only reference keys within R tokens of the
      dilated matte are stored (the light that matters is near the hair).
      Both keep "weight 0 = the plain model" exact; the duplicated-keys invariant (reference =
      input, unit weights = plain model) holds only without a budget: pooling and the ring are
      approximations of the photo's keys, so the budget is off by default.
    - ``attention_kernel``: ``"auto"`` (grouped on CUDA, bias elsewhere), ``"grouped"``
      (attention per key group merged by log-sum-exp: no float mask, flash kernels on CUDA),
      ``"folded"`` (the biases, a per-query value per key group plus a per-key value, carried
      in 8 extra head dimensions: one bias-free SDPA call, flash kernels on CUDA) or ``"bias"``
      (one SDPA call with an additive float mask). Same result either way (up to rounding).
    """

    mode: str = "off"
    weight_inside: float = 0.5
    weight_outside: float = 1.0
    suppress_self_outside: float = 0.0
    key_weight_inside: float = 0.0
    key_dilate_tokens: int = 1
    reference_input: str = "photo"
    once_sigma: float = 0.1
    include_attn2: bool = True
    blind_reference: bool = True
    reference_noise: str = "auto"
    key_pool: int = 1
    key_ring: int = 0
    attention_kernel: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.mode, str):
            self.mode = self.mode.strip().lower().replace("-", "_")
        if self.mode not in MODES:
            raise InputError(f"reference mode {self.mode!r} is not one of {list(MODES)}", input="mode")
        for name in ("weight_inside", "weight_outside"):
            v = _as_float(getattr(self, name), name)
            # The weight enters the attention logits as log(weight): above 100 the reference
            # drowns the image's own keys (1e308 overflows to inf and NaN).
            if not 0.0 <= v <= REFERENCE_WEIGHT_MAX:
                raise InputError(
                    f"{name} must be from 0 to {REFERENCE_WEIGHT_MAX:g} (0 = the reference is not seen, 1 = as strong "
                    f"as the image's own keys), got {v:g}",
                    input=name,
                )
            setattr(self, name, v)
        for name in ("suppress_self_outside", "key_weight_inside"):
            v = _as_float(getattr(self, name), name)
            if not 0.0 <= v <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {v}", input=name)
            setattr(self, name, v)
        sigma = _as_float(self.once_sigma, "once_sigma")
        if not 0.0 < sigma <= 1.0:
            raise InputError(f"once_sigma must be in (0, 1], got {sigma} (try 0.1)", input="once_sigma")
        self.once_sigma = sigma
        if (
            isinstance(self.key_dilate_tokens, bool)
            or int(self.key_dilate_tokens) != self.key_dilate_tokens
            or self.key_dilate_tokens < 0
        ):
            raise InputError(
                f"key_dilate_tokens must be a whole number >= 0, got {self.key_dilate_tokens!r}",
                input="key_dilate_tokens",
            )
        self.key_dilate_tokens = int(self.key_dilate_tokens)
        if self.reference_input not in REFERENCE_INPUTS:
            raise InputError(
                f"reference_input {self.reference_input!r} is not one of {list(REFERENCE_INPUTS)}",
                input="reference_input",
            )
        if isinstance(self.reference_noise, str):
            self.reference_noise = self.reference_noise.strip().lower()
        if self.reference_noise not in REFERENCE_NOISES:
            raise InputError(
                f"reference_noise {self.reference_noise!r} is not one of {list(REFERENCE_NOISES)} "
                f"(clean = the photo as is, the published method; matched = re-noised to each step's sigma)",
                input="reference_noise",
            )
        self._check_budget()

    @property
    def noise(self) -> str:
        """The effective reference noise, ``clean`` or ``matched`` (``auto`` resolved by mode)."""
        if self.reference_noise != "auto":
            return self.reference_noise
        return "clean" if self.mode == "per_step" else "matched"

    def _check_budget(self) -> None:
        """Validate the key budget and kernel fields (kept apart from the method's own fields)."""
        for name in ("key_pool", "key_ring"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 0:
                raise InputError(f"{name} must be a whole number >= 0, got {v!r}", input=name)
            setattr(self, name, int(v))
        if self.key_pool not in KEY_POOLS:
            raise InputError(
                f"key_pool must be one of {list(KEY_POOLS)} (1 = off, 2 = 2x2 cells), got {self.key_pool}",
                input="key_pool",
            )
        kernel = str(self.attention_kernel).strip().lower()
        if kernel not in ATTENTION_KERNELS:
            raise InputError(
                f"attention_kernel {self.attention_kernel!r} is not one of {list(ATTENTION_KERNELS)}",
                input="attention_kernel",
            )
        self.attention_kernel = kernel

    @classmethod
    def coerce(cls, value) -> ReferenceSettings:
        """None -> off, a mode string -> defaults for that mode, a dict -> fields, settings as is."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(mode=value)
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise InputError(f"unknown reference setting(s) {unknown}; known: {sorted(known)}")
            return cls(**value)
        raise InputError(f"reference must be None, a mode string or ReferenceSettings, got {type(value).__name__}")


def _as_float(v, name: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {v!r}", input=name) from None
    if not math.isfinite(f):
        raise InputError(f"{name} must be finite, got {f}", input=name)
    return f


# --------------------------------------------------------------------------------------------
# Gating: token masks -> additive biases (built once per sampling call, shared by all layers)
# --------------------------------------------------------------------------------------------
def _safe_log(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w > 0, torch.log(w.clamp_min(torch.finfo(w.dtype).tiny)), torch.full_like(w, -math.inf))


def _aligned_empty(shape: tuple[int, ...], dtype, device) -> torch.Tensor:
    last = shape[-1]
    padded = -(-last // _ALIGN) * _ALIGN
    return torch.empty(*shape[:-1], padded, dtype=dtype, device=device)[..., :last]


def _runs(col: torch.Tensor) -> list[tuple[int, int, float]] | None:
    """Runs ``(start, end, value)`` of equal finite values along (B, n) ``col``, or None when
    the batch items differ (the grouped kernel then falls back to the bias path)."""
    if col.shape[0] > 1 and not bool((col == col[:1]).all()):
        return None
    row = col[0]
    if row.numel() == 0:
        return []
    starts = [0] + (torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist()
    ends = starts[1:] + [row.numel()]
    return [(a, b, float(row[a])) for a, b in zip(starts, ends) if math.isfinite(float(row[a]))]


def _sdpa_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output (B, H, Lq, D) and the log-sum-exp of its scaled logits (B, H, Lq).

    ``F.scaled_dot_product_attention`` does not return the LSE, the kernels behind it do: flash
    (CUDA, half precision), memory-efficient (CUDA, any dtype; its LSE is padded to 32 rows) and
    the CPU flash kernel. Anything else gets the exact math version.
    """
    lq = query.shape[2]
    if query.is_cuda:
        # A reference shared by the CFG halves arrives as an expanded view (batch stride 0).
        key, value = (t if t.stride(0) or t.shape[0] == 1 else t.contiguous() for t in (key, value))
        if query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] % 8 == 0 and query.shape[-1] <= 256:
            out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, False, False)
            return out[0], out[1]
        out = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, 0.0, False)
        return out[0], out[1][..., :lq]
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False)
        return out, lse
    logits = (query.float() @ key.float().transpose(-1, -2)) / math.sqrt(query.shape[-1])
    lse = torch.logsumexp(logits, dim=-1)
    return (torch.softmax(logits, dim=-1) @ value.float()).to(query.dtype), lse


def folded_attention(query, key, value, q_extra, k_extra) -> torch.Tensor:
    """Softmax attention with ``bias[q, k] = q_extra[q] . k_extra[k]`` added to the scaled logits,
    in one bias-free SDPA call: the bias rides in extra head dimensions.

    ``(q, q_extra / scale) . (k, k_extra) x scale = q . k x scale + q_extra . k_extra``, exactly
    in exact arithmetic; the extra dims are rounded to the query's dtype like q and k are.

    Args:
        query, key, value: (B, H, L, D).
        q_extra: (B|1, Lq, E) float32, finite (``-_FOLD_NEG`` for "not seen").
        k_extra: (B|1, Lk, E) float32, finite; E = ``_FOLD_DIMS``.
    """
    B, H, _, D = query.shape
    scale = 1.0 / math.sqrt(D)
    qe = (q_extra / scale).to(query.dtype)[:, None].expand(B, H, -1, -1)
    ke = k_extra.to(key.dtype)[:, None].expand(B, H, -1, -1)
    q = torch.cat([query, qe], dim=-1)
    k = torch.cat([key, ke], dim=-1)
    v = torch.cat([value, value.new_zeros(*value.shape[:-1], k_extra.shape[-1])], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, scale=scale)[..., :D]


def grouped_attention(query: torch.Tensor, groups) -> torch.Tensor:
    """Softmax attention over key groups whose logits each get a per-query bias, exactly.

    Softmax over the union of the groups, with ``bias_g[q]`` added to every logit of group g,
    equals the groups' own attention outputs mixed with weights ``softmax_g(lse_g + bias_g)``.
    Each group is one bias-free SDPA call (flash kernels on CUDA), so no float mask is needed.

    Args:
        query: (B, H, Lq, D).
        groups: iterable of ``(key, value, bias)``; key/value (B, H, Lk_g, D); bias None (0), a
            float, or a (B, Lq) float32 tensor of per-query biases (``-inf``: not seen).
    """
    outs, logits = [], []
    for key, value, bias in groups:
        if key.shape[2] == 0:
            continue
        out, lse = _sdpa_with_lse(query, key, value)
        a = lse.float()
        if isinstance(bias, torch.Tensor):
            a = a + bias[:, None, :]
        elif bias:
            a = a + float(bias)
        outs.append(out)
        logits.append(a)
    a = torch.stack(logits)
    w = torch.softmax(a, dim=0)  # across groups; every row has one finite group
    mixed = w[0, ..., None] * outs[0].float()
    for g in range(1, len(outs)):
        mixed = mixed + w[g, ..., None] * outs[g].float()
    return mixed.to(query.dtype)


class ReferenceGating:
    """The per-token weights of one sampling call and the biases built from them.

    ``token_mask``: (B, 1, th, tw) soft mask on the token grid (H/16, W/16), or any grid of
    the same aspect ratio (area-resized to ``token_hw``). ``style``: the style photo's keys
    (``StyleKeys``, batch 1 or B) appended after the reference keys, seen by image query i with
    weight ``m_i * style_weight`` (text queries: never); None = no style reference.
    """

    def __init__(
        self,
        settings: ReferenceSettings,
        token_mask: torch.Tensor,
        token_hw: tuple[int, int],
        style: StyleKeys | None = None,
        style_weight: float = 1.0,
    ):
        self.settings = settings
        if not isinstance(token_mask, torch.Tensor) or token_mask.ndim != 4 or token_mask.shape[1] != 1:
            shape = tuple(token_mask.shape) if isinstance(token_mask, torch.Tensor) else type(token_mask).__name__
            raise InputError(f"token_mask must be a (B, 1, h, w) soft mask, got {shape}")
        th, tw = token_hw
        h, w = token_mask.shape[-2:]
        if (h, w) != (th, tw):
            if abs((w / h) / (tw / th) - 1.0) > 0.01:
                raise InputError(
                    f"token_mask is {w}x{h} but the latent's token grid is {tw}x{th} (different aspect "
                    f"ratios); pass mask.token_grid(soft_mask) of the working-size mask"
                )
            token_mask = M.resize_area(token_mask.float(), (th, tw))
        m = token_mask.detach().float().clamp(0.0, 1.0)
        self.token_hw = (th, tw)
        self.batch = m.shape[0]
        self.m = m.flatten(1)  # (B, L): SD3's patch order is row-major, like flatten
        covered = (m > KEY_COVERAGE_THRESHOLD).float()
        self.key_inside = M.dilate(covered, settings.key_dilate_tokens).flatten(1) > 0.5
        s = settings
        ref_w = (1 - self.m) * s.weight_outside + self.m * s.weight_inside  # (B, L)
        own_w = (1 - s.suppress_self_outside * (1 - self.m)).clamp_min(SUPPRESS_FLOOR)
        self.row_ref = _safe_log(ref_w)
        self.col_ref = _safe_log(torch.where(self.key_inside, torch.tensor(s.key_weight_inside), torch.tensor(1.0)))
        self.row_own = torch.log(own_w) if s.suppress_self_outside > 0 else torch.zeros_like(self.m)
        # The image context now appears as own + reference keys; scaling the text keys by the
        # same total keeps the image/text balance of the model (exactly so when the reference
        # duplicates the generation's own keys).
        self.row_text = torch.log(own_w + ref_w)
        # A reference item whose every key is excluded would leave attn2 rows with nothing to
        # attend to in the blind pass; its keys are invisible to the generation anyway.
        self.all_excluded = torch.isinf(self.col_ref).all(dim=1)
        if bool(self.all_excluded.any()):
            logger.warning(
                "reference attention: the dilated matte covers the whole image for batch item(s) %s; "
                "the reference has no visible keys there",
                torch.nonzero(self.all_excluded).flatten().tolist(),
            )
        self._plan_storage(settings)
        self._cache: dict[tuple, torch.Tensor] = {}
        # The style reference: its keys' row bias log(m_i * style_weight) (0 outside the matte:
        # -inf, the face and background never see them) and their column bias (key pooling).
        self.style = style
        self.style_kept = 0 if style is None else style.kept
        self.row_style = None
        self.style_col = None
        if style is not None:
            if style.batch not in (1, self.batch):
                raise InputError(
                    f"the style reference has batch {style.batch} but the photo batch is {self.batch}; give 1 or "
                    f"{self.batch} style photos",
                    input="style_image",
                )
            w = _as_float(style_weight, "style_weight")
            if not 0.0 <= w <= REFERENCE_WEIGHT_MAX:
                raise InputError(
                    f"style_weight must be from 0 to {REFERENCE_WEIGHT_MAX:g}, got {w:g}", input="style_weight"
                )
            self.style_weight = w
            self.row_style = _safe_log(self.m * w)  # (B, L)
            self.style_col = style.col_kept.expand(self.batch, -1)  # (B, S)

    def _plan_storage(self, s: ReferenceSettings) -> None:
        """Which reference keys the cache stores, in which order, with which column bias.

        Keys nobody may see are not stored at all: the cache shrinks and the generation's
        attention gets cheaper by the excluded share. The key budget drops keys outside the
        ring (``key_ring``) and pools cells (``key_pool``). Stored keys are sorted by column
        bias (stable: token order within one bias), so equal biases form runs that the grouped
        kernel attends to in one call each. Items with fewer stored keys than the batch's
        maximum are padded with (-inf) entries.
        """
        B, L = self.m.shape
        th, tw = self.token_hw
        weight = torch.where(self.key_inside, torch.tensor(s.key_weight_inside), torch.tensor(1.0))
        if s.key_ring > 0:
            covered = (self.m.view(B, 1, th, tw) > KEY_COVERAGE_THRESHOLD).float()
            near = M.dilate(covered, s.key_dilate_tokens + s.key_ring).flatten(1) > 0.5
            weight = weight * near
        self.pool = s.key_pool
        self.store_weight = weight  # (B, L): each key's weight before pooling
        if self.pool > 1:
            weight = self._pool_grid(weight.view(B, 1, th, tw)).flatten(1)  # cell weight sums
        col = _safe_log(weight)
        visible = torch.isfinite(col)
        counts = visible.sum(dim=1)
        self.kept = int(counts.max())
        if self.pool == 1 and self.kept == L and bool((col == 0).all()):
            self.keep_index = None
            self.col_kept = col
        else:
            order = torch.argsort(-col.nan_to_num(neginf=-1e30), dim=1, stable=True)[:, : self.kept]
            self.keep_index = order
            padded = torch.arange(self.kept)[None, :] >= counts[:, None]
            self.col_kept = torch.where(padded, torch.full((B, self.kept), -math.inf), col.gather(1, order))
        # Runs of equal column bias, shared by every batch item (else the grouped kernel
        # falls back to the bias path).
        self.col_runs: list[tuple[int, int, float]] | None = _runs(self.col_kept)

    def _pool_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """(N, C, th, tw) -> (N, C, ceil(th/p), ceil(tw/p)) sums over p x p cells (zero padded)."""
        p = self.pool
        th, tw = grid.shape[-2:]
        grid = F.pad(grid, (0, -tw % p, 0, -th % p))
        return F.avg_pool2d(grid, p, stride=p) * (p * p)

    @property
    def tokens(self) -> int:
        return self.m.shape[1]

    def compact(self, t: torch.Tensor) -> torch.Tensor:
        """(B, heads, L, D) image K or V -> (B, heads, kept, D): only keys someone can see.

        With ``key_pool`` > 1 a stored key is the weighted mean of its cell's keys.
        """
        if self.pool > 1:
            t = self._pool_keys(t)
        if self.keep_index is None:
            return t
        key = ("index", t.device)
        index = self._cache.get(key)
        if index is None:
            index = self._cache[key] = self.keep_index.to(t.device)
        if index.shape[0] == 1:
            return t.index_select(2, index[0])
        B, heads, _, D = t.shape
        return t.gather(2, index[:, None, :, None].expand(B, heads, index.shape[1], D))

    def _pool_keys(self, t: torch.Tensor) -> torch.Tensor:
        B, heads, L, D = t.shape
        th, tw = self.token_hw
        key = ("pool_weight", t.device, t.dtype)
        w = self._cache.get(key)
        if w is None:
            w = self._cache[key] = self.store_weight.to(t.device, torch.float32).view(-1, 1, th, tw)
        cell_w = self._pool_grid(w)  # (B|1, 1, ch, cw)
        grid = t.float().permute(0, 1, 3, 2).reshape(B, heads * D, th, tw)
        pooled = self._pool_grid(grid * w) / cell_w.clamp_min(torch.finfo(torch.float32).tiny)
        return pooled.reshape(B, heads, D, -1).permute(0, 1, 3, 2).to(t.dtype)

    def _batched(self, bias: torch.Tensor, batch: int) -> torch.Tensor:
        if bias.shape[0] == batch or bias.shape[0] == 1:
            return bias
        if batch % bias.shape[0]:
            raise InputError(
                f"the generation batch ({batch}) is not a multiple of the reference batch "
                f"({bias.shape[0]}); give one reference per photo"
            )
        # [uncond, cond] halves each line up with the reference batch.
        return bias.repeat(batch // bias.shape[0], 1, 1, 1)

    def _batched_rows(self, rows: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, n) per-item values lined up with a generation batch (``_batched`` for 2-D)."""
        return self._batched(rows[:, None, None], batch)[:, 0, 0]

    def generation_bias(self, batch: int, text_tokens: int | None, dtype, device) -> torch.Tensor:
        """(B|1, 1, Lq, Lk + Lref) for joint attention (``text_tokens`` set) or attn2 (None)."""
        key = ("gen", batch, text_tokens, dtype, device)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        B, L = self.m.shape
        Lt = text_tokens or 0
        R = L + Lt + self.kept  # where the style keys start
        Lq, Lk = L + Lt, R + self.style_kept
        bias = _aligned_empty((B, 1, Lq, Lk), torch.float32, "cpu")
        bias[:, 0, :L, :L] = self.row_own[:, :, None]
        bias[:, 0, :L, L : L + Lt] = self.row_text[:, :, None]
        bias[:, 0, L:, : L + Lt] = 0.0
        bias[:, 0, :L, L + Lt : R] = self.row_ref[:, :, None] + self.col_kept[:, None, :]
        if self.style is not None:
            bias[:, 0, :L, R:] = self.row_style[:, :, None] + self.style_col[:, None, :]
        bias[:, 0, L:, L + Lt :] = -math.inf  # text queries see neither reference
        bias = self._to(bias, dtype, device)
        bias = self._batched(bias, batch)
        self._cache[key] = bias
        return bias

    def reference_bias(self, batch: int, text_tokens: int | None, dtype, device) -> torch.Tensor | None:
        """(B, 1, 1, Lk) key-only bias of the hair-blind reference pass, or None when not blind."""
        if not self.reference_bias_needed():
            return None
        key = ("ref", batch, text_tokens, dtype, device)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        B, L = self.m.shape
        Lt = text_tokens or 0
        col = torch.where(self.all_excluded[:, None], torch.zeros_like(self.col_ref), self.col_ref)
        bias = _aligned_empty((B, 1, 1, L + Lt), torch.float32, "cpu")
        bias[:, 0, 0, :L] = col
        bias[:, 0, 0, L:] = 0.0
        bias = self._batched(self._to(bias, dtype, device), batch)
        self._cache[key] = bias
        return bias

    @staticmethod
    def _to(bias: torch.Tensor, dtype, device) -> torch.Tensor:
        out = _aligned_empty(tuple(bias.shape), dtype, device)
        out.copy_(bias)
        return out

    # ---- folded kernel (biases in extra head dimensions) ----------------------------------------
    def use_folded(self) -> bool:
        return self.settings.attention_kernel == "folded"

    @staticmethod
    def _finite(t: torch.Tensor) -> torch.Tensor:
        return t.nan_to_num(neginf=-_FOLD_NEG).clamp_min(-_FOLD_NEG)

    def generation_extras(self, batch: int, text_tokens: int | None, ref_tokens: int, device):
        """(q_extra, k_extra) of a generation attention: dims 0-2 carry the per-query bias of the
        own, text and reference key groups (a 1 marks the key's group), dim 3 the reference
        keys' column bias (the query side holds 1); with a style reference dims 4-5 do the same
        for the style keys (appended after the reference keys)."""
        key = ("folded_gen", batch, text_tokens, device)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        L, Lt, R, S = self.tokens, text_tokens or 0, ref_tokens, self.style_kept
        names = ("own", "text", "ref") + (("style",) if self.style is not None else ())
        rows = [self._finite(self._rows(n, batch, text_tokens, "cpu")) for n in names]
        bq = rows[0].shape[0]
        q_extra = torch.zeros(bq, L + Lt, _FOLD_DIMS)
        for i, r in enumerate(rows[:3]):
            q_extra[:, :, i] = r
        q_extra[:, :, 3] = 1.0
        col = self._batched_rows(self._finite(self.col_kept), batch)
        k_extra = torch.zeros(col.shape[0], L + Lt + R + S, _FOLD_DIMS)
        k_extra[:, :L, 0] = 1.0
        k_extra[:, L : L + Lt, 1] = 1.0
        k_extra[:, L + Lt : L + Lt + R, 2] = 1.0
        k_extra[:, L + Lt : L + Lt + R, 3] = col
        if self.style is not None:
            q_extra[:, :, 4] = rows[3]
            q_extra[:, :, 5] = 1.0
            k_extra[:, L + Lt + R :, 4] = 1.0
            k_extra[:, L + Lt + R :, 5] = self._batched_rows(self._finite(self.style_col), batch)
        hit = self._cache[key] = (q_extra.to(device), k_extra.to(device))
        return hit

    def reference_extras(self, batch: int, text_tokens: int | None, device):
        """(q_extra, k_extra) of the hair-blind reference pass (``reference_bias`` folded)."""
        key = ("folded_ref", batch, text_tokens, device)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        L, Lt = self.tokens, text_tokens or 0
        col = torch.where(self.all_excluded[:, None], torch.zeros_like(self.col_ref), self.col_ref)
        col = self._batched_rows(self._finite(col), batch)
        q_extra = torch.zeros(1, L + Lt, _FOLD_DIMS)
        q_extra[:, :, 0] = 1.0
        k_extra = torch.zeros(col.shape[0], L + Lt, _FOLD_DIMS)
        k_extra[:, :L, 0] = col
        hit = self._cache[key] = (q_extra.to(device), k_extra.to(device))
        return hit

    # ---- grouped kernel (no float mask) -------------------------------------------------------
    def use_grouped(self, query: torch.Tensor) -> bool:
        kernel = self.settings.attention_kernel
        return kernel == "grouped" or (kernel == "auto" and query.is_cuda)

    def _rows(self, name: str, batch: int, text_tokens: int | None, device) -> torch.Tensor:
        """(B|1, Lq) per-query bias of one key group, text queries included."""
        key = ("rows", name, batch, text_tokens, device)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        image = {"own": self.row_own, "text": self.row_text, "ref": self.row_ref, "style": self.row_style}[name]
        text_fill = -math.inf if name in ("ref", "style") else 0.0
        rows = torch.cat([image, torch.full((image.shape[0], text_tokens or 0), text_fill)], dim=1)
        rows = self._cache[key] = self._batched_rows(rows, batch).to(device)
        return rows

    def generation_groups(self, key, value, ref_k, ref_v, text_tokens: int | None, style_k=None, style_v=None):
        """Key groups of a generation attention, or None when the bias path must serve."""
        if self.col_runs is None or (self.style is not None and self.style.col_runs is None):
            return None
        batch, L = key.shape[0], self.tokens
        dev = key.device
        groups = [(key[:, :, :L], value[:, :, :L], self._rows("own", batch, text_tokens, dev))]
        if text_tokens:
            groups.append((key[:, :, L:], value[:, :, L:], self._rows("text", batch, text_tokens, dev)))
        ref_rows = self._rows("ref", batch, text_tokens, dev)
        for start, end, col in self.col_runs:
            groups.append((ref_k[:, :, start:end], ref_v[:, :, start:end], ref_rows + col))
        if self.style is not None:
            style_rows = self._rows("style", batch, text_tokens, dev)
            for start, end, col in self.style.col_runs:
                groups.append((style_k[:, :, start:end], style_v[:, :, start:end], style_rows + col))
        return groups

    def reference_groups(self, key, value, text_tokens: int | None):
        """Key groups of the hair-blind reference pass (same keys and biases as
        ``reference_bias``), or None when that pass needs no bias or the batch items differ."""
        if not self.reference_bias_needed():
            return None
        plan = self._cache.get("blind_plan")
        if plan is None:
            col = torch.where(self.all_excluded[:, None], torch.zeros_like(self.col_ref), self.col_ref)
            order = torch.argsort(-col.nan_to_num(neginf=-1e30), dim=1, stable=True)
            plan = self._cache["blind_plan"] = (order, _runs(col.gather(1, order)))
        order, runs = plan
        if runs is None:
            return None
        L = self.tokens
        idx = self._cache.get(("blind_index", key.device))
        if idx is None:
            idx = self._cache[("blind_index", key.device)] = order.to(key.device)
        img_k, img_v = key[:, :, :L], value[:, :, :L]
        if idx.shape[0] == 1:
            img_k, img_v = img_k.index_select(2, idx[0]), img_v.index_select(2, idx[0])
        else:
            full = idx[:, None, :, None].expand(idx.shape[0], key.shape[1], idx.shape[1], key.shape[3])
            img_k, img_v = img_k.gather(2, full), img_v.gather(2, full)
        groups = [(img_k[:, :, a:b], img_v[:, :, a:b], col) for a, b, col in runs]
        if text_tokens:
            groups.append((key[:, :, L:], value[:, :, L:], None))
        return groups

    def changes_attention(self) -> bool:
        """False when a generation pass would compute the plain attention: no query sees a
        reference key (reference weights 0) and the own keys are not suppressed, so the text
        bias log(own + ref) is log(1) = 0 too. A host may then skip the reference entirely."""
        style = self.row_style is not None and bool(torch.isfinite(self.row_style).any())
        return bool(torch.isfinite(self.row_ref).any()) or self.settings.suppress_self_outside > 0 or style

    def reference_bias_needed(self) -> bool:
        s = self.settings
        return bool(s.blind_reference and s.key_weight_inside != 1.0 and bool(self.key_inside.any()))

    def clear(self) -> None:
        self._cache.clear()


# --------------------------------------------------------------------------------------------
# The style reference's keys (a second reference pass, on a style photo)
# --------------------------------------------------------------------------------------------
#: A style-photo token is style hair when more than this share of it lies inside the style matte.
STYLE_COVERAGE_THRESHOLD = 0.5


def style_erode_tokens(token_hw: tuple[int, int]) -> int:
    """How many tokens the style matte is shrunk by: 2 at SD3.5's 1024 px (64 tokens a side), 1 from
    32 tokens, 0 below (the toy's 8): the matte's border tokens mix hair with the background."""
    return min(2, min(token_hw) // 32)


class StyleKeys:
    """Which tokens of the style photo are style keys, and how the style pass stores them.

    The style pass runs the style photo (cropped around its own matte, at the model's size)
    through the transformer like the source reference (same schedule and noise mode) and
    stores, per attention layer, the K/V of its tokens inside its own matte, shrunk by
    ``erode_tokens`` (default ``style_erode_tokens``): those are hair of the style photo only.
    An item whose shrunk matte is empty falls back to the unshrunk one. The key budget's
    ``key_pool`` applies as it does to the reference keys (cells of p x p tokens, a cell's
    logit gets ``log(its style tokens)``); ``key_ring`` does not (it is a ring around the
    *source's* matte). The style pass itself attends plainly (the style photo is its own
    context); the generation's gating (``ReferenceGating(style=...)``) decides who sees the keys.

    ``token_mask``: (B, 1, th, tw) coverage of the style matte on the style's token grid.
    """

    def __init__(self, token_mask: torch.Tensor, pool: int = 1, erode_tokens: int | None = None):
        if not isinstance(token_mask, torch.Tensor) or token_mask.ndim != 4 or token_mask.shape[1] != 1:
            shape = tuple(token_mask.shape) if isinstance(token_mask, torch.Tensor) else type(token_mask).__name__
            raise InputError(
                f"the style token mask must be a (B, 1, h, w) coverage mask, got {shape}", input="style_matte"
            )
        if pool not in KEY_POOLS:
            raise InputError(f"key_pool must be one of {list(KEY_POOLS)}, got {pool!r}", input="key_pool")
        cov = token_mask.detach().float().cpu().clamp(0.0, 1.0)
        th, tw = cov.shape[-2:]
        self.token_hw = (th, tw)
        self.batch = cov.shape[0]
        self.erode = style_erode_tokens((th, tw)) if erode_tokens is None else int(erode_tokens)
        core = (cov > STYLE_COVERAGE_THRESHOLD).float()
        inside = (M.dilate(core, -self.erode) if self.erode > 0 else core) > 0.5
        for b in range(self.batch):
            for fallback in (core[b] > 0.5, cov[b] > 0):
                if bool(inside[b].any()):
                    break
                inside[b] = fallback
            if not bool(inside[b].any()):
                raise InputError(
                    f"the style matte covers no token of the style photo (batch item {b}) at the working size; "
                    f"give a style matte with more hair in it",
                    input="style_matte",
                )
        self.inside = inside.flatten(1)  # (B, L)
        self.pool = int(pool)
        weight = self.inside.float()
        self.store_weight = weight
        if self.pool > 1:
            weight = self._pool_grid(weight.view(self.batch, 1, th, tw)).flatten(1)
        col = _safe_log(weight)
        counts = torch.isfinite(col).sum(dim=1)
        self.kept = int(counts.max())
        order = torch.argsort(-col.nan_to_num(neginf=-1e30), dim=1, stable=True)[:, : self.kept]
        self.keep_index = order
        padded = torch.arange(self.kept)[None, :] >= counts[:, None]
        self.col_kept = torch.where(padded, torch.full((self.batch, self.kept), -math.inf), col.gather(1, order))
        self.col_runs: list[tuple[int, int, float]] | None = _runs(self.col_kept)
        self._cache: dict[tuple, torch.Tensor] = {}

    # The storage maths is the reference keys' own (one place): compaction and pooling.
    compact = ReferenceGating.compact
    _pool_keys = ReferenceGating._pool_keys
    _pool_grid = ReferenceGating._pool_grid

    @property
    def tokens(self) -> int:
        return self.inside.shape[1]

    # The style pass attends plainly: no bias, no grouped or folded kernel.
    @staticmethod
    def use_folded() -> bool:
        return False

    @staticmethod
    def use_grouped(query) -> bool:
        return False

    @staticmethod
    def reference_bias_needed() -> bool:
        return False

    @staticmethod
    def reference_bias(*args) -> None:
        return None

    def clear(self) -> None:
        self._cache.clear()


# --------------------------------------------------------------------------------------------
# Per-pass state objects (travel in joint_attention_kwargs; never mutated between passes)
# --------------------------------------------------------------------------------------------
class ReferenceCache(dict):
    """attention module -> (K, V) of the visible reference image tokens, (B, heads, kept, head_dim).

    ``style``: the style pass's cache of the same layers (its style keys), or None."""

    style: ReferenceCache | None = None

    def nbytes(self) -> int:
        own = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.values())
        return own + (self.style.nbytes() if self.style is not None else 0)


@dataclass(eq=False)
class ReferencePassState:
    cache: ReferenceCache
    gating: ReferenceGating | None
    include_attn2: bool
    #: Modules that store K/V; once all have, the rest of the forward is skipped.
    expected: int | None = None


class ReferenceComplete(Exception):
    """Raised by ``joint_attention`` after the last K/V of a reference pass: nothing after it is
    used, so the host ends that forward early (catching this) instead of running it out."""


_ReferenceComplete = ReferenceComplete  # the name bench/ and compiling.py's notes use


@dataclass(eq=False)
class GenerationPassState:
    cache: ReferenceCache
    gating: ReferenceGating
    include_attn2: bool


# --------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------
class ReferenceAttnProcessor:
    """Drop-in for ``JointAttnProcessor2_0`` (joint blocks and attn2) with reference K/V.

    Without a ``hairdiff_reference`` kwarg it computes exactly what the stock processor does.
    Under ``torch.compile`` the projections before the attention and the output projections
    after it are traced with the block; the attention itself (``_attend``: the reference cache,
    its gating and the kernel choice, state that changes every step) never is (see
    ``compiling.py``), so compiled blocks neither guard on nor recompile for that state.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        hairdiff_reference: ReferencePassState | GenerationPassState | None = None,
    ):
        residual_len = hidden_states.shape[1]
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        joint = encoder_hidden_states is not None
        tq = tk = tv = None
        if joint:
            tq = attn.add_q_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            tk = attn.add_k_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            tv = attn.add_v_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                tq = attn.norm_added_q(tq)
            if attn.norm_added_k is not None:
                tk = attn.norm_added_k(tk)

        hidden_states = self._attend(attn, query, key, value, tq, tk, tv, hairdiff_reference)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        if joint:
            hidden_states, encoder_hidden_states = hidden_states[:, :residual_len], hidden_states[:, residual_len:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if joint:
            return hidden_states, encoder_hidden_states
        return hidden_states

    @staticmethod
    @torch.compiler.disable
    def _attend(attn, query, key, value, tq, tk, tv, state) -> torch.Tensor:
        """The attention core (``joint_attention``; the attention module names the layer's cache slot)."""
        return joint_attention(attn, query, key, value, tq, tk, tv, state)


# --------------------------------------------------------------------------------------------
# One layer's attention: the entry point both hosts call (diffusers processor, ComfyUI patch)
# --------------------------------------------------------------------------------------------
def joint_attention(slot, query, key, value, text_query=None, text_key=None, text_value=None, state=None):
    """One layer's attention with reference K/V sharing, as plain tensors, for any host.

    ``query``/``key``/``value``: the image tokens, (B, heads, L, d), after the host's q/k norms
    (what its attention would use); ``text_*``: the text tokens (B, heads, Lt, d) of a joint
    attention, or None for an image-only one (SD3.5 Medium's attn2). ``state`` says what the
    pass does: None = the plain attention; a ``ReferencePassState`` stores this layer's visible
    image K/V under ``slot`` (any hashable naming the layer) and attends hair-blind; a
    ``GenerationPassState`` appends the K/V stored under ``slot`` with the gating's biases.
    Returns (B, heads, L + Lt, d), image tokens first. Raises ``ReferenceComplete`` once a
    reference pass has stored every expected layer (the rest of that forward is not needed).
    """
    batch, residual_len = query.shape[0], query.shape[2]
    img_key, img_value = key, value
    joint = text_query is not None
    text_tokens = None
    if joint:
        text_tokens = text_query.shape[2]
        query = torch.cat([query, text_query], dim=2)
        key = torch.cat([key, text_key], dim=2)
        value = torch.cat([value, text_value], dim=2)

    bias = None
    groups = None
    folded = None
    takes_part = state is not None and (joint or state.include_attn2)
    if takes_part and isinstance(state, ReferencePassState):
        if state.gating is not None:
            state.cache[slot] = (state.gating.compact(img_key), state.gating.compact(img_value))
        else:
            state.cache[slot] = (img_key, img_value)
        if state.expected is not None and len(state.cache) >= state.expected:
            raise ReferenceComplete
        gating = state.gating
        if gating is not None and gating.use_folded():
            if gating.reference_bias_needed():
                folded = gating.reference_extras(batch, text_tokens, query.device)
        elif gating is not None:
            if gating.use_grouped(query):
                groups = gating.reference_groups(key, value, text_tokens)
            if groups is None:
                bias = gating.reference_bias(batch, text_tokens, query.dtype, query.device)
    elif takes_part and isinstance(state, GenerationPassState):
        cached = state.cache.get(slot)
        if cached is not None:
            if state.gating.tokens != residual_len:
                raise InputError(
                    f"the reference has {state.gating.tokens} image tokens but the generation has "
                    f"{residual_len}; the reference latent must have the generation latent's size"
                )
            ref_k, ref_v = _match_reference(cached, batch)
            style_k = style_v = None
            if state.gating.style is not None:
                style_cached = state.cache.style.get(slot) if state.cache.style is not None else None
                if style_cached is None:
                    raise InputError(
                        "the gating has style keys but the style pass stored no K/V for this layer; run the "
                        "style pass with the same transformer and include_attn2 (ReferenceHook does)"
                    )
                style_k, style_v = (t.to(key.dtype) for t in _match_reference(style_cached, batch))
            if state.gating.use_folded():
                folded = state.gating.generation_extras(batch, text_tokens, ref_k.shape[2], query.device)
            elif state.gating.use_grouped(query):
                groups = state.gating.generation_groups(
                    key, value, ref_k.to(key.dtype), ref_v.to(value.dtype), text_tokens, style_k, style_v
                )
            if groups is None:
                extra_k = [ref_k.to(key.dtype)] + ([style_k] if style_k is not None else [])
                extra_v = [ref_v.to(value.dtype)] + ([style_v] if style_v is not None else [])
                key = torch.cat([key, *extra_k], dim=2)
                value = torch.cat([value, *extra_v], dim=2)
                if folded is None:
                    bias = state.gating.generation_bias(batch, text_tokens, query.dtype, query.device)
    elif state is not None and not isinstance(state, (ReferencePassState, GenerationPassState)):
        raise InputError(f"{KWARG} must come from hairdiff_core.method.reference, got {type(state).__name__}")

    if groups is not None:
        return grouped_attention(query, groups)
    if folded is not None:
        return folded_attention(query, key, value, *folded)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)


def _match_reference(cached, batch: int):
    ref_k, ref_v = cached
    rb = ref_k.shape[0]
    if rb != batch:
        if batch % rb:
            raise InputError(
                f"the generation batch ({batch}) is not a multiple of the reference batch ({rb}); "
                f"give one reference per photo"
            )
        if rb == 1:  # a view: the concatenation below copies it once anyway
            ref_k, ref_v = ref_k.expand(batch, -1, -1, -1), ref_v.expand(batch, -1, -1, -1)
        else:  # [uncond, cond] halves each line up with the reference batch
            ref_k, ref_v = ref_k.repeat(batch // rb, 1, 1, 1), ref_v.repeat(batch // rb, 1, 1, 1)
    return ref_k, ref_v


# --------------------------------------------------------------------------------------------
# Installing and restoring
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def reference_processors(transformer) -> Iterator[ReferenceAttnProcessor]:
    """Install one ``ReferenceAttnProcessor`` on every attention module; always restore.

    The originals (identity included: attn and attn2 of a block may share one object) come
    back on exit, also when the body raises or is interrupted. Training can hold this around a
    whole run: without a ``hairdiff_reference`` kwarg the processor is the stock computation.
    """
    snapshot = dict(transformer.attn_processors)
    processor = ReferenceAttnProcessor()
    transformer.set_attn_processor(processor)
    try:
        yield processor
    finally:
        transformer.set_attn_processor(dict(snapshot))


def reference_pass(
    transformer,
    model_input: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    gating: ReferenceGating | None,
    settings: ReferenceSettings,
) -> ReferenceCache:
    """Run one reference forward and return its K/V cache (lower-level API, e.g. training).

    ``model_input`` is the full transformer input (reference latent + zero sketch channels).
    Gradients follow the caller's grad mode; wrap in ``torch.no_grad()`` for a frozen reference.
    Needs ``reference_processors`` (or equivalent) installed.
    """
    cache = ReferenceCache()
    state = ReferencePassState(
        cache, gating, settings.include_attn2, _participating(transformer, settings.include_attn2)
    )
    try:
        transformer(
            hidden_states=model_input,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            joint_attention_kwargs={KWARG: state},
            return_dict=False,
        )
    except ReferenceComplete:
        pass  # the last block's attention output, feed-forward and proj_out would be thrown away
    if not cache:
        raise InputError(
            "the reference pass stored no K/V: the transformer's attention processors are not "
            "HairDiff's; install them with reference_processors(transformer)"
        )
    return cache


def _participating(transformer, include_attn2: bool) -> int | None:
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        return None
    n = len(blocks)
    if include_attn2:
        n += sum(getattr(b, "attn2", None) is not None for b in blocks)
    return n


def generation_kwargs(cache: ReferenceCache, gating: ReferenceGating, settings: ReferenceSettings) -> dict:
    """The ``joint_attention_kwargs`` of a generation forward that uses ``cache``."""
    return {KWARG: GenerationPassState(cache, gating, settings.include_attn2)}


# --------------------------------------------------------------------------------------------
# The sampling-call hook (the contract with sampler.TransformerDenoiser)
# --------------------------------------------------------------------------------------------
class _OffHook:
    reference_passes = 0

    def step_kwargs(self, sigma: float, step: int) -> dict:
        return {}


def reference_latent_at(
    settings: ReferenceSettings, latent: torch.Tensor, noise: torch.Tensor, sigma: float
) -> torch.Tensor:
    """The latent a reference pass at ``sigma`` sees (image channels only, the model's latent space):
    ``clean`` = the photo as is (the timestep still says sigma: the published pass), ``matched`` =
    the photo noised to sigma with the generation's noise."""
    if settings.noise == "clean":
        return latent
    return (1.0 - sigma) * latent + sigma * noise


class ReferenceSchedule:
    """When reference passes run and which K/V a step uses, for any host.

    ``once``: one pass per sampling call at ``once_sigma``, reused by every step; ``per_step``: a
    pass for every new (step, sigma) the sampler asks about (a second call at the same step and
    sigma, e.g. the other half of classifier-free guidance run separately, reuses it). The previous
    K/V are dropped before the next pass runs, so at most one cache is alive.
    """

    def __init__(self, settings: ReferenceSettings):
        self.settings = settings
        self.cache: ReferenceCache | None = None
        self.cached_at: tuple | None = None
        self.passes = 0

    def cache_for(self, sigma: float, step, run_pass) -> ReferenceCache:
        """The K/V for a model call at (``step``, ``sigma``); ``run_pass(pass_sigma)`` computes new ones."""
        if self.settings.mode == "once":
            if self.cache is None:
                self.cache = run_pass(self.settings.once_sigma)
                self.passes += 1
            return self.cache
        at = (None if step is None else int(step), float(sigma))
        if self.cache is None or self.cached_at != at:
            self.cache = None
            self.cache = run_pass(float(sigma))
            self.cached_at = at
            self.passes += 1
        return self.cache

    def clear(self) -> None:
        self.cache = None
        self.cached_at = None


class ReferenceHook:
    """Runs the reference pass when needed and hands out each step's attention kwargs.

    With a style reference (``style_latent``: (B|1, 16, hs, ws), any size with multiples of the
    patch; ``style_token_mask``: its matte's coverage on its token grid; ``style_noise``: its
    noise for ``matched``, same shape) a style pass runs right after every reference pass (the
    same schedule, sigma and noise mode) and its K/V ride on the cache (``cache.style``). A
    ``style_weight`` of 0 runs no style pass at all (exactly the hook without a style photo).
    """

    def __init__(
        self,
        transformer,
        settings: ReferenceSettings,
        reference_latent: torch.Tensor,
        token_mask: torch.Tensor,
        noise: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        style_latent: torch.Tensor | None = None,
        style_token_mask: torch.Tensor | None = None,
        style_noise: torch.Tensor | None = None,
        style_weight: float = 1.0,
    ):
        if (
            not isinstance(reference_latent, torch.Tensor)
            or reference_latent.ndim != 4
            or reference_latent.shape[1] != BASE_CHANNELS
        ):
            shape = (
                tuple(reference_latent.shape)
                if isinstance(reference_latent, torch.Tensor)
                else type(reference_latent).__name__
            )
            raise InputError(f"reference_latent must be a (B, {BASE_CHANNELS}, h, w) SD3 latent, got {shape}")
        B, _, h, w = reference_latent.shape
        patch = int(transformer.config.patch_size)
        if h % patch or w % patch:
            raise InputError(f"the reference latent is {w}x{h}; both sides must be multiples of {patch}")
        if tuple(noise.shape) != tuple(reference_latent.shape):
            raise InputError(
                f"noise has shape {tuple(noise.shape)} but the reference latent has "
                f"{tuple(reference_latent.shape)}; pass the generation's noise"
            )
        self.transformer = transformer
        self.settings = settings
        param = transformer.pos_embed.proj.weight
        self.dtype, self.device = param.dtype, param.device
        self.latent = reference_latent.detach().to(self.device, torch.float32)
        self.noise = noise.detach().to(self.device, torch.float32)
        self.extra_channels = input_channels(transformer) - BASE_CHANNELS
        self.text = _batch_to(encoder_hidden_states, B, "encoder_hidden_states").to(self.device, self.dtype)
        self.pooled = _batch_to(pooled_projections, B, "pooled_projections").to(self.device, self.dtype)
        self.style_keys = None
        self.style_passes = 0
        style_weight = _as_float(style_weight, "style_weight")
        if not 0.0 <= style_weight <= REFERENCE_WEIGHT_MAX:
            raise InputError(
                f"style_weight must be from 0 to {REFERENCE_WEIGHT_MAX:g}, got {style_weight:g}", input="style_weight"
            )
        if style_latent is not None and style_weight > 0:
            self._set_style(style_latent, style_token_mask, style_noise, B, patch)
        self.gating = ReferenceGating(
            settings,
            _batch_to(token_mask, B, "token_mask").to("cpu"),
            (h // patch, w // patch),
            style=self.style_keys,
            style_weight=style_weight,
        )
        self.reference_passes = 0
        self.schedule = ReferenceSchedule(settings)

    def _set_style(self, latent, token_mask, noise, batch: int, patch: int) -> None:
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4 or latent.shape[1] != BASE_CHANNELS:
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise InputError(f"style_latent must be a (B, {BASE_CHANNELS}, h, w) SD3 latent, got {shape}")
        hs, ws = latent.shape[-2:]
        if hs % patch or ws % patch:
            raise InputError(f"the style latent is {ws}x{hs}; both sides must be multiples of {patch}")
        if token_mask is None or noise is None:
            raise InputError("a style latent needs its style_token_mask and style_noise", input="style_matte")
        if tuple(noise.shape[1:]) != tuple(latent.shape[1:]):
            raise InputError(
                f"style_noise has shape {tuple(noise.shape)} but the style latent has {tuple(latent.shape)}"
            )
        grid = (hs // patch, ws // patch)
        if tuple(token_mask.shape[-2:]) != grid:
            token_mask = M.resize_area(token_mask.float(), grid)
        self.style_latent = _batch_to(latent, batch, "style_latent").detach().to(self.device, torch.float32)
        self.style_noise = _batch_to(noise, batch, "style_noise").detach().to(self.device, torch.float32)
        self.style_keys = StyleKeys(_batch_to(token_mask, batch, "style_token_mask").to("cpu"), self.settings.key_pool)

    def _model_input(self, sigma: float) -> torch.Tensor:
        x = reference_latent_at(self.settings, self.latent, self.noise, sigma)
        if self.extra_channels:
            x = torch.cat([x, torch.zeros(x.shape[0], self.extra_channels, *x.shape[2:], device=x.device)], dim=1)
        return x.to(self.dtype)

    def run_reference(self, sigma: float) -> ReferenceCache:
        timestep = timestep_from_sigma(sigma, self.latent.shape[0], device=self.device, dtype=self.dtype)
        with torch.no_grad():
            cache = reference_pass(
                self.transformer, self._model_input(sigma), timestep, self.text, self.pooled, self.gating, self.settings
            )
        self.reference_passes += 1
        if self.style_keys is not None:
            cache.style = self.run_style(sigma, timestep)
        logger.debug(
            "reference pass %d at sigma %.4f: %.1f MiB of K/V", self.reference_passes, sigma, cache.nbytes() / 2**20
        )
        return cache

    def run_style(self, sigma: float, timestep: torch.Tensor) -> ReferenceCache:
        """The style pass at ``sigma``: the style photo's latent seen as the reference's is (clean or
        matched), its style keys stored."""
        x = reference_latent_at(self.settings, self.style_latent, self.style_noise, sigma)
        if self.extra_channels:
            x = torch.cat([x, torch.zeros(x.shape[0], self.extra_channels, *x.shape[2:], device=x.device)], dim=1)
        with torch.no_grad():
            cache = reference_pass(
                self.transformer, x.to(self.dtype), timestep, self.text, self.pooled, self.style_keys, self.settings
            )
        self.style_passes += 1
        return cache

    @property
    def _cache(self) -> ReferenceCache | None:
        """The K/V alive now (None once closed): what tests check is freed."""
        return self.schedule.cache

    def step_kwargs(self, sigma: float, step: int) -> dict:
        cache = self.schedule.cache_for(sigma, step, self.run_reference)
        return generation_kwargs(cache, self.gating, self.settings)

    def close(self) -> None:
        self.schedule.clear()
        self.gating.clear()
        if self.style_keys is not None:
            self.style_keys.clear()


def _batch_to(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{what} must be a tensor, got {type(t).__name__}")
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise InputError(f"{what} has batch {t.shape[0]} but the reference latent has batch {batch}; give 1 or {batch}")


@contextlib.contextmanager
def reference_attention(
    transformer,
    settings,
    *,
    reference_latent: torch.Tensor,
    token_mask: torch.Tensor,
    noise: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    style_latent: torch.Tensor | None = None,
    style_token_mask: torch.Tensor | None = None,
    style_noise: torch.Tensor | None = None,
    style_weight: float = 1.0,
):
    """Reference attention for one sampling call.

    Yields a hook whose ``step_kwargs(sigma, step)`` returns the step's ``joint_attention_kwargs``
    (running the reference pass when needed: every step in ``per_step``, the first call in
    ``once``). ``reference_latent`` is the (B, 16, h, w) SD3-scaled latent of the photo (or of
    the filled photo), ``noise`` the generation's noise (same shape), ``token_mask`` the (B, 1,
    h/2, w/2) token-grid soft mask; text embeddings are the conditional ones (B or 1 rows).
    The generation batch may be a multiple of B (classifier-free guidance: one reference pass
    serves both halves). On exit, also on error or interrupt, the original processors are back
    and the cache is freed. ``mode="off"`` touches nothing and yields a hook returning ``{}``.

    ``style_*``: an optional style reference (see ``ReferenceHook``); it needs the mode on.
    """
    settings = ReferenceSettings.coerce(settings)
    if settings.mode == "off":
        if style_latent is not None:
            raise InputError("a style photo needs reference attention on (mode once or per_step)", input="reference")
        yield _OffHook()
        return
    with reference_processors(transformer):
        hook = ReferenceHook(
            transformer,
            settings,
            reference_latent,
            token_mask,
            noise,
            encoder_hidden_states,
            pooled_projections,
            style_latent=style_latent,
            style_token_mask=style_token_mask,
            style_noise=style_noise,
            style_weight=style_weight,
        )
        try:
            yield hook
        finally:
            hook.close()


def predicted_cache_bytes(
    transformer, latent_hw: tuple[int, int], batch: int = 1, include_attn2: bool = True, dtype=None
) -> int:
    """layers x 2 (K and V) x tokens x hidden x bytes: the reference cache's size."""
    cfg = transformer.config
    tokens = (latent_hw[0] // cfg.patch_size) * (latent_hw[1] // cfg.patch_size)
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    layers = int(cfg.num_layers)
    if include_attn2:
        layers += len(tuple(cfg.dual_attention_layers or ()))
    itemsize = torch.tensor([], dtype=dtype or transformer.pos_embed.proj.weight.dtype).element_size()
    return layers * 2 * batch * tokens * hidden * itemsize


# --------------------------------------------------------------------------------------------
# Filling the hair region (reference_input="filled")
# --------------------------------------------------------------------------------------------
def fill_hair_region(image01: torch.Tensor, matte01: torch.Tensor, grow_px: int | None = None) -> torch.Tensor:
    """Replace the (slightly grown) matte region by a smooth fill from its surroundings.

    Push-pull: known pixels are averaged down a pyramid (weighted by how much of each cell is
    known) and the holes are filled back up from the coarsest level with bilinear upsampling,
    so a hole takes the colours of its rim, blending to the average of what lies around it.
    Pixels outside the grown matte are returned unchanged. ``grow_px`` defaults to side/128
    (8 px at 1024): stray strands at the matte's edge are old hair too.
    """
    if not isinstance(image01, torch.Tensor) or image01.ndim != 4:
        raise InputError("fill_hair_region: image must be a (B, C, H, W) tensor in [0, 1]")
    if not isinstance(matte01, torch.Tensor) or matte01.ndim != 4 or matte01.shape[1] != 1:
        raise InputError("fill_hair_region: matte must be a (B, 1, H, W) tensor in [0, 1]")
    if matte01.shape[-2:] != image01.shape[-2:] or matte01.shape[0] not in (1, image01.shape[0]):
        raise InputError(f"fill_hair_region: matte {tuple(matte01.shape)} does not match image {tuple(image01.shape)}")
    H, W = image01.shape[-2:]
    grow = max(1, round(max(H, W) / 128)) if grow_px is None else int(grow_px)
    hole = M.dilate((matte01.float() > 0.5).float(), grow) if grow > 0 else (matte01.float() > 0.5).float()
    hole = hole.expand(image01.shape[0], 1, H, W)
    known = 1.0 - hole
    img = image01.float()
    levels = [(img * known, known)]
    while min(levels[-1][1].shape[-2:]) > 1:
        c, k = levels[-1]
        c, k = F.avg_pool2d(c, 2, ceil_mode=True), F.avg_pool2d(k, 2, ceil_mode=True)
        levels.append((c, k))
    # Coarsest level: where nothing at all is known, fall back to mid grey.
    c, k = levels[-1]
    filled = torch.where(k > 0, c / k.clamp_min(1e-8), torch.full_like(c, 0.5))
    for c, k in reversed(levels[:-1]):
        up = F.interpolate(filled, size=c.shape[-2:], mode="bilinear", align_corners=False)
        colour = c / k.clamp_min(1e-8)
        alpha = k.clamp(0.0, 1.0)
        filled = alpha * colour + (1 - alpha) * up
    out = torch.where(hole > 0, filled.clamp(0, 1), img)
    return out.to(image01.dtype)
