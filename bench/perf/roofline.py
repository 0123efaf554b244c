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

The *arithmetic floor* is sharper than the peak: every matmul of one training step (forward,
gradient with respect to the input, gradient with respect to the weight) and every attention's
forward and backward, run back to back at the step's own shapes and precision with nothing else
(no elementwise work, no optimiser, no autograd). `bench perf` times it as one more workload in the
same rounds as the training steps, so its ratios to them are paired like any other.
A step doing this arithmetic with these kernels cannot be faster, up to timing noise. `official time / floor` is
therefore the most any rewrite can gain over the official step without changing the arithmetic
(precision, shapes), and `floor / row time` says how much of a row's time is the model's math.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from models.backbone import BackboneConfig, attend, attention_form, math_attention

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


def _seconds_per_call(run: Callable[[], object], device: torch.device, repeats: int, min_seconds: float) -> float:
    """Median seconds of one call of `run` over `repeats` timed batches of calls, each lasting
    about `min_seconds` (one short call's time is noise on a loaded machine)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(calls: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            run()
        sync()
        return time.perf_counter() - start

    run()  # first call: allocation, kernel selection
    calls = 1
    while True:
        elapsed = timed(calls)
        if elapsed >= min_seconds / 4 or calls >= 4096:
            break
        calls *= 2
    calls = max(1, min(4 * calls, round(calls * min_seconds / max(elapsed, 1e-9))))
    return statistics.median(timed(calls) / calls for _ in range(repeats))


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = MATMUL_SIZE, repeats: int = 5,
                min_seconds: float = 0.3) -> float:
    """Median GFLOP/s of a size x size matmul in `dtype` over `repeats` timed repeats."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)
    return 2 * size**3 / _seconds_per_call(lambda: a @ b, device, repeats, min_seconds) / 1e9


# ---------------------------------------------------------------------------------------------
# The arithmetic floor of one training step


@dataclass(frozen=True)
class Gemm:
    """One linear map of the network: (m, k) inputs times a (n, k) weight, `count` times per forward."""

    name: str
    m: int
    k: int
    n: int
    count: int = 1
    input_grad: bool = True
    """False for layers whose input is a leaf (patch embedding, timestep MLP input): no dX GEMM."""


def forward_gemms(config: BackboneConfig, batch: int) -> list[Gemm]:
    """Every matmul of one forward pass of a JointDiT over `batch` images (patch convolutions as
    the GEMMs they are: stride = kernel = p). Attention's batched products are separate
    (`attention_shape`)."""
    width, patch, k = config.hidden_size, config.patch_size, 2 if config.learn_sigma else 1
    latent_tokens = batch * config.num_patches
    tokens = latent_tokens * (2 if config.fusion == "separate" else 1)
    hidden = int(width * config.mlp_ratio)
    pp = patch * patch
    if config.fusion == "separate":  # two embedders, L tokens each
        embed = [Gemm("x_embed", latent_tokens, pp * config.latent_channels, width, input_grad=False),
                 Gemm("z_embed", latent_tokens, pp * config.semantic_channels, width, input_grad=False)]
    else:  # merged: one conv over [x, z] (B, C_x + C_z, H, W)
        embed = [Gemm("embed", latent_tokens, pp * (config.latent_channels + config.semantic_channels), width,
                      input_grad=False)]
    gemms = embed + [
        Gemm("t_mlp.0", batch, FREQUENCY_EMBEDDING, width, input_grad=False),
        Gemm("t_mlp.2", batch, width, width),
        Gemm("adaLN", batch, width, 6 * width, config.depth),
        Gemm("qkv", tokens, width, 3 * width, config.depth),
        Gemm("attn.proj", tokens, width, width, config.depth),
        Gemm("mlp.fc1", tokens, width, hidden, config.depth),
        Gemm("mlp.fc2", tokens, hidden, width, config.depth),
        Gemm("final.adaLN", batch, width, 2 * width),
        # both heads read L tokens (merged: the same L tokens; separate: their own half)
        Gemm("head_x", latent_tokens, width, pp * k * config.latent_channels),
    ]
    if config.semantic_channels:
        gemms.append(Gemm("head_z", latent_tokens, width, pp * k * config.semantic_channels))
    if config.projector_dim:
        h = config.projector_hidden
        gemms += [Gemm("projector.0", latent_tokens, width, h), Gemm("projector.2", latent_tokens, h, h),
                  Gemm("projector.4", latent_tokens, h, config.projector_dim)]
    return gemms


def attention_shape(config: BackboneConfig, batch: int) -> tuple[int, int, int, int]:
    """(B, heads, N, head_dim) of every block's attention."""
    tokens = config.num_patches * (2 if config.fusion == "separate" else 1)
    return batch, config.num_heads, tokens, config.hidden_size // config.num_heads


@dataclass(frozen=True)
class FloorOp:
    """One kernel of the floor: `run()` once, `count` times per training step."""

    name: str
    """The layer (forward_gemms' names, or `attention`)."""
    kind: str
    """gemm or attention."""
    run: Callable[[], object]
    count: int


