"""Rows and provenance groups of `bench report`.

A row is a *condition*: a spec plus every result-changing setting that varies within a spec (the
grid's axes), seed excepted (`label_runs`). Eval rows whose provenance (evaluator, reference,
sample count, sampler, guidance, weights) differs are never averaged: per (setting, metric) one
provenance per condition makes the main table and the others are set apart (`assign_groups`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from bench.config import ExperimentConfig
from bench.report.vocabulary import (
    DATA_NAMES,
    EVALUATOR_FIELDS,
    PROVENANCE_FIELDS,
    SEED_COLUMN,
    SPEC_ORDER,
    SPEC_SUFFIX,
    as_int,
    metric_label,
)

# Axes the model name already shows ('DiT-XL/2'): left out of the row label unless needed.
NAMED_AXES = ("model.size", "model.patch_size", "objective.transport", "model.learn_sigma")
# Columns of the conditions table that are not axes.
CONDITION_INFO = ("condition", "spec", "model", "runs", "n_runs", "status", "expected_steps")


def non_identity_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """Dotted config keys that do not change results (`identity=False` in bench/config.py)."""
    keys = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("identity", True):
            keys.append(prefix + f.name)
        elif dataclasses.is_dataclass(f.default_factory):  # a nested config section
            keys += non_identity_keys(f.default_factory, f"{prefix}{f.name}.")
    return keys


def when_set_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """Dotted keys in the run hash only when set (`identity="when_set"`, e.g.
    objective.align_encoder): unset (None, or absent from an older config.json) is a value of its own."""
    keys = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("identity") == "when_set":
            keys.append(prefix + f.name)
        elif dataclasses.is_dataclass(f.default_factory):
            keys += when_set_keys(f.default_factory, f"{prefix}{f.name}.")
    return keys


def _distinct(values: pd.Series) -> int:
    """How many values a column takes: missing values do not count, except for a when-set key,
    where unset differs from every setting (an aligned-to-another-encoder REPA run is not a seed of
    the default one)."""
    if values.name in when_set_keys():
        return values.astype(object).where(values.notna(), "unset").astype(str).nunique()
    return values.dropna().astype(str).nunique()


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
    varies = runs.groupby("spec")[columns].agg(_distinct) > 1
    return sorted(c for c in columns if varies[c].any())


def model_name(row: pd.Series | dict) -> str:
    """'SiT-XL/2' (flow) or 'DiT-B/2' (ddpm) as the paper prints them; 'SiT-tiny/1' for custom."""
    family = "DiT" if row.get("objective.transport") == "ddpm" else "SiT"
    size = row.get("model.size")
    if size == "custom" or not isinstance(size, str):
        return f"{family}-tiny/{as_int(row.get('model.patch_size'), '?')}"
    return f"{family}-{size}"


def _label(row: pd.Series, axes: Sequence[str]) -> str:
    """Paper naming ('SiT-XL/2 w/ ReDi') plus the values of `axes`."""
    def show(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "unset"
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
    values = runs[axes].astype(object).where(runs[axes].notna(), "unset").astype(str).agg("|".join, axis=1) if axes \
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


def guidance_of(provenance: str) -> dict:
    guidance = json.loads(provenance).get("guidance")
    guidance = json.loads(guidance) if isinstance(guidance, str) else guidance
    return guidance if isinstance(guidance, dict) else {}


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


def rank_provenance(frame: pd.DataFrame) -> list[str]:
    """Provenance groups, the main one first: most (run, step) cells, then most samples."""
    def rank(key: str) -> tuple:
        cells = frame[frame["provenance"] == key].drop_duplicates(["run", "step"])
        return (-len(cells), -as_int(json.loads(key).get("n_samples"), 0), key)
    return sorted(frame["provenance"].unique(), key=rank)


def assign_groups(frame: pd.DataFrame) -> tuple[dict[str, str], list[str]]:
    """The main provenance of each condition, and the set-apart provenances (groups 1, 2, ...).

    The main evaluator (the evaluator fields of the largest provenance group) is one per column.
    Each condition's main provenance is its largest group with that evaluator; any other
    provenance of that condition (another evaluator, reference or sample count, or other
    sampling settings for the same seeds) is set apart.
    """
    ranked = rank_provenance(frame)
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
