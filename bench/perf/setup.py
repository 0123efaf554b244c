"""What `bench perf` times on: the model size, the specs, the precision policy, and the data.

Specs come from `ablations/spec/*.yaml` through the same composition as `bench train`, so a perf row
for `redi_repa` times exactly what `bench train spec=redi_repa` builds (`bench.train.build`). One extra name,
`redi_separate`, is `redi` with `model.fusion=separate` (paper Table 6).

Data is either synthetic (random normal moments and features, random uint8 images; never zeros, so
no kernel takes a shortcut) or real (a finished `bench prepare` folder, plus the raw images for the
reference mode's online encoder). Either way a small pool of distinct batches is built *before*
timing and cycled, so the timed step holds no data generation or disk reads, as in a trainer whose
loader prefetches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from bench.compose import available, load_config
from bench.config import ConfigError, DataConfig, ExperimentConfig
from bench.precision import resolve_precision as train_precision
from bench.prepare.dataset import load_prepared
from bench.prepare.pca import PCAModel
from bench.prepare.sources import open_split
from models.backbone import MODEL_SIZES, PATCH_SIZES

SPEC_ALIASES = {"redi_separate": ("redi", ["model.fusion=separate"])}
DEFAULT_SPECS = ("latent_only", "redi", "redi_separate", "repa", "redi_repa")

# What each encoder hands the trainer, per image (checked against the real encoders in the tests):
# EfficientNet-Lite0 block 7 at 128 px: 80 channels on an 8x8 grid; DINOv2-B/14 at 224 px (per
# 256 px image): 768 channels on a 16x16 grid.
ENCODER_SHAPES = {"efficientnet_lite0": (80, 8), "dinov2": (768, 16)}
DINOV2_WIDTHS = {"vits14": 384, "vitb14": 768, "vitl14": 1024}
# Latent downsampling of the VAE of each scale: the embedded AutoencoderKL (f=4), SD-VAE (f=8).
VAE_DOWNSAMPLE = {"embedded": 4, "diffusers": 8}


class PerfError(ConfigError):
    """A `bench perf` argument is invalid; the message names the option and what is allowed."""


@dataclass(frozen=True)
class SizeChoice:
    """`--size`: a registry name (`S/2`) or `custom:depth,width,heads,patch`."""

    label: str
    overrides: tuple[str, ...]
    registry: bool


def parse_size(text: str) -> SizeChoice:
    """Parse `--size` into model.* overrides."""
    text = text.strip()
    match = re.fullmatch(r"custom:(\d+),(\d+),(\d+),(\d+)", text)
    if match:
        depth, width, heads, patch = (int(v) for v in match.groups())
        return SizeChoice(f"custom:{depth},{width},{heads},{patch}",
                          ("model.size=custom", f"model.depth={depth}", f"model.hidden_size={width}",
                           f"model.num_heads={heads}", f"model.patch_size={patch}"), registry=False)
    stem = text.removeprefix("SiT-").removeprefix("DiT-")
    size, _, patch = stem.partition("/")
    if size in MODEL_SIZES and patch.isdigit() and int(patch) in PATCH_SIZES:
        return SizeChoice(stem, (f"model.size={stem}",), registry=True)
    raise PerfError(f"--size {text!r} is not a model size; use a registry name such as S/2, B/2, XL/2 "
                    f"(sizes {sorted(MODEL_SIZES)}, patches {PATCH_SIZES}) or "
                    "custom:DEPTH,WIDTH,HEADS,PATCH (e.g. custom:6,256,4,1)")


def compose_spec(spec: str, size: SizeChoice, scale: str, extra: list[str]) -> ExperimentConfig:
    """The ExperimentConfig `bench train` would build for this spec, size and scale."""

    base, alias_overrides = SPEC_ALIASES.get(spec, (spec, []))
    if base not in available("spec"):
        raise PerfError(f"--specs: unknown spec {spec!r}; choose from "
                        f"{sorted(available('spec') + list(SPEC_ALIASES))}")
    return load_config([f"scale={scale}", f"spec={base}", *size.overrides, *alias_overrides, *extra])


# ---------------------------------------------------------------------------------------------
# Precision policy


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> what `bench train` runs with train.precision=auto on this device (bf16 on a GPU with
    bf16 or a CPU with AMX-BF16, see bench.precision.auto_is_bf16), so "default" rows time the trainer's real step."""

    if precision not in ("auto", "bf16", "fp32"):
        raise PerfError(f"--precision {precision!r}: choose auto, bf16 or fp32")
    if precision == "auto":
        return "fp32" if train_precision("auto", device) is None else "bf16"
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast (fp32 master weights and optimiser state), or a no-op for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ---------------------------------------------------------------------------------------------
# Geometry and data


@dataclass(frozen=True)
class Geometry:
    """Shapes of one benchmark: latent grid and channels, images, encoder features."""

    latent_grid: int
    latent_channels: int
    image_size: int
    encoder_kind: str
    encoder_channels: int
    encoder_grid: int
    num_classes: int
    scaling_factor: float

    def manifest(self) -> dict:
        """The slice of a prepared manifest that `bench.train.build` reads."""
        return {"latent_grid": [self.latent_grid, self.latent_grid],
                "latent_channels": self.latent_channels,
                "encoder": {"channels": self.encoder_channels}}


