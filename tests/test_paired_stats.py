"""The paired statistics of `bench report` (issue 18): the paired t-interval against scipy on fixed
numbers, the table and the sentences it licenses on a fixture grid with three paired seeds, and the
evaluation-sampling noise section."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_report import embedded_config, eval_row, write_run

from bench.report.stats import (
    paired_comparisons,
    paired_difference,
    sampling_seed_setting,
    sampling_spread,
    split_sampling_seed_setting,
)
from bench.report.summary import gather, summarize
from bench.report.tables import paired_table, render_markdown, sampling_noise_table

TOL = 1e-12  # float64 rounding of a handful of operations


def test_paired_interval_equals_scipy_ttest_rel_on_fixed_numbers():
    method = {0: 21.3, 1: 25.9, 2: 19.4, 3: 24.0, 4: 22.2}
    baseline = {0: 24.1, 1: 27.5, 2: 23.0, 3: 24.9, 4: 26.3}
    d = paired_difference(method, baseline)
    keys = sorted(method)
    reference = stats.ttest_rel([method[k] for k in keys], [baseline[k] for k in keys])
    ci = reference.confidence_interval(0.95)
    assert d.n == 5 and d.seeds == (0, 1, 2, 3, 4)
    assert abs(d.mean - np.mean([method[k] - baseline[k] for k in keys])) < TOL
    assert abs(d.low - ci.low) < TOL and abs(d.high - ci.high) < TOL
    assert d.excludes_zero and ci.high < 0


def test_paired_interval_uses_only_seeds_both_have_and_needs_two():
    d = paired_difference({0: 10.0, 1: 12.0, 2: 9.0, 5: 1.0}, {0: 11.0, 1: 11.5, 2: 10.0, 7: 3.0})
    ci = stats.ttest_rel([10.0, 12.0, 9.0], [11.0, 11.5, 10.0]).confidence_interval(0.95)
    assert d.seeds == (0, 1, 2) and abs(d.low - ci.low) < TOL and abs(d.high - ci.high) < TOL
    assert not d.excludes_zero  # [-2.6, 1.6]: contains 0
    one = paired_difference({0: 10.0}, {0: 12.0})
    assert one.n == 1 and one.mean == -2.0 and math.isnan(one.half_width) and not one.excludes_zero


def test_pairing_is_narrower_than_unpaired_when_seeds_are_correlated():
    # Seeds differ a lot (seed effect shared by both specs), the method is always 1 lower.
    method, baseline = {0: 19.0, 1: 29.0, 2: 39.5}, {0: 20.0, 1: 30.0, 2: 40.4}
    paired = paired_difference(method, baseline)
    unpaired = stats.ttest_ind(list(method.values()), list(baseline.values())).confidence_interval(0.95)
    assert paired.excludes_zero and unpaired.low < 0 < unpaired.high


def test_comparisons_mark_the_better_spec_by_the_metrics_direction():
    rows = []
    for seed, (a, b, acc_a, acc_b) in enumerate([(10.0, 12.0, 0.5, 0.4), (11.0, 13.5, 0.6, 0.48),
                                                 (10.5, 12.2, 0.55, 0.46)]):
        for cond, fd, acc in (("redi", a, acc_a), ("base", b, acc_b)):
            rows += [{"setting": "s", "metric": "fd_classifier", "step": 100, "provenance": "p",
                      "condition": cond, "seed": seed, "value": fd},
                     {"setting": "s", "metric": "accuracy", "step": 100, "provenance": "p",
                      "condition": cond, "seed": seed, "value": acc}]
    table = paired_comparisons(pd.DataFrame(rows), [("redi", "base")]).set_index("metric")
    assert table.loc["fd_classifier", "better"] == "redi" and table.loc["fd_classifier", "diff_mean"] < 0
    assert table.loc["accuracy", "better"] == "redi" and table.loc["accuracy", "diff_mean"] > 0
    assert table.loc["fd_classifier", "n_pairs"] == 3
    mean, half = table.loc["fd_classifier", ["baseline_mean", "baseline_half_width"]]
    ci = stats.t.interval(0.95, 2, loc=np.mean([12.0, 13.5, 12.2]), scale=stats.sem([12.0, 13.5, 12.2]))
    assert abs(mean - half - ci[0]) < TOL and abs(mean + half - ci[1]) < TOL


def test_sampling_seed_setting_names_round_trip_and_spread():
    assert sampling_seed_setting("no_cfg", 2) == "no_cfg+seed=2"
    assert split_sampling_seed_setting("no_cfg+seed=2") == ("no_cfg", 2)
    assert split_sampling_seed_setting("rg1.5") is None and split_sampling_seed_setting("+seed=1") is None
    spread = sampling_spread([20.0, 21.0, 22.5])
    assert spread["n"] == 3 and abs(spread["std"] - np.std([20.0, 21.0, 22.5], ddof=1)) < TOL
    assert spread["min"] == 20.0 and spread["max"] == 22.5


# ------------------------------------------------------------------------------------------------
# On report folders: three paired seeds of latent_only, redi and repa

FD = {"latent_only": [30.0, 34.0, 28.0], "redi": [27.0, 31.5, 25.0], "repa": [31.0, 33.0, 29.5]}
RG = [26.0, 30.0, 24.5]  # redi_rg sampled with Representation Guidance, setting "rg" only


@pytest.fixture(scope="module")
def paired_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("paired")
    for spec, values in FD.items():
        for seed, value in enumerate(values):
            rows = [eval_row(1000, "fd_classifier", value, seed=seed)]
            if spec == "redi" and seed == 0:  # one checkpoint scored with three sampling seeds
                rows += [eval_row(1000, "fd_classifier", v, seed=k, setting=f"no_cfg+seed={k}",
                                  created_at=f"2025-01-0{k + 2}T00:00:00+00:00")
                         for k, v in enumerate([27.0, 27.4, 26.9])]
            write_run(root, embedded_config(spec, seed), rows)
    for seed, value in enumerate(RG):  # scored only with guidance: compared with latent_only's no_cfg
        write_run(root, embedded_config("redi_rg", seed), [eval_row(1000, "fd_classifier", value, seed=seed,
                                                                   setting="rg")])
    grid = {"name": "mini_fixture", "specs": ["latent_only", "repa", "redi", "redi_rg"],
            "eval": {"steps": [1000], "settings": [{"name": "no_cfg"}, {"name": "rg"}]}}
    return summarize(gather("mini_fixture", root, grid=grid))


def test_report_pairs_by_seed_and_calls_better_only_when_the_interval_excludes_zero(paired_report):
    table = paired_table(paired_report).set_index(["method", "baseline"])
    assert set(paired_report.cells["setting"]) == {"no_cfg", "rg"}  # the sampling-seed rows stay apart
    redi = table.loc[[i for i in table.index if i[0].endswith("ReDi") and "REPA" not in i[1]][0]]
    ci = stats.ttest_rel(FD["redi"], FD["latent_only"]).confidence_interval(0.95)
    assert redi["n_pairs"] == 3 and abs(redi["diff_low"] - ci.low) < TOL and redi["excludes_zero"]
    repa = table.loc[[i for i in table.index if i[0].endswith("REPA")][0]]
    assert not repa["excludes_zero"] and repa["better"] == ""
    text = render_markdown(paired_report)
    assert "t-interval" in text and "✱" in text
    better = [line for line in text.splitlines() if " is better than " in line]
    # ReDi - latent_only: -3, -2.5, -3 -> [-3.55, -2.12]; ReDi - REPA: -4, -1.5, -4.5 -> contains 0.
    # RG - REPA (no_cfg): -5, -3, -5 -> [-7.20, -1.46] excludes 0 as well.
    assert len(better) == 3 and "better than SiT-tiny/1 w/ REPA (setting `no_cfg`) (Δ = -4.33" in better[2]
    assert better[0].startswith("- `no_cfg`, FD at 1K: SiT-tiny/1 w/ ReDi is better than SiT-tiny/1 (")
    # RG - latent_only (no_cfg): -4, -4, -3.5 -> excludes 0, against the baseline of another setting
    assert better[1].startswith("- `rg`, FD at 1K: SiT-tiny/1 w/ ReDi (p_drop) is better than SiT-tiny/1 "
                                "(setting `no_cfg`) (")
    rg = table.loc[[i for i in table.index if "p_drop" in i[0] and "REPA" not in i[1]][0]]
    ci = stats.ttest_rel(RG, FD["latent_only"]).confidence_interval(0.95)
    assert rg["baseline_setting"] == "no_cfg" and rg["setting"] == "rg" and abs(rg["diff_high"] - ci.high) < TOL
    unclear = [line for line in text.splitlines() if "no difference between" in line]
    assert len(unclear) == 2 and any("w/ ReDi and SiT-tiny/1 w/ REPA" in line for line in unclear)


def test_report_shows_the_sampling_noise_of_one_checkpoint(paired_report):
    noise = sampling_noise_table(paired_report)
    assert len(noise) == 1 and noise.iloc[0]["n"] == 3
    assert abs(noise.iloc[0]["std"] - np.std([27.0, 27.4, 26.9], ddof=1)) < TOL
    assert "several sampling seeds" in render_markdown(paired_report)
