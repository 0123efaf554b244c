"""Streaming float64 PCA (bench.prepare.pca) against one-shot references: numpy eigh and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.prepare.pca import PCAError, PCAModel, PCAStats, import_official_pca


def _data(n: int = 4000, d: int = 12, seed: int = 0) -> np.ndarray:
    """Correlated features with non-zero means and very different scales (tests standardisation)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    scales = np.geomspace(0.05, 20.0, d)
    return (rng.normal(size=(n, d)) @ mixing) * scales + rng.normal(scale=5.0, size=d)


def _reference(x: np.ndarray):
    """One-shot float64: population std (np.std, as calc_pca.py), covariance with n-1 (sklearn)."""
    mean, std = x.mean(axis=0), x.std(axis=0)
    y = (x - mean) / std
    values, vectors = np.linalg.eigh(np.cov(y, rowvar=False))
    order = np.argsort(values)[::-1]
    return mean, std, values[order], vectors[:, order].T


def _stream(x: np.ndarray, cuts) -> PCAStats:
    stats = PCAStats(x.shape[1])
    for start, stop in zip(cuts[:-1], cuts[1:]):
        stats.update(torch.from_numpy(x[start:stop]))
    return stats


def test_streaming_equals_one_shot_float64():
    x = _data()
    model = _stream(x, [0, 7, 1000, 1001, 2500, len(x)]).finalize("enc")
    mean, std, values, vectors = _reference(x)
    # float64 sums vs float64 two-pass: agreement to ~1e-12 is expected; 1e-9 leaves margin for
    # the one-pass cancellation (Q - n m m^T) at means ~5 and stds down to 0.05.
    np.testing.assert_allclose(model.mean.numpy(), mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.std.numpy(), std, rtol=1e-9)
    np.testing.assert_allclose(model.eigenvalues.numpy(), values, rtol=1e-9)
    # Subspace match: each component equals the reference up to sign (distinct eigenvalues).
    cos = np.abs(np.sum(model.components.numpy() * vectors, axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-9)
    # The PCA mean is the mean of the standardised features: zero here (exactly).
    assert float(model.pca_mean.abs().max()) == 0.0


def test_merge_is_independent_of_how_data_was_split():
    x = _data(seed=1)
    one_pass = _stream(x, [0, len(x)]).finalize("enc")
    shards = [_stream(x[a:b], [0, b - a]) for a, b in [(0, 1234), (1234, 1300), (1300, len(x))]]
    merged = PCAStats(x.shape[1])
    for shard in shards:
        merged.merge(PCAStats.from_tensors(shard.to_tensors()))  # through the stored form too
    merged_model = merged.finalize("enc")
    assert merged.count == len(x)
    # Only float64 summation order differs: 1e-10 relative is ~1e5 ulps of margin.
    np.testing.assert_allclose(merged_model.eigenvalues.numpy(), one_pass.eigenvalues.numpy(),
                               rtol=1e-10)
    np.testing.assert_allclose(merged_model.components.numpy(), one_pass.components.numpy(),
                               atol=1e-9)  # same sign convention, so equal, not just up to sign


def test_matches_sklearn_pca_and_official_projection():
    from sklearn.decomposition import PCA

    x = _data(seed=2)
    model = _stream(x, [0, 999, len(x)]).finalize("enc")
    mean, std = x.mean(axis=0), x.std(axis=0)
    sk = PCA(n_components=x.shape[1], svd_solver="full").fit((x - mean) / std)
    np.testing.assert_allclose(model.eigenvalues.numpy(), sk.explained_variance_, rtol=1e-9)
    rank = 5
    ours = model.project(torch.from_numpy(x[:50]), rank).numpy()
    theirs = sk.transform(((x - mean) / std)[:50])[:, :rank]
    signs = np.sign(np.sum(ours * theirs, axis=0))  # components are defined up to sign
    np.testing.assert_allclose(ours, theirs * signs, atol=1e-8)


def test_whitening_gives_unit_variance_and_rank_bounds():
    x = _data(seed=3)
    model = _stream(x, [0, len(x)]).finalize("enc")
    coords = model.project(torch.from_numpy(x), 6, whiten=True)
    # Whitened training coordinates have variance exactly 1 (n-1 normalisation, as the eigenvalues).
    np.testing.assert_allclose(coords.var(dim=0, unbiased=True).numpy(), 1.0, rtol=1e-9)
    raw = model.project(torch.from_numpy(x), 6)
    np.testing.assert_allclose(raw.var(dim=0).numpy(), model.eigenvalues[:6].numpy(), rtol=1e-9)
    with pytest.raises(PCAError, match="rank"):
        model.project(torch.from_numpy(x), 13)
    with pytest.raises(PCAError, match="dimension"):
        model.project(torch.zeros(3, 7), 2)
    maps = model.project_map(torch.from_numpy(x[:8].T.reshape(1, 12, 2, 4).copy()), 3)
    tokens = model.project(torch.from_numpy(x[:8]), 3)  # token k of the map is pixel (k//4, k%4)
    np.testing.assert_allclose(maps[0].reshape(3, 8).T.numpy(), tokens.numpy(), atol=1e-12)


def test_save_load_roundtrip_and_mismatch(tmp_path):
    x = _data(seed=4)
    model = _stream(x, [0, len(x)]).finalize("encoder-a", num_images=17)
    model.save(tmp_path / "pca.safetensors")
    loaded = PCAModel.load(tmp_path / "pca.safetensors", encoder_id="encoder-a", dim=12)
    for name in ("mean", "std", "pca_mean", "components", "eigenvalues"):
        assert torch.equal(getattr(model, name), getattr(loaded, name)), name
    assert (loaded.count, loaded.num_images, loaded.encoder_id) == (len(x), 17, "encoder-a")
    with pytest.raises(PCAError, match="fitted on encoder 'encoder-a'"):
        PCAModel.load(tmp_path / "pca.safetensors", encoder_id="encoder-b")
    with pytest.raises(PCAError, match="dimension 12"):
        PCAModel.load(tmp_path / "pca.safetensors", dim=80)
    with pytest.raises(PCAError, match="not found"):
        PCAModel.load(tmp_path / "missing.safetensors")


def test_constant_dimension_stays_finite():
    x = _data(n=500, d=6, seed=5)
    x[:, 2] = 3.0
    model = _stream(x, [0, len(x)]).finalize("enc")
    assert float(model.std[2]) == 1.0  # zero variance -> std 1, as sklearn's StandardScaler
    assert torch.isfinite(model.project(torch.from_numpy(x), 6)).all()
    with pytest.raises(PCAError, match="shape"):
        PCAStats(6).update(torch.zeros(4, 5))


def test_official_pickle_needs_trust_and_converts(tmp_path):
    from sklearn.decomposition import PCA

    x = _data(n=800, d=10, seed=6).astype(np.float32)
    mean, std = np.mean(x, axis=0), np.std(x, axis=0)  # as calc_pca.py (float32 numpy)
    sk = PCA(n_components=10).fit((x - mean) / std)
    path = tmp_path / "dino_pca_model.pth"
    torch.save({"pca_model": sk, "mean": mean, "std": std}, path)
    with pytest.raises(PCAError, match="trust_pickle"):
        import_official_pca(path, "dinov2")
    model = import_official_pca(path, "dinov2", trust_pickle=True)
    model.save(tmp_path / "converted.safetensors")
    converted = PCAModel.load(tmp_path / "converted.safetensors", encoder_id="dinov2")
    # The official train_redi.py pipeline, written out with numpy on the sklearn attributes.
    z = (x[:20].astype(np.float64) - mean) / std - sk.mean_
    expected = z @ sk.components_[:4].T
    # 1e-6: mean/std are float32 in the file; the projection itself is float64.
    np.testing.assert_allclose(converted.project(torch.from_numpy(x[:20]).double(), 4).numpy(),
                               expected, atol=1e-6)
