"""Which convergence speed-ups `bench report` states (bench/report/speedups.py): a factor, or
"sooner", only where the paired difference at the baseline's step survives the report's Holm
correction and points the factor's way; "no difference shown (interval [a, b])" otherwise; no factor
for a method evaluated at one step. Also: the checked-in study report of the long grid regenerates
from its CSVs with the current code (the refactored summarize, render_markdown and match_paper)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_report import embedded_config, eval_row, write_run

from bench.report.speedups import is_licensed, license_speedup, paired_at
from bench.report.stats import holm_adjust, speedup
from bench.report.summary import gather, gather_from_csv, summarize
from bench.report.tables import paired_table, render_markdown
from bench.report.vocabulary import metric_decimals
from bench.report.wording import DIRECTION_WORDS

TOL = 1e-12
FACTOR = re.compile(r"\d+\.\d+x")  # how a factor is printed: "1.07x"


def difference(mean: float, low: float, high: float, p_holm: float, n: int = 3) -> pd.Series:
    """A row of bench.report.tables.paired_table, as far as the licence reads it."""
    return pd.Series({"diff_mean": mean, "diff_low": low, "diff_high": high, "n_pairs": n,
                      "p_holm": p_holm, "family_size": 6})


SOONER = speedup(pd.Series([50.0, 30.0], index=[500, 1000]), pd.Series([40.0, 20.0], index=[500, 1000]),
                 method_name="M", baseline_name="B", metric="fd_classifier")
NEVER = speedup(pd.Series([50.0, 30.0], index=[500, 1000]), pd.Series([60.0, 40.0], index=[500, 1000]),
                method_name="M", baseline_name="B", metric="fd_classifier")


def test_a_factor_needs_two_steps_and_a_holm_shown_difference_pointing_its_way():
    assert SOONER.reached and SOONER.factor > 1 and not NEVER.reached
    better, worse = difference(-5.0, -7.0, -3.0, 0.01), difference(+5.0, +3.0, +7.0, 0.01)
    assert is_licensed(SOONER, 2, better)
    assert not is_licensed(SOONER, 1, better)                                  # one evaluated step
    assert not is_licensed(SOONER, 2, None)                                    # no seed measured for both
    assert not is_licensed(SOONER, 2, difference(-5.0, -7.0, -3.0, 0.05))      # adjusted p not below 0.05
    assert not is_licensed(SOONER, 2, difference(-5.0, -7.0, -3.0, math.nan))  # one pair: no test
    assert not is_licensed(SOONER, 2, worse)  # means say sooner, the paired test says worse
    assert is_licensed(NEVER, 2, worse) and not is_licensed(NEVER, 2, better)
    # Accuracy: higher is better, so a licensed "sooner" needs a positive difference.
    acc = speedup(pd.Series([0.5, 0.7], index=[500, 1000]), pd.Series([0.6, 0.8], index=[500, 1000]),
                  lower_is_better=False, metric="accuracy")
    assert acc.factor > 1 and is_licensed(acc, 2, worse) and not is_licensed(acc, 2, better)


def test_an_unlicensed_line_says_no_difference_shown_with_its_interval_and_never_sooner():
    rng = np.random.default_rng(3)
    for _ in range(200):
        low, high = -rng.uniform(0, 20), rng.uniform(0, 20)
        for p_holm in (1e-6, 0.3, math.nan):
            line = license_speedup(SOONER, 2, difference((low + high) / 2, low, high, p_holm))
            d = metric_decimals("fd_classifier", (low + high) / 2)  # as the paired sentences print it
            assert not line["licensed"]
            assert f"no difference shown (interval [{low:+.{d}f}, {high:+.{d}f}]" in line["sentence"]
            assert "sooner" not in line["sentence"] and not FACTOR.search(line["sentence"])
            assert "no speed-up factor" in line["sentence"]
            assert not any(w in line["sentence"] for w in DIRECTION_WORDS) and "✱" not in line["sentence"]
    corrected = license_speedup(SOONER, 2, difference(-5.0, -7.0, -3.0, 0.2))["sentence"]
    assert "no difference shown after the correction" in corrected and "sooner" not in corrected
    missing = license_speedup(SOONER, 2, None)
    assert "no paired difference" in missing["sentence"] and math.isnan(missing["diff_mean"])
    licensed = license_speedup(SOONER, 2, difference(-5.0, -7.0, -3.0, 0.01))
    assert licensed["licensed"] and f"{SOONER.factor:.2f}x sooner" in licensed["sentence"]
    assert "M is better than B" in licensed["sentence"] and licensed["sentence"].endswith("✱")


def test_a_method_evaluated_at_one_step_gets_no_factor_even_with_a_shown_difference():
    one = speedup(pd.Series([50.0, 30.0], index=[500, 1000]), pd.Series([20.0], index=[1000]),
                  method_name="M", baseline_name="B", metric="fd_classifier")
    line = license_speedup(one, 1, difference(-10.0, -12.0, -8.0, 0.001))
    assert not line["licensed"] and one.factor == 1.0  # the curve alone would give a bound of 1.00x
    assert line["sentence"].startswith("M vs B's final fd_classifier 30 (at 1K): M evaluated at 1K only "
                                       "(fd_classifier 20), no speed-up factor from a single evaluated step")
    assert "sooner" not in line["sentence"] and not FACTOR.search(line["sentence"])


def test_paired_at_picks_the_row_of_the_step_pair_and_baseline_setting():
    table = pd.DataFrame({"setting": ["rg", "rg", "plain"], "metric": ["fd"] * 3, "step": [600, 300, 600],
                          "method": ["R", "R", "R"], "baseline": ["L", "L", "L"],
                          "baseline_setting": ["plain", "plain", "plain"], "p_holm": [0.1, 0.2, 0.3]})
    assert paired_at(table, "rg", "fd", 600, "R", "L", "plain")["p_holm"] == 0.1
    assert paired_at(table, "rg", "fd", 600, "R", "L", "rg") is None
    assert paired_at(table, "rg", "fd", 1000, "R", "L") is None
    assert paired_at(table.iloc[0:0], "rg", "fd", 600, "R", "L") is None


# ------------------------------------------------------------------------------------------------
# On a report: three paired seeds at two steps. By the seed means, REPA and ReDi both reach
# latent-only's final FD sooner; only ReDi's paired difference at 1K survives Holm.

FD = {"latent_only": ([50.0, 54.0, 48.0], [30.0, 34.0, 28.0]),
      "repa": ([45.0, 52.0, 44.0], [29.0, 35.0, 25.0]),     # at 1K: -1, +1, -3: interval contains 0
      "redi": ([35.0, 39.5, 33.0], [20.0, 24.0, 18.5])}     # at 1K: -10, -10, -9.5


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("speedups")
    for spec, (early, late) in FD.items():
        for seed in range(3):
            write_run(root, embedded_config(spec, seed), [eval_row(500, "fd_classifier", early[seed], seed=seed),
                                                          eval_row(1000, "fd_classifier", late[seed], seed=seed)])
    grid = {"name": "mini_fixture", "specs": list(FD), "eval": {"steps": [500, 1000]}}
    return summarize(gather("mini_fixture", root, grid=grid))


def p_holm_by_hand() -> dict[tuple[str, str, int], float]:
    """scipy's paired t-test p of the report's six comparisons, Holm-adjusted by statsmodels' rule."""
    pairs = [("repa", "latent_only"), ("redi", "latent_only"), ("redi", "repa")]
    keys = [(m, b, step) for m, b in pairs for step in (0, 1)]
    p = [stats.ttest_rel(FD[m][i], FD[b][i]).pvalue for m, b, i in keys]
    return dict(zip(keys, holm_adjust(p)))


