"""`bench prepare ... --cluster PROFILE | --local | --debug`: prepare as jobs, through the launcher.

One command submits two things and returns: a job array whose tasks encode the shards still
missing (pass 1 of bench.prepare.shards: VAE moments, encoder features and each shard's float64
PCA sums), dealt round-robin over `--tasks` tasks; and one job that starts when every task has
succeeded (SLURM `afterok`) and fits the PCA, projects every shard and writes `manifest.json`.
Both run with the profile's partition, account, QOS, setup lines and time limit (bench.launch.profiles);
an encoding task asks for one GPU when the profile has them, the PCA job for none.

Resumable: before submitting, the settings are checked as `bench prepare` checks them (a missing
weights file is one error now, not after the queue), a finished folder submits nothing, shards
already encoded are not dealt again, and a submission whose jobs are still queued or running is
not repeated. A PCA job left waiting on a failed task (it can never start) is cancelled and
replaced. The jobs are `CellJob`s: `<prepared_dir>/jobs.jsonl` holds the submit, start and end rows
that `bench status --prepare` (and `bench status GRID` for a grid's prepared folder) reads, and
a requeued task resumes from the shards on disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

from bench.compose import load_config
from bench.config import ExperimentConfig
from bench.launch.jobs import CellJob, append_record
from bench.launch.profiles import LaunchError, Profile, list_profiles, load_profile
from bench.launch.status import job_state, scheduler_states
from bench.runfolder import JOBS_FILE, read_jsonl

STAGE = "prepare"
FINISH = "pca"
ACTIVE = ("queued", "running", "unknown")


class PrepareJob(CellJob):
    """One prepare job: an encoding task (its `options.shards`) or the finishing call
    (task 0 of 1: fit the PCA, project, write the manifest). Local finishing jobs first wait for
    the encoding tasks' processes (`after`), as SLURM's afterok would."""

    stage = STAGE

    def __init__(self, name: str, cfg: ExperimentConfig, out: Path, options: Any,
                 after: Sequence[str] = ()) -> None:
        super().__init__(STAGE, name, cfg, str(out))
        self.options, self.after = options, list(after)

    def run(self) -> Any:
        if self.after:
            wait_for_local(Path(self.run_dir), self.after)
        from bench.prepare.pipeline import run_prepare  # on the node only: submitting imports no torch

        return run_prepare(self.cfg.data, self.cfg.vae, self.cfg.encoder, self.options)


def wait_for_local(out: Path, job_ids: Sequence[str], every: float = 2.0) -> None:
    """Block until the local jobs `job_ids` have exited; raise unless each recorded `end: done`."""
    rows = [{"job_id": j, "executor": "local"} for j in job_ids]
    while any(state == "RUNNING" for state in scheduler_states(rows).values()):
        time.sleep(every)
    ends = {r.get("job_id"): r.get("outcome") for r in read_jsonl(out / JOBS_FILE) if r.get("event") == "end"}
    failed = [j for j in job_ids if ends.get(j) != "done"]
    if failed:
        raise LaunchError(f"encoding task(s) {failed} of {out} did not finish; see their logs "
                          "(bench status --prepare) and run the same `bench prepare` again")


# ----------------------------------------------------------------------------------------------
# What the folder's jobs are doing


def latest_submission(out: Path) -> tuple[list[dict], list[dict]]:
    """The submit rows of the newest submission in `<out>/jobs.jsonl`, and every row."""
    records = read_jsonl(Path(out) / JOBS_FILE)
    subs = [r for r in records if r.get("event") == "submit" and r.get("stage") == STAGE]
    if not subs:
        return [], records
    newest = subs[-1].get("submission")
    return [r for r in subs if r.get("submission") == newest], records


def prepare_status(out: Path | str) -> dict:
    """The prepare of folder `out`: manifest, shard files, and the state of each job it was given."""
    out = Path(out).resolve()
    subs, records = latest_submission(out)
    states = scheduler_states(subs)
    jobs = []
    for sub in subs:
        after = records[records.index(sub) + 1:]
        state, detail, restarts = job_state(sub, after, states)
        jobs.append({"job": sub["cell"], "job_id": sub["job_id"], "state": state, "detail": detail,
                     "restarts": restarts, "shards": len(sub.get("shards") or []), "log": sub.get("stdout"),
                     "stderr": sub.get("stderr")})
    finish = next((j for j in jobs if j["job"] == FINISH), None)
    failed = [j["job"] for j in jobs if j["job"] != FINISH and j["state"] in ("failed", "cancelled", "timeout")]
    if finish and finish["state"] == "queued" and failed:
        finish["detail"] = (f"waits for {', '.join(failed)}, which did not finish: it will never start; "
                            "run the same `bench prepare ... --cluster` again")
    encoded = sorted(out.glob("*/shard-*.enc.safetensors"))
    final = [p for p in out.glob("*/shard-*.safetensors") if not p.name.endswith(".enc.safetensors")]
    return {"prepared_dir": str(out), "complete": (out / "manifest.json").is_file(), "jobs": jobs,
            "encoded": len(encoded), "final": len(final),
            "total": subs[0].get("shards_total") if subs else None}


def format_prepare_status(status: dict) -> str:
    """A few plain lines: the folder, its shards, each job (failed ones with their log)."""
    total = status["total"] if status["total"] is not None else "?"
    head = (f"prepare {status['prepared_dir']}: "
            + ("done (manifest.json written)" if status["complete"] else
               f"{status['final']}/{total} shards final, {status['encoded']} encoded awaiting the PCA"))
    if not status["jobs"]:
        return head + ("" if status["complete"] else "\n  no jobs submitted (bench prepare ... --cluster PROFILE)")
    lines = [head]
    width = max(len(j["job"]) for j in status["jobs"])
    for j in status["jobs"]:
        what = f"{j['shards']} shard(s)" if j["job"] != FINISH else "PCA fit, projection, manifest"
        again = f" x{j['restarts'] + 1}" if j["restarts"] else ""
        lines.append(f"  {j['job'].ljust(width)}  {j['state']:<9} job {j['job_id']}{again}  {what}"
                     + (f": {j['detail']}" if j["detail"] else ""))
        if j["state"] in ("failed", "cancelled", "timeout"):
            lines.append(f"    log: {j['stderr']}")
    counts: dict[str, int] = {}
    for j in status["jobs"]:
        counts[j["state"]] = counts.get(j["state"], 0) + 1
    lines.append("  jobs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Submitting


def _resources(profile: Profile, hours: Optional[float], gpus: int) -> dict:
    """One task per job; memory is the node's share of one GPU (all of it on a CPU profile)."""
    share = profile.mem_gb / max(profile.gpus_per_node, 1) if profile.mem_gb else None
    minutes = min(profile.time_min, int(hours * 60)) if hours else profile.time_min
    if profile.executor == "local":
        gpus, share, minutes = min(gpus, profile.gpus_per_node), None, profile.time_min
    return {"nodes": 1, "gpus_per_node": gpus, "tasks_per_node": 1, "cpus_per_task": profile.cpus_per_task,
            "mem_gb": share, "timeout_min": max(int(minutes), 1)}


