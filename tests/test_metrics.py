"""Metrics core (bench.evaluate.quality, bench.evaluate.features): the Frechet distance against scipy and closed forms,
KID against a naive implementation, the torch-fidelity and clean-fid backends, quantisation,
feature networks and cached reference statistics. CPU only, tiny networks, nothing downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.atomic import atomic_save_safetensors, atomic_write_json, sha256_file
from bench.evaluate.features import (
    DinoV2Features,
    FeatureNetworkError,
    InceptionFeatures,
    ModuleFeatures,
    build_feature_network,
    extract_features,
    load_classifier_network,
    reference_statistics,
)
from bench.evaluate.quality import (
    FeatureStatistics,
    MetricError,
    conditional_accuracy,
    feature_statistics,
    frechet_distance,
    get_backend,
    kernel_inception_distance,
    to_uint8,
)


def _random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def _fd_via_factors(x1: np.ndarray, x2: np.ndarray) -> float:
    """Independent FD of two sample sets: with S_i = A_i A_i^T (A_i = centred samples^T / sqrt(n-1)),
    tr sqrt(S1 S2) is the nuclear norm of A1^T A2 (singular values: no matrix square root at all)."""
    mu1, mu2 = x1.mean(0), x2.mean(0)
    a1 = (x1 - mu1) / np.sqrt(len(x1) - 1)
    a2 = (x2 - mu2) / np.sqrt(len(x2) - 1)
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    return float(((mu1 - mu2) ** 2).sum() + (a1 ** 2).sum() + (a2 ** 2).sum() - 2 * nuclear)


# ---------------------------------------------------------------------------------------------
# Frechet distance


def test_frechet_distance_matches_scipy_sqrtm_on_well_conditioned_statistics():
    rng = np.random.default_rng(0)
    d = 64
    x1 = rng.normal(size=(4 * d, d)) @ rng.normal(size=(d, d)) * 0.3
    x2 = rng.normal(size=(4 * d, d)) * 1.3 + 0.2
    mu1, sigma1 = feature_statistics(x1)
    mu2, sigma2 = feature_statistics(x2)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    reference = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2)
                      - 2 * np.trace(covmean).real)
    # Both float64 on condition numbers ~1e3: they agree to ~1e-13; 1e-9 leaves LAPACK headroom.
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("tiny", [1e-12, 0.0])
def test_frechet_distance_closed_form_for_commuting_near_singular_covariances(tiny):
    rng = np.random.default_rng(1)
    d = 64
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    a[:40], b[20:50] = tiny, tiny  # overlapping (near-)null spaces
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum() + ((mu1 - mu2) ** 2).sum())
    q = _random_orthogonal(rng, d)  # the same rotation for both: they still commute
    for s1, s2 in ((np.diag(a), np.diag(b)), (q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T)):
        # Rotation rounding (~1e-16 |S|) lifts the null eigenvalues to ~1e-16, whose square roots
        # (1e-8) shift the trace by up to d * 1e-8; relative to FD ~100 that is < 1e-6.
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("d, n, scale", [(64, 8, 1.0), (64, 8, 1e3), (256, 16, 1.0)])
def test_frechet_distance_on_rank_deficient_sample_covariances(d, n, scale):
    # N < D: rank-deficient covariances. scipy's sqrtm returns a complex trace here, and clean-fid
    # raises "Imaginary component" for scale 1e3; the eigen-based trace stays real and correct.
    rng = np.random.default_rng(2)
    x1, x2 = rng.normal(size=(n, d)) * scale, rng.normal(size=(n, d)) * scale + 0.5
    mu1, sigma1 = feature_statistics(x1, allow_rank_deficient=True)
    mu2, sigma2 = feature_statistics(x2, allow_rank_deficient=True)
    value = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(value)
    # The square root is not Lipschitz at 0: float64 rounding of the null eigenvalues moves the
    # trace by ~d * sqrt(eps |S|), i.e. ~1e-8 relative here (measured); 1e-6 bounds it.
    assert value == pytest.approx(_fd_via_factors(x1, x2), rel=1e-6)


def test_frechet_distance_rejects_bad_statistics():
    eye = np.eye(4)
    with pytest.raises(MetricError, match="positive semi-definite"):
        frechet_distance(np.zeros(4), -eye, np.zeros(4), eye)
    with pytest.raises(MetricError, match="mu \\(D,\\) and sigma"):
        frechet_distance(np.zeros(4), eye, np.zeros(3), eye)
    with pytest.raises(MetricError, match="NaN"):
        frechet_distance(np.full(4, np.nan), eye, np.zeros(4), eye)


def test_feature_statistics_refuses_fewer_samples_than_dimensions():
    features = np.random.default_rng(3).normal(size=(10, 16))
    with pytest.raises(MetricError, match="10 samples < 16 feature dimensions.*allow_rank_deficient"):
        feature_statistics(features)
    with pytest.raises(MetricError, match="allow_rank_deficient"):
        FeatureStatistics(16).update(features).finalize()
    mu, sigma = feature_statistics(features, allow_rank_deficient=True)
    assert sigma.shape == (16, 16) and np.linalg.matrix_rank(sigma) == 9


def test_streaming_statistics_match_np_cov_and_merge():
    rng = np.random.default_rng(4)
    # An offset of 10 standard deviations exercises the cancellation in S - n mu mu^T.
    features = (rng.normal(size=(300, 12)) + 10.0).astype(np.float32)
    left, right = FeatureStatistics(12), FeatureStatistics(12)
    for start in range(0, 200, 64):
        left.update(torch.from_numpy(features[start: min(start + 64, 200)]))
    right.update(features[200:])
    merged = FeatureStatistics.from_arrays(left.merge(right).as_arrays())
    mu, sigma = merged.finalize()
    reference = features.astype(np.float64)
    assert merged.count == 300 and mu.dtype == sigma.dtype == np.float64
    # float64 throughout: cancellation costs eps * (offset / std)^2 ~ 1e-14 relative.
    np.testing.assert_allclose(mu, reference.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(reference, rowvar=False), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# KID and backends


def _naive_kid_full(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, by explicit loops over pairs."""
    m, d = x.shape
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_matches_naive_formula_and_both_libraries():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) * 1.2 + 0.3
    naive = _naive_kid_full(x, y)
    # subset_size = N: every subset is the whole set, so the value is seed-independent.
    # float64 sums of ~2700 terms of size ~1: agreement to ~1e-13, tolerance 1e-10.
    for backend in ("native", "torch-fidelity", "clean-fid"):
        mean, std = get_backend(backend).kid(x, y, subsets=3, subset_size=30, seed=0)
        assert mean == pytest.approx(naive, rel=1e-10), backend
        assert std == pytest.approx(0.0, abs=1e-12), backend
    # Random subsets: ours draws them as torch-fidelity does, so the same seed gives the same KID.
    ours = kernel_inception_distance(x, y, subsets=7, subset_size=12, seed=11)
    theirs = get_backend("torch-fidelity").kid(x, y, subsets=7, subset_size=12, seed=11)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)
    assert ours[1] > 0
    with pytest.raises(MetricError, match="subset_size=31"):
        kernel_inception_distance(x, y, subsets=1, subset_size=31)


