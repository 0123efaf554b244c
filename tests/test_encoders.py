"""Frozen encoders (bench.prepare.encoders): preprocessing against hand-written references, token layout,
local weights loading, and the VAE moments. No network: HF_HUB_OFFLINE=1 and local files only."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from bench.config import EncoderConfig, VAEConfig
from bench.prepare.encoders import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    EncoderError,
    build_dinov2,
    build_efficientnet_lite0,
    build_semantic_encoder,
    load_vae,
    sample_latents,
)
from models.repa import align_to_grid

TINY_VIT = dict(embed_dim=32, depth=1, num_heads=2)


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with PyTorch's a = -0.75."""
    t = np.abs(t)
    return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                    np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))


def _resize_matrix(n_in: int, n_out: int, kind: str) -> np.ndarray:
    """(n_out, n_in) interpolation weights, align_corners=False, borders clamped (as PyTorch)."""
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        if kind == "bilinear":
            x = max(x, 0.0)
            taps = {0: 1 - (x - math.floor(x)), 1: x - math.floor(x)}
        else:
            taps = {k: float(_cubic(np.array(x - (math.floor(x) + k)))) for k in (-1, 0, 1, 2)}
        for k, w in taps.items():
            matrix[i, min(max(math.floor(x) + k, 0), n_in - 1)] += w
    return matrix


def _reference_resize(x: np.ndarray, size: int, kind: str) -> np.ndarray:
    """Separable float64 resize of (..., H, W) arrays."""
    rows = _resize_matrix(x.shape[-2], size, kind)
    cols = _resize_matrix(x.shape[-1], size, kind)
    return rows @ x @ cols.T


def _image(size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8)


def _smooth_image(size: int) -> torch.Tensor:
    """A smooth uint8 image: PyTorch computes resize coordinates in float32, so on noise its
    output differs from a float64 reference by ~1e-4; on a smooth image by < 1e-6."""
    i = torch.arange(size, dtype=torch.float64)
    waves = [torch.sin(i[:, None] / (9 + 4 * c)) * torch.cos(i[None, :] / (7 + 3 * c)) for c in range(3)]
    return (127.5 + 120 * torch.stack(waves)).round().to(torch.uint8).unsqueeze(0)


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A randomly initialised ViT-S/14-reg4 of the DINOv2 family (tiny widths) saved to a file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=224,
                              **TINY_VIT).eval()
    path = tmp_path_factory.mktemp("dino") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_dinov2_preprocessing_matches_hand_computed(tiny_dinov2):
    _, path = tiny_dinov2
    encoder = build_dinov2("vits14_reg", 256, str(path), **TINY_VIT)
    images = _smooth_image(256)
    x = images.double().numpy() / 255.0
    x = (x - np.array(IMAGENET_DEFAULT_MEAN)[:, None, None]) / np.array(IMAGENET_DEFAULT_STD)[:, None, None]
    expected = _reference_resize(x, 224, "bicubic")
    got = encoder.preprocess(images).double().numpy()
    # float32 pipeline vs float64 reference on values of size ~2: 1e-5 covers float32 rounding.
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert encoder.info.input_size == 224 and encoder.info.grid == (16, 16)


def test_dinov2_tokens_layout_and_weights(tiny_dinov2):
    model, path = tiny_dinov2
    encoder = build_dinov2("vits14_reg", 256, str(path), **TINY_VIT)
    images = _image(256, seed=1)
    features = encoder.encode(images)
    assert features.shape == (2, 32, 16, 16) and encoder.info.channels == 32
    with torch.no_grad():
        tokens = model.forward_features(encoder.preprocess(images))  # final norm included
    assert model.num_prefix_tokens == 5  # class + 4 registers are dropped
    patch = tokens[:, 5:]  # x_norm_patchtokens (B, 256, D), row-major over the 16x16 grid
    # Same weights (loaded from the file) and same input: equal up to float32 op ordering.
    torch.testing.assert_close(features[:, :, 3, 7], patch[:, 3 * 16 + 7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), patch, atol=1e-5, rtol=1e-5)


def test_dinov2_official_meta_layout_loads(tiny_dinov2, tmp_path):
    """An official-layout state dict (register_tokens, mask_token, cls slot in pos_embed) loads
    through timm's converter into the same network."""
    model, _ = tiny_dinov2
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    official = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    official["register_tokens"] = sd["reg_token"]
    official["cls_token"] = sd["cls_token"]
    official["pos_embed"] = torch.cat([torch.zeros(1, 1, 32), sd["pos_embed"]], dim=1)
    official["mask_token"] = torch.zeros(1, 32)
    path = tmp_path / "official.pth"
    torch.save(official, path)
    encoder = build_dinov2("vits14_reg", 256, str(path), **TINY_VIT)
    images = _image(256, seed=2)
    with torch.no_grad():
        expected = model.forward_features(encoder.preprocess(images))[:, 5:]
    torch.testing.assert_close(encoder.encode(images).flatten(2).transpose(1, 2), expected,
                               atol=1e-5, rtol=1e-5)


def test_dinov2_errors(tmp_path):
    with pytest.raises(EncoderError, match=r"encoder.weights: file .*missing.pth not found"):
        build_dinov2("vitb14_reg", 256, str(tmp_path / "missing.pth"))
    with pytest.raises(EncoderError, match="encoder.weights is not set"):
        build_semantic_encoder(EncoderConfig(kind="dinov2", variant="vitb14_reg"), 256)
    with pytest.raises(EncoderError, match="encoder.variant"):
        build_dinov2("vitz14", 256, None)


def test_dinov2_rejects_wrong_image_size(tiny_dinov2):
    _, path = tiny_dinov2
    with pytest.raises(EncoderError, match="data.image_size=32"):
        build_dinov2("vits14_reg", 32, str(path), **TINY_VIT)


