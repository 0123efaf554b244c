"""Launching grids (bench.launch.submit) with stand-in job functions instead of the real trainer.

What is checked: the debug executor runs a grid in-process and records submit/start/end rows;
re-submitting after completion submits nothing and a queued/running cell is never submitted twice;
a crashing cell leaves the others running (debug and the local subprocess executor) and status
shows it failed with its error and an existing log path; a checkpointable TrainJob requeued after
a preemption resumes from the run folder; the eval stage submits only the (step, setting) pairs
missing from eval.jsonl and skips cleanly without an evaluator; --dry-run prints every job with
its resources and GPU-hours equal to steps x batch / throughput / 3600 x GPUs computed here;
profiles and options fail with one clear error. The real scheduler is in test_slurm_integration.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from bench import runfolder
from bench.cli import main as cli_main
from bench.launch import jobs as launch_jobs
from bench.launch import status as launch_status
from bench.launch import submit as launch
from bench.launch.grids import GridError, expand, load_grid
from bench.launch.jobs import TrainJob
from bench.launch.profiles import PROFILES_DIR, ProfileError
from bench.launch.status import job_state
from bench.launch.submit import LaunchError, SchedulerError, grid_status, job_resources, load_profile, submit_grid

# The local executor unpickles the stand-ins in a fresh interpreter that cannot import this file.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _mark_checkpoint(run_dir: Path, step: int) -> None:
    folder = runfolder.checkpoint_path(run_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.json").write_text(json.dumps({"step": step}))


def standin_train(cfg, run_dir, stop_after=None):
    """Stand-in for bench.train.loop.train: 'trains' by writing checkpoint markers every ckpt_every steps,
    resuming from the newest one, logs where it started, and writes DONE at the end (the run folder's
    names and log appender are bench.runfolder's, as the trainer's)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = max(runfolder.checkpoint_steps(run_dir), default=0)
    with open(run_dir / "starts.log", "a") as handle:
        handle.write(f"{start}\n")
    for step in range(start + cfg.train.ckpt_every, cfg.train.max_steps + 1, cfg.train.ckpt_every):
        _mark_checkpoint(run_dir, step)
        runfolder.append_jsonl(run_dir / runfolder.METRICS_FILE, [{"step": step, "loss": 1.0 / step}])
        if stop_after is not None and step >= stop_after:
            raise SystemExit(-1)  # what submitit's USR2 handler does after checkpoint() + requeue
    runfolder.write_done(run_dir, cfg.train.max_steps, time.time())
    return run_dir


def crashing_train(cfg, run_dir):
    """The first cell (latent_only) crashes after its first checkpoint; the others train normally."""
    if cfg.spec == "latent_only":
        _mark_checkpoint(Path(run_dir), 2)
        raise ValueError("stand-in crash in the latent_only cell")
    return standin_train(cfg, run_dir)


def preempted_once(cfg, run_dir):
    """Stops after the first checkpoint the first time it runs (a preemption), then completes."""
    first = not (Path(run_dir) / "starts.log").exists()
    return standin_train(cfg, run_dir, stop_after=cfg.train.ckpt_every if first else None)


def standin_eval(cfg, run_dir, steps, setting="default"):
    """Stand-in for bench.evaluate.score_run.evaluate: one row per (requested step, metric name)."""
    rows = [{"step": s, "metric": m, "value": 1.0 + s, "setting": setting} for s in steps
            for m in launch_jobs.metric_names(cfg)]
    runfolder.append_jsonl(Path(run_dir) / runfolder.EVAL_FILE, rows)
    return rows


@pytest.fixture
def out(tmp_path) -> list[str]:
    """Overrides that put the smoke grid's run folders in a temporary output root."""
    return [f"output_root={tmp_path / 'runs'}"]


def _records(cell) -> list[dict]:
    return runfolder.read_jsonl(Path(cell.run_dir) / runfolder.JOBS_FILE)


# ----------------------------------------------------------------------------------------------
# Debug executor: in-process runs, records, idempotence