def synthetic_geometry(cfg: ExperimentConfig) -> Geometry:
    """Shapes of the scale in `cfg` (embedded: 32 px, 8x8x4 latents; paper: 256 px, 32x32x4)."""
    downsample = VAE_DOWNSAMPLE[cfg.vae.kind]
    channels, grid = ENCODER_SHAPES[cfg.encoder.kind]
    if cfg.encoder.kind == "dinov2":
        grid = grid * cfg.data.image_size // 256  # 16x16 tokens per 256 px (224 px input, patch 14)
        channels = DINOV2_WIDTHS[cfg.encoder.variant.removesuffix("_reg")]
    return Geometry(latent_grid=cfg.data.image_size // downsample, latent_channels=4,
                    image_size=cfg.data.image_size, encoder_kind=cfg.encoder.kind,
                    encoder_channels=channels, encoder_grid=grid,
                    num_classes=cfg.num_model_classes, scaling_factor=1.0)


@dataclass
class BatchPool:
    """A few distinct batches, built before timing and cycled by `next()`.

    Keys: `moments` (B, 2*C_x, h, w) [mean, std]; `semantic` (B, r_max, h, w) PCA coordinates on the
    latent grid; `labels` (B,); `features` (B, D, gh, gw) float16 raw encoder features (the REPA
    target, stored as prepare stores it); `images` (B, 3, S, S) uint8 for the online encoder.
    """

    batches: list[dict]
    position: int = 0
    source: str = "synthetic"
    pca: Optional[object] = field(default=None, repr=False)
    """The PCA the online encoder projects with (a bench.prepare.pca.PCAModel)."""

    def next(self) -> dict:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch


def synthetic_pool(geometry: Geometry, batch: int, rank: int, device: torch.device,
                   count: int = 3, seed: int = 0) -> BatchPool:
    """Random normal moments and features, random images and labels (never all zeros)."""
    g = torch.Generator().manual_seed(seed)
    h = geometry.latent_grid
    batches = []
    for _ in range(count):
        mean = torch.randn(batch, geometry.latent_channels, h, h, generator=g)
        std = 0.1 + 0.05 * torch.rand(batch, geometry.latent_channels, h, h, generator=g)
        gh = geometry.encoder_grid
        batches.append({
            "moments": torch.cat([mean, std], dim=1).to(device),  # (B, 2*C_x, h, w)
            "semantic": torch.randn(batch, rank, h, h, generator=g).to(device),
            "labels": torch.randint(0, geometry.num_classes, (batch,), generator=g).to(device),
            "features": torch.randn(batch, geometry.encoder_channels, gh, gh, generator=g).half().to(device),
            "images": torch.randint(0, 256, (batch, 3, geometry.image_size, geometry.image_size),
                                    generator=g, dtype=torch.uint8).to(device),
        })
    return BatchPool(batches, source="synthetic", pca=synthetic_pca(geometry, seed))


def synthetic_pca(geometry: Geometry, seed: int = 0):
    """A PCA of the right dimension with a random orthonormal basis (for the online encoder)."""

    g = torch.Generator().manual_seed(seed + 1)
    dim = geometry.encoder_channels
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigen = torch.linspace(2.0, 0.01, dim, dtype=torch.float64)
    return PCAModel(mean=torch.randn(dim, generator=g, dtype=torch.float64),
                    std=1.0 + torch.rand(dim, generator=g, dtype=torch.float64),
                    pca_mean=torch.zeros(dim, dtype=torch.float64), components=basis.T.contiguous(),
                    eigenvalues=eigen, count=0, num_images=0, encoder_id="synthetic")


def real_pool(prepared_dir: str, batch: int, rank: int, device: torch.device,
              data_root: Optional[str], need_images: bool, count: int = 3,
              seed: int = 0) -> tuple[BatchPool, Geometry, dict]:
    """Batches of a finished `bench prepare` (train split) and, if asked, their raw images."""

    dataset = load_prepared(prepared_dir, "train", rank=rank, with_features=True)
    manifest = dataset.manifest
    if len(dataset) < batch:
        raise PerfError(f"--data real: {prepared_dir} holds {len(dataset)} training images, fewer "
                        f"than --batch {batch}")
    encoder_id = manifest["encoder"]["encoder_id"]
    kind = "dinov2" if encoder_id.startswith("dinov2") else "efficientnet_lite0"
    grid = manifest["latent_grid"][0]
    geometry = Geometry(latent_grid=grid, latent_channels=int(manifest["latent_channels"]),
                        image_size=int(manifest["data"]["image_size"]), encoder_kind=kind,
                        encoder_channels=int(manifest["encoder"]["channels"]),
                        encoder_grid=int(manifest["semantic_grid"][0]),
                        num_classes=int(manifest["data"]["num_classes"]),
                        scaling_factor=float(manifest["scaling_factor"]))
    source = None
    if need_images:
        data = manifest["data"]
        source = open_split(DataConfig(name=data["name"], root=data_root, image_size=data["image_size"],
                                       num_classes=data["num_classes"]), "train")
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        rows = torch.randperm(len(dataset), generator=g)[:batch]
        item = {"moments": dataset.moments[rows].to(device), "semantic": dataset.semantic[rows].to(device),
                "labels": dataset.labels[rows].to(device)}
        if dataset.features is not None:
            item["features"] = dataset.features[rows].to(device)
        if source is not None:
            # prepare writes the first n images of the split in order, so row i is image i
            item["images"] = source.images(rows.tolist()).to(device)
        batches.append(item)
    pca = PCAModel.load(f"{prepared_dir}/{manifest['pca']['file']}") if need_images else None
    return BatchPool(batches, source=f"real:{prepared_dir}", pca=pca), geometry, manifest
