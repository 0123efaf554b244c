"""`bench grid` / `bench status`: submit a grid's cells with submitit and follow them.

Executors: `slurm` (AutoExecutor(cluster="slurm") with a profile of `slurm/profiles/`), `local`
(subprocesses that outlive the command; the cells run in `array_parallelism` lanes) and `debug`
(in-process, one cell after another). One submission per stage is ONE job array (`executor.batch()`).
Submission returns once the jobs are queued; nothing ever waits on a result.

Training jobs are `TrainJob`s (submitit `Checkpointable`): on preemption and on timeout (up to the
profile's `max_num_timeout`) submitit calls `checkpoint()`, which requeues the same job, and
`bench.train.train` resumes from the newest checkpoint of the run folder. A job that the scheduler
requeues by itself (`scontrol requeue`) restarts the same pickle, with the same effect.

Every run folder keeps `jobs.jsonl`: a `submit` row per submission (stage, job and array id, log
paths, time, resources) written here, and `start` / `end` rows written by the job itself (outcome
done, failed with the error, or interrupted). `status` joins these with the scheduler (`squeue`;
`sacct` is never needed) and with the run folder (DONE, checkpoints, metrics.jsonl, eval.jsonl).
Submitting again skips finished cells and cells whose job is queued or running; the eval stage
submits only the (checkpoint, setting) pairs that have no metric in eval.jsonl yet.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import submitit

from bench.config import ConfigError, ExperimentConfig
from bench.grids import GRIDS_DIR, Cell, Grid, Setting, eval_config, expand, list_grids, load_grid, settings_for

PROFILES_DIR = Path(__file__).resolve().parents[1] / "slurm" / "profiles"
STAGES = ("train", "eval")
# Run-folder files; DONE and metrics.jsonl are bench/train.py's (checked in tests/test_launch.py).
DONE_FILE, METRICS_FILE, EVAL_FILE, JOBS_FILE, CKPT_DIR = "DONE", "metrics.jsonl", "eval.jsonl", "jobs.jsonl", "checkpoints"
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "RESV_DEL_HOLD"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}


class LaunchError(ConfigError):
    """Something the user can fix before anything is submitted (bad profile, options, scheduler)."""


class ProfileError(LaunchError):
    """A cluster profile is missing, has an unknown key or a value of the wrong type."""


class SchedulerError(LaunchError):
    """The scheduler could not be reached or refused the submission."""


# ----------------------------------------------------------------------------------------------
# Cluster profiles (slurm/profiles/*.yaml)

PROFILE_TYPES: dict[str, tuple] = {
    "description": (str,), "executor": (str,), "partition": (str, type(None)), "account": (str, type(None)),
    "qos": (str, type(None)), "constraint": (str, type(None)), "gpus_per_node": (int,), "cpus_per_task": (int,),
    "mem_gb": (int, float, type(None)), "time_min": (int,), "signal_delay_s": (int,), "max_num_timeout": (int,),
    "array_parallelism": (int,), "setup": (list,), "additional_parameters": (dict,), "throughput": (dict,),
}


@dataclass(frozen=True)
class Profile:
    """Where and how jobs run: the scheduler's partition, limits, requeue budget and setup lines."""

    name: str
    executor: str = "slurm"
    description: str = ""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: Optional[float] = None
    time_min: int = 60
    signal_delay_s: int = 90
    max_num_timeout: int = 3
    array_parallelism: int = 256
    setup: tuple[str, ...] = ()
    additional_parameters: dict = field(default_factory=dict)
    throughput: dict = field(default_factory=dict)


def list_profiles(profiles_dir: Path | str = PROFILES_DIR) -> list[str]:
    """Names of the cluster profiles in `slurm/profiles/`."""
    return sorted(p.stem for p in Path(profiles_dir).glob("*.yaml"))


