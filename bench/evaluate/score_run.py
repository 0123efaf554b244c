"""`bench eval`: metrics of a run's checkpoints, each recorded with its provenance in eval.jsonl.

For every requested checkpoint that lacks a (step, metric, setting) row: sample (bench.evaluate.sampling:
sharded, resumable), stream the uint8 shards through the feature network, compute the metrics with
`bench.evaluate.quality` (Frechet distances and KID, on the chosen backend) and `bench.evaluate.adm`
(ADM's sFID features, IS and precision/recall), and append one row per metric.

Metric names (eval.metrics, recorded under the name on the right; the suffix names the feature
network, because a Frechet distance on other features is not FID and is not comparable with it):
    fid / fd   -> fid (inception) | fd_classifier | fd_dinov2
    sfid       -> sfid                  (inception only: ADM's mixed_6/conv features, D = 2023)
    kid        -> kid | kid_classifier | kid_dinov2          (mean; the std is in `extra`)
    prc        -> precision*, recall*   (ADM's k-NN manifolds, k = 3, reference = real)
    is         -> is | is_classifier    (ADM's IS, splits of 5,000, on logits: inception or classifier)
    accuracy   -> accuracy              (argmax of the classifier = requested label; conditional runs)
`accuracy` is added on its own when the feature network is the embedded classifier and the run is
class-conditional (the embedded default's pair, docs/embedded.md). With eval.feature_network=inception the five
metrics are ADM's definitions on torch-fidelity's port of its Inception graph; bench/evaluate/README.md
says where the harness and ADM still differ, and each row records it (`adm_differences`).

Reference: `bench.evaluate.reference` (eval.reference, eval.expected_reference; the TEST split by
default); statistics are cached by content hash (bench.evaluate.features.reference_statistics).

eval.jsonl rows go through the run's metrics logger (bench.metrics_log: also to the sinks of
train.log_to), appended under an exclusive flock on the file that also decides which rows are new
(bench.runfolder's JSONL policy): concurrent array tasks cannot both add the same row, a row whose
(step, metric, setting) already exists is never written twice, and a row lost to a kill mid-append
is a torn last line that readers ignore and the next append cuts, so the next `bench eval`
computes it again. A setting name stands for one set of samples: adding a metric
to a (step, setting) whose rows came from other samples (setting hash, n) or, on the same feature
network, another reference is an error asking for another --setting name.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from bench.atomic import crash_point
from bench.compose import to_dict
from bench.config import ExperimentConfig
from bench.evaluate import adm
from bench.evaluate.adm import ADM_DIFFERENCES
from bench.evaluate.features import FeatureNetworkError, build_feature_network, tf32_off
from bench.evaluate.quality import BACKENDS, check_sample_count, conditional_accuracy, get_backend
from bench.evaluate.reference import Reference, load_reference, reference_file
from bench.evaluate.sampling import (
    DEFAULT_SHARD_SIZE,
    SamplingError,
    read_run_manifest,
    read_shard,
    resolve_device,
    resolve_run_config,
    sample,
    samples_folder,
    sampling_setting,
)
from bench.metrics_log import MetricsLogger
from bench.progress import Progress
from bench.run_hash import run_hash
from bench.runfolder import EVAL_FILE, checkpoint_path, checkpoint_steps, checkpoints_dir, eval_key, read_eval_rows
from bench.storage import guard
from bench.train.checkpoint import WEIGHTS_FILE, CorruptCheckpointError, read_meta

__all__ = ["evaluate", "missing_evaluations", "sample", "main_eval", "main_sample"]

DEFAULT_BACKEND = "torch-fidelity"
KID_SUBSETS, KID_MAX_SUBSET, TF_SEED = 100, 1000, 2020  # torch-fidelity's defaults
METRIC_ALIASES = {"fid": "fd", "fd": "fd", "kid": "kid", "prc": "prc", "precision": "prc",
                  "recall": "prc", "is": "is", "accuracy": "accuracy", "sfid": "sfid"}
REFERENCE_FIELDS = ("reference_source", "reference_sha256", "reference_batch", "reference_is_adm",
                    "reference_expected", "n_reference")
"""What each row records about the reference (bench.evaluate.reference); null where none is used."""
SETTING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


class EvaluationError(ValueError):
    """An evaluation request cannot be honoured; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# eval.jsonl


