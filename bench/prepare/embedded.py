"""The embedded default's own networks, trained by `bench prepare` on CPU:

- a tiny diffusers `AutoencoderKL` (f=4, 4 latent channels: 32x32 images -> 4x8x8 latents), MSE +
  a small KL, whose `scaling_factor` (stored in its config) makes the sampled latents unit-std;
- `EvalClassifier`, a small CNN: the independent evaluation network. Its penultimate features feed
  the Frechet distance and its logits the conditional accuracy of samples.

Both train from a seed with a seeded generator for batch order and noise, so a re-run reproduces
them (on the same machine and torch build).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.atomic import atomic_save_safetensors, atomic_torch_module_dir, atomic_write_json
from bench.progress import Progress

CLASSIFIER_FORMAT = "redi-bench-classifier/1"


@dataclass
class EmbeddedVAESettings:
    """Architecture and training of the tiny AutoencoderKL."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    steps: int = 500
    """500 keeps the demo's first run inside its budget on 2 cores; what a step costs and the PSNR
    each step count reaches are in docs/embedded.md ("What `bench prepare` trains")."""
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6
    scale_images: int = 4096
    """Training images whose sampled latents set the scaling factor (1 / their std)."""


@dataclass
class ClassifierSettings:
    """Architecture and training of the evaluation CNN."""

    width: int = 32
    feature_dim: int = 128
    epochs: float = 2.0
    """2 keeps the demo's first run inside its budget above the 90% floor; the accuracy each
    setting reaches is in docs/embedded.md ("What `bench prepare` trains")."""
    batch_size: int = 128
    lr: float = 2e-3
    min_test_accuracy: float = 0.0
    """Raise if the test accuracy ends below this (0.9 for Fashion-MNIST's embedded default)."""


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """`steps` index batches from seeded permutations of range(n) (epoch after epoch)."""
    order = torch.randperm(n, generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > n:
            order, position = torch.randperm(n, generator=generator), 0
        yield order[position: position + batch_size]
        position += batch_size


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def build_embedded_vae(settings: EmbeddedVAESettings, image_size: int):
    """The untrained tiny AutoencoderKL of `settings` for `image_size` px images."""
    from diffusers import AutoencoderKL

    levels = len(settings.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=settings.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(settings.block_out_channels),
        layers_per_block=settings.layers_per_block,
        norm_num_groups=min(32, min(settings.block_out_channels)),
        sample_size=image_size)


def vae_losses(vae, x: torch.Tensor, generator: torch.Generator,
               autocast_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction MSE, KL) of the tiny AutoencoderKL on images `x` in [-1, 1], the KL summed
    over latent elements and averaged over the batch. With `autocast_dtype` the encoder and decoder
    run under autocast; the posterior (its sample and KL) and the MSE stay fp32, so in fp32 this is
    the plain diffusers computation. Prepare trains in fp32; bf16 is here to be measured
    (results/studies/embedded/precision/)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    def precision():
        return torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32,
                              enabled=autocast_dtype is not None)

    with precision():
        moments = vae.encode(x).latent_dist.parameters  # (B, 2 * latent_channels, h, w)
    posterior = DiagonalGaussianDistribution(moments.float())
    with precision():
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
    return F.mse_loss(reconstruction.float(), x), posterior.kl().mean()


def train_embedded_vae(images: torch.Tensor, settings: EmbeddedVAESettings, seed: int,
                       out_dir: str | Path, progress: bool = True) -> dict:
    """Train the tiny AutoencoderKL on uint8 `(N, 3, S, S)` in fp32 and save it with
    `save_pretrained` to `out_dir` (atomically); returns a summary (loss, reconstruction PSNR,
    scaling factor, seconds). Not in bf16: trained and encoded in bf16 it moved the demo's FD by
    +1.8 for every spec (docs/performance.md)."""
    torch.manual_seed(seed)  # parameter initialisation
    vae = build_embedded_vae(settings, int(images.shape[-1]))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr)
    start = time.time()
    vae.train()
    loss_value = float("nan")
    bar = Progress("prepare embedded VAE step", settings.steps, images_per_unit=settings.batch_size,
                   enabled=progress, iterable=_batches(len(images), settings.batch_size, settings.steps, generator))
    for index in bar:
        mse, kl = vae_losses(vae, to_unit_range(images[index]), generator)
        optimizer.zero_grad(set_to_none=True)
        (mse + settings.kl_weight * kl).backward()
        optimizer.step()
        loss_value = mse.item()
        bar.set_postfix(mse=loss_value)
    vae.eval()
    scale, psnr = _scaling_factor_and_psnr(vae, images, settings.scale_images, generator)
    vae.register_to_config(scaling_factor=scale)
    atomic_torch_module_dir(out_dir, vae.save_pretrained)
    summary = {"final_mse": loss_value, "train_psnr_db": psnr, "scaling_factor": scale,
               "seconds": time.time() - start, "parameters": sum(p.numel() for p in vae.parameters()),
               "settings": asdict(settings), "seed": seed}
    atomic_write_json(Path(out_dir) / "training.json", summary)
    return summary


