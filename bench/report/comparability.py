"""Whether a measured number may stand beside the paper's: every setting the paper's numbers depend on.

The paper's FID/sFID/IS/precision/recall (arXiv 2504.16064v3 §4.1, App. B) come from ADM's evaluator
against `VIRTUAL_imagenet256_labeled.npz`, on the 2015 Inception graph, with 50K samples, EMA
weights, the SiT/DiT sampler at 250 steps, the table's guidance, and models trained at batch 256 in
fp32 (the official code, SiT and DiT train in fp32 with TF32 matmuls). A measured number is
comparable only when all of these hold; otherwise `protocol_differences` names each one that
differs, and the report prints the paper's number beside it without a difference.

Two kinds of difference: `scale_differences` (another dataset, or a metric the paper does not
report) make a row a different experiment, shown only with the paper's number of the corresponding
full-scale setting as context; `protocol_differences` keep the paper's exact row (same model,
method and length) but flag it. `accept` lets the user waive a difference they judge harmless
(`bench report --accept bf16`): today only the training precision can be waived.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from bench.report.vocabulary import PAPER_METRICS, as_int

# torch hub names a weights file <name>-<first 8 hex digits of its SHA-256>.pth: torch-fidelity's
# and pytorch-fid's port of the 2015 Inception graph is `...inception-2015-12-05-6726825d.pth`.
INCEPTION_2015_SHA256_PREFIX = "6726825d"
# The eval row field (bench.evaluate) saying the reference's SHA-256 is that of ADM's
# VIRTUAL_imagenet256_labeled.npz. IS rows carry no reference (IS needs none).
REFERENCE_IS_ADM_FIELD = "reference_is_adm"
PAPER_BATCH_SIZE = 256
PAPER_SAMPLES = 50_000
# Differences the user may waive with `bench report --accept NAME`.
ACCEPTABLE = {"bf16": "training precision bf16"}


def scale_differences(cfg: dict, metric: str) -> list[str]:
    """Why a row is a different experiment from the paper's (then its number is context only)."""
    data = (cfg.get("data.name"), as_int(cfg.get("data.image_size")),
            as_int(cfg.get("data.num_classes")))
    reasons = [] if data == ("imagefolder", 256, 1000) else [
        f"trained on {cfg.get('data.name')} at {cfg.get('data.image_size')} px, not ImageNet 256"]
    if metric not in PAPER_METRICS:
        reasons.append(f"{metric} is not a metric of the paper")
    return reasons


def evaluator_differences(provenance: dict, metric: str) -> list[str]:
    """The feature network, its weights, the reference and the sample count."""
    reasons = []
    network = str(provenance.get("feature_network"))
    if not network.startswith("inception"):
        reasons.append(f"{network} features, not Inception-v3")
    elif not str(provenance.get("feature_weights_sha256") or "").startswith(
            INCEPTION_2015_SHA256_PREFIX):
        reasons.append(f"Inception weights {str(provenance.get('feature_weights_sha256'))[:12]} are "
                       f"not the 2015 graph's port (SHA-256 {INCEPTION_2015_SHA256_PREFIX}...)")
    if not metric.startswith("is"):  # IS compares the samples with nothing
        if provenance.get(REFERENCE_IS_ADM_FIELD) is not True:
            reasons.append(f"reference {str(provenance.get('reference_sha256'))[:12]} is not ADM's "
                           "VIRTUAL_imagenet256_labeled.npz (set eval.reference to it)")
    if as_int(provenance.get("n_samples")) != PAPER_SAMPLES:
        reasons.append(f"n={provenance.get('n_samples')} samples, the paper uses 50K")
    return reasons


def sampling_differences(provenance: dict, guidance: dict, paper_sampler: str) -> list[str]:
    """Sampler and steps against the paper row's, guidance details the row does not key on, EMA,
    and the sampler network's precision (None: rows written before it was recorded, all fp32)."""
    reasons = []
    protocol = sampler_protocol(provenance)
    if paper_sampler and protocol != paper_sampler:
        reasons.append(f"sampled with {protocol}, the paper with {paper_sampler}")
    low, high = float(guidance.get("interval_low", 0.0)), float(guidance.get("interval_high", 1.0))
    if (low, high) != (0.0, 1.0):
        reasons.append(f"guidance interval [{low:g}, {high:g}], the paper uses none")
    if float(guidance.get("rg_scale", 1.0)) != 1.0 and guidance.get("rg_channels", "all") != "all":
        reasons.append(f"RG on {guidance.get('rg_channels')} channels, the paper on all")
    if provenance.get("weights") not in (None, "ema"):
        reasons.append(f"{provenance.get('weights')} weights, the paper samples the EMA")
    if provenance.get("precision") not in (None, "fp32"):
        reasons.append(f"sampled in {provenance.get('precision')}, the paper in fp32")
    return reasons


def training_differences(cfg: dict, accept: Iterable[str] = ()) -> list[str]:
    """Training precision (fp32/TF32 in the official code) and the batch size (Table 8: 256)."""
    reasons = []
    precision = str(cfg.get("trained_precision") or cfg.get("train.precision"))
    if precision != "fp32" and not (precision == "bf16" and "bf16" in set(accept)):
        hint = " (waive with --accept bf16)" if precision == "bf16" else ""
        reasons.append(f"trained in {precision}, the paper in fp32 with TF32{hint}")
    batch = as_int(cfg.get("train.batch_size"))
    if batch is not None and batch != PAPER_BATCH_SIZE:
        reasons.append(f"batch {batch}, the paper trains at {PAPER_BATCH_SIZE}")
    return reasons


def protocol_differences(cfg: dict, provenance: dict, metric: str, guidance: dict,
                         paper_sampler: str, accept: Iterable[str] = ()) -> list[str]:
    """Everything besides the scale that makes a paper-scale row not comparable."""
    return (evaluator_differences(provenance, metric)
            + sampling_differences(provenance, guidance, paper_sampler)
            + training_differences(cfg, accept))


def sampler_protocol(provenance: dict) -> str:
    """The paper's sampler vocabulary: 'ddpm-250', 'sde-em-250'; other samplers as 'euler-25'."""
    name = {"sde": "sde-em"}.get(str(provenance.get("sampler")), str(provenance.get("sampler")))
    return f"{name}-{provenance.get('num_sampling_steps')}"


def check_accept(values: Iterable[str]) -> list[str]:
    """The `--accept` names, each one of ACCEPTABLE (ValueError naming the allowed ones)."""
    values = list(values)
    unknown = [v for v in values if v not in ACCEPTABLE]
    if unknown:
        raise ValueError(f"--accept {unknown[0]!r} is not a difference the report can waive; "
                         f"choose from {sorted(ACCEPTABLE)}")
    return values


def parse_provenance(provenance: str) -> dict[str, Any]:
    return json.loads(provenance)
