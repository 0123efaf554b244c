"""Respaced ancestral DDPM sampling for the DiT transport (DiT samples with 250 steps).

Respacing (improved DDPM `space_timesteps`): keep a subset S of the T original steps and build the
betas of a shorter chain from the kept cumulative alphas, beta'_i = 1 - abar_{S_i} / abar_{S_{i-1}},
so the respaced process has exactly the original marginals at the kept steps. The network is always
called with the ORIGINAL timestep index S_i (what it was trained on); the respaced chain's own
quantities (posterior coefficients, variance range) are used for the update.

Guidance (CFG, Representation Guidance eq. 13, both) is applied to epsilon by
`models.guidance.guided_prediction` in one batched network call; learned-variance channels come
from the fully conditional branch, as in DiT.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from models.ddpm import GaussianDiffusion, named_beta_schedule
from models.guidance import Guidance, guided_prediction


def space_timesteps(num_timesteps: int, section_counts: Union[int, Sequence[int]]) -> list[int]:
    """The kept original steps, sorted. The T steps are cut into len(section_counts) near-equal
    sections and section k keeps section_counts[k] evenly strided steps, both ends included
    (improved DDPM; DiT's "250" is one section: round(i * 999 / 249), i = 0..249)."""
    counts = [section_counts] if isinstance(section_counts, int) else list(section_counts)
    if not counts or any((not isinstance(c, int)) or c < 1 for c in counts):
        raise ValueError(f"section counts must be positive ints, got {section_counts!r}")
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for k, count in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps (T={num_timesteps})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            # Accumulated float stride and Python's round, exactly as improved DDPM / DiT do.
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def respace(
    diffusion: GaussianDiffusion, num_steps: Union[int, Sequence[int]]
) -> tuple[list[int], GaussianDiffusion]:
    """(kept original timesteps, the respaced diffusion), with betas from the kept cumulative
    alphas so that the respaced abar equals the original abar at every kept step."""
    kept = space_timesteps(diffusion.num_timesteps, num_steps)
    if len(kept) < 2:
        raise ValueError(f"respacing needs at least 2 steps, got num_steps={num_steps!r}")
    alphas_cumprod = diffusion.alphas_cumprod[kept]  # (K,) float64
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return kept, GaussianDiffusion(1.0 - alphas_cumprod / previous)


def _noise(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def _split_prediction(out: Tensor, channels: int, name: str) -> tuple[Tensor, Optional[Tensor]]:
    """(B, 2C, H, W) -> eps, variance values (learned range); (B, C, H, W) -> eps, None (fixed)."""
    if out is None or out.shape[1] not in (channels, 2 * channels):
        got = None if out is None else tuple(out.shape)
        raise ValueError(f"model output {name} must have {channels} or {2 * channels} channels, got {got}")
    if out.shape[1] == channels:
        return out, None
    eps, var_values = torch.split(out, channels, dim=1)
    return eps, var_values


def _ancestral_step(
    diffusion: GaussianDiffusion,
    x_t: Tensor,
    index: Tensor,
    prediction: Tensor,
    generator: torch.Generator,
    clip_denoised: bool,
    name: str,
) -> Tensor:
    """x_{i-1} ~ p(x_{i-1} | x_i) on the respaced chain; no noise at the final step (i = 0)."""
    eps, var_values = _split_prediction(prediction, x_t.shape[1], name)
    p = diffusion.p_mean_variance(x_t, index, eps.to(x_t.dtype), _maybe(var_values, x_t.dtype), clip_denoised)
    if int(index[0]) == 0:
        return p["mean"]
    return p["mean"] + torch.exp(0.5 * p["log_variance"]) * _noise(x_t.shape, generator, x_t.dtype, x_t.device)


def _maybe(tensor: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if tensor is None else tensor.to(dtype)


def _checked_shapes(
    shape_x: Sequence[int], shape_z: Optional[Sequence[int]], y: Tensor, guidance: Optional[Guidance]
) -> tuple[tuple[int, ...], Optional[tuple[int, ...]]]:
    """shape_x (B, C_x, H, W) and shape_z (B, C_z, H, W) or None as tuples, checked against y (B,)
    long and the guidance's channel counts."""
    shape_x = tuple(shape_x)
    if len(shape_x) != 4 or y.shape != (shape_x[0],) or y.dtype != torch.long:
        raise ValueError(f"shape_x must be (B, C, H, W) and y a (B,) long tensor; got {shape_x}, {tuple(y.shape)}")
    if shape_z is not None:
        shape_z = tuple(shape_z)
        if len(shape_z) != 4 or shape_z[0] != shape_x[0] or shape_z[2:] != shape_x[2:]:
            raise ValueError(f"shape_z must be (B, C_z, H, W) on x's grid, got {shape_z} for x {shape_x}")
    if guidance is not None and (
        guidance.latent_channels != shape_x[1] or guidance.semantic_channels != (0 if shape_z is None else shape_z[1])
    ):
        raise ValueError(
            f"Guidance channels ({guidance.latent_channels}, {guidance.semantic_channels}) do not match "
            f"shape_x {shape_x} / shape_z {shape_z}"
        )
    return shape_x, shape_z


@torch.no_grad()
def sample_ddpm(
    model: Callable[..., Any],
    shape_x: Sequence[int],
    shape_z: Optional[Sequence[int]],
    y: Tensor,
    guidance: Optional[Guidance],
    num_steps: Union[int, Sequence[int]] = 250,
    *,
    generator: torch.Generator,
    diffusion: Optional[GaussianDiffusion] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[torch.device, str]] = None,
    clip_denoised: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """Ancestral DDPM sampling of (x, z) from pure noise on a chain respaced to `num_steps`.

    model: `model(x, t, y, z=None) -> BackboneOutput` (t = ORIGINAL step index as a float).
    shape_x (B, C_x, H, W); shape_z (B, C_z, H, W) or None for a latent-only model; y (B,) long.
    guidance: a `Guidance` (CFG / RG on epsilon, one batched call per step, variance from the
    conditional branch), or None for the plain conditional prediction. diffusion: the training
    schedule (default DiT's linear, T = 1000). clip_denoised: DiT samples with False.
    Noise comes only from `generator`: x_T, z_T, then per step (except the last) x's and z's.
    Returns (x_0, z_0), z_0 None when shape_z is None.
    """
    if not isinstance(generator, torch.Generator):
        raise ValueError("sample_ddpm needs an explicit torch.Generator (all randomness is seeded)")
    shape_x, shape_z = _checked_shapes(shape_x, shape_z, y, guidance)
    if diffusion is None:
        diffusion = GaussianDiffusion(named_beta_schedule("linear", 1000))
    kept, spaced = respace(diffusion, num_steps)
    last_index = diffusion.num_timesteps - 1
    device = torch.device(device) if device is not None else y.device
    y = y.to(device)

    x = _noise(shape_x, generator, dtype, device)
    z = None if shape_z is None else _noise(shape_z, generator, dtype, device)
    for i in reversed(range(len(kept))):
        index = torch.full((shape_x[0],), i, dtype=torch.long, device=device)  # respaced chain index
        t_model = torch.full((shape_x[0],), float(kept[i]), dtype=dtype, device=device)  # original index
        if guidance is None:
            out = model(x, t_model, y, z=z)
        else:
            # noise level s = t_index / (T - 1): 1 = pure noise, 0 = data (GUIDANCE.md).
            out = guided_prediction(model, x, z, t_model, y, guidance, noise_level=kept[i] / last_index)
        x_prev = _ancestral_step(spaced, x, index, out.x, generator, clip_denoised, "x")
        if z is not None:
            z = _ancestral_step(spaced, z, index, out.z, generator, clip_denoised, "z")
        x = x_prev
    return x, z
