"""`bench report NAME`: a grid's runs as tables beside the paper's numbers, plots and speed-ups.

Reads only `results/` (run folders and `results/paper/`) and the grid's YAML; imports nothing from
training (style_anchors §8). Three tidy tables come first, as in lingua's `analysis.py`:
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
  in log(step) on the method's seed-mean curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from bench.config import ExperimentConfig


class ReportError(ValueError):
    """A run folder, grid or option the report cannot use; the message says what to fix."""


# Eval-row fields that change the number: the provenance key (`weights`, EMA or raw, is added to
# the list). Evaluator fields must agree across a whole column. Sampling fields must agree
# within a cell (the seeds that are averaged); across rows they may differ where the grid's setting
# says so (Table 4 scores B with w_r = 1.5 and XL with w_r = 1.1) and are then shown per row.
EVALUATOR_FIELDS = ("feature_network", "feature_weights_sha256", "reference_sha256", "n_samples",
                    "backend")
SAMPLING_FIELDS = ("sampler", "num_sampling_steps", "guidance", "weights")
PROVENANCE_FIELDS = EVALUATOR_FIELDS + SAMPLING_FIELDS
# Metric names as bench.evaluate records them: the suffix names the feature network
# (fid = FD on Inception; fd_classifier, kid_dinov2, precision_classifier, is_classifier, ...).
METRIC_ORDER = ("fid", "fd", "sfid", "is", "kid", "precision", "recall", "accuracy")  # by family
METRIC_LABELS = {"fid": "FID", "fd": "FD", "sfid": "sFID", "is": "IS", "kid": "KID",
                 "precision": "Precision", "recall": "Recall", "accuracy": "Accuracy"}
HIGHER_IS_BETTER = frozenset({"accuracy", "is", "precision", "recall"})  # families; others: lower
DECIMALS = {"kid": 4, "accuracy": 3, "precision": 3, "recall": 3}  # by family; others: 2
PAPER_METRICS = frozenset({"fid", "sfid", "is", "precision", "recall"})  # bench.paper VOCABULARY
# eval.jsonl field names of bench.evaluate -> the names used here (the names).
EVAL_ALIASES = {"n": "n_samples", "sampling_steps": "num_sampling_steps"}
SPEC_ORDER = ("latent_only", "repa", "redi", "redi_repa", "redi_rg")
SPEC_SUFFIX = {"latent_only": "", "repa": " w/ REPA", "redi": " w/ ReDi",
               "redi_repa": " w/ REPA + ReDi", "redi_rg": " w/ ReDi (p_drop)"}
BASELINE_SPECS = ("latent_only", "repa")  # the slower runs of the paper's Fig. 2 claims
DATA_NAMES = {"fashion_mnist": "Fashion-MNIST", "imagefolder": "ImageNet"}
SIZE_RANK = {"B": 0, "L": 1, "XL": 2}
NOT_MEASURED = "not measured"
SEED_COLUMN = "train.seed"


def metric_family(metric: str) -> str:
    """'fd_classifier' -> 'fd', 'kid_dinov2' -> 'kid', 'fid' -> 'fid'."""
    return str(metric).split("_")[0]


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric_family(metric), metric)


def is_lower_better(metric: str) -> bool:
    return metric_family(metric) not in HIGHER_IS_BETTER


def _decimals(metric: str, value: float = 0.0) -> int:
    """The metric's usual decimals, more when needed to show 3 significant digits (tiny FDs)."""
    needed = 2 - math.floor(math.log10(abs(value))) if np.isfinite(value) and value != 0 else 0
    return min(max(DECIMALS.get(metric_family(metric), 2), needed), 6)


# ------------------------------------------------------------------------------------------------
# Seed statistics and the speed-up


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

    @property
    def reached(self) -> bool:
        return self.step is not None

    def describe(self) -> str:
        """One sentence in the paper's words, with the points used."""
        head = (f"{self.method} vs {self.baseline}'s final {self.metric} {self.target:.4g} "
                f"(at {fmt_steps(self.baseline_step)})")
        if not self.reached:
            return f"{head}: not reached ({self.note})"
        points = ", ".join(f"{fmt_steps(s)}: {v:.4g}" for s, v in self.points)
        return (f"{head}: reached {self.factor:.2f}x sooner, at {fmt_steps(self.step)} "
                f"(points {points}; {self.note})")


