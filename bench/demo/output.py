"""What `bench demo` leaves in its output folder (bench/demo/run.py runs the stages):

    summary.md            the table (classifier FD and conditional accuracy per spec and step),
                          the speed-up lines, the machine, the date and the time taken
    table.csv             the same numbers, one row per (spec, sampling setting, step)
    convergence.png       FD and accuracy against training steps, every spec and setting together
    samples_<spec>[_<setting>].png   samples of the last checkpoint beside their generated
                          semantic channels (3 principal components as RGB, the paper's Fig. 5)
    report/               `bench report` of the grid (report.md, CSV, LaTeX, per-setting plots)
    invocations.jsonl     one line per `bench demo` call: date, stage times, what was reused

Everything is computed by bench.report.summary from the run folders; this file only arranges and draws.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from bench.atomic import atomic_write_bytes, atomic_write_text
from bench.launch.grids import eval_config, settings_for
from bench.perf.timing import cpu_flags, cpu_kernels, cpu_model, git_commit
from bench.report.plots import COLORS, log_steps_axis
from bench.report.speedups import license_speedup, paired_at
from bench.report.stats import speedup
from bench.report.summary import ReportError, gather, summarize, to_markdown, write_report
from bench.report.tables import paired_sentences, paired_table
from bench.report.vocabulary import fmt_steps

FD, ACC = "fd_classifier", "accuracy"


def machine() -> dict:
    """CPU model, cores, the instructions its kernels use, torch: the facts a reader needs to compare
    timings."""
    import torch

    from bench.precision import native_bf16

    model = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "kernels": cpu_kernels(), "bf16_native": native_bf16(torch.device("cpu")),
            "cpu_flags": cpu_flags(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(terse=True)}


def setting_label(cfg) -> str:
    g = cfg.eval.guidance
    parts = ([f"CFG w={g.cfg_scale:g}"] if g.cfg_scale != 1.0 else []) + \
        ([f"RG w_r={g.rg_scale:g}"] if g.rg_scale != 1.0 else [])
    return " + ".join(parts) or "no guidance"


def rows_of(report, grid, cells) -> pd.DataFrame:
    """One row per (spec, setting, step) of the main provenance group: FD, accuracy, seeds."""

    labels, scored = {}, {}
    for cell in cells:
        for s in settings_for(grid, cell):
            labels[(cell.cfg.spec, s.name)] = setting_label(eval_config(cell, s))
            scored.setdefault((cell.cfg.spec, s.name), set()).update(s.scores(cell.eval_steps))
    main = report.cells[(report.cells["group"] == 0) & report.cells["metric"].isin([FD, ACC])]
    frame = main.pivot_table(index=["spec", "setting", "step"], columns="metric",
                             values=["mean", "half_width", "n_seeds"], aggfunc="first", dropna=False)
    frame.columns = [metric if stat == "mean" else f"{metric}_{stat.removesuffix('_seeds')}"
                     for stat, metric in frame.columns]
    frame = frame.reset_index()
    for column in (FD, ACC):
        for suffix in ("", "_half_width", "_n"):
            if column + suffix not in frame:
                frame[column + suffix] = math.nan
    pairs = [(a, b) in labels for a, b in zip(frame["spec"], frame["setting"])]
    frame = frame[pairs].copy()  # pivot_table(dropna=False) crosses every spec with every setting
    # ... and every step: keep a step a setting does not score (`steps:` in the grid) only if measured
    wanted = [step in scored[(a, b)] or np.isfinite(fd) or np.isfinite(acc) for a, b, step, fd, acc
              in zip(frame["spec"], frame["setting"], frame["step"], frame[FD], frame[ACC])]
    frame = frame[wanted].copy()
    frame["sampling"] = [labels[(a, b)] for a, b in zip(frame["spec"], frame["setting"])]
    order = {spec: i for i, spec in enumerate(grid.specs)}
    frame = frame.assign(_o=frame["spec"].map(order), _g=frame["sampling"] != "no guidance")
    return frame.sort_values(["_o", "_g", "setting", "step"]).drop(columns=["_o", "_g"])


def _with_interval(value: float, half: float, digits: int) -> str:
    if not np.isfinite(value):
        return "-"
    return f"{value:.{digits}f} ± {half:.{digits}f}" if np.isfinite(half) else f"{value:.{digits}f}"


def markdown_table(rows: pd.DataFrame) -> str:
    """spec | sampling | seeds | FD @ each step | accuracy @ each step (one row per spec and setting):
    means over the training seeds ± the half-width of their 95% t-interval."""

    steps = sorted(rows["step"].unique())
    out = []
    for (spec, sampling), part in rows.groupby(["spec", "sampling"], sort=False):
        by = part.set_index("step")
        n = pd.to_numeric(by[f"{FD}_n"], errors="coerce").max()
        line = {"spec": spec, "sampling": sampling, "seeds": int(n) if np.isfinite(n) else "-"}
        for metric, name, digits in ((FD, "FD", 2), (ACC, "acc", 3)):
            for s in steps:
                line[f"{name} @{fmt_steps(s)}"] = _with_interval(
                    by[metric].get(s, math.nan), by[f"{metric}_half_width"].get(s, math.nan), digits)
        out.append(line)
    return to_markdown(pd.DataFrame(out))


def paired_lines(paired: pd.DataFrame) -> tuple[list[str], int]:
    """The report's sentences on paired differences (FD and accuracy, at the last step measured),
    in bench.report.wording's words: 'better' only where the Holm-adjusted p < 0.05 over the
    report's family of comparisons (`paired`: bench.report.tables.paired_table). Also returns the
    family's size."""
    if paired.empty:
        return [], 0
    return paired_sentences(paired[paired["metric"].isin([FD, ACC])]), int(paired["family_size"].max())


