"""Rendering of a summarized `bench report`: the paper's layout as Markdown, LaTeX and CSV, and the
files of the report folder (report.md, table.csv/.tex, the tidy CSVs, the plots)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from bench.report.common import NOT_MEASURED, SAMPLING_FIELDS, fmt_steps, metric_decimals, metric_label, metric_rank
from bench.report.groups import describe_provenance, guidance_of
from bench.report.paper_match import paper_tables
from bench.report.records import Report


def fmt_value(metric: str, mean: float, half: float = math.nan) -> str:
    """'12.34 ± 0.56' (mean ± 95% half-width), '12.34' with one seed, 'not measured' with none."""
    if not np.isfinite(mean):
        return NOT_MEASURED
    d = metric_decimals(metric, mean)
    return f"{mean:.{d}f}" + (f" ± {half:.{d}f}" if np.isfinite(half) else "")


def layout_table(report: Report, cells: pd.DataFrame) -> pd.DataFrame:
    """Model | Iter. | Seeds | per metric: measured, paper, Δ (comparable) or paper context."""
    metrics = sorted(cells["metric"].unique(), key=lambda m: (m != report.metric, metric_rank(m)))
    order = {c: i for i, c in enumerate(report.conditions["condition"])}
    keys = cells[["condition", "step"]].drop_duplicates()
    keys = keys.assign(_o=keys["condition"].map(order)).sort_values(["_o", "step"])
    keys = keys[["condition", "step"]]
    by_key = {(r.condition, r.step, r.metric): r for r in cells.itertuples(index=False)}
    context = ~cells["paper_comparable"].astype(bool) & cells["paper"].notna()
    table: dict[str, list[str]] = {"Model": [], "Iter.": [], "Seeds": []}
    keys_of = {m: list(cells.loc[cells["metric"] == m, "provenance"].unique()) for m in metrics}
    mixed = any(len(k) > 1 for k in keys_of.values())  # the grid's setting differs per row
    for condition, step in keys.itertuples(index=False):
        table["Model"].append(condition)
        table["Iter."].append(fmt_steps(step))
        found = [by_key[(condition, step, m)] for m in metrics if (condition, step, m) in by_key]
        first = found[0]
        table["Seeds"].append(str(first.n_seeds) if first.n_seeds == first.n_runs
                              else f"{first.n_seeds} of {first.n_runs}")
        if mixed:
            table.setdefault("sampling", []).append(
                sampling_note(first.provenance, keys_of[first.metric]))
        labels = []
        for m in metrics:
            c = by_key.get((condition, step, m))
            mine = cells["metric"] == m
            name = metric_label(m)
            table.setdefault(cells.loc[mine, "evaluator"].iloc[0], []).append(
                fmt_value(m, c.mean, c.half_width) if c else NOT_MEASURED)
            if cells.loc[mine, "paper_comparable"].any():
                ok = c is not None and c.paper_comparable
                table.setdefault(f"paper {name}", []).append(f"{c.paper:g}" if ok else "")
                table.setdefault(f"Δ {name}", []).append(
                    f"{c.diff:+.{metric_decimals(m, c.paper)}f}" if ok and np.isfinite(c.diff) else "")
            if (context & mine).any():
                shown = c is not None and not c.paper_comparable and np.isfinite(c.paper)
                pm = "FID" if m.startswith("fd_") else metric_label(m)
                table.setdefault(f"paper {pm}, context only", []).append(
                    f"{c.paper:g}" if shown else "")
                labels += [c.paper_label] if shown else []
        if context.any():
            table.setdefault("paper setting (context)", []).append("; ".join(dict.fromkeys(labels)))
    return pd.DataFrame(table)


def sampling_note(key: str, keys: Sequence[str]) -> str:
    """The sampling fields (and guidance entries) of `key` that differ among `keys`."""
    def varies(values: Iterable[Any]) -> bool:
        return len({json.dumps(v, sort_keys=True) for v in values}) > 1
    parsed, own = [json.loads(k) for k in keys], json.loads(key)
    parts = [f"{f}={own.get(f)}" for f in SAMPLING_FIELDS
             if f != "guidance" and varies(p.get(f) for p in parsed)]
    guidances, mine = [guidance_of(k) for k in keys], guidance_of(key)
    parts += [f"{name}={mine.get(name)}" for name in sorted(set().union(*guidances))
              if varies(g.get(name) for g in guidances)]
    return ", ".join(parts)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (no tabulate dependency); '|' inside cells is escaped."""
    def row(values: Iterable[Any]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"
    return "\n".join([row(table.columns), "|" + "---|" * len(table.columns),
                      *(row(r) for r in table.itertuples(index=False))])


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
          "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
          "±": r"$\pm$", "Δ": r"$\Delta$", "−": "--"}


