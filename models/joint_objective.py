"""ReDi's joint objective, shared by both transports (flow: SiT, eq. 17-18; DDPM: DiT, eq. 5-6).

What makes a loss ReDi's is the same whatever the transport, so it is written here once:
- the settings and their validation (`JointObjectiveConfig`, the base of FlowConfig and DDPMConfig);
- the random draws after the timestep, in a fixed order (`JointObjective.draw`);
- CFG label dropout (`drop_labels`) and the modality drop of Representation Guidance (paper §3.5:
  `modality_drop` + `semantic_input`);
- the per-modality loss: each modality's MSE averaged over its own elements, the semantic term
  weighted by lambda_z and masked on dropped samples (`joint_mse`, `joint_term`; the official
  `loss_vae + lam * loss_dino`, method notes §1.2);
- the REPA term (`alignment_term`, App. B.3) and what is logged of the semantic term.

A transport keeps only what is its own: the timestep distribution, the noising and the target
(velocity or noise), and for DDPM the learned-variance VLB.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from models.settings import DROP_MODES, choice_problem, p_drop_problem, probability_problem

AlignmentLoss = Callable[[Tensor, Tensor], Tensor]


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension except the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def at_least_f32(x: Tensor) -> Tensor:
    """Cast half/bfloat16 to float32 (loss math stays in float32 under autocast); keep float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass(frozen=True, kw_only=True)
class JointObjectiveConfig:
    """The settings every transport's joint objective shares; validated here, once.

    Subclasses (FlowConfig, DDPMConfig) add their own fields and call `super().__post_init__()`;
    messages name the subclass (e.g. "DDPMConfig.p_drop ...").
    """

    num_classes: int  # index num_classes is the null label (CFG); 1 for unconditional models
    latent_channels: int
    semantic_channels: int  # 0 = latent only
    lambda_z: float = 1.0  # weight of every semantic term (eq. 6 / eq. 18)
    p_drop: float = 0.0  # modality drop probability for Representation Guidance (paper 0.2)
    drop_mode: str = "sample"  # "sample" (paper's wording) or "batch_official" (released code)
    class_dropout_prob: float = 0.1  # CFG label dropout (SiT/DiT default)
    lambda_repa: float = 0.0  # REPA weight (official 0.5)
    drop_groups: int = 1
    """batch_official only: the number of training processes, rank r's rows being block r of the
    batch (the rule: docs/method.md, "The modality drop"); 1 on one process."""

    def __post_init__(self) -> None:
        name = type(self).__name__

        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"{name}.{message}")

        require(self.num_classes >= 1, f"num_classes must be >= 1 (1 for unconditional), got {self.num_classes}")
        require(self.latent_channels >= 1, f"latent_channels must be >= 1, got {self.latent_channels}")
        require(self.semantic_channels >= 0, f"semantic_channels must be >= 0, got {self.semantic_channels}")
        for key in ("lambda_z", "lambda_repa"):
            value = getattr(self, key)
            require(math.isfinite(value) and value >= 0, f"{key} must be a finite weight >= 0, got {value}")
        for key, problem in (("class_dropout_prob", probability_problem(self.class_dropout_prob)),
                             ("p_drop", p_drop_problem(self.p_drop, self.semantic_channels > 0)),
                             ("drop_mode", choice_problem(self.drop_mode, DROP_MODES))):
            require(problem is None, f"{key}{problem}")
        require(isinstance(self.drop_groups, int) and self.drop_groups >= 1,
                f"drop_groups must be an int >= 1 (the number of processes), got {self.drop_groups!r}")


class JointMSE(NamedTuple):
    """Per-sample terms of the joint loss, each (B,)."""

    total: Tensor  # latent + lambda_z * semantic on kept samples; latent alone on dropped ones
    latent: Tensor  # mean_flat((pred_x - target_x)^2)
    semantic: Tensor | None  # mean_flat((pred_z - target_z)^2), unmasked; None without z


