"""The one wording of a paired difference that every generated text uses (`bench report`'s
sentences, `bench demo`'s summary).

The rule: a difference whose 95% interval contains 0 is "no difference shown (interval [a, b])",
never a direction ("better", "worse", "beats", "trails", "the same"): such an interval neither
shows an effect nor shows its absence. A direction is named only where the family's correction
licenses it (Holm-adjusted p < alpha, bench.report.stats.holm_family); an interval that excludes 0
before the correction but not after is said to be not shown after the correction. A convergence
speed-up ("N times sooner") is a direction too: `describe_speedup` states its factor only where
bench.report.speedups finds the paired difference behind it licensed, and otherwise says why not.
"""

from __future__ import annotations

import math

from bench.report.stats import ALPHA, SpeedUp
from bench.report.vocabulary import fmt_steps

# Words that state a direction or an equality; `describe_difference` uses none of them unless the
# corrected test licenses a direction (tests/test_paired_stats.py checks it).
DIRECTION_WORDS = ("better", "worse", "beats", "beat", "trails", "behind", "ahead", "the same",
                   "ties", "lower than", "higher than", "outperforms", "falls")


def fmt_p(p: float) -> str:
    """A p-value as the report prints it: 3 significant digits, '<0.0001' below that."""
    if not math.isfinite(p):
        return "–"
    return "<0.0001" if p < 1e-4 else f"{p:.3g}"


def describe_difference(method: str, baseline: str, mean: float, low: float, high: float, n: int, *,
                        p_holm: float = math.nan, family_size: int = 0, lower_is_better: bool = True,
                        decimals: int = 2, alpha: float = ALPHA) -> str:
    """One clause on method − baseline (mean and its 95% interval [low, high] over n paired seeds;
    p_holm: its Holm-adjusted p within a family of `family_size` tests)."""
    d = decimals
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{method} − {baseline} = {mean:+.{d}f} from {n} seed(s): no interval, no claim"
    interval = f"interval [{low:+.{d}f}, {high:+.{d}f}]"
    detail = f"Δ = {mean:+.{d}f}, {n} paired seeds"
    if low <= 0 <= high:
        return f"{method} vs {baseline}: no difference shown ({interval}; {detail})"
    shown = fmt_p(p_holm)
    corrected = f"Holm-adjusted p {shown if shown.startswith('<') else '= ' + shown} over {family_size} comparisons"
    if not (math.isfinite(p_holm) and p_holm < alpha):
        return (f"{method} vs {baseline}: no difference shown after the correction for {family_size} "
                f"comparisons ({interval} excludes 0 uncorrected; {corrected}; {detail})")
    method_better = (mean < 0) == lower_is_better
    better, worse = (method, baseline) if method_better else (baseline, method)
    return f"{better} is better than {worse} ({interval}; {corrected}; {detail}) ✱"


def short_verdict(low: float, high: float, p_holm: float, *, alpha: float = ALPHA) -> str:
    """`describe_difference`'s verdict in a few words, for a table cell."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no interval, no claim"
    if low <= 0 <= high:
        return "no difference shown"
    if not (math.isfinite(p_holm) and p_holm < alpha):
        return "no difference shown after the correction"
    return "shown ✱"

def describe_speedup(result: SpeedUp, difference: str, *, licensed: bool, method_steps: int) -> str:
    """The speed-up line: `result.describe()` (its factor, or "not reached") only where `licensed`;
    otherwise no factor and no "sooner", and why. `difference` is the clause on the paired
    difference at the baseline's step (`describe_difference`'s words), which every line ends with."""
    where = f"at {fmt_steps(result.baseline_step)}: {difference}"
    if licensed:
        return f"{result.describe()}; {where}"
    if method_steps < 2:
        step, value = result.points[-1]
        return (f"{result.head}: {result.method} evaluated at {fmt_steps(step)} only ({result.metric} "
                f"{value:.4g}), no speed-up factor from a single evaluated step; {where}")
    return f"{result.head}: no speed-up factor; {where}"
