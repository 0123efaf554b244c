"""The evaluation noise split into its parts: how much FD moves between checkpoints trained with
different seeds, and how much between samplings of one checkpoint.

Several checkpoints, each scored under the same number of sampling seeds, form a balanced one-way
random-effects layout, y_ij = mu + a_i + e_ij with a_i ~ N(0, sigma_b^2) (checkpoint i) and
e_ij ~ N(0, sigma_w^2) (sampling seed j of checkpoint i). The mean squares give both variances:
sigma_w^2 = MS_within, sigma_b^2 = (MS_between - MS_within) / n. The within interval is the exact
chi-square one; the between interval is the modified large-sample (MLS) interval of Graybill and
Wang (1980), as given by Burdick and Graybill, "Confidence Intervals on Variance Components" (1992),
section 3.3: a difference of two mean squares has no exact interval, and MLS keeps close to its
nominal level even with a handful of groups (tests/test_noise.py measures its coverage).

Where every checkpoint is scored under the SAME sampling seeds (the harness's sampling seed k fixes
the labels and the initial noise for every checkpoint), seeds are a second, crossed factor:
y_ij = mu + a_i + b_j + e_ij, b_j ~ N(0, sigma_s^2) shared by all checkpoints under seed j
(`split_crossed`). A one-way split of such a table counts sigma_s^2 as within-checkpoint noise and
underestimates the between-checkpoint variance by sigma_s^2 / n; and in a paired comparison that
scores both arms under the same seed, the part of b_j both arms share cancels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from bench.report.vocabulary import ReportError


@dataclass(frozen=True)
class VarianceSplit:
    """Standard deviations (not variances) with their 95% intervals; k checkpoints x n seeds."""

    checkpoints: int
    seeds_per_checkpoint: int
    mean: float
    ms_between: float
    ms_within: float
    sd_within: float
    sd_within_ci: tuple[float, float]
    sd_between: float  # 0 where MS_between < MS_within: the estimate is truncated, the interval is not
    sd_between_ci: tuple[float, float]

    @property
    def sd_total(self) -> float:
        """What one value of a fresh checkpoint under a fresh sampling seed spreads by."""
        return math.sqrt(self.sd_between ** 2 + self.sd_within ** 2)


def split_variance(values: Sequence[Sequence[float]], level: float = 0.95) -> VarianceSplit:
    """values[i][j]: checkpoint i under sampling seed j; every row the same length (balanced)."""
    y = _table(values)
    k, n = y.shape
    df_b, df_w = k - 1, k * (n - 1)
    ms_b = n * float(((y.mean(axis=1) - y.mean()) ** 2).sum()) / df_b
    ms_w = float(((y - y.mean(axis=1, keepdims=True)) ** 2).sum()) / df_w
    alpha = 1.0 - level
    within = (df_w * ms_w / stats.chi2.ppf(1 - alpha / 2, df_w), df_w * ms_w / stats.chi2.ppf(alpha / 2, df_w))
    low, high = _mls_interval(ms_b, ms_w, df_b, df_w, n, alpha)
    return VarianceSplit(k, n, float(y.mean()), ms_b, ms_w, math.sqrt(ms_w),
                         (math.sqrt(within[0]), math.sqrt(within[1])),
                         math.sqrt(max(ms_b - ms_w, 0.0) / n), (math.sqrt(low), math.sqrt(high)))


def _table(values: Sequence[Sequence[float]]) -> np.ndarray:
    """values as a (checkpoints, seeds) float64 array, or one clear error."""
    try:
        y = np.asarray(values, dtype=np.float64)
    except ValueError:  # rows of different lengths
        y = np.empty(0)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2:
        raise ReportError(f"the variance split needs at least 2 checkpoints x 2 sampling seeds, every checkpoint "
                          f"under the same number of seeds; got {[len(v) for v in values]} seeds per checkpoint")
    return y


def _mls_interval(s1: float, s2: float, n1: int, n2: int, n: int, alpha: float) -> tuple[float, float]:
    """MLS interval on (s1 - s2) / n, s1 and s2 mean squares with n1 and n2 degrees of freedom
    (Burdick and Graybill 1992, section 3.3); the lower end truncated at 0."""
    def upper(q: float, d1: float, d2: float = math.inf) -> float:  # F quantile with q in its upper tail
        return stats.chi2.ppf(1 - q, d1) / d1 if math.isinf(d2) else stats.f.ppf(1 - q, d1, d2)

    lo_q, hi_q = alpha / 2, 1 - alpha / 2
    g1, h1 = 1 - 1 / upper(lo_q, n1), 1 / upper(hi_q, n1) - 1
    g2, h2 = 1 - 1 / upper(lo_q, n2), 1 / upper(hi_q, n2) - 1
    f_lo, f_hi = upper(lo_q, n1, n2), upper(hi_q, n1, n2)
    g12 = ((f_lo - 1) ** 2 - g1 ** 2 * f_lo ** 2 - h2 ** 2) / f_lo
    h12 = ((1 - f_hi) ** 2 - h1 ** 2 * f_hi ** 2 - g2 ** 2) / f_hi
    v_low = g1 ** 2 * s1 ** 2 + h2 ** 2 * s2 ** 2 + g12 * s1 * s2
    v_high = h1 ** 2 * s1 ** 2 + g2 ** 2 * s2 ** 2 + h12 * s1 * s2
    low = (s1 - s2 - math.sqrt(max(v_low, 0.0))) / n
    high = (s1 - s2 + math.sqrt(max(v_high, 0.0))) / n
    return max(low, 0.0), max(high, 0.0)


@dataclass(frozen=True)
class CrossedSplit:
    """Standard deviations with 95% intervals of a checkpoints x shared-sampling-seeds table."""

    checkpoints: int
    seeds: int
    mean: float
    sd_checkpoint: float
    sd_checkpoint_ci: tuple[float, float]
    sd_seed: float
    """What a sampling seed moves every checkpoint by alike."""
    sd_seed_ci: tuple[float, float]
    sd_residual: float
    """What is left: the sampling noise specific to one checkpoint under one seed."""
    sd_residual_ci: tuple[float, float]
    seed_effect_p: float
    """The two-way ANOVA's F-test of 'no shared seed effect'."""


