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
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

PATHS = ("linear", "gvp")
DROP_MODES = ("sample", "batch_official")
DIFFUSION_FORMS = ("sigma", "linear", "constant")

AlignmentLoss = Callable[[Tensor, Tensor], Tensor]


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension except the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def _at_least_f32(x: Tensor) -> Tensor:
    """Cast half/bfloat16 to float32 (loss math stays in float32 under autocast); keep float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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
        if self.name not in PATHS:
            raise ValueError(f"flow path must be one of {PATHS}, got {self.name!r}")

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
# Joint loss (shared with the DDPM transport)


class JointMSE(NamedTuple):
    """Per-sample terms of the joint loss, each (B,)."""

    total: Tensor  # latent + lambda_z * semantic on kept samples; latent alone on dropped ones
    latent: Tensor  # mean_flat((pred_x - target_x)^2)
    semantic: Tensor | None  # mean_flat((pred_z - target_z)^2), unmasked; None without z


def joint_mse(
    pred_x: Tensor,
    target_x: Tensor,
    pred_z: Tensor | None,
    target_z: Tensor | None,
    keep_z: Tensor | None,
    lambda_z: float,
) -> JointMSE:
    """Joint per-modality MSE (ReDi eq. 6 / eq. 18, reduction as in the official code).

    Each modality is averaged over its own elements (mean over C, H, W per sample), then
    total = latent + lambda_z * semantic. `keep_z` (B,) bool marks samples whose semantic term
    counts; a dropped sample's semantic term is exactly 0 (torch.where, not a product, so a
    dropped sample contributes 0 and no gradient). keep_z None means every sample is kept.
    Predictions are cast to float32 (float64 stays) before the difference.
    """
    latent = mean_flat((_at_least_f32(pred_x) - _at_least_f32(target_x)) ** 2)
    if pred_z is None or target_z is None:
        if (pred_z is None) != (target_z is None):
            raise ValueError("joint_mse: pred_z and target_z must both be tensors or both be None")
        return JointMSE(total=latent, latent=latent, semantic=None)
    semantic = mean_flat((_at_least_f32(pred_z) - _at_least_f32(target_z)) ** 2)
    weighted = lambda_z * semantic
    if keep_z is not None:
        weighted = torch.where(keep_z.to(device=semantic.device, dtype=torch.bool), weighted, torch.zeros_like(weighted))
    return JointMSE(total=latent + weighted, latent=latent, semantic=semantic)


# ----------------------------------------------------------------------------
# Configuration and transport


@dataclass(frozen=True, kw_only=True)
class FlowConfig:
    """Settings of the flow objective. `num_classes` is the null label index used for CFG."""

    num_classes: int
    latent_channels: int
    semantic_channels: int
    path: str = "linear"
    lambda_z: float = 1.0  # weight of the semantic term (eq. 18)
    p_drop: float = 0.0  # modality drop probability for Representation Guidance (paper 0.2)
    drop_mode: str = "sample"  # "sample" (paper) or "batch_official" (released code)
    class_dropout_prob: float = 0.1  # label dropout for CFG (SiT default)
    lambda_repa: float = 0.0  # REPA weight (official 0.5)

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"FlowConfig.path must be one of {PATHS}, got {self.path!r}")
        if self.drop_mode not in DROP_MODES:
            raise ValueError(f"FlowConfig.drop_mode must be one of {DROP_MODES}, got {self.drop_mode!r}")
        for name in ("p_drop", "class_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FlowConfig.{name} is a probability and must lie in [0, 1], got {value}")
        for name in ("lambda_z", "lambda_repa"):
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"FlowConfig.{name} must be a finite weight >= 0, got {value}")
        if self.num_classes < 1:
            raise ValueError(f"FlowConfig.num_classes must be >= 1 (1 for unconditional), got {self.num_classes}")
        if self.latent_channels < 1:
            raise ValueError(f"FlowConfig.latent_channels must be >= 1, got {self.latent_channels}")
        if self.semantic_channels < 0:
            raise ValueError(f"FlowConfig.semantic_channels must be >= 0, got {self.semantic_channels}")
        if self.semantic_channels == 0 and self.p_drop > 0:
            raise ValueError("FlowConfig.p_drop > 0 needs semantic channels; set p_drop=0 for a latent-only model")


class FlowTransport:
    """SiT velocity-matching objective on joint (latent, semantic) inputs."""

    def __init__(self, config: FlowConfig, alignment_loss: AlignmentLoss | None = None) -> None:
        """`alignment_loss(aligned, target) -> scalar` is the REPA term; defaults to
        models.repa.repa_alignment_loss (imported only when lambda_repa > 0)."""
        self.config = config
        self.path = FlowPath(config.path)
        if alignment_loss is None and config.lambda_repa > 0:
            from models.repa import repa_alignment_loss as alignment_loss
        self.alignment_loss = alignment_loss

    def _check_inputs(self, x: Tensor, z: Tensor | None, y: Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.latent_channels:
            raise ValueError(f"x must be (B, {cfg.latent_channels}, H, W), got {tuple(x.shape)}")
        if cfg.semantic_channels == 0:
            if z is not None:
                raise ValueError("z given but FlowConfig.semantic_channels is 0; pass z=None")
        elif z is None or z.shape != (x.shape[0], cfg.semantic_channels, *x.shape[2:]):
            got = None if z is None else tuple(z.shape)
            raise ValueError(f"z must be (B, {cfg.semantic_channels}, H, W) on x's grid, got {got}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must be (B,) = ({x.shape[0]},), got {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > cfg.num_classes):
            raise ValueError(f"labels must lie in [0, {cfg.num_classes}] (index {cfg.num_classes} is null)")

    @staticmethod
    def _prediction(out_channels: Tensor, channels: int, name: str) -> Tensor:
        # out: (B, C * k, H, W), k = 2 with learned variance ([prediction, variance]); keep the prediction.
        if out_channels.shape[1] not in (channels, 2 * channels):
            raise ValueError(f"model output {name} has {out_channels.shape[1]} channels, expected {channels} or {2 * channels}")
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
        Random draws, in this order, all from `generator` (the network draws nothing):
        t (B,) ~ U[0,1); eps_x like x; eps_z like z (if any); label uniforms (B,); drop uniforms (B,).
        All are drawn whatever the settings, so the stream does not depend on p_drop etc.

        Modality drop (Representation Guidance, paper §3.5), probability p_drop:
        - "sample" (paper's wording, default): per sample, the semantic INPUT z_t is exact zeros
          (the null input guided_prediction uses at inference) and its semantic loss is masked.
        - "batch_official" (released train_redi.py): one decision per step for the whole local
          batch (drop uniform [0]); the CLEAN semantic target is zeroed before noising, so the
          input is z_t = sigma_t * eps_z (scaled noise, not zeros), and lambda_z = 0 for the step.

        Returns `loss` (to backprop), `loss/latent`, and `loss/semantic` (only when C_z > 0;
        mean over the samples not dropped; 0 when every sample was dropped) and `loss/repa`
        (only when lambda_repa > 0). The logged terms are detached.
        """
        cfg = self.config
        self._check_inputs(x, z, y)
        batch = x.shape[0]
        dtype = torch.promote_types(x.dtype, torch.float32)
        gdev = generator.device

        def uniform(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=gdev, dtype=dtype).to(x.device)

        def normal(like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=generator, device=gdev, dtype=dtype).to(x.device)

        t = uniform(batch)  # same t for both modalities (eq. 18)
        x1 = x.to(dtype)
        eps_x = normal(x1)
        z1 = None if z is None else z.to(dtype)
        eps_z = None if z1 is None else normal(z1)  # independent noise per modality
        label_u = uniform(batch)
        drop_u = uniform(batch)

        # CFG label dropout: index num_classes is the null label.
        y_in = torch.where(label_u < cfg.class_dropout_prob, torch.full_like(y, cfg.num_classes), y)

        x_t, u_x = self.path.interpolate(t, x1, eps_x)
        z_in = u_z = keep_z = None
        if z1 is not None:
            if cfg.drop_mode == "sample":
                keep_z = drop_u >= cfg.p_drop  # (B,)
                z_t, u_z = self.path.interpolate(t, z1, eps_z)
                z_in = torch.where(keep_z.view(-1, 1, 1, 1), z_t, torch.zeros_like(z_t))
            else:
                dropped = bool(drop_u[0] < cfg.p_drop)
                if dropped:
                    z1 = torch.zeros_like(z1)  # official: x1[:, latent:] = 0 before interpolation
                z_in, u_z = self.path.interpolate(t, z1, eps_z)
                keep_z = torch.full((batch,), not dropped, dtype=torch.bool, device=x.device)

        out = model(x_t, t, y_in, z=z_in)
        pred_x = self._prediction(out.x, cfg.latent_channels, "x")
        pred_z = None
        if z1 is not None:
            if out.z is None:
                raise ValueError("model returned z=None for a joint input; check semantic_channels")
            pred_z = self._prediction(out.z, cfg.semantic_channels, "z")

        terms = joint_mse(pred_x, u_x, pred_z, u_z, keep_z, cfg.lambda_z)
        loss = terms.total.mean()
        losses = {"loss/latent": terms.latent.mean().detach()}
        if terms.semantic is not None:
            kept = keep_z.sum()
            kept_sum = torch.where(keep_z, terms.semantic, torch.zeros_like(terms.semantic)).sum()
            # All samples dropped: nothing was learned on the semantic term this step; log 0.
            losses["loss/semantic"] = (kept_sum / kept.clamp(min=1)).detach()
        if cfg.lambda_repa > 0:
            if out.aligned is None or align_target is None:
                raise ValueError(
                    "lambda_repa > 0 needs the model's projector output (out.aligned; build the "
                    "backbone with a projector) and align_target (encoder features); got "
                    f"aligned={'None' if out.aligned is None else 'tensor'}, "
                    f"align_target={'None' if align_target is None else 'tensor'}"
                )
            repa = self.alignment_loss(_at_least_f32(out.aligned), _at_least_f32(align_target))
            loss = loss + cfg.lambda_repa * repa
            losses["loss/repa"] = repa.detach()
        losses["loss"] = loss
        return losses
