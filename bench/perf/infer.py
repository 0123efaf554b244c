"""Inference workloads of `bench perf`: guided sampling steps, prepare encoders, evaluation features.

- sample: one sampling step = one network evaluation through `guided_prediction` (one batched call
  of 1, 2 or 3 branches) plus the Euler update, on the EMA network in eval mode, without the REPA
  projector (`return_aligned=False`: sampling never needs it), in `bench sample`'s precision (eval.precision as
  bench.evaluate.sampling.sampling_precision resolves it; --precision applies to training only). images/s counts the B
  images being sampled, i.e. per-image network evaluations per second (divide by the step count for
  finished images/s, as Table 6 reports), so `guided / unguided` time per step is the cost of guidance.
- table6: finished images/s as the paper's Appendix B measures Table 6's throughput: a batch
  (paper: 64) drawn from noise with the run's sampler in `steps` steps (paper: 250), unguided, then
  decoded by the scale's VAE to uint8 images, exactly as `bench sample` draws and decodes
  (bench.evaluate.sampling.draw_batch, decode_to_uint8). One call = one finished batch.
- prepare: images/s of each frozen encoder `bench prepare` runs (VAE moments in fp32, semantic
  features in the precision prepare resolves from encoder.precision: bf16 autocast or fp32).
- eval: images/s of the evaluation feature network (the embedded classifier, or Inception-v3).
Weights are random unless a local file is configured: cost depends on shapes, not values.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bench.config import ExperimentConfig
from bench.evaluate.features import (
    DINOV2_INPUT_SIZE,
    DINOV2_TIMM_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureNetworkError,
    ModuleFeatures,
    build_feature_network,
)
from bench.evaluate.sampling import decode_to_uint8, draw_batch, in_precision, sampling_precision
from bench.perf.setup import Geometry
from bench.perf.timing import Workload
from bench.precision import resolve_precision
from bench.prepare import encoders
from bench.prepare.embedded import EmbeddedVAESettings, EvalClassifier
from bench.train.build import build_model, build_transport
from models.flow_sampling import guided_velocity
from models.guidance import Guidance

# Guidance scales used for timing (the cost does not depend on their values, only on which
# branches exist): the paper's best CFG for XL (2.4, latent channels) and RG 1.5 (paper, B).
GUIDANCE_MODES = {"none": (1.0, 1.0), "cfg": (2.4, 1.0), "rg": (1.0, 1.5), "cfg+rg": (2.4, 1.5)}


def guidance_modes(cfg: ExperimentConfig) -> list[str]:
    """The guidance modes this spec supports: CFG needs labels, RG needs semantic channels."""
    modes = ["none"]
    if cfg.model.conditional and cfg.model.class_dropout_prob > 0:
        modes.append("cfg")
    if cfg.semantic_channels:
        modes.append("rg")
        if "cfg" in modes:
            modes.append("cfg+rg")
    return modes


def build_sample_workloads(spec_label: str, cfg: ExperimentConfig, geometry: Geometry, batch: int,
                           device: torch.device, precision: str, seed: int = 0) -> list[Workload]:
    """One Workload per guidance mode of `cfg`, all on the same network."""
    torch.manual_seed(seed)
    model = build_model(cfg, geometry.manifest()).to(device).eval().requires_grad_(False)
    network = functools.partial(model, return_aligned=False)
    num_classes = cfg.num_model_classes
    g = torch.Generator().manual_seed(seed)
    h, cx, cz = geometry.latent_grid, geometry.latent_channels, cfg.semantic_channels
    x = torch.randn(batch, cx, h, h, generator=g).to(device)
    z = torch.randn(batch, cz, h, h, generator=g).to(device) if cz else None
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    workloads = []
    for mode in guidance_modes(cfg):
        cfg_scale, rg_scale = GUIDANCE_MODES[mode]
        guidance = Guidance(latent_channels=cx, semantic_channels=cz, cfg_scale=cfg_scale,
                            rg_scale=rg_scale, null_class=num_classes)
        workloads.append(Workload(
            kind="sample", name=f"{spec_label} {mode}", images_per_call=batch, device=device,
            run=_sampling_step(network, x, z, y, guidance, device, precision),
            fields={"spec": cfg.spec if spec_label == cfg.spec else spec_label, "mode": "default",
                    "guidance": mode, "branches": 1 + (mode in ("cfg", "cfg+rg")) + (mode in ("rg", "cfg+rg")),
                    "cfg_scale": cfg_scale, "rg_scale": rg_scale, "precision": precision,
                    "dtype": "bf16-autocast" if precision == "bf16" else "fp32",
                    "fusion": cfg.model.fusion, "tokens": model.num_tokens, "batch": batch}))
    return workloads


def _sampling_step(network, x: torch.Tensor, z: Optional[torch.Tensor], y: torch.Tensor,
                   guidance: Guidance, device: torch.device, precision: str):
    """One Euler step from t = 0.5 with a fixed dt (the state is not carried over: every call costs
    the same, and the numbers stay finite however many calls are timed)."""

    predict = guided_velocity(in_precision(network, precision, device), y, guidance)  # as draw_batch
    t = torch.full((x.shape[0],), 0.5, device=device)
    dt = 1.0 / 250  # 250 steps, the paper's SDE/ODE budget

    @torch.no_grad()
    def step() -> None:
        vx, vz = predict(x, z, t)
        _ = x + dt * vx
        if z is not None:
            _ = z + dt * vz
    return step


# ---------------------------------------------------------------------------------------------
# table6: finished images (sampling + VAE decode)

TABLE6_SPECS = ("latent_only", "redi", "redi_separate")  # Table 6: DiT-B/2 w/o ReDi, MR, SP


def build_table6_workload(spec_label: str, cfg: ExperimentConfig, geometry: Geometry, batch: int, steps: int,
                          device: torch.device, prepared_dir: Optional[str], seed: int = 0) -> Workload:
    """One Workload whose call draws `batch` images in `steps` sampling steps and decodes them."""
    import copy


    cfg = copy.deepcopy(cfg)
    cfg.eval.num_sampling_steps = steps
    torch.manual_seed(seed)
    manifest = geometry.manifest()
    model = build_model(cfg, manifest).to(device).eval().requires_grad_(False)
    network = functools.partial(model, return_aligned=False)
    transport = build_transport(cfg, manifest)
    vae, weights = build_vae(cfg, geometry, prepared_dir)
    vae = vae.to(device).eval().requires_grad_(False)
    cx, cz = geometry.latent_channels, cfg.semantic_channels
    guidance = Guidance(latent_channels=cx, semantic_channels=cz, null_class=cfg.num_model_classes)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, cfg.num_model_classes, (batch,), generator=g)
    generator = torch.Generator(device=device)

    @torch.no_grad()
    def finished_batch() -> None:
        generator.manual_seed(seed)  # every call draws the same images: equal cost, finite numbers
        latents, _ = draw_batch(network, transport, guidance, cfg, manifest, y, generator, device)
        decode_to_uint8(vae, latents, geometry.image_size)

    return Workload(kind="table6", name=f"{spec_label} table6", run=finished_batch, images_per_call=batch,
                    device=device,
                    fields={"spec": cfg.spec if spec_label == cfg.spec else spec_label, "mode": "default",
                            "sampler": cfg.eval.sampler, "sampling_steps": steps, "guidance": "none",
                            "vae": f"{cfg.vae.kind} {weights}", "precision": sampling_precision(cfg, device),
                            "dtype": sampling_precision(cfg, device), "fusion": cfg.model.fusion,
                            "tokens": model.num_tokens,
                            "batch": batch, "paper_setting": steps == 250 and batch == 64,
                            "image_size": geometry.image_size})


# ---------------------------------------------------------------------------------------------
# prepare: the frozen encoders


def _embedded_vae_stand_in(image_size: int) -> nn.Module:
    """The embedded AutoencoderKL's architecture (bench.prepare.embedded.EmbeddedVAESettings), random weights."""
    from diffusers import AutoencoderKL


    s = EmbeddedVAESettings()
    levels = len(s.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=s.latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         block_out_channels=tuple(s.block_out_channels), layers_per_block=s.layers_per_block,
                         norm_num_groups=min(32, min(s.block_out_channels)), sample_size=image_size)


