"""The cells table of `bench report`: one row per (setting, metric, provenance group, condition,
step) with its seed mean, 95% t-interval and the paper's number beside it, and the list of cells
the grid expects that are not measured yet. bench.report.summary.summarize fills it setting by
setting (`CellTable.add_setting`) from the per-run values of bench.report.conditions."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd

from bench.report.conditions import assign_groups, evaluator_label, provenance_difference, rank_provenance
from bench.report.paper_match import PaperMatch, match_paper
from bench.report.stats import mean_ci95, split_sampling_seed_setting
from bench.report.vocabulary import SEED_COLUMN


@dataclass
class CellTable:
    """The rows of the cells table (one per setting, metric, provenance group, condition and step)
    and the cells still to measure, built from a grid's per-run values."""

    grid: dict
    paper: pd.DataFrame
    tables: list[str]
    accept: Sequence[str]
    conditions: list[str]
    applies: dict[str, set[str]]    # condition -> the settings the grid gives it (absent: every one)
    only: dict[str, set[int]]       # setting -> the only steps it scores
    expected: dict[str, list[int]]  # condition -> the steps the grid evaluates
    configs: pd.DataFrame           # one flattened config per condition
    seed_of: dict[str, Any]         # run -> train.seed
    n_runs: dict[str, int]
    rows: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @classmethod
    def for_grid(cls, grid: dict, runs: pd.DataFrame, conditions: pd.DataFrame, paper: pd.DataFrame,
                 tables: list[str], accept: Sequence[str]) -> CellTable:
        names = list(conditions["condition"])
        grid_steps = sorted({int(s) for s in ((grid.get("eval") or {}).get("steps") or [])})
        return cls(grid, paper, tables, accept, names, _settings_per_condition(runs), _setting_steps(grid),
                   expected={c: json.loads(t) or grid_steps for c, t in zip(names, conditions["expected_steps"])},
                   configs=runs.dropna(subset=["spec"]).groupby("condition").first()
                   if "spec" in runs else pd.DataFrame(),
                   seed_of=dict(zip(runs["run"], runs[SEED_COLUMN])) if SEED_COLUMN in runs else {},
                   n_runs=dict(zip(names, conditions["n_runs"])))

    def expected_for(self, setting: str, condition: str) -> list[int]:
        return [s for s in self.expected[condition] if setting not in self.only or s in self.only[setting]]

    def applies_to(self, setting: str, condition: str) -> bool:
        """False where the grid's `match` does not give this condition that setting."""
        return setting in self.applies.get(condition, {setting})

    def add_setting(self, setting: str, name: str, frame: pd.DataFrame) -> None:
        """The cells of one (setting, metric): every condition's main provenance group at the steps
        the grid expects (or the main group's steps), then each set-apart group where measured."""
        main, apart = assign_groups(frame)
        fallback = rank_provenance(frame)[0]
        in_main = [main.get(c) == p for c, p in zip(frame["condition"], frame["provenance"])]
        main_steps = sorted(frame.loc[in_main, "step"].unique())
        for condition in (c for c in self.conditions if self.applies_to(setting, c)):
            provenance = main.get(condition, fallback)
            own = frame[(frame["condition"] == condition) & (frame["provenance"] == provenance)]
            steps = sorted({*(self.expected_for(setting, condition) or main_steps), *own["step"]})
            self.add(setting, name, 0, "", condition, provenance, steps, frame)
        for index, provenance in enumerate(apart, start=1):
            part = frame[frame["provenance"] == provenance]
            for condition in self.conditions:
                if main.get(condition) == provenance or condition not in set(part["condition"]):
                    continue
                reason = provenance_difference(provenance, main.get(condition, fallback))
                steps = sorted(part.loc[part["condition"] == condition, "step"].unique())
                self.add(setting, name, index, reason, condition, provenance, steps, part)

    def add(self, setting: str, name: str, group: int, reason: str, condition: str,
            provenance: str, steps: Sequence[int], part: pd.DataFrame) -> None:
        """One row per step of `condition`'s values of `provenance` in `part`."""
        cfg = self.configs.loc[condition].to_dict() if condition in self.configs.index else {}
        for step in steps:
            cell = part[(part["condition"] == condition) & (part["step"] == step)
                        & (part["provenance"] == provenance)]
            mean, half, n = mean_ci95(cell["value"])
            if n == 0:
                self.missing.append(f"{setting}/{name}: {condition} at step {step}")
            match = self.paper_match(cfg, provenance, name, step, final=steps[-1])
            self.rows.append({
                "setting": setting, "metric": name, "group": group, "provenance": provenance,
                "set_apart_reason": reason, "condition": condition, "spec": cfg.get("spec"),
                "evaluator": evaluator_label(name, provenance, cfg.get("data.name")),
                "step": int(step), "n_seeds": n, "n_runs": self.n_runs[condition], "mean": mean,
                "half_width": half, "ci_low": mean - half, "ci_high": mean + half,
                "seeds": json.dumps(sorted(int(self.seed_of[r]) for r in cell["run"] if r in self.seed_of)),
                "paper": match.value if match else math.nan,
                "paper_comparable": bool(match and match.comparable),
                "paper_exact": bool(match and match.same_step),
                "paper_label": match.label if match else "",
                "paper_reason": match.reason if match else "",
                "diff": mean - match.value if match and match.comparable else math.nan})

    def paper_match(self, cfg: dict, provenance: str, name: str, step: int, final: int) -> PaperMatch | None:
        """The paper's number beside the cell; context of another length only at the final step."""
        if not cfg:
            return None
        match = match_paper(self.paper, self.tables, cfg, provenance, name, step,
                            self.grid.get("paper"), self.accept)
        if match and not match.same_step and step != final:
            return None  # context of another length is shown once, at the final length
        return match

    def list_unmeasured_settings(self, measured: set[str]) -> None:
        """Every expected cell of a grid setting with no value at all is still to measure."""
        for name in dict.fromkeys(_grid_settings(self.grid)):
            if name in measured or split_sampling_seed_setting(name) is not None:
                continue
            todo = [f"setting {name}: {c} at step {step} (nothing measured in this setting yet)"
                    for c in self.conditions if self.applies_to(name, c)
                    for step in self.expected_for(name, c)]
            self.missing += todo or [f"setting {name}: nothing measured yet"]


def _grid_settings(grid: dict) -> list[str]:
    settings = (grid.get("eval") or {}).get("settings") or []
    return [str(s.get("name")) if isinstance(s, dict) else str(s) for s in settings]


def _setting_steps(grid: dict) -> dict[str, set[int]]:
    """setting -> the only steps it scores, for settings the grid restricts (`steps:`)."""
    settings = (grid.get("eval") or {}).get("settings") or []
    return {str(s["name"]): {int(v) for v in s["steps"]} for s in settings
            if isinstance(s, dict) and s.get("steps")}


def _settings_per_condition(runs: pd.DataFrame) -> dict[str, set[str]]:
    """condition -> the eval settings the grid applies to its runs (absent: every setting)."""
    if "expected_settings" not in runs or "condition" not in runs:
        return {}
    out: dict[str, set[str]] = {}
    for condition, part in runs.groupby("condition", sort=False):
        texts = [t for t in part["expected_settings"] if isinstance(t, str)]
        if len(texts) == len(part):  # every run of it came from the grid
            out[condition] = {name for text in texts for name in json.loads(text)}
    return out
