"""`bench train`: one training run, resumable, on one process or many (DDP).

`setup_run` builds the run's state (`RunState`: data, model, EMA, optimiser, the training step,
generators) and checks everything that can fail before the first file is written. `_train` is then
the whole run on one page: under the run folder's `.train.lock` (rank 0; bench.locks) it cleans the
folder, resumes from the newest valid checkpoint, and runs the steps: batch -> step (loss, backward,
NaN guard, clipping, AdamW, EMA: bench/train/step.py) -> log row -> checkpoint.

Run folder (layout in bench.runfolder): `config.json`, `checkpoints/<step>/` (bench.train.checkpoint),
`metrics.jsonl` (one row per log tick, rank 0) and `DONE` once the final checkpoint exists. Re-running
a finished run returns at once; re-running an unfinished one resumes bit-exactly, and after a kill at
any moment they are byte-identical to an uninterrupted run's but for measured fields (test_kill.py).

Why that holds, and why a run does not depend on the number of ranks or the spec's draws (the
global batch order, every rank drawing the whole batch's noise, `_RankRows`, REPA's per-rank share,
the carried log window, paired seeds): docs/runs.md, "Training: resume, ranks and paired seeds".
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from bench import runfolder
from bench.atomic import atomic_write_text, check_writable_dir, crash_point, remove_stale_temporaries
from bench.compose import dumps, load_config, load_config_file, to_dict
from bench.config import ConfigError, ExperimentConfig
from bench.metrics_log import MetricsLogger, check_sinks, forget_after
from bench.prepare.dataset import PreparedDataError, read_manifest
from bench.prepare.encoders import EncoderError
from bench.prepare.sources import DatasetError
from bench.progress import Progress, every_seconds
from bench.run_hash import derive_seed, identity_dict, run_hash
from bench.run_hash import run_dir as default_run_dir
from bench.storage import checkpoint_bytes, checkpoints_held, guard, preflight_warning
from bench.train import checkpoint as ckpt
from bench.train import distributed as dist_utils
from bench.train.build import build_model, build_transport
from bench.train.data import TrainingData, check_prepared, read_align_manifest
from bench.train.step import (
    CompiledNetwork,
    NonFiniteLossError,
    TrainStep,
    build_optimizer,
    make_train_step,
    resolve_compile,
)
from models.backbone import BackboneOutput


def reseed_for_step(generator: torch.Generator, seed: int, purpose: str, step: int) -> torch.Generator:
    """`generator` re-seeded from (seed, purpose, step): the draws of global batch `step` do not
    depend on how many numbers earlier steps took from the stream.

    Why (common random numbers): the objective draws t, eps_x, then eps_z only when the spec
    has semantic channels. With one stream for the whole run, step 2's t and eps_x of ReDi would
    already differ from latent-only's; re-seeded per step, seed k of every spec gets the same t and
    eps_x at every step, so paired differences between specs cancel that noise. Resume stays exact:
    the seed is a function of the step alone.
    """
    return generator.manual_seed(derive_seed(seed, purpose, step))


# ----------------------------------------------------------------------------------------------
# Model pieces


class _RankRows:
    """Runs the network on this rank's rows of the global batch and fills the other rows with the
    other ranks' outputs (detached), so every rank computes the single-process loss but
    back-propagates only through its own rows; REPA's projector outputs of other rows are zeros
    (docs/runs.md, "Training: resume, ranks and paired seeds")."""

    def __init__(self, net: nn.Module, rank: int, world: int, local_batch: int) -> None:
        self.net, self.rank, self.world = net, rank, world
        self.rows = slice(rank * local_batch, (rank + 1) * local_batch)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        local = local.float()
        parts = dist_utils.all_gather_rows(local)
        parts[self.rank] = local  # keep the autograd graph on our own rows
        return torch.cat(parts)

    def _pad(self, local: torch.Tensor) -> torch.Tensor:
        local = local.float()
        before = local.new_zeros((self.rows.start, *local.shape[1:]))
        after = local.new_zeros(((self.world - 1 - self.rank) * local.shape[0], *local.shape[1:]))
        return torch.cat([before, local, after])

    def __call__(self, x, t, y, z=None) -> BackboneOutput:
        r = self.rows
        out = self.net(x[r], t[r], y[r], None if z is None else z[r])
        return BackboneOutput(self._gather(out.x), None if out.z is None else self._gather(out.z),
                              None if out.aligned is None else self._pad(out.aligned))


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


# ----------------------------------------------------------------------------------------------
# Run folder


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_saved_config(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """True if `run_dir` already has a config.json; ConfigError if it describes another run."""
    if not runfolder.config_path(run_dir).is_file():
        return False
    saved, current = _flatten(identity_dict(runfolder.read_run_config(run_dir))), _flatten(identity_dict(cfg))
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differ:
        shown = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}" for k in differ[:5])
        raise ConfigError(f"{run_dir} holds a run with another configuration ({shown}); use a fresh "
                          "run folder or the saved config")
    return True


def _finished(run_dir: Path, cfg: ExperimentConfig, main: bool) -> bool:
    """DONE is there and the final checkpoint verifies. A DONE whose final checkpoint is missing or
    corrupt is stale: say so; the resume (newest good checkpoint) rebuilds the final one."""
    if not runfolder.is_done(run_dir):
        return False
    try:
        ckpt.verify_checkpoint(runfolder.checkpoint_path(run_dir, cfg.train.max_steps))
        return True
    except ckpt.CorruptCheckpointError as err:
        if main:
            print(f"train: {run_dir} is marked finished but its final checkpoint is unusable ({err}); "
                  "training again from the newest good checkpoint to rebuild it", flush=True)
        return False


def seed_global_rngs(seed: int) -> None:
    """Python's and NumPy's global RNGs from the run's seed (their states are saved in checkpoints)."""
    random.seed(derive_seed(seed, "python"))
    np.random.seed(derive_seed(seed, "numpy") % 2**32)


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    state.update({name: g.get_state() for name, g in generators.items()})
    return state


