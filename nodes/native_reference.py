"""HairDiff Reference Attention on ComfyUI's own SD3 model: per-block replace patches on a clone.

How the pieces meet (ComfyUI 0.8.0):

- The photo latent, the soft matte, the noise and the positive text exist together only inside a
  sampling call, so a ``SAMPLER_SAMPLE`` wrapper (``CFGGuider.inner_sample`` -> ``sampler.sample``)
  opens one *run* there: it receives the guider (its processed conds: the positive text, the
  filled-photo latent of HairDiff Sketch Conditioning), the latent already in the model's space
  (``process_latent_in``), the ``denoise_mask`` (the LATENT's ``noise_mask`` at latent size) and
  the raw noise, for any sampler (HairDiff's, or ComfyUI's own through KSampler). The run rides in
  that call's own ``model_options`` clone and is closed in a ``finally``: its K/V are gone after the
  run, on Cancel and on any error, and no state is ever left on the ModelPatcher or the module.
- An ``APPLY_MODEL`` wrapper asks the core's ``ReferenceSchedule`` for each model call's K/V
  (``once``: one reference pass at ``once_sigma`` per run; ``per_step``: one per new sigma) and
  marks the call's ``transformer_options`` with the pass state.
- One ``("dit", "double_block", i)`` replace per joint block (a closure over ``i``: ComfyUI's MMDiT
  does not put a block index in ``transformer_options``) runs ComfyUI's own block halves
  (``pre_attention`` / ``post_attention``) around the core's ``joint_attention``, which stores
  (reference pass) or appends with the gating's biases (generation pass) the block's image K/V.
  Unmarked calls (no run, e.g. another patcher's sampling) run the original block.

The gating, key exclusion, key budgets and kernels are ``hairdiff_core.method.reference``'s; this module
only moves tensors between ComfyUI's layouts and the core's.
"""

from __future__ import annotations

import weakref

import torch
from comfy_api.latest import io

from ..hairdiff_core.errors import HairDiffError
from ..hairdiff_core.method.reference import (
    GenerationPassState,
    ReferenceCache,
    ReferenceComplete,
    ReferenceGating,
    ReferencePassState,
    ReferenceSchedule,
    ReferenceSettings,
    joint_attention,
    reference_latent_at,
)
from .convert import check_widgets, input_of, node_error
from .native_sampling import CONDITIONING_NODE, FILLED_KEY

REFERENCE_NODE = "HairDiff Reference Attention"
#: transformer_options keys: the sampling call's run, and the pass a model call belongs to.
RUN_KEY = "hairdiff_reference_run"
PASS_KEY = "hairdiff_reference_pass"
WRAPPER_KEY = "hairdiff_reference"
_BASE_CHANNELS = 16


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """ComfyUI's (B, L, heads*d) or (B, L, heads, d) -> the core's (B, heads, L, d)."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    """The core's (B, heads, L, d) -> ComfyUI's (B, L, heads*d)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def joint_block(block, txt, img, vec, state, index: int):
    """ComfyUI's ``_block_mixing`` for one ``JointBlock`` with the core's attention in the middle."""
    cb, xb = block.context_block, block.x_block
    c_qkv, c_rest = cb.pre_attention(txt, vec)
    if xb.x_block_self_attn:
        x_qkv, x_qkv2, x_rest = xb.pre_attention_x(img, vec)
    else:
        x_qkv, x_rest = xb.pre_attention(img, vec)
    heads = xb.attn.num_heads
    q, k, v = (_heads(t, heads) for t in x_qkv)
    tq, tk, tv = (_heads(t, heads) for t in c_qkv)
    out = joint_attention((index, "attn"), q, k, v, tq, tk, tv, state)
    n = q.shape[2]
    x_attn, c_attn = _merge(out[:, :, :n]), _merge(out[:, :, n:])
    txt = None if cb.pre_only else cb.post_attention(c_attn, *c_rest)
    if xb.x_block_self_attn:
        heads2 = xb.attn2.num_heads
        q2, k2, v2 = (_heads(t, heads2) for t in x_qkv2)
        attn2 = _merge(joint_attention((index, "attn2"), q2, k2, v2, state=state))
        img = xb.post_attention_x(x_attn, attn2, *x_rest)
    else:
        img = xb.post_attention(x_attn, *x_rest)
    return txt, img


def block_patch(index: int):
    """The replace patch of joint block ``index``."""

    def patch(args: dict, extra: dict) -> dict:
        marked = _deref(args["transformer_options"].get(PASS_KEY))
        if marked is None:
            return extra["original_block"](args)
        state, blocks = marked.state, marked.blocks
        txt, img = joint_block(blocks[index], args["txt"], args["img"], args["vec"], state, index)
        return {"txt": txt, "img": img}

    return patch


