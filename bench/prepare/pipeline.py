"""`bench prepare`: images -> VAE moments + PCA-reduced semantic features, as resumable shards.

`run_prepare` checks the inputs (bench.prepare.options), claims the folder, then runs the passes of
bench.prepare.shards: pass 1 encodes each shard (VAE moments, float16 encoder features, float64 PCA
sums), the PCA is fitted once every train shard has its sums, and pass 2 projects each shard onto it.
Shards are dealt to array tasks round-robin (task index/count from the options or
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT). A task finds finished work and skips it, so a killed
run resumes, and any task that finds all train sums present fits the PCA (the result is the same
whoever does it; one task at a time, under the folder's PCA lock). `manifest.json` is written when
every shard is final, and a second call with the same settings (same content hash) returns at once.

The embedded default (`prepare_embedded`) also trains the tiny AutoencoderKL and the evaluation
classifier first (bench.prepare.embedded), in task 0.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from bench.atomic import atomic_save_safetensors, crash_point, remove_stale_temporaries
from bench.compose import load_config
from bench.config import DataConfig, EncoderConfig, VAEConfig
from bench.prepare import shards
from bench.prepare.dataset import FORMAT_VERSION, MANIFEST, shard_name, write_manifest
from bench.prepare.embedded import classifier_info, train_classifier, train_embedded_vae
from bench.prepare.encoders import LatentVAE, SemanticEncoder, load_vae
from bench.prepare.options import (
    PrepareError,
    PrepareOptions,
    array_task,
    build_parser,
    check_inputs,
    classifier_settings,
    encoder_dtype,
    options_from_args,
    resolve_device,
    wants_classifier,
)
from bench.prepare.pca import PCAModel
from bench.prepare.shards import CPU, pca_fit_selection
from bench.prepare.sources import ImageSource, open_split
from bench.process_lanes import start_lane
from bench.progress import Progress
from bench.storage import guard

# What other modules and the launcher take from here (the options and the command line's parser live
# in bench.prepare.options, the passes in bench.prepare.shards).
__all__ = ["PrepareError", "PrepareOptions", "build_parser", "main", "options_from_args", "prepare_embedded",
           "run_prepare"]


@dataclass
class _PrepareCall:
    """What the steps of one `run_prepare` call share: the configs, this task, the checked inputs."""

    cfg_data: DataConfig
    cfg_vae: VAEConfig
    cfg_encoder: EncoderConfig
    options: PrepareOptions
    out: Path
    task_index: int
    task_count: int
    sources: dict[str, ImageSource]
    encoder: SemanticEncoder
    vae: Optional[LatentVAE]
    settings_hash: str
    started: float
    device: torch.device = CPU


def run_prepare(cfg_data, cfg_vae, cfg_encoder, options: Optional[PrepareOptions] = None) -> Path:
    """Prepare `cfg_data` with the VAE and semantic encoder of the configs (bench.config's
    DataConfig, VAEConfig, EncoderConfig) into `cfg_data.prepared_dir`; returns that folder.

    Returns after this task's share when other array tasks still have work; the folder is complete
    when `manifest.json` exists. Read it with `bench.prepare.dataset.load_prepared`.
    """
    options = options or PrepareOptions()
    task_index, task_count = array_task(options)
    out = Path(cfg_data.prepared_dir)
    started = time.time()
    sources, encoder, vae, settings, settings_hash = check_inputs(cfg_data, cfg_vae, cfg_encoder, options)
    if (out / MANIFEST).is_file() and shards.up_to_date(out, settings_hash, options):
        return out
    pca = shards.supplied_pca(encoder, options, out, settings_hash)  # validated before anything is written
    if pca is None and "train" not in sources:
        raise PrepareError("the PCA is fitted on the train split; include 'train' in splits or "
                           "pass pca_path (a PCA fitted earlier)")
    call = _PrepareCall(cfg_data, cfg_vae, cfg_encoder, options, out, task_index, task_count,
                        sources, encoder, vae, settings_hash, started)
    pca = _start_folder(call, settings, pca)
    lane_timings = {}
    if task_count == 1 and options.lanes > 1:
        lane_timings = _run_lanes(call)
        call.options = replace(options, lanes=1)
    call.vae = call.vae or load_vae(cfg_vae, embedded_dir=out / "vae")
    call.device = resolve_device(call.options)
    call.vae, call.encoder = call.vae.to(call.device), encoder.to(call.device)

    plan = shards.shard_plan(sources, call.options)
    pca_rows = pca_fit_selection(sum(len(r) for s, _, r in plan if s == "train"), cfg_encoder,
                                 call.options.seed) if pca is None else None
    mine, count, encode_seconds = _encode_share(call, plan, pca_rows)
    if pca is None:
        pca = _fitted_pca(call, plan, pca_rows)
    if pca is None:
        print("prepare: this task's shards are encoded; the PCA waits for the other tasks' "
              "train shards. Re-run prepare (any task) once they finish.", flush=True)
        return out
    _project_and_finish(call, plan, mine, pca, {"encode_seconds": encode_seconds,
                                                "encoded_images": count, **lane_timings})
    return out


def _start_folder(call: _PrepareCall, settings: dict, pca: Optional[PCAModel]) -> Optional[PCAModel]:
    """Claim the folder for these settings, clear a killed run's temporaries (a lone task only),
    store a supplied PCA or read one an earlier run fitted, and train the embedded VAE and the
    classifier if they are missing. Returns the PCA known so far (None: still to fit)."""
    out = call.out
    out.mkdir(parents=True, exist_ok=True)
    shards.claim_folder(out, call.settings_hash, settings, call.options)
    if call.task_count == 1:
        remove_stale_temporaries(out)
        for split in call.sources:
            remove_stale_temporaries(out / split)
    with shards.pca_lock(out):
        if pca is not None and not (out / "pca.safetensors").is_file():
            pca.save(out / "pca.safetensors")  # a supplied/imported PCA, converted once
        elif pca is None:  # fitted by an earlier (array) run, if any
            pca = shards.stored_pca(out, call.encoder)
    _ensure_embedded_assets(out, call.cfg_data, call.cfg_vae, call.sources, call.options, call.task_index)
    return pca


def _ensure_embedded_assets(out: Path, cfg_data, cfg_vae, sources: dict[str, ImageSource],
                            options: PrepareOptions, task_index: int) -> None:
    """Train the embedded VAE and the evaluation classifier when they are missing (task 0)."""
    need_vae = cfg_vae.kind == "embedded" and not cfg_vae.path and \
        not (out / "vae" / "training.json").is_file()  # written after the weights
    need_classifier = wants_classifier(cfg_data, options) and classifier_info(out / "classifier") is None
    if not (need_vae or need_classifier):
        return
    if task_index != 0:
        raise PrepareError("the embedded VAE/classifier are trained by array task 0; run task 0 "
                           "first (or prepare once with task_count=1), then the other tasks")
    train = sources.get("train") or open_split(cfg_data, "train")
    train_images = train.images(range(len(train)))
    side = None
    if need_vae and need_classifier and options.lanes > 1:  # side by side, one thread each
        side = start_lane(_classifier_lane, cfg_data, options, out)
        need_classifier = False
    with _threads(1 if side else None):
        _train_assets(out, cfg_data, sources, options, train, train_images, need_vae, need_classifier)
    if side is not None:
        side.result()  # re-raises the classifier's error, if any


def _train_assets(out: Path, cfg_data, sources: dict, options: PrepareOptions, train, train_images,
                  need_vae: bool, need_classifier: bool) -> None:
    if need_vae:
        print("prepare: training the embedded AutoencoderKL ...", flush=True)
        summary = train_embedded_vae(train_images, options.vae, options.seed, out / "vae",
                                     options.progress)
        print(f"prepare: VAE done in {summary['seconds']:.0f}s, PSNR {summary['train_psnr_db']:.1f} dB, "
              f"scaling factor {summary['scaling_factor']:.4f}", flush=True)
    if need_classifier:
        test = sources.get("test") or open_split(cfg_data, "test")
        print("prepare: training the evaluation classifier ...", flush=True)
        summary = train_classifier(train_images, train.labels, test.images(range(len(test))),
                                   test.labels, cfg_data.num_classes,
                                   classifier_settings(cfg_data, options),
                                   options.seed, out / "classifier", options.progress)
        print(f"prepare: classifier test accuracy {summary['test_accuracy']:.4f} "
              f"({summary['seconds']:.0f}s)", flush=True)


def _classifier_lane(cfg_data, options: PrepareOptions, out: Path) -> None:
    """The evaluation classifier in a lane of its own (bench.process_lanes: a spawned process, one thread)."""
    train = open_split(cfg_data, "train")
    _train_assets(out, cfg_data, {}, options, train, train.images(range(len(train))), False, True)


def _run_lanes(call: _PrepareCall) -> dict:
    """This machine's lanes: tasks 1..lanes-1 in spawned processes, task 0 here, one thread each;
    then the calling `run_prepare` finishes as the only task (fits the PCA if no task did, projects
    what is left, writes the manifest), exactly as after a SLURM array. Returns their timings."""
    # Shards are claimed, not dealt: with a fixed half each, one lane of a 2-vCPU EPYC encoded
    # at 99-102 images/s and the other at 133-135, and the faster one idled for 80-90 s.
    options, configs = call.options, (call.cfg_data, call.cfg_vae, call.cfg_encoder)
    lanes_started = time.time()
    claims = tempfile.mkdtemp(prefix="redi-bench-prepare-claims-")
    try:
        lane_options = replace(options, claims_dir=claims)
        lanes = [start_lane(_encode_lane, *configs, lane_options, i) for i in range(1, options.lanes)]
        with _threads(1):
            _encode_lane(*configs, lane_options, 0)
        for lane in lanes:
            lane.result()
    finally:
        shutil.rmtree(claims, ignore_errors=True)
    return {"lanes": options.lanes, "lanes_seconds": time.time() - lanes_started}


def _encode_lane(cfg_data, cfg_vae, cfg_encoder, options: PrepareOptions, task_index: int) -> None:
    """Local task `task_index` of `options.lanes`: its share of the shards (run in a lane process,
    or in this one for task 0)."""
    run_prepare(cfg_data, cfg_vae, cfg_encoder, replace(options, task_index=task_index,
                                                        task_count=options.lanes, lanes=1, progress=False))


@contextlib.contextmanager
def _threads(count: Optional[int]):
    """torch's compute threads inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _encode_share(call: _PrepareCall, plan, pca_rows: Optional[torch.Tensor]) -> tuple[list, int, float]:
    """Pass 1 over this task's shards not encoded yet. Returns the shards this call projects (its
    share; a lane: the shards it claimed), the images encoded and the seconds that took."""
    options, out = call.options, call.out
    claims = options.claims_dir
    if options.shards:  # the launcher's list for this array task
        mine = [item for item in plan if f"{item[0]}/{item[1]}" in set(options.shards)]
    else:
        mine = plan if claims else [item for position, item in enumerate(plan)
                                    if position % call.task_count == call.task_index]
    todo = [(s, i, r) for s, i, r in mine if not (out / shard_name(s, i)).is_file()
            and not (out / shards.encoded_name(s, i)).is_file()]
    encode_start = time.time()
    count, claimed, dtype = 0, [], encoder_dtype(call.cfg_encoder, options)
    # A bar on a terminal; in a batch job's log, a plain line every REDI_BENCH_PROGRESS_EVERY seconds.
    with Progress(f"prepare task {call.task_index}/{call.task_count}: images",
                  sum(len(r) for _, _, r in todo) // (options.lanes if claims else 1),
                  enabled=options.progress) as bar:
        for split, index, indices in todo:
            if claims and not shards.claim_shard(claims, split, index):
                continue  # another lane has it
            count += len(indices)
            claimed.append((split, index, indices))
            tensors = shards.encode_shard(call.vae, call.encoder, call.sources[split], indices,
                                          options.batch_size, fit_pca=(split == "train"), bar=bar,
                                          device=call.device, pca_rows=pca_rows, autocast_dtype=dtype)
            atomic_save_safetensors(out / shards.encoded_name(split, index), tensors,
                                    metadata={"format": FORMAT_VERSION, "pass": "1"})
            crash_point(f"prepare:encoded:{split}/{index}")
    encode_seconds = time.time() - encode_start
    if count:
        print(f"prepare: encoded {count} images in {encode_seconds:.1f}s "
              f"({count / max(encode_seconds, 1e-9):.1f} images/s)", flush=True)
    # A lane projects what it encoded; the call that started the lanes, the rest.
    return (claimed if claims else mine), count, encode_seconds