def speedup_lines(report, rows: pd.DataFrame, baseline: str, paired: pd.DataFrame) -> list[str]:
    """The report's speed-ups, plus every guided setting against the unguided baseline.

    Each guided line follows the report's rule (bench.report.speedups): a factor only where the
    paired difference at the baseline's step, in the report's Holm family (`paired`), licenses it;
    a setting evaluated at one step gets none (one point says where the curve stands, not when it
    reached the baseline's value)."""

    lines = [f"[{s['setting']}] {s['sentence']}" for s in report.speedups]
    unguided = rows[(rows["spec"] == baseline) & (rows["sampling"] == "no guidance")]
    base = unguided.set_index("step")[FD]
    base_setting = str(unguided["setting"].iloc[0]) if len(unguided) else None
    name = dict(zip(report.conditions["spec"], report.conditions["condition"]))
    guided = rows[rows["sampling"] != "no guidance"].groupby(["spec", "setting", "sampling"])
    for (spec, setting, sampling), part in guided:
        method, base_name = name.get(spec, spec), name.get(baseline, baseline)
        curve = part.set_index("step")[FD].dropna()
        try:
            result = speedup(base, curve, method_name=f"{method} + {sampling}", baseline_name=base_name,
                             metric=FD)
        except ReportError:
            continue
        difference = paired_at(paired, setting, FD, result.baseline_step, method, base_name, base_setting)
        line = license_speedup(result, len(curve), difference)["sentence"]
        lines.append(f"[{sampling} against no guidance] {line}")
    return lines


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_convergence(rows: pd.DataFrame, evaluator: str, path: Path) -> Path:
    """FD (log steps) and accuracy against training steps: one line per spec and setting."""

    figure = _figure()
    figure.set_size_inches(11, 4)
    axes = [figure.add_subplot(1, 2, i + 1) for i in range(2)]
    for index, ((spec, sampling), part) in enumerate(rows.groupby(["spec", "sampling"], sort=False)):
        style = "--" if sampling != "no guidance" else "-"
        for axis, metric in zip(axes, (FD, ACC)):
            curve = part.dropna(subset=[metric]).sort_values("step")
            color = COLORS[index % 10]
            axis.plot(curve["step"], curve[metric], style, marker="o", color=color,
                      label=spec + ("" if sampling == "no guidance" else f" + {sampling}"))
            half = pd.to_numeric(curve[f"{metric}_half_width"], errors="coerce")
            if half.notna().any():  # the 95% t-interval over training seeds
                axis.fill_between(curve["step"], curve[metric] - half, curve[metric] + half,
                                  color=color, alpha=0.15, linewidth=0)
    for axis, label in zip(axes, (evaluator, "conditional accuracy (classifier argmax = label)")):
        log_steps_axis(axis, rows["step"].to_numpy())
        axis.set_ylabel(label, fontsize=9)
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("bench demo: convergence, mean over paired training seeds with 95% t-interval bands "
                    "(lower FD and higher accuracy are better)", fontsize=10)
    return _save_png(figure, path)


