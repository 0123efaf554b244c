"""The paper's number beside a measured one (`results/paper/`, read through bench.report.published).

It gets a difference only when the setting is the paper's: same table, model, method and length
(iterations, or epochs at 5,004 iterations each), and nothing that
`bench.report.comparability.protocol_differences` checks differs (reference batch, Inception weights,
50K samples, sampler, guidance, EMA, training precision and batch); otherwise the paper's number is
shown without a difference and the reasons are listed. A row of another scale (not ImageNet 256, or
not a paper metric) gets the paper's number of the corresponding full-scale setting once, as
labelled context. `published_only` lists the regenerated table's rows the grid does not train.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from bench.report.comparability import protocol_differences, scale_differences
from bench.report.conditions import guidance_of, model_name
from bench.report.published import PaperNumbersError, load_paper_numbers
from bench.report.vocabulary import ITERATIONS_PER_EPOCH, PAPER_METRICS, SIZE_RANK, SPEC_SUFFIX, as_int, fmt_steps


@dataclass(frozen=True)
class PaperMatch:
    value: float
    comparable: bool  # False: context only, no difference is computed
    label: str        # the paper's setting, e.g. "SiT-XL/2 w/ ReDi, 400K (table1)"
    reason: str       # why it is context only ("" when comparable)
    same_step: bool = True  # False: context from another training length


def paper_method(spec: str, guidance: dict) -> str:
    """The paper's `method` for a spec evaluated with this guidance (redi_rg without RG = redi)."""
    if spec == "redi_rg" and float(guidance.get("rg_scale") or 1.0) == 1.0:
        return "redi"
    return spec


def paper_cfg(guidance: dict) -> str:
    scale = guidance.get("cfg_scale")
    return "none" if scale in (None, 1, 1.0) else str(guidance.get("cfg_channels", "latent"))


def not_comparable_reasons(cfg: dict, provenance: str, metric: str) -> list[str]:
    """Why a measured number of another scale is only context for the paper's (data, metric,
    feature network, sample count); paper-scale rows are checked by `protocol_differences`."""
    p = json.loads(provenance)
    reasons = scale_differences(cfg, metric)
    network = str(p.get("feature_network"))
    if not network.startswith("inception"):
        reasons.append(f"{network} features, not Inception-v3")
    if as_int(p.get("n_samples")) != 50_000:
        reasons.append(f"n={p.get('n_samples')} samples, the paper uses 50K")
    return reasons


def with_iterations(rows: pd.DataFrame) -> pd.DataFrame:
    """`_iterations`: the row's iterations, or its epochs at batch 256 (Table 2, README row)."""
    epochs = rows["epochs"].astype("Float64") * ITERATIONS_PER_EPOCH
    return rows.assign(_iterations=rows["iterations"].astype("Float64").fillna(epochs))


def same_length(rows: pd.DataFrame, step: int) -> pd.DataFrame:
    """Rows of `step` iterations, or of the epoch count `step` rounds to at batch 256 (the README's
    600-epoch checkpoint was saved at 3,000,000 steps = 599.5 epochs of 5,004 iterations)."""
    by_iterations = rows["iterations"].astype("Float64") == step
    by_epochs = rows["iterations"].isna() & (rows["epochs"].astype("Float64")
                                             == round(step / ITERATIONS_PER_EPOCH))
    return rows[(by_iterations.fillna(False) | by_epochs.fillna(False)).astype(bool)]


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
                metric: str, step: int, context: dict | None = None,
                accept: Sequence[str] = ()) -> PaperMatch | None:
    """The paper's number for a measured cell: exact when comparable, else context only.

    Exact: same table, metric, model, method, fusion, conditioning, r, CFG/RG setting and
    iterations (epochs at batch 256 for Table 2); it is comparable only when nothing in
    `bench.report.comparability.protocol_differences` differs (else the reasons say what does).
    Context: the same method in the regenerated table at full scale, the grid's
    `paper: {model, iterations}` if it names one, else same family, largest model, earliest length.
    """
    # An FD of other features is set beside the paper's FID only as context.
    paper_metric = metric if metric in PAPER_METRICS else (
        "fid" if metric.startswith("fd_") else None)
    if paper.empty or not tables or paper_metric is None:
        return None
    guidance = guidance_of(provenance)
    scale = scale_differences(cfg, metric)
    reasons = not_comparable_reasons(cfg, provenance, metric) if scale else []
    rows = _same_method_rows(paper[paper["table"].isin(list(tables)) & (paper["metric"] == paper_metric)],
                             cfg, guidance, soft=bool(reasons))
    if not scale:
        return _exact_match(rows, tables, cfg, provenance, metric, step, accept)
    return _context_match(rows, cfg, context or {}, reasons)


