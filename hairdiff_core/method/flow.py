"""Flow matching on SD3's schedule: sigmas, per-pixel soft-mask noising, the timestep contract.

x_sigma = (1 - sigma) * x0 + sigma * eps. HairDiff gives every latent pixel its own noise level
sigma * m (m the latent-grid soft mask): x_in = (1 - m) * x0 + m * x_sigma. The transformer is
always told the *global* sigma, as ``timestep = sigma * 1000`` (diffusers' convention).
"""

from __future__ import annotations

import torch

from ..defaults import DEFAULTS

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = DEFAULTS.shift


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * s / (1 + (shift - 1) * s)


def sampling_sigmas(steps: int, shift: float = DEFAULT_SHIFT, strength: float = 1.0) -> torch.Tensor:
    """The descending sigma ladder of ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (float64),
    with the terminal 0 appended, cut for ``strength`` as SD3's img2img does.

    Returns ``steps_run + 1`` values; ``strength == 0`` returns just ``[0.]`` (no step).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    n = NUM_TRAIN_TIMESTEPS
    train = shift_sigmas(torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64), shift)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    t = torch.linspace(sigma_max * n, sigma_min * n, steps, dtype=torch.float64)
    sigmas = shift_sigmas(t / n, shift)
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    t_start = int(steps - min(steps * strength, steps))
    return sigmas[t_start:]


def timestep_from_sigma(sigma: torch.Tensor | float, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The transformer's ``timestep`` argument: global sigma x 1000, one per batch item."""
    value = torch.as_tensor(sigma, dtype=torch.float64) * NUM_TRAIN_TIMESTEPS
    return value.to(dtype=dtype, device=device).reshape(-1).expand(batch).clone()


def soft_noise(x0: torch.Tensor, noise: torch.Tensor, sigma, mask: torch.Tensor) -> torch.Tensor:
    """Per-pixel noise level sigma * m: clean where m = 0, x_sigma where m = 1.

    ``sigma`` is a float or a (B,) tensor; ``mask`` broadcasts to ``x0`` (e.g. (B, 1, h, w)).
    """
    sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    if sigma.ndim == 1:
        sigma = sigma.view(-1, 1, 1, 1)
    x_sigma = (1 - sigma) * x0 + sigma * noise
    return (1 - mask) * x0 + mask * x_sigma


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching velocity d x_sigma / d sigma = eps - x0."""
    return noise - x0


def predict_x0(x_in: torch.Tensor, velocity: torch.Tensor, sigma) -> torch.Tensor:
    """x0_hat = x_in - sigma * v_hat (the design's shape-loss input)."""
    sigma = torch.as_tensor(sigma, dtype=x_in.dtype, device=x_in.device)
    if sigma.ndim == 1:
        sigma = sigma.view(-1, 1, 1, 1)
    return x_in - sigma * velocity


def velocity_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """The velocity behind a host's x0 prediction (ComfyUI's samplers see ``denoised``, the
    inverse of ``predict_x0``): v = (x - x0_hat) / sigma."""
    return (x - denoised) / float(sigma)
