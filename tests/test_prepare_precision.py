"""encoder.precision: prepare's semantic encoder under bf16 autocast (fp32 weights and outputs), a
setting of its own in the prepared folder's hash; the VAE and the evaluation classifier in fp32."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

import bench.precision as precision
from bench.compose import load_config
from bench.config import ConfigError, DataConfig, EncoderConfig, VAEConfig
from bench.prepare.dataset import load_prepared
from bench.prepare.embedded import EmbeddedVAESettings, build_embedded_vae, vae_losses
from bench.prepare.options import PrepareOptions, encoder_dtype
from bench.prepare.pipeline import run_prepare
from bench.prepare.sources import digits


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def prepared_pair(tmp_path_factory):
    """The same 48 digits prepared with the encoder in fp32 and in bf16 (a tiny diffusers VAE,
    EfficientNet at 64 px)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3)
    root = tmp_path_factory.mktemp("precision")
    vae.save_pretrained(root / "vae")
    options = PrepareOptions(shard_size=16, batch_size=16, max_images={"train": 48, "test": 16},
                             efficientnet_input_size=64, train_classifier=False, progress=False)
    return {precision: run_prepare(DataConfig(name="digits", prepared_dir=str(root / precision)),
                                   VAEConfig(kind="diffusers", path=str(root / "vae"), scaling_factor=0.5),
                                   EncoderConfig(pca_rank_max=4, precision=precision), options)
            for precision in ("fp32", "bf16")}


def test_a_bf16_encoder_is_its_own_setting_close_to_fp32_and_leaves_the_vae_alone(prepared_pair):
    def read(name: str) -> dict:
        return {p: json.loads((folder / name).read_text()) for p, folder in prepared_pair.items()}

    settings = {p: record["settings"] for p, record in read("settings.json").items()}
    hashes = {p: record["settings_hash"] for p, record in read("manifest.json").items()}
    assert settings["bf16"]["encoder"]["precision"] == "bf16"
    # an fp32 folder's settings carry no precision key: folders prepared before the setting keep their hash
    assert "precision" not in settings["fp32"]["encoder"]
    assert hashes["fp32"] != hashes["bf16"]

    fp32, bf16 = (load_prepared(prepared_pair[p], "train", rank=4) for p in ("fp32", "bf16"))
    assert torch.equal(fp32.labels, bf16.labels)
    assert torch.equal(fp32.moments, bf16.moments)  # the VAE runs in fp32 whatever encoder.precision says
    assert bf16.features.dtype == torch.float16
    # bf16 keeps 8 significant bits (2^-9 = 0.2% per rounding). Measured on EfficientNet's block-7
    # features: 4.5% here and 5.7% on Fashion-MNIST at 128 px, most of it from the first block
    # (depthwise convolutions) and grown through the next three. The lower bound proves autocast was
    # on (fp32 twice agrees to 0).
    assert 1e-3 < _relative(bf16.features.float(), fp32.features.float()) < 0.1


def test_auto_encodes_in_bf16_only_where_the_device_runs_it_natively(monkeypatch):
    options = PrepareOptions(device="cpu")
    for flags, expected in (({"amx_bf16"}, torch.bfloat16), ({"avx512_bf16"}, torch.bfloat16), ({"avx2"}, None)):
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert encoder_dtype(EncoderConfig(precision="auto"), options) is expected
    assert encoder_dtype(EncoderConfig(precision="bf16"), options) is torch.bfloat16  # asked: emulated if need be
    assert encoder_dtype(EncoderConfig(precision="fp32"), options) is None
    with pytest.raises(ConfigError, match="encoder.precision"):
        EncoderConfig(precision="fp16")


def test_the_embedded_scale_encodes_in_auto_and_the_paper_scale_in_fp32():
    assert load_config([], site=False).encoder.precision == "auto"
    assert load_config(["scale=paper"], site=False).encoder.precision == "fp32"


def test_vae_losses_in_fp32_are_the_plain_diffusers_computation_and_bf16_is_close():
    torch.manual_seed(0)
    vae = build_embedded_vae(EmbeddedVAESettings(block_out_channels=(8, 8)), 32)
    x = digits("train").images(range(8)).float() / 127.5 - 1.0
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=torch.Generator().manual_seed(1))
    plain = (torch.nn.functional.mse_loss(vae.decode(z).sample, x), posterior.kl().mean())
    ours = vae_losses(vae, x, torch.Generator().manual_seed(1))
    assert torch.equal(ours[0], plain[0]) and torch.equal(ours[1], plain[1])  # bit-identical in fp32

    mse, kl = vae_losses(vae, x, torch.Generator().manual_seed(1), torch.bfloat16)
    assert mse.dtype == torch.float32 and kl.dtype == torch.float32  # the losses are reduced in fp32
    # a mean over thousands of bf16-rounded elements stays within bf16's unit roundoff 2^-9 = 2e-3;
    # measured 8e-5 (MSE) and 7e-4 (KL) relative on this untrained VAE; 0 would mean autocast was off
    assert 0 < abs(mse.item() / plain[0].item() - 1) < 2 ** -9
    assert 0 < abs(kl.item() / plain[1].item() - 1) < 2 ** -9