def speedup(baseline: pd.Series, method: pd.Series, *, lower_is_better: bool = True,
            method_name: str = "method", baseline_name: str = "baseline",
            metric: str = "fid") -> SpeedUp:
    """The speed-up factor as the paper states it, by linear interpolation in log(step).

    `baseline` and `method` map step (> 0) to value, e.g. seed-mean FID. The target is the
    baseline's value at its last step S_b. The first segment (s0, f0) -> (s1, f1) of the method's
    curve that reaches the target gives log s* = log s0 + (f0 - target) / (f0 - f1) * (log s1 -
    log s0) and the factor S_b / s*. If the first point already reaches it, s* = s0 (a lower bound).
    """
    base, curve = _clean_curve(baseline, "baseline"), _clean_curve(method, "method")
    target, baseline_step = float(base.iloc[-1]), int(base.index[-1])
    sign = 1.0 if lower_is_better else -1.0  # reached when sign * value <= sign * target
    steps, values = curve.index.to_numpy(np.float64), curve.to_numpy(np.float64)
    common = dict(method=method_name, baseline=baseline_name, metric=metric, target=target,
                  baseline_step=baseline_step)
    if sign * values[0] <= sign * target:
        return SpeedUp(**common, step=steps[0], factor=baseline_step / steps[0],
                       points=((steps[0], values[0]),),
                       note="reached at the first evaluated step: the factor is a lower bound")
    for i in range(1, len(steps)):
        if sign * values[i] <= sign * target:
            s0, s1, f0, f1 = steps[i - 1], steps[i], values[i - 1], values[i]
            fraction = (f0 - target) / (f0 - f1)
            step = math.exp(math.log(s0) + fraction * (math.log(s1) - math.log(s0)))
            return SpeedUp(**common, step=step, factor=baseline_step / step,
                           points=((s0, f0), (s1, f1)), note="interpolated in log(step)")
    best = values.min() if lower_is_better else values.max()
    return SpeedUp(**common, step=None, factor=None, points=((steps[-1], values[-1]),),
                   note=f"best {best:.4g} by {fmt_steps(steps[-1])}")


def _clean_curve(curve: pd.Series, name: str) -> pd.Series:
    curve = curve.dropna().sort_index()
    if curve.empty:
        raise ReportError(f"the {name} curve has no measured points")
    if (curve.index.to_numpy(np.float64) <= 0).any():
        raise ReportError(f"the {name} curve has a step <= 0; log-step interpolation needs > 0")
    return curve


def fmt_steps(step: float) -> str:
    """Iterations as the paper prints them: 250, 1K, 400K, 7M."""
    for unit, scale in (("M", 1e6), ("K", 1e3)):
        if step >= scale:
            return f"{step / scale:.3g}{unit}"
    return str(int(step)) if float(step).is_integer() else f"{step:.3g}"


# ------------------------------------------------------------------------------------------------
# Run folders: results/runs/<grid>/<spec>-<hash>/{config.json, metrics.jsonl, eval.jsonl, DONE}


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; an unterminated last line (a writer mid-append) is skipped."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ReportError(f"{path} line {number}: not valid JSON ({err}); fix or delete "
                              "that line") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path} line {number}: expected a JSON object, got "
                              f"{type(row).__name__}")
        rows.append(row)
    return rows


def non_identity_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """Dotted config keys that do not change results (`identity=False` in bench/config.py)."""
    keys = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("identity", True):
            keys.append(prefix + f.name)
        elif dataclasses.is_dataclass(f.default_factory):  # a nested config section
            keys += non_identity_keys(f.default_factory, f"{prefix}{f.name}.")
    return keys


def flatten_config(config: dict) -> dict[str, Any]:
    """One flat row of a config.json (keys joined with '.'); lists become JSON text."""
    flat = pd.json_normalize(config, sep=".").iloc[0].to_dict()
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()}


def load_grid_spec(name: str, runs_root: Path) -> tuple[dict, list[tuple[Path, Any, Any]] | None]:
    """The grid's fields and its expected runs (folder, config, eval steps) via bench.grids.

    Without the YAML or bench.grids, the expected runs are None: the report then shows the
    folders that exist and cannot list runs that were never started.
    """
    from bench.compose import ABLATIONS_DIR

    path = ABLATIONS_DIR / "grids" / f"{name}.yaml"
    if not path.is_file():
        return {"name": name}, None
    try:
        from bench import grids
    except ModuleNotFoundError as err:
        if err.name != "bench.grids":
            raise
        import yaml

        return dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {}), None
    grid = grids.load_grid(name)
    fields = grid if isinstance(grid, dict) else {
        k: getattr(grid, k) for k in ("name", "regenerates", "specs", "axes", "eval", "paper",
                                      "baseline") if hasattr(grid, k)}
    expected = []
    for cell in grids.expand(grid):
        def get(key: str) -> Any:
            return cell.get(key) if isinstance(cell, dict) else getattr(cell, key, None)
        if get("run_dir") is None:
            raise ReportError(f"bench.grids.expand({name!r}) returned a cell without run_dir")
        cfg = get("config") if get("config") is not None else get("cfg")
        cfg = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
        # Re-rooted: the grid knows results/runs, the user may pass --runs-root.
        expected.append((runs_root / name / Path(get("run_dir")).name,
                         cfg if isinstance(cfg, dict) else None, get("eval_steps")))
    return dict(fields), expected


