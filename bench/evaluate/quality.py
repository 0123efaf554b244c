"""Sample-quality metrics: quantisation, feature statistics, Frechet distance, KID, conditional
accuracy and three interchangeable backends.

Numerics (reference section 4.6). Statistics are float64 (EDM2 accumulates in float64). The Frechet
distance takes the trace of sqrt(S1 S2) from the eigenvalues of the symmetric PSD matrix
sqrt(S1) S2 sqrt(S1), which has the same spectrum as S1 S2, instead of `scipy.linalg.sqrtm` of the
non-symmetric product (which returns complex or non-finite values when the covariances are
near-singular, scipy#19415). Fewer samples than feature dimensions give a rank-deficient covariance
and a meaningless distance (TTUR#4); that is refused unless `allow_rank_deficient=True`.

Feature networks and reference statistics (which need them) live in `bench.evaluate.features`.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


class MetricError(ValueError):
    """Bad input to a metric: too few samples, wrong reference file, mismatched sizes."""


def as_float64(array: ArrayLike) -> np.ndarray:
    """numpy float64 copy/view of a numpy array or torch tensor."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Quantisation


def to_uint8(images: ArrayLike) -> ArrayLike:
    """Quantise samples in [-1, 1] to uint8 exactly once, the DiT/SiT/ReDi way.

    `clamp(127.5 x + 128, 0, 255)` then truncation: truncating `127.5 (x + 1) + 0.5` rounds
    `127.5 (x + 1)` to the nearest level. The common `((x + 1) / 2 * 255).to(uint8)` floors instead
    and shifts every pixel down by half a level on average (imeanflow#5). Integer input is refused:
    quantising twice, or feeding already-quantised images, is a bug. Layout and type (numpy or
    torch) are kept.
    """
    is_torch = isinstance(images, torch.Tensor)
    floating = images.is_floating_point() if is_torch else np.issubdtype(images.dtype, np.floating)
    if not floating:
        raise MetricError(f"to_uint8 takes float samples in [-1, 1]; got dtype {images.dtype} "
                          "(already quantised? quantise exactly once)")
    finite = bool(torch.isfinite(images).all()) if is_torch else bool(np.isfinite(images).all())
    if not finite:
        raise MetricError("to_uint8: samples contain NaN or inf; the sampler diverged")
    if is_torch:
        return (127.5 * images + 128.0).clamp(0, 255).to(torch.uint8)
    return np.clip(127.5 * images + 128.0, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Feature statistics


def check_sample_count(n: int, dim: int, allow_rank_deficient: bool, what: str) -> None:
    """Refuse n < 2, and n < dim unless `allow_rank_deficient` (rank-deficient covariance)."""
    if n < 2:
        raise MetricError(f"{what}: {n} sample(s); a covariance needs at least 2")
    if n < dim and not allow_rank_deficient:
        raise MetricError(
            f"{what}: {n} samples < {dim} feature dimensions, so the covariance is rank-deficient "
            "and the Frechet distance is dominated by estimation error (TTUR#4). Use at least "
            f"{dim} samples, or pass allow_rank_deficient=True to accept it")


class FeatureStatistics:
    """Streaming, mergeable float64 accumulator: count, sum and sum of outer products.

    Sums (not running means) so that shards from several processes or ranks merge by addition
    (`merge`, or an all-reduce of `as_arrays()`). The covariance is `(S - n mu mu^T) / (n - 1)`,
    the unbiased estimate that `np.cov` gives.
    """

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.count = 0
        self.sum = np.zeros(self.dim)
        self.sum_outer = np.zeros((self.dim, self.dim))

    def update(self, features: ArrayLike) -> "FeatureStatistics":
        """Add a batch `(B, dim)`."""
        x = as_float64(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise MetricError(f"features must be (B, {self.dim}); got {x.shape}")
        self.count += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x
        return self

    def merge(self, other: "FeatureStatistics") -> "FeatureStatistics":
        """Add another accumulator's samples (in place)."""
        if other.dim != self.dim:
            raise MetricError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        self.count += other.count
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {"count": np.array(self.count), "sum": self.sum, "sum_outer": self.sum_outer}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "FeatureStatistics":
        stats = cls(len(arrays["sum"]))
        stats.count = int(arrays["count"])
        stats.sum, stats.sum_outer = as_float64(arrays["sum"]), as_float64(arrays["sum_outer"])
        return stats

    def finalize(self, allow_rank_deficient: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`(mu (D,), sigma (D, D))` in float64."""
        check_sample_count(self.count, self.dim, allow_rank_deficient, "feature statistics")
        mu = self.sum / self.count
        sigma = (self.sum_outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (sigma + sigma.T) / 2


def feature_statistics(features: ArrayLike, allow_rank_deficient: bool = False
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of features `(N, D)`, float64 (centred first, as np.cov)."""
    x = as_float64(features)
    if x.ndim != 2:
        raise MetricError(f"features must be (N, D); got shape {x.shape}")
    check_sample_count(x.shape[0], x.shape[1], allow_rank_deficient, "feature statistics")
    mu = x.mean(axis=0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


# ---------------------------------------------------------------------------------------------
# Frechet distance and KID


def _psd_eigh(sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric PSD matrix with rounding negatives clamped to 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    scale = max(float(np.abs(w).max()), np.finfo(np.float64).tiny)
    # A true covariance rounded to float32 (stored statistics) can show eigenvalues down to about
    # -D * 6e-8 * |S|; anything below -1e-4 |S| is not a covariance matrix at all.
    if w.min() < -1e-4 * scale:
        raise MetricError(f"{name} is not positive semi-definite (eigenvalue {w.min():.3g}, "
                          f"largest {scale:.3g}); pass a covariance matrix")
    return np.clip(w, 0.0, None), v


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), in float64.

    tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))): a symmetric PSD matrix similar to S1 S2,
    so `eigvalsh` applies, and clamping its tiny negative rounding eigenvalues keeps the result real.
    """
    mu1, mu2, sigma1, sigma2 = map(as_float64, (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise MetricError(f"frechet_distance needs mu (D,) and sigma (D, D) for both sides; got "
                          f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise MetricError("frechet_distance: statistics contain NaN or inf")
    w1, v1 = _psd_eigh(sigma1, "sigma1")
    w2, _ = _psd_eigh(sigma2, "sigma2")  # only checked: S2 must be PSD for the identity to hold
    sqrt_sigma1 = (v1 * np.sqrt(w1)) @ v1.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    # A squared distance: a negative value is rounding of order eps * (tr S1 + tr S2).
    return max(value, 0.0)


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3 (KID: degree 3, gamma 1/d, coef 1)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """MMD^2 of Binkowski et al.: diagonals dropped within sets, all m^2 cross pairs kept."""
    m = x.shape[0]
    kxx, kyy, kxy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def _check_kid_inputs(f1: np.ndarray, f2: np.ndarray, subsets: int, subset_size: int) -> None:
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise MetricError(f"KID needs features (N1, D) and (N2, D); got {f1.shape}, {f2.shape}")
    if subsets < 1 or subset_size < 2 or subset_size > min(len(f1), len(f2)):
        raise MetricError(f"KID subset_size={subset_size} must lie in [2, min(N1, N2)="
                          f"{min(len(f1), len(f2))}] and subsets={subsets} >= 1")


def kernel_inception_distance(features1: ArrayLike, features2: ArrayLike, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 2020) -> tuple[float, float]:
    """KID: mean and std (ddof 0) over `subsets` of the unbiased MMD^2 between random subsets of
    `subset_size` from each side, float64. Subsets are drawn as torch-fidelity draws them
    (`RandomState(seed)`, side 1 then side 2, without replacement), so the same seed gives the same
    value as torch-fidelity."""
    f1, f2 = as_float64(features1), as_float64(features2)
    _check_kid_inputs(f1, f2, subsets, subset_size)
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), subset_size, replace=False)]
        y = f2[rng.choice(len(f2), subset_size, replace=False)]
        values.append(_mmd2_unbiased(x, y))
    return float(np.mean(values)), float(np.std(values))


def conditional_accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of class-conditional samples whose classifier argmax equals the requested label."""
    logits_np, labels_np = as_float64(logits), np.asarray(as_float64(labels), dtype=np.int64)
    if logits_np.ndim != 2 or labels_np.shape != (logits_np.shape[0],) or len(labels_np) == 0:
        raise MetricError(f"conditional_accuracy needs logits (N, K) and labels (N,), N > 0; got "
                          f"{logits_np.shape} and {labels_np.shape}")
    if labels_np.min() < 0 or labels_np.max() >= logits_np.shape[1]:
        raise MetricError(f"labels must lie in [0, {logits_np.shape[1]}); got "
                          f"[{labels_np.min()}, {labels_np.max()}] (unconditional null class?)")
    return float((logits_np.argmax(axis=1) == labels_np).mean())


# ---------------------------------------------------------------------------------------------
# Backends: the same metrics through torch-fidelity or clean-fid, for cross-checks and provenance


def package_version(name: str) -> str:
    """The installed version of a distribution, or 'unknown'."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


class MetricBackend:
    """One interface over the three implementations: statistics, FD and KID on our features."""

    name = "native"
    package = "redi-bench"

    @property
    def version(self) -> str:
        return package_version(self.package)

    def statistics(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return feature_statistics(features, allow_rank_deficient=True)

    def frechet_distance(self, mu1, sigma1, mu2, sigma2) -> float:
        return frechet_distance(mu1, sigma1, mu2, sigma2)

    def kid(self, features1, features2, subsets: int, subset_size: int,
            seed: int) -> tuple[float, float]:
        return kernel_inception_distance(features1, features2, subsets, subset_size, seed)


class TorchFidelityBackend(MetricBackend):
    """torch-fidelity's TTUR-derived functions: eigvals of the non-symmetric S1 S2."""

    name = "torch-fidelity"
    package = "torch-fidelity"

    def statistics(self, features):
        from torch_fidelity.metric_fid import fid_features_to_statistics

        stats = fid_features_to_statistics(torch.from_numpy(as_float64(features)))
        return stats["mu"], stats["sigma"]

    def frechet_distance(self, mu1, sigma1, mu2, sigma2) -> float:
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

        stat1 = {"mu": as_float64(mu1), "sigma": as_float64(sigma1)}
        stat2 = {"mu": as_float64(mu2), "sigma": as_float64(sigma2)}
        return float(fid_statistics_to_metric(stat1, stat2, verbose=False)[KEY_METRIC_FID])

    def kid(self, features1, features2, subsets, subset_size, seed):
        from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

        f1, f2 = as_float64(features1), as_float64(features2)
        _check_kid_inputs(f1, f2, subsets, subset_size)
        out = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2),
                                     kid_subsets=subsets, kid_subset_size=subset_size,
                                     rng_seed=seed, verbose=False)
        return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