def to_latex(table: pd.DataFrame, caption: str) -> str:
    """A booktabs tabular in a table float, every cell escaped for LaTeX."""
    def esc(v: Any) -> str:
        return "".join(_LATEX.get(ch, ch) for ch in str(v))
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{esc(caption)}}}",
             rf"\begin{{tabular}}{{lll{'r' * (len(table.columns) - 3)}}}", r"\toprule",
             " & ".join(map(esc, table.columns)) + r" \\", r"\midrule",
             *(" & ".join(map(esc, r)) + r" \\" for r in table.itertuples(index=False)),
             r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def blocks(report: Report) -> list[tuple[str, str, pd.DataFrame, pd.DataFrame]]:
    """(setting, title, cells, layout) of every main table and every set-apart table."""
    out = []
    for setting, cells in report.cells.groupby("setting", sort=True):
        out.append((setting, "main", cells[cells["group"] == 0]))
        apart = cells[cells["group"] > 0]
        out += [(setting, f"set apart: {metric} of another provenance", part)
                for (metric, _), part in apart.groupby(["metric", "provenance"], sort=True)]
    return [(s, t, c, layout_table(report, c)) for s, t, c in out]


def not_comparable(report: Report) -> pd.DataFrame:
    """Measured cells whose paper row is the same model, method and length but whose protocol
    differs (reference, weights, precision, ...): condition, step, setting, metrics, reasons."""
    c = report.cells
    if c.empty:
        return pd.DataFrame(columns=["condition", "step", "setting", "metrics", "reasons"])
    c = c[c["paper_exact"].astype(bool) & ~c["paper_comparable"].astype(bool)
          & c["paper"].notna() & c["mean"].map(np.isfinite)]
    rows = [{"condition": k[0], "step": k[1], "setting": k[2], "reasons": k[3],
             "metrics": ", ".join(metric_label(m) for m in sorted(part["metric"], key=metric_rank))}
            for k, part in c.groupby(["condition", "step", "setting", "paper_reason"], sort=False)]
    return pd.DataFrame(rows, columns=["condition", "step", "setting", "metrics", "reasons"])


def not_comparable_lines(report: Report) -> list[str]:
    """One line per paper-scale row that is not comparable, naming every setting that differs."""
    return [f"not comparable with the paper: {r.condition} at {fmt_steps(r.step)} "
            f"[{r.setting}; {r.metrics}]: {r.reasons}" for r in not_comparable(report).itertuples()]