def load_profile(name: str, profiles_dir: Path | str = PROFILES_DIR) -> Profile:
    """Read and validate profile `name`; ProfileError names the bad key and lists the valid ones."""
    import yaml

    path = Path(profiles_dir) / f"{name}.yaml"
    if not path.is_file():
        raise ProfileError(f"unknown cluster profile {name!r}; available profiles: "
                           f"{', '.join(list_profiles(profiles_dir)) or 'none'} (files in {profiles_dir})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ProfileError(f"profile {name} ({path}): not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"profile {name} ({path}): expected a mapping of keys {sorted(PROFILE_TYPES)}")
    unknown = sorted(set(data) - set(PROFILE_TYPES))
    if unknown:
        raise ProfileError(f"profile {name} ({path}): unknown key(s) {unknown}; valid keys: {sorted(PROFILE_TYPES)}")
    for key, value in data.items():
        types = PROFILE_TYPES[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ProfileError(f"profile {name} ({path}): {key} must be {wanted}, got {value!r}")
    if data.get("executor", "slurm") not in ("slurm", "local"):
        raise ProfileError(f"profile {name}: executor must be slurm or local (debug is --debug), got {data['executor']!r}")
    for key in ("time_min", "max_num_timeout", "array_parallelism", "cpus_per_task"):
        if key in data and data[key] < 1:
            raise ProfileError(f"profile {name}: {key} must be >= 1 (requeue after timeouts needs max_num_timeout > 0)")
    if data.get("signal_delay_s", 0) < 0 or data.get("gpus_per_node", 0) < 0:
        raise ProfileError(f"profile {name}: signal_delay_s and gpus_per_node must be >= 0")
    if not all(isinstance(s, str) for s in data.get("setup", [])):
        raise ProfileError(f"profile {name}: setup must be a list of shell lines")
    return Profile(name=name, **{**data, "setup": tuple(data.get("setup", ()))})


def job_resources(grid: Grid, profile: Optional[Profile], stage: str) -> dict:
    """The per-job request: the grid's `resources` (eval: `eval.resources` on top) within the profile.

    Local and debug runs take the machine's profile as is (a grid's 8-GPU request does not apply).
    """
    want = {**grid.resources, **(grid.eval["resources"] if stage == "eval" else {})}
    if profile is None:  # dry run without a profile: the grid's own request
        gpus = int(want.get("gpus_per_node", 0))
        return {"nodes": int(want.get("nodes", 1)), "gpus_per_node": gpus, "tasks_per_node": max(gpus, 1),
                "cpus_per_task": int(want.get("cpus_per_task", 1)), "mem_gb": want.get("mem_gb"),
                "timeout_min": int(float(want.get("hours", 24)) * 60)}
    if profile.executor == "local":
        gpus, nodes, cpus, mem, minutes = profile.gpus_per_node, 1, profile.cpus_per_task, None, profile.time_min
    else:
        gpus = int(want.get("gpus_per_node", profile.gpus_per_node))
        if gpus > profile.gpus_per_node:
            raise ProfileError(f"grid {grid.name} asks for {gpus} GPUs per node but profile {profile.name} has "
                               f"{profile.gpus_per_node}; use a GPU profile or lower the grid's resources")
        nodes, cpus = int(want.get("nodes", 1)), int(want.get("cpus_per_task", profile.cpus_per_task))
        mem = want.get("mem_gb", profile.mem_gb)
        hours = want.get("hours")
        minutes = min(profile.time_min, int(float(hours) * 60)) if hours else profile.time_min
    return {"nodes": nodes, "gpus_per_node": gpus, "tasks_per_node": max(gpus, 1), "cpus_per_task": cpus,
            "mem_gb": mem, "timeout_min": max(int(minutes), 1)}


# ----------------------------------------------------------------------------------------------
# Run folders


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; lines that do not parse (a writer killed mid-line) are skipped."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def append_record(run_dir: Path, row: dict) -> None:
    """Append one row to `<run_dir>/jobs.jsonl` in a single write (appends of one line do not interleave)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({**row, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "unix": time.time()}) + "\n"
    with open(run_dir / JOBS_FILE, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (`checkpoints/<step:07d>/state.json`, written last)."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "state.json").is_file())


def logged_step(run_dir: Path) -> Optional[int]:
    """The last step logged in metrics.jsonl (None before the first log tick)."""
    steps = [int(r["step"]) for r in read_jsonl(Path(run_dir) / METRICS_FILE) if isinstance(r.get("step"), (int, float))]
    return max(steps) if steps else None


def _evaluate_module() -> Any:
    try:
        import bench.evaluate as module
    except ModuleNotFoundError as err:
        if err.name != "bench.evaluate":
            raise
        return None
    return module


def metric_names(cfg: ExperimentConfig) -> list[str]:
    """The eval.jsonl metric names an evaluation of `cfg` records (bench.evaluate's naming).

    Without bench.evaluate, the names of eval.metrics as written. Raises ValueError (bench.evaluate's
    EvaluationError) when the metrics cannot be computed for this config.
    """
    module = _evaluate_module()
    if module is not None and hasattr(module, "plan_metrics") and hasattr(module, "metric_names"):
        kinds = module.plan_metrics(cfg, getattr(module, "DEFAULT_BACKEND", "torch-fidelity"))
        return [name for kind in kinds for name in module.metric_names(kind, cfg.eval.feature_network)]
    return [str(m) for m in cfg.eval.metrics]


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

    def __init__(self, grid: str, cell: str, cfg: ExperimentConfig, run_dir: str,
                 fn: Optional[Callable] = None, setting: Optional[str] = None, steps: Sequence[int] = ()) -> None:
        self.grid, self.cell, self.cfg, self.run_dir, self.fn = grid, cell, cfg, str(run_dir), fn
        self.setting, self.steps = setting, list(steps)

    def run(self) -> Any:
        raise NotImplementedError

    def __call__(self) -> Any:
        env = _job_environment()
        main = env is None or env.global_rank == 0
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
            if main:
                append_record(Path(self.run_dir), {"event": "end", **tag, "outcome": "failed",
                                                   "error": f"{type(err).__name__}: {err}"[:1000]})
            raise
        except BaseException:  # SystemExit from submitit's requeue, KeyboardInterrupt
            if main:
                append_record(Path(self.run_dir), {"event": "end", **tag, "outcome": "interrupted"})
            raise
        if main:
            append_record(Path(self.run_dir), {"event": "end", **tag, "outcome": "done"})
        return str(result) if isinstance(result, Path) else result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Requeue this same job; the work resumes from what the run folder holds (no state here)."""
        print(f"bench: requeueing {self.stage} of cell {self.cell}; it resumes from {self.run_dir}", flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class TrainJob(CellJob):
    """Train one cell: `fn(cfg, run_dir)`, by default `bench.train.train` (resumes by itself)."""

    stage = "train"

    def run(self) -> Any:
        env = _job_environment()
        if env is not None and env.num_tasks > 1 and int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
            # One task per GPU: torch's env:// variables from SLURM's (bench.distributed joins them).
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        fn = self.fn
        if fn is None:
            from bench.train import train as fn
        return fn(self.cfg, Path(self.run_dir))


class EvalJob(CellJob):
    """Score one cell's checkpoints under one setting: `fn(cfg, run_dir, steps=..., setting=...)`."""

    stage = "eval"

    def run(self) -> Any:
        fn = self.fn
        if fn is None:
            module = _evaluate_module()
            fn = getattr(module, "evaluate", None) if module else None
            if fn is None:
                raise RuntimeError("bench.evaluate.evaluate is not available in this version of redi-bench")
        env = _job_environment()
        extra = {"setting": self.setting}
        if env is not None and env.num_tasks > 1:  # bench.evaluate splits the sample shards over tasks
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
                results.append(job())
            except Exception as err:
                traceback.print_exc()
                failures.append(f"{job.cell}: {type(err).__name__}: {err}")
        if failures:
            raise RuntimeError(f"{len(failures)} of {len(self.jobs)} cells failed: " + "; ".join(failures))
        return results


# ----------------------------------------------------------------------------------------------
# Job states from the records and the scheduler


def _squeue(job_ids: set[str]) -> dict[str, str]:
    """job id -> SLURM state, via one `squeue -h -r -j IDS -o "%i %T"` call.

    Jobs absent from the answer are gone (ended more than MinJobAge ago); an unreachable scheduler
    gives `UNKNOWN: <why>` for all of them.
    """
    if not job_ids:
        return {}
    cmd = ["squeue", "-h", "-r", "-j", ",".join(sorted(job_ids)), "-o", "%i %T"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return {j: f"UNKNOWN: squeue failed ({err})" for j in job_ids}
    if proc.returncode != 0:
        if "invalid job id" in proc.stderr.lower():
            return {}
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {j: f"UNKNOWN: {why}" for j in job_ids}
    states = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def _pid_alive(pid: str) -> bool:
    """A local job's controller process is alive (and is one: zombies and reused pids are not)."""
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"submitit" in cmdline


def scheduler_states(submits: Sequence[dict]) -> dict[str, str]:
    """job id -> scheduler state (SLURM's name, RUNNING/GONE for local, GONE for debug)."""
    slurm = {r["job_id"] for r in submits if r.get("executor") == "slurm"}
    out = _squeue(slurm)
    for r in submits:
        if r.get("executor") == "local":
            out[r["job_id"]] = "RUNNING" if _pid_alive(r["job_id"]) else "GONE"
    return out


def _tail_error(path: Optional[str]) -> str:
    """The last informative line of a job's stderr log (the exception, usually)."""
    if not path or not Path(path).is_file():
        return ""
    lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines()[-200:] if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln or "Exception" in ln]
    return (errors or lines or [""])[-1][:300]


def job_state(submit: dict, events: Sequence[dict], states: dict[str, str]) -> tuple[str, str, int]:
    """(state, detail, restarts) of the job of one `submit` record, from the events that follow it.

    state: queued, running, done, failed or unknown; detail: the error or why the state is unknown.
    """
    jid = submit.get("job_id")
    mine = [e for e in events if e.get("job_id") == jid and e.get("event") in ("start", "end")]
    starts = [e for e in mine if e["event"] == "start"]
    restarts = max([int(e.get("restarts", 0)) for e in starts] + [max(len(starts) - 1, 0)])
    last = mine[-1] if mine else None
    scheduler = states.get(jid, "GONE")
    if last and last["event"] == "end" and last.get("outcome") == "failed":
        return "failed", str(last.get("error", "")), restarts
    if last and last["event"] == "end" and last.get("outcome") == "done":
        return "done", "", restarts  # (a local lane may still be running other cells)
    if scheduler in QUEUED:
        return "queued", ("requeued" if starts else ""), restarts
    if scheduler in RUNNING:
        started = last is not None and last["event"] == "start"
        return ("running" if started or submit.get("lane") is None else "queued"), "", restarts
    if scheduler.startswith("UNKNOWN"):
        return "unknown", scheduler.split(":", 1)[-1].strip(), restarts
    why = f"job ended as {scheduler}" if scheduler != "GONE" else "job ended without reporting an outcome"
    tail = _tail_error(submit.get("stderr"))
    return "failed", why + (f"; log: {tail}" if tail else " (cancelled, out of memory, time limit or node failure?)"), restarts


def _last_submit(records: Sequence[dict], stage: str, setting: Optional[str] = None) -> tuple[Optional[dict], list[dict]]:
    """The newest submit record of (stage, setting) and the records of that stage/setting after it."""
    def ours(r: dict) -> bool:
        return r.get("stage") == stage and (setting is None or r.get("setting") == setting)
    for index in range(len(records) - 1, -1, -1):
        if records[index].get("event") == "submit" and ours(records[index]):
            return records[index], [r for r in records[index + 1:] if ours(r)]
    return None, []


# ----------------------------------------------------------------------------------------------
# Status


def _eval_pairs(grid: Grid, cell: Cell, run: Path) -> list[tuple[Setting, ExperimentConfig, list[int]]]:
    """(setting, its config, the steps it should score) for every setting of the cell."""
    steps = list(cell.eval_steps) or checkpoint_steps(run)
    return [(s, eval_config(cell, s), steps) for s in settings_for(grid, cell)]


def grid_status(name: str | Grid, overrides: Sequence[str] = (), grids_dir: Path | str = GRIDS_DIR) -> list[dict]:
    """One row per cell: training state, steps reached, evaluation progress, last metric, job, log.

    state: done, running, queued, failed (detail and log say why), not submitted, or unknown (the
    scheduler could not be asked; detail says why).
    """
    grid = load_grid(name, grids_dir) if isinstance(name, str) else name
    cells = expand(grid, overrides)
    runs = [Path(c.run_dir).resolve() for c in cells]
    records = [read_jsonl(run / JOBS_FILE) for run in runs]
    submits = [r for rows in records for r in rows if r.get("event") == "submit"]
    latest: dict[tuple, dict] = {}
    for r in submits:
        latest[(r.get("cell"), r.get("stage"), r.get("setting"))] = r
    states = scheduler_states(list(latest.values()))
    rows = []
    for cell, run, recs in zip(cells, runs, records):
        sub, events = _last_submit(recs, "train")
        row = {"cell": cell.name, "spec": cell.cfg.spec, "run_dir": str(run), "state": "not submitted",
               "step": logged_step(run), "checkpoint": max(checkpoint_steps(run), default=None),
               "max_steps": cell.cfg.train.max_steps, "job_id": sub.get("job_id") if sub else None,
               "restarts": 0, "log": sub.get("stdout") if sub else None, "detail": "", "eval": "",
               "eval_errors": [], "last_metric": last_metric(run)}
        if sub is not None:
            row["state"], row["detail"], row["restarts"] = job_state(sub, events, states)
        if (run / DONE_FILE).is_file():
            row["state"], row["detail"] = "done", ""
        elif sub is not None:
            if row["state"] == "done":  # the job returned but the trainer wrote no DONE marker
                row["state"], row["detail"] = "failed", f"job ended but {run / DONE_FILE} is missing"
            if row["state"] == "failed":
                row["log"] = sub.get("stderr")
        measured = total = 0
        notes = []
        for setting, cfg, steps in _eval_pairs(grid, cell, run):
            try:
                done = measured_steps(cfg, run, steps, setting.name)
            except ValueError as err:  # bench.evaluate cannot compute the requested metrics
                notes.append(f"{setting.name}: cannot evaluate")
                row["eval_errors"].append(f"{setting.name}: {err}")
                continue
            measured, total = measured + len(done), total + len(steps)
            esub, eevents = _last_submit(recs, "eval", setting.name)
            if esub is not None and len(done) < len(steps):
                st, detail, _ = job_state(esub, eevents, states)
                if st != "done":
                    notes.append(f"{setting.name}: {st}")
                if st == "failed":
                    row["eval_errors"].append(f"{setting.name}: {detail}\n    log: {esub.get('stderr')}")
        row["eval"] = f"{measured}/{total} measured" + (f"; {'; '.join(notes)}" if notes else "") if total else ""
        rows.append(row)
    return rows


def format_status(name: str, rows: Sequence[dict]) -> str:
    """A plain table of `grid_status` rows, failed cells followed by their log path."""
    def steps(r: dict) -> str:
        return f"{r['step'] if r['step'] is not None else '-'}/{r['max_steps']} (ckpt {r['checkpoint'] or '-'})"
    table = [("cell", "state", "step", "eval", "last metric", "job")]
    for r in rows:
        job = (r["job_id"] or "-") + (f" x{r['restarts'] + 1}" if r["restarts"] else "")
        table.append((r["cell"], r["state"], steps(r), r["eval"] or "-", r["last_metric"] or "-", job))
    widths = [max(len(str(t[i])) for t in table) for i in range(len(table[0]))]
    lines = [f"grid {name}: {len(rows)} cells"] + ["  ".join(str(v).ljust(w) for v, w in zip(t, widths)).rstrip()
                                                   for t in table]
    for r in rows:
        if r["state"] in ("failed", "unknown") or r["detail"]:
            lines.append(f"  {r['cell']}: {r['state']}: {r['detail']}" + (f"\n    log: {r['log']}" if r["log"] else ""))
        lines += [f"  {r['cell']} eval {error}" for error in r.get("eval_errors", [])]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append("summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Planning: what a submission would run, and what it costs


@dataclass
class PlannedJob:
    """One cell (and, for eval, one setting and its steps) to submit."""

    cell: Cell
    run_dir: Path
    job: CellJob
    setting: Optional[str] = None
    steps: tuple[int, ...] = ()
    estimate: dict = field(default_factory=dict)


@dataclass
class Submission:
    """What `submit_grid` did (or, for a dry run, would do)."""

    grid: str
    stage: str
    executor: Optional[str]
    profile: Optional[str]
    resources: dict
    jobs: list[dict]
    skipped: list[dict]
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)
    estimate: dict = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    @property
    def submitted(self) -> int:
        return 0 if self.dry_run else len(self.jobs)


def _size_label(cfg: ExperimentConfig) -> str:
    m = cfg.model  # the label bench perf writes in its rows (model_size)
    return m.size if m.size != "custom" else f"custom:{m.depth},{m.hidden_size},{m.num_heads},{m.patch_size}"


def find_throughput(cfg: ExperimentConfig, device: str, grid: Grid, profile: Optional[Profile],
                    perf_dir: Path | str = "results/perf") -> tuple[Optional[float], str]:
    """Training images/s per device: a measured `bench perf` row, else the grid's or profile's number."""
    spec = cfg.spec + ("_separate" if cfg.model.fusion == "separate" else "")
    best = None
    for path in sorted(Path(perf_dir).glob("*.jsonl")):
        for row in read_jsonl(path):
            if (row.get("kind") == "train" and row.get("mode", "default") == "default" and row.get("spec") == spec
                    and row.get("model_size") == _size_label(cfg) and str(row.get("device", "")).startswith(device)
                    and isinstance(row.get("images_per_s"), (int, float)) and row["images_per_s"] > 0
                    and (best is None or str(row.get("created_at", "")) >= str(best[0].get("created_at", "")))):
                best = (row, path)
    if best is not None:
        return float(best[0]["images_per_s"]), f"measured ({best[1].name})"
    for where, table in (("grid", grid.throughput), ("profile", profile.throughput if profile else {})):
        value = table.get(cfg.model.size)
        if value:
            factor = 0.5 if cfg.model.fusion == "separate" else 1.0  # 2L tokens: ~half (paper Table 6)
            return float(value) * factor, f"{where} setting" + (" x0.5 (separate tokens)" if factor != 1 else "")
    return None, "unknown (run `bench perf` or set `throughput` in the grid or profile)"


def estimate(job: PlannedJob, res: dict, grid: Grid, profile: Optional[Profile], perf_dir: Path | str) -> dict:
    """steps x batch / throughput: wall-hours of the job and its GPU-hours (GPUs x wall-hours)."""
    if job.job.stage != "train":
        return {"throughput": None, "source": "n/a (evaluation)", "wall_h": None, "gpu_h": None}
    gpus = res["gpus_per_node"] * res["nodes"]
    device = "cuda" if gpus else "cpu"
    throughput, source = find_throughput(job.cell.cfg, device, grid, profile, perf_dir)
    remaining = job.cell.cfg.train.max_steps - max(checkpoint_steps(job.run_dir), default=0)
    if throughput is None:
        return {"throughput": None, "source": source, "wall_h": None, "gpu_h": None, "steps": remaining}
    wall = remaining * job.cell.cfg.train.batch_size / (throughput * max(gpus, 1)) / 3600
    return {"throughput": throughput, "source": source, "wall_h": wall, "gpu_h": wall * gpus, "steps": remaining}


def _plan_train(grid: Grid, cells: Sequence[Cell], job_fn: Optional[Callable]) -> tuple[list[PlannedJob], list[dict]]:
    plan, skipped, pending = [], [], []
    for cell in cells:
        run = Path(cell.run_dir).resolve()
        if (run / DONE_FILE).is_file():
            skipped.append({"cell": cell.name, "reason": "done"})
            continue
        sub, events = _last_submit(read_jsonl(run / JOBS_FILE), "train")
        pending.append((cell, run, sub, events))
    states = scheduler_states([sub for _, _, sub, _ in pending if sub])
    for cell, run, sub, events in pending:
        if sub is not None:
            st, detail, _ = job_state(sub, events, states)
            if st in ("queued", "running", "unknown"):
                why = f"already {st} (job {sub['job_id']})" + (f": {detail}" if detail else "")
                skipped.append({"cell": cell.name, "reason": why})
                continue
        plan.append(PlannedJob(cell, run, TrainJob(grid.name, cell.name, cell.cfg, str(run), job_fn)))
    return plan, skipped


def _plan_eval(grid: Grid, cells: Sequence[Cell], job_fn: Optional[Callable]) -> tuple[list[PlannedJob], list[dict]]:
    plan, skipped, pending = [], [], []
    for cell in cells:
        run = Path(cell.run_dir).resolve()
        ready = set(checkpoint_steps(run))
        records = read_jsonl(run / JOBS_FILE)
        for setting, cfg, steps in _eval_pairs(grid, cell, run):
            tag = {"cell": cell.name, "setting": setting.name}
            try:
                measured = measured_steps(cfg, run, steps, setting.name)
            except ValueError as err:  # bench.evaluate's EvaluationError: metrics it cannot compute
                raise LaunchError(f"grid {grid.name}, cell {cell.name}, eval setting {setting.name}: {err}") from None
            missing = [s for s in steps if s not in measured]
            todo = [s for s in missing if s in ready]
            if not steps or (missing and not todo):
                skipped.append({**tag, "reason": f"waiting for checkpoints {missing or 'of training'}"})
            elif not missing:
                skipped.append({**tag, "reason": "measured"})
            else:
                pending.append((cell, run, setting, cfg, todo, *_last_submit(records, "eval", setting.name)))
    states = scheduler_states([p[5] for p in pending if p[5]])
    for cell, run, setting, cfg, todo, sub, events in pending:
        if sub is not None:
            st, detail, _ = job_state(sub, events, states)
            if st in ("queued", "running", "unknown"):
                skipped.append({"cell": cell.name, "setting": setting.name,
                                "reason": f"already {st} (job {sub['job_id']})" + (f": {detail}" if detail else "")})
                continue
        job = EvalJob(grid.name, cell.name, cfg, str(run), job_fn, setting=setting.name, steps=todo)
        plan.append(PlannedJob(cell, run, job, setting.name, tuple(todo)))
    return plan, skipped


def _check_slurm_client() -> None:
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        raise SchedulerError(f"SLURM_CONF={conf} does not exist; unset it or point it at the cluster's slurm.conf "
                             "(for the local test cluster: eval \"$(slurm/local-cluster.sh start)\")")
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise SchedulerError("sbatch/srun not found: this machine is not a SLURM client; use --local or --debug, "
                             "or install slurm-wlm and start slurm/local-cluster.sh")


def _executor(kind: str, folder: Path, profile: Profile, res: dict, name: str) -> submitit.AutoExecutor:
    """A submitit AutoExecutor of `kind` with the profile's and the grid's parameters."""
    if kind == "slurm":
        _check_slurm_client()
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=profile.max_num_timeout)
        params: dict[str, Any] = {"slurm_signal_delay_s": profile.signal_delay_s,
                                  "slurm_array_parallelism": profile.array_parallelism,
                                  "nodes": res["nodes"], "cpus_per_task": res["cpus_per_task"]}
        params.update({f"slurm_{k}": getattr(profile, k) for k in ("partition", "account", "qos", "constraint")
                       if getattr(profile, k)})
        if res["gpus_per_node"]:
            params["gpus_per_node"] = res["gpus_per_node"]
        if res["mem_gb"]:
            params["mem_gb"] = float(res["mem_gb"])
        if profile.setup:
            params["slurm_setup"] = list(profile.setup)
        if profile.additional_parameters:
            params["slurm_additional_parameters"] = dict(profile.additional_parameters)
    elif kind == "local":
        executor = submitit.AutoExecutor(folder=folder, cluster="local", local_max_num_timeout=profile.max_num_timeout)
        params = {"gpus_per_node": res["gpus_per_node"]} if res["gpus_per_node"] else {}
        if profile.setup:
            params["local_setup"] = list(profile.setup)
    else:
        executor, params = submitit.AutoExecutor(folder=folder, cluster="debug"), {}
    executor.update_parameters(name=name, timeout_min=res["timeout_min"], tasks_per_node=res["tasks_per_node"], **params)
    return executor


def _sbatch_error(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "error" in ln.lower() and not ln.startswith("Command")]
    return (useful or lines or [type(err).__name__])[-1][:400]


def _run_debug(plan: Sequence[PlannedJob], handles: Sequence[Any], quiet: bool) -> list[str]:
    """Run debug jobs in this process, one after another; a failing cell does not stop the others."""
    failed = []
    for planned, handle in zip(plan, handles):
        previous = os.environ.get("SUBMITIT_DEBUG_JOB_ID")
        os.environ["SUBMITIT_DEBUG_JOB_ID"] = handle.job_id  # submitit.JobEnvironment() inside the job
        try:
            error = handle.exception()  # runs the job; unlike results(), never opens pdb on failure
        finally:
            if previous is None:
                os.environ.pop("SUBMITIT_DEBUG_JOB_ID", None)
            else:
                os.environ["SUBMITIT_DEBUG_JOB_ID"] = previous
        label = planned.cell.name + (f" [{planned.setting}]" if planned.setting else "")
        if error is not None:
            handle.paths.stderr.parent.mkdir(parents=True, exist_ok=True)
            handle.paths.stderr.write_text("".join(traceback.format_exception(error)))
            failed.append(label)
        if not quiet:
            print(f"debug: {label}: " + (f"FAILED ({type(error).__name__}: {error}); log {handle.paths.stderr}"
                                          if error is not None else "done"), flush=True)
    return failed


def submit_grid(name: str, stage: str = "train", cluster: Optional[str] = None, local: bool = False,
                debug: bool = False, dry_run: bool = False, job_fn: Optional[Callable] = None,
                overrides: Sequence[str] = (), quiet: bool = False, grids_dir: Path | str = GRIDS_DIR,
                profiles_dir: Path | str = PROFILES_DIR, perf_dir: Path | str = "results/perf") -> Submission:
    """Submit the cells of grid `name` for `stage` as one job array; return without waiting.

    cluster: a profile of slurm/profiles/ (its `executor` says slurm or local); local: the `local`
    profile; debug: in-process, now (with the `local` profile's resources). job_fn replaces
    bench.train.train (train: fn(cfg, run_dir)) or bench.evaluate.evaluate (eval: fn(cfg, run_dir,
    steps=[...], setting=NAME)); it must be picklable for slurm/local. overrides go to every cell
    (e.g. output_root=..., data.prepared_dir=...). dry_run prints the jobs, their resources and
    GPU-hours and submits nothing.
    """
    if stage not in STAGES:
        raise LaunchError(f"stage {stage!r} is not one of {list(STAGES)}")
    if sum((cluster is not None, bool(local), bool(debug))) > 1:
        raise LaunchError("choose one of --cluster PROFILE, --local or --debug")
    if cluster is None and not local and not debug and not dry_run:
        raise LaunchError(f"where should the jobs run? use --cluster PROFILE ({', '.join(list_profiles(profiles_dir))}), "
                          "--local or --debug (or --dry-run to see the plan)")
    grid = load_grid(name, grids_dir)
    profile = load_profile(cluster, profiles_dir) if cluster else (
        load_profile("local", profiles_dir) if (local or debug) else None)
    kind = "debug" if debug else (profile.executor if profile else None)
    cells = expand(grid, overrides)
    out = Submission(grid.name, stage, kind, profile.name if profile else None, {}, [], [], dry_run)
    if stage == "eval" and job_fn is None and getattr(_evaluate_module(), "evaluate", None) is None:
        out.notes.append("eval stage skipped: bench.evaluate.evaluate is not available in this version of "
                         "redi-bench (bench/evaluate.py); nothing was submitted")
        out.skipped = [{"cell": c.name, "reason": "no evaluator"} for c in cells]
        if not quiet:
            print(format_submission(out))
        return out
    plan, out.skipped = (_plan_train if stage == "train" else _plan_eval)(grid, cells, job_fn)
    out.resources = res = job_resources(grid, profile, stage)
    for job in plan:
        job.estimate = estimate(job, res, grid, profile, perf_dir)
        if profile and job.estimate.get("wall_h") and profile.executor == "slurm":
            budget = profile.time_min / 60 * (profile.max_num_timeout + 1)
            if job.estimate["wall_h"] > budget:
                out.notes.append(f"{job.cell.name}: ~{job.estimate['wall_h']:.0f} h exceeds the requeue budget of "
                                 f"{budget:.0f} h (time_min x (max_num_timeout + 1)); raise max_num_timeout")
    known = [j.estimate for j in plan if j.estimate.get("wall_h") is not None]
    out.estimate = {"gpu_h": sum(e["gpu_h"] for e in known), "wall_h": sum(e["wall_h"] for e in known),
                    "unknown": len([j for j in plan if j.job.stage == "train"]) - len(known)}
    out.notes += [f"also measure: {command}" for command in grid.perf]
    out.jobs = [{"cell": j.cell.name, "setting": j.setting, "steps": list(j.steps), "run_dir": str(j.run_dir),
                 **{k: j.estimate.get(k) for k in ("throughput", "source", "wall_h", "gpu_h")}} for j in plan]
    if dry_run or not plan:
        if not plan and not dry_run:
            out.notes.append("nothing to submit")
        if not quiet:
            print(format_submission(out))
        return out
    assert profile is not None and kind is not None
    folder = Path(cells[0].cfg.output_root).resolve() / grid.name / ".submitit" / stage / "%j"
    executor = _executor(kind, folder, profile, res, f"{grid.name}-{stage}")
    lanes: list[Any] = [j.job for j in plan]
    lane_of = list(range(len(plan)))
    if kind == "local" and len(plan) > profile.array_parallelism:  # local: no scheduler caps the parallelism
        count = profile.array_parallelism
        lanes = [Lane([j.job for j in plan[i::count]]) for i in range(count)]
        lane_of = [i % count for i in range(len(plan))]
    try:
        with executor.batch():
            handles = [executor.submit(fn) for fn in lanes]
    except SchedulerError:
        raise
    except Exception as err:
        if kind != "slurm":
            raise
        raise SchedulerError(f"could not submit grid {grid.name} to SLURM (profile {profile.name}, SLURM_CONF="
                             f"{os.environ.get('SLURM_CONF', 'unset')}): {_sbatch_error(err)}. Is the controller "
                             "running and reachable? (local test cluster: slurm/local-cluster.sh start)") from None
    for index, job in enumerate(plan):
        handle = handles[lane_of[index]]
        array_id, _, array_index = handle.job_id.partition("_")
        record = {"event": "submit", "stage": stage, "cell": job.cell.name, "grid": grid.name, "executor": kind,
                  "profile": profile.name, "job_id": handle.job_id, "array_id": array_id,
                  "array_index": int(array_index) if array_index.isdigit() else None,
                  "lane": lane_of[index] if len(lanes) < len(plan) else None,
                  "stdout": str(handle.paths.stdout), "stderr": str(handle.paths.stderr),
                  "submitit_folder": str(handle.paths.folder), "resources": res,
                  "overrides": list(job.cell.overrides)}
        if job.setting is not None:
            record.update(setting=job.setting, steps=list(job.steps))
        append_record(job.run_dir, record)
        out.jobs[index].update(job_id=handle.job_id, log=record["stdout"])
    if kind == "debug":
        out.failed = _run_debug(plan, handles, quiet)
    if not quiet:
        print(format_submission(out))
    return out


def _hours(h: float) -> str:
    return "0 h" if h == 0 else f"{h:,.0f} h" if h >= 10 else f"{h:.2f} h" if h >= 0.01 else f"{h * 3600:.1f} s"


def format_submission(sub: Submission) -> str:
    """What was (or, with --dry-run, would be) submitted, the skipped cells, resources and cost."""
    where = f"{sub.executor or 'no executor'}" + (f" (profile {sub.profile})" if sub.profile else "")
    verb = "would submit" if sub.dry_run else "submitted"
    lines = [f"grid {sub.grid}, stage {sub.stage}: {verb} {len(sub.jobs)} job(s) to {where}"
             + (" as one array" if len(sub.jobs) > 1 and not sub.dry_run else "")]
    if sub.resources:
        r = sub.resources
        lines.append(f"  per job: {r['nodes']} node(s) x {r['gpus_per_node']} GPU(s), {r['tasks_per_node']} task(s)/node, "
                     f"{r['cpus_per_task']} CPU(s)/task, mem {r['mem_gb'] or 'default'} GB, time limit {r['timeout_min']} min")
    for j in sub.jobs:
        what = j["cell"] + (f" [{j['setting']}] steps {j['steps']}" if j.get("setting") else "")
        cost = (f"{j['throughput']:g} img/s ({j['source']}): {_hours(j['wall_h'])} wall, {_hours(j['gpu_h'])} GPU"
                if j.get("wall_h") is not None else f"cost {j.get('source')}")
        lines.append(f"  {what}: " + (f"job {j['job_id']}, " if j.get("job_id") else "") + cost)
    for s in sub.skipped:
        lines.append(f"  skip {s['cell']}" + (f" [{s['setting']}]" if s.get("setting") else "") + f": {s['reason']}")
    if sub.estimate and sub.jobs and sub.stage == "train":
        e = sub.estimate
        lines.append(f"  estimate: {_hours(e['gpu_h'])} GPU (GPUs x wall time), {_hours(e['wall_h'])} of job wall time"
                     + (f" ({e['unknown']} job(s) without a throughput figure)" if e["unknown"] else ""))
    lines += [f"  note: {n}" for n in sub.notes]
    lines += [f"  FAILED: {f}" for f in sub.failed]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line (wired into bench/cli.py as `bench grid` and `bench status`)


def add_grid_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `bench grid`."""
    parser.add_argument("name", nargs="?", help="grid name (ablations/grids/NAME.yaml); --list shows them")
    parser.add_argument("overrides", nargs="*", help="key=value for every cell (e.g. output_root=/shared/runs)")
    parser.add_argument("--stage", choices=STAGES, default="train")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cluster", metavar="PROFILE", help="a profile of slurm/profiles/ (e.g. example, local-slurm)")
    where.add_argument("--local", action="store_true", help="subprocesses on this machine (profile local)")
    where.add_argument("--debug", action="store_true", help="in this process, one cell after another")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs, resources and GPU-hours only")
    parser.add_argument("--list", action="store_true",
                        help="with NAME: the grid's cells; without: the grids and cluster profiles")
    return parser


def _parse(argv: Any, parser: argparse.ArgumentParser) -> argparse.Namespace:
    # Intermixed: `bench grid NAME --local output_root=...` (overrides after the options) works too.
    return argv if isinstance(argv, argparse.Namespace) else parser.parse_intermixed_args(list(argv))


def format_cells(grid: Grid, cells: Sequence[Cell]) -> str:
    """`bench grid NAME --list`: every cell with its run folder, its own overrides (those beyond
    the grid's `base`), the checkpoints the eval stage scores and its evaluation settings."""
    lines = [f"grid {grid.name}: {grid.title} ({len(cells)} cells)", f"  base: {' '.join(grid.base) or '-'}"]
    for cell in cells:
        own = [o for o in cell.overrides if o not in grid.base and not o.startswith(("grid=", "train.milestones="))]
        settings = ", ".join(s.name for s in settings_for(grid, cell))
        lines.append(f"  {cell.name}  {cell.run_dir}\n    overrides: {' '.join(own) or '-'}\n"
                     f"    eval steps: {list(cell.eval_steps) or 'every checkpoint'}; settings: {settings}")
    return "\n".join(lines)


def main_grid(argv: Any = None) -> int:
    """`bench grid NAME [overrides] [--stage train|eval] [--cluster P | --local | --debug] [--dry-run] [--list]`."""
    args = _parse(sys.argv[1:] if argv is None else argv, add_grid_arguments(
        argparse.ArgumentParser(prog="bench grid", description="Submit an ablation grid (returns at once).")))
    if args.list and args.name:
        grid = load_grid(args.name)
        print(format_cells(grid, expand(grid, args.overrides)))
        return 0
    if args.list or not args.name:
        for name in list_grids():
            print(f"{name:16s} {load_grid(name).title}")
        print("profiles: " + ", ".join(list_profiles()))
        return 0 if args.list else 2
    sub = submit_grid(args.name, args.stage, cluster=args.cluster, local=args.local, debug=args.debug,
                      dry_run=args.dry_run, overrides=args.overrides)
    return 1 if sub.failed else 0


def main_status(argv: Any = None) -> int:
    """`bench status NAME [overrides]`: the state of every cell of a grid."""
    parser = argparse.ArgumentParser(prog="bench status", description="State of every cell of a grid.")
    parser.add_argument("name")
    parser.add_argument("overrides", nargs="*", help="the key=value given to `bench grid` (e.g. output_root=...)")
    parser.add_argument("--json", action="store_true", help="one JSON object per cell")
    args = _parse(sys.argv[1:] if argv is None else argv, parser)
    rows = grid_status(args.name, args.overrides)
    print("\n".join(json.dumps(r) for r in rows) if args.json else format_status(args.name, rows))
    return 0
