"""SiT flow-matching transport for joint latent + semantic diffusion (ReDi App. A, eq. 17-18).

Convention (SiT `transport/path.py`, ReDi code): t = 1 is data, t = 0 is noise,

    x_t = alpha_t * x1 + sigma_t * eps,      target velocity u_t = d_alpha_t * x1 + d_sigma_t * eps

- "linear" (SiT ICPlan, ReDi default): alpha_t = t, sigma_t = 1 - t, u_t = x1 - eps.
- "gvp" (SiT GVPCPlan): alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2).

The network predicts the velocity. t ~ U[0, 1]: SiT's `create_transport` sets train_eps = 0 for a
velocity model on the linear and GVP paths (both are regular at t = 0 and t = 1 for the velocity
target), so no interval is cut off here; only samplers that need the score avoid t = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from models.joint_objective import (
    AlignmentLoss,
    JointObjective,
    JointObjectiveConfig,
    joint_mse,
    logged_semantic,
)
from models.settings import FLOW_PATHS, choice_problem

DIFFUSION_FORMS = ("sigma", "linear", "constant")


def _broadcast_t(t: Tensor | float, like: Tensor) -> Tensor:
    """t as a scalar or (B,) -> a tensor broadcastable against `like` (B, C, H, W)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 1:
        t = t.view(-1, *([1] * (like.ndim - 1)))
    return t


# ----------------------------------------------------------------------------
# Interpolation paths


@dataclass(frozen=True)
class FlowPath:
    """The interpolant x_t = alpha_t x1 + sigma_t eps and the quantities the samplers need."""

    name: str = "linear"

    def __post_init__(self) -> None:
        problem = choice_problem(self.name, FLOW_PATHS)
        if problem:
            raise ValueError(f"flow path{problem}")

    def alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, d alpha_t / dt)."""
        if self.name == "linear":
            return t, torch.ones_like(t)
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(sigma_t, d sigma_t / dt)."""
        if self.name == "linear":
            return 1 - t, -torch.ones_like(t)
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def interpolate(self, t: Tensor | float, x1: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Return (x_t, u_t) for data x1 and noise eps of the same shape (eq. 17)."""
        t = _broadcast_t(t, x1)
        a, da = self.alpha(t)
        s, ds = self.sigma(t)
        return a * x1 + s * eps, da * x1 + ds * eps

    def velocity_to_score(self, v: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
        """Score grad log p_t(x) from the velocity (SiT `get_score_from_velocity`).

        score = (r v - x) / (sigma^2 - r d_sigma sigma) with r = alpha / d_alpha;
        linear path: score = (t v - x) / (1 - t). Singular at t = 1 (data), never evaluated there.
        """
        t = _broadcast_t(t, x)
        a, da = self.alpha(t)
        s, ds = self.sigma(t)
        ratio = a / da
        return (ratio * v - x) / (s**2 - ratio * ds * s)

    def diffusion(self, t: Tensor | float, like: Tensor, form: str = "sigma", norm: float = 1.0) -> Tensor:
        """SDE diffusion coefficient w(t) (SiT `compute_diffusion`): the sampler adds
        w(t) * score to the drift and noise of variance 2 w(t) dt (see flow_sampling.py)."""
        t = _broadcast_t(t, like)
        if form == "sigma":
            return norm * self.sigma(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "constant":
            return torch.full_like(t, float(norm))
        raise ValueError(f"diffusion_form must be one of {DIFFUSION_FORMS}, got {form!r}")


# ----------------------------------------------------------------------------
# Configuration and transport


@dataclass(frozen=True, kw_only=True)
class FlowConfig(JointObjectiveConfig):
    """Settings of the flow objective: the shared joint-objective fields (models.joint_objective)
    and the interpolation path."""

    path: str = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        problem = choice_problem(self.path, FLOW_PATHS)
        if problem:
            raise ValueError(f"FlowConfig.path{problem}")


class FlowTransport:
    """SiT velocity-matching objective on joint (latent, semantic) inputs."""

    def __init__(self, config: FlowConfig, alignment_loss: AlignmentLoss | None = None) -> None:
        """`alignment_loss(aligned, target) -> scalar` is the REPA term; defaults to
        models.repa.repa_alignment_loss (imported only when lambda_repa > 0)."""
        self.config = config
        self.path = FlowPath(config.path)
        self.objective = JointObjective(config, alignment_loss)

    @staticmethod
    def _prediction(out_channels: Tensor, channels: int, name: str) -> Tensor:
        # out: (B, C * k, H, W), k = 2 with learned variance ([prediction, variance]); keep the prediction.
        if out_channels.shape[1] not in (channels, 2 * channels):
            raise ValueError(f"model output {name} has {out_channels.shape[1]} channels, "
                             f"expected {channels} or {2 * channels}")
        return out_channels[:, :channels]

    def training_losses(
        self,
        model: Callable[..., Any],
        x: Tensor,
        z: Tensor | None,
        y: Tensor,
        generator: torch.Generator,
        align_target: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Joint velocity loss (eq. 18) with label dropout, modality drop and optional REPA.

        x (B, C_x, H, W) clean latent, z (B, C_z, H, W) clean semantic features or None, y (B,) long.
        Draws, all from `generator` (the network draws nothing): t (B,) ~ U[0,1), then
        `JointObjective.draw`'s (docs/method.md, "The modality drop", gives the order and the drop rule).

        Returns `loss` (to backprop), `loss/latent`, and `loss/semantic` (only when C_z > 0;
        mean over the samples not dropped; 0 when every sample was dropped) and `loss/repa`
        (only when lambda_repa > 0). The logged terms are detached.
        """
        cfg, objective = self.config, self.objective
        objective.check_inputs(x, z, y, generator)
        dtype = torch.promote_types(x.dtype, torch.float32)
        t = torch.rand((x.shape[0],), generator=generator, device=generator.device, dtype=dtype).to(x.device)
        x1 = x.to(dtype)
        z1 = None if z is None else z.to(dtype)
        draws = objective.draw(generator, x1, z1, dtype)  # same t, independent noise per modality (eq. 18)
        y_in = objective.drop_labels(y, draws.label_u)

        x_t, u_x = self.path.interpolate(t, x1, draws.eps_x)
        z_in = u_z = keep_z = None
        if z1 is not None:
            keep_z, z1 = objective.modality_drop(z1, draws.drop_u)
            z_t, u_z = self.path.interpolate(t, z1, draws.eps_z)
            z_in = objective.semantic_input(z_t, keep_z)

        out = model(x_t, t, y_in, z=z_in)
        pred_x = self._prediction(out.x, cfg.latent_channels, "x")
        pred_z = None
        if z1 is not None:
            if out.z is None:
                raise ValueError("model returned z=None for a joint input; check semantic_channels")
            pred_z = self._prediction(out.z, cfg.semantic_channels, "z")

        terms = joint_mse(pred_x, u_x, pred_z, u_z, keep_z, cfg.lambda_z)
        losses = {"loss/latent": terms.latent.mean().detach()}
        if terms.semantic is not None:
            losses["loss/semantic"] = logged_semantic(terms.semantic, keep_z)
        return objective.finish(terms.total, objective.alignment_term(out.aligned, align_target), losses)