def sample_figures(report, rows: pd.DataFrame, out: Path) -> list[Path]:
    """samples_<spec>[_<setting>].png: the last step's sample grid beside its semantic maps."""
    from PIL import Image

    evals = report.gathered.evals
    written = []
    for (spec, setting, sampling), part in rows.groupby(["spec", "setting", "sampling"], sort=False):
        step = int(part["step"].max())
        hits = evals[(evals["spec"] == spec) & (evals["setting"] == setting) & (evals["step"] == step)]
        folders = [Path(f) for f in hits.get("samples_dir", pd.Series(dtype=str)).dropna().unique()]
        folder = next((f for f in folders if (f / "grid.png").is_file()), None)
        if folder is None:
            continue
        panels = [("samples", folder / "grid.png")]
        if (folder / "grid_semantic_pca.png").is_file():
            panels.append(("generated semantic channels (3 PCs as RGB)", folder / "grid_semantic_pca.png"))
        figure = _figure()
        figure.set_size_inches(5 * len(panels), 5.4)
        for index, (title, png) in enumerate(panels):
            axis = figure.add_subplot(1, len(panels), index + 1)
            axis.imshow(np.asarray(Image.open(png).convert("RGB")), interpolation="nearest")
            axis.set_title(title, fontsize=10)
            axis.axis("off")
        figure.suptitle(f"{spec}, {sampling}, step {step}", fontsize=11)
        name = f"samples_{spec}" + ("" if sampling == "no guidance" else f"_{setting}") + ".png"
        written.append(_save_png(figure, out / name))
    return written


def record_call(log: Path, times: dict, reused: dict, total: float,
                estimate: Optional[dict]) -> tuple[dict, list[dict]]:
    """Append this call's record (date, stage times, what was reused, machine, commit, estimate) to
    invocations.jsonl; returns it and the records of earlier calls."""
    record = {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "total_s": round(total, 1),
              **{f"{k}_s": round(v, 1) for k, v in times.items()}, **reused, "machine": machine(),
              "commit": git_commit(), "estimate": estimate}
    history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] \
        if log.is_file() else []
    atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in [*history, record]))
    return record, history


def call_lines(plan, record: dict, history: list[dict], times: dict, total: float, did: str,
               estimate: Optional[dict]) -> list[str]:
    """The summary's list of what this call was: date, machine, data, time, the first call, the estimate."""
    m, first = record["machine"], history[0] if history else record
    return [
        f"- date: {record['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}, {m['platform']}"
        + (f"; CPU kernels {m['kernels']}, the CPU has native bf16: {'yes' if m['bf16_native'] else 'no'}"
           if "kernels" in m else "")
        + (f" (flags {' '.join(m['cpu_flags'])})" if m.get("cpu_flags") else ""),
        f"- data: {plan.prepare_note}",
        f"- this call: {total / 60:.1f} min ("
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()) + f" min); {did}",
        *([f"- first call in this folder: {first['total_s'] / 60:.1f} min on {first['date']}"]
          if history else []),
        *([f"- jobs: {estimate['lanes']} at a time, {estimate['threads']} compute thread(s) each; "
           f"estimated before any work (a {estimate['calibration_s']:.0f} s measurement of this machine): "
           f"prepare {estimate['prepare_s'] / 60:.1f}, train {estimate['train_s'] / 60:.1f}, "
           f"eval {estimate['eval_s'] / 60:.1f} min"] if estimate else [])]