def joint_term(latent: Tensor, semantic: Optional[Tensor], keep: Optional[Tensor], lambda_z: float) -> Tensor:
    """latent + lambda_z * semantic per sample, the semantic part exactly 0 where `keep` is False.

    torch.where (not a product with the mask): a dropped sample contributes 0 and no gradient,
    whatever its semantic value. keep None keeps every sample; semantic None is latent only.
    """
    if semantic is None:
        return latent
    if keep is not None:
        semantic = torch.where(keep.to(device=semantic.device, dtype=torch.bool), semantic, torch.zeros_like(semantic))
    return latent + lambda_z * semantic


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
    total = latent + lambda_z * semantic (`joint_term`). `keep_z` (B,) bool marks samples whose
    semantic term counts (None: all). Predictions are cast to float32 (float64 stays) first.
    """
    latent = mean_flat((at_least_f32(pred_x) - at_least_f32(target_x)) ** 2)
    if pred_z is None or target_z is None:
        if (pred_z is None) != (target_z is None):
            raise ValueError("joint_mse: pred_z and target_z must both be tensors or both be None")
        return JointMSE(total=latent, latent=latent, semantic=None)
    semantic = mean_flat((at_least_f32(pred_z) - at_least_f32(target_z)) ** 2)
    return JointMSE(total=joint_term(latent, semantic, keep_z, lambda_z), latent=latent, semantic=semantic)


def logged_semantic(semantic: Tensor, keep: Tensor) -> Tensor:
    """`loss/semantic`: the mean of the semantic term over the kept samples, detached; 0 when every
    sample was dropped (nothing was learned on the semantic term that step)."""
    kept_sum = torch.where(keep, semantic, torch.zeros_like(semantic)).sum()
    return (kept_sum / keep.sum().clamp(min=1)).detach()


class Draws(NamedTuple):
    """The random numbers of one step after the timestep, in the order they are drawn."""

    eps_x: Tensor  # noise like x
    eps_z: Optional[Tensor]  # independent noise like z (None without z)
    label_u: Tensor  # (B,) uniforms for label dropout
    drop_u: Tensor  # (B,) uniforms for the modality drop


class JointObjective:
    """The transport-independent half of ReDi's training loss (see the module docstring)."""

    def __init__(self, config: JointObjectiveConfig, alignment_loss: AlignmentLoss | None = None) -> None:
        """`alignment_loss(aligned, target) -> scalar` is the REPA term; defaults to
        models.repa.repa_alignment_loss (imported only when lambda_repa > 0)."""
        self.config = config
        if alignment_loss is None and config.lambda_repa > 0:
            from models.repa import repa_alignment_loss as alignment_loss
        self.alignment_loss = alignment_loss

    def check_inputs(self, x: Tensor, z: Optional[Tensor], y: Tensor, generator: Any) -> None:
        """Shapes of x (B, C_x, H, W), z (B, C_z, H, W) or None, y (B,) in [0, num_classes]."""
        cfg, name = self.config, type(self.config).__name__
        if not isinstance(generator, torch.Generator):
            raise ValueError("training_losses needs an explicit torch.Generator (all randomness is seeded)")
        if x.ndim != 4 or x.shape[1] != cfg.latent_channels:
            raise ValueError(f"x must be (B, {cfg.latent_channels}, H, W) (latent_channels), got {tuple(x.shape)}")
        if cfg.semantic_channels == 0:
            if z is not None:
                raise ValueError(f"z given but {name}.semantic_channels is 0; pass z=None")
        elif z is None or z.shape != (x.shape[0], cfg.semantic_channels, *x.shape[2:]):
            got = None if z is None else tuple(z.shape)
            raise ValueError(f"z must be (B, {cfg.semantic_channels}, H, W) on x's grid, got {got}")
        if y.shape != (x.shape[0],) or y.dtype != torch.long:
            raise ValueError(f"y must be a ({x.shape[0]},) long tensor, got {tuple(y.shape)} {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > cfg.num_classes):
            raise ValueError(f"labels must lie in [0, {cfg.num_classes}] (index {cfg.num_classes} is null)")
        if cfg.drop_mode == "batch_official" and x.shape[0] % cfg.drop_groups:
            raise ValueError(f"batch of {x.shape[0]} does not split into drop_groups={cfg.drop_groups} equal blocks")

    @staticmethod
    def draw(generator: torch.Generator, x: Tensor, z: Optional[Tensor], dtype: torch.dtype) -> Draws:
        """eps_x, label uniforms (B,), drop uniforms (B,), then eps_z (if z), in this order, from
        `generator` on its own device, moved to x's device. Drawn whatever the settings; eps_z last so
        that specs with and without semantic channels share the rest (why: docs/method.md, "The
        modality drop")."""
        gdev, batch = generator.device, x.shape[0]

        def normal(like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=generator, device=gdev, dtype=dtype).to(x.device)

        def uniform() -> Tensor:
            return torch.rand((batch,), generator=generator, device=gdev, dtype=dtype).to(x.device)

        eps_x = normal(x)
        label_u, drop_u = uniform(), uniform()
        eps_z = None if z is None else normal(z)
        return Draws(eps_x, eps_z, label_u, drop_u)

    def drop_labels(self, y: Tensor, label_u: Tensor) -> Tensor:
        """CFG label dropout per sample: the null label (index num_classes) where label_u < p."""
        cfg = self.config
        return torch.where(label_u < cfg.class_dropout_prob, torch.full_like(y, cfg.num_classes), y)

    def modality_drop(self, z_clean: Tensor, drop_u: Tensor) -> tuple[Tensor, Tensor]:
        """(keep (B,) bool, the clean semantic target (B, C_z, H, W) to noise) for the modality drop
        (paper §3.5; the rule: docs/method.md, "The modality drop"). batch_official decides each
        block of rows on the block's first uniform."""
        cfg = self.config
        if cfg.drop_mode == "sample":
            return drop_u >= cfg.p_drop, z_clean
        block = drop_u.shape[0] // cfg.drop_groups
        dropped = (drop_u[::block] < cfg.p_drop).repeat_interleave(block)
        return ~dropped, torch.where(dropped.view(-1, 1, 1, 1), torch.zeros_like(z_clean), z_clean)

    def semantic_input(self, z_noised: Tensor, keep: Tensor) -> Tensor:
        """The network's semantic input: "sample" mode feeds exact zeros on dropped samples (the
        null input Representation Guidance uses at inference); "batch_official" the noised target."""
        if self.config.drop_mode == "sample":
            return torch.where(keep.view(-1, 1, 1, 1), z_noised, torch.zeros_like(z_noised))
        return z_noised

    def alignment_term(self, aligned: Optional[Tensor], align_target: Optional[Tensor]) -> Optional[Tensor]:
        """The REPA term (unweighted scalar, App. B.3) when lambda_repa > 0, else None."""
        if self.config.lambda_repa <= 0:
            return None
        if aligned is None or align_target is None:
            raise ValueError(
                "lambda_repa > 0 needs the model's projector output (out.aligned; build the "
                "backbone with a projector) and align_target (encoder features); got "
                f"aligned={'None' if aligned is None else 'tensor'}, "
                f"align_target={'None' if align_target is None else 'tensor'}"
            )
        return self.alignment_loss(at_least_f32(aligned), at_least_f32(align_target))

    def finish(self, per_sample: Tensor, repa: Optional[Tensor], losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """`loss` = batch mean of the per-sample joint loss + lambda_repa * repa; logs `loss/repa`."""
        loss = per_sample.mean()
        if repa is not None:
            loss = loss + self.config.lambda_repa * repa
            losses["loss/repa"] = repa.detach()
        losses["loss"] = loss
        return losses
