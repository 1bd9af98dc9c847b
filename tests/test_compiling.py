"""Regional compilation with HairDiff's processor: same outputs, no recompilation per step.

Uses the ``eager`` backend (dynamo traces, no inductor code generation) to stay fast; what is
checked is the tracing contract: graphs are built once and reused by reference off/once/per_step.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hairdiff_core.errors import InputError
from hairdiff_core.method.flow import timestep_from_sigma
from hairdiff_core.method.reference import ReferenceSettings, reference_attention
from hairdiff_core.method.surgery import widen_input_channels
from hairdiff_core.models.compiling import CompileSettings, compile_blocks, compiled_blocks


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@torch.no_grad()
def test_compiled_blocks_serve_every_reference_mode_without_recompiling(tiny_transformer, fresh_dynamo):
    model = widen_input_channels(tiny_transformer)
    g = torch.Generator().manual_seed(0)
    x0, noise, sketch = (torch.randn(1, 16, 8, 8, generator=g) for _ in range(3))
    text, pooled = torch.randn(1, 7, 32, generator=g), torch.randn(1, 64, generator=g)
    token_mask = torch.zeros(1, 1, 4, 4)
    token_mask[..., 1:3, 1:3] = 1.0

    def sample_all_modes():
        outs = []
        for mode in ("off", "once", "per_step"):
            with reference_attention(
                model,
                ReferenceSettings(mode=mode),
                reference_latent=x0,
                token_mask=token_mask,
                noise=noise,
                encoder_hidden_states=text,
                pooled_projections=pooled,
            ) as hook:
                for step, sigma in enumerate((0.9, 0.6)):
                    outs.append(
                        model(
                            hidden_states=torch.cat([x0 * (1 - sigma) + noise * sigma, sketch], 1),
                            encoder_hidden_states=text,
                            pooled_projections=pooled,
                            timestep=timestep_from_sigma(sigma, 1),
                            joint_attention_kwargs=hook.step_kwargs(sigma, step) or None,
                            return_dict=False,
                        )[0]
                    )
        return outs

    eager = sample_all_modes()
    assert compile_blocks(model, backend="eager") == len(model.transformer_blocks)
    first = sample_all_modes()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0  # the blocks really went through dynamo
    second = sample_all_modes()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompilation
    for a, b, c in zip(eager, first, second):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=0, atol=1e-5)
    assert not torch.equal(eager[0], eager[2])  # the reference modes do differ


def test_compile_refusals_name_the_problem(tiny_transformer):
    with pytest.raises(InputError, match="CUDA graphs"):
        compile_blocks(tiny_transformer, mode="reduce-overhead")
    with pytest.raises(InputError, match="transformer_blocks, got Linear"):
        compile_blocks(torch.nn.Linear(2, 2))


def _forward(model):
    """One forward of a widened tiny-shaped transformer, on the same random inputs every call."""
    g = torch.Generator().manual_seed(0)
    return model(
        hidden_states=torch.randn(1, 32, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
        pooled_projections=torch.randn(1, 64, generator=g),
        timestep=timestep_from_sigma(0.5, 1),
        return_dict=False,
    )[0]


@torch.no_grad()
def test_compiled_blocks_compile_inside_the_with_only_and_reuse_the_code(tiny_transformer, fresh_dynamo, caplog):
    model = widen_input_channels(tiny_transformer)

    def forward():
        return _forward(model)

    stats = torch._dynamo.utils.counters["stats"]
    eager = forward()
    with caplog.at_level("INFO", logger="hairdiff_core.models.compiling"):
        with compiled_blocks(model, CompileSettings(backend="eager")) as n:
            assert n == len(model.transformer_blocks)
            inside = forward()
    assert "the first step waits for the compiler" in caplog.text  # why the first step is slow
    caplog.clear()
    graphs = stats["unique_graphs"]
    assert graphs > 0  # dynamo traced the blocks inside the with
    after = forward()
    assert stats["unique_graphs"] == graphs  # ... and not after it: the blocks run eagerly again
    assert all(block._compiled_call_impl is None for block in model.transformer_blocks)
    with caplog.at_level("INFO", logger="hairdiff_core.models.compiling"):
        with compiled_blocks(model, CompileSettings(backend="eager")):
            again = forward()
    assert stats["unique_graphs"] == graphs  # a second entry reuses the compiled code
    assert "first step" not in caplog.text  # ... and says nothing about compiling
    torch.testing.assert_close(inside, eager, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=0, atol=1e-5)
    assert torch.equal(after, eager)  # same model, same eager path

    compile_blocks(model, backend="eager")  # a model compiled for good stays compiled after a with
    kept = [block._compiled_call_impl for block in model.transformer_blocks]
    with compiled_blocks(model, CompileSettings(backend="eager")):
        pass
    assert [block._compiled_call_impl for block in model.transformer_blocks] == kept
    with compiled_blocks(model, None) as n:
        assert n == 0


def test_compiled_blocks_restore_the_model_when_sampling_fails(tiny_transformer):
    model = widen_input_channels(tiny_transformer)
    with pytest.raises(RuntimeError, match="cancelled"), compiled_blocks(model, CompileSettings(backend="eager")):
        raise RuntimeError("cancelled")
    assert all(block._compiled_call_impl is None for block in model.transformer_blocks)


def test_compile_settings_refuse_what_cannot_work():
    with pytest.raises(InputError, match="CUDA graphs") as info:
        CompileSettings(mode="reduce-overhead")
    assert info.value.input == "mode"
    with pytest.raises(InputError, match="backend 'cudagraphs' is not one of inductor, eager") as info:
        CompileSettings(backend="cudagraphs")
    assert info.value.input == "backend"
    with pytest.raises(InputError, match="mode 'max-autotune' is not one of default, max-autotune-no-cudagraphs"):
        CompileSettings(mode="max-autotune")
    with pytest.raises(InputError, match="transformer_blocks, got Linear"):
        with compiled_blocks(torch.nn.Linear(2, 2), CompileSettings()):
            pass


@torch.no_grad()
def test_fp8_storage_compiles_every_block_into_the_same_graphs(fresh_dynamo):
    """Stored fp8 Linears upcast inside their own class's forward, so every block of a kind is
    the same graph: diffusers' casting hook rebuilt Parameters (a graph break at every Linear),
    and any per-module hook is a ``forward`` object dynamo guards on by identity (one
    recompilation per block: past dynamo's limit of 8, the rest would run eagerly)."""
    from diffusers import SD3Transformer2DModel

    from hairdiff_core.models.memory import apply_weights
    from hairdiff_core.models.tiny import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    # 6 blocks: 5 plain joint blocks (one graph) and the last, context-pre-only one (another).
    config = dict(TINY_TRANSFORMER_CONFIG, num_layers=6, dual_attention_layers=())
    plain = widen_input_channels(SD3Transformer2DModel(**config).eval())
    stored = copy.deepcopy(plain)
    apply_weights(stored, "fp8_e4m3fn")

    counters = torch._dynamo.utils.counters
    with compiled_blocks(plain, CompileSettings(backend="eager")):
        _forward(plain)
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()
    counters.clear()
    eager = _forward(stored)
    with compiled_blocks(stored, CompileSettings(backend="eager")):
        compiled = _forward(stored)
    assert counters["stats"]["unique_graphs"] == 2  # as without fp8: no graph per block
    assert not counters["graph_break"]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_a_compiler_that_fails_is_reported_plainly(tiny_transformer, fresh_dynamo, monkeypatch):
    """A missing C++ compiler or Triton surfaces in the first step, deep inside dynamo: the error
    says what failed and what to do, and the model is left eager."""
    from hairdiff_core.errors import CompileError
    from hairdiff_core.models import compiling

    def no_compiler(graph_module, example_inputs):
        raise RuntimeError("Compiler: cc not found\nmore detail")

    monkeypatch.setitem(compiling._BACKENDS, "eager", no_compiler)
    model = widen_input_channels(tiny_transformer)
    with pytest.raises(
        CompileError, match=r"backend eager\) could not compile .*cc not found\. inductor needs"
    ) as info:
        with torch.no_grad(), compiled_blocks(model, CompileSettings(backend="eager")):
            _forward(model)
    assert info.value.input == "model" and "more detail" not in str(info.value)
    assert all(block._compiled_call_impl is None for block in model.transformer_blocks)
