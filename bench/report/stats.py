"""Seed statistics and the speed-up of `bench report`.

A cell's seeds give a mean and a two-sided 95% t-interval (`mean_ci95`). The speed-up "reaches the
baseline's final FID N times sooner" (paper Fig. 2; its best FID where the baseline got worse) is
interpolated linearly in log(step) on the method's seed-mean curve (`speedup`); `find_speedups`
pairs every method with its baseline (`speedup_pairs`) and sets the paper's stated factor beside it, as context.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from bench.report.common import BASELINE_SPECS, ReportError, fmt_steps, is_lower_better
from bench.report.groups import CONDITION_INFO


def mean_ci95(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, half-width of the two-sided 95% t-interval (n-1 dof) and n; half-width NaN if n < 2."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, 0
    if x.size == 1:
        return float(x[0]), math.nan, 1
    half = stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half), int(x.size)


@dataclass(frozen=True)
class SpeedUp:
    """How much sooner `method` reaches the baseline's final value (paper Fig. 2, "x23")."""

    method: str
    baseline: str
    metric: str
    target: float                  # the baseline's value at its last evaluated step
    baseline_step: int
    step: float | None             # first (interpolated) step at which the method reaches target
    factor: float | None           # baseline_step / step
    points: tuple[tuple[float, float], ...]  # the (step, value) points used
    note: str
    target_kind: str = "final"     # "best" when the baseline got worse after its best point

    @property
    def reached(self) -> bool:
        return self.step is not None

    def describe(self) -> str:
        """One sentence in the paper's words, with the points used."""
        head = (f"{self.method} vs {self.baseline}'s {self.target_kind} {self.metric} {self.target:.4g} "
                f"(at {fmt_steps(self.baseline_step)})")
        if not self.reached:
            return f"{head}: not reached ({self.note})"
        points = ", ".join(f"{fmt_steps(s)}: {v:.4g}" for s, v in self.points)
        verdict = (f"reached {self.factor:.2f}x sooner" if self.factor > 1 else
                   f"reached, but not sooner (factor {self.factor:.2f})")
        return f"{head}: {verdict}, at {fmt_steps(self.step)} (points {points}; {self.note})"


def speedup(baseline: pd.Series, method: pd.Series, *, lower_is_better: bool = True,
            method_name: str = "method", baseline_name: str = "baseline",
            metric: str = "fid") -> SpeedUp:
    """The speed-up factor as the paper states it, by linear interpolation in log(step).

    `baseline` and `method` map step (> 0) to value, e.g. seed-mean FID. The target is the
    baseline's value at its last step S_b (the paper's curves improve to the end). Where the
    baseline got worse after its best point, the target is that best value and S_b the first step
    that reached it: matching a baseline's worse last value would call a method faster for reaching
    what the baseline had already beaten (docs/method.md, "Speed-up"). The first segment
    (s0, f0) -> (s1, f1) of the method's curve that reaches the target gives
    log s* = log s0 + (f0 - target) / (f0 - f1) * (log s1 - log s0) and the factor S_b / s*. If the first point already reaches it, s* = s0 (a lower bound).
    """
    base, curve = _clean_curve(baseline, "baseline"), _clean_curve(method, "method")
    sign = 1.0 if lower_is_better else -1.0  # reached when sign * value <= sign * target
    best = int(np.argmin(sign * base.to_numpy(np.float64)))  # the first step at the best value
    target, baseline_step = float(base.iloc[best]), int(base.index[best])
    worse_last = sign * float(base.iloc[-1]) > sign * target
    steps, values = curve.index.to_numpy(np.float64), curve.to_numpy(np.float64)
    common = dict(method=method_name, baseline=baseline_name, metric=metric, target=target,
                  baseline_step=baseline_step, target_kind="best" if worse_last else "final")
    got_worse = (f"; the baseline got worse after its best: {float(base.iloc[-1]):.4g} at "
                 f"{fmt_steps(int(base.index[-1]))}") if worse_last else ""
    if sign * values[0] <= sign * target:
        return SpeedUp(**common, step=steps[0], factor=baseline_step / steps[0],
                       points=((steps[0], values[0]),),
                       note="reached at the first evaluated step: the factor is a lower bound" + got_worse)
    for i in range(1, len(steps)):
        if sign * values[i] <= sign * target:
            s0, s1, f0, f1 = steps[i - 1], steps[i], values[i - 1], values[i]
            fraction = (f0 - target) / (f0 - f1)
            step = math.exp(math.log(s0) + fraction * (math.log(s1) - math.log(s0)))
            return SpeedUp(**common, step=step, factor=baseline_step / step,
                           points=((s0, f0), (s1, f1)), note="interpolated in log(step)" + got_worse)
    best = values.min() if lower_is_better else values.max()
    return SpeedUp(**common, step=None, factor=None, points=((steps[-1], values[-1]),),
                   note=f"best {best:.4g} by {fmt_steps(steps[-1])}" + got_worse)