def _fitted_pca(call: _PrepareCall, plan, pca_rows: Optional[torch.Tensor]) -> Optional[PCAModel]:
    """The PCA another task fitted meanwhile, else one fitted here; None while train sums are missing."""
    with shards.pca_lock(call.out):
        return shards.stored_pca(call.out, call.encoder) or shards.fit_pca(call.out, plan, call.encoder, pca_rows)


def _project_and_finish(call: _PrepareCall, plan, mine: list, pca: PCAModel, timings: dict) -> None:
    """Pass 2 over `mine`; then, once every shard of the plan is final, the manifest."""
    out, cfg_encoder = call.out, call.cfg_encoder
    for split, index, _ in mine:
        if not (out / shard_name(split, index)).is_file():
            shards.project_shard(out, split, index, pca, cfg_encoder.pca_rank_max,
                                 cfg_encoder.store_features)
        else:  # killed between writing the final shard and removing its pass-1 file
            (out / shards.encoded_name(split, index)).unlink(missing_ok=True)
    if all((out / shard_name(s, i)).is_file() for s, i, _ in plan):
        write_manifest(out, call.settings_hash, call.cfg_data, cfg_encoder, call.vae.info,
                       call.encoder.info, pca, plan, classifier_info(out / "classifier"),
                       {"last_task_seconds": time.time() - call.started, **timings})
        print(f"prepare: finished {out} ({len(plan)} shards)", flush=True)
    else:
        print("prepare: this task is done; other tasks' shards are still missing", flush=True)


