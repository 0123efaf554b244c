"""Convergence plots and loss curves of a grid (matplotlib, Agg; no pyplot global state).

`bench.report.summary` computes every number; this file only draws them. Each figure is saved as PNG and
PDF, written atomically. The y-axis names the evaluator ("FD (Fashion-MNIST classifier features,
n=2000)") because FDs of different feature networks, references or sample counts are different
quantities: FDs are comparable only with the same features, reference and n.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

from bench.atomic import atomic_write_bytes
from bench.report.tidy_tables import Report
from bench.report.vocabulary import fmt_steps, metric_label, metric_range

LOSS_TERMS = ("loss", "loss/latent", "loss/semantic", "loss/repa", "loss/vlb")
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
          "tab:gray", "tab:olive", "tab:cyan")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "default"


def _save(figure: Figure, stem: Path) -> list[Path]:
    """Save as PNG and PDF next to each other, each written atomically."""
    FigureCanvasAgg(figure)  # attach an Agg canvas: no display and no pyplot state needed
    written = []
    for suffix in ("png", "pdf"):
        buffer = io.BytesIO()
        figure.savefig(buffer, format=suffix, dpi=150, bbox_inches="tight")
        # not with_suffix: a setting named like `rg1.5` would lose its `.5_<metric>` tail
        written.append(atomic_write_bytes(stem.with_name(f"{stem.name}.{suffix}"), buffer.getvalue()))
    return written


def log_steps_axis(axis, steps: np.ndarray) -> None:
    """Log x-axis labelled as the paper prints iterations (250, 1K, 400K, 7M), no minor labels."""

    steps = np.unique(np.asarray(steps, dtype=np.float64))
    axis.set_xscale("log")
    if len(steps) <= 8:
        ticks = steps
    else:  # a 1-2-5 ladder inside the range, so long loss curves do not get crowded labels
        low, high = steps.min(), steps.max()
        decades = range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
        ladder = [m * 10.0 ** k for k in decades for m in (1, 2, 5)]
        ticks = np.array([t for t in ladder if low <= t <= high] or [low, high])
    axis.xaxis.set_major_locator(FixedLocator(ticks))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt_steps(x)))
    axis.xaxis.set_minor_locator(NullLocator())
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_xlabel("training iterations (log scale)")


def _colors(report: Report) -> dict[str, str]:
    conditions = list(report.conditions["condition"])
    return {c: COLORS[i % len(COLORS)] for i, c in enumerate(conditions)}


def plot_convergence(report: Report, out_dir: Path) -> list[Path]:
    """Metric against training iterations (log axis): one line per condition, seeds as a band.

    One figure per (setting, metric) of the main provenance group; the band is the 95% t-interval
    over seeds where a point has at least two seeds.
    """

    written: list[Path] = []
    colors = _colors(report)
    main = report.cells[(report.cells["group"] == 0) & (report.cells["n_seeds"] > 0)
                        & (report.cells["step"] > 0)]
    for (setting, metric), cells in main.groupby(["setting", "metric"], sort=True):
        figure = Figure(figsize=(6.4, 4.2), layout="constrained")
        axis = figure.add_subplot()
        for condition in report.conditions["condition"]:
            curve = cells[cells["condition"] == condition].sort_values("step")
            if curve.empty:
                continue
            color = colors[condition]
            seeds = int(curve["n_seeds"].max())
            axis.plot(curve["step"], curve["mean"], marker="o", color=color,
                      label=f"{condition} ({seeds} seed{'s' if seeds != 1 else ''})")
            band = curve[curve["n_seeds"] >= 2]
            if not band.empty:  # drawn within the metric's range; the tables keep the interval as computed
                low, high = metric_range(metric)
                axis.fill_between(band["step"], band["ci_low"].clip(low, high), band["ci_high"].clip(low, high),
                                  color=color, alpha=0.2, linewidth=0)
        log_steps_axis(axis, cells["step"].to_numpy())
        axis.set_ylabel(cells["evaluator"].iloc[0])
        axis.set_title(f"{report.gathered.name}: {metric_label(metric)} over training "
                       f"(setting {setting}; band: 95% t-interval over seeds)", fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
        written += _save(figure, out_dir / f"convergence_{_slug(setting)}_{_slug(metric)}")
    return written


def loss_curves(metrics: pd.DataFrame, condition_of: dict[str, str], term: str) -> pd.DataFrame:
    """Seed-mean of one loss term by (condition, step), with the 95% t half-width (NaN if n < 2)."""
    from scipy import stats

    # a resumed run may repeat a step: the last line written wins
    frame = metrics[["run", "step", term]].dropna().drop_duplicates(["run", "step"], keep="last")
    frame = frame.assign(condition=frame["run"].map(condition_of),
                         value=pd.to_numeric(frame[term], errors="coerce")).dropna(subset=["value"])
    grouped = frame.groupby(["condition", "step"])["value"].agg(["mean", "std", "count"])
    grouped = grouped.reset_index()
    dof = (grouped["count"] - 1).clip(lower=1)
    half = stats.t.ppf(0.975, dof) * grouped["std"] / np.sqrt(grouped["count"])
    grouped["half_width"] = np.where(grouped["count"] >= 2, half, math.nan)
    return grouped


def plot_losses(report: Report, out_dir: Path) -> list[Path]:
    """Training loss per term (one panel each) against iterations, seed-mean with a 95% band."""
    metrics = report.gathered.metrics
    terms = [t for t in LOSS_TERMS if t in metrics.columns and metrics[t].notna().any()]
    if not terms or "step" not in metrics.columns:
        return []
    runs = report.gathered.runs
    condition_of = dict(zip(runs["run"], _run_conditions(report)))
    colors = _colors(report)
    figure = Figure(figsize=(4.2 * len(terms), 3.6), layout="constrained")
    for index, term in enumerate(terms):
        axis = figure.add_subplot(1, len(terms), index + 1)
        curves = loss_curves(metrics[metrics["step"] > 0], condition_of, term)
        if curves.empty:
            continue
        for condition in report.conditions["condition"]:
            curve = curves[curves["condition"] == condition].sort_values("step")
            if curve.empty:
                continue
            axis.plot(curve["step"], curve["mean"], color=colors[condition], label=condition)
            band = curve[curve["half_width"].notna()]
            if not band.empty:
                axis.fill_between(band["step"], band["mean"] - band["half_width"],
                                  band["mean"] + band["half_width"], color=colors[condition],
                                  alpha=0.2, linewidth=0)
        log_steps_axis(axis, curves["step"].to_numpy())
        axis.set_ylabel("training batch mean" if index == 0 else "")
        axis.set_title(term, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
    figure.axes[0].legend(fontsize=7)
    figure.suptitle(f"{report.gathered.name}: training loss per term (seed mean; band: 95% "
                    "t-interval over seeds)", fontsize=11)
    return _save(figure, out_dir / "loss_curves")


def _run_conditions(report: Report) -> list[str]:
    """Condition label of every run (same order as report.gathered.runs)."""
    lookup = {}
    for _, row in report.conditions.iterrows():
        for run in str(row["runs"]).split(", "):
            lookup[run] = row["condition"]
    return [lookup.get(run, run) for run in report.gathered.runs["run"]]