def missing_evaluations(run_dir: Path, metric: str, setting: str = "default",
                        steps: Optional[Sequence[int]] = None) -> list[int]:
    """Checkpoint steps (all, or those in `steps`) without a row for this metric and setting."""
    done = {int(r["step"]) for r in read_eval_rows(run_dir)
            if r.get("metric") == metric and r.get("setting") == setting}
    wanted = checkpoint_steps(run_dir)
    if steps is not None:
        wanted = [s for s in wanted if s in set(int(v) for v in steps)]
    return [s for s in wanted if s not in done]


# ---------------------------------------------------------------------------------------------
# Which metrics, on which network


def plan_metrics(cfg: ExperimentConfig, backend: str) -> list[str]:
    """The metric kinds to compute (fd, sfid, kid, prc, is, accuracy), validated against the
    feature network and the backend (which computes the Frechet distances and KID; sFID's spatial
    features, IS and precision/recall follow ADM's definitions, `bench.evaluate.adm`)."""

    if backend not in BACKENDS:
        raise EvaluationError(f"backend {backend!r} is unknown; choose one of {sorted(BACKENDS)}")
    kinds: list[str] = []
    for name in cfg.eval.metrics:
        kind = METRIC_ALIASES.get(str(name).lower())
        if kind is None:
            raise EvaluationError(f"eval.metrics: {name!r} is unknown; choose from {sorted(METRIC_ALIASES)}")
        if kind not in kinds:
            kinds.append(kind)
    network = cfg.eval.feature_network
    if network == "classifier" and cfg.model.conditional and "accuracy" not in kinds:
        kinds.append("accuracy")
    for kind in kinds:
        if kind == "sfid" and network != "inception":
            raise EvaluationError("eval.metrics: sfid is the Frechet distance of ADM's spatial "
                                  "Inception features (mixed_6/conv); it needs eval.feature_network="
                                  f"inception, not {network}")
        if kind == "is" and network == "dinov2":
            raise EvaluationError("metric 'is' needs class logits: eval.feature_network=inception "
                                  "(ADM's IS) or classifier (the embedded evaluation network)")
        if kind == "accuracy" and network != "classifier":
            raise EvaluationError("metric 'accuracy' compares the requested label with the embedded "
                                  "classifier's argmax; it needs eval.feature_network=classifier")
        if kind == "accuracy" and not cfg.model.conditional:
            raise EvaluationError("metric 'accuracy' needs a class-conditional run; this run is "
                                  "unconditional (model.conditional=false)")
    return kinds


def metric_names(kind: str, network_kind: str) -> list[str]:
    """Recorded names of a metric kind on a feature network (module docstring)."""
    suffix = "" if network_kind == "inception" else f"_{network_kind}"
    return {"fd": ["fid" if network_kind == "inception" else f"fd{suffix}"], "sfid": ["sfid"],
            "kid": [f"kid{suffix}"], "prc": [f"precision{suffix}", f"recall{suffix}"],
            "is": [f"is{suffix}"], "accuracy": ["accuracy"]}[kind]


def build_network(cfg: ExperimentConfig, manifest: dict, device: torch.device):
    """The feature network of eval.feature_network (the prepared classifier, Inception, DINOv2)."""

    classifier_dir = None
    if cfg.eval.feature_network == "classifier":
        entry = manifest.get("classifier")
        if not entry:
            raise EvaluationError(f"{cfg.data.prepared_dir} holds no evaluation classifier (prepare "
                                  "trains one for fashion_mnist/digits only); set eval.feature_network="
                                  "inception with eval.inception_weights=FILE")
        classifier_dir = Path(cfg.data.prepared_dir) / entry["path"]
    network = build_feature_network(cfg.eval.feature_network, classifier_dir=classifier_dir,
                                    inception_weights=cfg.eval.inception_weights,
                                    dinov2_weights=cfg.eval.dinov2_weights,
                                    dinov2_variant=cfg.eval.dinov2_variant)
    return network.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Computing the metrics of one finished sample set


