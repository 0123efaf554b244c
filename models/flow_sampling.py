"""Samplers for the SiT flow transport: ODE Euler / Heun and SDE Euler-Maruyama, joint (x, z).

Time runs from t = 0 (noise) to t = 1 (data). Grids follow SiT (`transport.py` `check_interval`,
`integrators.py`) for a velocity model on the linear / GVP paths:

- ODE: grid linspace(t_start, 1, num_steps) with t_start = 0 (SiT: sample_eps = 0 for velocity),
  so num_steps counts grid POINTS: Euler takes num_steps - 1 steps (num_steps - 1 network
  evaluations), Heun (torchdiffeq "heun2", explicit trapezoid, the corrector also at t = 1)
  takes num_steps - 1 steps with 2 evaluations each.
- SDE (the paper's sampler): grid linspace(0, 1 - last_step_size, num_steps), i.e. num_steps - 1
  Euler-Maruyama steps of size dt, then one deterministic last step of size last_step_size:
  num_steps evaluations in all (250 by default, grid linspace(0, 0.96, 250)). One EM step:

      w     = diffusion(t)                      "sigma" form: w = norm * sigma_t (= 1 - t, linear)
      score = velocity_to_score(v, x, t)        linear: (t v - x) / (1 - t)
      x    <- x + (v + w * score) dt + sqrt(2 w dt) * xi,     xi ~ N(0, I) from the generator

  Last step "Mean": x <- x + (v + w * score) * last_step_size at t = 1 - last_step_size (no noise);
  "Euler": x <- x + v * last_step_size; "Tweedie": x <- (x + sigma^2 score) / alpha; None: no step
  (the EM grid then ends at t = 1 and there are num_steps - 1 evaluations).

All samplers carry x and z jointly (z None for latent-only) and draw every random number from the
given torch.Generator: initial noise x then z; per SDE step noise for x then z.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from models.flow import FlowPath
from models.guidance import Guidance, guided_prediction

# predict(x, z, t) -> (v_x, v_z): velocity on the first C_x / C_z channels; t is (B,).
Predict = Callable[[Tensor, Tensor | None, Tensor], tuple[Tensor, Tensor | None]]
METHODS = ("sde", "euler", "heun")
LAST_STEPS = ("Mean", "Euler", "Tweedie", None)


def _time_grid(t0: float, t1: float, num_steps: int) -> list[float]:
    if num_steps < 2:
        raise ValueError(f"num_steps counts grid points and must be >= 2, got {num_steps}")
    return torch.linspace(t0, t1, num_steps, dtype=torch.float64).tolist()


def _t_vec(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def _axpy(state: Tensor | None, step: float, v: Tensor | None) -> Tensor | None:
    return None if state is None else state + step * v


@torch.no_grad()
def sample_ode_euler(predict: Predict, x: Tensor, z: Tensor | None, num_steps: int,
                     t_start: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """Euler on linspace(t_start, 1, num_steps): num_steps - 1 evaluations."""
    ts = _time_grid(t_start, 1.0, num_steps)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        vx, vz = predict(x, z, _t_vec(t_cur, x))
        dt = t_next - t_cur
        x, z = x + dt * vx, _axpy(z, dt, vz)
    return x, z


@torch.no_grad()
def sample_ode_heun(predict: Predict, x: Tensor, z: Tensor | None, num_steps: int,
                    t_start: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """Heun (explicit trapezoid) on linspace(t_start, 1, num_steps): 2 (num_steps - 1) evaluations."""
    ts = _time_grid(t_start, 1.0, num_steps)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t_cur
        kx1, kz1 = predict(x, z, _t_vec(t_cur, x))
        x_pred, z_pred = x + dt * kx1, _axpy(z, dt, kz1)
        kx2, kz2 = predict(x_pred, z_pred, _t_vec(t_next, x))
        x = x + 0.5 * dt * (kx1 + kx2)
        z = None if z is None else z + 0.5 * dt * (kz1 + kz2)
    return x, z


def _noise(like: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


@torch.no_grad()
def sample_sde_euler_maruyama(
    predict: Predict,
    x: Tensor,
    z: Tensor | None,
    num_steps: int,
    generator: torch.Generator,
    path: FlowPath | str = "linear",
    diffusion_form: str = "sigma",
    diffusion_norm: float = 1.0,
    last_step: str | None = "Mean",
    last_step_size: float = 0.04,
) -> tuple[Tensor, Tensor | None]:
    """SiT's SDE sampler (module docstring): num_steps - 1 EM steps on
    linspace(0, 1 - last_step_size, num_steps) plus the last step."""
    path = FlowPath(path) if isinstance(path, str) else path
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step must be one of {LAST_STEPS}, got {last_step!r}")
    if last_step is None:
        last_step_size = 0.0
    elif not 0.0 < last_step_size < 1.0:
        raise ValueError(f"last_step_size must lie in (0, 1), got {last_step_size}")
    if diffusion_norm < 0:
        raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
    t_end = 1.0 - last_step_size
    ts = _time_grid(0.0, t_end, num_steps)
    dt = ts[1] - ts[0]

    def sde_drift(state: Tensor, v: Tensor, t: float) -> Tensor:
        w = path.diffusion(t, state, diffusion_form, diffusion_norm)
        return v + w * path.velocity_to_score(v, state, t)

    def em_step(state: Tensor, v: Tensor, t: float) -> Tensor:
        w = path.diffusion(t, state, diffusion_form, diffusion_norm)
        return state + sde_drift(state, v, t) * dt + torch.sqrt(2 * w * dt) * _noise(state, generator)

    for t_cur in ts[:-1]:
        vx, vz = predict(x, z, _t_vec(t_cur, x))
        x = em_step(x, vx, t_cur)
        z = None if z is None else em_step(z, vz, t_cur)
    if last_step is None:
        return x, z

    vx, vz = predict(x, z, _t_vec(t_end, x))

    def finish(state: Tensor, v: Tensor) -> Tensor:
        if last_step == "Mean":
            return state + sde_drift(state, v, t_end) * last_step_size
        if last_step == "Euler":
            return state + v * last_step_size
        t = torch.as_tensor(t_end, dtype=state.dtype)
        alpha, sigma = path.alpha(t)[0], path.sigma(t)[0]  # Tweedie: E[x1 | x_t]
        return (state + sigma**2 * path.velocity_to_score(v, state, t_end)) / alpha

    return finish(x, vx), (None if z is None else finish(z, vz))


def guided_velocity(model: Callable[..., Any], y: Tensor, guidance: Guidance) -> Predict:
    """predict(x, z, t) for a network: one batched guided call per evaluation, noise level s = 1 - t."""

    def predict(x: Tensor, z: Tensor | None, t: Tensor) -> tuple[Tensor, Tensor | None]:
        out = guided_prediction(model, x, z, t, y, guidance, noise_level=(1.0 - t).clamp(0.0, 1.0))
        vx = out.x[:, : guidance.latent_channels]
        vz = None if z is None else out.z[:, : guidance.semantic_channels]
        return vx, vz

    return predict


@torch.no_grad()
def sample_flow(
    model: Callable[..., Any],
    shape_x: tuple[int, ...],
    shape_z: tuple[int, ...] | None,
    y: Tensor,
    guidance: Guidance,
    method: str = "sde",
    num_steps: int = 250,
    *,
    generator: torch.Generator,
    path: FlowPath | str = "linear",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    diffusion_form: str = "sigma",
    diffusion_norm: float = 1.0,
    last_step: str | None = "Mean",
    last_step_size: float = 0.04,
) -> tuple[Tensor, Tensor | None]:
    """Sample (x, z) at t = 1 from N(0, I) noise drawn from `generator` (x first, then z).

    shape_x (B, C_x, H, W); shape_z (B, C_z, H, W) or None for a latent-only model; y (B,) labels.
    method "sde" (paper default, num_steps evaluations), "euler" / "heun" (ODE; num_steps grid
    points, see module docstring). Each evaluation is one guided network call.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    shape_x = tuple(shape_x)
    if len(shape_x) != 4 or shape_x[1] != guidance.latent_channels:
        raise ValueError(f"shape_x must be (B, {guidance.latent_channels}, H, W), got {shape_x}")
    if y.shape != (shape_x[0],):
        raise ValueError(f"y must be ({shape_x[0]},), got {tuple(y.shape)}")
    if guidance.semantic_channels == 0:
        if shape_z is not None:
            raise ValueError("shape_z given but Guidance.semantic_channels is 0; pass shape_z=None")
    elif shape_z is None or tuple(shape_z) != (shape_x[0], guidance.semantic_channels, *shape_x[2:]):
        raise ValueError(f"shape_z must be (B, {guidance.semantic_channels}, H, W) on x's grid, got {shape_z}")
    device = torch.device(device) if device is not None else y.device

    def initial(shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)

    x = initial(shape_x)
    z = None if shape_z is None else initial(tuple(shape_z))
    predict = guided_velocity(model, y.to(device), guidance)
    if method == "euler":
        return sample_ode_euler(predict, x, z, num_steps)
    if method == "heun":
        return sample_ode_heun(predict, x, z, num_steps)
    return sample_sde_euler_maruyama(
        predict, x, z, num_steps, generator, path, diffusion_form, diffusion_norm, last_step, last_step_size
    )
