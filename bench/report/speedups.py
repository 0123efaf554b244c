"""Which convergence speed-ups a report states.

A speed-up ("reaches the baseline's final FD N times sooner", bench.report.stats.speedup) is read
off seed-mean curves, and two means can differ by seed noise alone. So a report states a factor
(or "not reached") only where the paired difference method − baseline at the step it is measured
against (the baseline's final step, or its best) is shown after the report's Holm correction and
points the same way: the method better where the factor says sooner, worse where it says not
sooner or not reached. A method evaluated at one step gets no factor: one point says where its
curve stands, not when it got there. Every other line says, in bench.report.wording's words, that
no difference is shown (with the interval) or why there is none to show.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from bench.report.stats import ALPHA, SpeedUp
from bench.report.vocabulary import fmt_steps, is_lower_better, metric_decimals
from bench.report.wording import describe_difference, describe_speedup, fmt_p, short_verdict


def paired_at(paired: pd.DataFrame, setting: str, metric: str, step: int, method: str, baseline: str,
              baseline_setting: str | None = None) -> pd.Series | None:
    """The row of `paired` (bench.report.tables.paired_table) for method − baseline at `step`, or
    None where no seed was measured for both there. `baseline_setting`: the setting the baseline
    was scored in, where it is not `setting` (a guided method against the unguided baseline)."""
    if paired.empty:
        return None
    hit = paired[(paired["setting"] == setting) & (paired["metric"] == metric) & (paired["step"] == step)
                 & (paired["method"] == method) & (paired["baseline"] == baseline)]
    if baseline_setting is not None and "baseline_setting" in hit:
        hit = hit[hit["baseline_setting"] == baseline_setting]
    return hit.iloc[0] if len(hit) == 1 else None


def is_licensed(result: SpeedUp, method_steps: int, difference: pd.Series | None,
                alpha: float = ALPHA) -> bool:
    """True where the report may state `result`'s factor: two evaluated steps or more, and a paired
    difference at the baseline's step whose 95% interval excludes 0 and whose Holm-adjusted p < alpha
    (bench.report.wording's rule for naming a direction) points the factor's way."""
    if method_steps < 2 or difference is None or not (difference["p_holm"] < alpha):
        return False
    if not difference["diff_low"] > 0 and not difference["diff_high"] < 0:
        return False  # an interval containing 0 (or none) shows no direction, whatever the p says
    method_better = (difference["diff_mean"] < 0) == is_lower_better(result.metric)
    sooner = result.reached and result.factor > 1
    return bool(method_better == sooner)


def license_speedup(result: SpeedUp, method_steps: int, difference: pd.Series | None) -> dict:
    """`result` with whether its factor may be stated, the paired difference behind it and the
    sentence to print (bench.report.wording.describe_speedup)."""
    licensed = is_licensed(result, method_steps, difference)
    if difference is None:
        clause = f"{result.method} vs {result.baseline}: no paired difference (no seed measured for both)"
        numbers = {"n_pairs": 0, "diff_mean": math.nan, "diff_low": math.nan, "diff_high": math.nan,
                   "p_holm": math.nan}
    else:
        d = difference
        clause = describe_difference(result.method, result.baseline, d["diff_mean"], d["diff_low"],
                                     d["diff_high"], int(d["n_pairs"]), p_holm=d["p_holm"],
                                     family_size=int(d["family_size"]),
                                     lower_is_better=is_lower_better(result.metric),
                                     decimals=metric_decimals(result.metric, d["diff_mean"]))
        numbers = {k: d[k] for k in ("n_pairs", "diff_mean", "diff_low", "diff_high", "p_holm")}
    sentence = describe_speedup(result, clause, licensed=licensed, method_steps=method_steps)
    return {"licensed": licensed, "paired_step": result.baseline_step, **numbers, "sentence": sentence}


def license_speedups(speedups: list[dict], paired: pd.DataFrame) -> list[dict]:
    """The records of bench.report.stats.find_speedups, each with `license_speedup`'s fields (its
    `sentence` replaced by the licensed one)."""
    out = []
    for s in speedups:
        result = SpeedUp(method=s["method"], baseline=s["baseline"], metric=s["metric"],
                         target=s["target"], baseline_step=s["baseline_final_step"], step=s["step"],
                         factor=s["factor"], points=tuple(tuple(p) for p in json.loads(s["points"])),
                         note=s["note"], target_kind=s["target_kind"])
        difference = paired_at(paired, s["setting"], s["metric"], result.baseline_step, s["method"],
                               s["baseline"], baseline_setting=s["setting"])
        out.append({**s, **license_speedup(result, s["method_steps"], difference)})
    return out


def speedup_cell(s: dict) -> str:
    """The report table's speed-up cell of a licensed record: the factor, "not reached", or why none."""
    if s["licensed"]:
        return f"{s['factor']:.2f}x, at {fmt_steps(s['step'])}" if s["reached"] else \
            f"not reached (by {fmt_steps(json.loads(s['points'])[-1][0])})"
    if s["method_steps"] < 2:
        return "none: one evaluated step"
    return "none: no paired difference" if s["n_pairs"] == 0 else "none: not shown by the paired test"


def paired_cell(s: dict) -> str:
    """The report table's cell on the paired difference behind a speed-up, with its verdict."""
    if s["n_pairs"] == 0:
        return "no seed measured for both"
    d = metric_decimals(s["metric"], s["diff_mean"])
    verdict = short_verdict(s["diff_low"], s["diff_high"], s["p_holm"])
    if not np.isfinite(s["diff_low"]):
        return f"{s['diff_mean']:+.{d}f} from {s['n_pairs']} pair: {verdict}"
    return (f"{s['diff_mean']:+.{d}f} [{s['diff_low']:+.{d}f}, {s['diff_high']:+.{d}f}], "
            f"Holm-adjusted p {fmt_p(s['p_holm'])}: {verdict}")
