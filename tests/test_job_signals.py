"""A job whose work has finished ignores submitit's USR2 (slurm's time-limit warning / preemption
signal), so that it can neither be requeued nor killed while it exits.

Seen on a cluster: a training job logged "Job completed successfully" and recorded `end: done`, yet
SLURM recorded it FAILED with exit code 140 (128 + SIGUSR2): the USR2 arrived while the finished
process was shutting down, when Python had already restored the signal's default action (terminate).
Earlier in the exit, submitit's handler would instead checkpoint and requeue a finished job.

The test runs a real `TrainJob` under submitit's local executor (the same handler as on SLURM) whose
work registers an exit hook that sends USR2 to its own process and waits: with the fix the signal is
ignored, the job runs once and returns its result; without it, the handler requeues the job after
its work was done (a second `start` row in jobs.jsonl).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from bench.launch.jobs import JOBS_FILE, TrainJob, read_jsonl

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def finish_then_get_usr2(cfg, run_dir: Path) -> str:
    def late_signal() -> None:  # runs while the process exits, after the work returned
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(1.0)
    atexit.register(late_signal)
    return "trained"


@pytest.mark.timeout(120)
def test_usr2_after_the_work_finished_is_ignored(tmp_path):
    run_dir = tmp_path / "run"
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j", cluster="local")
    executor.update_parameters(timeout_min=2)
    job = executor.submit(TrainJob("grid", "cell", None, str(run_dir), finish_then_get_usr2))
    assert job.result() == "trained"
    rows = read_jsonl(run_dir / JOBS_FILE)
    assert [r["event"] for r in rows] == ["start", "end"] and rows[-1]["outcome"] == "done", rows
    log = job.paths.stderr.read_text() + job.paths.stdout.read_text()
    assert "Caught signal SIGUSR2" not in log and "Requeued" not in log, log[-2000:]