def test_debug_runs_the_grid_in_process_and_resubmitting_submits_nothing(out):
    sub = submit_grid("smoke", debug=True, job_fn=standin_train, overrides=out, quiet=True)
    assert sub.submitted == 2 and not sub.failed
    for cell in expand("smoke", out):
        assert (cell.run_dir / "DONE").is_file()
        events = [r["event"] for r in _records(cell)]
        assert events == ["submit", "start", "end"]
        submit = _records(cell)[0]
        assert submit["executor"] == "debug" and submit["stage"] == "train" and submit["cell"] == cell.name
        assert {"job_id", "array_id", "stdout", "stderr", "time", "resources"} <= set(submit)
    rows = grid_status("smoke", out)
    assert [(r["cell"], r["state"], r["checkpoint"], r["step"]) for r in rows] == \
        [("latent_only", "done", 4, 4), ("redi", "done", 4, 4)]
    again = submit_grid("smoke", debug=True, job_fn=standin_train, overrides=out, quiet=True)
    assert again.submitted == 0 and [s["reason"] for s in again.skipped] == ["done", "done"]


def test_debug_runs_the_smoke_grid_with_the_real_trainer_and_evaluator(tmp_path):
    """No stand-ins: bench.train.loop.train and bench.evaluate.score_run.evaluate run in this process through the
    debug executor (train stage, then eval stage), status reads what they wrote, and submitting
    either stage again submits nothing."""
    import torch
    from fixtures_train import add_embedded_eval_assets as _train_decoder_and_classifier
    from fixtures_train import write_prepared

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread is faster
    try:
        prepared = write_prepared(tmp_path / "prepared")
        _train_decoder_and_classifier(prepared)
        overrides = [f"output_root={tmp_path / 'runs'}", f"data.prepared_dir={prepared}"]
        train = submit_grid("smoke", debug=True, overrides=overrides, quiet=True)
        assert train.submitted == 2 and not train.failed
        evaluation = submit_grid("smoke", stage="eval", debug=True, overrides=overrides, quiet=True)
        assert evaluation.submitted == 2 and not evaluation.failed
    finally:
        torch.set_num_threads(threads)
    rows = grid_status("smoke", overrides)
    assert [(r["state"], r["step"], r["checkpoint"], r["eval"]) for r in rows] == [("done", 4, 4, "2/2 measured")] * 2
    for cell in expand("smoke", overrides):
        evals = runfolder.read_eval_rows(cell.run_dir)
        assert ({(r["step"], r["metric"]) for r in evals}
                == {(s, m) for s in (2, 4) for m in launch_jobs.metric_names(cell.cfg)})
        assert all(r["n"] == 128 and r["sampling_steps"] == 2 for r in evals)  # the grid's eval overrides
    assert submit_grid("smoke", debug=True, overrides=overrides, quiet=True).submitted == 0
    assert submit_grid("smoke", stage="eval", debug=True, overrides=overrides, quiet=True).submitted == 0


def test_a_crashing_cell_does_not_stop_the_others(out):
    sub = submit_grid("smoke", debug=True, job_fn=crashing_train, overrides=out, quiet=True)
    assert sub.failed == ["latent_only"]  # the first job crashed, the second still ran
    rows = {r["cell"]: r for r in grid_status("smoke", out)}
    assert rows["redi"]["state"] == "done"
    failed = rows["latent_only"]
    assert failed["state"] == "failed" and "stand-in crash in the latent_only cell" in failed["detail"]
    assert Path(failed["log"]).is_file() and "ValueError" in Path(failed["log"]).read_text()
    text = launch.format_status("smoke", list(rows.values()))
    assert "latent_only: failed: ValueError: stand-in crash" in text and failed["log"] in text
    # The failed cell (only) is submitted again; it resumes from its checkpoint at step 2.
    retry = submit_grid("smoke", debug=True, job_fn=standin_train, overrides=out, quiet=True)
    assert [j["cell"] for j in retry.jobs] == ["latent_only"]
    assert (expand("smoke", out)[0].run_dir / "starts.log").read_text().split() == ["2"]


def _local_profile(tmp_path: Path, lanes: int, threads: int = 1) -> Path:
    """A copy of slurm/profiles/local.yaml with `lanes` jobs at a time, `threads` threads each."""
    import yaml

    data = yaml.safe_load((PROFILES_DIR / "local.yaml").read_text())
    folder = tmp_path / "profiles"
    folder.mkdir(exist_ok=True)
    (folder / "local.yaml").write_text(yaml.safe_dump({**data, "array_parallelism": lanes,
                                                       "cpus_per_task": threads}))
    return folder


