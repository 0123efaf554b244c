"""data.prepare_precision: prepare's VAE training, VAE encoding and semantic encoder under bf16
autocast (fp32 weights and outputs), a setting of its own in the prepared folder's hash, the
evaluation classifier always in fp32."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

import bench.train.step as step
from bench.compose import load_config
from bench.config import ConfigError, DataConfig, EncoderConfig, VAEConfig
from bench.prepare.dataset import load_prepared
from bench.prepare.embedded import EmbeddedVAESettings, build_embedded_vae, train_embedded_vae, vae_losses
from bench.prepare.options import PrepareOptions, prepare_dtype
from bench.prepare.pipeline import run_prepare
from bench.prepare.sources import digits


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def prepared_pair(tmp_path_factory):
    """The same 48 digits prepared in fp32 and in bf16 (a tiny diffusers VAE, EfficientNet at 64 px)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3)
    root = tmp_path_factory.mktemp("precision")
    vae.save_pretrained(root / "vae")
    options = PrepareOptions(shard_size=16, batch_size=16, max_images={"train": 48, "test": 16},
                             efficientnet_input_size=64, train_classifier=False, progress=False)
    folders = {}
    for precision in ("fp32", "bf16"):
        folders[precision] = run_prepare(
            DataConfig(name="digits", prepared_dir=str(root / precision), prepare_precision=precision),
            VAEConfig(kind="diffusers", path=str(root / "vae"), scaling_factor=0.5),
            EncoderConfig(pca_rank_max=4), options)
    return folders


def test_a_bf16_prepare_is_its_own_setting_and_close_to_fp32(prepared_pair):
    settings = {p: json.loads((folder / "settings.json").read_text()) for p, folder in prepared_pair.items()}
    manifests = {p: json.loads((folder / "manifest.json").read_text()) for p, folder in prepared_pair.items()}
    assert settings["bf16"]["settings"]["precision"] == "bf16"
    # an fp32 folder's settings carry no precision key: folders prepared before the setting keep their hash
    assert "precision" not in settings["fp32"]["settings"]
    assert manifests["fp32"]["settings_hash"] != manifests["bf16"]["settings_hash"]

    fp32, bf16 = (load_prepared(prepared_pair[p], "train", rank=4) for p in ("fp32", "bf16"))
    assert torch.equal(fp32.labels, bf16.labels)
    assert bf16.moments.dtype == torch.float32 and bf16.features.dtype == torch.float16
    # bf16 keeps 8 significant bits (2^-9 = 0.2% per rounding). Measured: 0.26% on these moments
    # (0.46% for the embedded VAE); 4.5% on EfficientNet's block-7 features here and 5.7% on
    # Fashion-MNIST at 128 px, most of it from the first block (depthwise convolutions) and grown
    # through the next three. The lower bounds prove autocast was on (fp32 twice agrees to 0).
    assert 1e-4 < _relative(bf16.moments, fp32.moments) < 2e-2
    assert 1e-3 < _relative(bf16.features.float(), fp32.features.float()) < 0.1


def test_auto_prepares_in_bf16_only_where_the_device_runs_it_natively(monkeypatch):
    options = PrepareOptions(device="cpu")
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(step, "native_bf16", lambda device, native=native: native)
        assert prepare_dtype(DataConfig(prepare_precision="auto"), options) is expected
    assert prepare_dtype(DataConfig(prepare_precision="bf16"), options) is torch.bfloat16  # asked: emulated if need be
    assert prepare_dtype(DataConfig(prepare_precision="fp32"), options) is None
    with pytest.raises(ConfigError, match="data.prepare_precision"):
        DataConfig(prepare_precision="fp16")


def test_the_embedded_scale_prepares_in_auto_and_the_paper_scale_in_fp32():
    assert load_config([], site=False).data.prepare_precision == "auto"
    assert load_config(["scale=paper"], site=False).data.prepare_precision == "fp32"


def _tiny_vae_and_images():
    settings = EmbeddedVAESettings(block_out_channels=(8, 8), steps=2, batch_size=4, scale_images=8)
    torch.manual_seed(0)
    images = digits("train").images(range(8))
    return settings, build_embedded_vae(settings, 32), images.float() / 127.5 - 1.0


def test_vae_losses_in_fp32_are_the_plain_diffusers_computation_and_bf16_is_close():
    _, vae, x = _tiny_vae_and_images()
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=torch.Generator().manual_seed(1))
    plain = (torch.nn.functional.mse_loss(vae.decode(z).sample, x), posterior.kl().mean())
    ours = vae_losses(vae, x, torch.Generator().manual_seed(1))
    assert torch.equal(ours[0], plain[0]) and torch.equal(ours[1], plain[1])  # bit-identical in fp32

    mse, kl = vae_losses(vae, x, torch.Generator().manual_seed(1), torch.bfloat16)
    assert mse.dtype == torch.float32 and kl.dtype == torch.float32  # the losses are reduced in fp32
    # measured 8e-5 (MSE) and 7e-4 (KL) relative on this untrained VAE; 0 would mean autocast was off
    assert 0 < abs(mse.item() / plain[0].item() - 1) < 2e-2
    assert 0 < abs(kl.item() / plain[1].item() - 1) < 2e-2


def test_the_embedded_vae_trains_in_the_prepare_precision_and_records_it(tmp_path):
    settings, _, _ = _tiny_vae_and_images()
    images = digits("train").images(range(8))
    weights = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        summary = train_embedded_vae(images, settings, 0, tmp_path / name, progress=False, autocast_dtype=dtype)
        assert summary["precision"] == name
        assert json.loads((tmp_path / name / "training.json").read_text())["precision"] == name
        weights[name] = AutoencoderKL.from_pretrained(tmp_path / name).state_dict()
    assert all(v.dtype == torch.float32 for v in weights["bf16"].values())  # fp32 master weights
    differ = [k for k in weights["fp32"] if not torch.equal(weights["fp32"][k], weights["bf16"][k])]
    assert differ  # two bf16 steps moved the weights differently from two fp32 steps
    for key in differ:
        torch.testing.assert_close(weights["bf16"][key], weights["fp32"][key], atol=5e-3, rtol=0)
