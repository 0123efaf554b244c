"""`bench status`: the state of every cell of a grid.

A cell's state joins its run folder's `jobs.jsonl` records (the newest `submit` row of a stage and
the `start` / `end` rows that follow it) with the scheduler and with the run folder itself (DONE,
checkpoints, metrics.jsonl, eval.jsonl). The scheduler: `squeue -t all` for queued and running jobs
(it also lists jobs that ended less than MinJobAge ago); for the others `sacct`, which keeps every
ended job's state and exit code (OUT_OF_MEMORY, NODE_FAIL, TIMEOUT, FAILED with exit code 1:0)
where the cluster has accounting. Without accounting (sacct missing, or "accounting storage is
disabled") squeue's answer stands, and a job ended longer than MinJobAge ago can only be told from
its own records. A local job's controller process is looked up in /proc.

Progress: metrics.jsonl's last training row gives the step and images/s (measured over that log
interval); the ETA is what is left of train.max_steps at that rate.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional, Sequence

from bench.config import ExperimentConfig
from bench.launch.grids import Cell, Grid, Setting, eval_config, expand, load_grid, settings_for
from bench.launch.jobs import last_metric, measured_steps
from bench.progress import format_duration
from bench.runfolder import DONE_FILE, JOBS_FILE, METRICS_FILE, checkpoint_steps, read_jsonl

# squeue's job states (%T) that count as queued and as running; any other state has ended.
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "RESV_DEL_HOLD"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}
# How an ended SLURM job is shown when the job itself recorded no outcome (state, why).
ENDED = {"CANCELLED": ("cancelled", "cancelled (scancel, or by an administrator)"),
         "TIMEOUT": ("timeout", "hit its time limit and was not requeued (max_num_timeout reached?)"),
         "OUT_OF_MEMORY": ("failed", "ran out of memory (raise mem_gb)"),
         "NODE_FAIL": ("failed", "its node failed"), "BOOT_FAIL": ("failed", "its node failed to boot"),
         "PREEMPTED": ("failed", "preempted and not requeued"), "DEADLINE": ("failed", "missed its deadline")}
# Every state `job_state` gives a job that ended without finishing its work.
ENDED_STATES = ("failed", "cancelled", "timeout")


# ----------------------------------------------------------------------------------------------
# Job states from the records and the scheduler


def _squeue(job_ids: set[str]) -> dict[str, str]:
    """job id -> SLURM state, via one `squeue -h -r -t all -j IDS -o "%i %T"` call.

    `-t all` matters: without it squeue lists only pending and running jobs, and an ended job
    (CANCELLED, TIMEOUT, FAILED, COMPLETED) would look like one that never reported. With it, ended
    jobs stay listed for the controller's MinJobAge (SLURM's default 300 s); jobs absent from the
    answer are gone. An unreachable scheduler gives `UNKNOWN: <why>` for all of them.
    """
    if not job_ids:
        return {}
    cmd = ["squeue", "-h", "-r", "-t", "all", "-j", ",".join(sorted(job_ids)), "-o", "%i %T"]
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


class SchedulerState(str):
    """A job's SLURM state as squeue or sacct names it; `exit_code` is sacct's "code:signal" ("" when
    squeue answered)."""

    exit_code = ""

    @classmethod
    def of(cls, state: str, exit_code: str = "") -> "SchedulerState":
        made = cls(state)
        made.exit_code = exit_code
        return made


def _sacct(job_ids: set[str]) -> dict[str, SchedulerState]:
    """job id -> state and exit code from accounting, via one `sacct -n -P -X -j IDS -o
    JobID,State,ExitCode` call; {} when there is no accounting to ask (sacct missing, failing, or
    "Slurm accounting storage is disabled"): the caller keeps squeue's answer then."""
    if not job_ids:
        return {}
    cmd = ["sacct", "-n", "-P", "-X", "-j", ",".join(sorted(job_ids)), "-o", "JobID,State,ExitCode"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if proc.returncode != 0:
        return {}
    states = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3 and parts[0] in job_ids and parts[1].split():
            states[parts[0]] = SchedulerState.of(parts[1].split()[0], parts[2])  # "CANCELLED by 1000"
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
    ended = {j for j in slurm if out.get(j, "GONE") not in QUEUED | RUNNING}  # also UNKNOWN: ask accounting
    out.update(_sacct(ended))
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
    return (errors or lines or [""])[-1][:600]  # a storage fault's line names the path and what to do


def job_state(submit: dict, events: Sequence[dict], states: dict[str, str]) -> tuple[str, str, int]:
    """(state, detail, restarts) of the job of one `submit` record, from the events that follow it.

    state: queued, running, done, failed, cancelled, timeout or unknown; detail: the error, how the
    job ended or why the state is unknown.
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
        # (a local lane may still be running other cells). The work is done whatever SLURM says, but
        # a disagreement is shown: before jobs ignored USR2 once finished, a time-limit warning that
        # arrived while the finished process exited killed it (FAILED, exit 140 = 128 + SIGUSR2).
        if scheduler in ENDED or scheduler == "FAILED":
            return "done", (f"the work finished, but SLURM recorded the job as {scheduler} afterwards "
                            "(killed while exiting?)"), restarts
        return "done", "", restarts
    if scheduler in QUEUED:
        return "queued", ("requeued" if starts else ""), restarts
    if scheduler in RUNNING:
        started = last is not None and last["event"] == "start"
        return ("running" if started or submit.get("lane") is None else "queued"), "", restarts
    if scheduler.startswith("UNKNOWN"):
        return "unknown", scheduler.split(":", 1)[-1].strip(), restarts
    tail = _tail_error(submit.get("stderr"))
    code = f", exit code {scheduler.exit_code}" if getattr(scheduler, "exit_code", "") else ""  # sacct's
    if scheduler in ENDED:
        state, why = ENDED[scheduler]
        return state, f"job {why} (SLURM state {scheduler}{code})" + (f"; log: {tail}" if tail else ""), restarts
    why = f"job ended as {scheduler}{code} without reporting an outcome" if scheduler != "GONE" else \
        "job ended without reporting an outcome"
    why += f"; log: {tail}" if tail else " (cancelled, out of memory, time limit or node failure?)"
    return "failed", why, restarts


def last_submit(records: Sequence[dict], stage: str,
                setting: Optional[str] = None) -> tuple[Optional[dict], list[dict]]:
    """The newest submit record of (stage, setting) and the records of that stage/setting after it."""
    def ours(r: dict) -> bool:
        return r.get("stage") == stage and (setting is None or r.get("setting") == setting)
    for index in range(len(records) - 1, -1, -1):
        if records[index].get("event") == "submit" and ours(records[index]):
            return records[index], [r for r in records[index + 1:] if ours(r)]
    return None, []


# ----------------------------------------------------------------------------------------------
# One row per cell of a grid


def training_progress(run: Path, max_steps: int, batch_size: int) -> dict:
    """`step`, `images_per_s` and `eta_s` (seconds left of max_steps at that rate) from the last
    training row of metrics.jsonl; None where there is no row or no rate."""
    rows = [r for r in read_jsonl(run / METRICS_FILE) if isinstance(r.get("step"), (int, float))]
    if not rows:
        return {"step": None, "images_per_s": None, "eta_s": None}
    last = max(rows, key=lambda r: r["step"])
    step, rate = int(last["step"]), last.get("images_per_s")
    rate = float(rate) if isinstance(rate, (int, float)) and rate > 0 else None
    eta = (max_steps - step) * batch_size / rate if rate and step < max_steps else None
    return {"step": step, "images_per_s": rate, "eta_s": eta}



def eval_pairs(grid: Grid, cell: Cell, run: Path) -> list[tuple[Setting, ExperimentConfig, list[int]]]:
    """(setting, its config, the steps it should score) for every setting of the cell."""
    steps = list(cell.eval_steps) or checkpoint_steps(run)
    return [(s, eval_config(cell, s), s.scores(steps)) for s in settings_for(grid, cell)]


def grid_status(name: str | Grid, overrides: Sequence[str] = (), grids_dir: Path | str | None = None) -> list[dict]:
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
        sub, events = last_submit(recs, "train")
        row = {"cell": cell.name, "spec": cell.cfg.spec, "run_dir": str(run), "state": "not submitted",
               **training_progress(run, cell.cfg.train.max_steps, cell.cfg.train.batch_size),
               "checkpoint": max(checkpoint_steps(run), default=None),
               "max_steps": cell.cfg.train.max_steps, "job_id": sub.get("job_id") if sub else None,
               "restarts": 0, "log": sub.get("stdout") if sub else None, "detail": "", "eval": "",
               "eval_errors": [], "last_metric": last_metric(run)}
        if sub is not None:
            row["state"], row["detail"], row["restarts"] = job_state(sub, events, states)
        if (run / DONE_FILE).is_file():  # (keeps a "SLURM disagrees" note of job_state)
            row["state"], row["detail"] = "done", row["detail"] if row["state"] == "done" else ""
        elif sub is not None:
            if row["state"] == "done":  # the job returned but the trainer wrote no DONE marker
                row["state"], row["detail"] = "failed", f"job ended but {run / DONE_FILE} is missing"
            if row["state"] in ENDED_STATES:
                row["log"] = sub.get("stderr")
        measured = total = 0
        notes = []
        for setting, cfg, steps in eval_pairs(grid, cell, run):
            try:
                done = measured_steps(cfg, run, steps, setting.name)
            except ValueError as err:  # bench.evaluate.score_run cannot compute the requested metrics
                notes.append(f"{setting.name}: cannot evaluate")
                row["eval_errors"].append(f"{setting.name}: {err}")
                continue
            measured, total = measured + len(done), total + len(steps)
            esub, eevents = last_submit(recs, "eval", setting.name)
            if esub is not None and len(done) < len(steps):
                st, detail, _ = job_state(esub, eevents, states)
                if st != "done":
                    notes.append(f"{setting.name}: {st}")
                if st in ENDED_STATES:
                    row["eval_errors"].append(f"{setting.name}: {detail}\n    log: {esub.get('stderr')}")
        row["eval"] = f"{measured}/{total} measured" + (f"; {'; '.join(notes)}" if notes else "") if total else ""
        rows.append(row)
    return rows


def format_status(name: str, rows: Sequence[dict]) -> str:
    """A plain table of `grid_status` rows, failed cells followed by their log path."""
    def steps(r: dict) -> str:
        return f"{r['step'] if r['step'] is not None else '-'}/{r['max_steps']} (ckpt {r['checkpoint'] or '-'})"
    def speed(r: dict) -> tuple[str, str]:  # images/s of the last log interval; ETA while running
        rate, eta = r.get("images_per_s"), r.get("eta_s")
        return (f"{rate:.1f}" if rate else "-"), (format_duration(eta) if eta and r["state"] == "running" else "-")
    table = [("cell", "state", "step", "img/s", "eta", "eval", "last metric", "job")]
    for r in rows:
        job = (r["job_id"] or "-") + (f" x{r['restarts'] + 1}" if r["restarts"] else "")
        table.append((r["cell"], r["state"], steps(r), *speed(r), r["eval"] or "-", r["last_metric"] or "-", job))
    widths = [max(len(str(t[i])) for t in table) for i in range(len(table[0]))]
    lines = [f"grid {name}: {len(rows)} cells"] + ["  ".join(str(v).ljust(w) for v, w in zip(t, widths)).rstrip()
                                                   for t in table]
    for r in rows:
        if r["state"] in (*ENDED_STATES, "unknown") or r["detail"]:
            lines.append(f"  {r['cell']}: {r['state']}: {r['detail']}" + (f"\n    log: {r['log']}" if r["log"] else ""))
        lines += [f"  {r['cell']} eval {error}" for error in r.get("eval_errors", [])]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append("summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)
