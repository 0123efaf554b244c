"""`bench eval`: metrics of a run's checkpoints, each recorded with its provenance in eval.jsonl.

For every requested checkpoint that lacks a (step, metric, setting) row: sample (bench.evaluate.sampling:
sharded, resumable), stream the uint8 shards through the feature network, compute the metrics with
`bench.evaluate.quality` (and torch-fidelity for precision/recall and IS), and append one row per metric.

Metric names (eval.metrics, recorded under the name on the right; the suffix names the feature
network, because a Frechet distance on other features is not FID and is not comparable with it):
    fid / fd   -> fid (inception) | fd_classifier | fd_dinov2
    kid        -> kid | kid_classifier | kid_dinov2          (mean; the std is in `extra`)
    prc        -> precision*, recall*   (torch-fidelity's k-NN manifolds, k = 3; torch-fidelity only)
    is         -> is_classifier          (needs logits: the embedded classifier; torch-fidelity only)
    accuracy   -> accuracy              (argmax of the classifier = requested label; conditional runs)
`accuracy` is added on its own when the feature network is the embedded classifier and the run is
class-conditional (the embedded default's pair, DESIGN.md). sFID needs the ADM evaluator's spatial
Inception features, which no backend here provides: asking for it is an error.

Reference: `eval.reference` (an ADM .npz with `arr_0` images and/or `mu`/`sigma`) or, by default, the
data's TEST split images; statistics are cached by content hash (bench.evaluate.features.reference_statistics).

eval.jsonl is written by rewriting the whole file to a temporary name and os.replace-ing it, under an
exclusive flock on `<run_dir>/.eval.lock`: a reader never sees a torn line, concurrent array tasks
cannot both add the same row, and a row lost to a crash (or to flock not working across NFS nodes)
is simply missing, so the next `bench eval` computes it again. A row whose (step, metric, setting)
already exists is never written twice. A setting name stands for one set of samples: adding a metric
to a (step, setting) whose rows came from other samples (setting hash, n) or, on the same feature
network, another reference is an error asking for another --setting name.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import re
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from bench.atomic import atomic_write_text
from bench.config import ExperimentConfig
from bench.evaluate.sampling import (
    DEFAULT_SHARD_SIZE,
    SamplingError,
    checkpoint_steps,
    read_run_manifest,
    read_shard,
    resolve_run_config,
    sample,
    sampling_setting,
)

__all__ = ["evaluate", "missing_evaluations", "sample", "read_eval_rows", "main_eval", "main_sample"]

EVAL_FILE = "eval.jsonl"
LOCK_FILE = ".eval.lock"
DEFAULT_BACKEND = "torch-fidelity"
KID_SUBSETS, KID_MAX_SUBSET, TF_SEED = 100, 1000, 2020  # torch-fidelity's defaults
PRC_NEIGHBORHOOD, IS_SPLITS = 3, 10
METRIC_ALIASES = {"fid": "fd", "fd": "fd", "kid": "kid", "prc": "prc", "precision": "prc",
                  "recall": "prc", "is": "is", "accuracy": "accuracy", "sfid": "sfid"}
BACKEND_METRICS = {"native": {"fd", "kid"}, "clean-fid": {"fd", "kid"},
                   "torch-fidelity": {"fd", "kid", "prc", "is"}}
SETTING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


class EvaluationError(ValueError):
    """An evaluation request cannot be honoured; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# eval.jsonl


def read_eval_rows(run_dir: Path) -> list[dict]:
    """Every row of `<run_dir>/eval.jsonl` (unreadable lines are skipped)."""
    path = Path(run_dir) / EVAL_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _key(row: dict) -> tuple[int, str, str]:
    return int(row["step"]), str(row["metric"]), str(row["setting"])


@contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    with open(Path(run_dir) / LOCK_FILE, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def append_rows(run_dir: Path, rows: Sequence[dict]) -> list[dict]:
    """Add the rows whose (step, metric, setting) is not recorded yet; returns those added."""
    path = Path(run_dir) / EVAL_FILE
    with _locked(run_dir):
        text = path.read_text() if path.is_file() else ""
        seen = {_key(r) for r in read_eval_rows(run_dir)}
        new = []
        for row in rows:
            if _key(row) not in seen:
                seen.add(_key(row))
                new.append(row)
        if new:
            if text and not text.endswith("\n"):
                text += "\n"
            text += "".join(json.dumps(r, sort_keys=True) + "\n" for r in new)
            atomic_write_text(path, text)
    return new


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
# Which metrics, on which network, against which reference


def plan_metrics(cfg: ExperimentConfig, backend: str) -> list[str]:
    """The metric kinds to compute (fd, kid, prc, is, accuracy), validated against the backend."""
    from bench.evaluate.quality import BACKENDS

    if backend not in BACKENDS:
        raise EvaluationError(f"backend {backend!r} is unknown; choose one of {sorted(BACKENDS)}")
    kinds: list[str] = []
    for name in cfg.eval.metrics:
        kind = METRIC_ALIASES.get(str(name).lower())
        if kind is None:
            raise EvaluationError(f"eval.metrics: {name!r} is unknown; choose from {sorted(METRIC_ALIASES)}")
        if kind == "sfid":
            raise EvaluationError("eval.metrics: sfid needs the ADM evaluator's spatial Inception "
                                  "features (mixed_6/conv), which no backend here provides; drop it "
                                  "and run guided-diffusion's evaluator on the exported samples")
        if kind not in kinds:
            kinds.append(kind)
    classifier = cfg.eval.feature_network == "classifier"
    if classifier and cfg.model.conditional and "accuracy" not in kinds:
        kinds.append("accuracy")
    for kind in kinds:
        if kind in ("prc", "is", "fd", "kid") and kind not in BACKEND_METRICS[backend]:
            raise EvaluationError(f"metric {kind!r} is not provided by backend {backend!r}; use "
                                  "--backend torch-fidelity")
        if kind in ("is", "accuracy") and not classifier:
            raise EvaluationError(f"metric {kind!r} needs class logits; only eval.feature_network="
                                  "classifier (the embedded evaluation network) provides them here")
        if kind == "accuracy" and not cfg.model.conditional:
            raise EvaluationError("metric 'accuracy' needs a class-conditional run; this run is "
                                  "unconditional (model.conditional=false)")
    return kinds


def metric_names(kind: str, network_kind: str) -> list[str]:
    """Recorded names of a metric kind on a feature network (module docstring)."""
    suffix = "" if network_kind == "inception" else f"_{network_kind}"
    return {"fd": ["fid" if network_kind == "inception" else f"fd{suffix}"],
            "kid": [f"kid{suffix}"], "prc": [f"precision{suffix}", f"recall{suffix}"],
            "is": [f"is{suffix}"], "accuracy": ["accuracy"]}[kind]


def build_network(cfg: ExperimentConfig, manifest: dict, device: torch.device):
    """The feature network of eval.feature_network (the prepared classifier, Inception, DINOv2)."""
    from bench.evaluate.features import build_feature_network

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


@dataclasses.dataclass
class Reference:
    """Reference statistics (float64), their provenance, and the images when KID/PRC need them."""

    mu: np.ndarray
    sigma: np.ndarray
    provenance: dict
    images: Optional[object]
    _features: Optional[np.ndarray] = None

    def features(self, network) -> np.ndarray:
        from bench.evaluate.features import extract_features

        if self._features is None:
            self._features = extract_features(network, self.images)
        return self._features


def load_reference(cfg: ExperimentConfig, network, need_images: bool) -> Reference:
    from bench.evaluate.features import REFERENCE_IMAGES_KEY, reference_statistics

    cache = Path(cfg.data.prepared_dir) / "refstats"
    if cfg.eval.reference:
        source: object = Path(cfg.eval.reference)
        images = None
        mu, sigma, provenance = reference_statistics(source, network, cache, image_size=cfg.data.image_size)
        if need_images:
            with np.load(source, allow_pickle=False) as npz:
                if REFERENCE_IMAGES_KEY not in npz.files:
                    raise EvaluationError(f"eval.reference={source} holds only statistics; KID and "
                                          f"precision/recall need its images ('{REFERENCE_IMAGES_KEY}')")
                images = npz[REFERENCE_IMAGES_KEY]
        return Reference(mu, sigma, provenance, images)
    from bench.prepare.sources import open_split

    test = open_split(cfg.data, "test")  # the reference of the embedded default: the TEST split
    images = test.images(range(len(test)))
    mu, sigma, provenance = reference_statistics(images, network, cache, image_size=cfg.data.image_size)
    provenance["reference_source"] = f"{cfg.data.name} test split ({len(test)} images)"
    return Reference(mu, sigma, provenance, images if need_images else None)


# ---------------------------------------------------------------------------------------------
# Computing the metrics of one finished sample set


@torch.no_grad()
def _sample_outputs(network, shards: Sequence[Path], want_logits: bool, batch_size: int = 256):
    """Features (N, D) float64, logits (N, K) or None, labels (N,), streaming shard by shard."""
    from bench.evaluate.features import extract_features

    features, logits, labels = [], [], []
    for path in shards:
        shard = read_shard(path)
        features.append(extract_features(network, shard["images"], batch_size))
        if want_logits:
            logits.extend(network.logits(shard["images"][i: i + batch_size]).cpu().double().numpy()
                          for i in range(0, len(shard["images"]), batch_size))
        labels.append(shard["labels"])
    return (np.concatenate(features), np.concatenate(logits) if want_logits else None,
            np.concatenate(labels))


def compute_metrics(kinds: Sequence[str], network, reference: Reference, backend_name: str,
                    shards: Sequence[Path], network_kind: str) -> list[tuple[str, str, float, str, dict]]:
    """[(recorded name, kind, value, backend, extra)] for the requested kinds (prc: two rows)."""
    from bench.evaluate.quality import check_sample_count, conditional_accuracy, get_backend

    backend = get_backend(backend_name)
    features, logits, labels = _sample_outputs(network, shards, "accuracy" in kinds or "is" in kinds)
    n, dim = features.shape
    out: list[tuple[str, str, float, str, dict]] = []
    for kind in kinds:
        names = metric_names(kind, network_kind)
        if kind == "fd":
            check_sample_count(n, dim, False, "FD of the samples (raise eval.num_samples)")
            mu, sigma = backend.statistics(features)
            out.append((names[0], kind, backend.frechet_distance(mu, sigma, reference.mu, reference.sigma),
                        backend_name, {}))
        elif kind == "kid":
            real = reference.features(network)
            size = min(KID_MAX_SUBSET, n, len(real))
            mean, std = backend.kid(features, real, KID_SUBSETS, size, TF_SEED)
            out.append((names[0], kind, mean, backend_name,
                        {"std": std, "subsets": KID_SUBSETS, "subset_size": size, "seed": TF_SEED}))
        elif kind == "prc":
            from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

            real = reference.features(network)
            prc = prc_features_to_metric(torch.from_numpy(features).float(), torch.from_numpy(real).float(),
                                         prc_neighborhood=PRC_NEIGHBORHOOD, verbose=False)
            extra = {"neighborhood": PRC_NEIGHBORHOOD, "n_reference": len(real)}
            out.append((names[0], kind, float(prc[KEY_METRIC_PRECISION]), backend_name, extra))
            out.append((names[1], kind, float(prc[KEY_METRIC_RECALL]), backend_name, extra))
        elif kind == "is":
            from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

            isc = isc_features_to_metric(torch.from_numpy(logits), splits=IS_SPLITS, rng_seed=TF_SEED)
            out.append((names[0], kind, float(isc[KEY_METRIC_ISC_MEAN]), backend_name,
                        {"std": float(isc[KEY_METRIC_ISC_STD]), "splits": IS_SPLITS}))
        elif kind == "accuracy":
            out.append((names[0], kind, conditional_accuracy(logits, labels), "native", {}))
    return out


# ---------------------------------------------------------------------------------------------
# The driver


def evaluate(cfg: Optional[ExperimentConfig], run_dir: Path, steps: Optional[list[int]] = None,
             setting: str = "default", overrides: Sequence[str] = (), *,
             backend: str = DEFAULT_BACKEND, shard_size: int = DEFAULT_SHARD_SIZE,
             task_index: int = 0, num_tasks: int = 1, device: Optional[str] = None,
             progress: bool = True) -> list[dict]:
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
    available = checkpoint_steps(run_dir)
    if not available:
        raise SamplingError(f"{run_dir / 'checkpoints'} holds no checkpoints; train the run first")
    wanted = sorted(set(int(s) for s in (steps or cfg.eval.steps or available)))
    absent = [s for s in wanted if s not in available]
    if absent:
        raise SamplingError(f"{run_dir} has no checkpoint at steps {absent}; available: {available}")
    kinds = plan_metrics(cfg, backend)
    manifest = read_run_manifest(cfg)
    run_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    network = build_network(cfg, manifest, run_device)
    network_kind = cfg.eval.feature_network
    names = [name for kind in kinds for name in metric_names(kind, network_kind)]
    existing = {_key(r): r for r in read_eval_rows(run_dir)}
    todo = [s for s in wanted if any((s, name, setting) not in existing for name in names)]
    if not todo:
        return []
    reference = load_reference(cfg, network, need_images=bool({"kid", "prc"} & set(kinds)))

    written: list[dict] = []
    for step in todo:
        common = _provenance(run_dir, cfg, manifest, step, setting, shard_size, network, reference)
        missing = [k for k in kinds if any((step, n, setting) not in existing
                                           for n in metric_names(k, network_kind))]
        _check_protocol(existing, step, setting, common)
        samples = sample(run_dir, step, cfg, num_samples=cfg.eval.num_samples, shard_size=shard_size,
                         task_index=task_index, num_tasks=num_tasks, device=run_device,
                         progress=progress)
        if not samples.complete:
            print(f"eval: step {step}: this task's shards are done; the metrics wait for the other "
                  f"{num_tasks - 1} task(s) (re-run any task once they finish)", flush=True)
            continue
        began = time.perf_counter()
        results = compute_metrics(missing, network, reference, backend, samples.shards, network_kind)
        seconds = (samples.sampling_seconds(), time.perf_counter() - began)
        written += append_rows(run_dir, [_row(common, name, value, used, extra, kind, *seconds)
                                         for name, kind, value, used, extra in results])
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
                shard_size: int, network, reference: Reference) -> dict:
    """The fields every row of this (step, setting) carries."""
    from bench.train.checkpoint import WEIGHTS_FILE, checkpoint_path, read_meta

    weights_sha = read_meta(checkpoint_path(run_dir, step))["sha256"][WEIGHTS_FILE]
    plan = sampling_setting(cfg, manifest, step, weights_sha, shard_size)
    from bench.evaluate.sampling import samples_dir

    return {"step": int(step), "setting": setting, "setting_hash": plan.hash,
            "n": int(cfg.eval.num_samples), "seed": plan.seed, "sampling_seed": plan.seed, "sampler": plan.sampler,
            "sampling_steps": plan.num_sampling_steps, "guidance": plan.guidance,
            "weights": plan.weights, "precision": plan.precision,
            "label_sampling": plan.label_sampling, "batch_size": plan.batch_size,
            "shard_size": plan.shard_size, "checkpoint_sha256": weights_sha,
            "feature_network": network.network_id, "feature_weights_sha256": network.weights_sha256,
            "reference_sha256": reference.provenance.get("reference_sha256"),
            "reference_source": reference.provenance.get("reference_source"),
            "n_reference": reference.provenance.get("n_reference"),
            "spec": cfg.spec, "run_dir": str(run_dir),
            "samples_dir": str(samples_dir(run_dir, plan))}


