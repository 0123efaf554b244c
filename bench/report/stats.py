"""Seed statistics and the speed-up of `bench report`.

A cell's seeds give a mean and a two-sided 95% t-interval (`mean_ci95`). The speed-up "reaches the
baseline's final FID N times sooner" (paper Fig. 2; its best FID where the baseline got worse) is
interpolated linearly in log(step) on the method's seed-mean curve (`speedup`); `find_speedups`
pairs every method with its baseline (`speedup_pairs`) and sets the paper's stated factor beside it, as context.
Whether a report may state a factor is bench.report.speedups' decision (the paired test behind it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from bench.report.conditions import CONDITION_INFO
from bench.report.published import PaperNumbersError, load_convergence_claims
from bench.report.vocabulary import BASELINE_SPECS, ReportError, fmt_steps, is_lower_better


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

    @property
    def head(self) -> str:
        """What is compared: "<method> vs <baseline>'s final <metric> <target> (at <step>)"."""
        return (f"{self.method} vs {self.baseline}'s {self.target_kind} {self.metric} {self.target:.4g} "
                f"(at {fmt_steps(self.baseline_step)})")

    def describe(self) -> str:
        """One sentence in the paper's words, with the points used, read off the seed-mean curves
        alone (bench.report.speedups decides whether a report may state it)."""
        head = self.head
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
    log s* = log s0 + (f0 - target) / (f0 - f1) * (log s1 - log s0) and the factor S_b / s*. If the first point
    already reaches it, s* = s0 (a lower bound).
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
            last_step, evaluated = (final or {}).get(base), int(curves[base].dropna().index.max())
            if last_step and evaluated < last_step:  # not the best step: a baseline may peak early
                result = dataclasses.replace(result, note=f"{result.note}; provisional: the "
                                             f"baseline is evaluated only up to {fmt_steps(evaluated)}")
            claim = claims[(claims["method"] == spec[method])
                           & (claims["baseline_method"] == base_spec)
                           & claims["model"].str.startswith(family[method])]
            out.append({"setting": setting, "metric": metric, "method": method, "baseline": base,
                        "baseline_final_step": result.baseline_step, "target": result.target,
                        "reached": result.reached, "step": result.step, "factor": result.factor,
                        "points": json.dumps([[float(a), float(b)] for a, b in result.points]),
                        "note": result.note, "sentence": result.describe(),
                        "target_kind": result.target_kind, "method_steps": int(curves[method].notna().sum()),
                        "paper_claim": "; ".join(f"x{r.speedup_stated:g} ({r.model}, {r.claim})"
                                                 for r in claim.itertuples())})
    return out


# ------------------------------------------------------------------------------------------------
# Paired seeds (common random numbers)
#
# With paired seeds (grid `seeds: {paired: [...]}`) seed k of every spec shares its data order,
# diffusion times, latent noise and evaluation labels/noise, so the per-seed difference
# d_k = value(method, k) - value(baseline, k) cancels what the two runs share. The interval of the
# mean difference is the t-interval on the d_k: d_bar +- t_{0.975, n-1} * s_d / sqrt(n), n = the
# number of seeds measured for both. It is narrower than comparing the two per-spec intervals
# whenever the paired values are positively correlated, and it is the one the report's prose uses.
# Its p is the two-sided paired t-test's (scipy.stats.ttest_rel). The rows of one report are one
# family of tests: Holm's step-down (`holm_adjust`) adjusts their p, and a difference is called
# significant, and a method better or worse, only where the adjusted p is below ALPHA.

ALPHA = 0.05  # family-wise error rate of one report's paired comparisons


@dataclass(frozen=True)
class PairedDifference:
    """Mean of method - baseline over the seeds both have, with its two-sided 95% t-interval."""

    mean: float
    half_width: float   # NaN with fewer than 2 pairs
    n: int
    seeds: tuple[int, ...]
    p: float = math.nan  # two-sided paired t-test (n-1 dof); NaN with fewer than 2 pairs

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def excludes_zero(self) -> bool:
        """True when the 95% interval lies entirely on one side of zero (NaN interval: False)."""
        return bool(np.isfinite(self.half_width) and (self.low > 0 or self.high < 0))


def paired_difference(method: dict[int, float], baseline: dict[int, float]) -> PairedDifference:
    """The paired difference over the seeds present (and finite) in both `method` and `baseline`
    (seed -> value); seeds of only one side are left out, never imputed."""
    seeds = tuple(sorted(k for k in method if k in baseline
                         and np.isfinite(method[k]) and np.isfinite(baseline[k])))
    diffs = [method[k] - baseline[k] for k in seeds]
    mean, half, n = mean_ci95(diffs)
    return PairedDifference(mean, half, n, seeds, paired_t_p(diffs))


def paired_t_p(diffs: Sequence[float]) -> float:
    """Two-sided p of the paired t-test on the differences `diffs` (scipy.stats.ttest_rel's p):
    t = mean / (s / sqrt(n)) with n-1 degrees of freedom. NaN with fewer than 2 differences; with
    identical differences, 0 when they are not 0 (an infinite t) and 1 when they are."""
    from scipy import stats

    x = np.asarray(diffs, dtype=np.float64)
    if x.size < 2:
        return math.nan
    sd = x.std(ddof=1)
    if sd == 0:
        return 1.0 if x.mean() == 0 else 0.0
    t = x.mean() / (sd / math.sqrt(x.size))
    return float(2 * stats.t.sf(abs(t), x.size - 1))


def holm_adjust(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p of a family (statsmodels' multipletests(method="holm")): sort
    the m finite p ascending, p_(i) -> max over j <= i of min(1, (m - j + 1) * p_(j)). NaN entries
    (no test) are not members of the family and stay NaN. Rejecting where the adjusted p < alpha
    keeps the chance of any false rejection in the family at most alpha."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, math.nan)
    members = np.flatnonzero(np.isfinite(p))
    m = members.size
    if m == 0:
        return out
    order = members[np.argsort(p[members], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def holm_family(table: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """`table` (paired_comparisons' rows: diff_mean, p, method, baseline, metric) with the Holm
    adjustment over all its rows as one family: p_holm, family_size (tests in the family),
    significant (p_holm < alpha) and better (the condition with the better value, only where
    significant, else empty)."""
    adjusted = holm_adjust(table["p"].to_numpy(dtype=np.float64)) if len(table) else np.array([])
    significant = np.isfinite(adjusted) & (adjusted < alpha)
    better = ["" if not sig else r.method if (r.diff_mean < 0) == is_lower_better(r.metric) else r.baseline
              for sig, r in zip(significant, table.itertuples(index=False))]
    return table.assign(p_holm=adjusted, family_size=int(np.isfinite(adjusted).sum()),
                        significant=significant.astype(bool), better=better)


def paired_comparisons(values: pd.DataFrame, pairs: Sequence[tuple[str, str]],
                       main: dict[tuple[str, str, str], str] | None = None) -> pd.DataFrame:
    """One row per (setting, metric, step, method, baseline): per-spec means with their intervals
    and the paired difference method - baseline with its interval, n and whether it excludes 0.

    `values`: one value per run with columns setting, metric, step, provenance, condition, seed,
    value (bench.report.conditions.per_run_values plus the run's condition and train.seed). `pairs`:
    (method condition, baseline condition). `main` maps (setting, metric, condition) to the
    provenance of the report's main table; only values of that provenance are paired (never
    numbers of different evaluators or sample counts). `p` is the paired t-test's; the rows are
    one Holm family (`holm_family`): `better` names the condition whose value is better (lower FD,
    higher accuracy) only where the Holm-adjusted p < ALPHA, else is empty.
    """
    columns = ["setting", "metric", "step", "method", "baseline", "n_pairs", "seeds", "method_mean",
               "method_half_width", "method_n", "baseline_mean", "baseline_half_width", "baseline_n",
               "diff_mean", "diff_half_width", "diff_low", "diff_high", "excludes_zero", "p", "p_holm",
               "family_size", "significant", "better"]
    rows = []
    if values.empty:
        return pd.DataFrame(columns=columns)
    def by_seed(part: pd.DataFrame, setting: str, metric: str, condition: str) -> dict[int, float]:
        own = part[part["condition"] == condition]
        if main is not None and (setting, metric, condition) in main:
            own = own[own["provenance"] == main[(setting, metric, condition)]]
        return {int(k): float(v) for k, v in zip(own["seed"], own["value"]) if pd.notna(k)}

    for (setting, metric, step), part in values.groupby(["setting", "metric", "step"], sort=True):
        for method, base in pairs:
            m, b = by_seed(part, setting, metric, method), by_seed(part, setting, metric, base)
            if not m or not b:
                continue
            d = paired_difference(m, b)
            mm, mh, mn = mean_ci95(m.values())
            bm, bh, bn = mean_ci95(b.values())
            rows.append({"setting": setting, "metric": metric, "step": int(step), "method": method,
                         "baseline": base, "n_pairs": d.n, "seeds": json.dumps(list(d.seeds)),
                         "method_mean": mm, "method_half_width": mh, "method_n": mn,
                         "baseline_mean": bm, "baseline_half_width": bh, "baseline_n": bn,
                         "diff_mean": d.mean, "diff_half_width": d.half_width, "diff_low": d.low,
                         "diff_high": d.high, "excludes_zero": d.excludes_zero, "p": d.p})
    return holm_family(pd.DataFrame(rows, columns=columns[:-4]))[columns]


# ------------------------------------------------------------------------------------------------
# Evaluation-sampling noise: one checkpoint scored with several sampling seeds
# (`bench eval RUN --step N --sampling-seeds 0,1,2` records setting `<setting>+seed=<k>`)

SAMPLING_SEED_SUFFIX = "+seed="


def sampling_seed_setting(setting: str, seed: int) -> str:
    """The eval.jsonl setting name of `setting` sampled with eval.seed = `seed`."""
    return f"{setting}{SAMPLING_SEED_SUFFIX}{int(seed)}"


def split_sampling_seed_setting(setting: str) -> tuple[str, int] | None:
    """('default', 2) for 'default+seed=2'; None for an ordinary setting name."""
    base, sep, seed = str(setting).rpartition(SAMPLING_SEED_SUFFIX)
    return (base, int(seed)) if sep and base and seed.isdigit() else None


def without_sampling_seed_settings(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` without the rows of sampling-seed settings (column `setting`); columns always kept."""
    keep = pd.Series([split_sampling_seed_setting(str(s)) is None for s in frame["setting"]],
                     index=frame.index, dtype=bool)
    return frame.loc[keep]


def sampling_spread(values: Iterable[float]) -> dict:
    """Spread of one checkpoint's metric over sampling seeds: mean, sample std (ddof 1), min, max,
    n, and the half-width of the 95% t-interval of the mean."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    mean, half, n = mean_ci95(x)
    return {"mean": mean, "std": float(x.std(ddof=1)) if n > 1 else math.nan,
            "min": float(x.min()) if n else math.nan, "max": float(x.max()) if n else math.nan,
            "n": n, "half_width": half}
