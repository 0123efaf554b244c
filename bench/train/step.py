"""The training step, written once: `bench train`'s loop and `bench perf`'s default rows call it.

One step = the objective under the precision rule, backward, the NaN guard, gradient clipping,
fused AdamW and the EMA update. What goes in (x, z, y, the REPA tokens) is the caller's: the loop
reads it from the prepared shards, `bench perf` from a pool of synthetic or prepared batches.

Precision: fp32 master weights and losses; `auto` = bf16 autocast on CUDA with bf16 and on CPUs
with AMX-BF16 (with AVX512-BF16 alone it was slower; bench/precision.py), else fp32; TF32 matmuls
on CUDA as the official code. Inside bf16 autocast on a CPU the network's attention takes the math path
(models.backbone.attention_form: torch's fused CPU attention is slower in bf16 than in fp32). The
embedded default uses `auto` too (ablations/scale/embedded.yaml; its measurements in docs/performance.md).
Optimiser and EMA: fused AdamW and one foreach lerp for the EMA.

torch.compile: `train.compile` true or false, or auto (None): compile on a CPU for runs of at least
AUTO_COMPILE_MIN_STEPS steps (`resolve_compile`), falling back to the eager network with one warning
when the first call cannot compile (`CompiledNetwork`). Both scales default to auto, so a GPU keeps
the official code's eager step.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from bench.config import ExperimentConfig
from bench.precision import resolve_precision
from bench.train import distributed as dist_utils
from models.repa import align_to_grid

AUTO_COMPILE_MIN_STEPS = 500
"""`train.compile=auto` compiles runs of at least this many steps. At the embedded default (width
128, bf16, the 2-vCPU AMX Xeon) compiling takes 17 s on a cold inductor cache and 3 s on a warm
one and saves 65 ms a step (241 -> 176 ms): the cold compile is paid back after about 260 steps
(docs/performance.md, "torch.compile")."""


def resolve_compile(setting: Optional[bool], device: torch.device, max_steps: int) -> bool:
    """Whether the step runs the network under torch.compile. `auto` (None) compiles on a CPU,
    where it was measured to win in fp32 and bf16, for runs long enough to pay the compile back;
    on a GPU it stays eager (not measured here: set train.compile=true to compile)."""
    if setting is not None:
        return bool(setting)
    return device.type == "cpu" and max_steps >= AUTO_COMPILE_MIN_STEPS


class CompiledNetwork:
    """`torch.compile(net)` as a callable. With `fallback` (train.compile=auto), a first call that
    fails to compile (no C++ compiler, an operator inductor cannot lower) prints one warning and
    the network runs eagerly from then on: auto never stops a run that eager mode would train.
    Without it (train.compile=true) the error propagates, with the setting to change named."""

    def __init__(self, net: Callable, fallback: bool) -> None:
        self.eager, self.compiled, self.fallback = net, torch.compile(net), fallback
        self.called = False
        if not torch.cuda.is_available():
            # Without a GPU, inductor's C++ build logs "No CUDA runtime is found" on every compile
            # wherever a CUDA toolkit is installed: noise in every run's log, not a problem.
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

    @property
    def active(self) -> bool:
        """False once the network has fallen back to eager."""
        return self.compiled is not None

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        if self.called:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as err:
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            if not self.fallback:
                raise RuntimeError(f"torch.compile could not compile the network ({reason[:300]}); "
                                   "set train.compile=false (or auto; bench perf: --no-compile) to run "
                                   "it eagerly") from err
            print(f"bench train: torch.compile could not compile the network ({reason[:300]}); "
                  "training eagerly (train.compile=auto)", file=sys.stderr, flush=True)
            self.compiled = None
            return self.eager(*args, **kwargs)
        self.called = True
        return out


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN/inf; training stopped before the bad update."""

    def __init__(self, message: str, loss: float = math.nan, grad_norm: float = math.nan) -> None:
        super().__init__(message)
        self.loss, self.grad_norm = loss, grad_norm


def build_optimizer(model: nn.Module, cfg: ExperimentConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (Table 8), with torch's fused kernel wherever this build
    has one for the parameters' device (CUDA, and CPU since torch 2.4): the same update, one kernel."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                  weight_decay=cfg.optim.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel for this device/dtype in this build
        return torch.optim.AdamW(params, **kwargs)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for every parameter, as one foreach kernel:
    lerp(e, p, 1 - decay) = e + (1 - decay)(p - e), equal to the official loop up to rounding.
    The `ema` region names it in a torch profile (bench perf --profile)."""
    with torch.profiler.record_function("ema"):
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)


def repa_tokens(features: torch.Tensor, token_grid: int) -> torch.Tensor:
    """Encoder feature maps (B, D, gh, gw) -> REPA targets (B, L, D) in float32 on the model's token
    grid (bilinear resize only when the grids differ; row-major tokens as the backbone)."""

    maps = align_to_grid(features.float(), (token_grid, token_grid))
    return maps.flatten(2).transpose(1, 2)


@dataclass
class TrainStep:
    """What one optimisation step updates, and how. Build it with `make_train_step`."""

    model: nn.Module
    """The trained network (fp32 master weights); `forward` may wrap it (DDP, torch.compile)."""
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    transport: object
    """The objective: `training_losses(forward, x, z, y, generator, align_target=...)`."""
    autocast_dtype: Optional[torch.dtype]
    max_grad_norm: float
    ema_decay: float
    world: int = 1
    """Ranks: the loss is scaled by W before DDP averages the gradients (docs/runs.md, "Training:
    resume, ranks and paired seeds")."""

    def __post_init__(self) -> None:
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def __call__(self, forward: Callable, x: torch.Tensor, z: Optional[torch.Tensor], y: torch.Tensor,
                 generator: torch.Generator, align_target: Optional[torch.Tensor] = None
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One step; returns (losses, total gradient norm before clipping).

        Raises NonFiniteLossError before the update when the loss or the gradient is NaN/inf on
        any rank (one host sync per step: the guard needs the verdict before optimizer.step()).
        """
        dtype = self.autocast_dtype
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = self.transport.training_losses(forward, x, z, y, generator, align_target=align_target)
        (losses["loss"] * self.world).backward()  # x W: DDP averages, the loss is already the global mean
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        bad = (~torch.isfinite(losses["loss"].detach()) | ~torch.isfinite(grad_norm)).float()
        if dist_utils.all_reduce_mean(bad).item() > 0:
            self.optimizer.zero_grad(set_to_none=True)
            loss, norm = losses["loss"].item(), grad_norm.item()
            raise NonFiniteLossError(f"non-finite loss or gradient (loss={loss:.4g}, grad_norm={norm:.4g}); "
                                     "stopped before the update", loss, norm)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.max_grad_norm, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.model, self.ema_decay)
        return losses, grad_norm


def make_train_step(model: nn.Module, ema: nn.Module, transport: object, cfg: ExperimentConfig,
                    device: torch.device, world: int = 1,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> TrainStep:
    """The step `bench train` runs for `cfg` on `device` (precision rule, fused AdamW, clipping, EMA)."""
    return TrainStep(model=model, ema=ema, optimizer=optimizer or build_optimizer(model, cfg),
                     transport=transport, autocast_dtype=resolve_precision(cfg.train.precision, device),
                     max_grad_norm=cfg.optim.max_grad_norm, ema_decay=cfg.train.ema_decay, world=world)
