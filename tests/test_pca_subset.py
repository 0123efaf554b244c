"""The PCA fitted on a subset of the train images (the paper: 76,800 random ImageNet images) equals
an independent float64 fit on exactly those images, and the subset is the seeded one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_prepare import R_MAX, _configs, _options, tiny_vae_dir  # noqa: F401  (fixture)

from bench.config import ConfigError, EncoderConfig
from bench.prepare.encoders import build_efficientnet_lite0
from bench.prepare.pipeline import PrepareError, run_prepare
from bench.prepare.shards import pca_fit_selection
from bench.prepare.sources import digits

TRAIN = 96


@pytest.fixture(scope="module")
def train_features() -> torch.Tensor:
    """The encoder's float32 features of the 96 train images, computed outside the pipeline."""
    images = digits("train").images(range(TRAIN))
    encoder = build_efficientnet_lite0(32, input_size=64)
    return torch.cat([encoder.encode(images[i:i + 16]) for i in range(0, TRAIN, 16)])


def _independent_eigenvalues(feats: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
    """float64 eigenvalues of the standardised token covariance of the chosen train images."""
    feats = feats[rows]
    tokens = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).double().numpy()
    standard = (tokens - tokens.mean(0)) / tokens.std(0)
    return np.linalg.eigvalsh(np.cov(standard, rowvar=False))[::-1]


@pytest.mark.parametrize("subset", ["random", "first"])
def test_subset_fit_equals_an_independent_fit_on_the_same_images(tiny_vae_dir, train_features,
                                                                  tmp_path, subset):
    out = tmp_path / subset
    data, vae, encoder = _configs(out, tiny_vae_dir, pca_fit_images=40, pca_fit_subset=subset)
    run_prepare(data, vae, encoder, _options(seed=3, max_images={"train": TRAIN, "test": 8}))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pca"]["num_images"] == 40
    expected_rows = (torch.arange(40) if subset == "first" else
                     torch.randperm(TRAIN, generator=torch.Generator().manual_seed(3))[:40])
    mask = pca_fit_selection(TRAIN, encoder, seed=3)
    assert torch.equal(torch.nonzero(mask).flatten(), expected_rows.sort().values)
    # The streamed float64 fit vs a one-shot float64 fit of the same float32 features.
    np.testing.assert_allclose(manifest["pca"]["eigenvalues"],
                               _independent_eigenvalues(train_features, expected_rows)[:R_MAX],
                               rtol=1e-6)
    # ... and not the fit on all 96 images (the subset matters)
    full = _independent_eigenvalues(train_features, torch.arange(TRAIN))[:R_MAX]
    assert not np.allclose(manifest["pca"]["eigenvalues"], full, rtol=1e-3)


def test_subset_errors():
    with pytest.raises(PrepareError, match="encoder.pca_fit_images=100 exceeds the 96"):
        pca_fit_selection(96, EncoderConfig(pca_fit_images=100), seed=0)
    with pytest.raises(ConfigError, match="encoder.pca_fit_subset"):
        EncoderConfig(pca_fit_subset="last")
    assert pca_fit_selection(96, EncoderConfig(), seed=0) is None  # default: every image


def test_repa_can_align_to_its_own_encoder():
    # REPA's published numbers used DINOv2-B/14 without registers; the spec defaults to ReDi's.
    from bench.compose import load_config
    from bench.run_hash import run_dir
    from bench.train.data import check_prepared

    default = load_config(["scale=paper", "spec=repa"])
    published = load_config(["scale=paper", "spec=repa", "encoder.variant=vitb14"])
    assert default.encoder.variant == "vitb14_reg" and published.encoder.variant == "vitb14"
    assert run_dir(default) != run_dir(published)
    assert default.encoder.pca_fit_images == 76_800  # the paper's PCA fit is the paper scale's
    manifest = {"encoder": {"encoder_id": "dinov2_vitb14_reg_224px"}}
    with pytest.raises(ConfigError, match="shards from another encoder"):
        check_prepared(published, manifest, "/data/prepared")