def _row(common: dict, name: str, value: float, backend: str, extra: dict, kind: str,
         sampling_seconds: float, metric_seconds: float) -> dict:
    from bench.evaluate.quality import MetricResult, get_backend

    result = MetricResult(metric=name, value=float(value), backend=backend,
                          backend_version=get_backend(backend).version,
                          feature_network=common["feature_network"],
                          feature_weights_sha256=common["feature_weights_sha256"],
                          reference_sha256=None if kind in ("accuracy", "is") else common["reference_sha256"],
                          n_samples=common["n"], extra=extra).to_json()
    result.pop("n_samples")  # recorded as "n"
    return {**common, **result, "sampling_seconds": sampling_seconds,
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


def _run_cli(name: str, body) -> int:
    from bench.evaluate.features import FeatureNetworkError
    from bench.train.checkpoint import CorruptCheckpointError

    try:
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

    return _run_cli("sample", body)


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
                       num_tasks=args.num_tasks, device=args.device, progress=not args.no_progress)
        shown = [r for r in read_eval_rows(args.run_dir) if r.get("setting") == args.setting
                 and (not args.steps or r["step"] in args.steps)]
        print(f"eval: {len(new)} new row(s) in {Path(args.run_dir) / EVAL_FILE}")
        if shown:
            print(format_table(shown))
        return 0

    return _run_cli("eval", body)
