"""HairDiff's training objective: sigma sampling, the soft-mask MSE and the Sobel shape loss.

- Sigmas are drawn as in diffusers' SD3 training script: u from a density
  (``logit_normal`` by default: sigmoid(N(mean, std)); ``mode``; ``cosmap``; ``uniform``), then
  looked up in the scheduler's shifted 1000-entry table, i.e. sigma = shift(1 - u) on SD3's
  discretisation (shift 3.0).
- MSE between predicted and target velocity, in float32 whatever the autocast, weighted by the
  latent-grid soft mask and normalised by the mask sum per sample, so a small hair region
  counts as much as a large one and the background (m = 0) contributes nothing.
- Shape loss: Sobel gradients of the predicted x0 (x_in - sigma * m * v_hat, each pixel
  inverted at its own noise level) against those of the
  true x0, squared, weighted and normalised by the same mask: it asks the strands to sit where
  the target's edges are, which a per-pixel MSE at high noise barely does.
Total = mse + lambda_shape * shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..imageops import sobel
from .flow import DEFAULT_SHIFT, NUM_TRAIN_TIMESTEPS, predict_x0, shift_sigmas, velocity_target

WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "uniform")
MASK_EPS = 1e-6


def sample_u(
    batch: int,
    scheme: str = "logit_normal",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """u in [0, 1) per batch item, as diffusers' ``compute_density_for_timestep_sampling``."""
    if scheme == "logit_normal":
        u = torch.normal(logit_mean, logit_std, size=(batch,), generator=generator)
        return torch.sigmoid(u)
    u = torch.rand(batch, generator=generator)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheme in ("uniform", "cosmap"):
        # diffusers samples cosmap's u uniformly too (cosmap only changes the loss weighting there).
        return u
    raise ValueError(f"unknown sigma sampling scheme {scheme!r}; choose one of {WEIGHTING_SCHEMES}")


def training_sigma_table(shift: float = DEFAULT_SHIFT, n: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The scheduler's training sigmas (descending, shifted): shift(s) for s = 1 ... 1/n."""
    return shift_sigmas(torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64), shift).float()


def sample_sigmas(
    batch: int,
    scheme: str = "logit_normal",
    *,
    shift: float = DEFAULT_SHIFT,
    generator: torch.Generator | None = None,
    **density_kwargs,
) -> torch.Tensor:
    """(batch,) float32 training sigmas in (0, 1], on the CPU."""
    table = training_sigma_table(shift)
    u = sample_u(batch, scheme, generator=generator, **density_kwargs)
    idx = (u * len(table)).long().clamp_(0, len(table) - 1)
    return table[idx]


def _mask_weights(mask: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask in float32 broadcast to ``like``'s channels, and its per-sample sum (>= eps)."""
    m = mask.float().expand(like.shape[0], 1, *like.shape[-2:])
    denom = m.sum(dim=(1, 2, 3)) * like.shape[1]
    return m, denom.clamp_min(MASK_EPS)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(m * (pred - target)^2) / (C * sum(m)) per sample, averaged over the batch; float32."""
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        m, denom = _mask_weights(mask, pred)
        per_sample = (m * (pred - target) ** 2).sum(dim=(1, 2, 3)) / denom
        return per_sample.mean()


def shape_loss(x0_hat: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked MSE between the Sobel gradients of ``x0_hat`` and ``x0``; float32, zero iff the
    gradients agree inside the mask."""
    with torch.autocast(device_type=x0_hat.device.type, enabled=False):
        gx_hat, gy_hat = sobel(x0_hat.float())
        gx, gy = sobel(x0.float())
        m, denom = _mask_weights(mask, x0_hat)
        err = (gx_hat - gx) ** 2 + (gy_hat - gy) ** 2
        return ((m * err).sum(dim=(1, 2, 3)) / denom).mean()


@dataclass
class LossTerms:
    total: torch.Tensor
    mse: torch.Tensor
    shape: torch.Tensor

    def detached(self) -> dict[str, float]:
        return {
            "total": float(self.total.detach()),
            "mse": float(self.mse.detach()),
            "shape": float(self.shape.detach()),
        }


def hairdiff_loss(
    v_pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    x_in: torch.Tensor,
    sigma: torch.Tensor,
    mask: torch.Tensor,
    lambda_shape: float = 0.1,
) -> LossTerms:
    """The dual loss for one batch; all terms float32.

    ``v_pred`` the model's velocity, ``x0`` the clean latent, ``noise`` eps, ``x_in`` the
    soft-noised model input, ``sigma`` (B,) global sigmas, ``mask`` the latent-grid soft mask.
    """
    with torch.autocast(device_type=v_pred.device.type, enabled=False):
        v_pred = v_pred.float()
        target = velocity_target(x0.float(), noise.float())
        mse = masked_mse(v_pred, target, mask)
        if lambda_shape:
            # Every latent pixel was noised to sigma * m, so it is inverted with its own level:
            # a perfect velocity then gives x0 exactly, on the feathered edge too.
            level = sigma.float().to(v_pred.device).view(-1, 1, 1, 1) * mask.float()
            x0_hat = predict_x0(x_in.float(), v_pred, level)
            shape = shape_loss(x0_hat, x0, mask)
        else:
            shape = torch.zeros((), device=v_pred.device)
        return LossTerms(total=mse + float(lambda_shape) * shape, mse=mse, shape=shape)
