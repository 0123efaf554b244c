"""Rendering of a summarized `bench report`: the paper's layout as Markdown, LaTeX and CSV, and the
files of the report folder (report.md, table.csv/.tex, the tidy CSVs, the plots)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from bench.atomic import atomic_write_text, remove_stale_temporaries
from bench.report.conditions import describe_provenance, guidance_of, label_runs, per_run_values
from bench.report.paper_match import paper_tables
from bench.report.plots import plot_convergence, plot_losses
from bench.report.speedups import paired_cell, speedup_cell
from bench.report.stats import (
    holm_family,
    paired_comparisons,
    sampling_spread,
    speedup_pairs,
    split_sampling_seed_setting,
    without_sampling_seed_settings,
)
from bench.report.tidy_tables import Report
from bench.report.vocabulary import (
    NOT_MEASURED,
    SAMPLING_FIELDS,
    SEED_COLUMN,
    fmt_steps,
    is_lower_better,
    metric_decimals,
    metric_label,
    metric_rank,
)
from bench.report.wording import describe_difference, fmt_p


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
    lines = [*_header_lines(report), *_setting_lines(report), *_not_comparable_section(report),
             *_published_section(report), *_speedup_section(report), *render_paired_section(report)]
    runs = report.conditions[["condition", "n_runs", "status", "runs"]]
    lines += ["## Runs", "", to_markdown(runs.set_axis(["Condition", "runs", "status", "folders"],
                                                       axis=1)), ""]
    if report.missing:
        lines += ["## Not measured yet", "", *(f"- {m}" for m in report.missing), ""]
    lines += ["## Notes", "", *(f"- {n}" for n in report.notes), ""] if report.notes else []
    return "\n".join(lines).rstrip("\n") + "\n"


def _header_lines(report: Report) -> list[str]:
    """Title, the paper table, the runs' states and how to read ±, Δ and "not measured"."""
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
    return lines


def _setting_lines(report: Report) -> list[str]:
    """Per setting: its main table, then each set-apart table, with their provenance and context."""
    lines = []
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
    return lines


def _not_comparable_section(report: Report) -> list[str]:
    if not (lines_off := not_comparable_lines(report)):
        return []
    return ["## Not comparable with the paper", "", "The paper's number for the same model, "
            "method and length is shown, without a difference, because these differ:", "",
            *(f"- {line.removeprefix('not comparable with the paper: ')}" for line in lines_off), ""]


def _published_section(report: Report) -> list[str]:
    """The regenerated table's rows the grid does not train, as the paper prints them."""
    if report.published.empty:
        return []
    metrics = [m for m in report.published.columns if m in ("fid", "sfid", "is", "precision", "recall")]
    shown = report.published.astype(object)
    for m in metrics:  # as printed; "–" where the paper prints none
        shown[m] = [f"{v:g}" if pd.notna(v) else "–" for v in report.published[m]]
    shown = shown.fillna("").rename(columns={"table": "Table", "system": "System",
                                             "length": "Training", "note": "Note",
                                             **{m: metric_label(m) for m in metrics}})
    return ["## As published, not trained by this grid", "",
            "Other rows of the paper's table: other papers' numbers as the ReDi paper prints "
            "them (\"–\": not reported). Nothing here was measured by this harness.", "",
            to_markdown(shown), ""]


