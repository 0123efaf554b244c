"""Classifier-free guidance and Representation Guidance in one batched call (models/GUIDANCE.md).

Branches, concatenated along the batch in this order when needed:
    f_c = f(x, z, c)   fully conditional (always)
    f_u = f(x, z, null)   class dropped       (cfg_scale != 1 and some sample inside the interval)
    f_r = f(x, 0, c)   semantic input = exact zeros (rg_scale != 1), as official `forward_with_rg`
Combined (product of experts p(x,z|c) p(c|x,z)^(w-1) p(z|x,c)^(w_r-1)):
    f_hat = f_c + (w - 1)(f_c - f_u) + (w_r - 1)(f_c - f_r)
w_r = 1 is standard CFG, w = 1 is paper eq. 13. Used by both transports: `t` is passed to the
network unchanged; `noise_level` s in [0, 1] (s = 1 pure noise) drives the CFG interval only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

CFG_CHANNELS = ("latent", "all")
RG_CHANNELS = ("all", "latent")


@dataclass(frozen=True, kw_only=True)
class Guidance:
    """Guidance weights and where they apply. Defaults (all scales 1) mean no guidance."""

    latent_channels: int
    semantic_channels: int
    cfg_scale: float = 1.0  # w
    cfg_channels: str = "latent"  # "latent": CFG on latent channels only (paper's best, Fig. 6)
    interval: tuple[float, float] = (0.0, 1.0)  # CFG only while low <= noise level s <= high
    rg_scale: float = 1.0  # w_r (paper: 1.5 for B, 1.1 for XL)
    rg_channels: str = "all"  # "all" = official forward_with_rg and eq. 13
    null_class: int | None = None  # index of the null label (= num_classes); needed for CFG

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval", tuple(float(v) for v in self.interval))
        for name in ("cfg_scale", "rg_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"Guidance.{name} must be a finite number >= 0 (1 = off), got {value}")
        if self.cfg_channels not in CFG_CHANNELS:
            raise ValueError(f"Guidance.cfg_channels must be one of {CFG_CHANNELS}, got {self.cfg_channels!r}")
        if self.rg_channels not in RG_CHANNELS:
            raise ValueError(f"Guidance.rg_channels must be one of {RG_CHANNELS}, got {self.rg_channels!r}")
        if len(self.interval) != 2 or not 0.0 <= self.interval[0] <= self.interval[1] <= 1.0:
            raise ValueError(f"Guidance.interval must be (low, high) with 0 <= low <= high <= 1, got {self.interval}")
        if self.latent_channels < 1 or self.semantic_channels < 0:
            raise ValueError(
                f"Guidance needs latent_channels >= 1 and semantic_channels >= 0, "
                f"got {self.latent_channels}, {self.semantic_channels}"
            )
        if self.cfg_scale != 1.0 and (self.null_class is None or self.null_class < 0):
            raise ValueError("Guidance.cfg_scale != 1 needs null_class (the null label index, = num_classes)")
        if self.rg_scale != 1.0 and self.semantic_channels == 0:
            raise ValueError("Representation Guidance (rg_scale != 1) needs semantic channels; use rg_scale=1")

    @property
    def full_interval(self) -> bool:
        return self.interval == (0.0, 1.0)


def _as_batch(value: Tensor | float, batch: int, like: Tensor, name: str) -> Tensor:
    """Scalar or (B,) -> (B,) tensor in like's dtype/device."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or ({batch},), got {tuple(value.shape)}")
    return value


def _cfg_active(guidance: Guidance, noise_level: Tensor | float | None, batch: int, like: Tensor) -> Tensor:
    """(B,) bool: where the CFG term applies (inside the guidance interval)."""
    if noise_level is None:
        if not guidance.full_interval:
            raise ValueError("a guidance interval needs noise_level (s = 1 - t for flow, t_index / (T - 1) for DDPM)")
        return torch.ones(batch, dtype=torch.bool, device=like.device)
    s = _as_batch(noise_level, batch, like, "noise_level").to(torch.float64)
    if bool(((s < 0) | (s > 1)).any()):
        raise ValueError(f"noise_level must lie in [0, 1] (1 = pure noise), "
                         f"got range [{float(s.min())}, {float(s.max())}]")
    low, high = guidance.interval
    return (s >= low) & (s <= high)


