"""REPA (Yu et al. 2024) as used by ReDi (Appendix B.3): a projector MLP on the hidden tokens after
block k and a negative-cosine alignment loss to frozen encoder patch features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def build_projector(hidden_size: int, projector_hidden: int = 2048, out_dim: int = 768) -> nn.Sequential:
    """Linear-SiLU-Linear-SiLU-Linear, (..., hidden_size) -> (..., out_dim); keys projector.{0,2,4}."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_hidden),
        nn.SiLU(),
        nn.Linear(projector_hidden, projector_hidden),
        nn.SiLU(),
        nn.Linear(projector_hidden, out_dim),
    )


def repa_alignment_loss(aligned: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of -cos(aligned_token, target_token); scalar in [-1, 1].

    aligned: (B, L, D) projector output; target: (B, L, D) encoder features on the same token grid
    (resizing the encoder grid to L is the caller's job). The official code sums over the batch and
    divides by the batch size, i.e. the same mean. Computed in at least float32 (safe under bf16).
    """
    if aligned.ndim != 3 or target.ndim != 3:
        raise ValueError(f"aligned and target must be (B, L, D), got {tuple(aligned.shape)} and {tuple(target.shape)}")
    if aligned.shape[0] != target.shape[0]:
        raise ValueError(f"batch sizes differ: aligned {aligned.shape[0]} vs target {target.shape[0]}")
    if aligned.shape[1] != target.shape[1]:
        raise ValueError(f"token counts differ: aligned has L={aligned.shape[1]} tokens, target has "
                         f"{target.shape[1]}; resize the encoder features to the model's token grid first")
    if aligned.shape[2] != target.shape[2]:
        raise ValueError(f"feature dims differ: aligned {aligned.shape[2]} vs target {target.shape[2]}; "
                         "set the backbone's projector_dim to the encoder feature dimension")
    dtype = torch.promote_types(torch.promote_types(aligned.dtype, target.dtype), torch.float32)
    a = F.normalize(aligned.to(dtype), dim=-1)
    b = F.normalize(target.to(dtype), dim=-1)
    return -(a * b).sum(dim=-1).mean()


def align_to_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`(B, C, h, w)` -> `(B, C, *grid)`: bilinear (align_corners=False) only if the sizes differ.

    Encoder feature maps meet the model's token grid here, for the REPA target and for the
    semantic channels alike (the official code resizes the same way after PCA)."""
    if tuple(features.shape[-2:]) == tuple(grid):
        return features
    return F.interpolate(features, size=tuple(grid), mode="bilinear", align_corners=False)