def _deal(todo: Sequence[str], tasks: int) -> list[list[str]]:
    count = max(1, min(tasks, len(todo)))
    return [list(todo[i::count]) for i in range(count)] if todo else []


def _retire(subs: Sequence[dict], states: dict, records: list[dict]) -> list[dict]:
    """The jobs of the last submission still queued or running; a PCA job that waits on a failed
    task is cancelled (SLURM would keep it pending forever) and not counted."""
    active = []
    rows = {s["job_id"]: job_state(s, records[records.index(s) + 1:], states)[0] for s in subs}
    broken = any(rows[s["job_id"]] in ("failed", "cancelled", "timeout") for s in subs if s["cell"] != FINISH)
    for s in subs:
        if rows[s["job_id"]] not in ACTIVE:
            continue
        if s["cell"] == FINISH and broken and s.get("executor") == "slurm":
            subprocess.run(["scancel", str(s["job_id"])], capture_output=True, timeout=60)
            continue
        active.append({**s, "state": rows[s["job_id"]]})
    return active


def submit_prepare(overrides: Sequence[str], options: Any, cluster: Optional[str] = None, local: bool = False,
                   debug: bool = False, tasks: Optional[int] = None, hours: Optional[float] = None,
                   quiet: bool = False, profiles_dir: Path | str | None = None) -> dict:
    """Submit the prepare of `overrides` (bench.prepare.options.PrepareOptions `options`) as an
    encoding array and a dependent PCA job; return what was submitted, without waiting."""
    from bench.prepare.shards import prepare_state

    if sum((cluster is not None, bool(local), bool(debug))) != 1:
        raise LaunchError("choose one of --cluster PROFILE, --local or --debug")
    profile = load_profile(cluster or "local", profiles_dir)
    kind = "debug" if debug else profile.executor
    cfg = load_config(overrides)
    out = Path(cfg.data.prepared_dir).resolve()
    cfg.data.prepared_dir = str(out)  # the jobs may start elsewhere (a requeue, a local lane)
    state = prepare_state(cfg.data, cfg.vae, cfg.encoder, options)
    summary = {"prepared_dir": str(out), "executor": kind, "profile": profile.name, "jobs": [], "note": ""}
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))
    if state.complete:
        summary["note"] = "up to date: nothing to submit"
        say("prepare: nothing to submit")  # prepare_state has said the folder is up to date
        return summary
    _check_folder_settings(out, state.settings_hash, options)
    subs, records = latest_submission(out)
    active = _retire(subs, scheduler_states(subs), records)
    if active:
        summary["note"] = "already submitted: " + ", ".join(f"{a['cell']} {a['state']} (job {a['job_id']})"
                                                           for a in active)
        say(f"prepare: {out}: {summary['note']}; nothing submitted (bench status --prepare ...)")
        return summary
    todo = [name for name in state.shards if name not in state.encoded]
    embedded = cfg.vae.kind == "embedded" and not cfg.vae.path
    groups = _deal(todo, 1 if embedded else (tasks or profile.array_parallelism))  # task 0 trains embedded assets
    summary["jobs"] = _submit_jobs(cfg, out, options, profile, kind, groups, hours, len(state.shards))
    handles = [job.pop("handle") for job in summary["jobs"]]
    say(_format_submitted(summary, state, len(todo)))
    if kind == "debug":
        summary["failed"] = _run_debug(handles, say)
    return summary


