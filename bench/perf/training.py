"""Training-step workloads of `bench perf`: the default step (bench/train/step.py, the very function
`bench train` calls) and the official-style reference mode.

One step = sample the VAE posterior, (reference only: run the semantic encoder on the images, PCA,
resize), forward through the objective, backward, optimiser step, EMA update.

| | default (`bench train`'s fast path) | reference (the official ReDi `train_redi.py`) |
|---|---|---|
| precision | bf16 autocast where native (fp32 master weights) | fp32 |
| activation checkpointing | off (`--checkpointing` turns it on) | every block |
| semantic features | precomputed by `bench prepare` | encoder run online on the images every step |
| optimiser | AdamW, `fused=True` where available | AdamW with torch's default implementation |
| EMA | one `_foreach_lerp_` over all parameters | a Python loop over parameters (`update_ema`) |
| NaN guard | gradient norm + one host sync per step, as `bench train` | none |
| torch.compile | as `bench train` resolves `train.compile` (`--compile` / `--no-compile`) | no |

The online encoder is the scale's own: EfficientNet-Lite0 with its real ImageNet weights for the
embedded scale; DINOv2-B/14-reg for the paper scale, from local weights when they exist, otherwise
the same timm architecture with random weights (same cost; labelled `stand-in` in the rows).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from torch import nn

from bench.config import ExperimentConfig
from bench.perf.roofline import arithmetic_floor, floor_ops, run_floor, train_flops_per_image
from bench.perf.setup import BatchPool, Geometry, autocast
from bench.perf.timing import Workload
from bench.prepare import encoders
from bench.prepare.encoders import sample_latents
from bench.train.build import backbone_settings, build_model, build_transport
from bench.train.step import CompiledNetwork, build_optimizer, make_train_step, repa_tokens, update_ema
from models.repa import align_to_grid

# Relative |loss_default - loss_float64| / loss_float64 accepted for the default (bf16 autocast)
# path. bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2%), but the loss is a mean of squared
# errors over every element, so per-element rounding mostly averages out: measured 8e-6 to 1.6e-3
# from custom:2,64,2,1 to S/2 (every spec, two seeds), growing with width and depth. 1% leaves room
# for XL while still catching a real precision bug (fp16 overflow, a loss reduced in bf16, a missing
# cast), which moves the loss by far more. fp32 and the checkpointed reference must agree with
# float64 to 1e-5: measured <= 1e-7 (fp32 roundoff over a few thousand terms).
DEFAULT_LOSS_RTOL = 1e-2
FP32_LOSS_RTOL = 1e-5


@dataclass(frozen=True)
class StepOptions:
    """How the training step runs (see the module docstring's table)."""

    mode: str = "default"
    """default or reference."""
    precision: str = "fp32"
    """Resolved precision: bf16 (autocast) or fp32."""
    checkpointing: bool = False
    fused_optimizer: bool = True
    foreach_ema: bool = True
    compile: bool = False
    online_encoder: bool = False

    @classmethod
    def reference(cls) -> "StepOptions":
        return cls(mode="reference", precision="fp32", checkpointing=True, fused_optimizer=False,
                   foreach_ema=False, compile=False, online_encoder=True)


def reference_optimizer(model: nn.Module, cfg: ExperimentConfig, fused: bool) -> tuple[torch.optim.Optimizer, str]:
    """The reference mode's AdamW: torch's default (non-fused) implementation as the official code
    builds it, or (`fused`, one rung of --ladder) `bench train`'s own fused one."""
    if fused:
        optimizer = build_optimizer(model, cfg)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                      weight_decay=cfg.optim.weight_decay)
    return optimizer, "adamw-fused" if optimizer.defaults.get("fused") else "adamw-default"


