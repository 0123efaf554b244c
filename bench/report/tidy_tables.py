"""The records `bench report` passes between its modules: the tidy tables of a grid (`Gathered`)
and their summary (`Report`), which tables.py and plots.py render."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass
class Gathered:
    """The tidy tables of one grid."""

    name: str
    grid: dict
    runs: pd.DataFrame      # one row per run: run, run_dir, status, last_step, flattened config
    metrics: pd.DataFrame   # one row per metrics.jsonl tick, with run, spec and train.seed
    evals: pd.DataFrame     # one row per eval.jsonl row (guidance as canonical JSON) + run columns
    notes: list[str]


@dataclass
class Report:
    """A grid's results, ready to render."""

    gathered: Gathered
    metric: str                # the primary metric (plots, speed-ups)
    conditions: pd.DataFrame   # condition, spec, model, axes..., runs, n_runs, status
    cells: pd.DataFrame        # one row per (setting, metric, provenance group, condition, step)
    speedups: list[dict]
    missing: list[str]
    notes: list[str]
    published: pd.DataFrame = field(default_factory=pd.DataFrame)
    """Rows of the regenerated paper tables this grid does not train (Table 2's other systems):
    shown as published, marked so."""


CELL_COLUMNS = ["setting", "metric", "group", "provenance", "set_apart_reason", "evaluator",
                "condition", "spec", "step", "n_seeds", "n_runs", "mean", "half_width", "ci_low",
                "ci_high", "seeds", "paper", "paper_comparable", "paper_exact", "paper_label",
                "paper_reason", "diff"]