@pytest.fixture(scope="module")
def efficientnet():
    return build_efficientnet_lite0(image_size=32, input_size=128, block=7)


def test_efficientnet_preprocessing_and_block7(efficientnet):
    images = _smooth_image(32)
    expected = _reference_resize(images.double().numpy() / 127.5 - 1.0, 128, "bicubic")
    # float32 vs float64 reference on values in [-1.2, 1.2]: 1e-5.
    np.testing.assert_allclose(efficientnet.preprocess(images).double().numpy(), expected, atol=1e-5)
    assert efficientnet.info.grid == (8, 8) and efficientnet.info.channels == 80
    assert "stand-in for DINOv2" in efficientnet.info.description

    # The truncated forward equals block 7's output inside the full network (forward hook).
    captured = {}
    model = efficientnet.model
    handle = model._blocks[7].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    with torch.no_grad():
        model(efficientnet.preprocess(images))
    handle.remove()
    ours = efficientnet.encode(images)
    assert ours.shape == (1, 80, 8, 8)
    # Same weights and input; only the conv algorithm/memory order may differ: 1e-4 of the scale.
    scale = float(captured["x"].abs().max())
    torch.testing.assert_close(ours, captured["x"], atol=1e-4 * scale, rtol=1e-4)


def test_efficientnet_is_real_imagenet_weights(efficientnet):
    """Real weights, not a fresh network: trained batch-norm statistics (a freshly initialised
    network has running variances of exactly 1)."""
    bn = efficientnet.model._bn0
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_efficientnet_missing_weights(tmp_path):
    with pytest.raises(EncoderError, match="encoder.weights: file"):
        build_semantic_encoder(EncoderConfig(weights=str(tmp_path / "nope.pth")), 32)


def test_uint8_is_required(efficientnet):
    with pytest.raises(EncoderError, match="uint8"):
        efficientnet.encode(torch.zeros(1, 3, 32, 32))


def test_align_to_grid():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert align_to_grid(x, (4, 4)) is x  # no resize when grids agree
    expected = _reference_resize(x.numpy(), 8, "bilinear")
    np.testing.assert_allclose(align_to_grid(x, (8, 8)).numpy(), expected, atol=1e-12)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    folder = tmp_path_factory.mktemp("vae") / "tiny"
    vae.save_pretrained(folder)
    return folder


def test_vae_moments_and_sampling(tiny_vae_dir):
    vae = load_vae(VAEConfig(kind="diffusers", path=str(tiny_vae_dir), scaling_factor=0.18215))
    assert vae.info.downsample == 2 and vae.info.latent_channels == 4
    images = _image(16, seed=4)
    moments = vae.encode_moments(images)
    assert moments.shape == (2, 8, 8, 8)
    with torch.no_grad():  # by hand: encoder -> quant_conv -> (mean, logvar), std = exp(logvar/2)
        h = vae.vae.quant_conv(vae.vae.encoder(images.float() / 127.5 - 1.0))
    mean, logvar = h.chunk(2, dim=1)
    torch.testing.assert_close(moments[:, :4], mean)
    torch.testing.assert_close(moments[:, 4:], torch.exp(0.5 * logvar.clamp(-30, 20)))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    z = sample_latents(moments, 0.18215, g1)
    expected = (mean + moments[:, 4:] * torch.randn(mean.shape, generator=g2)) * 0.18215
    torch.testing.assert_close(z, expected)


def test_vae_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(EncoderError, match="vae.path is not set"):
        load_vae(VAEConfig(kind="diffusers", path=None))
    with pytest.raises(EncoderError, match="vae.path='nobody/no-such-vae'"):
        load_vae(VAEConfig(kind="diffusers", path="nobody/no-such-vae"))
    with pytest.raises(EncoderError, match="no trained embedded VAE"):
        load_vae(VAEConfig(kind="embedded"), embedded_dir=tmp_path)


def test_vae_and_dinov2_resolve_from_the_hugging_face_cache_offline(tiny_vae_dir, tmp_path):
    """vae.path as a repo id (stabilityai/sd-vae-ft-ema in scale=paper) and an unset encoder.weights
    are read from the Hugging Face cache with HF_HUB_OFFLINE=1. A subprocess, because
    huggingface_hub reads HF_HUB_CACHE when it is imported."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, files in (("models--org--tiny-vae", sorted(tiny_vae_dir.iterdir())), (
            "models--timm--vit_small_patch14_reg4_dinov2.lvd142m", [])):
        snapshot = cache / repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (cache / repo / "refs").mkdir()
        (cache / repo / "refs" / "main").write_text(commit)
        for f in files:
            shutil.copy(f, snapshot / f.name)
    (cache / "models--timm--vit_small_patch14_reg4_dinov2.lvd142m" / "snapshots" / commit /
     "model.safetensors").write_bytes(b"not read here")
    code = (
        "from bench.config import VAEConfig\n"
        "from bench.prepare.encoders import _dinov2_from_hf_cache, load_vae\n"
        "vae = load_vae(VAEConfig(kind='diffusers', path='org/tiny-vae', scaling_factor=0.18215))\n"
        "print(vae.info.latent_channels, vae.info.downsample, vae.info.scaling_factor)\n"
        "print(_dinov2_from_hf_cache('vit_small_patch14_reg4_dinov2'))\n"
        "print(_dinov2_from_hf_cache('vit_large_patch14_dinov2'))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    vae_line, dino_line, missing_line = result.stdout.strip().splitlines()[-3:]
    assert vae_line == "4 2 0.18215"
    assert dino_line.endswith(f"{commit}/model.safetensors") and missing_line == "None"
