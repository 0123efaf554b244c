"""Joint DiT/SiT backbone: adaLN-Zero transformer over latent (+ semantic) tokens.

The architecture is DiT's (Peebles & Xie 2023), which SiT reuses unchanged. ReDi (arXiv 2504.16064,
§3.3) adds a semantic input z on the latent grid, fused in one of three ways (`BackboneConfig.fusion`):

- "none":     latent only; with semantic_channels = 0 this is exactly DiT/SiT (same parameters).
- "merged":   eq. 7-8, h = x W^x_emb + z W^z_emb: one token per patch (L tokens), two output heads.
              Identical to the official code's single conv over the channel concatenation [x, z]
              (the shared bias lives in `x_embedder.proj`; `z_embedder.proj` has no bias).
- "separate": eq. 9-10, h = [x W^x_emb, z W^z_emb] along the sequence (2L tokens); o = [o^x, o^z],
              latent head on o^x, semantic head on o^z. The official code has no such variant; both
              halves get the same 2-D sin-cos position embedding and the z embedder keeps its own bias.

Module names follow the official layout (t_embedder.mlp.{0,2}, y_embedder.embedding_table,
blocks.N.attn.{qkv,proj}, blocks.N.mlp.{fc1,fc2}, blocks.N.adaLN_modulation.1, final_layer.linear,
final_layer.adaLN_modulation.1, pos_embed, projector.{0,2,4}). Our extra names: `z_embedder.proj`
(semantic patch embedding) and `final_layer.linear_z` (semantic output head). `models/official_checkpoint.py`
maps the official channel-concatenated layout onto these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.repa import build_projector
from models.settings import FUSIONS, MODEL_SIZES, PATCH_SIZES, split_model_size


@dataclass(frozen=True)
class BackboneConfig:
    """Shape of a JointDiT. Validated on construction; every error names the field to fix."""

    hidden_size: int
    depth: int
    num_heads: int
    input_size: int = 32
    """Side of the square latent grid H = W (before patchify)."""
    patch_size: int = 2
    latent_channels: int = 4
    """C_x: channels of the latent x on the grid."""
    semantic_channels: int = 0
    """C_z: channels of the semantic input z on the same grid (ReDi: PCA rank r, e.g. 8)."""
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    """1 for unconditional models; index num_classes is the null label when a null row exists."""
    class_dropout_prob: float = 0.1
    """Only decides whether the label table has a null row (> 0); the objective does the dropping."""
    fusion: str = "none"
    learn_sigma: bool = False
    """Each modality head outputs 2x channels: [prediction, variance] (DiT's learned Sigma)."""
    grad_checkpointing: bool = False
    align_layer: int = 8
    """1-indexed block after which tokens go to the projector (official `(i + 1) == repa_layer`)."""
    projector_dim: int = 0
    """0 = no REPA projector; else the encoder feature dimension (e.g. 768 for DINOv2-B)."""
    projector_hidden: int = 2048

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"BackboneConfig: {message}")

        for name in ("hidden_size", "depth", "num_heads", "input_size", "patch_size",
                     "latent_channels", "num_classes", "projector_hidden"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be a positive int, got {value!r}")
        require(isinstance(self.semantic_channels, int) and self.semantic_channels >= 0,
                f"semantic_channels must be an int >= 0, got {self.semantic_channels!r}")
        require(isinstance(self.projector_dim, int) and self.projector_dim >= 0,
                f"projector_dim must be an int >= 0 (0 = no projector), got {self.projector_dim!r}")
        require(self.fusion in FUSIONS, f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.fusion == "none":
            require(self.semantic_channels == 0,
                    f"fusion 'none' is latent-only: set semantic_channels=0 (got {self.semantic_channels}) "
                    "or choose fusion 'merged'/'separate'")
        else:
            require(self.semantic_channels > 0,
                    f"fusion {self.fusion!r} needs semantic_channels > 0; use fusion 'none' for latent-only")
        require(self.input_size % self.patch_size == 0,
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        require(self.hidden_size % self.num_heads == 0,
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        require(self.hidden_size % 4 == 0,
                f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos position embedding)")
        require(self.mlp_ratio > 0 and int(self.hidden_size * self.mlp_ratio) >= 1,
                f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        require(0.0 <= self.class_dropout_prob < 1.0,
                f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.projector_dim > 0:
            require(isinstance(self.align_layer, int) and 1 <= self.align_layer <= self.depth,
                    f"align_layer must be in [1, depth={self.depth}] when a projector is used, "
                    f"got {self.align_layer!r}")

    @property
    def grid_size(self) -> int:
        """Tokens per side, h = w = input_size / patch_size."""
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """L: patches per modality."""
        return self.grid_size**2


def backbone_config(name: str, **overrides) -> BackboneConfig:
    """Config for a registry size such as "XL/2", "S/1", "SiT-XL/2" or "DiT-B/4" (Table 7 + DiT's S).

    `overrides` set any other field (channels, fusion, learn_sigma, projector, ...); the size and
    patch come from the name only.
    """
    parsed = split_model_size(name)
    if parsed is None:
        raise ValueError(f"unknown model {name!r}: expected '<size>/<patch>' with size in "
                         f"{sorted(MODEL_SIZES)} and patch in {PATCH_SIZES}, e.g. 'XL/2'")
    size, patch = parsed
    fixed = dict(MODEL_SIZES[size], patch_size=patch)
    clash = sorted(set(fixed) & set(overrides))
    if clash:
        raise ValueError(f"{clash} are fixed by the model name {name!r}; pick another size instead")
    return BackboneConfig(**fixed, **overrides)


def count_parameters(model: nn.Module) -> int:
    """All nn.Parameters, including the frozen `pos_embed`: DiT's train.py convention (675M for XL/2)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Layers


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (MAE convention, as DiT/SiT), shape (grid_size**2, hidden_size).

    Tokens are row-major (row i, column j). MAE builds `meshgrid(grid_w, grid_h)` and feeds its first
    plane to the "h" half, so the FIRST half of the channels encodes the column j and the second half
    the row i; each half is [sin(pos * omega), cos(pos * omega)], omega_k = 10000^(-k / (hidden / 4)).
    Computed in float64 and stored in float32, as the official code does.
    """
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (g, g) each

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (g*g, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (g*g, D/2)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # (g*g, D)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) * (1 + scale) + shift, with shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def tokens_of(maps: torch.Tensor) -> torch.Tensor:
    """Patch-embedding maps (B, D, h, w) -> tokens (B, h*w, D), row-major, laid out token-major.

    timm's PatchEmbed (and so the official code) returns the transposed view, whose memory order
    stays (B, D, L): every residual add then keeps that order and every layer norm first copies or
    transposes its input, in each block, forward and backward. One copy here gives the whole
    residual stream its natural order; values are unchanged (the fp32 forward stays bit-identical).
    """
    return maps.flatten(2).transpose(1, 2).contiguous()


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, L, D) with a stride-p conv (`proj`, as timm's PatchEmbed)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int, bias: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tokens_of(self.proj(x))


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): 256-d [cos, sin] frequency embedding of t as given, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        weight_dtype = self.mlp[0].weight.dtype
        # float32 like the official code (bit-exact there); float64 when the model is float64.
        dtype = torch.float64 if weight_dtype == torch.float64 else torch.float32
        half = self.frequency_size // 2
        # same operation order as the official code: (-log(10000) * k) / half
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=dtype, device=t.device) / half)
        angles = t.to(dtype)[:, None] * freqs[None]  # (B, 128)
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1).to(weight_dtype))


class LabelEmbedder(nn.Module):
    """y (B,) -> (B, D). Row num_classes is the null label when class_dropout_prob > 0."""

    def __init__(self, num_classes: int, hidden_size: int, has_null: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(has_null), hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


def attention_form(device_type: str, dtype: torch.dtype) -> str:
    """How attention runs for q, k, v of `dtype` on `device_type`: "sdpa" (torch's fused kernel) or
    "math" (two batched matmuls and a softmax, all in `dtype`).

    fp32 and float64 always take SDPA, so the fp32 forward stays bit-identical to the official code.
    bf16 on a CPU takes the math path: torch's fused CPU attention in bf16 is slower than in fp32,
    while the math path's two products are plain bf16 matmuls (AMX / AVX512-BF16); it was the
    fastest bf16 form at the tiny and SiT-S/2 shapes (docs/performance.md). `bench perf` times the
    forms at the step's shapes on the machine it runs on and prints whether this rule picks the
    fastest. GPUs keep SDPA (flash / memory-efficient kernels in bf16).
    """
    return "math" if device_type == "cpu" and dtype == torch.bfloat16 else "sdpa"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v over (B, heads, N, head_dim), in the form `attention_form`
    picks for q's device and dtype."""
    if attention_form(q.device.type, q.dtype) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    return math_attention(q, k, v)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention as two batched matmuls and a softmax in q's dtype (autograd derives the backward)."""
    # the scale folded into q: N x head_dim multiplies instead of N x N
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return torch.softmax(scores, dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention; fused qkv laid out as (B, N, 3, heads, head_dim) like timm's."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = attend(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class TanhGELU(nn.Module):
    """GELU in its tanh approximation, the official MLP's activation: 0.5 x (1 + tanh(u)) with
    u = sqrt(2/pi) (x + 0.044715 x^3).

    Eager, it is torch's kernel (the fp32 forward stays bit-identical to the official code). Traced
    by torch.compile for a CPU, it is written x * sigmoid(2u), the same function (1 + tanh(u) =
    2 sigmoid(2u)): inductor compiles that form to kernels 1.7x (bf16) to 2.6x (fp32) faster forward
    and backward than its tanh form, which was a fifth of the compiled bf16 step (docs/performance.md).
    GPUs keep the tanh form.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.compiler.is_compiling():
            # Constants only multiply: a constant added to a bf16 tensor is rounded to bf16 first
            # (2 sqrt(2/pi) = 1.5958 would become 1.5938, a 1e-3 bias in the bf16 GELU).
            two_u = (_TWO_SQRT_2_OVER_PI * x) * (1 + 0.044715 * x * x)
            return x * torch.sigmoid(two_u)
        return F.gelu(x, approximate="tanh")


_TWO_SQRT_2_OVER_PI = 2 * math.sqrt(2 / math.pi)


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = TanhGELU()
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c (B, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Shared norm + adaLN (shift, scale), then one linear head per modality (p*p*C*k outputs each)."""

    def __init__(self, hidden_size: int, latent_outputs: int, semantic_outputs: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, latent_outputs)
        self.linear_z = nn.Linear(hidden_size, semantic_outputs) if semantic_outputs else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return modulate(self.norm_final(h), shift, scale)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p); token features ordered (p_row, p_col, channel) as DiT."""
    batch, count, _ = tokens.shape
    side = math.isqrt(count)
    x = tokens.reshape(batch, side, side, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(batch, channels, side * patch_size, side * patch_size)


class BackboneOutput(NamedTuple):
    """x: (B, C_x*k, H, W); z: (B, C_z*k, H, W) or None; aligned: (B, L, D_enc) or None (k = 2 if learn_sigma)."""

    x: torch.Tensor
    z: torch.Tensor | None
    aligned: torch.Tensor | None


# ----------------------------------------------------------------------------------------------
# The network


class JointDiT(nn.Module):
    """DiT/SiT over latent x and optional semantic z; see the module docstring for fusion modes.

    forward(x, t, y, z=None) -> BackboneOutput(x, z, aligned). The network draws no random numbers:
    label dropout and modality drop belong to the objective. With learn_sigma each head returns
    [prediction, variance] channels, unlike the official SiT forward which drops the variance half;
    flow samplers simply ignore the variance channels.
    """

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        cfg, width, patch = config, config.hidden_size, config.patch_size
        k = 2 if cfg.learn_sigma else 1
        # Fixed sin-cos table, a frozen Parameter as in DiT (so it is saved and counted like theirs).
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, width), requires_grad=False)
        self.x_embedder = PatchEmbed(cfg.latent_channels, width, patch, bias=True)
        # merged: no bias, the official single conv over [x, z] has one bias (kept in x_embedder).
        self.z_embedder = (PatchEmbed(cfg.semantic_channels, width, patch, bias=cfg.fusion == "separate")
                           if cfg.semantic_channels else None)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(cfg.num_classes, width, has_null=cfg.class_dropout_prob > 0)
        self.blocks = nn.ModuleList(DiTBlock(width, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(width, patch * patch * cfg.latent_channels * k,
                                      patch * patch * cfg.semantic_channels * k)
        self.projector = (build_projector(width, cfg.projector_hidden, cfg.projector_dim)
                          if cfg.projector_dim else None)
        self.initialize_weights()

    @property
    def num_tokens(self) -> int:
        """Sequence length inside the transformer: L, or 2L with separate tokens."""
        return self.config.num_patches * (2 if self.config.fusion == "separate" else 1)

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, adaLN-Zero, zero output heads."""
        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(basic_init)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.config.hidden_size, self.config.grid_size).unsqueeze(0))
        # Patch embeddings like a linear over (C * p * p) inputs. merged: one xavier draw over the joint
        # (D, (C_x + C_z) * p * p) matrix, the same distribution as the official single conv.
        embedders = [self.x_embedder.proj] + ([self.z_embedder.proj] if self.z_embedder is not None else [])
        joint = self.config.fusion == "merged"
        with torch.no_grad():
            for group in ([embedders] if joint else [[e] for e in embedders]):
                weight = torch.cat([e.weight.flatten(1) for e in group], dim=1)  # (D, sum C * p * p)
                nn.init.xavier_uniform_(weight)
                for e, part in zip(group, weight.split([e.weight[0].numel() for e in group], dim=1)):
                    e.weight.copy_(part.view_as(e.weight))
        for e in embedders:
            if e.bias is not None:
                nn.init.zeros_(e.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                       self.final_layer.linear,
                                                                       self.final_layer.linear_z]:
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None) -> None:
        cfg = self.config
        grid = (cfg.input_size, cfg.input_size)
        if x.ndim != 4 or x.shape[1] != cfg.latent_channels or tuple(x.shape[2:]) != grid:
            raise ValueError(f"x must be (B, {cfg.latent_channels}, {cfg.input_size}, {cfg.input_size}), "
                             f"got {tuple(x.shape)}")
        batch = x.shape[0]
        if t.shape != (batch,) or y.shape != (batch,):
            raise ValueError(f"t and y must be ({batch},), got {tuple(t.shape)} and {tuple(y.shape)}")
        if cfg.semantic_channels == 0:
            if z is not None:
                raise ValueError("z was given but the model is latent-only (semantic_channels=0)")
        elif z is None or tuple(z.shape) != (batch, cfg.semantic_channels, *grid):
            got = None if z is None else tuple(z.shape)
            raise ValueError(f"z must be ({batch}, {cfg.semantic_channels}, {cfg.input_size}, "
                             f"{cfg.input_size}) (zeros for a dropped representation), got {got}")

    def _embed(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Tokens (B, N, D) with position embedding; N = L, or 2L for separate tokens (eq. 9)."""
        fusion = self.config.fusion
        if fusion == "merged":
            # eq. 7 as the official single conv over [x, z]: weight (D, C_x + C_z, p, p), one bias.
            weight = torch.cat([self.x_embedder.proj.weight, self.z_embedder.proj.weight], dim=1)
            h = F.conv2d(torch.cat([x, z], dim=1), weight, self.x_embedder.proj.bias, stride=self.config.patch_size)
            return tokens_of(h) + self.pos_embed
        h = self.x_embedder(x) + self.pos_embed
        if fusion == "separate":
            # No official scheme for separate tokens: both halves share the same sin-cos positions.
            h = torch.cat([h, self.z_embedder(z) + self.pos_embed], dim=1)  # (B, 2L, D)
        return h

    def _block(self, block: DiTBlock, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, c, use_reentrant=False)
        return block(h, c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None = None,
                *, return_aligned: bool = True) -> BackboneOutput:
        """x (B, C_x, H, W), t (B,) float, y (B,) long, z (B, C_z, H, W) or None.

        `return_aligned=False` skips the projector (e.g. at sampling time); `aligned` is then None.
        """
        self._check_inputs(x, t, y, z)
        cfg, latent_tokens = self.config, self.config.num_patches
        h = self._embed(x, z)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        aligned = None
        for index, block in enumerate(self.blocks):
            h = self._block(block, h, c)
            if self.projector is not None and return_aligned and index + 1 == cfg.align_layer:
                aligned = self.projector(h[:, :latent_tokens])  # latent tokens only: (B, L, D_enc)
        o = self.final_layer(h, c)
        o_x, o_z = (o[:, :latent_tokens], o[:, latent_tokens:]) if cfg.fusion == "separate" else (o, o)
        k = 2 if cfg.learn_sigma else 1
        out_x = unpatchify(self.final_layer.linear(o_x), cfg.patch_size, cfg.latent_channels * k)
        out_z = None
        if self.final_layer.linear_z is not None:
            out_z = unpatchify(self.final_layer.linear_z(o_z), cfg.patch_size, cfg.semantic_channels * k)
        return BackboneOutput(out_x, out_z, aligned)