@dataclass
class Gathered:
    """The tidy tables of one grid."""

    name: str
    grid: dict
    runs: pd.DataFrame      # one row per run: run, run_dir, status, last_step, flattened config
    metrics: pd.DataFrame   # one row per metrics.jsonl tick, with run, spec and train.seed
    evals: pd.DataFrame     # one row per eval.jsonl row (guidance as canonical JSON) + run columns
    notes: list[str]


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
        expected = [(p, None, None) for p in found]
        notes.append("runs never started are not listed: the rows come from the run folders "
                     f"found, not from bench.grids.expand({name!r})")
    elif stray := sorted({p.name for p in found} - {folder.name for folder, *_ in expected}):
        notes.append(f"run folders not in the grid (ignored): {', '.join(stray)}")
    if not expected:
        raise ReportError(f"no runs for grid {name!r} under {runs_root / name}; train some first "
                          f"(`bench grid {name}`) or pass --runs-root")
    run_rows, metric_rows, eval_rows = [], [], []
    for folder, config, eval_steps in expected:
        ticks = [{"run": folder.name, **t} for t in read_jsonl(folder / "metrics.jsonl")]
        metric_rows += ticks
        # guidance as canonical JSON text: one provenance field, not flattened into columns
        eval_rows += [{"run": folder.name, **{EVAL_ALIASES.get(k, k): v for k, v in r.items()},
                       "guidance": json.dumps(r.get("guidance"), sort_keys=True)}
                      for r in read_jsonl(folder / "eval.jsonl")]
        run_rows.append({**_run_row(folder, config, ticks),
                         "expected_steps": json.dumps(sorted(int(s) for s in eval_steps or []))})
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


def _run_row(folder: Path, config: dict | None, ticks: list[dict]) -> dict[str, Any]:
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ReportError(f"{folder / 'config.json'}: not valid JSON ({err})") from None
    status = ("done" if (folder / "DONE").exists() else "training" if ticks
              else "started" if folder.is_dir() else "not started")
    last_step = max((int(t["step"]) for t in ticks if "step" in t), default=None)
    row = {"run": folder.name, "run_dir": str(folder), "status": status, "last_step": last_step}
    return {**row, **flatten_config(config)} if config else row


# ------------------------------------------------------------------------------------------------
# Conditions (rows) and provenance groups (never mixed in one column)


# Axes the model name already shows ('DiT-XL/2'): left out of the row label unless needed.
NAMED_AXES = ("model.size", "model.patch_size", "objective.transport", "model.learn_sigma")
# Columns of the conditions table that are not axes.
CONDITION_INFO = ("condition", "spec", "model", "runs", "n_runs", "status", "expected_steps")


def condition_axes(runs: pd.DataFrame) -> list[str]:
    """Result-changing config keys that vary *within* a spec: the grid's axes.

    Left out: keys that differ only between specs (fusion, lambda_repa, p_drop: what the spec
    means), the seed (averaged over), and the training length: with a constant learning rate a
    long run's 400K checkpoint is the 400K run (Table 1's long rows are the same runs trained
    further), so runs that differ only in `train.max_steps` are one condition.
    """
    skip = tuple(non_identity_keys())
    columns = [c for c in runs.columns if "." in c and c not in (SEED_COLUMN, "train.max_steps")
               and not any(c == k or c.startswith(k + ".") for k in skip)]
    varies = runs.groupby("spec")[columns].agg(lambda s: s.dropna().astype(str).nunique()) > 1
    return sorted(c for c in columns if varies[c].any())


def model_name(row: pd.Series | dict) -> str:
    """'SiT-XL/2' (flow) or 'DiT-B/2' (ddpm) as the paper prints them; 'SiT-tiny/1' for custom."""
    family = "DiT" if row.get("objective.transport") == "ddpm" else "SiT"
    size = row.get("model.size")
    if size == "custom" or not isinstance(size, str):
        return f"{family}-tiny/{_as_int(row.get('model.patch_size'), '?')}"
    return f"{family}-{size}"