def _sd_vae_stand_in(image_size: int) -> nn.Module:
    """SD-VAE's (sd-vae-ft-ema) architecture with random weights: 4 levels 128-256-512-512, f=8."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=image_size)


def build_vae(cfg: ExperimentConfig, geometry: Geometry, prepared_dir: Optional[str]):
    """The scale's VAE: the trained one when it exists locally, else its architecture (stand-in)."""

    try:
        return encoders.load_vae(cfg.vae, embedded_dir=f"{prepared_dir}/vae" if prepared_dir else None), "trained"
    except (encoders.EncoderError, OSError, ValueError):
        pass
    vae = (_embedded_vae_stand_in if cfg.vae.kind == "embedded" else _sd_vae_stand_in)(geometry.image_size)
    return encoders.LatentVAE(vae, cfg.vae.kind, "stand-in", 1.0), "stand-in (random weights)"


def build_prepare_workloads(cfg: ExperimentConfig, geometry: Geometry, batch: int, device: torch.device,
                            online_encoder: tuple[nn.Module, str], prepared_dir: Optional[str],
                            seed: int = 0) -> list[Workload]:
    """VAE moments (fp32) and semantic features (encoder.precision as `bench prepare` resolves it on
    `device`), each on a batch of random uint8 images."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, geometry.image_size, geometry.image_size), generator=g,
                           dtype=torch.uint8).to(device)
    vae, vae_weights = build_vae(cfg, geometry, prepared_dir)
    vae = vae.to(device)
    encoder, encoder_label = online_encoder
    dtype = resolve_precision(cfg.encoder.precision, device, key="encoder.precision")

    def encode():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return encoder.encode(images)

    common = {"spec": "-", "mode": "prepare", "batch": batch, "image_size": geometry.image_size}
    fp32 = {"precision": "fp32", "dtype": "fp32"}
    return [
        Workload(kind="prepare", name=f"vae ({cfg.vae.kind})", images_per_call=batch, device=device,
                 run=lambda: vae.encode_moments(images),
                 fields=common | fp32 | {"encoder": f"vae_{cfg.vae.kind}", "weights": vae_weights}),
        Workload(kind="prepare", name=geometry.encoder_kind, images_per_call=batch, device=device, run=encode,
                 fields=common | {"precision": "bf16" if dtype else "fp32",
                                  "dtype": "bf16-autocast" if dtype else "fp32",
                                  "encoder": geometry.encoder_kind, "weights": encoder_label}),
    ]


# ---------------------------------------------------------------------------------------------
# eval: feature extraction


def _eval_stand_in(kind: str, num_classes: int) -> tuple[nn.Module, int]:
    """A feature network of the same architecture and input size as `kind`, random weights."""

    if kind == "classifier":
        return ModuleFeatures(EvalClassifier(num_classes=num_classes), "classifier-stand-in", "-", feature_dim=128), 32
    if kind == "inception":
        import torchvision

        class Pool3(nn.Module):  # torchvision's Inception-v3 up to pool3 (2048-d), FID's cost at 299 px
            def __init__(self) -> None:
                super().__init__()
                self.net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
                self.net.fc = nn.Identity()

            def features(self, images: torch.Tensor) -> torch.Tensor:
                x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
                return self.net((x - 128.0) / 128.0)

        return ModuleFeatures(Pool3(), "inception-stand-in", "-", feature_dim=2048), 299
    import timm


    class Dino(nn.Module):  # ViT-L/14 CLS at 224 px, FD-DINOv2's cost
        def __init__(self) -> None:
            super().__init__()
            self.net = timm.create_model(DINOV2_TIMM_NAMES["vitl14"], pretrained=False,
                                         img_size=DINOV2_INPUT_SIZE, num_classes=0)
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

        def features(self, images: torch.Tensor) -> torch.Tensor:
            x = F.interpolate(images.float(), size=(DINOV2_INPUT_SIZE,) * 2, mode="bicubic",
                              antialias=True, align_corners=False)
            return self.net((x / 255.0 - self.mean) / self.std)

    return ModuleFeatures(Dino(), "dinov2-stand-in", "-", feature_dim=1024), DINOV2_INPUT_SIZE


def build_eval_workloads(cfg: ExperimentConfig, geometry: Geometry, batch: int, device: torch.device,
                         prepared_dir: Optional[str], seed: int = 0) -> list[Workload]:
    """`FeatureNetwork.extract` of `eval.feature_network` on uint8 images of the scale's size: the
    real network when its weights are local (the prepared classifier, eval.inception_weights), else
    a stand-in of the same architecture."""

    kind = cfg.eval.feature_network
    try:
        network = build_feature_network(kind, classifier_dir=f"{prepared_dir}/classifier" if prepared_dir else None,
                                        inception_weights=cfg.eval.inception_weights)
        weights = f"{network.network_id} (trained weights)"
    except (FeatureNetworkError, FileNotFoundError, OSError):
        network, _ = _eval_stand_in(kind, cfg.data.num_classes)
        weights = f"{kind} stand-in (random weights, same architecture)"
    network = network.to(device).eval()
    size = geometry.image_size  # the generated images' size; each network resizes as it does in eval
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8).to(device)
    return [Workload(kind="eval", name=f"features {kind}", images_per_call=batch, device=device,
                     run=lambda: network.extract(images),
                     fields={"spec": "-", "mode": "eval", "batch": batch, "feature_network": kind,
                             "image_size": size, "weights": weights, "precision": "fp32", "dtype": "fp32"})]