def _clean_curve(curve: pd.Series, name: str) -> pd.Series:
    curve = curve.dropna().sort_index()
    if curve.empty:
        raise ReportError(f"the {name} curve has no measured points")
    if (curve.index.to_numpy(np.float64) <= 0).any():
        raise ReportError(f"the {name} curve has a step <= 0; log-step interpolation needs > 0")
    return curve


def speedup_pairs(conditions: pd.DataFrame, present: Sequence[str],
                  grid: dict) -> list[tuple[str, str, str]]:
    """(method, baseline, baseline spec) condition pairs: every method against the grid's
    `baseline` (default latent_only), and the methods beyond REPA (ReDi, REPA + ReDi: x6, x11)
    against repa. A method is paired with the baseline condition of equal axis values, or with
    the only baseline condition there is.
    """
    axes = [c for c in conditions.columns if c not in CONDITION_INFO]
    spec = dict(zip(conditions["condition"], conditions["spec"]))
    where = {r["condition"]: tuple(str(r[a]) for a in axes) for _, r in conditions.iterrows()}
    # The grid's baseline first; REPA too when present (Fig. 2 right measures x6, x11 against it).
    first = grid.get("baseline") or BASELINE_SPECS[0]
    baselines = [first, *(b for b in BASELINE_SPECS if b != first)]
    pairs = []
    for index, base_spec in enumerate(baselines):
        bases = [c for c in present if spec[c] == base_spec]
        slower = {*baselines[: index + 1], *(("latent_only",) if base_spec == "repa" else ())}
        for method in (c for c in present if spec[c] not in slower):
            match = bases if len(bases) == 1 else [b for b in bases if where[b] == where[method]]
            if len(match) == 1:
                pairs.append((method, match[0], base_spec))
    return pairs


def find_speedups(cells: pd.DataFrame, conditions: pd.DataFrame, metric: str, grid: dict,
                  final: dict[str, int | None] | None = None) -> list[dict]:
    """Speed-ups (`speedup`) on the seed-mean curves of the main provenance group, per setting,
    with the paper's stated factor for the same method/baseline pair beside (as context)."""
    from bench.report.published import PaperNumbersError, load_convergence_claims

    try:
        claims = load_convergence_claims()
    except PaperNumbersError:
        claims = pd.DataFrame(columns=["claim", "method", "baseline_method", "model"])
    main = cells[(cells["metric"] == metric) & (cells["group"] == 0) & (cells["n_seeds"] > 0)]
    spec = dict(zip(conditions["condition"], conditions["spec"]))
    family = {c: str(m).split("-")[0] for c, m in zip(conditions["condition"], conditions["model"])}
    out = []
    for setting, part in main.groupby("setting", sort=True):
        curves = {c: part[part["condition"] == c].set_index("step")["mean"].sort_index()
                  for c in conditions["condition"] if (part["condition"] == c).any()}
        for method, base, base_spec in speedup_pairs(conditions, list(curves), grid):
            result = speedup(curves[base], curves[method], method_name=method, baseline_name=base,
                             metric=metric, lower_is_better=is_lower_better(metric))
            last_step = (final or {}).get(base)
            if last_step and result.baseline_step < last_step:
                result = dataclasses.replace(result, note=f"{result.note}; provisional: the "
                                             f"baseline is evaluated only up to "
                                             f"{fmt_steps(result.baseline_step)}")
            claim = claims[(claims["method"] == spec[method])
                           & (claims["baseline_method"] == base_spec)
                           & claims["model"].str.startswith(family[method])]
            out.append({"setting": setting, "metric": metric, "method": method, "baseline": base,
                        "baseline_final_step": result.baseline_step, "target": result.target,
                        "reached": result.reached, "step": result.step, "factor": result.factor,
                        "points": json.dumps([[float(a), float(b)] for a, b in result.points]),
                        "note": result.note, "sentence": result.describe(),
                        "paper_claim": "; ".join(f"x{r.speedup_stated:g} ({r.model}, {r.claim})"
                                                 for r in claim.itertuples())})
    return out
