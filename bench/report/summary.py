"""`bench report NAME`: a grid's runs as tables beside the paper's numbers, plots and speed-ups.

Reads only `results/` (run folders and `results/paper/`) and the grid's YAML; imports nothing from
training (the report layer reads files only). Three tidy tables come first, as in lingua's `analysis.py`:
`runs` (one row per run, config.json flattened with `pd.json_normalize`), `metrics` (metrics.jsonl)
and `evals` (eval.jsonl joined with its run's config). Everything else is computed from them:

- a row is a *condition* (spec plus every result-changing setting that varies within a spec,
  seed excepted) at an evaluated step; its seeds give a mean and a 95% t-interval;
- eval rows whose provenance (evaluator, reference, sample count, sampler, guidance, weights)
  differs are never averaged; per (setting, metric) the main table holds one evaluator (that of
  the largest provenance group) and one provenance per condition; every other row is set apart
  in its own table, with the fields that differ;
- the paper's number gets a difference only when the setting is the paper's (ImageNet 256,
  Inception, 50K samples, same table, model, method, iterations); otherwise the paper's number of
  the corresponding full-scale setting is shown once, as labelled context, with no difference;
- the speed-up "reaches the baseline's final FID N times sooner" (Fig. 2) is interpolated linearly
  in log(step) on the method's seed-mean curve, and stated only where the paired difference at the
  baseline's step survives the report's Holm correction (bench/report/speedups.py).

The work is split over the modules of bench/report/: `vocabulary` (the shared words), `conditions`
(conditions and provenance groups), `published` and `paper_match` (the paper's numbers), `stats`
(seed statistics and speed-ups), `speedups` (which factors may be stated) and `tables` (Markdown,
LaTeX, CSV); this file gathers a grid's run folders into tidy tables, summarizes them into a
`Report` (bench/report/tidy_tables.py; its cells through `cell_table`) and holds the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from bench import runfolder
from bench.atomic import OutputPathError, check_writable_dir
from bench.launch import grids
from bench.report.cell_table import CellTable
from bench.report.comparability import ACCEPTABLE, check_accept
from bench.report.conditions import (
    label_runs,
    per_run_values,
)
from bench.report.paper_match import (
    load_paper,
    paper_tables,
    published_only,
)
from bench.report.speedups import license_speedups
from bench.report.stats import find_speedups, without_sampling_seed_settings
from bench.report.tables import (
    blocks,
    not_comparable_lines,
    paired_table,
    to_markdown,
    write_report,
)
from bench.report.tidy_tables import CELL_COLUMNS, Gathered, Report
from bench.report.vocabulary import (
    EVAL_ALIASES,
    PROVENANCE_FIELDS,
    SEED_COLUMN,
    ReportError,
    metric_rank,
)
from bench.site import load_site
from bench.storage import guard

# ------------------------------------------------------------------------------------------------
# Run folders: results/runs/<grid>/<spec>-<hash>/ (bench.runfolder)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a run folder's JSONL log (bench.runfolder's policy: a torn last line is skipped, a
    corrupt line in the middle is an error naming the file and line)."""
    try:
        return runfolder.read_jsonl(path)
    except runfolder.RunFolderError as err:
        raise ReportError(str(err)) from None


def flatten_config(config: dict) -> dict[str, Any]:
    """One flat row of a config.json (keys joined with '.'); lists become JSON text."""
    flat = pd.json_normalize(config, sep=".").iloc[0].to_dict()
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()}


