"""The DiT transport: Gaussian diffusion with epsilon prediction and a learned variance.

ReDi trains DiT with the DDPM form of the joint objective (paper eq. 5-6): the latent `x` and the
semantic features `z` are noised with the same timestep t and independent noise,

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_x ,   z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps_z

and the network predicts both noises. As in DiT (and improved DDPM), the network also outputs one
variance value v in [-1, 1] per channel, which interpolates the log variance between the posterior
variance tilde-beta_t and beta_t ("learned range"); it is trained with the variational bound (VLB)
while the epsilon prediction is held fixed (stop-grad), the "hybrid" loss of Nichol & Dhariwal.
DiT's exact choices (read from facebookresearch/DiT `diffusion/`): linear betas 1e-4..0.02 scaled by
1000/T, `LossType.MSE` so the VLB term is added *unscaled* (only RESCALED_MSE multiplies it by
T/1000), VLB in bits per dim with the discretized Gaussian decoder at t = 0, no x_0 clipping, and
uniform timesteps. The official ReDi code never released this transport; this is our own code.

Semantic channels and the learned variance (the paper is silent, section 1.2 of the method notes):
the semantic head also outputs a variance (the backbone contract gives out.z 2*C_z channels with
learn_sigma) and we train it with its own VLB term, averaged over the semantic elements, weighted
by lambda_z and masked exactly like the semantic epsilon term. Why: (1) the ancestral sampler needs
a variance for z_t too, and an untrained head would leave it arbitrary; (2) eq. 5 applies the same
forward process to both modalities, so the same reverse parameterisation and bound apply; (3) a
per-modality mean keeps each term's scale independent of C_z, as the official per-modality MSE does;
(4) lambda_z then scales the whole semantic contribution, so lambda_z = 0 (or a dropped sample, for
which the semantic input is a null and the target meaningless) removes every semantic term.

Sampling (respacing, ancestral steps, guidance) lives in `ddpm_sampling.py` (`sample_ddpm`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from models.joint_objective import (
    AlignmentLoss,
    JointObjective,
    JointObjectiveConfig,
    joint_mse,
    joint_term,
    logged_semantic,
    mean_flat,
)

BETA_SCHEDULES = ("linear",)


# ----------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, kw_only=True)
class DDPMConfig(JointObjectiveConfig):
    """Settings of the DiT transport: the shared joint-objective fields (models.joint_objective:
    lambda_z, p_drop, drop_mode, class_dropout_prob, lambda_repa, with the same names and meaning
    as in FlowConfig) and the diffusion's own; validated on construction."""

    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    learn_sigma: bool = True  # DiT: eps + learned-range variance, hybrid loss

    def __post_init__(self) -> None:
        super().__post_init__()

        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"DDPMConfig.{message}")

        require(isinstance(self.num_timesteps, int) and self.num_timesteps >= 2,
                f"num_timesteps must be an int >= 2, got {self.num_timesteps!r}")
        require(self.beta_schedule in BETA_SCHEDULES,
                f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        # linear: beta_T = 0.02 * 1000 / T reaches 1 at T = 20, where abar_T = 0 and eps -> x_0 is singular.
        require(self.beta_schedule != "linear" or self.num_timesteps > 20,
                f"num_timesteps must be > 20 for the linear schedule, got {self.num_timesteps}")


def named_beta_schedule(name: str, num_timesteps: int) -> Tensor:
    """Betas (float64, shape (T,)) of a named schedule. "linear": Ho et al.'s 1e-4..0.02, scaled
    by 1000/T so that the process stays similar for any T (DiT `get_named_beta_schedule`)."""
    if name != "linear":
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {BETA_SCHEDULES}")
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


# ----------------------------------------------------------------------------
# Gaussian helpers (all elementwise, in nats)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF that DiT/ADM use in the decoder NLL
    (kept so our VLB values match DiT's; max error about 2e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) per element for a Gaussian discretised into 256 bins on [-1, 1] (the DDPM decoder
    L_0); the two edge bins extend to -inf / +inf. Probabilities are floored at 1e-12."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ----------------------------------------------------------------------------
# The diffusion process


class GaussianDiffusion:
    """The forward process and the reverse-step algebra for one beta schedule.

    All schedule arrays are float64 CPU tensors of shape (T,); they are gathered at t and cast to
    the data's dtype/device only when used (DiT does the same, casting to float32).
    """

    def __init__(self, betas: Tensor) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be 1-D with at least 2 entries, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1); check the schedule and num_timesteps")
        self.num_timesteps = int(betas.numel())
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, tilde-beta_t).
        one_minus_ac = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus_ac
        # tilde-beta_0 = 0, so its log is clipped to tilde-beta_1 (as in improved DDPM).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / one_minus_ac
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / one_minus_ac
        self.log_betas = torch.log(betas)
        # DiT's fixed "large" variance (learn_sigma=False): beta_t, with tilde-beta_1 at t = 0.
        self.fixed_large_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]]))

    @classmethod
    def from_config(cls, config: DDPMConfig) -> "GaussianDiffusion":
        """The schedule named by `config` (DiT: linear, 1000 steps)."""
        return cls(named_beta_schedule(config.beta_schedule, config.num_timesteps))

    @staticmethod
    def gather(array: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """array[t] shaped (B, 1, ..., 1) to broadcast against `like`, in like's dtype/device."""
        values = array.to(like.device)[t.long()].to(like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (eq. 5)."""
        return self.gather(self.sqrt_alphas_cumprod, t, x0) * x0 + self.gather(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * noise

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self.gather(self.posterior_mean_coef1, t, x_t) * x0
                + self.gather(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, self.gather(self.posterior_variance, t, x_t),
                self.gather(self.posterior_log_variance_clipped, t, x_t))

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return self.gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self.gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        ) * eps

    def model_log_variance(self, var_values: Optional[Tensor], t: Tensor, like: Tensor) -> Tensor:
        """Log variance of p(x_{t-1} | x_t). With learned range (var_values in [-1, 1], same shape
        as `like`): frac * log beta_t + (1 - frac) * log tilde-beta_t (clipped), frac = (v + 1) / 2.
        Without (None): DiT's fixed large variance, broadcast to like's shape."""
        if var_values is None:
            return self.gather(self.fixed_large_log_variance, t, like).expand_as(like)
        frac = (var_values + 1.0) / 2.0
        max_log = self.gather(self.log_betas, t, like)
        min_log = self.gather(self.posterior_log_variance_clipped, t, like)
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(
        self, x_t: Tensor, t: Tensor, eps: Tensor, var_values: Optional[Tensor], clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from the predicted noise: keys `mean`, `log_variance`, `pred_xstart`.
        DiT neither clips x_0 in training nor in sampling (clip_denoised=False)."""
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": self.model_log_variance(var_values, t, x_t), "pred_xstart": pred_xstart}

    def vb_terms_bpd(self, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor, var_values: Tensor) -> Tensor:
        """The VLB term L_t per sample, (B,), in bits per dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0 and the discretized Gaussian decoder NLL at t = 0, each averaged over elements."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance(x_t, t, eps, var_values)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)


# ----------------------------------------------------------------------------
# The training objective


@dataclass
class DDPMTerms:
    """Per-sample terms of one training step, each (B,), before the batch mean; `repa` is a scalar.

    Semantic terms are unweighted and already masked (exactly 0 where the modality was dropped).
    Fields are None when the term is disabled.
    """

    t: Tensor  # timestep indices, long
    labels: Tensor  # labels after CFG label dropout (num_classes = null)
    semantic_kept: Optional[Tensor]  # bool, False where the semantic modality was dropped
    latent_mse: Tensor
    semantic_mse: Optional[Tensor]
    vlb_latent: Optional[Tensor]
    vlb_semantic: Optional[Tensor]
    repa: Optional[Tensor]


class DDPMTransport:
    """DiT's hybrid objective on the joint (latent, semantic) input: eq. 5-6 plus the VLB term."""

    def __init__(self, config: DDPMConfig, alignment_loss: AlignmentLoss | None = None) -> None:
        """`alignment_loss(aligned, target) -> scalar` is the REPA term, as for FlowTransport;
        defaults to models.repa.repa_alignment_loss (imported only when lambda_repa > 0)."""
        self.config = config
        self.diffusion = GaussianDiffusion.from_config(config)
        self.objective = JointObjective(config, alignment_loss)

    def _split_output(self, out: Optional[Tensor], channels: int, name: str) -> tuple[Tensor, Optional[Tensor]]:
        """(B, k*C, H, W) -> eps (B, C, H, W), variance values (B, C, H, W) or None when k = 1."""
        k = 2 if self.config.learn_sigma else 1
        if out is None or out.shape[1] != k * channels:
            got = None if out is None else tuple(out.shape)
            raise ValueError(
                f"model output {name} must have {k}*{channels} channels, got {got}; build the backbone "
                f"with learn_sigma={self.config.learn_sigma} to match DDPMConfig.learn_sigma"
            )
        if k == 1:
            return out, None
        eps, var_values = torch.split(out, channels, dim=1)
        return eps, var_values

    def per_sample_losses(
        self,
        model: Callable[..., Any],
        x: Tensor,
        z: Optional[Tensor],
        y: Tensor,
        generator: torch.Generator,
        align_target: Optional[Tensor] = None,
    ) -> DDPMTerms:
        """The per-sample terms of one training step (see training_losses). Draws, all from
        `generator`: t (B,) uniform on {0..T-1}, then `JointObjective.draw`'s (docs/method.md,
        "The modality drop", gives the order and the drop rule)."""
        cfg, diff, objective = self.config, self.diffusion, self.objective
        objective.check_inputs(x, z, y, generator)
        dtype = torch.promote_types(x.dtype, torch.float32)  # loss math in >= float32
        batch, gdev = x.shape[0], generator.device
        t = torch.randint(0, diff.num_timesteps, (batch,), generator=generator, device=gdev).to(x.device)
        x0 = x.to(dtype)
        z0 = None if z is None else z.to(dtype)
        draws = objective.draw(generator, x0, z0, dtype)  # independent noise, same t (eq. 5)
        eps_x, eps_z = draws.eps_x, draws.eps_z
        # CFG label dropout per sample (DiT does it in its LabelEmbedder); null label = num_classes.
        labels = objective.drop_labels(y, draws.label_u)

        x_t = diff.q_sample(x0, t, eps_x)
        z_t = kept = None
        if z0 is not None:
            kept, z0 = objective.modality_drop(z0, draws.drop_u)
            # "sample": the exact-zeros null input RG uses at sampling (paper sec. 3.5 "zero out z_t").
            z_t = objective.semantic_input(diff.q_sample(z0, t, eps_z), kept)

        out = model(x_t, t.to(dtype), labels, z=z_t)  # DiT: the integer index as a float
        eps_pred_x, var_x = self._split_output(out.x, cfg.latent_channels, "x")
        eps_pred_z = var_z = None
        if z0 is not None:
            eps_pred_z, var_z = self._split_output(out.z, cfg.semantic_channels, "z")
        # eq. 6 per modality, each averaged over its own elements (models.joint_objective).
        mse = joint_mse(eps_pred_x, eps_x, eps_pred_z, eps_z, kept, 1.0)
        zero = torch.zeros((), dtype=dtype, device=x.device)
        # torch.where (not a product): a dropped sample's term is exactly 0 whatever its value.
        semantic_mse = None if mse.semantic is None else torch.where(kept, mse.semantic, zero)

        vlb_latent = vlb_semantic = None
        if cfg.learn_sigma:
            # Stop-grad on eps: the VLB term trains only the variance (improved DDPM's hybrid loss).
            vlb_latent = diff.vb_terms_bpd(x0, x_t, t, eps_pred_x.detach().to(dtype), var_x.to(dtype))
            if z0 is not None:
                vlb_z = diff.vb_terms_bpd(z0, z_t, t, eps_pred_z.detach().to(dtype), var_z.to(dtype))
                vlb_semantic = torch.where(kept, vlb_z, zero)

        repa = objective.alignment_term(out.aligned, align_target)
        return DDPMTerms(t, labels, kept, mse.latent, semantic_mse, vlb_latent, vlb_semantic, repa)

    def training_losses(
        self,
        model: Callable[..., Any],
        x: Tensor,
        z: Optional[Tensor],
        y: Tensor,
        generator: torch.Generator,
        align_target: Optional[Tensor] = None,
    ) -> dict[str, Tensor]:
        """Hybrid joint loss with label dropout, modality drop and optional REPA.

        x (B, C_x, H, W) clean latent, z (B, C_z, H, W) clean semantic features or None, y (B,) long.
        `loss` (to backprop) = batch mean of [mse_x + lambda_z * mse_z + vlb_x + lambda_z * vlb_z]
        + lambda_repa * repa, with the semantic terms 0 on dropped samples (official lam = 0).
        Logged, detached: `loss/latent`; `loss/semantic` (C_z > 0; mean over kept samples, 0 if none,
        as FlowTransport logs it); `loss/vlb` (learn_sigma; exactly the VLB amount added to `loss`,
        in bits/dim, unscaled as DiT's LossType.MSE); `loss/repa` (lambda_repa > 0).
        """
        cfg = self.config
        terms = self.per_sample_losses(model, x, z, y, generator, align_target)
        # Semantic terms are already masked: joint_term adds lambda_z * each (eq. 6, official lam).
        per_sample = joint_term(terms.latent_mse, terms.semantic_mse, None, cfg.lambda_z)
        losses = {"loss/latent": terms.latent_mse.mean().detach()}
        if terms.semantic_mse is not None:
            losses["loss/semantic"] = logged_semantic(terms.semantic_mse, terms.semantic_kept)
        if terms.vlb_latent is not None:
            vlb = joint_term(terms.vlb_latent, terms.vlb_semantic, None, cfg.lambda_z)
            per_sample = per_sample + vlb
            losses["loss/vlb"] = vlb.mean().detach()
        return self.objective.finish(per_sample, terms.repa, losses)