def _deref(ref):
    """transformer_options carry weak references: ComfyUI keeps copies of a call's options alive
    after the call (frames held by checkpointed blocks), and those must not keep K/V or a run."""
    return None if ref is None else ref()


def _positive(guider, name: str):
    conds = (getattr(guider, "conds", None) or {}).get("positive") or []
    for c in conds:
        found = c.get("model_conds", {}).get(name)
        if found is not None:
            return found.cond
    return None


def _filled(guider):
    for c in (getattr(guider, "conds", None) or {}).get("positive") or []:
        if c.get(FILLED_KEY) is not None:
            return c[FILLED_KEY]
    return None


def _to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    return t[:1].expand(batch, *t.shape[1:])


class ReferenceRun:
    """One sampling call's reference attention: the photo, the gating, the schedule, the K/V."""

    def __init__(self, settings: ReferenceSettings, guider, latent_image, denoise_mask, noise):
        base = guider.inner_model
        self.settings = settings
        self.base = base
        self.blocks = base.diffusion_model.joint_blocks
        latent = latent_image.detach().float()
        if settings.reference_input == "filled":
            filled = _filled(guider)
            if filled is None:
                raise node_error(
                    REFERENCE_NODE,
                    "reference_input",
                    "'filled' needs the filled photo, and the conditioning has none",
                    f"connect positive through {CONDITIONING_NODE}, or use reference_input 'photo'",
                )
            filled = base.process_latent_in(filled.to(latent.device, torch.float32))
            latent = _to_batch(filled, latent.shape[0])
        self.latent = latent
        self.noise = noise.detach().float().to(latent.device)
        B, _, h, w = latent.shape
        patch = int(base.diffusion_model.patch_size)
        if h % patch or w % patch:
            raise node_error(REFERENCE_NODE, "model", f"the latent is {w}x{h}; both sides must be multiples of {patch}")
        # The latent-grid matte; the core area-resizes it to the token grid (as token_grid does
        # to the working-size matte: a mean of means over equal cells).
        matte = denoise_mask[:, :1].detach().float().to("cpu")
        try:
            self.gating = ReferenceGating(settings, _to_batch(matte, B), (h // patch, w // patch))
        except HairDiffError as exc:
            raise node_error(REFERENCE_NODE, input_of(exc, default="model"), exc) from exc
        context, pooled = _positive(guider, "c_crossattn"), _positive(guider, "y")
        if context is None or pooled is None:
            raise node_error(
                REFERENCE_NODE,
                "model",
                "the sampling call has no positive SD3 conditioning for the reference pass",
                "sample with a guider that has a positive input (CFGGuider, BasicGuider, HairDiff Sample)",
            )
        self.context, self.pooled = _to_batch(context, B), _to_batch(pooled, B)
        channels = int(base.diffusion_model.x_embedder.proj.weight.shape[1])
        self.extra_channels = channels - _BASE_CHANNELS
        expected = len(self.blocks)
        if settings.include_attn2:
            expected += sum(bool(b.x_block.x_block_self_attn) for b in self.blocks)
        self.expected = expected
        self.schedule = ReferenceSchedule(settings)

    def generation_state(self, sigma: float, transformer_options: dict) -> GenerationPassState:
        cache = self.schedule.cache_for(sigma, None, lambda s: self.reference_pass(s, transformer_options))
        return GenerationPassState(cache, self.gating, self.settings.include_attn2)

    def reference_pass(self, sigma: float, transformer_options: dict) -> ReferenceCache:
        """The model on the photo (sketch channels zero in the model's space, the core's input),
        positive text, at ``sigma``; the forward ends after the last block's K/V."""
        x = reference_latent_at(self.settings, self.latent, self.noise, sigma)
        concat = None
        if self.extra_channels:
            concat = x.new_zeros(x.shape[0], self.extra_channels, *x.shape[2:])
        cache = ReferenceCache()
        state = ReferencePassState(cache, self.gating, self.settings.include_attn2, self.expected)
        marked = _Marked(state, self.blocks)
        options = dict(transformer_options)
        options[PASS_KEY] = weakref.ref(marked)
        options["cond_or_uncond"] = [0]
        sigmas = torch.full((x.shape[0],), float(sigma), device=x.device)
        # _apply_model, not apply_model: the APPLY_MODEL wrappers serve the sampler's calls (the
        # adapter's would bring the zero sketch channels into the latent space a second time).
        with torch.no_grad():
            try:
                self.base._apply_model(x, sigmas, concat, self.context, None, options, y=self.pooled)
            except ReferenceComplete:
                pass
        if len(cache) != self.expected:
            raise node_error(
                REFERENCE_NODE,
                "model",
                f"the reference pass stored {len(cache)} of {self.expected} blocks' keys: another node replaced "
                "this model's joint blocks after HairDiff Reference Attention",
                "put HairDiff Reference Attention last on the model path",
            )
        return cache

    def close(self) -> None:
        self.schedule.clear()
        self.gating.clear()


class ReferenceSamplerWrapper:
    """SAMPLER_SAMPLE wrapper: one ``ReferenceRun`` per sampling call, always closed."""

    def __init__(self, settings: ReferenceSettings):
        self.settings = settings

    def __call__(self, executor, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, *rest):
        if denoise_mask is None:
            raise node_error(
                REFERENCE_NODE,
                "model",
                "the latent being sampled has no soft matte (noise_mask); the reference is gated by it",
                f"sample the latent output of {CONDITIONING_NODE}",
            )
        run = ReferenceRun(self.settings, guider, latent_image, denoise_mask, noise)
        options = extra_args["model_options"].setdefault("transformer_options", {})
        options[RUN_KEY] = weakref.ref(run)
        try:
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, *rest)
        finally:
            options.pop(RUN_KEY, None)
            run.close()


class _Marked:
    """(pass state, joint blocks) of one model call; weakly referenced from its options."""

    __slots__ = ("state", "blocks", "__weakref__")

    def __init__(self, state, blocks):
        self.state, self.blocks = state, blocks


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
    """APPLY_MODEL wrapper: marks a sampler's model call with its generation pass (and runs the
    reference pass the schedule asks for first)."""
    options = transformer_options or {}
    run = _deref(options.get(RUN_KEY))
    # A reference nobody can see is the plain model: the original blocks then run, bit for bit.
    if run is None or options.get(PASS_KEY) is not None or not run.gating.changes_attention():
        return executor(x, t, c_concat, c_crossattn, control, options, **kw)
    marked = _Marked(run.generation_state(float(t.flatten()[0]), options), run.blocks)
    options = dict(options)
    options[PASS_KEY] = weakref.ref(marked)
    return executor(x, t, c_concat, c_crossattn, control, options, **kw)


class HairDiffReferenceAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HairDiff_ReferenceAttention",
            display_name=REFERENCE_NODE,
            category="HairDiff/sampling",
            description=(
                "Makes the generated hair attend to the photo's keys and values (K/V sharing, gated by the soft "
                "matte), so it takes the photo's light and colour. Patches a copy of an SD3 MODEL (after HairDiff "
                "Apply Adapter); the photo and matte come from the latent being sampled (HairDiff Sketch "
                "Conditioning's), with any sampler. Put it last on the model path: it replaces the joint blocks."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD3 / SD3.5 model, e.g. from HairDiff Apply Adapter."),
                io.Combo.Input(
                    "mode",
                    options=["once", "per_step", "off"],
                    default="once",
                    tooltip="once = one reference pass reused for every step (about 1x cost); per_step = a "
                    "reference pass at every step (faithful, about 2x cost); off = no reference.",
                ),
                io.Float.Input(
                    "weight_inside",
                    default=0.5,
                    min=0.0,
                    max=4.0,
                    step=0.05,
                    tooltip="How strongly the new hair sees the photo: higher takes more of its light, "
                    "too high pulls toward copying it; 0 = not at all.",
                ),
                io.Float.Input(
                    "weight_outside",
                    default=1.0,
                    min=0.0,
                    max=4.0,
                    step=0.05,
                    tooltip="How strongly pixels outside the hair see the photo (1 = like their own keys).",
                ),
                io.Float.Input(
                    "suppress_self_outside",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Down-weights the generation's own keys outside the hair (1 = they read the "
                    "photo almost only from the reference).",
                ),
                io.Float.Input(
                    "key_weight_inside",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Weight of the photo's keys inside the matte, which carry the OLD hair: 0 "
                    "excludes them (no old style leaks in), 1 keeps them.",
                ),
                io.Combo.Input(
                    "reference_input",
                    options=["photo", "filled"],
                    default="photo",
                    tooltip="photo = the original photo; filled = a copy with the hair region filled from "
                    "its surroundings (even less of the old hair; HairDiff Sketch Conditioning provides it).",
                ),
                io.Combo.Input(
                    "reference_noise",
                    options=["auto", "clean", "matched"],
                    default="auto",
                    optional=True,
                    tooltip="What the look at the photo sees: clean = the photo itself at every step (the "
                    "published method), matched = the photo as noisy as the image being drawn; "
                    "auto = clean for per_step, matched for once.",
                ),
                io.Combo.Input(
                    "key_pool",
                    options=["1", "2", "4"],
                    default="1",
                    optional=True,
                    tooltip="Key budget: average the photo's keys over NxN token cells (2 = 4x fewer "
                    "reference keys, cheaper attention; 1 = every key).",
                ),
                io.Int.Input(
                    "key_ring",
                    default=0,
                    min=0,
                    max=256,
                    optional=True,
                    tooltip="Key budget: only the photo's keys within this many tokens (16 px each) of the "
                    "matte; 0 = all of them.",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL",
                    tooltip="A copy of the model with the reference patch; the incoming model is unchanged.",
                )
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        mode="once",
        weight_inside=0.5,
        weight_outside=1.0,
        suppress_self_outside=0.0,
        key_weight_inside=0.0,
        reference_input="photo",
        reference_noise="auto",
        key_pool="1",
        key_ring=0,
    ) -> io.NodeOutput:
        import comfy.model_base
        import comfy.patcher_extension

        node = REFERENCE_NODE
        # One place checks every widget (ComfyUI 0.8.0 checks the combos and ranges at submit, but a
        # validate_inputs over several inputs repeats its message once per input, and NaN passes).
        widgets = dict(
            mode=mode,
            weight_inside=weight_inside,
            weight_outside=weight_outside,
            suppress_self_outside=suppress_self_outside,
            key_weight_inside=key_weight_inside,
            reference_input=reference_input,
            reference_noise=reference_noise,
            key_pool=key_pool,
            key_ring=key_ring,
        )
        check_widgets(cls, widgets)
        try:
            settings = ReferenceSettings(
                mode=mode,
                weight_inside=weight_inside,
                weight_outside=weight_outside,
                suppress_self_outside=suppress_self_outside,
                key_weight_inside=key_weight_inside,
                reference_input=reference_input,
                reference_noise=reference_noise,
                key_pool=int(key_pool),
                key_ring=key_ring,
            )
        except (HairDiffError, ValueError) as exc:
            name = input_of(exc) if isinstance(exc, HairDiffError) else "key_pool"
            raise node_error(node, name, exc) from exc
        inner = getattr(model, "model", None)
        if not isinstance(inner, comfy.model_base.SD3):
            kind = type(inner).__name__ if inner is not None else type(model).__name__
            raise node_error(
                node,
                "model",
                f"reference attention patches SD3/SD3.5 models, and this is a {kind} model",
                "connect an SD3.5 model (Load Diffusion Model, HairDiff Apply Adapter)",
            )
        if settings.mode == "off":
            return io.NodeOutput(model)
        patched = model.clone()
        blocks = patched.get_model_object("diffusion_model").joint_blocks
        for i in range(len(blocks)):
            patched.set_model_patch_replace(block_patch(i), "dit", "double_block", i)
        WrappersMP = comfy.patcher_extension.WrappersMP
        patched.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, ReferenceSamplerWrapper(settings))
        patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
        patched.add_wrapper_with_key(WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY, prepare_sampling_wrapper)
        return io.NodeOutput(patched)