def thread_count_train(cfg, run_dir):
    """Stand-in training that records the compute threads its job was given."""
    import torch

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "threads.txt").write_text(str(torch.get_num_threads()))
    (Path(run_dir) / "DONE").write_text("")
    return run_dir


def test_local_lanes_run_at_once_with_the_profile_s_threads(out, tmp_path):
    """Two lanes: one job each, each with cpus_per_task threads. 2, not the default 1: the suite
    already runs one thread per process (conftest.py), so 1 would pass without the setting."""
    profiles = _local_profile(tmp_path, 2, threads=2)
    sub = submit_grid("smoke", local=True, job_fn=thread_count_train, overrides=out, quiet=True,
                      profiles_dir=profiles)
    assert sub.submitted == 2 and sub.jobs[0]["job_id"] != sub.jobs[1]["job_id"]
    deadline = time.time() + 60
    while not all((Path(j["run_dir"]) / "threads.txt").is_file() for j in sub.jobs) and time.time() < deadline:
        time.sleep(0.5)
    assert [(Path(j["run_dir"]) / "threads.txt").read_text() for j in sub.jobs] == ["2", "2"]


def test_local_executor_runs_lanes_of_subprocesses_and_survives_a_crash(out, tmp_path):
    sub = submit_grid("smoke", local=True, job_fn=crashing_train, overrides=out, quiet=True,
                      profiles_dir=_local_profile(tmp_path, 1))
    assert sub.submitted == 2 and sub.jobs[0]["job_id"] == sub.jobs[1]["job_id"]  # one lane (parallelism 1)
    deadline = time.time() + 60
    while True:
        rows = {r["cell"]: r for r in grid_status("smoke", out)}
        if all(r["state"] in ("done", "failed") for r in rows.values()) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert rows["redi"]["state"] == "done"  # ran after the crashing cell, in the same lane
    assert rows["latent_only"]["state"] == "failed" and "stand-in crash" in rows["latent_only"]["detail"]
    assert Path(rows["latent_only"]["log"]).is_file()


# ----------------------------------------------------------------------------------------------
# Requeue: checkpoint() resubmits the same job, which resumes from the run folder


def test_trainjob_requeued_after_preemption_resumes_from_its_checkpoint(out, tmp_path):
    cell = expand("smoke", out)[0]
    job = TrainJob("smoke", cell.name, cell.cfg, str(cell.run_dir), preempted_once)
    assert isinstance(job, submitit.helpers.Checkpointable)
    with pytest.raises(SystemExit):
        job()
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is job
    delayed.dump(tmp_path / "requeued.pkl")  # what submitit writes before `scontrol requeue`
    resumed = submitit.helpers.DelayedSubmission.load(tmp_path / "requeued.pkl")
    resumed.result()
    assert (cell.run_dir / "starts.log").read_text().split() == ["0", "2"]  # restarted at step 2
    assert [r.get("outcome") for r in _records(cell) if r["event"] == "end"] == ["interrupted", "done"]
    assert (cell.run_dir / "DONE").is_file()