def _speedup_section(report: Report) -> list[str]:
    """The speed-ups: a factor only where bench.report.speedups licenses it, else why none."""
    lines = [f"## Speed-ups ({report.metric}): reaches the baseline's final value N times sooner", ""]
    if not report.speedups:
        return [*lines, "No method/baseline pair with measured curves yet.", ""]
    rows = [{"Setting": s["setting"], "Method": s["method"], "Baseline": s["baseline"],
             "baseline final": f"{s['target']:.4g} at {fmt_steps(s['baseline_final_step'])}",
             "speed-up": speedup_cell(s),
             "paired Δ at that step": paired_cell(s),
             "points used (seed means)": ", ".join(f"({fmt_steps(a)}, {b:.4g})"
                                                   for a, b in json.loads(s["points"])),
             "note": s["note"], "paper states (ImageNet, context)": s["paper_claim"]}
            for s in report.speedups]
    return [*lines, to_markdown(pd.DataFrame(rows)), "",
            "A factor is stated only where the paired difference method − baseline at the baseline's "
            "step (section \"Paired comparisons\", the same family) has a Holm-adjusted p < 0.05 and "
            "points the factor's way, and only for a method evaluated at two steps or more; "
            "otherwise the row says why there is none. The factor interpolates the seed-mean value "
            "linearly against log(step) between the points used: the baseline's final step divided "
            "by the step found.", "", *(f"- `{s['setting']}`: {s['sentence']}" for s in report.speedups), ""]


def write_report(report: Report, out_dir: str | Path, *, plots: bool = True) -> Path:
    """report.md, table.csv/.tex (the layout), the tidy CSVs and the plots, written atomically."""

    out = Path(out_dir)
    remove_stale_temporaries(out)  # what a killed earlier run left: its output is written again
    atomic_write_text(out / "report.md", render_markdown(report))
    parts = blocks(report)
    layout = pd.concat([t.assign(setting=s, block=b) for s, b, _, t in parts], ignore_index=True) \
        if parts else pd.DataFrame()
    g = report.gathered
    for name, frame in {"table.csv": layout, "cells.csv": report.cells, "runs.csv": g.runs,
                        "speedups.csv": pd.DataFrame(report.speedups), "metrics.csv": g.metrics,
                        "paired.csv": paired_table(report), "sampling_noise.csv": sampling_noise_table(report),
                        "evals.csv": g.evals}.items():
        atomic_write_text(out / name, frame.to_csv(index=False))
    atomic_write_text(out / "table.tex", "\n".join(
        to_latex(t, f"{g.name}, setting {s}: {b}") for s, b, _, t in parts))
    if plots:
        plot_convergence(report, out)
        plot_losses(report, out)
    return out


# ------------------------------------------------------------------------------------------------
# Paired comparisons and evaluation-sampling noise: tables, and the only prose that may call one
# method better than another (its words: bench.report.wording).


def paired_statistics_text(family_size: int) -> str:
    """The report's own statement of the paired test, its family and its correction."""
    return (
        "Statistics. Runs are paired by training seed: seed k of every spec shares its data order, VAE "
        "posterior noise, diffusion times and latent noise in training, and (grids with "
        "`seeds: {paired: [...]}`) its evaluation labels and initial sampling noise. For each seed k "
        "both runs have, d_k = method − baseline; the table gives the mean d̄, its two-sided 95% "
        "t-interval d̄ ± t(0.975, n−1)·s_d/√n over the n pairs (n−1 degrees of freedom; no interval "
        "with n = 1) and the two-sided paired t-test's p. Beside it, each spec's own mean ± the 95% "
        f"t-interval over its seeds. Family: the {family_size} comparisons of this table that have a p "
        "form one family, corrected by Holm's step-down method (family-wise error rate 5%); a "
        "difference is marked ✱, and called better or worse below, only where its Holm-adjusted "
        "p < 0.05. An interval that contains 0 shows no difference in either direction; one that "
        "excludes 0 without ✱ shows none after the correction. The intervals are not adjusted. Each "
        "value is one evaluation with a finite sample, so d_k also carries the evaluation-sampling "
        "noise of both runs; the interval includes it. How large it is alone is measured by scoring "
        "one checkpoint with several sampling seeds (`bench eval RUN --step N --sampling-seeds "
        "0,1,2`), shown in the next section when present.")


def paired_values(report: Report) -> pd.DataFrame:
    """One value per run (setting, metric, step, provenance) with its condition and train.seed;
    the extra sampling-seed settings (`<setting>+seed=<k>`) are left out."""
    g = report.gathered
    values = per_run_values(g.evals)
    values = without_sampling_seed_settings(values)
    runs, _ = label_runs(g.runs, g.grid)
    if SEED_COLUMN not in runs:
        return values.assign(condition=pd.Series(dtype=str), seed=pd.Series(dtype=float)).iloc[0:0]
    runs = runs[["run", "condition", SEED_COLUMN]].rename(columns={SEED_COLUMN: "seed"})
    return values.merge(runs, on="run", how="inner")