def _restore_rng(state: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    cuda = [state[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in state]
    if torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    for name, generator in generators.items():
        generator.set_state(state[name])


# ----------------------------------------------------------------------------------------------
# The run state


class _LogWindow:
    """The steps since the last log row: every term's sum (tensors: no host sync per step), their
    count and the clock. A checkpoint inside a window carries it (`carried`) and a resume continues
    it, so a row is the same number whether or not the run was interrupted."""

    def __init__(self, carried: Optional[dict], rank: int, world: int, device: torch.device) -> None:
        """Continue the window a checkpoint carried (none in older ones). With another number of
        ranks the ranks' mean is used: the same row up to float rounding."""
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        if carried and carried.get("steps"):
            self.sums = {key: torch.tensor(values[rank] if len(values) == world else sum(values) / len(values),
                                           dtype=torch.float32, device=device)
                         for key, values in carried["sums"].items()}
            self.steps = int(carried["steps"])
        self.timed, self.since, self.began = 0, time.perf_counter(), time.time()

    def add(self, losses: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + grad_norm.detach().float()
        self.steps, self.timed = self.steps + 1, self.timed + 1

    def row(self, cfg: ExperimentConfig, step: int, world: int, device: torch.device) -> dict:
        """The log row of `step` (every rank takes part in the reduction); starts the next window."""
        record = _log_record(self.sums, self.steps, self.timed, world, cfg, step,
                             time.perf_counter() - self.since, time.time() - self.began, device)
        self.sums, self.steps, self.timed, self.since = {}, 0, 0, time.perf_counter()
        return record

    def carried(self) -> dict:
        """The partial window at a checkpoint: every rank's float32 sums (exact as JSON floats);
        every rank takes part in the gather."""
        if not self.steps:
            return {"steps": 0, "sums": {}}
        keys = sorted(self.sums)
        ranks = dist_utils.all_gather_rows(torch.stack([self.sums[k] for k in keys]))
        return {"steps": self.steps, "sums": {k: [float(r[i]) for r in ranks] for i, k in enumerate(keys)}}


@dataclass
class RunState:
    """One run between two steps. `setup_run` builds it before the first file is written; the
    resume and `_open_outputs` fill in the rest under the run folder's lock. The loop reads and
    updates only this."""

    cfg: ExperimentConfig
    run_dir: Path
    info: dist_utils.DistInfo
    manifest: dict
    data: TrainingData  # the prepared train split and the global batch order
    model: nn.Module  # fp32 master weights: what checkpoints hold
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    train_step: TrainStep  # the objective, precision, backward, NaN guard, clipping, AdamW, EMA
    generators: dict[str, torch.Generator]  # "objective" (re-seeded every step), "latent_noise"
    has_config: bool  # config.json is already in the run folder
    local_rows: slice  # this rank's rows of the global batch
    token_grid: int  # the model's token grid (REPA targets are resized to it)
    keep: set[int]  # checkpoints never pruned: the milestones and the final step
    step: int = 0  # the last step done: the resume point, then every step
    last_saved: int = 0  # the newest checkpoint's step (the NaN error names it)
    carried_window: Optional[dict] = None  # the log window the resumed checkpoint carried
    forward: Optional[Callable] = None  # the network as the step calls it (DDP, torch.compile, _RankRows)
    compiled: Optional[CompiledNetwork] = None  # the torch.compile wrapper when the step compiles
    window: Optional[_LogWindow] = None
    bar: Optional[Progress] = None
    log: Optional[MetricsLogger] = None  # rank 0 only


def setup_run(cfg: ExperimentConfig, run_dir: Path, info: dist_utils.DistInfo) -> Optional[RunState]:
    """The run's state, built and checked before anything is written (config vs. saved config,
    prepared shards vs. config, model and objective settings, batch vs. ranks); None when the run
    is finished and its final checkpoint verifies."""
    device, world, main = info.device, info.world_size, info.is_main
    has_config = _check_saved_config(run_dir, cfg)
    if has_config and _finished(run_dir, cfg, main):
        if main:
            print(f"train: {run_dir} is finished (step {cfg.train.max_steps}); nothing to do", flush=True)
        return None
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {world} ranks")
    check_sinks(cfg.train.log_to)
    every_seconds()  # a bad REDI_BENCH_PROGRESS_EVERY fails here, before the run folder is written
    try:
        manifest, align = read_manifest(cfg.data.prepared_dir), read_align_manifest(cfg)
        check_prepared(cfg, manifest, cfg.data.prepared_dir, align)
        data = TrainingData(cfg, manifest, device)
    except (PreparedDataError, EncoderError, DatasetError) as err:
        raise ConfigError(str(err)) from None
    torch.manual_seed(derive_seed(cfg.train.seed, "init"))  # identical initial weights on every rank
    seed_global_rngs(cfg.train.seed)  # a checkpoint's python/numpy states then restore over these
    model = build_model(cfg, manifest, align).to(device)
    transport = build_transport(cfg, manifest, processes=world)  # batch_official drops per rank
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the official code trains fp32 with TF32
        torch.backends.cudnn.allow_tf32 = True
    ema = copy.deepcopy(model).requires_grad_(False)  # initialised from the model (official)
    optimizer = build_optimizer(model, cfg)
    train_step = make_train_step(model, ema, transport, cfg, device, world, optimizer)
    generators = {name: torch.Generator(device).manual_seed(derive_seed(cfg.train.seed, name))
                  for name in ("objective", "latent_noise")}
    if main:
        warn_if_disk_is_short(cfg, run_dir, model)
    local = cfg.train.batch_size // world
    return RunState(cfg=cfg, run_dir=run_dir, info=info, manifest=manifest, data=data, model=model, ema=ema,
                    optimizer=optimizer, train_step=train_step, generators=generators, has_config=has_config,
                    local_rows=slice(info.rank * local, (info.rank + 1) * local),
                    token_grid=model.config.grid_size, keep=set(cfg.train.milestones) | {cfg.train.max_steps})


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: ExperimentConfig, run_dir: Optional[Path] = None) -> Path:
    """Train `cfg` in `run_dir` (default: its identity folder), resuming if it has checkpoints.

    Every check that can fail runs before the first file is written (`setup_run`). Returns the run folder.
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    joined = dist_utils.is_distributed()  # a caller's process group is left alone at the end
    info = dist_utils.init_distributed()
    owns_group = info.world_size > 1 and not joined
    try:
        return _train(cfg, run_dir, info)
    finally:
        if owns_group:
            dist_utils.cleanup()


def _train(cfg: ExperimentConfig, run_dir: Path, info: dist_utils.DistInfo) -> Path:
    """The whole run on one page: setup, then under the run folder's lock (rank 0) the resume and
    the steps; the lock, the progress bar and the metrics logger close with `held`, however the loop ends."""
    run = setup_run(cfg, run_dir, info)
    if run is None:  # finished, and its final checkpoint verifies
        return run_dir
    with contextlib.ExitStack() as held:
        _take_lock(run, held)
        _clean_run_folder(run)  # config.json; leftovers of a killed writer
        _resume(run)  # the newest valid checkpoint, if any; metrics.jsonl cut after it
        _open_outputs(run, held)  # the network as the step calls it, the bar, the metrics logger
        schedule, data = cfg.train, run.data
        run.model.train()
        first, started = run.step + 1, time.perf_counter()
        for step in range(first, schedule.max_steps + 1):
            x, z, y, align = data.batch(step - 1, run.generators["latent_noise"], run.local_rows, run.token_grid)
            losses, grad_norm = _step(run, step, x, z, y, align)  # loss, backward, clip, AdamW, EMA
            if step == first:
                _report_compile(run, time.perf_counter() - started)
            run.window.add(losses, grad_norm)
            run.step = step
            crash_point("train:step")
            if step % schedule.log_every == 0 or step == schedule.max_steps:
                _log_row(run, step)
            run.bar.update(1)  # after the row: a line printed at this step shows its loss
            if step % schedule.ckpt_every == 0 or step in run.keep:  # keep: milestones, the final step
                _save_checkpoint(run, step)
        _finish(run)
    return run_dir


def _take_lock(run: RunState, held: contextlib.ExitStack) -> None:
    """Rank 0 holds the run folder's lock and the guard against its removal until `held` closes;
    when the lock is refused, every rank stops with the holder's name."""
    refused = None
    if run.info.is_main:
        try:
            held.enter_context(runfolder.train_lock(run.run_dir))
            held.enter_context(guard(run.run_dir))  # a removed run folder is an error, not re-created
        except runfolder.RunFolderError as err:
            refused = err
    if dist_utils.broadcast_int(int(refused is not None)):
        raise refused or runfolder.RunFolderError(f"{run.run_dir} is being trained by another process")


def _clean_run_folder(run: RunState) -> None:
    """The first writes (rank 0): config.json once, leftovers of a killed writer removed."""
    run_dir = run.run_dir
    if run.info.is_main:
        if not run.has_config:
            atomic_write_text(runfolder.config_path(run_dir), dumps(run.cfg) + "\n")
        ckpt.remove_stale_temporaries(run_dir)
        remove_stale_temporaries(run_dir)  # config.json / DONE of a killed trainer (none other writes here)
        if runfolder.is_done(run_dir):  # stale (_finished said so): the rebuilt final checkpoint writes it again
            (run_dir / runfolder.DONE_FILE).unlink()
    dist_utils.barrier()


def _resume(run: RunState) -> None:
    """Weights, optimiser, RNG states, step and log window from the newest valid checkpoint, if
    any; then rows past the resume point (any, on a fresh start) were a killed process's: cut them."""
    main, run_dir = run.info.is_main, run.run_dir
    resume = ckpt.select_resume_checkpoint(run_dir) if main else None
    resume_step = dist_utils.broadcast_int(-1 if resume is None else int(resume.name))
    if resume_step >= 0:
        meta, rng = ckpt.load_checkpoint(runfolder.checkpoint_path(run_dir, resume_step), model=run.model,
                                         ema=run.ema, optimizer=run.optimizer, device=run.info.device)
        _restore_rng(rng, run.generators)
        run.step, run.carried_window = int(meta["step"]), meta["state"].get("log_window")
        _check_same_data(run, meta["state"])
        if main:
            print(f"train: resuming from checkpoint step {run.step} in {run_dir}", flush=True)
    run.last_saved = run.step
    if main:
        forget_after(run_dir, run.step)


def _check_same_data(run: RunState, state: dict) -> None:
    """ConfigError when the checkpoint was trained on other prepared shards or REPA targets."""
    cfg, data, manifest = run.cfg, run.data, run.manifest
    if state.get("prepared") != manifest.get("settings_hash") or state["data"] != data.sampler.position(run.step):
        raise ConfigError(f"{run.run_dir} was trained on other prepared data (settings "
                          f"{state.get('prepared')}) than {cfg.data.prepared_dir} holds now "
                          f"({manifest.get('settings_hash')}); point data.prepared_dir at the original "
                          "shards or start a new run")
    if state.get("align") != (data.alignment_source() if data.aligned is not None else None):
        raise ConfigError(f"{run.run_dir} was trained on REPA targets from {state.get('align')} but "
                          f"data.align_prepared_dir={cfg.data.align_prepared_dir} holds other ones; point "
                          "it at the original folder or start a new run")


def _open_outputs(run: RunState, held: contextlib.ExitStack) -> None:
    """The network as the step calls it (DDP, torch.compile, this rank's rows), the progress bar
    (on a terminal a bar; in a batch job's log a plain line every REDI_BENCH_PROGRESS_EVERY
    seconds) and rank 0's metrics logger; the bar and the logger close with `held`."""
    cfg, info, run_dir = run.cfg, run.info, run.run_dir
    world, device = info.world_size, info.device
    net: Callable = run.model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if resolve_compile(cfg.train.compile, device, cfg.train.max_steps):
        net = run.compiled = CompiledNetwork(net, fallback=cfg.train.compile is None)
    run.forward = _RankRows(net, info.rank, world, cfg.train.batch_size // world) if world > 1 else net
    run.bar = Progress("train step", cfg.train.max_steps, initial=run.step, images_per_unit=cfg.train.batch_size,
                       enabled=info.is_main)
    held.callback(run.bar.close)
    run.log = held.enter_context(MetricsLogger(run_dir, cfg.train.log_to, run_name=run_dir.name, run_id=run_hash(cfg),
                                               config=to_dict(cfg), resume_step=run.step)) if info.is_main else None
    run.window = _LogWindow(run.carried_window, info.rank, world, device)


def _step(run: RunState, step: int, x: torch.Tensor, z: Optional[torch.Tensor], y: torch.Tensor,
          align: Optional[torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One training step on the step's own objective draws; a NaN names the last good checkpoint."""
    try:
        objective_rng = reseed_for_step(run.generators["objective"], run.cfg.train.seed, "objective", step)
        return run.train_step(run.forward, x, z, y, objective_rng, align_target=align)
    except NonFiniteLossError as err:
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step} (loss={err.loss:.4g}, grad_norm={err.grad_norm:.4g}); "
            f"stopped before the update. The last good checkpoint is step {run.last_saved} in "
            f"{runfolder.checkpoints_dir(run.run_dir)}. Lower optim.lr, set optim.max_grad_norm (e.g. 1.0)"
            + (" or train.precision=fp32" if run.train_step.autocast_dtype else "")) from None


def _report_compile(run: RunState, seconds: float) -> None:
    """The compile's cost, once: the first step compiles the forward and the backward."""
    if run.compiled is not None and run.compiled.active and run.info.is_main:
        setting = "auto" if run.cfg.train.compile is None else "true"
        print(f"train: torch.compile (train.compile={setting}): the first step, which compiles the network, "
              f"took {seconds:.1f} s", flush=True)


def _log_row(run: RunState, step: int) -> None:
    """The mean of every term since the last row (every rank reduces; rank 0 writes it)."""
    record = run.window.row(run.cfg, step, run.info.world_size, run.info.device)
    if run.log is not None:
        run.log.log_train(record)
        run.bar.set_postfix(loss=float(record["loss"]))


def _save_checkpoint(run: RunState, step: int) -> None:
    """Checkpoint `step` (rank 0 writes it and prunes the old ones it need not keep; every rank
    gathers the log window and waits)."""
    cfg, data, info = run.cfg, run.data, run.info
    log_window = run.window.carried()
    if info.is_main:
        state = {"data": data.sampler.position(step), "run_hash": run_hash(cfg), "world_size": info.world_size,
                 "prepared": run.manifest.get("settings_hash"),
                 "precision": "fp32" if run.train_step.autocast_dtype is None else "bf16",
                 "tf32": info.device.type == "cuda"}
        if data.aligned is not None:  # which encoder's stored features were the REPA target
            state["align"] = data.alignment_source()
        ckpt.save_checkpoint(run.run_dir, step, model=run.model, ema=run.ema, optimizer=run.optimizer,
                             rng=_rng_state(run.generators), state={**state, "log_window": log_window})
        ckpt.prune_checkpoints(run.run_dir, cfg.train.keep_last, run.keep)
    run.last_saved = step
    dist_utils.barrier()


def _finish(run: RunState) -> None:
    """The bar's last line before "finished" (while a W&B sink still records the output), then DONE."""
    run.bar.close()
    if run.info.is_main:
        runfolder.write_done(run.run_dir, run.cfg.train.max_steps, time.time())
        print(f"train: finished {run.cfg.train.max_steps} steps in {run.run_dir}", flush=True)
    dist_utils.barrier()


def warn_if_disk_is_short(cfg: ExperimentConfig, run_dir: Path, model: nn.Module) -> None:
    """The free-space preflight: one line on stderr when the run folder's disk has less room than
    the checkpoints this run still writes (their size from the built model: model and EMA
    weights, AdamW's two float32 moments per trainable parameter). A warning, not a refusal."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    one = checkpoint_bytes(sum(p.numel() for p in model.parameters() if p.requires_grad), weights)
    count = max(checkpoints_held(cfg.train) - len(runfolder.list_checkpoints(run_dir)), 1)
    warning = preflight_warning(run_dir, count * one, f"this run ({count} checkpoint(s) of about "
                                                      f"{one / 2**20:.1f} MB held at once)")
    if warning:
        print(f"bench train: {warning}", file=sys.stderr, flush=True)


def _log_record(sums: dict, steps: int, timed_steps: int, world: int, cfg: ExperimentConfig, step: int,
                seconds: float, elapsed: float, device: torch.device) -> dict:
    """Mean of every logged term over the `steps` since the last tick (some maybe before a resume),
    made global over ranks; the throughput over the `timed_steps` this process ran in `seconds`."""
    keys = sorted(sums)
    means = dist_utils.all_reduce_mean(torch.stack([sums[k] for k in keys]) / steps)
    values = dict(zip(keys, means.tolist()))
    if "loss/repa" in values and world > 1:  # each rank holds its share of the REPA mean (docstring)
        share = values["loss/repa"]
        values["loss/repa"] = share * world
        values["loss"] += cfg.objective.lambda_repa * share * (world - 1)
    memory, kind = _peak_memory_mb(device)
    return {"step": step, **values, "lr": cfg.optim.lr,
            "images_per_s": timed_steps * cfg.train.batch_size / max(seconds, 1e-9),
            "peak_memory_mb": memory, "memory_kind": kind, "time": time.time(), "elapsed_s": elapsed}


# ----------------------------------------------------------------------------------------------
# Entry points


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`bench train [key=value ...]` or `python -m bench.train.loop --config RUN/config.json [--run-dir DIR]`."""
    parser = argparse.ArgumentParser(prog="bench train", description="Train one run (resumes if started).")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. spec=redi train.max_steps=100")
    parser.add_argument("--config", help="a saved config.json instead of overrides")
    parser.add_argument("--run-dir", help="run folder (default: results/runs/<grid>/<spec>-<hash>)")
    args = parser.parse_intermixed_args(  # overrides may follow options
        list(sys.argv[1:] if argv is None else argv))
    if args.config and args.overrides:
        parser.error("give either --config or overrides, not both")
    cfg = load_config_file(args.config) if args.config else load_config(args.overrides)
    check_writable_dir(args.run_dir or cfg.output_root, "--run-dir" if args.run_dir else "output_root=")
    try:
        train(cfg, Path(args.run_dir) if args.run_dir else None)
    except NonFiniteLossError as err:
        print(f"bench train: {err}", file=sys.stderr)
        return 1
    return leave_finished_rank(0)


def leave_finished_rank(code: int) -> int:
    """A torchrun rank whose run finished (DONE written, process group destroyed) leaves without
    the interpreter's teardown: there, torch's C++ threads aborted a rank now and then with
    "terminate called without an active exception" (SIGABRT after a finished run: 5 of 399
    two-rank runs in a stress loop, 0 of 399 leaving this way; results/studies/torchrun_exit/).
    Elsewhere (one process, submitit, a caller in Python), `code`."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