@torch.no_grad()
def update_ema_official(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """The official code's update_ema: a Python loop of mul_/add_ (the reference mode's EMA)."""
    with torch.profiler.record_function("ema"):
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def build_online_encoder(cfg: ExperimentConfig, geometry: Geometry, device: torch.device):
    """The semantic encoder the official code runs every step, and a label for the rows."""

    if geometry.encoder_kind == "efficientnet_lite0":
        encoder = encoders.build_efficientnet_lite0(geometry.image_size, weights=cfg.encoder.weights)
        label = "efficientnet_lite0 (real weights)"
    else:
        try:
            encoder = encoders.build_dinov2(cfg.encoder.variant, geometry.image_size, cfg.encoder.weights)
            label = f"dinov2_{cfg.encoder.variant} (real weights)"
        except encoders.EncoderError:
            import timm

            model = timm.create_model(encoders.DINOV2_TIMM_NAMES[cfg.encoder.variant], pretrained=False,
                                      img_size=224 * (geometry.image_size // 256))
            encoder = encoders.DinoV2Encoder(model, cfg.encoder.variant, geometry.image_size)
            label = f"dinov2_{cfg.encoder.variant} stand-in (random weights, same architecture and cost)"
    return encoder.to(device), label


def build_train_workload(name: str, cfg: ExperimentConfig, geometry: Geometry, pool: BatchPool,
                         device: torch.device, options: StepOptions, seed: int = 0,
                         encoder: Optional[tuple[nn.Module, str]] = None) -> Workload:
    """A Workload whose run() is one full training step of `cfg` (see the module docstring)."""

    cfg = copy.deepcopy(cfg)
    cfg.model.grad_checkpointing = options.checkpointing
    torch.manual_seed(seed)  # the same initial weights for every workload of a spec
    model = build_model(cfg, geometry.manifest()).to(device).train()
    transport = build_transport(cfg, geometry.manifest())
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    forward = CompiledNetwork(model, fallback=False) if options.compile else model
    generator = torch.Generator(device=device).manual_seed(seed)
    if options.online_encoder and encoder is None:
        encoder = build_online_encoder(cfg, geometry, device)
    if options.online_encoder and pool.pca is None:
        raise ValueError("the reference mode's online encoder needs a PCA (pool.pca)")
    if options.mode == "default":
        # bench train's own step (bench/train/step.py): precision rule, fused AdamW, NaN guard with
        # one host sync, clipping, foreach EMA
        cfg.train.precision = options.precision
        train_step = make_train_step(model, ema, transport, cfg, device)
        optimizer_name = "adamw-fused" if train_step.optimizer.defaults.get("fused") else "adamw-default"
    else:
        optimizer, optimizer_name = reference_optimizer(model, cfg, options.fused_optimizer)
        train_step = _reference_step(model, ema, optimizer, transport, cfg, options)
    online = (encoder[0], pool.pca, geometry.latent_grid) if options.online_encoder else None
    inputs = partial(_semantic_inputs, channels=cfg.semantic_channels, use_repa=cfg.objective.lambda_repa > 0,
                     token_grid=model.config.grid_size, online=online)
    batch_size = pool.batches[0]["moments"].shape[0]
    fields = _train_fields(cfg, model, options, optimizer_name, encoder, batch_size)
    run = _training_step(forward, train_step, pool, inputs, geometry.scaling_factor, generator, fields)
    return Workload(kind="train", name=name, run=run, images_per_call=batch_size, fields=fields, device=device)


def _semantic_inputs(batch: dict, channels: int, use_repa: bool, token_grid: int,
                     online: Optional[tuple[nn.Module, object, int]] = None):
    """z (B, r, h, w) and the REPA target (B, L, D) of a batch, None where the spec has none: as
    prepare stored them, or (`online` = encoder, PCA, latent grid) from the encoder run on the images."""
    z = target = None
    if online is None:
        if channels:
            z = batch["semantic"][:, :channels]  # (B, r, h, w), precomputed by prepare
        if use_repa:
            target = repa_tokens(batch["features"], token_grid)
        return z, target
    encoder, pca, grid = online
    with torch.no_grad():  # official: DINOv2 -> standardise -> PCA -> bilinear to the latent grid
        feats = encoder.encode(batch["images"])  # (B, D, gh, gw)
        if channels:
            z = pca.project_map(feats, channels)  # (B, r, gh, gw)
            z = align_to_grid(z, (grid, grid))  # (B, r, h, w)
        if use_repa:
            target = repa_tokens(feats, token_grid)  # (B, L, D)
    return z, target


def _training_step(forward, train_step, pool: BatchPool, inputs, scaling_factor: float,
                   generator: torch.Generator, fields: dict):
    """run() of a training workload: one step on the pool's next batch; the first call also counts the
    bytes autograd saves (fields["activation_memory_mb"])."""

    def step() -> None:
        batch = pool.next()
        z, target = inputs(batch)
        x = sample_latents(batch["moments"], scaling_factor, generator)  # (B, C_x, h, w)
        probe = _SavedBytes() if "activation_memory_mb" not in fields else contextlib.nullcontext()
        with probe:
            train_step(forward, x, z, batch["labels"], generator, target)
        if isinstance(probe, _SavedBytes):
            fields["activation_memory_mb"] = round(probe.total / 2**20, 2)
    return step


def _train_fields(cfg: ExperimentConfig, model: nn.Module, options: StepOptions, optimizer_name: str,
                  encoder: Optional[tuple[nn.Module, str]], batch_size: int) -> dict:
    """What a training row says about its step, its model and the memory its state takes."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return {
        "mode": options.mode, "precision": options.precision,
        "dtype": "bf16-autocast (fp32 weights)" if options.precision == "bf16" else "fp32",
        "activation_checkpointing": options.checkpointing, "optimizer": optimizer_name,
        "ema": "foreach_lerp" if options.foreach_ema else "python-loop",
        "compile": options.compile, "nan_guard": options.mode == "default",
        "step_function": "bench.train.step.TrainStep" if options.mode == "default" else "reference",
        "semantic_features": "online" if options.online_encoder else "precomputed",
        "online_encoder": encoder[1] if options.online_encoder else None,
        "fusion": cfg.model.fusion, "semantic_channels": cfg.semantic_channels,
        "lambda_repa": cfg.objective.lambda_repa,
        "tokens": model.num_tokens, "parameters": sum(p.numel() for p in params),
        "batch": batch_size, "train_flops_per_image": train_flops_per_image(model.config),
        # exact bytes of what training keeps per model: weights, gradients, AdamW moments, EMA
        "state_memory_mb": round((2 * _nbytes(params) + 3 * _nbytes(trainable)) / 2**20, 2),
    }


def build_floor_workload(name: str, cfg: ExperimentConfig, geometry: Geometry, batch: int, device: torch.device,
                         precision: str, quick: bool = False) -> Workload:
    """The arithmetic floor of `cfg`'s training step in `precision` (bench/perf/roofline.py) as a
    workload: every matmul and attention of one step back to back, timed in the same rounds as the
    steps. Its fields carry the GEMM / attention split, each kernel timed alone once."""
    config = backbone_settings(cfg, geometry.manifest())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ops = floor_ops(config, batch, device, dtype)
    split = arithmetic_floor(config, batch, device, dtype, repeats=1 if quick else 3,
                             min_seconds=0.005 if quick else 0.05)
    fields = {"mode": "floor", "precision": precision, "dtype": str(dtype).removeprefix("torch."),
              "activation_checkpointing": False, "optimizer": None, "ema": None, "compile": False,
              "semantic_features": None, "fusion": cfg.model.fusion, "semantic_channels": cfg.semantic_channels,
              "tokens": config.num_patches * (2 if config.fusion == "separate" else 1), "batch": batch,
              "train_flops_per_image": train_flops_per_image(config),
              "floor_gemm_ms": round(1000 * split["gemm_seconds"], 2),
              "floor_attention_ms": round(1000 * split["attention_seconds"], 2),
              "floor_by_op_ms": {k: round(1000 * v, 2) for k, v in split["by_op"].items()}}
    return Workload(kind="train", name=name, run=lambda: run_floor(ops), images_per_call=batch, fields=fields,
                    device=device)


def _reference_step(model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, transport,
                    cfg: ExperimentConfig, options: StepOptions):
    """The official loop's step: fp32, no NaN guard, zero_grad / backward / step, then the EMA."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema_update = update_ema if options.foreach_ema else update_ema_official

    def run(forward, x, z, y, generator, align_target=None) -> None:
        with autocast(x.device, options.precision):
            loss = transport.training_losses(forward, x, z, y, generator, align_target)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.max_grad_norm)
        optimizer.step()
        ema_update(ema, model, cfg.train.ema_decay)
    return run


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd saves for backward (each storage once): the activation memory of
    a step, which activation checkpointing trades for recomputation. With checkpointing, only what
    the checkpoint keeps (block inputs) reaches these outer hooks."""

    def __init__(self) -> None:
        self.total, self._seen = 0, set()

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in self._seen and storage.nbytes():
                self._seen.add(key)
                self.total += storage.nbytes()
            return tensor

        super().__init__(pack, lambda tensor: tensor)


# ---------------------------------------------------------------------------------------------
# Loss agreement: default precision and the reference path against float64


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """Make every weight non-trivial: adaLN-Zero and the zero-initialised heads would otherwise
    give a zero prediction, and the loss would agree in any precision."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
    return model


class _Float64(nn.Module):
    """Runs a float64 copy of the network on float32 inputs, so all variants see the same draws."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, t, y, z=None):
        return self.model(x.double(), t.double(), y, None if z is None else z.double())


def loss_agreement(cfg: ExperimentConfig, geometry: Geometry, pool: BatchPool, device: torch.device,
                   precision: str, seed: int = 0) -> dict:
    """Loss of one batch, same weights and the same random draws, in float64, fp32, the default
    precision and the reference mode (fp32 + checkpointing); relative errors against float64."""

    torch.manual_seed(seed)
    model = _perturbed(build_model(cfg, geometry.manifest()), seed).to(device).train()
    transport = build_transport(cfg, geometry.manifest())
    batch = pool.batches[0]
    g = torch.Generator(device=device).manual_seed(seed)
    x = sample_latents(batch["moments"], geometry.scaling_factor, g)
    semantic = cfg.semantic_channels
    z = batch["semantic"][:, :semantic] if semantic else None
    target = (repa_tokens(batch["features"], model.config.grid_size)
              if cfg.objective.lambda_repa > 0 else None)

    def loss_of(net, dtype_precision: str) -> float:
        gen = torch.Generator(device=device).manual_seed(seed + 1)  # identical t, noise, drops
        with torch.no_grad(), autocast(device, dtype_precision):
            return float(transport.training_losses(net, x, z, batch["labels"], gen, target)["loss"])

    reference_cfg = dataclasses.replace(model.config, grad_checkpointing=True)
    checkpointed = type(model)(reference_cfg).to(device).train()
    checkpointed.load_state_dict(model.state_dict())
    exact = loss_of(_Float64(copy.deepcopy(model).double()), "fp32")
    values = {"float64": exact, "fp32": loss_of(model, "fp32"), "default": loss_of(model, precision),
              "reference": loss_of(checkpointed, "fp32")}
    rel = {k: abs(v - exact) / abs(exact) for k, v in values.items() if k != "float64"}
    return {"spec": cfg.spec, "precision": precision, "loss": values, "rel_err": rel,
            "default_rtol": DEFAULT_LOSS_RTOL, "fp32_rtol": FP32_LOSS_RTOL,
            "ok": rel["default"] <= DEFAULT_LOSS_RTOL and rel["fp32"] <= FP32_LOSS_RTOL
            and rel["reference"] <= FP32_LOSS_RTOL}