def _same_method_rows(rows: pd.DataFrame, cfg: dict, guidance: dict, *, soft: bool) -> pd.DataFrame:
    """`rows` of the cell's method, fusion, conditioning and CFG channels, r and w_r (`soft`: r and
    w_r only where the paper has them), with `_iterations`."""
    method = paper_method(str(cfg.get("spec")), guidance)
    for column, value in (("method", method), ("fusion", cfg.get("model.fusion")),
                          ("conditional", bool(cfg.get("model.conditional", True))),
                          ("cfg", paper_cfg(guidance))):
        rows = _filter(rows, column, value)
    if method.startswith("redi"):
        rows = _filter(rows, "pca_rank", as_int(cfg.get("model.pca_rank")), soft=soft)
    if method == "redi_rg":
        rows = _filter(rows, "rg_scale", float(guidance.get("rg_scale")), soft=soft)
    return with_iterations(rows)


def _exact_match(rows: pd.DataFrame, tables: Sequence[str], cfg: dict, provenance: str, metric: str,
                 step: int, accept: Sequence[str]) -> PaperMatch | None:
    """The one paper row of the same model, length and CFG scale; comparable when no protocol
    setting differs."""
    guidance = guidance_of(provenance)
    rows = _filter(rows, "model", model_name(cfg))
    rows = same_length(rows, int(step))
    if paper_cfg(guidance) != "none":
        rows = _filter(rows, "cfg_scale", float(guidance["cfg_scale"]))
    # Tables repeat rows (Table 9 = Table 1 at 400K): the grid's first table wins.
    rows = next((rows[rows["table"] == t] for t in tables if (rows["table"] == t).sum() == 1), rows)
    if len(rows) != 1:
        return None
    row = rows.iloc[0]
    differ = protocol_differences(cfg, json.loads(provenance), metric, guidance,
                                  str(row["sampler"] or ""), accept)
    if "do not compare IS/precision/recall" in str(row["note"]) and \
            row["metric"] in ("is", "precision", "recall"):
        differ.append("the README's IS/precision/recall come from swapped evaluator arguments")
    return PaperMatch(float(row["value"]), not differ, _paper_label(row), "; ".join(differ))


def _context_match(rows: pd.DataFrame, cfg: dict, context: dict, reasons: list[str]) -> PaperMatch | None:
    """The full-scale row shown as context for a cell of another scale: the grid's `paper:` model
    and iterations where it names them, else the same family's largest model, earliest length."""
    family = "DiT" if cfg.get("objective.transport") == "ddpm" else "SiT"
    rows = rows[rows["_iterations"].notna()]
    rows = _filter(rows, "model", context.get("model"), soft=True)
    iterations = as_int(context.get("iterations"))
    rows = _filter(rows, "_iterations", None if iterations is None else float(iterations), soft=True)
    same_family = rows[rows["model"].str.startswith(family)]
    rows = (same_family if not same_family.empty else rows).assign(
        _size=lambda r: r["size"].map(SIZE_RANK).fillna(-1))
    if rows.empty:
        return None
    row = rows.sort_values(["_size", "_iterations"], ascending=[False, True], kind="stable").iloc[0]
    return PaperMatch(float(row["value"]), False, _paper_label(row), "; ".join(reasons),
                      same_step=False)


def _paper_label(row: pd.Series) -> str:
    name = row["model"] + SPEC_SUFFIX.get(row["method"], f" {row['method']}")
    if row["method"] == "redi_rg":
        name = f"{row['model']} w/ ReDi + RG (w_r={row['rg_scale']:g})"
    length = (fmt_steps(int(row["iterations"])) if pd.notna(row["iterations"])
              else f"{int(row['epochs'])} epochs")
    return f"{name}, {length} ({row['table']})"


def paper_tables(grid: dict) -> list[str]:
    regenerates = grid.get("regenerates") or []
    return [regenerates] if isinstance(regenerates, str) else [str(t) for t in regenerates]


def load_paper(notes: list[str]) -> pd.DataFrame:

    try:
        return load_paper_numbers()
    except PaperNumbersError as err:
        notes.append(f"paper numbers not available ({err}): no paper column")
        return pd.DataFrame()


def published_only(paper: pd.DataFrame, tables: Sequence[str], trained: set[str]) -> pd.DataFrame:
    """The rows of the regenerated tables whose method the grid does not train (Table 2's other
    systems and cited baselines): one row per system, the paper's metrics as columns, as published."""
    if paper.empty or not tables:
        return pd.DataFrame()
    rows = paper[paper["table"].isin(list(tables))
                 & paper["metric"].isin(sorted(PAPER_METRICS))]
    rows = rows[~rows["method"].isin(sorted(trained))]
    if rows.empty:
        return pd.DataFrame()
    length = [f"{int(e)} ep" if pd.notna(e) else fmt_steps(int(i))
              for e, i in zip(rows["epochs"], rows["iterations"])]
    rows = rows.assign(length=length, system=[
        m + SPEC_SUFFIX.get(k, "") if k in SPEC_SUFFIX else m
        for m, k in zip(rows["model"], rows["method"])])
    keys = ["table", "system", "length", "note"]
    wide = rows.pivot_table(index=keys, columns="metric", values="value", aggfunc="first",
                            sort=False).reset_index()
    order = [m for m in ("fid", "sfid", "is", "precision", "recall") if m in wide.columns]
    return wide[keys[:3] + order + ["note"]]