def prepare_embedded(prepared_dir: str | Path = "results/prepared", data_name: str = "fashion_mnist",
                     options: Optional[PrepareOptions] = None, pca_rank_max: int = 16,
                     data_root: Optional[str] = None) -> Path:
    """The embedded default: Fashion-MNIST 32x32 (or digits for tests), the tiny AutoencoderKL and
    the evaluation classifier trained here, EfficientNet-Lite0 block-7 features PCA'd to r_max (in
    the precision encoder.precision's default, auto, resolves to)."""

    options = options or PrepareOptions()
    cfg_data = DataConfig(name=data_name, root=data_root, image_size=32, num_classes=10,
                          prepared_dir=str(prepared_dir))
    cfg_encoder = EncoderConfig(kind="efficientnet_lite0", pca_rank_max=pca_rank_max)
    return run_prepare(cfg_data, VAEConfig(kind="embedded"), cfg_encoder, options)


def main(argv=None) -> int:
    """`bench prepare [key=value ...] [options]`: the data/vae/encoder groups of the experiment
    config say what to prepare (the same overrides as `bench train`), the options how."""
    import sys

    args = build_parser().parse_intermixed_args(  # overrides may follow options
        list(sys.argv[1:] if argv is None else argv))
    cfg = load_config(args.overrides)
    with guard(cfg.data.prepared_dir):  # a removed folder is one error (bench.storage), not re-created
        out = run_prepare(cfg.data, cfg.vae, cfg.encoder, options_from_args(args))  # errors: one line (bench.cli)
    print(f"prepare: output in {out}", flush=True)
    return 0