def _cancel_untracked(handles: list[Any]) -> None:
    """Cancel jobs submitted before a later submission failed: jobs.jsonl never records them, so a
    second `bench prepare --cluster` would submit the same shards again beside them."""
    for handle in handles:
        try:
            handle.cancel(check=False)
        except Exception:  # best effort: the submission error is what the user must see
            pass


def _check_folder_settings(out: Path, settings_hash: str, options: Any) -> None:
    import json

    path = out / "settings.json"
    previous = settings_hash
    if path.is_file():
        try:
            previous = json.loads(path.read_text()).get("settings_hash")
        except (ValueError, AttributeError):
            raise LaunchError(f"{path} is not a prepare's settings file (not a JSON object); remove the "
                              "folder or choose another data.prepared_dir") from None
    if previous != settings_hash:
        fix = ("remove the folder first (array tasks cannot clear it together)" if options.overwrite
               else "choose another data.prepared_dir or remove the folder")
        raise LaunchError(f"{out} holds a prepare with other settings (hash {previous} vs {settings_hash}); {fix}")


def _submit_jobs(cfg: ExperimentConfig, out: Path, options: Any, profile: Profile, kind: str,
                 groups: list[list[str]], hours: Optional[float], total: int) -> list[dict]:
    """The array (one task per group of shards) and the PCA job after it; their submit rows."""
    from bench.launch.executors import make_executor, scheduler_error  # submitit: only where jobs are submitted

    out.mkdir(parents=True, exist_ok=True)
    folder = out / ".submitit" / STAGE / "%j"
    count = len(groups)
    tasks = [PrepareJob(f"encode-{i}", cfg, out, replace(options, task_index=i, task_count=count,
                                                         shards=tuple(group), lanes=1))
             for i, group in enumerate(groups)]
    if kind == "local":  # local jobs share the machine's cores (CellJob.threads)
        for task in tasks:
            task.threads = profile.cpus_per_task
    handles: list[Any] = []
    res = None
    try:
        if tasks:
            res = _resources(profile, hours, min(profile.gpus_per_node, 1))
            executor = make_executor(kind, folder, profile, res, f"prepare-{out.name}")
            with executor.batch():
                handles = [executor.submit(t) for t in tasks]
        res_pca = _resources(profile, hours, 0)
        executor = make_executor(kind, folder, profile, res_pca, f"prepare-{out.name}-pca")
        array_id = handles[0].job_id.partition("_")[0] if handles else None
        if kind == "slurm" and array_id:
            executor.update_parameters(slurm_additional_parameters={**profile.additional_parameters,
                                                                    "dependency": f"afterok:{array_id}"})
        after = [h.job_id for h in handles] if kind == "local" else []
        finish = PrepareJob(FINISH, cfg, out, replace(options, task_index=0, task_count=1, shards=(), lanes=1), after)
        finish.threads = profile.cpus_per_task if kind == "local" else None
        handles.append(executor.submit(finish))
    except Exception as err:
        _cancel_untracked(handles)  # an array whose PCA job failed to submit would run unrecorded
        if isinstance(err, LaunchError) or kind != "slurm":
            raise
        raise scheduler_error(f"could not submit the prepare of {out}", profile, err) from None
    rows, submission = [], f"{time.time():.6f}"
    for job, handle, shards in zip([*tasks, finish], handles, [*groups, []]):
        array, _, index = handle.job_id.partition("_")
        row = {"event": "submit", "stage": STAGE, "cell": job.cell, "grid": STAGE, "executor": kind,
               "profile": profile.name, "job_id": handle.job_id, "array_id": array,
               "array_index": int(index) if index.isdigit() else None, "stdout": str(handle.paths.stdout),
               "stderr": str(handle.paths.stderr), "submitit_folder": str(handle.paths.folder),
               "resources": res_pca if job is finish else res, "shards": shards, "shards_total": total,
               "submission": submission, "after": array_id if job is finish else None}
        append_record(out, row)
        rows.append({**row, "handle": handle})
    return rows