@torch.no_grad()
def _sample_outputs(network, shards: Sequence[Path], want_logits: bool, batch_size: int = 256,
                    progress: Optional[Progress] = None):
    """Network outputs of all samples in shard order, float64 numpy: `features` (N, D), `logits`
    (N, K) when asked, `spatial` (N, 2023) for Inception; and the labels (N,). Shard by shard."""
    outputs: dict[str, list[np.ndarray]] = {}
    labels = []
    for path in shards:
        shard = read_shard(path)
        for start in range(0, len(shard["images"]), batch_size):
            batch = network.outputs(shard["images"][start: start + batch_size], logits=want_logits)
            for key, value in batch.items():
                outputs.setdefault(key, []).append(value.cpu().double().numpy())
            if progress is not None:
                progress.update(len(batch["features"]))
        labels.append(shard["labels"])
    return {key: np.concatenate(parts) for key, parts in outputs.items()}, np.concatenate(labels)


@tf32_off()  # the samples' and the reference's features, and the precision/recall distances
def compute_metrics(kinds: Sequence[str], network, reference: Reference, backend_name: str,
                    shards: Sequence[Path], network_kind: str, allow_rank_deficient: bool = False,
                    progress: bool = False, total: Optional[int] = None) -> list[tuple[str, str, float, str, dict]]:
    """[(recorded name, kind, value, backend, extra)] for the requested kinds (prc: two rows).
    `progress` reports the feature pass over the `total` samples (bench.progress)."""

    backend = get_backend(backend_name)
    with Progress("eval sample features: images", total, enabled=progress) as bar:
        outputs, labels = _sample_outputs(network, shards, "accuracy" in kinds or "is" in kinds, progress=bar)
    features = outputs["features"]
    n, dim = features.shape
    out: list[tuple[str, str, float, str, dict]] = []
    for kind in kinds:
        names = metric_names(kind, network_kind)
        if kind in ("fd", "sfid"):
            ours = features if kind == "fd" else outputs["spatial"]
            mu_ref, sigma_ref = (reference.mu, reference.sigma) if kind == "fd" else reference.spatial
            check_sample_count(n, ours.shape[1], allow_rank_deficient,
                               f"{names[0]} of the samples (raise eval.num_samples)")
            mu, sigma = backend.statistics(ours)
            out.append((names[0], kind, backend.frechet_distance(mu, sigma, mu_ref, sigma_ref),
                        backend_name, {"feature_dim": int(ours.shape[1]), "rank_deficient": n < ours.shape[1]}))
        elif kind == "kid":
            real = reference.features(network)
            size = min(KID_MAX_SUBSET, n, len(real))
            mean, std = backend.kid(features, real, KID_SUBSETS, size, TF_SEED)
            out.append((names[0], kind, mean, backend_name,
                        {"std": std, "subsets": KID_SUBSETS, "subset_size": size, "seed": TF_SEED}))
        elif kind == "prc":
            real = reference.features(network)
            precision, recall = adm.precision_recall(real, features, device=network.device)
            extra = {"neighbourhood": adm.PR_NEIGHBOURHOOD, "n_reference": len(real),
                     "definition": "ADM k-NN manifolds, reference = real, samples = generated"}
            out.append((names[0], kind, precision, "native", extra))
            out.append((names[1], kind, recall, "native", extra))
        elif kind == "is":
            mean, std, splits = adm.inception_score(outputs["logits"], adm.IS_SPLIT_SIZE)
            out.append((names[0], kind, mean, "native",
                        {"std": std, "splits": splits, "split_size": adm.IS_SPLIT_SIZE}))
        elif kind == "accuracy":
            out.append((names[0], kind, conditional_accuracy(outputs["logits"], labels), "native", {}))
    return out