class CleanFidBackend(MetricBackend):
    """clean-fid: `scipy.linalg.sqrtm` of S1 S2 (eps-offset retry); KID from the global numpy RNG."""

    name = "clean-fid"
    package = "clean-fid"

    def statistics(self, features):
        f = as_float64(features)  # as cleanfid.fid.fid_from_feats computes them
        return np.mean(f, axis=0), np.cov(f, rowvar=False)

    def frechet_distance(self, mu1, sigma1, mu2, sigma2) -> float:
        from cleanfid.fid import frechet_distance as clean_frechet_distance

        # It prints when it adds its eps offset; scipy >= 1.16 deprecates its `disp` argument.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return float(clean_frechet_distance(*map(as_float64, (mu1, sigma1, mu2, sigma2))))

    def kid(self, features1, features2, subsets, subset_size, seed):
        from cleanfid.fid import kernel_distance

        f1, f2 = as_float64(features1), as_float64(features2)
        _check_kid_inputs(f1, f2, subsets, subset_size)
        # clean-fid draws from the global numpy RNG and returns only the mean; seed it, take one
        # subset per call to get the spread, and restore the caller's RNG state afterwards.
        state = np.random.get_state()
        try:
            np.random.seed(seed)
            values = [kernel_distance(f1, f2, num_subsets=1, max_subset_size=subset_size)
                      for _ in range(subsets)]
        finally:
            np.random.set_state(state)
        return float(np.mean(values)), float(np.std(values))


BACKENDS = {"native": MetricBackend, "torch-fidelity": TorchFidelityBackend,
            "clean-fid": CleanFidBackend}


def get_backend(name: str = "native") -> MetricBackend:
    """`native` (ours, eigen-based), `torch-fidelity` or `clean-fid`."""
    if name not in BACKENDS:
        raise MetricError(f"metric backend {name!r} is unknown; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]()