def seeds_note(cells) -> str:
    """What the grid's seed count allows: the 95% t quantile its intervals are built with."""
    from scipy import stats

    n = len({cell.cfg.train.seed for cell in cells})
    if n < 2:
        return "With one seed there is no interval: the demo shows the machinery, not which method wins."
    return (f"With {n} seeds the t-interval is wide (t = {stats.t.ppf(0.975, n - 1):.2f} for {n - 1} "
            f"degree{'s' if n > 2 else ''} of freedom): the demo shows the machinery, not which method "
            "wins; `results/studies/embedded/confirm/` tests that on five seeds.")


def write_outputs(plan, grid, cells, times: dict, reused: dict, began: float,
                  estimate: Optional[dict] = None) -> str:
    """Run the report, draw the figures, write summary.md; returns the text to print. `estimate`:
    what the calibration predicted for this call (seconds per stage), recorded beside the real times."""

    out = plan.out_dir
    report = summarize(gather(plan.grid, plan.runs_root))
    write_report(report, out / "report")
    rows = rows_of(report, grid, cells)
    atomic_write_text(out / "table.csv", rows.to_csv(index=False))
    evaluator = report.cells.loc[report.cells["metric"] == FD, "evaluator"]
    plot_convergence(rows, evaluator.iloc[0] if len(evaluator) else "FD", out / "convergence.png")
    figures = sample_figures(report, rows, out)
    times = {**times, "report": time.time() - began - sum(times.values())}
    total = time.time() - began
    record, history = record_call(out / "invocations.jsonl", times, reused, total, estimate)
    paired_rows = paired_table(report)
    table, speedups = markdown_table(rows), speedup_lines(report, rows, grid.baseline or "latent_only", paired_rows)
    paired, family = paired_lines(paired_rows)
    did = (f"reused: prepare {'yes' if reused['prepare'] else 'no'}, "
           f"{reused['cells'] - reused['trained']}/{reused['cells']} trained cells, "
           f"evaluations run now: {reused['evaluated']}")
    lines = [
        f"# {grid.title}", "", *call_lines(plan, record, history, times, total, did, estimate),
        f"- evaluator: {evaluator.iloc[0] if len(evaluator) else 'FD'} against the test split; "
        "accuracy = share of samples the classifier assigns to their conditioning class", "",
        table, "", "Speed-ups (FD; \"reaches the baseline's final FD N times sooner\", or its best FD "
        "where the baseline got worse with training; interpolated in log steps, docs/method.md; a factor "
        "only where the paired difference at the baseline's step has a Holm-adjusted p < 0.05 over the "
        "family below and the method was evaluated at two steps or more, else why there is none):", "",
        *(f"- {s}" for s in speedups or ["none measurable yet"]), "",
        "Paired differences (method − baseline, seed k of every spec shares its data order, noise and "
        "evaluation labels; 95% t-interval over the pairs and the paired t-test's p; the comparisons "
        f"of `report/report.md` are one family, {family} tests, corrected by Holm's step-down method; "
        "a method is called better only where the Holm-adjusted p < 0.05, marked ✱; an interval "
        "that contains 0 shows no difference in either direction):", "",
        *(paired or ["- none measurable yet (needs a seed measured for both)"]), "",
        seeds_note(cells), "",
        "Files: `convergence.png`, " + ", ".join(f"`{p.name}`" for p in figures)
        + ", `table.csv`, `report/` (`bench report` of this grid: report.md, CSV, LaTeX, plots).", ""]
    atomic_write_text(out / "summary.md", "\n".join(lines))
    return "\n".join([f"\n{grid.title}\n", table, "", *speedups, "", *paired, "",
                      f"this call: {total / 60:.1f} min; {did}", f"summary: {out / 'summary.md'}"])
