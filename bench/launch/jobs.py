"""What runs on the nodes, and the run-folder files it and `bench status` read and write.

`TrainJob` and `EvalJob` (submitit `Checkpointable`s) do one cell's work and record `start` / `end`
rows in the run folder's `jobs.jsonl`; `Lane` runs several of them one after another in one local
job. The helpers read a run folder (through bench.runfolder): jobs.jsonl records and the
(step, setting) pairs eval.jsonl already covers.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import submitit

from bench.config import ExperimentConfig
from bench.runfolder import EVAL_FILE, JOBS_FILE, append_jsonl, read_jsonl
from bench.storage import StorageError, as_storage_error

# ----------------------------------------------------------------------------------------------
# Run folders (their layout and JSONL policy: bench.runfolder)


def append_record(run_dir: Path, row: dict) -> None:
    """Append one row, stamped with the time, to `<run_dir>/jobs.jsonl`."""
    append_jsonl(Path(run_dir) / JOBS_FILE,
                 [{**row, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "unix": time.time()}])


def metric_names(cfg: ExperimentConfig) -> list[str]:
    """The eval.jsonl metric names an evaluation of `cfg` records (bench.evaluate.score_run's naming).

    Without bench.evaluate.score_run, the names of eval.metrics as written. Raises ValueError
    (bench.evaluate.score_run's EvaluationError) when the metrics cannot be computed for this config.
    """
    # Imported here, not at the top: it pulls in torch, and `bench grid`/`bench status` stay torch-free.
    from bench.evaluate import score_run

    kinds = score_run.plan_metrics(cfg, score_run.DEFAULT_BACKEND)
    return [name for kind in kinds for name in score_run.metric_names(kind, cfg.eval.feature_network)]


def measured_steps(cfg: ExperimentConfig, run_dir: Path, steps: Sequence[int], setting: str) -> set[int]:
    """Steps of `steps` whose eval.jsonl rows (step, metric, setting) cover every metric of `cfg`."""
    names = set(metric_names(cfg))
    have: dict[int, set[str]] = {}
    for row in read_jsonl(Path(run_dir) / EVAL_FILE):
        if str(row.get("setting", "default")) == setting and isinstance(row.get("step"), int):
            have.setdefault(row["step"], set()).add(str(row.get("metric")))
    return {step for step in steps if names <= have.get(step, set())}


def last_metric(run_dir: Path) -> str:
    rows = [r for r in read_jsonl(Path(run_dir) / EVAL_FILE) if "value" in r]
    if not rows:
        return ""
    r = rows[-1]
    value = f"{r['value']:.4g}" if isinstance(r["value"], (int, float)) else str(r["value"])
    return f"{r.get('metric')}={value} @{r.get('step')} ({r.get('setting', 'default')})"


# ----------------------------------------------------------------------------------------------
# Jobs (what runs on the nodes)


def _job_environment() -> Optional[submitit.JobEnvironment]:
    try:
        return submitit.JobEnvironment()
    except Exception:  # called outside a submitit job (direct calls, tests)
        return None


class CellJob(submitit.helpers.Checkpointable):
    """One cell's work in a job; records start/end in the run folder and requeues itself."""

    stage = "train"
    threads: Optional[int] = None
    """Compute threads of this job's process (torch.set_num_threads), set by the launcher for local
    jobs from the profile's cpus_per_task; None leaves torch's default (every core it sees)."""
    storage_failed = False
    """Set when the work stopped on a storage fault (bench.storage): the job is then not requeued."""

    def __init__(self, grid: str, cell: str, cfg: ExperimentConfig, run_dir: str,
                 fn: Optional[Callable] = None, setting: Optional[str] = None, steps: Sequence[int] = ()) -> None:
        self.grid, self.cell, self.cfg, self.run_dir, self.fn = grid, cell, cfg, str(run_dir), fn
        self.setting, self.steps = setting, list(steps)

    def run(self) -> Any:
        raise NotImplementedError

    def __call__(self) -> Any:
        try:
            result = self.run_recorded()
        except StorageError:
            ignore_requeue_signal()  # a full or read-only disk fails the same way after a requeue
            raise
        ignore_requeue_signal()
        return result

    def run_recorded(self) -> Any:
        """`run()` between a `start` and an `end` row of jobs.jsonl (rank 0 records)."""
        env = _job_environment()
        main = env is None or env.global_rank == 0
        if self.threads:
            # Local lanes share the machine's cores: two lanes of one thread each must not both
            # start a thread per core (measured in slurm/profiles/local.yaml).
            import torch

            torch.set_num_threads(self.threads)
        tag = {"stage": self.stage, "cell": self.cell, "job_id": env.job_id if env else None,
               **({"setting": self.setting} if self.setting else {})}
        if main:
            restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
            append_record(Path(self.run_dir), {"event": "start", **tag, "host": socket.gethostname(),
                                               "pid": os.getpid(), "restarts": restarts})
            print(f"bench: {self.stage} of cell {self.cell} (grid {self.grid}) in {self.run_dir}, job "
                  f"{tag['job_id']}, restart {restarts}", flush=True)
        try:
            result = self.run()
        except Exception as err:
            fault = as_storage_error(err, self.run_dir)
            if fault is not None:
                self.storage_failed = True
                print(f"bench {self.stage}: error: {fault}", file=sys.stderr, flush=True)  # the log's one line
            if main:
                failure = fault or err
                record_failure(Path(self.run_dir), {"event": "end", **tag, "outcome": "failed",
                                                    "error": f"{type(failure).__name__}: {failure}"[:1000]})
            if fault is not None and fault is not err:
                raise fault from None
            raise
        except BaseException:  # SystemExit from submitit's requeue, KeyboardInterrupt
            if main:
                append_record(Path(self.run_dir), {"event": "end", **tag, "outcome": "interrupted"})
            raise
        if main:
            append_record(Path(self.run_dir), {"event": "end", **tag, "outcome": "done"})
        return str(result) if isinstance(result, Path) else result

    def checkpoint(self, *args: Any, **kwargs: Any) -> Optional[submitit.helpers.DelayedSubmission]:
        """Requeue this same job; the work resumes from what the run folder holds (no state here).
        Not after a storage fault: the requeued job would hit the same full or read-only disk."""
        if self.storage_failed:
            print(f"bench: not requeueing {self.stage} of cell {self.cell}: its storage failed", flush=True)
            return None  # submitit then does not requeue
        print(f"bench: requeueing {self.stage} of cell {self.cell}; it resumes from {self.run_dir}", flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def record_failure(run_dir: Path, row: dict) -> None:
    """The `end: failed` row, if the run folder still takes it: after a storage fault it may not
    (read-only, full, removed), and then `bench status` reads the reason from the job's log."""
    try:
        append_record(run_dir, row)
    except StorageError as err:
        print(f"bench: could not record the failure in {run_dir / JOBS_FILE}: {err}", file=sys.stderr, flush=True)


def ignore_requeue_signal() -> None:
    """Ignore SLURM's USR2 from now on: the work is finished and recorded.

    submitit's USR2 handler checkpoints and requeues; after the work has returned that is wrong, and
    late in the process's exit it is worse: Python restores the default action of signals it
    handled when the interpreter shuts down, so a USR2 that arrives then (the time limit's warning,
    `signal_delay_s` before the limit, or a preemption) kills the finished job, and SLURM records it
    FAILED with exit code 140 (128 + SIGUSR2) although `end: done` is in jobs.jsonl. An ignored
    signal stays ignored through shutdown (CPython resets only signals with a Python handler).
    """
    env = _job_environment()
    if env is not None:  # submitit's signal: USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
        signal.signal(env._usr_sig(), signal.SIG_IGN)


class TrainJob(CellJob):
    """Train one cell: `fn(cfg, run_dir)`, by default `bench.train.loop.train` (resumes by itself)."""

    stage = "train"

    def run(self) -> Any:
        env = _job_environment()
        if env is not None and env.num_tasks > 1 and int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
            # One task per GPU: torch's env:// variables from SLURM's (bench.train.distributed joins them).
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        fn = self.fn
        if fn is None:  # imported on the node only: submitting stays torch-free
            from bench.train.loop import train as fn
        return fn(self.cfg, Path(self.run_dir))


class EvalJob(CellJob):
    """Score one cell's checkpoints under one setting: `fn(cfg, run_dir, steps=..., setting=...)`."""

    stage = "eval"

    def run(self) -> Any:
        fn = self.fn
        if fn is None:  # imported on the node only: submitting stays torch-free
            from bench.evaluate.score_run import evaluate as fn
        env = _job_environment()
        extra = {"setting": self.setting}
        if env is not None and env.num_tasks > 1:  # bench.evaluate.score_run splits the sample shards over tasks
            extra.update(task_index=env.global_rank, num_tasks=env.num_tasks)
        params = inspect.signature(fn).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in extra.items() if takes_any or k in params}
        return fn(self.cfg, Path(self.run_dir), steps=self.steps, **kwargs)


class Lane(submitit.helpers.Checkpointable):
    """Several cells run one after another in one local job; a failing cell does not stop the rest."""

    def __init__(self, jobs: Sequence[CellJob]) -> None:
        self.jobs = list(jobs)

    def __call__(self) -> list:
        results, failures = [], []
        for job in self.jobs:
            try:
                results.append(job.run_recorded())
            except Exception as err:
                traceback.print_exc()
                failures.append(f"{job.cell}: {type(err).__name__}: {err}")
        ignore_requeue_signal()
        if failures:
            raise RuntimeError(f"{len(failures)} of {len(self.jobs)} cells failed: " + "; ".join(failures))
        return results