def test_the_report_states_a_factor_only_where_the_paired_difference_survives_holm(report):
    holm = p_holm_by_hand()
    rows = {(s["method"].split(" w/ ")[-1], s["baseline"]): s for s in report.speedups}
    repa, redi = rows[("REPA", "SiT-tiny/1")], rows[("ReDi", "SiT-tiny/1")]
    # REPA's means, 47.0 at 500 and 29.67 at 1K, pass latent-only's 30.67: the means alone say sooner.
    assert repa["reached"] and repa["factor"] > 1
    assert repa["p_holm"] == pytest.approx(holm[("repa", "latent_only", 1)], abs=TOL) and not repa["licensed"]
    assert repa["diff_low"] < 0 < repa["diff_high"]
    assert "no difference shown (interval [" in repa["sentence"] and "sooner" not in repa["sentence"]
    # ReDi: means 35.67 at 500 and 20.83 at 1K; target mean(30, 34, 28) = 30.67 at 1K.
    target, f0, f1 = np.mean(FD["latent_only"][1]), np.mean(FD["redi"][0]), np.mean(FD["redi"][1])
    step = math.exp(math.log(500) + (f0 - target) / (f0 - f1) * math.log(2))
    assert redi["p_holm"] == pytest.approx(holm[("redi", "latent_only", 1)], abs=TOL) and redi["p_holm"] < 0.05
    assert redi["licensed"] and redi["factor"] == pytest.approx(1000 / step, rel=TOL)
    assert f"{1000 / step:.2f}x sooner" in redi["sentence"] and redi["sentence"].endswith("✱")
    versus_repa = rows[("ReDi", "SiT-tiny/1 w/ REPA")]
    assert versus_repa["licensed"] == (holm[("redi", "repa", 1)] < 0.05)
    text = render_markdown(report)
    section = text[text.index("## Speed-ups"):text.index("## Paired comparisons")]
    assert section.count("x sooner") == sum(s["licensed"] and s["factor"] > 1 for s in report.speedups)
    assert f"| {1000 / step:.2f}x, at " in section and "| none: not shown by the paired test |" in section
    assert len(paired_table(report)) == 6


def test_speedups_csv_carries_the_licence(report, tmp_path):
    from bench.report.tables import write_report

    out = write_report(report, tmp_path, plots=False)
    table = pd.read_csv(out / "speedups.csv")
    assert {"licensed", "paired_step", "n_pairs", "diff_low", "diff_high", "p_holm", "method_steps"} <= set(table)
    assert table["licensed"].tolist() == [s["licensed"] for s in report.speedups]


def test_the_long_study_report_regenerates_from_its_csvs():
    # The checked-in reports are what the current code makes of their CSVs (results/README.md);
    # the smallest of them is checked here, the others by the command in results/studies/embedded/README.md.
    folder = Path(__file__).parents[1] / "results" / "studies" / "embedded" / "embedded_long"
    again = render_markdown(summarize(gather_from_csv("embedded_long", folder)))
    assert again == (folder / "report.md").read_text(encoding="utf-8")
