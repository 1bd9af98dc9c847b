"""Load HairDiff Model lists the toy model and loads it with its shipped adapter."""

from __future__ import annotations


def test_toy_base_is_listed_and_loads_with_its_adapter(comfy):
    nodes = comfy.nodes
    toy = nodes.model_nodes.TOY
    assert toy in nodes.LoadHairDiffModel.GET_SCHEMA().inputs[0].options
    assert nodes.LoadHairDiffModel.validate_inputs(base_model=toy, adapter="none") is True
    model = nodes.LoadHairDiffModel.execute(base_model=toy, adapter="none", device="cpu")[0]
    assert model.family == "toy" and "adapter" in model.source
    weight = model.transformer.pos_embed.proj.weight
    assert weight.shape[1] == 32 and bool(weight[:, 16:].abs().sum() > 0)  # trained sketch channels
    assert model.vae is not None and model.vae.config.latent_channels == 16