def render_markdown(report: Report) -> str:
    """The whole report as Markdown; deterministic (no paths, no clocks) for the golden test."""
    g = report.gathered
    tables = paper_tables(g.grid)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(g.runs["status"].value_counts().items()))
    lines = [f"# bench report: {g.name}", "",
             f"Paper table: {', '.join(tables) or 'none stated by the grid'} "
             "(arXiv 2504.16064v3, results/paper/).", f"Runs: {len(g.runs)} in the grid; {counts}.",
             "", "± is the half-width of the 95% t-interval over training seeds (t-distribution, "
             "n-1 degrees of freedom); with one seed the value is shown without an interval. "
             f"\"{NOT_MEASURED}\" means no evaluation yet (never zero). Δ = measured − paper, "
             "given only where the setting is the paper's (ImageNet 256, the 2015 Inception-v3, "
             "ADM's reference batch, 50K samples, EMA weights, the paper's sampler and guidance, "
             "fp32 training at batch 256, same model, method and iterations).", ""]
    if report.cells.empty:
        lines += ["Nothing is evaluated yet: run the grid's eval stage "
                  f"(`bench grid {g.name} --stage eval`).", ""]
    for setting, title, cells, table in blocks(report):
        lines += [f"## Setting `{setting}`: main" if title == "main" else f"### {title}", ""]
        if title != "main":
            lines += [f"Why set apart: {' / '.join(cells['set_apart_reason'].unique())}.", ""]
        lines += [f"- {metric_label(m)} ({m}): {describe_provenance(p)}"
                  for m, p in cells[["metric", "provenance"]].drop_duplicates().itertuples(False)]
        lines += ["", to_markdown(table), ""]
        context = cells[~cells["paper_comparable"].astype(bool) & cells["paper"].notna()]
        if not context.empty:
            reasons = sorted(set("; ".join(context["paper_reason"]).split("; ")))
            lines += ["Paper context: the paper's number for the corresponding full-scale setting "
                      "(named in the last column) is shown for orientation only. No difference is "
                      f"computed: {'; '.join(reasons)}.", ""]
    if lines_off := not_comparable_lines(report):
        lines += ["## Not comparable with the paper", "", "The paper's number for the same model, "
                  "method and length is shown, without a difference, because these differ:", "",
                  *(f"- {line.removeprefix('not comparable with the paper: ')}"
                    for line in lines_off), ""]
    if not report.published.empty:
        metrics = [m for m in report.published.columns
                   if m in ("fid", "sfid", "is", "precision", "recall")]
        shown = report.published.astype(object)
        for m in metrics:  # as printed; "–" where the paper prints none
            shown[m] = [f"{v:g}" if pd.notna(v) else "–" for v in report.published[m]]
        shown = shown.fillna("").rename(columns={"table": "Table", "system": "System",
                                                 "length": "Training", "note": "Note",
                                                 **{m: metric_label(m) for m in metrics}})
        lines += ["## As published, not trained by this grid", "",
                  "Other rows of the paper's table: other papers' numbers as the ReDi paper prints "
                  "them (\"–\": not reported). Nothing here was measured by this harness.", "",
                  to_markdown(shown), ""]
    lines += [f"## Speed-ups ({report.metric}): reaches the baseline's final value N times "
              "sooner", ""]
    if report.speedups:
        rows = [{"Setting": s["setting"], "Method": s["method"], "Baseline": s["baseline"],
                 "baseline final": f"{s['target']:.4g} at {fmt_steps(s['baseline_final_step'])}",
                 "reached at": fmt_steps(s["step"]) if s["reached"]
                 else f"not reached (by {fmt_steps(json.loads(s['points'])[-1][0])})",
                 "speed-up": f"{s['factor']:.2f}x" if s["reached"] else "not reached",
                 "points used": ", ".join(f"({fmt_steps(a)}, {b:.4g})"
                                          for a, b in json.loads(s["points"])),
                 "note": s["note"], "paper states (ImageNet, context)": s["paper_claim"]}
                for s in report.speedups]
        lines += [to_markdown(pd.DataFrame(rows)), "", "Linear interpolation of the seed-mean "
                  "value against log(step) between the points used; the factor is the baseline's "
                  "final step divided by the step found.", ""]
    else:
        lines += ["No method/baseline pair with measured curves yet.", ""]
    runs = report.conditions[["condition", "n_runs", "status", "runs"]]
    lines += ["## Runs", "", to_markdown(runs.set_axis(["Condition", "runs", "status", "folders"],
                                                       axis=1)), ""]
    if report.missing:
        lines += ["## Not measured yet", "", *(f"- {m}" for m in report.missing), ""]
    lines += ["## Notes", "", *(f"- {n}" for n in report.notes), ""] if report.notes else []
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(report: Report, out_dir: str | Path, *, plots: bool = True) -> Path:
    """report.md, table.csv/.tex (the layout), the tidy CSVs and the plots, written atomically."""
    from bench.atomic import atomic_write_text, remove_stale_temporaries

    out = Path(out_dir)
    remove_stale_temporaries(out)  # what a killed earlier run left: its output is written again
    atomic_write_text(out / "report.md", render_markdown(report))
    parts = blocks(report)
    layout = pd.concat([t.assign(setting=s, block=b) for s, b, _, t in parts], ignore_index=True) \
        if parts else pd.DataFrame()
    g = report.gathered
    for name, frame in {"table.csv": layout, "cells.csv": report.cells, "runs.csv": g.runs,
                        "speedups.csv": pd.DataFrame(report.speedups), "metrics.csv": g.metrics,
                        "evals.csv": g.evals}.items():
        atomic_write_text(out / name, frame.to_csv(index=False))
    atomic_write_text(out / "table.tex", "\n".join(
        to_latex(t, f"{g.name}, setting {s}: {b}") for s, b, _, t in parts))
    if plots:
        from bench.report.plots import plot_convergence, plot_losses

        plot_convergence(report, out)
        plot_losses(report, out)
    return out