def _split(out_part: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """(N, C * k, H, W) -> prediction (N, C, ...) in >= float32, variance (N, C*(k-1), ...)."""
    if out_part.shape[1] not in (channels, 2 * channels):
        raise ValueError(f"model output has {out_part.shape[1]} channels, expected {channels} or {2 * channels}")
    pred = out_part[:, :channels]
    return pred.to(torch.promote_types(pred.dtype, torch.float32)), out_part[:, channels:]


def _check_inputs(x: Tensor, z: Tensor | None, guidance: Guidance) -> None:
    """x (B, C_x, H, W) and z (B, C_z, H, W) or None against the guidance's channel counts."""
    cx, cz = guidance.latent_channels, guidance.semantic_channels
    if x.shape[1] != cx:
        raise ValueError(f"x has {x.shape[1]} channels, Guidance.latent_channels is {cx}")
    if z is None:
        if guidance.rg_scale != 1.0:
            raise ValueError("Representation Guidance (rg_scale != 1) needs a semantic input z; "
                             "this model is latent-only")
    elif z.shape[1] != cz:
        raise ValueError(f"z has {z.shape[1]} channels, Guidance.semantic_channels is {cz}")


def _branch_inputs(
    x: Tensor, z: Tensor | None, t_vec: Tensor, y: Tensor, guidance: Guidance, use_cfg: bool, use_rg: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(x, t, y, z) of the n = 1 + use_cfg + use_rg branches joined along the batch, each (n*B, ...):
    [f_c: (x, z, c), f_u: (x, z, null) if use_cfg, f_r: (x, zeros, c) if use_rg]."""
    xs, zs, ys = [x], [z], [y]
    if use_cfg:
        xs.append(x), zs.append(z), ys.append(torch.full_like(y, guidance.null_class))
    if use_rg:
        xs.append(x), zs.append(torch.zeros_like(z)), ys.append(y)
    z_in = None if z is None else torch.cat(zs)
    return torch.cat(xs), t_vec.repeat(len(xs)), torch.cat(ys), z_in


def _guide(parts: list[tuple[Tensor, Tensor]], w1: Tensor | None, wr1: float | None) -> Tensor:
    """One modality's guided output from its n branch chunks (prediction (B, C, H, W), variance):
    f_hat = f_c + (w - 1)(f_c - f_u) + (w_r - 1)(f_c - f_r) (eq. 13 when w = 1; models/GUIDANCE.md),
    added in this order; w1 None skips the CFG term, wr1 None the RG term. Returns (B, C*k, H, W):
    f_hat joined with f_c's variance channels."""
    f_c = parts[0][0]
    guided = f_c
    if w1 is not None:
        guided = guided + w1 * (f_c - parts[1][0])
    if wr1 is not None:
        guided = guided + wr1 * (f_c - parts[-1][0])
    # Learned-variance channels (beyond C) from the conditional branch, as DiT does.
    return torch.cat([guided, parts[0][1].to(guided.dtype)], dim=1)


def guided_prediction(
    model: Callable[..., Any],
    x: Tensor,
    z: Tensor | None,
    t: Tensor | float,
    y: Tensor,
    guidance: Guidance,
    noise_level: Tensor | float | None = None,
) -> Any:
    """Guided network output with exactly one network call (see module docstring).

    x (B, C_x, H, W), z (B, C_z, H, W) or None (latent-only), t scalar or (B,) as the transport
    passes it to the network, y (B,) labels. noise_level: scalar or (B,) in [0, 1]; needed only
    when guidance.interval is not (0, 1). Returns the model's output type with x (B, C_x*k, H, W),
    z likewise, aligned from the conditional branch; guided parts are in float32 (or float64),
    learned-variance channels come from f_c unguided.
    """
    _check_inputs(x, z, guidance)
    batch = x.shape[0]
    t_vec = _as_batch(t, batch, x, "t")
    cfg_on = torch.zeros(batch, dtype=torch.bool, device=x.device)
    if guidance.cfg_scale != 1.0:
        cfg_on = _cfg_active(guidance, noise_level, batch, x)
    use_cfg = bool(cfg_on.any())  # no sample inside the interval: skip the f_u branch entirely
    use_rg = guidance.rg_scale != 1.0
    if not (use_cfg or use_rg):
        return model(x, t_vec, y, z=z)

    x_in, t_in, y_in, z_in = _branch_inputs(x, z, t_vec, y, guidance, use_cfg, use_rg)
    out = model(x_in, t_in, y_in, z=z_in)
    # out.x (n*B, C_x*k, H, W) -> n chunks (B, ...), each split into prediction and variance.
    x_parts = [_split(p, guidance.latent_channels) for p in out.x.split(batch)]
    z_parts = None if z is None else [_split(p, guidance.semantic_channels) for p in out.z.split(batch)]
    w1 = wr1 = None
    if use_cfg:
        # (w - 1) per sample, (B, 1, 1, 1): 0 outside the interval, so f_hat = f_c there.
        # Built in the output dtype (0/1 mask times a Python float): exact in float64.
        w1 = (cfg_on.to(x_parts[0][0].dtype) * (guidance.cfg_scale - 1.0)).view(-1, 1, 1, 1)
    if use_rg:
        wr1 = guidance.rg_scale - 1.0
    gx = _guide(x_parts, w1, wr1)
    gz = None
    if z_parts is not None:
        gz = _guide(z_parts, w1 if guidance.cfg_channels == "all" else None,
                    wr1 if guidance.rg_channels == "all" else None)
    aligned = None if out.aligned is None else out.aligned[:batch]
    return type(out)(x=gx, z=gz, aligned=aligned)
