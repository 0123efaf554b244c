"""The vocabulary every `bench report` module shares: the error, the eval-row fields that make up a
number's provenance, metric names, families, labels and decimals, spec names, and step formatting."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class ReportError(ValueError):
    """A run folder, grid or option the report cannot use; the message says what to fix."""


# Eval-row fields that change the number: the provenance key (`weights`, EMA or raw, among them:
# the two give different numbers from one checkpoint; `precision`, the sampler network's).
# Evaluator fields must agree across a whole column. Sampling fields must agree within a cell (the
# seeds that are averaged); across rows they may differ where the grid's setting says so (Table 4
# scores B with w_r = 1.5 and XL with w_r = 1.1) and are then shown per row.
EVALUATOR_FIELDS = ("feature_network", "feature_weights_sha256", "reference_sha256", "n_samples",
                    "backend", "reference_is_adm")
SAMPLING_FIELDS = ("sampler", "num_sampling_steps", "guidance", "weights", "precision")
PROVENANCE_FIELDS = EVALUATOR_FIELDS + SAMPLING_FIELDS
# Metric names as bench.evaluate.score_run records them: the suffix names the feature network
# (fid = FD on Inception; fd_classifier, kid_dinov2, precision_classifier, is_classifier, ...).
METRIC_ORDER = ("fid", "fd", "sfid", "is", "kid", "precision", "recall", "accuracy")  # by family
METRIC_LABELS = {"fid": "FID", "fd": "FD", "sfid": "sFID", "is": "IS", "kid": "KID",
                 "precision": "Precision", "recall": "Recall", "accuracy": "Accuracy"}
HIGHER_IS_BETTER = frozenset({"accuracy", "is", "precision", "recall"})  # families; others: lower
DECIMALS = {"kid": 4, "accuracy": 3, "precision": 3, "recall": 3}  # by family; others: 2
PAPER_METRICS = frozenset({"fid", "sfid", "is", "precision", "recall"})  # bench.report.published VOCABULARY
# eval.jsonl field names of bench.evaluate.score_run -> the names the report's tables and CSVs use.
EVAL_ALIASES = {"n": "n_samples", "sampling_steps": "num_sampling_steps"}
SPEC_ORDER = ("latent_only", "repa", "redi", "redi_repa", "redi_rg")
SPEC_SUFFIX = {"latent_only": "", "repa": " w/ REPA", "redi": " w/ ReDi",
               "redi_repa": " w/ REPA + ReDi", "redi_rg": " w/ ReDi (p_drop)"}
BASELINE_SPECS = ("latent_only", "repa")  # the slower runs of the paper's Fig. 2 claims
DATA_NAMES = {"fashion_mnist": "Fashion-MNIST", "imagefolder": "ImageNet"}
SIZE_RANK = {"B": 0, "L": 1, "XL": 2}
# Table 2 counts epochs of ImageNet (1,281,167 images) at batch 256. The official loader drops the
# last partial batch, so one epoch is floor(1,281,167 / 256) = 5,004 iterations (an assumption: the
# paper states epochs only): 350 epochs = 1,751,400 and 800 epochs = 4,003,200 iterations.
IMAGENET_TRAIN_IMAGES = 1_281_167
ITERATIONS_PER_EPOCH = IMAGENET_TRAIN_IMAGES // 256
NOT_MEASURED = "not measured"
SEED_COLUMN = "train.seed"


def metric_family(metric: str) -> str:
    """'fd_classifier' -> 'fd', 'kid_dinov2' -> 'kid', 'fid' -> 'fid'."""
    return str(metric).split("_")[0]


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric_family(metric), metric)


# Metrics that live in a bounded range, by family: a band drawn outside it shows an impossible
# value (with n = 2 seeds the t-interval's factor is 12.7, and accuracy bands ran past 0 and 1).
METRIC_RANGE = {"accuracy": (0.0, 1.0), "precision": (0.0, 1.0), "recall": (0.0, 1.0),
                "fd": (0.0, math.inf), "fid": (0.0, math.inf), "sfid": (0.0, math.inf), "is": (1.0, math.inf)}


def metric_range(metric: str) -> tuple[float, float]:
    """The values a metric can take (-inf, inf when unknown)."""
    return METRIC_RANGE.get(metric_family(metric), (-math.inf, math.inf))


def is_lower_better(metric: str) -> bool:
    return metric_family(metric) not in HIGHER_IS_BETTER


def metric_decimals(metric: str, value: float = 0.0) -> int:
    """The metric's usual decimals, more when needed to show 3 significant digits (tiny FDs)."""
    needed = 2 - math.floor(math.log10(abs(value))) if np.isfinite(value) and value != 0 else 0
    return min(max(DECIMALS.get(metric_family(metric), 2), needed), 6)


def metric_rank(metric: str) -> tuple[int, str]:
    family = metric_family(metric)
    return (METRIC_ORDER.index(family) if family in METRIC_ORDER else len(METRIC_ORDER), metric)


def as_int(value: Any, default: Any = None) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def fmt_steps(step: float) -> str:
    """Iterations as the paper prints them: 250, 1K, 400K, 7M."""
    for unit, scale in (("M", 1e6), ("K", 1e3)):
        if step >= scale:
            return f"{step / scale:.3g}{unit}"
    return str(int(step)) if float(step).is_integer() else f"{step:.3g}"