def test_backends_give_the_same_fd_on_identical_features():
    rng = np.random.default_rng(6)
    f1 = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.2
    f2 = rng.normal(size=(300, 32)) + 0.1
    values = {}
    for name in ("native", "torch-fidelity", "clean-fid"):
        backend = get_backend(name)
        assert backend.name == name and backend.version not in ("", "unknown")
        values[name] = backend.frechet_distance(*backend.statistics(f1), *backend.statistics(f2))
    assert get_backend("torch-fidelity").version == "0.4.0"
    assert get_backend("clean-fid").version == "0.1.35"
    # All float64 with the same statistics; eig of S1 S2 (torch-fidelity) and sqrtm (clean-fid)
    # differ from eigvalsh in rounding only (~1e-13 measured): 1e-8 relative.
    for name, value in values.items():
        assert value == pytest.approx(values["native"], rel=1e-8), name
    with pytest.raises(MetricError, match="choose one of"):
        get_backend("pytorch-fid")


# ---------------------------------------------------------------------------------------------
# Quantisation and accuracy


def test_to_uint8_rounds_to_the_nearest_level_once():
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.uniform(-1.2, 1.2, 20000), [-1.0, 1.0]])
    levels = np.arange(256) / 127.5 - 1.0  # the value each uint8 level decodes to
    nearest = np.abs(x[:, None] - levels[None, :]).argmin(1)  # independent: nearest level
    np.testing.assert_array_equal(to_uint8(x), nearest)
    np.testing.assert_array_equal(to_uint8(torch.from_numpy(x)).numpy(), nearest)
    assert to_uint8(x).dtype == np.uint8 and to_uint8(torch.zeros(1)).dtype == torch.uint8
    # x = 0 lies halfway between levels 127 and 128; DiT's formula rounds the half up.
    assert int(to_uint8(torch.zeros(1))) == 128
    # The flooring variant is biased by half a level; ours is not.
    inside = x[np.abs(x) < 1]
    floored = ((inside + 1) / 2 * 255).astype(np.uint8)
    assert abs(to_uint8(inside).mean() - 127.5 * (inside.mean() + 1)) < 0.05
    assert (127.5 * (inside.mean() + 1) - floored.mean()) == pytest.approx(0.5, abs=0.05)
    with pytest.raises(MetricError, match="quantise exactly once"):
        to_uint8(to_uint8(x))
    with pytest.raises(MetricError, match="NaN"):
        to_uint8(torch.tensor([float("nan")]))