# ---------------------------------------------------------------------------------------------
# The driver


def _wanted_steps(run_dir: Path, cfg: ExperimentConfig, steps: Optional[list[int]]) -> list[int]:
    """The requested checkpoint steps (steps, else eval.steps, else every checkpoint); each must exist."""
    available = checkpoint_steps(run_dir)
    if not available:
        raise SamplingError(f"{checkpoints_dir(run_dir)} holds no checkpoints; train the run first")
    wanted = sorted(set(int(s) for s in (steps or cfg.eval.steps or available)))
    absent = [s for s in wanted if s not in available]
    if absent:
        raise SamplingError(f"{run_dir} has no checkpoint at steps {absent}; available: {available}")
    return wanted


def _score_step(log: MetricsLogger, run_dir: Path, cfg: ExperimentConfig, step: int, setting: str,
                kinds: Sequence[str], existing: dict, network, reference: Reference, *, manifest: dict,
                backend: str, shard_size: int, task_index: int, num_tasks: int, device: torch.device,
                progress: bool, allow_rank_deficient: bool) -> list[dict]:
    """Sample one checkpoint (this task's shards) and, once every shard is there, log the rows of
    the metrics it lacks; returns them (none while other tasks' shards are missing)."""
    common = _provenance(run_dir, cfg, manifest, step, setting, shard_size, network, reference, device)
    missing = [k for k in kinds if any((step, n, setting) not in existing
                                       for n in metric_names(k, cfg.eval.feature_network))]
    _check_protocol(existing, step, setting, common)
    samples = sample(run_dir, step, cfg, num_samples=cfg.eval.num_samples, shard_size=shard_size,
                     task_index=task_index, num_tasks=num_tasks, device=device, progress=progress)
    if not samples.complete:
        print(f"eval: step {step}: this task's shards are done; the metrics wait for the other "
              f"{num_tasks - 1} task(s) (re-run any task once they finish)", flush=True)
        return []
    began = time.perf_counter()
    results = compute_metrics(missing, network, reference, backend, samples.shards, cfg.eval.feature_network,
                              allow_rank_deficient, progress=progress, total=sum(samples.counts))
    seconds = (samples.sampling_seconds(), time.perf_counter() - began)
    crash_point("eval:rows")
    return log.log_eval([_row(common, name, value, used, extra, kind, *seconds)
                         for name, kind, value, used, extra in results])


def evaluate(cfg: Optional[ExperimentConfig], run_dir: Path, steps: Optional[list[int]] = None,
             setting: str = "default", overrides: Sequence[str] = (), *,
             backend: str = DEFAULT_BACKEND, shard_size: int = DEFAULT_SHARD_SIZE,
             task_index: int = 0, num_tasks: int = 1, device: Optional[str] = None,
             progress: bool = True, allow_rank_deficient: bool = False) -> list[dict]:
    """Evaluate checkpoints of `run_dir` and append one eval.jsonl row per (step, metric, setting).

    The model, data and VAE always come from `run_dir/config.json`; `cfg` (None = the saved one)
    supplies only the eval settings and must describe the same run (same run hash); `overrides`
    are eval.* keys applied on top. steps None
    means eval.steps, or every checkpoint when that is empty. Only missing rows are computed; the
    rows written by this call are returned (none when everything was already there). With array
    tasks (`task_index` of `num_tasks`) each task samples its shards, and whichever task finds every
    shard present computes the metrics. Every check runs before sampling starts.
    """
    run_dir = Path(run_dir)
    if not SETTING_NAME.match(setting or ""):
        raise EvaluationError(f"setting name {setting!r} must be a short word (letters, digits, _.+=-)")
    cfg = resolve_run_config(run_dir, cfg, overrides)
    allow_rank_deficient = allow_rank_deficient or cfg.eval.allow_rank_deficient
    wanted = _wanted_steps(run_dir, cfg, steps)
    kinds = plan_metrics(cfg, backend)
    reference_file(cfg)  # an unset or missing eval.reference fails here, before anything is built
    manifest = read_run_manifest(cfg)
    run_device = resolve_device(device)
    network = build_network(cfg, manifest, run_device)
    if "fd" in kinds:  # before sampling, not after it: the count and the width are known now
        check_sample_count(int(cfg.eval.num_samples), int(network.feature_dim), allow_rank_deficient,
                           f"FD of {cfg.eval.num_samples} samples on {network.network_id} "
                           "(raise eval.num_samples, or pass --allow-rank-deficient to accept it)")
    names = [name for kind in kinds for name in metric_names(kind, cfg.eval.feature_network)]
    existing = {eval_key(r): r for r in read_eval_rows(run_dir)}
    todo = [s for s in wanted if any((s, name, setting) not in existing for name in names)]
    if not todo:
        return []
    reference = load_reference(cfg, network, kinds, progress=progress)
    with MetricsLogger(run_dir, cfg.train.log_to, run_name=run_dir.name, run_id=run_hash(cfg),
                       config=to_dict(cfg)) as log:
        written: list[dict] = []
        for step in todo:
            written += _score_step(log, run_dir, cfg, step, setting, kinds, existing, network, reference,
                                   manifest=manifest, backend=backend, shard_size=shard_size,
                                   task_index=task_index, num_tasks=num_tasks, device=run_device,
                                   progress=progress, allow_rank_deficient=allow_rank_deficient)
    return written


