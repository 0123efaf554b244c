"""The launch path against a real single-node SLURM cluster (slurm/local-cluster.sh).

The test starts the loopback cluster (or reuses one that is already running, which it then leaves
running), submits the tiny `smoke` grid through `submit_grid(..., cluster="local-slurm")` as one job
array with the real `bench.train.loop.train`, and once each job has
written its first checkpoint interrupts it for real: the first by the scheduler (`scontrol requeue`),
the second by submitit's preemption path (SIGTERM + USR2: TrainJob.checkpoint() + self-requeue). Both
must resume from their checkpoint (the trainer logs "resuming from checkpoint step N", N > 0) and
finish, and end with the same checkpoint tensors (weights, EMA, optimiser, RNG) and the same
metrics.jsonl rows (apart from wall-clock fields) as an uninterrupted run of the same cell, trained
in this process meanwhile; the eval stage runs the real `bench.evaluate.score_run.evaluate`;
submitting again submits nothing; an unreachable controller is one clear SchedulerError; `bench
status` shows a cancelled job as cancelled and a timed-out one as timeout; `local-cluster.sh stop`
leaves no process of its jobs behind.
Needs root, slurm-wlm and munge (`apt-get install -y slurm-wlm munge`); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import pytest
import torch
from fixtures_slurm import cluster, free_port, run_script, why_skip  # noqa: F401 (cluster: a fixture)
from fixtures_train import add_embedded_eval_assets, write_prepared

from bench import runfolder
from bench.launch import submit as launch
from bench.launch.grids import expand

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]
RUN_SECONDS = 20  # how long each training job should run: well beyond the ~4 s a kill takes (KillWait)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _prepare(root: Path) -> Path:
    """The fixture's prepared folder, plus a tiny decoder and evaluation classifier (trained for a few
    steps by bench.prepare.embedded, recorded as `bench prepare` records them)."""
    prepared = write_prepared(root / "prepared")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few tiny steps: one thread is faster on a busy 2-core machine
    try:
        return _train_decoder_and_classifier(prepared)
    finally:
        torch.set_num_threads(threads)


def _train_decoder_and_classifier(prepared: Path) -> Path:
    return add_embedded_eval_assets(prepared)


def _calibrated_steps(prepared: Path, root: Path) -> int:
    """Steps that take about RUN_SECONDS on one core here: the interrupts must land mid-run on a
    fast machine too. Measured on the smoke grid's model with the real trainer, one thread."""
    from bench.train.loop import train

    cell = expand("smoke", [f"output_root={root / 'calibration'}", f"data.prepared_dir={prepared}"])[0]
    cell.cfg.train.max_steps = 40
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the jobs (local-slurm profile: OMP_NUM_THREADS=1)
    try:
        began = time.perf_counter()
        train(cell.cfg, root / "calibration" / "run")
        seconds = time.perf_counter() - began
    finally:
        torch.set_num_threads(threads)
    return max(200, int(40 / seconds * RUN_SECONDS) // 2 * 2)


def _wait(what: str, predicate, timeout: float, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _preempt(job_id: str, log: Path) -> None:
    """Preemption as submitit's SlurmJob._interrupt sends it, SIGTERM then USR2, but USR2 only once
    the job has logged the TERM: sent back to back, they arrived in the other order on a loaded
    machine, and the TERM killed the `scontrol requeue` that USR2's handler had started."""
    subprocess.run(["scancel", job_id, "--signal", "TERM"], check=True, timeout=60)
    _wait("the job to log SIGTERM",
          lambda: log.is_file() and "Bypassing signal SIGTERM" in log.read_text(errors="replace"), 60)
    subprocess.run(["scancel", job_id, "--signal", "USR2"], check=True, timeout=60)


@pytest.fixture(scope="module")
def trained(cluster, tmp_path_factory):
    """The smoke grid trained on the cluster, with one requeue and one preemption; returns timings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("grid")
    began = time.time()
    prepared = _prepare(root)
    steps = _calibrated_steps(prepared, root)
    overrides = [f"output_root={root / 'runs'}", f"data.prepared_dir={prepared}",
                 f"train.max_steps={steps}", "train.log_every=2"]
    sub = launch.submit_grid("smoke", cluster="local-slurm", overrides=overrides, quiet=True)
    submitted = time.time()
    cells = expand("smoke", overrides)
    finished_at_return = [(cell.run_dir / runfolder.DONE_FILE).is_file() for cell in cells]
    jobs = {j["cell"]: j["job_id"] for j in sub.jobs}
    for cell in cells:  # interrupt each job once, right after its first checkpoint
        _wait(f"the first checkpoint of {cell.name}", lambda: runfolder.checkpoint_steps(cell.run_dir), 120)
    subprocess.run(["scontrol", "requeue", jobs["latent_only"]], check=True, timeout=60)
    _preempt(jobs["redi"], Path(runfolder.read_jsonl(cells[1].run_dir / runfolder.JOBS_FILE)[0]["stderr"]))
    references = {}  # uninterrupted runs of the same cells, here, while the jobs run (one thread, as they do)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from bench.train.loop import train

        for cell in cells:
            references[cell.name] = root / "uninterrupted" / cell.name
            train(cell.cfg, references[cell.name])
    finally:
        torch.set_num_threads(threads)
    rows = _wait("every cell to finish", lambda: (lambda r: r if all(x["state"] in ("done", "failed")
                                                                    for x in r) else None)(
        launch.grid_status("smoke", overrides)), 240, every=1.0)
    return {"sub": sub, "rows": rows, "cells": cells, "overrides": overrides, "steps": steps,
            "references": references,
            "finished_at_return": finished_at_return,
            "seconds": {"prepare": submitted - began, "train": time.time() - submitted}}


def test_grid_is_one_array_and_submission_returns_at_once(trained):
    sub = trained["sub"]
    assert sub.executor == "slurm" and sub.submitted == 2
    ids = [j["job_id"] for j in sub.jobs]
    assert len({i.split("_")[0] for i in ids}) == 1 and sorted(i.split("_")[1] for i in ids) == ["0", "1"]
    # Returned while the jobs were still queued or running (each trains for ~RUN_SECONDS).
    assert trained["finished_at_return"] == [False, False]


def test_interrupted_jobs_resume_from_their_checkpoint_and_finish(trained):
    rows = {r["cell"]: r for r in trained["rows"]}
    assert [r["state"] for r in rows.values()] == ["done", "done"], launch.format_status("smoke", trained["rows"])
    for cell in trained["cells"]:
        records = runfolder.read_jsonl(cell.run_dir / runfolder.JOBS_FILE)
        starts = [r for r in records if r["event"] == "start"]
        assert len(starts) == 2 and starts[0]["job_id"] == starts[1]["job_id"]  # the same job, restarted
        assert starts[1]["restarts"] == 1  # SLURM_RESTART_COUNT
        log = Path(records[0]["stdout"]).read_text()
        resumed = [int(s) for s in re.findall(r"resuming from checkpoint step (\d+)", log)]
        assert resumed and resumed[0] > 0, log[-2000:]
        steps = [json.loads(line)["step"] for line in (cell.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(2, trained["steps"] + 1, 2))  # no gap, no duplicate after the restart
    redi_log = Path(runfolder.read_jsonl(trained["cells"][1].run_dir / runfolder.JOBS_FILE)[0]["stdout"]).read_text()
    assert "requeueing train of cell redi" in redi_log  # TrainJob.checkpoint() ran on USR2
    print(f"\n{trained['steps']} steps per cell; timings: {trained['seconds']}")


WALL_CLOCK = {"time", "elapsed_s", "images_per_s", "peak_memory_mb", "memory_kind"}


def test_requeued_jobs_end_as_an_uninterrupted_run(trained):
    """Both requeue paths (scontrol requeue; USR2 + self-requeue) lose and double nothing: the final
    checkpoint's tensors are bit-identical to an uninterrupted run's and every metrics.jsonl row
    holds the same numbers (wall-clock fields apart)."""
    from safetensors.torch import load_file

    steps = trained["steps"]
    for cell in trained["cells"]:
        reference = trained["references"][cell.name]
        final = f"checkpoints/{steps:07d}"
        for name in ("weights.safetensors", "state.safetensors"):
            ours, theirs = load_file(str(cell.run_dir / final / name)), load_file(str(reference / final / name))
            assert ours.keys() == theirs.keys(), (cell.name, name)
            different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
            assert not different, f"{cell.name}: {name} differs from the uninterrupted run in {different[:5]}"

        def rows(run: Path) -> list[dict]:
            return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
                    for line in (run / "metrics.jsonl").read_text().splitlines()]
        ours, theirs = rows(cell.run_dir), rows(reference)
        assert len(ours) == len(theirs) == steps // 2
        assert ours == theirs, next((a, b) for a, b in zip(ours, theirs) if a != b)


def test_eval_stage_runs_and_resubmission_submits_nothing(trained, capsys):
    overrides = trained["overrides"]
    again = launch.submit_grid("smoke", cluster="local-slurm", overrides=overrides, quiet=True)
    assert again.submitted == 0 and [s["reason"] for s in again.skipped] == ["done", "done"]
    from bench.cli import main as cli_main  # the command line a user types, too

    assert cli_main(["grid", "smoke", "--cluster", "local-slurm", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "submitted 0 job(s)" in printed and "skip latent_only: done" in printed and "nothing to submit" in printed
    began = time.time()
    sub = launch.submit_grid("smoke", stage="eval", cluster="local-slurm", overrides=overrides, quiet=True)
    assert sub.submitted == 2 and [j["steps"] for j in sub.jobs] == [[2, 4], [2, 4]]

    def measured():
        rows = launch.grid_status("smoke", overrides)
        return rows if all(r["eval"] == "2/2 measured" or "failed" in r["eval"] for r in rows) else None
    rows = _wait("the eval jobs", measured, 150, every=1.0)
    assert [r["eval"] for r in rows] == ["2/2 measured", "2/2 measured"], launch.format_status("smoke", rows)
    for cell in trained["cells"]:
        evals = runfolder.read_jsonl(cell.run_dir / "eval.jsonl")
        assert {(r["step"], r["setting"]) for r in evals} == {(2, "default"), (4, "default")}
        assert all(isinstance(r["value"], float) for r in evals)
    assert all(r["last_metric"] for r in rows)
    again = launch.submit_grid("smoke", stage="eval", cluster="local-slurm", overrides=overrides, quiet=True)
    assert again.submitted == 0 and {s["reason"] for s in again.skipped} == {"measured"}
    print(f"\neval stage: {time.time() - began:.1f} s")


def test_unreachable_controller_is_one_clear_error(cluster, tmp_path):
    dead = tmp_path / "slurm.conf"  # the same cluster's config, but a port nobody listens on
    dead.write_text(re.sub(r"SlurmctldPort=\d+", f"SlurmctldPort={free_port()}", Path(cluster).read_text()))
    os.environ["SLURM_CONF"] = str(dead)
    try:
        with pytest.raises(launch.SchedulerError,
                           match="could not submit grid smoke to SLURM.*contact slurm controller"):
            launch.submit_grid("smoke", cluster="local-slurm", overrides=[f"output_root={tmp_path}"], quiet=True)
    finally:
        os.environ["SLURM_CONF"] = cluster


def test_status_shows_how_an_ended_job_ended(cluster, tmp_path):
    """squeue without `-t all` lists no ended job; bench status must still tell a cancelled job and a
    timed-out one (1-minute limit; SLURM checks limits about every 30 s) from a crash."""
    from bench.launch import status as launch_status

    def sbatch(*args: str) -> str:
        return subprocess.run(["sbatch", "--parsable", "-o", str(tmp_path / "%j.out"), *args, "--wrap", "sleep 300"],
                              check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    timed, cancelled = sbatch("--time=1"), sbatch()
    running = ["squeue", "-h", "-j", f"{timed},{cancelled}", "-t", "R", "-o", "%i"]
    _wait("the jobs to start",
          lambda: subprocess.run(running, capture_output=True, text=True).stdout.split().__len__() == 2, 60)
    subprocess.run(["scancel", cancelled], check=True, timeout=60)
    submits = [{"executor": "slurm", "job_id": j, "stderr": str(tmp_path / f"{j}.out")} for j in (timed, cancelled)]

    def ended():
        states = launch_status.scheduler_states(submits)
        return states if all(v in launch_status.ENDED for v in states.values()) else None
    states = _wait("both jobs to end", ended, 150, every=2.0)
    assert states == {timed: "TIMEOUT", cancelled: "CANCELLED"}
    timed_state, timed_detail, _ = launch_status.job_state(submits[0], [], states)
    cancelled_state, cancelled_detail, _ = launch_status.job_state(submits[1], [], states)
    assert (timed_state, cancelled_state) == ("timeout", "cancelled"), (timed_detail, cancelled_detail)
    assert "time limit" in timed_detail and "SLURM state CANCELLED" in cancelled_detail


def _job_processes(folder: Path) -> list[str]:
    """Live processes of a local cluster's jobs: its slurmstepd (their log is in `folder`) and every
    process whose environment names its slurm.conf with a job id."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # ended; nobody here reaps it
            environ = (proc / "environ").read_bytes().split(b"\0")
            links = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
            stepd = b"slurmstepd" in (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (f"SLURM_CONF={folder / 'slurm.conf'}".encode() in environ
                and any(e.startswith(b"SLURM_JOB_ID=") for e in environ)):
            found.append(proc.name)
        elif stepd and any(link.startswith(str(folder) + "/") for link in links):
            found.append(proc.name)
    return found


def test_stop_ends_the_jobs_it_was_running(tmp_path):
    """`local-cluster.sh stop` with a job step running (`srun sleep 300`) and one queued: nothing of
    them survives (before, slurmstepd, the batch script, srun and sleep ran on after stop)."""
    reason = why_skip()
    if reason:
        pytest.skip(reason)
    # Its own cluster (the module's may be CI's shared one), in a short folder: slurmstepd's socket
    # paths under it must stay within Linux's 107 characters, and pytest-xdist's tmp_path
    # (/tmp/pytest-of-root/pytest-N/popen-gwK/<test name>0/...) is too deep for that.
    deep = dict(os.environ, LOCAL_SLURM_DIR=str(tmp_path / ("x" * 60)))
    refused = run_script("start", deep)
    assert refused.returncode == 2 and "is too deep: slurmstepd's socket paths" in refused.stderr, refused.stderr
    folder = Path(tempfile.mkdtemp(prefix="rb-slurm-"))
    env = dict(os.environ, LOCAL_SLURM_DIR=str(folder), LOCAL_SLURM_CTLD_PORT=str(free_port()),
               LOCAL_SLURM_D_PORT=str(free_port()))
    started = run_script("start", env)
    assert started.returncode == 0, started.stderr
    env["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        for _ in range(3):  # two run (one per core), one waits
            subprocess.run(["sbatch", "-o", str(tmp_path / "%j.out"), "--wrap", "srun sleep 300"], env=env,
                           check=True, capture_output=True, timeout=60)
        _wait("the job steps to start", lambda: len(_job_processes(folder)) >= 4, 60)
    finally:
        stopped = run_script("stop", env)
    assert stopped.returncode == 0, stopped.stderr
    assert _job_processes(folder) == [], stopped.stderr
    assert run_script("status", env).returncode == 3
    shutil.rmtree(folder, ignore_errors=True)