def _as_int(value: Any, default: Any = None) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _label(row: pd.Series, axes: Sequence[str]) -> str:
    """Paper naming ('SiT-XL/2 w/ ReDi') plus the values of `axes`."""
    def show(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)
    extra = ", ".join(f"{a.split('.')[-1]}={show(row.get(a))}" for a in axes)
    label = model_name(row) + SPEC_SUFFIX.get(row.get("spec"), f" {row.get('spec')}")
    return f"{label} ({extra})" if extra else label


def label_runs(runs: pd.DataFrame, grid: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs with a `condition` column, and the conditions table (grid's spec order, then axes)."""
    runs = runs.copy()
    known = runs["spec"].notna() if "spec" in runs.columns else pd.Series(False, index=runs.index)
    axes = condition_axes(runs[known]) if known.any() else []
    shown = [a for a in axes if a not in NAMED_AXES]
    labels = pd.Series([_label(r, shown) for _, r in runs.iterrows()], index=runs.index)
    values = runs[axes].astype(str).agg("|".join, axis=1) if axes \
        else pd.Series("", index=runs.index)
    clash = labels.groupby(labels).transform(lambda s: values[s.index].nunique() > 1)
    full = pd.Series([_label(r, axes) for _, r in runs.iterrows()], index=runs.index)
    runs["condition"] = labels.where(~clash.astype(bool), full).where(
        known, runs["run"] + " (config unknown)")
    order = [*(grid.get("specs") or []), *SPEC_ORDER]
    rows = []
    for condition, part in runs.groupby("condition", sort=False):
        first = part.iloc[0]
        counts = part["status"].value_counts().sort_index()
        steps = sorted({s for text in part["expected_steps"] for s in json.loads(text)}) \
            if "expected_steps" in part else []
        rows.append({"condition": condition, "spec": first.get("spec"), "model": model_name(first),
                     **{a: first.get(a) for a in axes}, "runs": ", ".join(sorted(part["run"])),
                     "n_runs": len(part),
                     "status": ", ".join(f"{k}: {v}" for k, v in counts.items()),
                     "expected_steps": json.dumps(steps),
                     "_key": (order.index(first.get("spec")) if first.get("spec") in order
                              else len(order), *(str(first.get(a)) for a in axes), condition)})
    conditions = pd.DataFrame(sorted(rows, key=lambda r: r["_key"]))
    return runs, conditions.drop(columns="_key")


def provenance_key(row: pd.Series) -> str:
    """Canonical JSON of the provenance fields of one eval row."""
    def plain(v: Any) -> Any:
        v = v.item() if isinstance(v, np.generic) else v
        if isinstance(v, float):  # pandas turns int columns with gaps into float: 2000.0 -> 2000
            return None if math.isnan(v) else int(v) if v.is_integer() else v
        return v
    return json.dumps({f: plain(row.get(f)) for f in PROVENANCE_FIELDS}, sort_keys=True)


def provenance_difference(key: str, main: str) -> str:
    """Why a provenance group was set apart: the fields that differ from the main group."""
    a, b = json.loads(key), json.loads(main)
    return "; ".join(f"{f} {a.get(f)!s} (main table: {b.get(f)!s})" for f in PROVENANCE_FIELDS
                     if a.get(f) != b.get(f))


def describe_provenance(key: str) -> str:
    """A readable line for a provenance key (hashes shortened to 12 hex digits)."""
    p = json.loads(key)
    short = {k: str(p.get(k))[:12] if p.get(k) else "none"
             for k in ("feature_weights_sha256", "reference_sha256")}
    guided = ", ".join(f"{k}={v}" for k, v in sorted(guidance_of(key).items())) or "none"
    return (f"backend {p.get('backend')}; {p.get('feature_network')} features (weights "
            f"{short['feature_weights_sha256']}); reference {short['reference_sha256']}; "
            f"n={p.get('n_samples')}; sampler {p.get('sampler')}, {p.get('num_sampling_steps')} "
            f"steps; guidance {guided}; {p.get('weights')} weights")


def evaluator_label(metric: str, provenance: str, data_name: Any) -> str:
    """The metric and its evaluator, e.g. 'FD (Fashion-MNIST classifier features, n=2000)'."""
    p = json.loads(provenance)
    network, data = str(p.get("feature_network")), DATA_NAMES.get(str(data_name), str(data_name))
    features = ("Inception-v3 features" if network.startswith("inception") else
                "DINOv2 features" if network.startswith("dinov2") else
                f"{data} classifier features" if "classifier" in network else f"{network} features")
    return f"{metric_label(metric)} ({features}, n={p.get('n_samples')})"


def per_run_values(evals: pd.DataFrame) -> pd.DataFrame:
    """One value per (run, setting, metric, step, provenance).

    A re-evaluation with the same sampling seed replaces the earlier row (latest `created_at`);
    different sampling seeds of one run are averaged (they share the model).
    """
    keys = ["run", "setting", "metric", "step", "provenance"]
    if evals.empty:
        return pd.DataFrame(columns=[*keys, "value"])
    ev = evals.assign(value=pd.to_numeric(evals["value"], errors="coerce"),
                      step=pd.to_numeric(evals["step"], errors="coerce"),
                      setting=evals["setting"].fillna("default").astype(str),
                      created_at=evals["created_at"].fillna("").astype(str),
                      provenance=evals.apply(provenance_key, axis=1)).dropna(subset=["step"])
    ev = ev.astype({"step": "int64"}).sort_values("created_at", kind="stable")
    ev = ev.drop_duplicates(subset=[*keys, "seed"], keep="last")
    return ev.groupby(keys, dropna=False)["value"].mean().reset_index()


def _rank_provenance(frame: pd.DataFrame) -> list[str]:
    """Provenance groups, the main one first: most (run, step) cells, then most samples."""
    def rank(key: str) -> tuple:
        cells = frame[frame["provenance"] == key].drop_duplicates(["run", "step"])
        return (-len(cells), -_as_int(json.loads(key).get("n_samples"), 0), key)
    return sorted(frame["provenance"].unique(), key=rank)


# ------------------------------------------------------------------------------------------------
# The paper's number beside a measured one


@dataclass(frozen=True)
class PaperMatch:
    value: float
    comparable: bool  # False: context only, no difference is computed
    label: str        # the paper's setting, e.g. "SiT-XL/2 w/ ReDi, 400K (table1)"
    reason: str       # why it is context only ("" when comparable)
    same_step: bool = True  # False: context from another training length


def guidance_of(provenance: str) -> dict:
    guidance = json.loads(provenance).get("guidance")
    guidance = json.loads(guidance) if isinstance(guidance, str) else guidance
    return guidance if isinstance(guidance, dict) else {}


def paper_method(spec: str, guidance: dict) -> str:
    """The paper's `method` for a spec evaluated with this guidance (redi_rg without RG = redi)."""
    if spec == "redi_rg" and float(guidance.get("rg_scale") or 1.0) == 1.0:
        return "redi"
    return spec


def paper_cfg(guidance: dict) -> str:
    scale = guidance.get("cfg_scale")
    return "none" if scale in (None, 1, 1.0) else str(guidance.get("cfg_channels", "latent"))


def not_comparable_reasons(cfg: dict, provenance: str, metric: str) -> list[str]:
    """Why a measured number cannot be compared with the paper's ImageNet-256 FID-50K."""
    p = json.loads(provenance)
    data = (cfg.get("data.name"), _as_int(cfg.get("data.image_size")),
            _as_int(cfg.get("data.num_classes")))
    reasons = [] if data == ("imagefolder", 256, 1000) else [
        f"trained on {cfg.get('data.name')} at {cfg.get('data.image_size')} px, not ImageNet 256"]
    if metric not in PAPER_METRICS:
        reasons.append(f"{metric} is not a metric of the paper")
    if not str(p.get("feature_network")).startswith("inception"):
        reasons.append(f"{p.get('feature_network')} features, not Inception-v3")
    if _as_int(p.get("n_samples")) != 50_000:
        reasons.append(f"n={p.get('n_samples')} samples, the paper uses 50K")
    return reasons


def _filter(rows: pd.DataFrame, column: str, value: Any, *, soft: bool = False) -> pd.DataFrame:
    """Rows equal to `value` (None: no filter); `soft` keeps all rows when none is equal."""
    if value is None:
        return rows
    if isinstance(value, float):
        kept = rows[np.isclose(rows[column].astype("float64"), value, rtol=0, atol=1e-9)]
    else:  # NA (a cell the paper leaves empty) never equals a value
        kept = rows.loc[np.array([False if pd.isna(v) else v == value for v in rows[column]],
                                 dtype=bool)]
    return rows if soft and kept.empty else kept


def match_paper(paper: pd.DataFrame, tables: Sequence[str], cfg: dict, provenance: str,
                metric: str, step: int, context: dict | None = None) -> PaperMatch | None:
    """The paper's number for a measured cell: exact when comparable, else context only.

    Exact: same table, metric, model, method, fusion, conditioning, r, CFG/RG setting and
    iterations. Context: the same method in the regenerated table at full scale, the grid's
    `paper: {model, iterations}` if it names one, else same family, largest model, earliest length.
    """
    # An FD of other features is set beside the paper's FID only as context.
    paper_metric = metric if metric in PAPER_METRICS else (
        "fid" if metric.startswith("fd_") else None)
    if paper.empty or not tables or paper_metric is None:
        return None
    guidance = guidance_of(provenance)
    method = paper_method(str(cfg.get("spec")), guidance)
    reasons = not_comparable_reasons(cfg, provenance, metric)
    rows = paper[paper["table"].isin(list(tables)) & (paper["metric"] == paper_metric)]
    for column, value in (("method", method), ("fusion", cfg.get("model.fusion")),
                          ("conditional", bool(cfg.get("model.conditional", True))),
                          ("cfg", paper_cfg(guidance))):
        rows = _filter(rows, column, value)
    if method.startswith("redi"):
        rows = _filter(rows, "pca_rank", _as_int(cfg.get("model.pca_rank")), soft=bool(reasons))
    if method == "redi_rg":
        rows = _filter(rows, "rg_scale", float(guidance.get("rg_scale")), soft=bool(reasons))
    if not reasons:
        rows = _filter(rows, "model", model_name(cfg))
        rows = _filter(rows, "iterations", int(step))
        if paper_cfg(guidance) != "none":
            rows = _filter(rows, "cfg_scale", float(guidance["cfg_scale"]))
        # Tables repeat rows (Table 9 = Table 1 at 400K): the grid's first table wins.
        rows = next((rows[rows["table"] == t] for t in tables if (rows["table"] == t).sum() == 1),
                    rows)
        if len(rows) != 1:
            return None
        row = rows.iloc[0]
        protocol = _sampler_protocol(json.loads(provenance))
        if row["sampler"] and protocol != row["sampler"]:  # e.g. ODE Euler vs the paper's SDE
            return PaperMatch(float(row["value"]), False, _paper_label(row),
                              f"sampled with {protocol}, the paper with {row['sampler']}")
        return PaperMatch(float(row["value"]), True, _paper_label(row), "")
    context = context or {}
    family = "DiT" if cfg.get("objective.transport") == "ddpm" else "SiT"
    rows = rows[rows["iterations"].notna()]
    rows = _filter(rows, "model", context.get("model"), soft=True)
    rows = _filter(rows, "iterations", _as_int(context.get("iterations")), soft=True)
    same_family = rows[rows["model"].str.startswith(family)]
    rows = (same_family if not same_family.empty else rows).assign(
        _size=lambda r: r["size"].map(SIZE_RANK).fillna(-1))
    if rows.empty:
        return None
    row = rows.sort_values(["_size", "iterations"], ascending=[False, True], kind="stable").iloc[0]
    return PaperMatch(float(row["value"]), False, _paper_label(row), "; ".join(reasons),
                      same_step=False)


def _sampler_protocol(provenance: dict) -> str:
    """The paper's sampler vocabulary: 'ddpm-250', 'sde-em-250'; other samplers as 'euler-25'."""
    name = {"sde": "sde-em"}.get(str(provenance.get("sampler")), str(provenance.get("sampler")))
    return f"{name}-{provenance.get('num_sampling_steps')}"


def _paper_label(row: pd.Series) -> str:
    name = row["model"] + SPEC_SUFFIX.get(row["method"], f" {row['method']}")
    if row["method"] == "redi_rg":
        name = f"{row['model']} w/ ReDi + RG (w_r={row['rg_scale']:g})"
    return f"{name}, {fmt_steps(int(row['iterations']))} ({row['table']})"


# ------------------------------------------------------------------------------------------------
# The summary every output is rendered from


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


CELL_COLUMNS = ["setting", "metric", "group", "provenance", "set_apart_reason", "evaluator",
                "condition", "spec", "step", "n_seeds", "n_runs", "mean", "half_width", "ci_low",
                "ci_high", "seeds", "paper", "paper_comparable", "paper_label", "paper_reason",
                "diff"]


def _metric_rank(metric: str) -> tuple[int, str]:
    family = metric_family(metric)
    return (METRIC_ORDER.index(family) if family in METRIC_ORDER else len(METRIC_ORDER), metric)


def _tables(grid: dict) -> list[str]:
    regenerates = grid.get("regenerates") or []
    return [regenerates] if isinstance(regenerates, str) else [str(t) for t in regenerates]


def _grid_settings(grid: dict) -> list[str]:
    settings = (grid.get("eval") or {}).get("settings") or []
    return [str(s.get("name")) if isinstance(s, dict) else str(s) for s in settings]


def summarize(g: Gathered, metric: str | None = None, paper: pd.DataFrame | None = None) -> Report:
    """Aggregate seeds, separate provenance groups, attach the paper's numbers, find speed-ups."""
    runs, conditions = label_runs(g.runs, g.grid)
    values = per_run_values(g.evals).merge(runs[["run", "condition"]], on="run", how="left")
    measured = sorted(values["metric"].dropna().unique(), key=_metric_rank)
    metric = metric or next((m for m in ("fid", "fd_classifier", "fd_dinov2") if m in measured),
                            measured[0] if measured else "fid")
    if measured and metric not in measured:
        raise ReportError(f"--metric {metric!r} was not measured in grid {g.name!r}; "
                          f"measured metrics: {measured}")
    notes = list(g.notes)
    paper = _load_paper(notes) if paper is None else paper
    tables = _tables(g.grid)
    if not tables:
        notes.append("the grid does not say which paper table it regenerates: no paper column")
    configs = runs.dropna(subset=["spec"]).groupby("condition").first() \
        if "spec" in runs else pd.DataFrame()
    seed_of = dict(zip(runs["run"], runs[SEED_COLUMN])) if SEED_COLUMN in runs else {}
    n_runs = dict(zip(conditions["condition"], conditions["n_runs"]))
    grid_steps = sorted({int(s) for s in ((g.grid.get("eval") or {}).get("steps") or [])})
    expected = {c: json.loads(t) or grid_steps
                for c, t in zip(conditions["condition"], conditions["expected_steps"])}
    rows, missing = [], []

    def add(setting: str, name: str, group: int, reason: str, condition: str,
            provenance: str, steps: Sequence[int], part: pd.DataFrame) -> None:
        cfg = configs.loc[condition].to_dict() if condition in configs.index else {}
        for step in steps:
            cell = part[(part["condition"] == condition) & (part["step"] == step)
                        & (part["provenance"] == provenance)]
            mean, half, n = mean_ci95(cell["value"])
            if n == 0:
                missing.append(f"{setting}/{name}: {condition} at step {step}")
            match = match_paper(paper, tables, cfg, provenance, name, step,
                                g.grid.get("paper")) if cfg else None
            if match and not match.same_step and step != steps[-1]:
                match = None  # context of another length is shown once, at the final length
            rows.append({
                "setting": setting, "metric": name, "group": group, "provenance": provenance,
                "set_apart_reason": reason, "condition": condition, "spec": cfg.get("spec"),
                "evaluator": evaluator_label(name, provenance, cfg.get("data.name")),
                "step": int(step), "n_seeds": n, "n_runs": n_runs[condition], "mean": mean,
                "half_width": half, "ci_low": mean - half, "ci_high": mean + half,
                "seeds": json.dumps(sorted(int(seed_of[r]) for r in cell["run"] if r in seed_of)),
                "paper": match.value if match else math.nan,
                "paper_comparable": bool(match and match.comparable),
                "paper_label": match.label if match else "",
                "paper_reason": match.reason if match else "",
                "diff": mean - match.value if match and match.comparable else math.nan})

    for (setting, name), frame in values.groupby(["setting", "metric"], sort=True):
        main, apart = assign_groups(frame)
        fallback = _rank_provenance(frame)[0]
        in_main = [main.get(c) == p for c, p in zip(frame["condition"], frame["provenance"])]
        main_steps = sorted(frame.loc[in_main, "step"].unique())
        for condition in conditions["condition"]:
            provenance = main.get(condition, fallback)
            own = frame[(frame["condition"] == condition) & (frame["provenance"] == provenance)]
            steps = sorted({*(expected[condition] or main_steps), *own["step"]})
            add(setting, name, 0, "", condition, provenance, steps, frame)
        for index, provenance in enumerate(apart, start=1):
            part = frame[frame["provenance"] == provenance]
            for condition in conditions["condition"]:
                if main.get(condition) == provenance or condition not in set(part["condition"]):
                    continue
                reason = provenance_difference(provenance, main.get(condition, fallback))
                steps = sorted(part.loc[part["condition"] == condition, "step"].unique())
                add(setting, name, index, reason, condition, provenance, steps, part)
    missing += [f"setting {s}: nothing measured yet" for s in dict.fromkeys(_grid_settings(g.grid))
                if s not in set(values["setting"])]
    cells = pd.DataFrame(rows, columns=CELL_COLUMNS)
    final = {c: (steps[-1] if steps else None) for c, steps in expected.items()}
    speedups = find_speedups(cells, conditions, metric, g.grid, final)
    return Report(g, metric, conditions, cells, speedups, missing, notes)


def assign_groups(frame: pd.DataFrame) -> tuple[dict[str, str], list[str]]:
    """The main provenance of each condition, and the set-apart provenances (groups 1, 2, ...).

    The main evaluator (the evaluator fields of the largest provenance group) is one per column.
    Each condition's main provenance is its largest group with that evaluator; any other
    provenance of that condition (another evaluator, reference or sample count, or other
    sampling settings for the same seeds) is set apart.
    """
    ranked = _rank_provenance(frame)
    evaluator = _evaluator_part(ranked[0])
    main = {}
    for condition, part in frame.groupby("condition", sort=False):
        present = set(part["provenance"])
        own = [p for p in ranked if p in present and _evaluator_part(p) == evaluator]
        if own:
            sizes = {p: len(part[part["provenance"] == p].drop_duplicates(["run", "step"]))
                     for p in own}
            main[condition] = max(own, key=lambda p: (sizes[p], -ranked.index(p)))
    apart = [p for p in ranked if any(main.get(c) != p for c in
                                      frame.loc[frame["provenance"] == p, "condition"].unique())]
    return main, apart


def _evaluator_part(provenance: str) -> tuple:
    p = json.loads(provenance)
    return tuple(p.get(f) for f in EVALUATOR_FIELDS)


def _load_paper(notes: list[str]) -> pd.DataFrame:
    from bench.paper import PaperNumbersError, load_paper_numbers

    try:
        return load_paper_numbers()
    except PaperNumbersError as err:
        notes.append(f"paper numbers not available ({err}): no paper column")
        return pd.DataFrame()


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
    from bench.paper import PaperNumbersError, load_convergence_claims

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


# ------------------------------------------------------------------------------------------------
# Rendering: the paper's layout as Markdown, LaTeX and CSV


def fmt_value(metric: str, mean: float, half: float = math.nan) -> str:
    """'12.34 ± 0.56' (mean ± 95% half-width), '12.34' with one seed, 'not measured' with none."""
    if not np.isfinite(mean):
        return NOT_MEASURED
    d = _decimals(metric, mean)
    return f"{mean:.{d}f}" + (f" ± {half:.{d}f}" if np.isfinite(half) else "")


def layout_table(report: Report, cells: pd.DataFrame) -> pd.DataFrame:
    """Model | Iter. | Seeds | per metric: measured, paper, Δ (comparable) or paper context."""
    metrics = sorted(cells["metric"].unique(), key=lambda m: (m != report.metric, _metric_rank(m)))
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
                    f"{c.diff:+.{_decimals(m, c.paper)}f}" if ok and np.isfinite(c.diff) else "")
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


def render_markdown(report: Report) -> str:
    """The whole report as Markdown; deterministic (no paths, no clocks) for the golden test."""
    g = report.gathered
    tables = _tables(g.grid)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(g.runs["status"].value_counts().items()))
    lines = [f"# bench report: {g.name}", "",
             f"Paper table: {', '.join(tables) or 'none stated by the grid'} "
             "(arXiv 2504.16064v3, results/paper/).", f"Runs: {len(g.runs)} in the grid; {counts}.",
             "", "± is the half-width of the 95% t-interval over training seeds (t-distribution, "
             "n-1 degrees of freedom); with one seed the value is shown without an interval. "
             f"\"{NOT_MEASURED}\" means no evaluation yet (never zero). Δ = measured − paper, "
             "given only where the setting is the paper's (ImageNet 256, Inception-v3, 50K "
             "samples, same model, method and iterations).", ""]
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
    from bench.atomic import atomic_write_text

    out = Path(out_dir)
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
        from bench.plots import plot_convergence, plot_losses

        plot_convergence(report, out)
        plot_losses(report, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`bench report NAME [--runs-root R] [--out O] [--metric M]`: print the tables, write files."""
    parser = argparse.ArgumentParser(prog="bench report", description="Tables beside the paper's "
                                     "numbers, convergence plots and speed-ups of one grid.")
    parser.add_argument("name", metavar="NAME", help="grid name (ablations/grids/NAME.yaml)")
    parser.add_argument("--runs-root", default="results/runs", help="default: %(default)s")
    parser.add_argument("--out", default="results/reports", help="files go to OUT/NAME "
                        "(default: %(default)s)")
    parser.add_argument("--metric", default=None, help="primary metric of plots and speed-ups "
                        "(default: fid if measured, else fd_classifier)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        report = summarize(gather(args.name, args.runs_root), args.metric)
        out = write_report(report, Path(args.out) / args.name, plots=not args.no_plots)
    except ReportError as err:
        print(f"bench report: error: {err}", file=sys.stderr)
        return 2
    for setting, title, _, table in blocks(report):
        print(f"\n{args.name}, setting {setting}: {title}\n{to_markdown(table)}")
    for s in report.speedups:
        print(f"speed-up [{s['setting']}]: {s['sentence']}")
    if report.missing:
        print(f"not measured yet: {len(report.missing)} cells (listed in report.md)")
    print(f"wrote {out}")
    return 0
