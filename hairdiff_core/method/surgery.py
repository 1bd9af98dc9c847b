"""Weight surgery: widen SD3's patch embedding from 16 to 16 + extra input channels.

Channels 0-15 keep the (noisy) image latent weights, the new channels (the sketch latent)
start at exactly zero and the bias is kept, so right after surgery the model's output does not
depend on the sketch at all and equals the unpatched model's output bit for bit.
"""

from __future__ import annotations

import logging

import torch

from ..errors import ChannelCountError

logger = logging.getLogger(__name__)

#: SD3/SD3.5 latent channels.
BASE_CHANNELS = 16
#: Sketch-latent channels HairDiff adds.
SKETCH_CHANNELS = 16


def input_channels(transformer) -> int:
    return int(transformer.pos_embed.proj.weight.shape[1])


def widen_input_channels(transformer, extra_channels: int = SKETCH_CHANNELS):
    """Widen ``transformer.pos_embed.proj`` in place to ``16 + extra_channels`` inputs.

    Returns the same transformer. Idempotent on an already widened model. ``in_channels`` in
    the config is updated so ``save_pretrained``/``from_pretrained`` round-trip the wide model;
    ``out_channels`` stays 16.
    """
    proj = transformer.pos_embed.proj
    have = int(proj.weight.shape[1])
    want = BASE_CHANNELS + int(extra_channels)
    if have == want:
        return transformer
    if have != BASE_CHANNELS:
        raise ChannelCountError(
            f"cannot widen this transformer: its patch embedding takes {have} input channels, "
            f"expected {BASE_CHANNELS} (a stock SD3/SD3.5 transformer) or {want} (already "
            f"widened for HairDiff). Load a stock SD3.5 transformer."
        )
    new = torch.nn.Conv2d(
        want,
        proj.out_channels,
        kernel_size=proj.kernel_size,
        stride=proj.stride,
        padding=proj.padding,
        bias=proj.bias is not None,
        device=proj.weight.device,
        dtype=proj.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :have].copy_(proj.weight)
        if proj.bias is not None:
            new.bias.copy_(proj.bias)
    new.weight.requires_grad_(proj.weight.requires_grad)
    if new.bias is not None and proj.bias is not None:
        new.bias.requires_grad_(proj.bias.requires_grad)
    transformer.pos_embed.proj = new
    transformer.register_to_config(in_channels=want)
    if getattr(transformer.config, "out_channels", None) is None:
        transformer.register_to_config(out_channels=BASE_CHANNELS)
    logger.debug("widened pos_embed.proj from %d to %d input channels", have, want)
    return transformer