def paired_table(report: Report) -> pd.DataFrame:
    """`bench.report.stats.paired_comparisons` for every method/baseline pair of the report (the
    speed-up pairs: each method vs the grid's baseline, and vs REPA), on the main provenance.

    A setting that only some specs are scored with (e.g. Representation Guidance, `match: {spec:
    redi_rg}`) compares them with the baseline as scored in the first setting that has it (the
    grid's order; Table 4's question: ReDi with RG against the baseline without); the column
    `baseline_setting` names it.
    """
    values = paired_values(report)
    if values.empty:
        return paired_comparisons(values, []).assign(baseline_setting=pd.Series(dtype=str))
    main_cells = report.cells[report.cells["group"] == 0]
    main = {(s, m, c): p for s, m, c, p in
            main_cells[["setting", "metric", "condition", "provenance"]].drop_duplicates().itertuples(False)}
    present = [c for c in report.conditions["condition"] if c in set(values["condition"])]
    pairs = [(m, b) for m, b, _ in speedup_pairs(report.conditions, present, report.gathered.grid)]
    listed = [str(x.get("name")) for x in ((report.gathered.grid.get("eval") or {}).get("settings") or [])
              if isinstance(x, dict)]
    order = [*dict.fromkeys([*listed, *sorted(values["setting"].unique())])]
    scored = {s: set(values.loc[values["setting"] == s, "condition"]) for s in order}
    borrowed: dict[tuple[str, str], str] = {}
    extra = []
    for setting in order:
        for method, base in pairs:
            if method not in scored[setting] or base in scored[setting] or (setting, base) in borrowed:
                continue
            source = next((s for s in order if base in scored[s]), None)
            if source is None:
                continue
            borrowed[(setting, base)] = source
            rows = values[(values["setting"] == source) & (values["condition"] == base)]
            extra.append(rows.assign(setting=setting))
            main.update({(setting, m, base): p for (s, m, c), p in list(main.items())
                         if s == source and c == base})
    table = paired_comparisons(pd.concat([values, *extra], ignore_index=True), pairs, main)
    native = pd.Series([(s, m) not in borrowed for s, m in zip(table["setting"], table["method"])],
                       index=table.index, dtype=bool)  # a borrowed baseline is never the method of a row
    table = holm_family(table.loc[native].reset_index(drop=True))  # the family: the rows the report shows
    return table.assign(baseline_setting=[borrowed.get((s, b), s) for s, b in zip(table["setting"], table["baseline"])])


def sampling_noise_table(report: Report) -> pd.DataFrame:
    """Per (run, step, setting, metric) scored with several sampling seeds: the spread of the value."""
    ev = report.gathered.evals
    columns = ["run", "setting", "metric", "step", "sampling_seeds", "mean", "std", "min", "max", "n",
               "half_width"]
    if ev.empty:
        return pd.DataFrame(columns=columns)
    parsed = [split_sampling_seed_setting(s) for s in ev["setting"].fillna("default").astype(str)]
    keep = [p is not None for p in parsed]
    part = ev[keep].assign(base=[p[0] for p in parsed if p], sampling_seed=[p[1] for p in parsed if p])
    rows = []
    for (run, base, metric, step), group in part.groupby(["run", "base", "metric", "step"], sort=True):
        group = group.sort_values("created_at").drop_duplicates("sampling_seed", keep="last")
        spread = sampling_spread(pd.to_numeric(group["value"], errors="coerce"))
        rows.append({"run": run, "setting": base, "metric": metric, "step": int(step),
                     "sampling_seeds": json.dumps(sorted(int(k) for k in group["sampling_seed"])),
                     **spread})
    return pd.DataFrame(rows, columns=columns)