SAMPLING_SEED_SUFFIX = "+seed="  # setting names of --sampling-seeds; bench.report.stats parses them


def evaluate_sampling_seeds(run_dir: Path, steps: Optional[list[int]], seeds: Sequence[int],
                            setting: str = "default", overrides: Sequence[str] = (), **kwargs) -> list[dict]:
    """Score the same checkpoints once per sampling seed (eval.seed = k: other class labels and
    sampling noise, the same model), each under setting `<setting>+seed=<k>`, so the spread of a
    metric over k is the evaluation-sampling noise of one checkpoint. Returns the rows of every seed
    (recorded earlier or now) for the requested steps and `kwargs` go to `evaluate`."""
    if not seeds or len(set(seeds)) != len(seeds) or any(int(k) < 0 for k in seeds):
        raise EvaluationError(f"--sampling-seeds needs distinct non-negative integers, got {list(seeds)}")
    names = {f"{setting}{SAMPLING_SEED_SUFFIX}{int(k)}": int(k) for k in seeds}
    for name, seed in names.items():
        evaluate(None, run_dir, steps, name, [*overrides, f"eval.seed={seed}"], **kwargs)
    return [r for r in read_eval_rows(run_dir) if r.get("setting") in names
            and (not steps or r["step"] in steps)]


def format_spread(rows: Sequence[dict]) -> str:
    """Per (step, metric): the values over sampling seeds, their mean and sample std (ddof 1)."""
    by_key: dict[tuple[int, str], list[tuple[int, float]]] = {}
    for r in rows:
        seed = int(r.get("sampling_seed", r.get("seed")))
        by_key.setdefault((int(r["step"]), str(r["metric"])), []).append((seed, float(r["value"])))
    lines = ["step  metric  sampling seeds: values  mean  std (ddof 1)  max - min"]
    for (step, metric), pairs in sorted(by_key.items()):
        values = np.array([v for _, v in sorted(pairs)])
        std = f"{values.std(ddof=1):.4g}" if values.size > 1 else "-"
        shown = ", ".join(f"{k}: {v:.4g}" for k, v in sorted(pairs))
        lines.append(f"{step}  {metric}  {shown}  {values.mean():.4g}  {std}  {values.max() - values.min():.4g}")
    return "\n".join(lines)