def test_conditional_accuracy():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    assert conditional_accuracy(logits, torch.tensor([0, 1, 0, 0])) == pytest.approx(0.75)
    with pytest.raises(MetricError, match="labels must lie in"):
        conditional_accuracy(logits, torch.tensor([0, 1, 3, 0]))


# ---------------------------------------------------------------------------------------------
# Feature networks


class TinyCNN(nn.Module):
    """Stand-in for the evaluation classifier: uint8 RGB in, `features` (B, 16) and `logits`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.head = nn.Linear(16, 3)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        maps = F.relu(self.conv(images.float() / 127.5 - 1))  # (B, 8, 15, 15)
        return torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)  # (B, 16)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class CountingNetwork(ModuleFeatures):
    """Counts `extract` calls, to see cache hits."""

    calls = 0

    def extract(self, images):
        type(self).calls += 1
        return super().extract(images)


def _images(seed: int, n: int = 40, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def test_embedded_classifier_loads_as_a_feature_network(tmp_path):
    from bench.prepare.embedded import CLASSIFIER_FORMAT, EvalClassifier

    torch.manual_seed(0)
    model = EvalClassifier(num_classes=10, width=4, feature_dim=6).eval()
    atomic_save_safetensors(tmp_path / "model.safetensors", model.state_dict())
    atomic_write_json(tmp_path / "classifier.json",
                      {"format": CLASSIFIER_FORMAT, "config": model.config})
    network = build_feature_network("classifier", classifier_dir=tmp_path)
    images = _images(3, n=4)
    assert network.feature_dim == 6 and network.has_logits
    assert network.weights_sha256 == sha256_file(tmp_path / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(network.extract(images), model.features(images))
        torch.testing.assert_close(network.logits(images), model.logits(images))
    # NHWC input (the ADM .npz layout) gives the same features.
    torch.testing.assert_close(network.extract(images.permute(0, 2, 3, 1).numpy()),
                               network.extract(images))
    with pytest.raises(FileNotFoundError, match="bench prepare"):
        load_classifier_network(tmp_path / "absent")


def test_inception_needs_a_local_safe_weights_file(tmp_path):
    with pytest.raises(FeatureNetworkError, match="eval.inception_weights is not set"):
        build_feature_network("inception")
    with pytest.raises(FeatureNetworkError, match="eval.inception_weights is .*missing.pth does not"):
        InceptionFeatures(tmp_path / "missing.pth")
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"weights": torch.zeros(1), "object": TinyCNN}, unsafe)  # a pickled class
    with pytest.raises(FeatureNetworkError, match="weights_only=True"):
        InceptionFeatures(unsafe)


def test_dinov2_cls_features_from_a_local_file(tmp_path):
    import timm

    tiny = dict(embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(FeatureNetworkError, match="FD-DINOv2 needs a local weights file"):
        DinoV2Features(tmp_path / "missing.safetensors", "vits14", **tiny)
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224,
                            num_classes=0, **tiny).eval()
    weights = tmp_path / "dinov2.safetensors"
    atomic_save_safetensors(weights, vit.state_dict())
    network = DinoV2Features(weights, "vits14", **tiny)
    images = _images(4, n=2)
    # EDM2's torch resize mode written out: resize on 0..255, /255, ImageNet mean/std, CLS token.
    x = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True)
    x = (x / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = vit.forward_features(x)[:, 0]  # forward_features ends with the final norm
    # Same float32 ops on the same weights: bitwise up to kernel choice; 1e-5 absolute.
    torch.testing.assert_close(network.extract(images), expected, atol=1e-5, rtol=1e-5)
    assert network.feature_dim == 32 and network.weights_sha256 == sha256_file(weights)


# ---------------------------------------------------------------------------------------------
# Reference statistics


def test_reference_npz_with_wrong_keys_is_one_clear_error(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, images=np.zeros((2, 8, 8, 3), np.uint8), mu=np.zeros(3))
    with pytest.raises(MetricError, match=r"has keys \['images', 'mu'\]; expected 'arr_0'.*'sigma'"):
        reference_statistics(path, ModuleFeatures(TinyCNN(), "tiny-cnn"), tmp_path)


def test_reference_statistics_cache_size_check_and_content_key(tmp_path):
    network = CountingNetwork(TinyCNN(), "tiny-cnn")
    images = _images(5, n=24)
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=images.permute(0, 2, 3, 1).numpy())  # ADM layout (N, H, W, 3)
    cache = tmp_path / "cache"

    CountingNetwork.calls = 0
    mu, sigma, provenance = reference_statistics(path, network, cache, image_size=32,
                                                 batch_size=10)
    assert not provenance["cache_hit"] and CountingNetwork.calls == 3
    assert provenance["reference_sha256"] == sha256_file(path)
    # The same batches as reference_statistics (float32 conv results depend on the batch size).
    expected_mu, expected_sigma = feature_statistics(extract_features(network, images, 10))
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-10)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-9, atol=1e-12)
    cache_file = cache / os.path.basename(provenance["cache_file"])
    assert cache_file.is_file()
    assert sha256_file(path) in cache_file.name and network.weights_sha256 in cache_file.name
    mtime = cache_file.stat().st_mtime_ns

    CountingNetwork.calls = 0
    mu2, sigma2, provenance2 = reference_statistics(path, network, cache, image_size=32)
    assert provenance2["cache_hit"] and CountingNetwork.calls == 0
    assert cache_file.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)

    with pytest.raises(MetricError, match="32x32 but the samples are 64x64"):
        reference_statistics(path, network, cache, image_size=64)

    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1  # one bit of one pixel
    np.savez(path, arr_0=changed.permute(0, 2, 3, 1).numpy())
    _, _, provenance3 = reference_statistics(path, network, cache)
    assert not provenance3["cache_hit"] and provenance3["cache_file"] != provenance["cache_file"]
    assert len(list(cache.glob("refstats-*.npz"))) == 2
    assert not list(cache.glob(".*tmp-*"))  # atomic writes leave no temporaries

    # Images in memory work too, and are keyed by their content.
    _, _, in_memory = reference_statistics(images, network, cache)
    assert in_memory["reference_source"] == "in-memory images" and not in_memory["cache_hit"]


def test_reference_precomputed_statistics_only_for_inception(tmp_path):
    class FakeInception:  # duck-typed: only id, hash and dimension are needed for stats files
        network_id, weights_sha256, feature_dim = "inception-v3-compat-pool3", "0" * 64, 4

    rng = np.random.default_rng(8)
    path = tmp_path / "VIRTUAL_ref.npz"
    mu, sigma = rng.normal(size=4), np.eye(4) * 2.0
    np.savez(path, mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    got_mu, got_sigma, provenance = reference_statistics(path, FakeInception(), tmp_path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    assert provenance["statistics_source"].startswith("precomputed")
    with pytest.raises(MetricError, match="only precomputed statistics.*needs reference images"):
        reference_statistics(path, ModuleFeatures(TinyCNN(), "tiny-cnn"), tmp_path)
    with pytest.raises(MetricError, match="does not exist"):
        reference_statistics(tmp_path / "absent.npz", FakeInception(), tmp_path)


def test_adm_reference_batch_uses_its_statistics_and_checks_its_image_size(tmp_path):
    """The ADM layout (arr_0 images + mu/sigma + mu_s/sigma_s in one file): the precomputed
    statistics are used for Inception, yet images of another resolution are still refused (read
    from the .npy header only), and the other networks compute statistics from arr_0."""
    class FakeInception:
        network_id, weights_sha256, feature_dim = "inception-v3-compat-pool3", "0" * 64, 4

    rng = np.random.default_rng(9)
    mu, sigma = rng.normal(size=4), np.eye(4) * 3.0
    path = tmp_path / "VIRTUAL_adm.npz"
    np.savez(path, arr_0=_images(10, n=20).permute(0, 2, 3, 1).numpy(), mu=mu, sigma=sigma,
             mu_s=np.zeros(2), sigma_s=np.eye(2))
    got_mu, got_sigma, provenance = reference_statistics(path, FakeInception(), tmp_path,
                                                         image_size=32)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    assert provenance["image_hw"] == (32, 32) and provenance["statistics_source"].startswith("precomputed")
    with pytest.raises(MetricError, match="are 32x32 but the samples are 64x64"):
        reference_statistics(path, FakeInception(), tmp_path, image_size=64)
    # A network other than Inception ignores mu/sigma and uses the images (n = 20 >= D = 16).
    network = ModuleFeatures(TinyCNN(), "tiny-cnn")
    own_mu, _, own = reference_statistics(path, network, tmp_path / "cache", image_size=32)
    assert own["n_reference"] == 20 and own["statistics_source"].startswith("features")
    np.testing.assert_allclose(own_mu, extract_features(network, _images(10, n=20)).mean(0), rtol=1e-9)