def render_paired_section(report: Report) -> list[str]:
    """Markdown lines: the statistics text, the paired table, the sentences it licenses, and the
    evaluation-sampling noise."""
    paired, noise = paired_table(report), sampling_noise_table(report)
    family = int(paired["family_size"].max()) if len(paired) else 0
    lines = ["## Paired comparisons: method − baseline, paired by training seed", "",
             paired_statistics_text(family), ""]
    if paired.empty:
        lines += ["No method/baseline pair has a seed measured for both yet.", ""]
    else:
        def value(metric: str, mean: float, half: float, n: int) -> str:
            return f"{fmt_value(metric, mean, half)} (n={n})"
        rows = [{"Setting": r.setting, "Metric": metric_label(r.metric), "Iter.": fmt_steps(r.step),
                 "Method": r.method, "Baseline": r.baseline + (f" (setting {r.baseline_setting})"
                                                               if r.baseline_setting != r.setting else ""),
                 "method": value(r.metric, r.method_mean, r.method_half_width, r.method_n),
                 "baseline": value(r.metric, r.baseline_mean, r.baseline_half_width, r.baseline_n),
                 "Δ = method − baseline": fmt_value(r.metric, r.diff_mean, r.diff_half_width),
                 "95% interval of Δ": (f"[{r.diff_low:+.{metric_decimals(r.metric, r.diff_mean)}f}, "
                                       f"{r.diff_high:+.{metric_decimals(r.metric, r.diff_mean)}f}]"
                                       if np.isfinite(r.diff_half_width) else "n = 1: none"),
                 "pairs": r.n_pairs, "p": fmt_p(r.p), "Holm-adjusted p": fmt_p(r.p_holm),
                 "✱ (adjusted p < 0.05)": "✱" if r.significant else ""}
                for r in paired.itertuples(index=False)]
        lines += [to_markdown(pd.DataFrame(rows)), ""]
        lines += [*paired_sentences(paired), ""]
    if not noise.empty:
        lines += ["### Evaluation-sampling noise: one checkpoint, several sampling seeds", "",
                  "The same checkpoint scored with other sampling seeds (labels and noise); the spread "
                  "is what evaluation alone adds to every value above.", ""]
        rows = [{"Run": r.run, "Setting": r.setting, "Metric": metric_label(r.metric),
                 "Iter.": fmt_steps(r.step), "sampling seeds": r.sampling_seeds,
                 "mean ± 95%": fmt_value(r.metric, r.mean, r.half_width),
                 "std": f"{r.std:.{metric_decimals(r.metric, r.std)}f}" if np.isfinite(r.std) else "",
                 "min – max": f"{r.min:.{metric_decimals(r.metric, r.min)}f} – "
                              f"{r.max:.{metric_decimals(r.metric, r.max)}f}"}
                for r in noise.itertuples(index=False)]
        lines += [to_markdown(pd.DataFrame(rows)), ""]
    return lines


def paired_sentences(paired: pd.DataFrame) -> list[str]:
    """One sentence per (setting, metric, method, baseline) at the last step both were measured,
    in bench.report.wording's words: a direction only where the Holm-adjusted p < 0.05."""
    out = []
    keys = ["setting", "metric", "method", "baseline"]
    last = paired.sort_values("step").groupby(keys, sort=False).tail(1)
    last = last.assign(_rank=last["metric"].map(metric_rank)).sort_values(["setting", "_rank", "method", "baseline"])
    for r in last.itertuples(index=False):
        d = metric_decimals(r.metric, r.diff_mean)
        name, at = metric_label(r.metric), fmt_steps(r.step)
        source = getattr(r, "baseline_setting", r.setting)
        base = r.baseline if source == r.setting else f"{r.baseline} (setting `{source}`)"
        clause = describe_difference(r.method, base, r.diff_mean, r.diff_low, r.diff_high, r.n_pairs,
                                     p_holm=r.p_holm, family_size=r.family_size,
                                     lower_is_better=is_lower_better(r.metric), decimals=d)
        out.append(f"- `{r.setting}`, {name} at {at}: {clause}")
    return out