def _provenance(run_dir: Path, cfg: ExperimentConfig, manifest: dict, step: int, setting: str,
                shard_size: int, network, reference: Reference, device: torch.device) -> dict:
    """The fields every row of this (step, setting) carries."""

    weights_sha = read_meta(checkpoint_path(run_dir, step))["sha256"][WEIGHTS_FILE]
    plan = sampling_setting(cfg, manifest, step, weights_sha, shard_size, device)
    return {"step": int(step), "setting": setting, "setting_hash": plan.hash,
            "n": int(cfg.eval.num_samples), "seed": plan.seed, "sampling_seed": plan.seed, "sampler": plan.sampler,
            "sampling_steps": plan.num_sampling_steps, "guidance": plan.guidance,
            "weights": plan.weights, "precision": plan.precision,
            "label_sampling": plan.label_sampling, "batch_size": plan.batch_size,
            "shard_size": plan.shard_size, "checkpoint_sha256": weights_sha,
            "feature_network": network.network_id, "feature_weights_sha256": network.weights_sha256,
            **{key: reference.provenance.get(key) for key in REFERENCE_FIELDS},
            "adm_differences": ADM_DIFFERENCES if cfg.eval.feature_network == "inception" else None,
            "feature_implementation": getattr(network, "implementation", None),
            "spec": cfg.spec, "run_dir": str(run_dir),
            "samples_dir": str(samples_folder(run_dir, plan))}


def _row(common: dict, name: str, value: float, backend: str, extra: dict, kind: str,
         sampling_seconds: float, metric_seconds: float) -> dict:

    row = {**common, "metric": name, "value": float(value), "backend": backend,
           "backend_version": get_backend(backend).version, "extra": extra}
    if kind in ("accuracy", "is"):  # no reference enters these numbers
        row |= {key: None for key in REFERENCE_FIELDS}
    return {**row, "sampling_seconds": sampling_seconds,
            "metric_seconds": metric_seconds, "wall_time_s": sampling_seconds + metric_seconds,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _check_protocol(existing: dict, step: int, setting: str, common: dict) -> None:
    """One setting name = one set of samples: every row of (step, setting) must come from the same
    samples (setting hash, n), and rows on the same feature network from the same reference."""
    for (row_step, name, row_setting), row in existing.items():
        if row_step != step or row_setting != setting:
            continue
        fields = ["setting_hash", "n"]
        if (row.get("feature_network") == common["feature_network"]
                and row.get("reference_sha256") is not None):
            fields.append("reference_sha256")
        differ = [f for f in fields if row.get(f) != common.get(f)]
        if differ:
            shown = ", ".join(f"{f}: recorded {row.get(f)!r}, now {common.get(f)!r}" for f in differ)
            raise EvaluationError(
                f"step {step}, setting {setting!r} already has {name!r} from another protocol "
                f"({shown}); evaluate this one under another --setting name")


# ---------------------------------------------------------------------------------------------
# CLI


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run folder written by `bench train`")
    parser.add_argument("overrides", nargs="*", help="eval.key=value overrides, e.g. eval.guidance.cfg_scale=2.4")
    parser.add_argument("--step", type=int, action="append", dest="steps", metavar="N",
                        help="checkpoint step (repeatable)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per sample shard")
    parser.add_argument("--task-index", type=int, default=0, help="this array task (sharded sampling)")
    parser.add_argument("--num-tasks", type=int, default=1, help="array tasks sharing the sampling")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_cli(name: str, body, run_dir: Path) -> int:
    """`body()` with the run folder guarded (bench.storage: a removed folder is one error, not
    re-created) and its user-fixable errors as one line."""
    try:
        with guard(run_dir):
            return body()
    except (EvaluationError, SamplingError, FeatureNetworkError, CorruptCheckpointError) as err:
        print(f"bench {name}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # MetricError, PreparedDataError, DatasetError: all user-fixable
        if type(err).__module__.startswith("bench."):
            print(f"bench {name}: error: {err}", file=sys.stderr)
            return 2
        raise


def main_sample(argv: Optional[Sequence[str]] = None) -> int:
    """`bench sample RUN_DIR [--step N ...] [--num-samples N] [--max-shards K] [eval.key=value ...]`."""
    parser = argparse.ArgumentParser(prog="bench sample", description="Sample images from a run's checkpoint.")
    _common_arguments(parser)
    parser.add_argument("--num-samples", type=int, default=None, help="default: eval.num_samples")
    parser.add_argument("--max-shards", type=int, default=None, help="stop after this many new shards")
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))

    def body() -> int:
        for step in args.steps or [None]:
            result = sample(args.run_dir, step, overrides=args.overrides, num_samples=args.num_samples,
                            shard_size=args.shard_size, task_index=args.task_index,
                            num_tasks=args.num_tasks, max_shards=args.max_shards, device=args.device,
                            progress=not args.no_progress)
            done = sum(p.is_file() for p in result.shards)
            print(f"sample: step {result.setting.step}: {done}/{len(result.counts)} shards of "
                  f"{result.num_samples} images in {result.folder}"
                  + (f" (grid: {result.folder / 'grid.png'})" if (result.folder / "grid.png").is_file() else ""))
        return 0

    return _run_cli("sample", body, args.run_dir)