def floor_ops(config: BackboneConfig, batch: int, device: torch.device, dtype: torch.dtype) -> list[FloorOp]:
    """The kernels of one training step's arithmetic at its shapes in `dtype` (module docstring):
    per linear the forward Y = X W^T, dX = dY W and dW = dY^T X in the layouts autograd uses (no dX
    where the input is a leaf); per block one attention forward + backward in the form the network
    runs at this device and dtype (models.backbone.attend: SDPA, or the math path for bf16 on a CPU)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    ops, operands = [], {}
    for gemm in forward_gemms(config, batch):
        key = (gemm.m, gemm.k, gemm.n)
        if key not in operands:  # layers of one shape share their operands
            operands[key] = (rand(gemm.m, gemm.k), rand(gemm.n, gemm.k), rand(gemm.m, gemm.n))
        x, w, dy = operands[key]
        ops += [FloorOp(gemm.name, "gemm", lambda x=x, w=w: x @ w.t(), gemm.count),
                FloorOp(gemm.name, "gemm", lambda x=x, dy=dy: dy.t() @ x, gemm.count)]
        if gemm.input_grad:
            ops.append(FloorOp(gemm.name, "gemm", lambda w=w, dy=dy: dy @ w, gemm.count))
    q, k, v = (rand(*attention_shape(config, batch)).requires_grad_() for _ in range(3))
    grad = rand(*attention_shape(config, batch))

    def attention() -> None:  # autograd.grad: no accumulation into .grad (an extra add per call)
        torch.autograd.grad(attend(q, k, v), (q, k, v), grad)

    return ops + [FloorOp("attention", "attention", attention, config.depth)]


def run_floor(ops: list[FloorOp]) -> None:
    """One training step's worth of the floor's kernels, each as often as the step runs it."""
    for op in ops:
        for _ in range(op.count):
            op.run()


def arithmetic_floor(config: BackboneConfig, batch: int, device: torch.device, dtype: torch.dtype,
                     repeats: int = 3, min_seconds: float = 0.05) -> dict:
    """Seconds of one training step's arithmetic alone, each kernel timed on its own (floor_ops):
    the total, its GEMM and attention parts, and each layer's share. `bench perf` times the whole
    floor as one workload in the rounds of the steps instead (paired); this split says where it goes."""
    seconds, by_op = {"gemm": 0.0, "attention": 0.0}, {}
    for op in floor_ops(config, batch, device, dtype):
        spent = op.count * _seconds_per_call(op.run, device, repeats, min_seconds)
        seconds[op.kind] += spent
        by_op[op.name] = round(by_op.get(op.name, 0.0) + spent, 6)
    return {"dtype": str(dtype).removeprefix("torch."), "seconds": seconds["gemm"] + seconds["attention"],
            "gemm_seconds": seconds["gemm"], "attention_seconds": seconds["attention"], "by_op": by_op}


# ---------------------------------------------------------------------------------------------
# Which attention is fastest here: the measurement behind models.backbone.attention_form

# The rule's form may be this much slower than the fastest measured form before the check fails:
# paired rounds on a shared 2-vCPU machine still scatter by a few percent.
ATTENTION_RULE_SLACK = 1.10


def attention_forms(config: BackboneConfig, batch: int, device: torch.device, dtype: torch.dtype,
                    rounds: int = 5, calls: int = 3) -> dict:
    """Forward + backward of one block's attention at the step's shape in each form, timed
    round-robin (`rounds` rounds of `calls` calls each): torch's SDPA in `dtype`, SDPA on fp32
    copies (its output cast back) and the math path in `dtype`. Returns the milliseconds per
    form (median over rounds), the fastest, the form `attention_form` picks and its paired time
    ratio to the fastest."""
    g = torch.Generator().manual_seed(0)
    shape = attention_shape(config, batch)
    q, k, v = (torch.randn(*shape, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(*shape, generator=g).to(device, dtype)

    def fp32_sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)

    forms = {"sdpa": F.scaled_dot_product_attention, "math": math_attention}
    if dtype != torch.float32:
        forms["sdpa-fp32"] = fp32_sdpa
    runs = {name: (lambda f=f: torch.autograd.grad(f(q, k, v), (q, k, v), grad)) for name, f in forms.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # allocation, kernel selection
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(_timed_calls(run, device, calls))
    ms = {name: round(1000 * statistics.median(t), 3) for name, t in times.items()}
    fastest = min(ms, key=ms.get)
    rule = attention_form(device.type, dtype)
    ratio = statistics.median(a / b for a, b in zip(times[rule], times[fastest]))
    return {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "ms": ms, "fastest": fastest,
            "rule": rule, "rule_over_fastest": round(ratio, 3), "slack": ATTENTION_RULE_SLACK}


def _timed_calls(run: Callable[[], object], device: torch.device, calls: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls
