import pytest
import torch

from hairdiff_core.errors import ChannelCountError
from hairdiff_core.method.surgery import input_channels, widen_input_channels


def _forward(model, x):
    with torch.no_grad():
        return model(
            hidden_states=x,
            encoder_hidden_states=torch.randn(
                x.shape[0], 5, model.config.joint_attention_dim, generator=torch.Generator().manual_seed(1)
            ),
            pooled_projections=torch.randn(
                x.shape[0], model.config.pooled_projection_dim, generator=torch.Generator().manual_seed(2)
            ),
            timestep=torch.full((x.shape[0],), 700.0),
            return_dict=False,
        )[0]


def test_widened_output_equals_original_for_any_sketch(tiny_transformer):
    x = torch.randn(2, 16, 16, 24)
    before = _forward(tiny_transformer, x)
    old_weight = tiny_transformer.pos_embed.proj.weight.detach().clone()
    old_bias = tiny_transformer.pos_embed.proj.bias.detach().clone()
    widen_input_channels(tiny_transformer)
    w = tiny_transformer.pos_embed.proj.weight
    assert w.shape[1] == 32
    assert torch.equal(w[:, :16], old_weight)
    assert torch.count_nonzero(w[:, 16:]) == 0
    assert torch.equal(tiny_transformer.pos_embed.proj.bias, old_bias)
    for scale in (0.0, 1.0, 10.0):
        sketch = scale * torch.randn(2, 16, 16, 24)
        after = _forward(tiny_transformer, torch.cat([x, sketch], 1))
        assert (after - before).abs().max() <= 1e-6
    assert after.shape[1] == 16


def test_config_round_trip(tiny_transformer, tmp_path, assert_same_output):
    from diffusers import SD3Transformer2DModel

    widen_input_channels(tiny_transformer)
    tiny_transformer.save_pretrained(tmp_path)
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path)
    assert loaded.config.in_channels == 32 and loaded.config.out_channels == 16
    assert input_channels(loaded) == 32
    x = torch.randn(1, 32, 16, 16)
    for name, value in tiny_transformer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert_same_output(_forward(loaded, x), _forward(tiny_transformer, x))


def test_idempotent(tiny_transformer):
    widen_input_channels(tiny_transformer)
    tiny_transformer.pos_embed.proj.weight.data[:, 16:] = 0.5  # as if trained
    proj = tiny_transformer.pos_embed.proj
    widen_input_channels(tiny_transformer)
    assert tiny_transformer.pos_embed.proj is proj
    assert torch.all(proj.weight[:, 16:] == 0.5)


def test_wrong_channel_count_refused(tiny_transformer):
    widen_input_channels(tiny_transformer, extra_channels=4)  # 20 channels
    with pytest.raises(ChannelCountError, match="20 input channels.*expected 16.*or 32"):
        widen_input_channels(tiny_transformer)