def _format_submitted(summary: dict, state: Any, todo: int) -> str:
    jobs = summary["jobs"]
    tasks = [j for j in jobs if j["cell"] != FINISH]
    where = f"{summary['executor']} (profile {summary['profile']})"
    lines = [f"prepare {summary['prepared_dir']}: {len(state.shards)} shards of {state.images} images, "
             f"{len(state.shards) - todo} already encoded"]
    if tasks:
        lines.append(f"  submitted {len(tasks)} encoding task(s) to {where} as array {tasks[0]['array_id']}: "
                     f"{todo} shard(s)")
    pca = jobs[-1]
    lines.append(f"  submitted job {pca['job_id']}: PCA fit, projection, manifest"
                 + (f" (after array {pca['after']} succeeds)" if pca["after"] else ""))
    lines.append(f"  logs: {Path(pca['stdout']).parent.parent}; follow with: bench status --prepare "
                 "[the same key=value]")
    return "\n".join(lines)


def _run_debug(handles: Sequence[Any], say) -> list[str]:
    """Debug jobs, in this process, in order; the PCA job only after every task succeeded."""
    failed: list[str] = []
    for handle in handles:
        if failed:
            break
        os.environ["SUBMITIT_DEBUG_JOB_ID"] = handle.job_id  # submitit.JobEnvironment() inside the job
        try:
            error = handle.exception()
        finally:
            os.environ.pop("SUBMITIT_DEBUG_JOB_ID", None)
        if error is not None:
            failed.append(f"{handle.job_id}: {type(error).__name__}: {error}")
            say(f"debug: prepare job {handle.job_id} FAILED ({type(error).__name__}: {error})")
    return failed


# ----------------------------------------------------------------------------------------------
# Command line: `bench prepare` (without --cluster/--local/--debug: bench.prepare.pipeline, here)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`bench prepare [key=value ...] [options] [--cluster P | --local | --debug] [--tasks N] [--hours H]`."""
    from bench.prepare import pipeline

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = pipeline.build_parser()
    where = parser.add_argument_group("through the launcher (returns at once; follow with bench status --prepare)")
    choice = where.add_mutually_exclusive_group()
    choice.add_argument("--cluster", metavar="PROFILE",
                        help=f"submit to a cluster profile ({', '.join(list_profiles())})")
    choice.add_argument("--local", action="store_true", help="subprocesses on this machine (profile local)")
    choice.add_argument("--debug", action="store_true", help="the same jobs, in this process, one after another")
    where.add_argument("--tasks", type=int, help="encoding tasks of the array (default: the profile's "
                                                 "array_parallelism, at most one per shard)")
    where.add_argument("--hours", type=float, help="time limit per job (default and maximum: the profile's)")
    args = parser.parse_intermixed_args(argv)
    if not (args.cluster or args.local or args.debug):
        if args.tasks is not None or args.hours is not None:
            raise LaunchError("--tasks and --hours go with --cluster PROFILE, --local or --debug")
        return pipeline.main(argv)
    if args.task_index is not None or args.task_count is not None:
        raise LaunchError("--task-index/--task-count are set by the launcher; leave them out with --cluster")
    if args.tasks is not None and args.tasks < 1:
        raise LaunchError(f"--tasks must be >= 1, got {args.tasks}")
    if args.hours is not None and not args.hours > 0:
        raise LaunchError(f"--hours must be > 0, got {args.hours}")
    summary = submit_prepare(args.overrides, pipeline.options_from_args(args), cluster=args.cluster,
                             local=args.local, debug=args.debug, tasks=args.tasks, hours=args.hours)
    return 1 if summary.get("failed") else 0


def main_status_prepare(overrides: Sequence[str], as_json: bool = False) -> str:
    """`bench status --prepare [key=value ...]`: the prepare of the folder those settings name."""
    import json

    cfg = load_config(overrides)
    status = prepare_status(cfg.data.prepared_dir)
    return json.dumps(status) if as_json else format_prepare_status(status)