def format_table(rows: Sequence[dict]) -> str:
    """A small fixed-width table of eval rows."""
    header = ("step", "metric", "value", "n", "sampler", "steps", "cfg", "rg", "weights", "backend")
    lines = [header]
    for r in sorted(rows, key=lambda r: (r["step"], r["metric"])):
        g = r.get("guidance", {})
        lines.append((str(r["step"]), r["metric"], f"{r['value']:.4g}", str(r["n"]), r["sampler"],
                      str(r["sampling_steps"]), f"{g.get('cfg_scale')}/{g.get('cfg_channels')}",
                      str(g.get("rg_scale")), r["weights"], r["backend"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def main_eval(argv: Optional[Sequence[str]] = None) -> int:
    """`bench eval RUN_DIR [--step N ...] [--setting NAME] [--backend B] [eval.key=value ...]`."""
    parser = argparse.ArgumentParser(prog="bench eval", description="Evaluate a run's checkpoints.")
    _common_arguments(parser)
    parser.add_argument("--setting", default="default", help="short name of this sampler+guidance setting")
    parser.add_argument("--backend", default=DEFAULT_BACKEND, help="torch-fidelity, clean-fid or native")
    parser.add_argument("--allow-rank-deficient", action="store_true",
                        help="compute FD with fewer samples than feature dimensions (a rank-deficient "
                        "covariance: the number is dominated by estimation error)")
    parser.add_argument("--sampling-seeds", default=None, metavar="K,K,...",
                        help="score each step once per sampling seed (eval.seed), under setting "
                             "NAME+seed=K, and print the spread: the evaluation-sampling noise")
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))

    def body() -> int:
        if args.sampling_seeds is not None:
            try:
                seeds = [int(k) for k in args.sampling_seeds.split(",") if k.strip()]
            except ValueError:
                raise EvaluationError(f"--sampling-seeds takes comma-separated integers, e.g. 0,1,2; "
                                      f"got {args.sampling_seeds!r}") from None
            rows = evaluate_sampling_seeds(args.run_dir, args.steps, seeds, args.setting, args.overrides,
                                           backend=args.backend, shard_size=args.shard_size,
                                           device=args.device, progress=not args.no_progress)
            print(f"eval: {len(rows)} row(s) over sampling seeds {seeds} in {Path(args.run_dir) / EVAL_FILE}")
            print(format_spread(rows))
            return 0
        new = evaluate(None, args.run_dir, args.steps, args.setting, args.overrides,
                       backend=args.backend, shard_size=args.shard_size, task_index=args.task_index,
                       num_tasks=args.num_tasks, device=args.device, progress=not args.no_progress,
                       allow_rank_deficient=args.allow_rank_deficient)
        shown = [r for r in read_eval_rows(args.run_dir) if r.get("setting") == args.setting
                 and (not args.steps or r["step"] in args.steps)]
        print(f"eval: {len(new)} new row(s) in {Path(args.run_dir) / EVAL_FILE}")
        if shown:
            print(format_table(shown))
        return 0

    return _run_cli("eval", body, args.run_dir)