def load_grid_spec(name: str, runs_root: Path) -> tuple[dict, list[tuple[Path, Any, Any, Any]] | None]:
    """The grid's fields and its expected runs (folder, config, eval steps, names of the eval
    settings whose `match` the run satisfies) via bench.launch.grids.

    Without the grid's YAML (a folder of runs from elsewhere) the expected runs are None: the report
    then shows the folders that exist and cannot list runs that were never started.
    """
    if name not in grids.list_grids():
        return {"name": name}, None
    grid = grids.load_grid(name)
    fields = {k: getattr(grid, k) for k in ("name", "regenerates", "specs", "axes", "eval", "paper", "baseline")}
    # Re-rooted: the grid knows results/runs, the user may pass --runs-root.
    expected = [(runs_root / name / cell.run_dir.name, dataclasses.asdict(cell.cfg), cell.eval_steps,
                 [s.name for s in grids.settings_for(grid, cell)]) for cell in grids.expand(grid)]
    return fields, expected


def gather(name: str, runs_root: str | Path = "results/runs", grid: dict | None = None) -> Gathered:
    """Every run of grid `name` as the tidy tables runs, metrics and evals.

    `grid` (the YAML's fields as a dict) replaces reading ablations/grids/NAME.yaml; the runs are
    then the folders found under `runs_root/NAME`.
    """
    runs_root = Path(runs_root)
    expected = None
    if grid is None:
        grid, expected = load_grid_spec(name, runs_root)
    found = sorted(p for p in (runs_root / name).glob("*")
                   if p.is_dir() and not p.name.startswith("."))
    notes = []
    if expected is None:
        if not found and not (runs_root / name).is_dir():
            raise ReportError(f"unknown grid {name!r}: no ablations/grids/{name}.yaml and no run "
                              f"folders under {runs_root / name}; known grids: {grids.list_grids()}")
        expected = [(p, None, None, None) for p in found]
        notes.append("runs never started are not listed: the rows come from the run folders "
                     f"found, not from bench.launch.grids.expand({name!r})")
    elif stray := sorted({p.name for p in found} - {folder.name for folder, *_ in expected}):
        notes.append(f"run folders not in the grid (ignored): {', '.join(stray)}")
    if not expected:
        raise ReportError(f"no runs for grid {name!r} under {runs_root / name}; train some first "
                          f"(`bench grid {name}`) or pass output_root=DIR")
    run_rows, metric_rows, eval_rows = [], [], []
    for folder, config, eval_steps, settings in expected:
        ticks = [{"run": folder.name, **t} for t in read_jsonl(folder / runfolder.METRICS_FILE)]
        metric_rows += ticks
        # guidance as canonical JSON text: one provenance field, not flattened into columns
        eval_rows += [{"run": folder.name, **{EVAL_ALIASES.get(k, k): v for k, v in r.items()},
                       "guidance": json.dumps(r.get("guidance"), sort_keys=True)}
                      for r in read_jsonl(folder / runfolder.EVAL_FILE)]
        run_rows.append({**_run_row(folder, config, ticks),
                         "expected_steps": json.dumps(sorted(int(s) for s in eval_steps or [])),
                         "expected_settings": None if settings is None else json.dumps(settings)})
    runs = pd.DataFrame(run_rows)
    metrics = pd.DataFrame(metric_rows) if metric_rows else pd.DataFrame(columns=["run", "step"])
    # Only the run's identity columns: the full config per log tick would be mostly repetition.
    ids = [c for c in ("run", "spec", SEED_COLUMN) if c in runs.columns]
    metrics = metrics.merge(runs[ids], on="run", how="left", suffixes=("", ".run"))
    evals = pd.json_normalize(eval_rows, sep=".") if eval_rows else pd.DataFrame(
        columns=["run", "step", "metric", "value"])
    for column in (*PROVENANCE_FIELDS, "setting", "seed", "created_at"):
        if column not in evals.columns:
            evals[column] = None
    evals = evals.merge(runs, on="run", how="left", suffixes=("", ".run"))
    return Gathered(name, dict(grid), runs, metrics, evals, notes)