def split_crossed(values: Sequence[Sequence[float]], level: float = 0.95) -> CrossedSplit:
    """values[i][j]: checkpoint i under sampling seed j, the same seeds j for every checkpoint."""
    y = _table(values)
    k, n = y.shape
    resid = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + y.mean()
    df_rows, df_cols, df_res = k - 1, n - 1, (k - 1) * (n - 1)
    ms_rows = n * float(((y.mean(axis=1) - y.mean()) ** 2).sum()) / df_rows
    ms_cols = k * float(((y.mean(axis=0) - y.mean()) ** 2).sum()) / df_cols
    ms_res = float((resid ** 2).sum()) / df_res
    alpha = 1.0 - level
    res_ci = (df_res * ms_res / stats.chi2.ppf(1 - alpha / 2, df_res),
              df_res * ms_res / stats.chi2.ppf(alpha / 2, df_res))
    rows_ci = _mls_interval(ms_rows, ms_res, df_rows, df_res, n, alpha)
    cols_ci = _mls_interval(ms_cols, ms_res, df_cols, df_res, k, alpha)
    return CrossedSplit(
        k, n, float(y.mean()),
        math.sqrt(max(ms_rows - ms_res, 0.0) / n), (math.sqrt(rows_ci[0]), math.sqrt(rows_ci[1])),
        math.sqrt(max(ms_cols - ms_res, 0.0) / k), (math.sqrt(cols_ci[0]), math.sqrt(cols_ci[1])),
        math.sqrt(ms_res), (math.sqrt(res_ci[0]), math.sqrt(res_ci[1])),
        float(stats.f.sf(ms_cols / ms_res, df_cols, df_res)))