def cache_bytes(model, noise_shape) -> int:
    """The reference K/V cache of one run on ``model`` (the core's prediction, from the model's
    dims read off its weights): every joint layer's image-token K and V."""
    import types

    from ..hairdiff_core.method.reference import predicted_cache_bytes
    from .native_nodes import model_signature

    _family, dims = model_signature(model)
    shape = types.SimpleNamespace(config=types.SimpleNamespace(**dims))
    return predicted_cache_bytes(shape, tuple(noise_shape[-2:]), batch=int(noise_shape[0]), dtype=model.model_dtype())


def prepare_sampling_wrapper(executor, model, noise_shape, conds, model_options=None, force_full_load=False):
    """PREPARE_SAMPLING wrapper: the cache counts where ComfyUI estimates a model's memory
    (``BaseModel.memory_required``, which ``load_models_gpu`` frees room for), for this call only.
    The base model object is shared by every clone, so the estimate is put back in ``finally``."""
    inner = model.model
    extra = cache_bytes(model, noise_shape)
    own = inner.__dict__.get("memory_required")
    estimate = type(inner).memory_required.__get__(inner) if own is None else own

    def memory_required(input_shape, cond_shapes=None):
        return estimate(input_shape, cond_shapes=cond_shapes or {}) + extra

    inner.memory_required = memory_required
    try:
        return executor(model, noise_shape, conds, model_options=model_options, force_full_load=force_full_load)
    finally:
        if own is None:
            del inner.memory_required
        else:
            inner.memory_required = own


REFERENCE_NODES: list[type[io.ComfyNode]] = [HairDiffReferenceAttention]
