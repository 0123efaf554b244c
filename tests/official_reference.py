"""Test-only, minimal re-implementation of the OFFICIAL ReDi/SiT network (zelaki/ReDi models.py).

Written independently of models/backbone.py so that tests can check the import of the official
layout: one conv over the channel concatenation [x (C_x), z (C_z)], one final linear over all
(C_x + C_z) * k output channels, learn_sigma chunking, and the official doubled-batch guidance
entry points forward_with_cfg / forward_with_cfg_vae / forward_with_rg. It uses timm's building
blocks as the official code does (with timm's explicit softmax attention, not SDPA) and a numpy
MAE-style position embedding. No label dropout: compare in eval mode.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed
from torch import nn


def mae_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed: meshgrid(w, h); first half of dims from plane 0 (w varies)."""
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))

    def one_dim(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_dim(dim // 2, grid[0]), one_dim(dim // 2, grid[1])], axis=1)


class RefBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads=heads, qkv_bias=True)
        self.attn.fused_attn = False  # explicit softmax(q k^T / sqrt(d)) v: independent of SDPA
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, 4 * width, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        m = self.adaLN_modulation(c)[:, None, :].chunk(6, dim=-1)  # each (B, 1, D)
        h = h + m[2] * self.attn(self.norm1(h) * (1 + m[1]) + m[0])
        return h + m[5] * self.mlp(self.norm2(h) * (1 + m[4]) + m[3])


class RefFinal(nn.Module):
    def __init__(self, width: int, outputs: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, outputs)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))


class OfficialReDiSiT(nn.Module):
    """Official-style SiT over in_channels = C_x + C_z concatenated channels."""

    def __init__(self, input_size: int, patch: int, latent_channels: int, semantic_channels: int,
                 width: int, depth: int, heads: int, num_classes: int, learn_sigma: bool,
                 projector_dim: int = 0, projector_hidden: int = 32, repa_layer: int = 1):
        super().__init__()
        self.latent_channels = latent_channels
        self.in_channels = latent_channels + semantic_channels
        self.out_channels = self.in_channels * (2 if learn_sigma else 1)
        self.learn_sigma, self.patch, self.repa_layer = learn_sigma, patch, repa_layer
        self.x_embedder = PatchEmbed(input_size, patch, self.in_channels, width, bias=True)
        self.t_mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.label_table = nn.Embedding(num_classes + 1, width)
        grid = input_size // patch
        self.pos_embed = nn.Parameter(torch.from_numpy(mae_pos_embed(width, grid)).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList(RefBlock(width, heads) for _ in range(depth))
        self.final_layer = RefFinal(width, patch * patch * self.out_channels)
        self.projector = None
        if projector_dim:
            self.projector = nn.Sequential(nn.Linear(width, projector_hidden), nn.SiLU(),
                                           nn.Linear(projector_hidden, projector_hidden), nn.SiLU(),
                                           nn.Linear(projector_hidden, projector_dim))

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """Our attribute names -> the official key names (t_embedder.mlp, y_embedder.embedding_table)."""
        renames = {"t_mlp.": "t_embedder.mlp.", "label_table.": "y_embedder.embedding_table."}
        out = {}
        for key, value in self.state_dict().items():
            for old, new in renames.items():
                key = key.replace(old, new) if key.startswith(old) else key
            out[key] = value
        return out

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.t_mlp[0].weight.dtype
        k = torch.arange(128, dtype=dtype)
        angles = t.to(dtype)[:, None] * torch.exp(-math.log(10000.0) * k / 128)[None]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)

    def forward_all(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """Returns (full output (B, out_channels, H, W), projector tokens after block repa_layer or None)."""
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_mlp(self.time_features(t)) + self.label_table(y)
        aligned = None
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if self.projector is not None and i + 1 == self.repa_layer:
                aligned = self.projector(h)
        shift, scale = self.final_layer.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        tokens = self.final_layer.linear(self.final_layer.norm_final(h) * (1 + scale) + shift)
        # unpatchify: token features ordered (p_row, p_col, channel)
        n, count, _ = tokens.shape
        g, p, ch = int(round(count**0.5)), self.patch, self.out_channels
        img = tokens.reshape(n, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4).reshape(n, ch, g * p, g * p)
        return img, aligned

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The official forward: with learn_sigma only the first (prediction) half of the channels."""
        out, _ = self.forward_all(x, t, y)
        return out.chunk(2, dim=1)[0] if self.learn_sigma else out

    def _guided(self, combined, t, y, scale, guided_channels):
        out = self.forward(combined, t, y)
        guided, rest = out[:, :guided_channels], out[:, guided_channels:]
        cond, uncond = guided.chunk(2, dim=0)
        half = uncond + scale * (cond - uncond)
        return torch.cat([torch.cat([half, half], dim=0), rest], dim=1)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Official: first half of x duplicated; y = [y, null]; every output channel guided."""
        half = x[: len(x) // 2]
        return self._guided(torch.cat([half, half]), t, y, cfg_scale, self.in_channels)

    def forward_with_cfg_vae(self, x, t, y, cfg_scale):
        """Official --cfg-vae: only the first C_x (latent) channels guided, the rest passed through
        per branch (the first, conditional half of the batch is the one the sampler keeps)."""
        half = x[: len(x) // 2]
        return self._guided(torch.cat([half, half]), t, y, cfg_scale, self.latent_channels)

    def forward_with_rg(self, x, t, y, rg_scale):
        """Official RG: second half has its semantic input channels zeroed; y = [y, y]; all guided."""
        half = x[: len(x) // 2]
        half_zero = half.clone()
        half_zero[:, self.latent_channels:] = 0
        return self._guided(torch.cat([half, half_zero]), t, y, rg_scale, self.in_channels)