def _fake_slurm_bin(folder: Path, capture: Path) -> Path:
    """A fake `sbatch` (keeps the script, answers like sbatch) and a `squeue` that cannot reach its
    controller, first on PATH; the real srun stays (submitit only checks that it exists)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sbatch").write_text(f'#!/bin/sh\ncp "$1" "{capture}"\necho "Submitted batch job 4242"\n')
    (folder / "squeue").write_text("#!/bin/sh\necho 'squeue: error: Unable to contact slurm controller "
                                   "(connect failure)' >&2\nexit 1\n")
    (folder / "srun").write_text("#!/bin/sh\nexit 0\n")
    for name in ("sbatch", "squeue", "srun"):
        (folder / name).chmod(0o755)
    return folder


def test_slurm_submission_carries_the_profile_and_requeue_budget(out, tmp_path, monkeypatch, capsys):
    """What goes to sbatch, read from the script submitit writes: one array of both cells capped by
    array_parallelism, USR2 signal_delay_s before the limit, the profile's partition/account/qos/
    setup lines, time limit from the grid within the profile; and each pickled job carries the
    profile's max_num_timeout as submitit's requeue-after-timeout budget."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "site.yaml").write_text(
        "executor: slurm\npartition: part-a\naccount: acct-b\nqos: qos-c\ngpus_per_node: 0\ncpus_per_task: 3\n"
        "mem_gb: 7\ntime_min: 45\nsignal_delay_s: 77\nmax_num_timeout: 5\narray_parallelism: 1\n"
        "setup: ['echo SETUP-LINE-1']\n")
    script = tmp_path / "sbatch.sh"
    monkeypatch.setenv("PATH", f"{_fake_slurm_bin(tmp_path / 'bin', script)}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    sub = submit_grid("smoke", cluster="site", job_fn=standin_train, overrides=out, quiet=True,
                      profiles_dir=profiles)
    assert [j["job_id"] for j in sub.jobs] == ["4242_0", "4242_1"]
    text = script.read_text()
    for line in ("#SBATCH --array=0-1%1", "#SBATCH --signal=USR2@77", "#SBATCH --partition=part-a",
                 "#SBATCH --account=acct-b", "#SBATCH --qos=qos-c", "#SBATCH --cpus-per-task=3",
                 "#SBATCH --mem=7GB", "#SBATCH --time=45", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "echo SETUP-LINE-1"):
        assert line in text.splitlines(), (line, text)
    for job, cell in zip(sub.jobs, expand("smoke", out)):
        record = _records(cell)[0]
        assert record["job_id"] == job["job_id"] and record["executor"] == "slurm"
        pickled = Path(record["submitit_folder"].replace("4242_0", job["job_id"])) / f"{job['job_id']}_submitted.pkl"
        delayed = submitit.helpers.DelayedSubmission.load(pickled)
        assert isinstance(delayed.function, TrainJob) and delayed._timeout_countdown == 5
    # The scheduler cannot be reached: status says so per cell (unknown + why), in one line each,
    # and submitting again does not submit the cells a second time.
    rows = grid_status("smoke", out)
    assert {r["state"] for r in rows} == {"unknown"}
    assert all("Unable to contact slurm controller" in r["detail"] for r in rows)
    assert cli_main(["status", "smoke", *out]) == 0
    shown = capsys.readouterr().out
    assert "latent_only: unknown: squeue: error: Unable to contact slurm controller" in shown
    again = submit_grid("smoke", cluster="site", job_fn=standin_train, overrides=out, quiet=True,
                        profiles_dir=profiles)
    assert again.submitted == 0 and all(s["reason"].startswith("already unknown (job 4242_") for s in again.skipped)


DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _seen_environment(cfg, run_dir, steps=None, setting=None, task_index=None, num_tasks=None):
    return {**{k: os.environ.get(k) for k in DIST_KEYS}, "task_index": task_index, "num_tasks": num_tasks}