def gather_from_csv(name: str, folder: str | Path, grid: dict | None = None) -> Gathered:
    """The tidy tables a report wrote (`runs.csv`, `metrics.csv`, `evals.csv` in `folder`) read
    back, so that a checked-in report regenerates with the current code without its run folders
    (`bench report NAME --from-csv DIR`). The grid's fields come from its YAML as in `gather`
    unless `grid` gives them."""
    folder = Path(folder)
    grid = grid if grid is not None else load_grid_spec(name, Path("results/runs"))[0]
    frames = {}
    for table in ("runs", "metrics", "evals"):
        path = folder / f"{table}.csv"
        if not path.is_file():
            raise ReportError(f"--from-csv {folder}: no {table}.csv there; give the folder of a report "
                              "that `bench report` wrote (it holds runs.csv, metrics.csv and evals.csv)")
        frames[table] = pd.read_csv(path)
    return Gathered(name, dict(grid), frames["runs"], frames["metrics"], frames["evals"], [])


def _run_row(folder: Path, config: dict | None, ticks: list[dict]) -> dict[str, Any]:
    try:
        config = runfolder.read_config_json(folder) or config
    except runfolder.RunFolderError as err:
        raise ReportError(str(err)) from None
    status = ("done" if runfolder.is_done(folder) else "training" if ticks
              else "started" if folder.is_dir() else "not started")
    last_step = max((int(t["step"]) for t in ticks if "step" in t), default=None)
    row = {"run": folder.name, "run_dir": str(folder), "status": status, "last_step": last_step}
    if not config:
        return row
    flat = flatten_config(config)
    return {**row, **flat, "trained_precision": trained_precision(folder, flat.get("train.precision"))}


def trained_precision(folder: Path, setting: Any) -> str:
    """fp32 or bf16 as the run trained: the config's choice, or for `auto` what the trainer resolved
    (recorded in each checkpoint's state.json); "auto (unresolved)" when no checkpoint says."""
    if setting in ("fp32", "bf16"):
        return str(setting)
    for meta in sorted((folder / "checkpoints").glob("*/state.json"), reverse=True):
        try:
            resolved = json.loads(meta.read_text(encoding="utf-8")).get("state", {}).get("precision")
        except (OSError, json.JSONDecodeError):
            continue
        if resolved in ("fp32", "bf16"):
            return str(resolved)
    return f"{setting} (unresolved)"


# ------------------------------------------------------------------------------------------------
# The summary every output is rendered from


def summarize(g: Gathered, metric: str | None = None, paper: pd.DataFrame | None = None,
              accept: Sequence[str] = ()) -> Report:
    """Aggregate seeds, separate provenance groups, attach the paper's numbers, find speed-ups.

    `accept` names differences from the paper's protocol the user waives (`--accept bf16`)."""
    runs, conditions = label_runs(g.runs, g.grid)
    values = per_run_values(g.evals).merge(runs[["run", "condition"]], on="run", how="left")
    # `bench eval --sampling-seeds` rows (setting '<name>+seed=<k>') measure evaluation noise of one
    # checkpoint; tables.py shows them in their own section, not as settings of the grid.
    values = without_sampling_seed_settings(values)
    metric = _primary_metric(values, metric, g.name)
    notes = list(g.notes)
    paper = load_paper(notes) if paper is None else paper
    tables = paper_tables(g.grid)
    if not tables:
        notes.append("the grid does not say which paper table it regenerates: no paper column")
    notes += [f"--accept {a}: rows differing from the paper only in {ACCEPTABLE[a]} are counted "
              "as comparable, at the user's request" for a in check_accept(accept)]
    builder = CellTable.for_grid(g.grid, runs, conditions, paper, tables, accept)
    for (setting, name), frame in values.groupby(["setting", "metric"], sort=True):
        builder.add_setting(setting, name, frame)
    builder.list_unmeasured_settings(set(values["setting"]))
    cells = pd.DataFrame(builder.rows, columns=CELL_COLUMNS)
    final = {c: (steps[-1] if steps else None) for c, steps in builder.expected.items()}
    # Methods the grid trains (at any size: a miniature grid stands for the full-scale rows)
    trained = set(runs["spec"].dropna()) if "spec" in runs else set()
    published = published_only(paper, tables, trained | ({"redi"} if "redi_rg" in trained else set()))
    report = Report(g, metric, conditions, cells, [], builder.missing, notes, published)
    # A factor read off seed means is stated only where the paired test behind it licenses it.
    report.speedups = license_speedups(find_speedups(cells, conditions, metric, g.grid, final),
                                       paired_table(report))
    return report


