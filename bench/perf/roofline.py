"""Roofline of `bench perf`: this machine's matmul peak and each training row's share of it.

Model FLOPs are counted analytically from the config (the convention of PaLM's MFU and nanoGPT):
every matmul and convolution of the network, 2 FLOPs per multiply-add, plus attention's two
batched products (QK^T and AV: 4 N^2 D per block and sample). Not counted: elementwise work
(LayerNorm, GELU, modulation, the loss), the optimiser, the EMA, and recomputation by activation
checkpointing, which is overhead rather than model arithmetic. A training step is 3x the forward
(backward = 2x forward: gradients with respect to inputs and to weights). tests/test_perf.py
checks the forward count against torch's FlopCounterMode on the real network.

The peak is the median over repeats of a square `matmul_size` x `matmul_size` matmul in fp32 and
in bf16 on the same device and threads, so "share of peak" says how far the step is from what
this machine's GEMM reaches.
"""

from __future__ import annotations

import statistics
import time

import torch

from models.backbone import BackboneConfig

MATMUL_SIZE = 2048
FREQUENCY_EMBEDDING = 256  # TimestepEmbedder's sinusoidal input width (models/backbone.py)


def forward_flops_per_image(config: BackboneConfig) -> int:
    """Matmul + convolution + attention FLOPs of one forward pass of a JointDiT (per image)."""
    width, patch, k = config.hidden_size, config.patch_size, 2 if config.learn_sigma else 1
    latent_tokens = config.num_patches
    tokens = latent_tokens * (2 if config.fusion == "separate" else 1)
    channels = config.latent_channels + config.semantic_channels
    hidden = int(width * config.mlp_ratio)
    embed = 2 * latent_tokens * patch * patch * channels * width  # patch convs (one or two)
    condition = 2 * (FREQUENCY_EMBEDDING * width + width * width)  # timestep MLP, once per image
    per_block = (2 * tokens * width * (3 * width + width + 2 * hidden)  # qkv, proj, fc1, fc2
                 + 4 * tokens * tokens * width                           # QK^T and AV
                 + 2 * width * 6 * width)                                # adaLN, once per image
    # final adaLN, then each head on L tokens (merged: both heads read the same L tokens)
    final = 2 * width * 2 * width + 2 * latent_tokens * width * patch * patch * k * channels
    projector = 0
    if config.projector_dim:  # REPA MLP on the latent tokens: D -> H -> H -> D_enc
        h = config.projector_hidden
        projector = 2 * latent_tokens * (width * h + h * h + h * config.projector_dim)
    return embed + condition + config.depth * per_block + final + projector


def train_flops_per_image(config: BackboneConfig) -> int:
    """Forward + backward (2x forward) model FLOPs of one training image."""
    return 3 * forward_flops_per_image(config)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = MATMUL_SIZE, repeats: int = 5,
                min_seconds: float = 0.3) -> float:
    """Median GFLOP/s of a size x size matmul in `dtype` over `repeats` timed repeats."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    calls = 1
    while True:  # calibrate on a batch of calls (one tiny call's time is noise on a loaded machine)
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds / 4 or calls >= 4096:
            break
        calls *= 2
    calls = max(1, min(4 * calls, round(calls * min_seconds / max(elapsed, 1e-9))))
    rates = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        sync()
        rates.append(2 * size**3 * calls / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)
