"""One transformer call with and without reference attention, shared by the reference tests."""

from __future__ import annotations

import torch

from hairdiff_core.method.flow import timestep_from_sigma
from hairdiff_core.method.reference import reference_attention


def forward(model, x, sketch, sigma, text, pooled, kwargs=None):
    return model(
        hidden_states=torch.cat([x, sketch], dim=1),
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=timestep_from_sigma(sigma, x.shape[0]),
        joint_attention_kwargs=kwargs or None,
        return_dict=False,
    )[0]


def with_reference(model, settings, x, sketch, sigma, ref_latent, noise, token_mask, text, pooled):
    with reference_attention(
        model,
        settings,
        reference_latent=ref_latent,
        token_mask=token_mask,
        noise=noise,
        encoder_hidden_states=text,
        pooled_projections=pooled,
    ) as hook:
        return forward(model, x, sketch, sigma, text, pooled, hook.step_kwargs(sigma, 0))