def _primary_metric(values: pd.DataFrame, metric: str | None, grid_name: str) -> str:
    """The metric of plots and speed-ups: the one asked for, else FID, else a classifier FD."""
    measured = sorted(values["metric"].dropna().unique(), key=metric_rank)
    metric = metric or next((m for m in ("fid", "fd_classifier", "fd_dinov2") if m in measured),
                            measured[0] if measured else "fid")
    if measured and metric not in measured:
        raise ReportError(f"--metric {metric!r} was not measured in grid {grid_name!r}; "
                          f"measured metrics: {measured}")
    return metric


def main(argv: Sequence[str] | None = None) -> int:
    """`bench report NAME [output_root=R] [--out O] [--metric M]`: print the tables, write files."""
    parser = argparse.ArgumentParser(prog="bench report", description="Tables beside the paper's "
                                     "numbers, convergence plots and speed-ups of one grid.")
    parser.add_argument("name", metavar="NAME", help="grid name (ablations/grids/NAME.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="output_root=DIR",
                        help="where the run folders are, as given to `bench grid` and `bench status` "
                        "(default: the site file's output_root, else results/runs)")
    parser.add_argument("--runs-root", default=None, help=argparse.SUPPRESS)  # deprecated spelling
    parser.add_argument("--out", default="results/reports", help="files go to OUT/NAME "
                        "(default: %(default)s)")
    parser.add_argument("--metric", default=None, help="primary metric of plots and speed-ups "
                        "(default: fid if measured, else fd_classifier)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--from-csv", metavar="DIR", default=None, help="regenerate from the runs.csv, "
                        "metrics.csv and evals.csv an earlier report wrote to DIR, not from run folders")
    parser.add_argument("--accept", action="append", default=[], choices=sorted(ACCEPTABLE),
                        help="count rows that differ from the paper's protocol only in this as "
                        "comparable (bf16: runs trained with bf16 autocast); repeatable")
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    runs_root = load_site().paths.get("output_root", "results/runs")  # bench.site: paths said once
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key.strip() != "output_root" or not _:
            parser.error(f"{item!r}: bench report takes only output_root=DIR (the run folders' root)")
        runs_root = value
    if args.runs_root is not None:
        print(f"bench report: --runs-root is deprecated; write output_root={args.runs_root} as for "
              "`bench grid` and `bench status`", file=sys.stderr)
        runs_root = args.runs_root
    try:
        if not runs_root.strip():
            raise ReportError("output_root is empty; give the folder that holds the run folders")
        check_writable_dir(Path(args.out) / args.name, "--out")
        gathered = gather_from_csv(args.name, args.from_csv) if args.from_csv else gather(args.name, runs_root)
        report = summarize(gathered, args.metric, accept=args.accept)
        with guard(Path(args.out) / args.name):  # a removed folder is one error, not re-created
            out = write_report(report, Path(args.out) / args.name, plots=not args.no_plots)
    except (ReportError, OutputPathError) as err:
        print(f"bench report: error: {err}", file=sys.stderr)
        return 2
    for setting, title, _, table in blocks(report):
        print(f"\n{args.name}, setting {setting}: {title}\n{to_markdown(table)}")
    for line in not_comparable_lines(report):
        print(line)
    for s in report.speedups:
        print(f"speed-up [{s['setting']}]: {s['sentence']}")
    if report.missing:
        nothing = "nothing measured yet" if report.gathered.evals.empty else "not measured yet"
        print(f"{nothing}: {len(report.missing)} cells (listed in report.md)")
    print(f"wrote {out}")
    return 0