@pytest.mark.parametrize("rank", [0, 3])
def test_multi_task_jobs_get_their_distributed_environment_from_submitit(out, monkeypatch, rank):
    """Inside a 2-node, 4-task SLURM allocation (SLURM's variables as srun sets them), a TrainJob
    exports torch's env:// variables from submitit before training, an EvalJob splits its sample
    shards over the tasks, and only rank 0 writes the run folder's start/end records."""
    for key in DIST_KEYS:  # absent before the job (monkeypatch restores whatever was there)
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "9001", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_JOB_NODELIST": "gpu[17-18]", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 2),
             "SLURM_NODEID": str(rank // 2), "SLURM_NTASKS_PER_NODE": "2"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    cell = expand("smoke", out)[0]
    seen = TrainJob("smoke", cell.name, cell.cfg, str(cell.run_dir), _seen_environment)()
    assert {k: seen[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == \
        {"RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_RANK": str(rank % 2), "MASTER_ADDR": "gpu17"}
    assert int(seen["MASTER_PORT"]) > 1024
    for key in DIST_KEYS:  # the next job of this process starts clean again
        monkeypatch.delenv(key, raising=False)
    evaluated = launch_jobs.EvalJob("smoke", cell.name, cell.cfg, str(cell.run_dir), _seen_environment,
                               setting="default", steps=[2])()
    assert (evaluated["task_index"], evaluated["num_tasks"]) == (rank, 4)
    events = [r["event"] for r in _records(cell)]
    assert events == (["start", "end", "start", "end"] if rank == 0 else [])


# ----------------------------------------------------------------------------------------------
# Job states from records and the scheduler

SUBMIT = {"event": "submit", "stage": "train", "executor": "slurm", "job_id": "7_1", "lane": None}
START = {"event": "start", "stage": "train", "job_id": "7_1", "restarts": 0}


@pytest.mark.parametrize("events, scheduler, expected", [
    ([], "PENDING", ("queued", "", 0)),
    ([START], "PENDING", ("queued", "requeued", 0)),
    ([START, {**START, "restarts": 1}], "RUNNING", ("running", "", 1)),
    ([], "RUNNING", ("running", "", 0)),
    ([START, {"event": "end", "job_id": "7_1", "outcome": "done"}], None, ("done", "", 0)),
    ([START, {"event": "end", "job_id": "7_1", "outcome": "done"}], "RUNNING", ("done", "", 0)),  # lane
    ([START, {"event": "end", "job_id": "7_1", "outcome": "interrupted"}], "PENDING", ("queued", "requeued", 0)),
    ([START, {"event": "end", "job_id": "7_1", "outcome": "failed", "error": "E: x"}], "RUNNING",
     ("failed", "E: x", 0)),
    ([START], "UNKNOWN: Unable to contact slurm controller", ("unknown", "Unable to contact slurm controller", 0)),
    ([{**START, "job_id": "other"}], "PENDING", ("queued", "", 0)),  # events of another job are ignored
])
def test_job_state(events, scheduler, expected):
    states = {} if scheduler is None else {"7_1": scheduler}
    assert job_state(SUBMIT, events, states) == expected


def test_a_job_that_vanished_is_failed_with_the_error_from_its_log(tmp_path):
    log = tmp_path / "7_1_0_log.err"
    log.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory\n")
    state, detail, _ = job_state({**SUBMIT, "stderr": str(log)}, [START], {})
    assert state == "failed" and "RuntimeError: CUDA out of memory" in detail
    # How SLURM ended a job that recorded no outcome (squeue -t all lists ended jobs).
    state, detail, _ = job_state(SUBMIT, [START], {"7_1": "CANCELLED"})
    assert state == "cancelled" and "SLURM state CANCELLED" in detail
    state, detail, _ = job_state(SUBMIT, [START], {"7_1": "TIMEOUT"})
    assert state == "timeout" and "time limit" in detail
    state, detail, _ = job_state(SUBMIT, [START], {"7_1": "OUT_OF_MEMORY"})
    assert state == "failed" and "out of memory" in detail


def test_finished_work_that_slurm_records_as_failed_says_both():
    done = {"event": "end", "job_id": "7_1", "outcome": "done"}
    assert job_state(SUBMIT, [START, done], {"7_1": "COMPLETED"}) == ("done", "", 0)
    state, detail, _ = job_state(SUBMIT, [START, done], {"7_1": "FAILED"})
    assert state == "done" and "SLURM recorded the job as FAILED" in detail


def test_queued_or_running_cells_are_not_submitted_twice(out, monkeypatch):
    cell = expand("smoke", out)[1]
    launch.append_record(cell.run_dir, {**SUBMIT, "cell": cell.name})
    monkeypatch.setattr(launch_status, "_squeue", lambda ids: {"7_1": "RUNNING"})  # where scheduler_states looks
    sub = submit_grid("smoke", debug=True, job_fn=standin_train, overrides=out, quiet=True)
    assert [j["cell"] for j in sub.jobs] == ["latent_only"]
    assert sub.skipped == [{"cell": "redi", "reason": "already running (job 7_1)"}]
    assert {r["cell"]: r["state"] for r in grid_status("smoke", out)} == {"latent_only": "done", "redi": "running"}


# ----------------------------------------------------------------------------------------------
# Eval stage


def test_eval_stage_submits_only_missing_pairs(out):
    submit_grid("smoke", debug=True, job_fn=standin_train, overrides=out, quiet=True)
    first = expand("smoke", out)[0]
    # the names bench.evaluate.score_run records (e.g. fd_classifier, accuracy)
    names = launch_jobs.metric_names(first.cfg)
    standin_eval(first.cfg, first.run_dir, [2], "default")  # step 2 of the first cell is measured
    sub = submit_grid("smoke", stage="eval", debug=True, job_fn=standin_eval, overrides=out, quiet=True)
    assert [(j["cell"], j["setting"], j["steps"]) for j in sub.jobs] == \
        [("latent_only", "default", [4]), ("redi", "default", [2, 4])]
    rows = runfolder.read_eval_rows(first.run_dir)
    assert sorted((r["step"], r["metric"]) for r in rows) == sorted((s, m) for s in (2, 4) for m in names)
    status = grid_status("smoke", out)
    assert [r["eval"] for r in status] == ["2/2 measured", "2/2 measured"]
    assert status[0]["last_metric"].startswith(f"{names[-1]}=5 @4 (default)")
    again = submit_grid("smoke", stage="eval", debug=True, job_fn=standin_eval, overrides=out, quiet=True)
    assert again.submitted == 0 and {s["reason"] for s in again.skipped} == {"measured"}


def test_eval_waits_for_checkpoints(out):
    sub = submit_grid("smoke", stage="eval", debug=True, job_fn=standin_eval, overrides=out, quiet=True)
    assert sub.submitted == 0 and all(s["reason"].startswith("waiting for checkpoints") for s in sub.skipped)


# ----------------------------------------------------------------------------------------------
# Dry run and GPU-hours


def test_dry_run_prints_jobs_resources_and_gpu_hours(tmp_path, capsys):
    perf = tmp_path / "perf"
    perf.mkdir()
    row = {"kind": "train", "mode": "default", "spec": "redi", "model_size": "XL/2", "device": "cuda",
           "images_per_s": 40.0, "created_at": "2026-01-01T00:00:00"}
    cpu_row = {**row, "device": "cpu", "images_per_s": 1.0}
    (perf / "run.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(cpu_row) + "\n")
    sub = submit_grid("table1", cluster="example", dry_run=True, perf_dir=perf, overrides=[f"output_root={tmp_path}"])
    text = capsys.readouterr().out
    assert sub.submitted == 0 and not list(tmp_path.glob("table1/*"))  # nothing written
    assert "would submit 12 job(s)" in text and "1 node(s) x 8 GPU(s), 8 task(s)/node" in text
    assert sub.resources == {"nodes": 1, "gpus_per_node": 8, "tasks_per_node": 8, "cpus_per_task": 10,
                             "mem_gb": 480, "timeout_min": 1440}
    jobs = {j["cell"]: j for j in sub.jobs}
    assert all(name in text for name in jobs)
    # GPU-hours = steps x batch / (images/s per GPU) / 3600 (x GPUs / GPUs): written out by hand.
    expected = {"redi-sit_xl2": 4_000_000 * 256 / 40.0 / 3600,        # measured row (cuda)
                "latent_only-dit_xl2": 7_000_000 * 256 / 26.0 / 3600,  # the profile's XL/2 figure
                "redi-dit_l2": 400_000 * 256 / 38.0 / 3600}
    for name, gpu_h in expected.items():
        assert jobs[name]["gpu_h"] == pytest.approx(gpu_h, rel=1e-12)  # exact up to float rounding
        assert jobs[name]["wall_h"] == pytest.approx(gpu_h / 8, rel=1e-12)
    assert jobs["redi-sit_xl2"]["source"].startswith("measured")
    assert sub.estimate["gpu_h"] == pytest.approx(sum(j["gpu_h"] for j in sub.jobs), rel=1e-12)
    assert "GPU (GPUs x wall time)" in text


def test_dry_run_without_a_profile_uses_the_grids_request(capsys, out):
    sub = submit_grid("smoke", dry_run=True, overrides=out)
    assert sub.executor is None and sub.resources["gpus_per_node"] == 0 and len(sub.jobs) == 2
    assert "no job has a throughput figure" in capsys.readouterr().out


def test_only_submits_the_named_cells_of_what_the_stage_would_submit(out):
    cells = [job["cell"] for job in submit_grid("smoke", dry_run=True, overrides=out, quiet=True).jobs]
    sub = submit_grid("smoke", dry_run=True, overrides=out, quiet=True, only={(cells[1], None)})
    assert [job["cell"] for job in sub.jobs] == [cells[1]]
    assert submit_grid("smoke", dry_run=True, overrides=out, quiet=True, only={(cells[1], "default")}).jobs == []


# ----------------------------------------------------------------------------------------------
# Profiles, options, errors


def test_profiles_load_and_combine_with_grid_resources():
    example, local, cluster = load_profile("example"), load_profile("local"), load_profile("local-slurm")
    assert (example.executor, local.executor, cluster.executor) == ("slurm", "local", "slurm")
    assert min(example.max_num_timeout, local.max_num_timeout, cluster.max_num_timeout) >= 1
    table1 = load_grid("table1")
    assert job_resources(table1, local, "train")["gpus_per_node"] == 0  # the machine, not the grid
    with pytest.raises(ProfileError, match="asks for 8 GPUs per node but profile local-slurm has 0"):
        job_resources(table1, cluster, "train")
    smoke = job_resources(load_grid("smoke"), cluster, "train")
    assert smoke["timeout_min"] == 60 and smoke["tasks_per_node"] == 1


@pytest.mark.parametrize("text, message", [
    ("executor: slurm\npartitoin: gpu\n", r"unknown key\(s\) \['partitoin'\]; valid keys: \[.*'partition'"),
    ("executor: slurm\ngpus_per_node: '8'\n", "gpus_per_node must be int"),
    ("executor: slurm\nmax_num_timeout: 0\n", "max_num_timeout must be >= 1"),
    ("executor: pbs\n", "executor must be slurm or local"),
    ("- a list\n", "expected a mapping"),
])
def test_bad_profiles_fail_clearly(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ProfileError, match=message):
        load_profile("bad", tmp_path)


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(ProfileError, match="unknown cluster profile 'mars'.*example, local, local-slurm"):
        load_profile("mars")


def test_option_errors(out, monkeypatch, tmp_path):
    with pytest.raises(LaunchError, match="use --cluster PROFILE"):
        submit_grid("smoke", overrides=out)
    with pytest.raises(LaunchError, match="choose one of"):
        submit_grid("smoke", local=True, debug=True, overrides=out)
    with pytest.raises(LaunchError, match="stage 'test'"):
        submit_grid("smoke", stage="test", debug=True, overrides=out)
    with pytest.raises(GridError, match="unknown grid 'nope'"):
        submit_grid("nope", debug=True)
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "stopped" / "slurm.conf"))
    began = time.time()
    with pytest.raises(SchedulerError, match="SLURM_CONF=.*does not exist"):
        submit_grid("smoke", cluster="local-slurm", job_fn=standin_train, overrides=out, quiet=True)
    assert time.time() - began < 10  # no 60-second retry loop of the SLURM clients


@pytest.mark.parametrize("argv, message", [
    (["grid", "nope", "--debug"], "unknown grid 'nope'"),
    (["grid", "smoke", "--cluster", "mars"], "unknown cluster profile 'mars'"),
    (["status", "nope"], "unknown grid 'nope'"),
])
def test_cli_reports_errors_in_one_line(argv, message, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_grid_and_status(out, capsys):
    assert cli_main(["grid", "--list"]) == 0
    assert "mini_table1" in capsys.readouterr().out
    assert cli_main(["grid", "mini_table4", "--list", *out]) == 0  # NAME --list: the grid's cells
    text = capsys.readouterr().out
    for cell in expand("mini_table4", out):
        assert f"{cell.name}  {cell.run_dir}" in text
    assert "overrides: spec=redi_rg train.seed=1" in text and "settings: no_rg, rg1.5" in text
    assert "eval steps: [1000, 2000]" in text and not Path(out[0].split("=", 1)[1]).exists()
    assert cli_main(["grid", "smoke", *out, "--dry-run"]) == 0
    assert "would submit 2 job(s)" in capsys.readouterr().out
    assert cli_main(["grid", "smoke", "--dry-run", *out]) == 0  # overrides after the options too
    assert "would submit 2 job(s)" in capsys.readouterr().out
    assert cli_main(["status", "smoke", *out]) == 0
    text = capsys.readouterr().out
    assert "latent_only  not submitted" in text and "summary: 2 not submitted" in text


def test_dry_run_without_a_cluster_says_how_to_get_resources_and_costs(tmp_path, capsys):
    """No --cluster: the plan says so, names the profiles, and how a cost becomes known."""
    assert cli_main(["grid", "table1", "--dry-run", f"output_root={tmp_path}"]) == 0
    text = capsys.readouterr().out
    assert "to no executor (no --cluster given)" in text
    assert "add --cluster PROFILE (example, local, local-slurm)" in text and "`bench perf`" in text
    assert "estimate: unknown, no job has a throughput figure" in text and "0 h GPU" not in text


@pytest.mark.parametrize("root, fragment", [
    ("/dev/null/runs", "output_root=/dev/null/runs: /dev/null is not a folder"),
    ("/proc/redi-bench-runs", "output_root=/proc/redi-bench-runs: cannot write there"),
])
def test_unwritable_output_root_is_one_line_before_any_job(root, fragment, capsys):
    """Checked before submitting, one line, no traceback, nothing started."""
    assert cli_main(["grid", "smoke", "--local", f"output_root={root}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bench grid: error: {fragment}") and len(err.strip().splitlines()) == 1


def test_empty_output_root_is_refused(capsys):
    """An empty output_root= would write ./adhoc/ into the current folder."""
    assert cli_main(["grid", "smoke", "--dry-run", "output_root="]) == 2
    assert "output_root is empty" in capsys.readouterr().err


def test_output_piped_into_head_ends_quietly(tmp_path):
    """`bench grid ... | head`: the reader is gone before the output is written; no
    BrokenPipeError traceback, the status a shell gives a writer the pipe ended (141)."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "grid", "table1", "--dry-run",
                             f"output_root={tmp_path}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    proc.stdout.close()  # like `head` that has read what it wanted
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == "", err


def test_eval_work_units_count_what_follows_sampling():
    """The demo's evaluation jobs: nine cells scored unguided at two checkpoints, three redi_rg
    cells with RG at the last one only. Both kinds sample the same network evaluations (2 x 1
    pass, 1 x 2 passes), but each checkpoint also decodes and scores its samples, so the unguided
    jobs weigh more, the guided jobs are dealt last and split between the lanes (with equal
    weights all three went to one lane, which ran 1.5 min after the other)."""
    from types import SimpleNamespace

    from bench.compose import load_config
    from bench.launch.plan import FINISH_UNITS_PER_SAMPLE, PlannedJob, assign_lanes, work_units

    def job(rg_scale: float, steps: tuple[int, ...]) -> PlannedJob:
        cfg = load_config(["scale=embedded", "spec=redi_rg", "eval.num_samples=1000", "eval.num_sampling_steps=25",
                           f"eval.guidance.rg_scale={rg_scale}"])
        return PlannedJob(cell=None, run_dir=Path("."), job=SimpleNamespace(cfg=cfg), setting="s", steps=steps)

    plain, guided = job(1.0, (300, 600)), job(1.5, (600,))
    assert work_units(plain) == 2 * 1000 * (25 + FINISH_UNITS_PER_SAMPLE)
    assert work_units(guided) == 1000 * (2 * 25 + FINISH_UNITS_PER_SAMPLE) < work_units(plain)
    jobs = [plain] * 6 + [plain, guided] * 3  # latent only and REPA x 3 seeds, then ReDi's two settings
    lanes = assign_lanes([work_units(j) for j in jobs], 2)
    guided_at = {i for i, j in enumerate(jobs) if j is guided}
    assert 0 < len(guided_at & set(lanes[0])) < 3


def test_local_lanes_balance_the_work_longest_first():
    """The demo's evaluations: four cells with one setting and two redi_rg cells with a second,
    guided setting (twice the network evaluations). Round-robin put both guided jobs in one lane;
    longest-first to the least-loaded lane splits them."""
    from bench.launch.plan import assign_lanes

    costs = [2, 2, 2, 2, 2, 4, 2, 4]  # lo0, lo1, repa0, repa1, rg0 plain, rg0 RG, rg1 plain, rg1 RG
    lanes = assign_lanes(costs, 2)
    assert sorted(i for lane in lanes for i in lane) == list(range(8))
    assert [sum(costs[i] for i in lane) for lane in lanes] == [10, 10]
    assert {5, 7} & set(lanes[0]) and {5, 7} & set(lanes[1])  # one guided job per lane
    assert all(lane == sorted(lane) for lane in lanes)  # each lane keeps submission order
    assert assign_lanes([1.0], 4) == [[0]] and assign_lanes([], 2) == [[]]
