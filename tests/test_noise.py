"""The evaluation-noise split (bench/report/noise.py): its mean squares against scipy's one-way
ANOVA, and its 95% intervals' coverage measured on simulated checkpoints x sampling seeds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from bench.report.noise import split_variance
from bench.report.vocabulary import ReportError


def test_mean_squares_match_scipys_one_way_anova():
    y = np.random.default_rng(3).normal(40.0, 2.0, (5, 4)) + np.arange(5)[:, None]
    split = split_variance(y)
    f = stats.f_oneway(*y).statistic
    assert split.ms_between / split.ms_within == pytest.approx(f, rel=1e-12)
    assert split.sd_within ** 2 == pytest.approx(np.mean(y.var(axis=1, ddof=1)), rel=1e-12)
    assert split.sd_between ** 2 == pytest.approx((split.ms_between - split.ms_within) / 4, rel=1e-12)
    df = 5 * 3  # the within interval is the exact chi-square one
    assert split.sd_within_ci[0] ** 2 == pytest.approx(df * split.ms_within / stats.chi2.ppf(0.975, df), rel=1e-12)
    assert split.sd_total == pytest.approx(np.hypot(split.sd_between, split.sd_within), rel=1e-12)


def test_between_estimate_and_interval_are_truncated_at_zero_not_negative():
    y = np.array([[0.0, 2.0], [2.0, 0.0], [1.0, 1.0]])  # equal means: MS_between = 0 < MS_within
    split = split_variance(y)
    assert split.ms_between == 0.0 and split.sd_between == 0.0
    assert split.sd_between_ci == (0.0, 0.0)  # MLS's upper end is below 0 here: no sqrt of a negative


@pytest.mark.parametrize("sd_between", [0.5, 2.0])
def test_intervals_cover_the_true_deviations_at_their_nominal_level(sd_between):
    # 1,000 simulated 5 x 5 tables: a binomial standard error of 0.007 around 0.95, so [0.93, 0.97]
    # is about three of them. The MLS interval measured 0.945-0.955 over 2,000 tables per setting
    # (sd_between 0.5-2, sd_within 1, 3-5 checkpoints x 4-5 seeds).
    rng = np.random.default_rng(0)
    hits_between = hits_within = 0
    for _ in range(1000):
        split = split_variance(rng.normal(0, sd_between, (5, 1)) + rng.normal(0, 1.0, (5, 5)))
        hits_between += split.sd_between_ci[0] <= sd_between <= split.sd_between_ci[1]
        hits_within += split.sd_within_ci[0] <= 1.0 <= split.sd_within_ci[1]
    assert 0.93 <= hits_between / 1000 <= 0.97
    assert 0.93 <= hits_within / 1000 <= 0.97


def test_a_ragged_or_too_small_table_is_one_clear_error():
    with pytest.raises(ReportError, match="2 checkpoints x 2 sampling seeds"):
        split_variance([[1.0, 2.0]])
    with pytest.raises(ReportError, match=r"got \[3, 2\] seeds per checkpoint"):
        split_variance([[1.0, 2.0, 3.0], [1.0, 2.0]])


def test_crossed_mean_squares_match_statsmodels_two_way_anova():
    import pandas as pd
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    from bench.report.noise import split_crossed

    rng = np.random.default_rng(5)
    y = 36 + rng.normal(0, 1.0, (5, 1)) + rng.normal(0, 0.8, (1, 4)) + rng.normal(0, 0.4, (5, 4))
    frame = pd.DataFrame([(i, j, y[i, j]) for i in range(5) for j in range(4)], columns=["ckpt", "seed", "fd"])
    table = anova_lm(smf.ols("fd ~ C(ckpt) + C(seed)", data=frame).fit())
    ms_rows, ms_cols, ms_res = table["mean_sq"]
    split = split_crossed(y)
    assert split.sd_residual ** 2 == pytest.approx(ms_res, rel=1e-10)
    assert split.sd_checkpoint ** 2 == pytest.approx((ms_rows - ms_res) / 4, rel=1e-10)
    assert split.sd_seed ** 2 == pytest.approx((ms_cols - ms_res) / 5, rel=1e-10)
    assert split.seed_effect_p == pytest.approx(table["PR(>F)"].iloc[1], rel=1e-10)


def test_crossed_intervals_cover_each_component_at_their_nominal_level():
    from bench.report.noise import split_crossed

    # 1,000 simulated 5 checkpoints x 4 shared seeds; bounds as in the one-way test above
    rng = np.random.default_rng(1)
    hits = np.zeros(3)
    for _ in range(1000):
        y = rng.normal(0, 1.0, (5, 1)) + rng.normal(0, 0.7, (1, 4)) + rng.normal(0, 0.5, (5, 4))
        s = split_crossed(y)
        hits += [s.sd_checkpoint_ci[0] <= 1.0 <= s.sd_checkpoint_ci[1], s.sd_seed_ci[0] <= 0.7 <= s.sd_seed_ci[1],
                 s.sd_residual_ci[0] <= 0.5 <= s.sd_residual_ci[1]]
    assert np.all((0.93 <= hits / 1000) & (hits / 1000 <= 0.97)), hits / 1000
