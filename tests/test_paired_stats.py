"""The paired statistics of `bench report`: the paired t-interval and p against scipy on fixed
numbers, Holm's step-down against statsmodels' numbers, the wording rule, the table and the
sentences it licenses on a fixture grid with three paired seeds, and the evaluation-sampling noise
section."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_report import embedded_config, eval_row, write_run

from bench.report.stats import (
    holm_adjust,
    paired_comparisons,
    paired_difference,
    paired_t_p,
    sampling_seed_setting,
    sampling_spread,
    split_sampling_seed_setting,
)
from bench.report.summary import gather, gather_from_csv, summarize
from bench.report.tables import paired_table, render_markdown, sampling_noise_table, write_report
from bench.report.wording import DIRECTION_WORDS, describe_difference, fmt_p

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


def test_report_pairs_by_seed_and_calls_better_only_where_the_holm_adjusted_p_is_below_5pct(paired_report):
    table = paired_table(paired_report).set_index(["method", "baseline"])
    assert set(paired_report.cells["setting"]) == {"no_cfg", "rg"}  # the sampling-seed rows stay apart
    redi = table.loc[[i for i in table.index if i[0].endswith("ReDi") and "REPA" not in i[1]][0]]
    reference = stats.ttest_rel(FD["redi"], FD["latent_only"])
    ci = reference.confidence_interval(0.95)
    assert redi["n_pairs"] == 3 and abs(redi["diff_low"] - ci.low) < TOL and redi["excludes_zero"]
    assert abs(redi["p"] - reference.pvalue) < 1e-12
    # The family: the 5 rows of the table (no_cfg: ReDi, REPA vs latent_only, ReDi vs REPA; rg: RG vs
    # latent_only and vs REPA); Holm by hand on scipy's p.
    p = {"redi-lat": reference.pvalue,
         "repa-lat": stats.ttest_rel(FD["repa"], FD["latent_only"]).pvalue,
         "redi-repa": stats.ttest_rel(FD["redi"], FD["repa"]).pvalue,
         "rg-lat": stats.ttest_rel(RG, FD["latent_only"]).pvalue,
         "rg-repa": stats.ttest_rel(RG, FD["repa"]).pvalue}
    ranked = sorted(p, key=p.get)
    expected, running = {}, 0.0
    for i, key in enumerate(ranked):
        running = max(running, min(1.0, (len(p) - i) * p[key]))
        expected[key] = running
    assert len(table) == 5 and set(table["family_size"]) == {5}
    assert sorted(table["p_holm"]) == pytest.approx(sorted(expected.values()), abs=1e-12)
    # RG - REPA: -5, -3, -5 -> [-7.20, -1.46] excludes 0 uncorrected (p = 0.020) but not after Holm.
    rg_repa = table.loc[[i for i in table.index if "p_drop" in i[0] and "REPA" in i[1]][0]]
    assert rg_repa["excludes_zero"] and rg_repa["p"] < 0.05 and rg_repa["p_holm"] >= 0.05
    assert rg_repa["better"] == "" and not rg_repa["significant"]
    repa = table.loc[[i for i in table.index if i[0].endswith("REPA")][0]]
    assert not repa["excludes_zero"] and repa["better"] == ""
    text = render_markdown(paired_report)
    text = text[text.index("## Paired comparisons"):]  # the speed-up lines above cite these sentences
    assert "t-interval" in text and "✱" in text and "Holm's step-down" in text
    assert "Family: the 5 comparisons of this table" in text
    better = [line for line in text.splitlines() if " is better than " in line]
    assert len(better) == sum(v < 0.05 for v in expected.values()) == 2
    assert better[0].startswith("- `no_cfg`, FD at 1K: SiT-tiny/1 w/ ReDi is better than SiT-tiny/1 (")
    # RG - latent_only (no_cfg): -4, -4, -3.5 -> significant, against the baseline of another setting
    assert better[1].startswith("- `rg`, FD at 1K: SiT-tiny/1 w/ ReDi (p_drop) is better than SiT-tiny/1 "
                                "(setting `no_cfg`) (")
    rg = table.loc[[i for i in table.index if "p_drop" in i[0] and "REPA" not in i[1]][0]]
    ci = stats.ttest_rel(RG, FD["latent_only"]).confidence_interval(0.95)
    assert rg["baseline_setting"] == "no_cfg" and rg["setting"] == "rg" and abs(rg["diff_high"] - ci.high) < TOL
    shown = [line for line in text.splitlines() if "no difference shown (interval [" in line]
    assert len(shown) == 2 and any("w/ ReDi vs SiT-tiny/1 w/ REPA" in line for line in shown)
    corrected = [line for line in text.splitlines() if "no difference shown after the correction for 5" in line]
    assert len(corrected) == 1 and "w/ REPA (setting `no_cfg`)" in corrected[0]


def test_a_report_regenerates_from_its_own_csvs(paired_report, tmp_path):
    # A checked-in report (results/studies/) keeps runs.csv, metrics.csv and evals.csv, not its run
    # folders: `bench report NAME --from-csv DIR` must give the same tables from them.
    write_report(paired_report, tmp_path, plots=False)
    again = summarize(gather_from_csv("mini_fixture", tmp_path, grid=paired_report.gathered.grid))
    first, second = paired_table(paired_report), paired_table(again)
    assert len(first) == 5
    pd.testing.assert_frame_equal(first.reset_index(drop=True), second.reset_index(drop=True), check_dtype=False)
    def without_gather_notes(text: str) -> list[str]:  # what gather() noted about the folders it read
        return [line for line in text.splitlines() if "runs never started are not listed" not in line]
    assert without_gather_notes(render_markdown(again)) == without_gather_notes(render_markdown(paired_report))


def test_report_shows_the_sampling_noise_of_one_checkpoint(paired_report):
    noise = sampling_noise_table(paired_report)
    assert len(noise) == 1 and noise.iloc[0]["n"] == 3
    assert abs(noise.iloc[0]["std"] - np.std([27.0, 27.4, 26.9], ddof=1)) < TOL
    assert "several sampling seeds" in render_markdown(paired_report)


# ------------------------------------------------------------------------------------------------
# Holm's step-down and the wording rule

# statsmodels 0.15.0, `multipletests(p, alpha=0.05, method="holm")[1]`, run once on these inputs
# (statsmodels is not a dependency; the live comparison below runs where it is installed).
HOLM_REFERENCE = [
    ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),
    ([0.028, 0.037, 0.2, 0.6, 0.0011, 0.0011, 0.9], [0.14, 0.148, 0.6000000000000001, 1.0, 0.0077, 0.0077, 1.0]),
    ([0.5, 0.02, 0.02], [0.5, 0.06, 0.06]),
]


@pytest.mark.parametrize("p, adjusted", HOLM_REFERENCE)
def test_holm_equals_statsmodels_multipletests_on_fixed_inputs(p, adjusted):
    assert holm_adjust(p).tolist() == pytest.approx(adjusted, abs=1e-15)


def test_holm_equals_statsmodels_live_where_installed():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(7)
    for m in (1, 2, 5, 20):
        p = rng.uniform(0, 0.2, size=m)
        assert holm_adjust(p) == pytest.approx(multitest.multipletests(p, method="holm")[1], abs=1e-15)


def test_holm_leaves_untested_rows_out_of_the_family():
    # NaN: no p (one pair); the family is the 3 finite ones, as if the NaN were not there
    out = holm_adjust([0.01, math.nan, 0.04, 0.03])
    assert math.isnan(out[1]) and out[[0, 2, 3]].tolist() == pytest.approx([0.03, 0.06, 0.06], abs=1e-15)
    assert holm_adjust([]).size == 0 and np.isnan(holm_adjust([math.nan])).all()


def test_paired_t_p_equals_scipy_ttest_rel():
    method, baseline = [21.3, 25.9, 19.4, 24.0, 22.2], [24.1, 27.5, 23.0, 24.9, 26.3]
    d = paired_difference(dict(enumerate(method)), dict(enumerate(baseline)))
    assert abs(d.p - stats.ttest_rel(method, baseline).pvalue) < 1e-14
    assert paired_t_p([1.0, 1.0, 1.0]) == 0.0 and paired_t_p([0.0, 0.0]) == 1.0
    assert math.isnan(paired_t_p([2.0])) and math.isnan(paired_difference({0: 1.0}, {0: 2.0}).p)


def test_an_interval_containing_zero_never_yields_a_direction_word():
    rng = np.random.default_rng(0)
    for _ in range(500):
        low, high = -rng.uniform(0, 20), rng.uniform(0, 20)
        for p_holm in (1e-6, 0.01, 0.5, math.nan):  # even a (contradictory) small p licenses nothing
            for lower in (True, False):
                text = describe_difference("A", "B", (low + high) / 2, low, high, 5, p_holm=p_holm,
                                           family_size=6, lower_is_better=lower)
                assert f"no difference shown (interval [{low:+.2f}, {high:+.2f}]" in text
                assert not any(word in text for word in DIRECTION_WORDS) and "✱" not in text
    assert "no difference shown (interval [+0.00, +3.00]" in describe_difference("A", "B", 1.5, 0.0, 3.0, 3)


def test_a_direction_only_where_the_corrected_test_licenses_it():
    # excludes 0 uncorrected, not after Holm: still no direction
    text = describe_difference("A", "B", -4.27, -7.88, -0.66, 3, p_holm=0.11, family_size=20)
    assert "no difference shown after the correction for 20 comparisons" in text
    assert not any(word in text for word in DIRECTION_WORDS)
    fd = describe_difference("A", "B", -2.0, -3.0, -1.0, 5, p_holm=0.004, family_size=2)
    assert fd.startswith("A is better than B (interval [-3.00, -1.00]; Holm-adjusted p = 0.004") and fd.endswith("✱")
    acc = describe_difference("A", "B", -0.1, -0.2, -0.05, 5, p_holm=0.01, family_size=2, lower_is_better=False)
    assert acc.startswith("B is better than A") and fmt_p(3e-7) == "<0.0001"
    assert "no interval, no claim" in describe_difference("A", "B", 1.0, math.nan, math.nan, 1)