@torch.no_grad()
def _scaling_factor_and_psnr(vae, images: torch.Tensor, count: int,
                             generator: torch.Generator) -> tuple[float, float]:
    """1 / std of sampled latents over `count` images, and the reconstruction PSNR (dB, [-1,1])."""
    subset = images[:count]
    latents, squared_error = [], 0.0
    for start in range(0, len(subset), 256):
        x = to_unit_range(subset[start: start + 256])
        posterior = vae.encode(x).latent_dist
        latents.append(posterior.sample(generator=generator))
        squared_error += float(((vae.decode(posterior.mean).sample - x) ** 2).sum())
    std = float(torch.cat(latents).std())
    mse = squared_error / subset.numel()
    psnr = 10.0 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))).item()  # peak-to-peak 2
    return 1.0 / std, psnr


# ---------------------------------------------------------------------------------------------
# The evaluation classifier


class EvalClassifier(nn.Module):
    """A small CNN for 32x32 RGB images.

    Input convention: uint8 `(B, 3, 32, 32)` in 0..255 RGB, or a float tensor on the same 0..255
    scale (not [-1, 1] and not [0, 1]; decode samples to uint8 first, as the evaluation does).
    `features(images) -> (B, feature_dim)` (penultimate layer, for the Frechet distance);
    `logits(images) -> (B, num_classes)`.
    """

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        w = width
        self.body = nn.Sequential(
            block(3, w), block(w, w), nn.MaxPool2d(2),  # 32 -> 16
            block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),  # 16 -> 8
            block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def _normalise(images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"EvalClassifier takes RGB images (B, 3, H, W); got {tuple(images.shape)}")
        if images.is_floating_point() and images.numel() and (images.min() < 0 or images.max() > 255):
            raise ValueError("EvalClassifier takes uint8 or float images on the 0..255 scale; got "
                             f"values in [{float(images.min()):.3g}, {float(images.max()):.3g}]")
        return images.float() / 127.5 - 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features `(B, feature_dim)`."""
        return self.body(self._normalise(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits `(B, num_classes)`."""
        return self.head(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)


@torch.no_grad()
def classifier_accuracy(model: EvalClassifier, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 500) -> float:
    """Top-1 accuracy on uint8 images."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model.logits(images[start: start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start: start + batch_size]).sum())
    return correct / max(len(images), 1)


def train_classifier(train_images: torch.Tensor, train_labels: torch.Tensor,
                     test_images: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                     settings: ClassifierSettings, seed: int, out_dir: str | Path,
                     progress: bool = True) -> dict:
    """Train `EvalClassifier` (random horizontal flips; AdamW with a cosine schedule), measure its
    test accuracy, and save `model.safetensors` + `classifier.json` in `out_dir` (atomically)."""
    torch.manual_seed(seed)
    # channels_last: the convolutions train faster on CPU (measured in docs/embedded.md); the weights
    # saved are the same tensors in the usual layout
    model = EvalClassifier(num_classes, settings.width, settings.feature_dim).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed)
    steps = max(1, int(settings.epochs * len(train_images) / settings.batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=steps)
    start = time.time()
    model.train()
    bar = Progress("prepare eval classifier step", steps, images_per_unit=settings.batch_size, enabled=progress,
                   iterable=_batches(len(train_images), settings.batch_size, steps, generator))
    for index in bar:
        x = train_images[index]
        flip = torch.rand(len(index), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model.logits(x), train_labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=loss.item())
    accuracy = classifier_accuracy(model, test_images, test_labels)
    summary = {"format": CLASSIFIER_FORMAT, "config": model.config, "test_accuracy": accuracy,
               "num_test": int(len(test_images)), "num_train": int(len(train_images)),
               "steps": steps, "seconds": time.time() - start, "seed": seed,
               "settings": asdict(settings),
               "input_convention": "uint8 RGB (B, 3, 32, 32) in 0..255 (or float on 0..255)"}
    if accuracy < settings.min_test_accuracy:
        raise RuntimeError(f"the evaluation classifier reached only {accuracy:.3f} test accuracy "
                           f"(< {settings.min_test_accuracy}); raise classifier epochs")
    out_dir = Path(out_dir)
    atomic_save_safetensors(out_dir / "model.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()},
                            metadata={"format": CLASSIFIER_FORMAT})
    atomic_write_json(out_dir / "classifier.json", summary)
    return summary


def load_classifier(directory: str | Path) -> EvalClassifier:
    """The evaluation classifier saved by `train_classifier` (eval mode, frozen)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    info_file, weights_file = directory / "classifier.json", directory / "model.safetensors"
    if not info_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"no evaluation classifier in {directory} (classifier.json + "
                                "model.safetensors); run `bench prepare` on the embedded default")
    info = json.loads(info_file.read_text())
    if info.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{info_file} has format {info.get('format')!r}, not {CLASSIFIER_FORMAT}")
    model = EvalClassifier(**info["config"])
    model.load_state_dict(load_file(str(weights_file)))
    return model.eval().requires_grad_(False)


def classifier_info(directory: str | Path) -> Optional[dict]:
    """The classifier's JSON record (test accuracy, settings), or None when absent."""
    path = Path(directory) / "classifier.json"
    return json.loads(path.read_text()) if path.is_file() else None
