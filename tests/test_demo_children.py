"""`bench demo` owns its local jobs: however the demo ends, they end (issue: a SIGTERM or SIGHUP to the
demo, or a failing cell, left the other background cells running).

A stand-in for the demo's work keeps this short: `bench.demo.run.main` runs as a real process, with
`run_demo` replaced by one that starts a local submitit job (the same executor `bench grid --local`
uses) whose task sleeps, writes its pid and the controller's pid to files, and then waits. The test
kills the demo in several ways and checks that the controller and the task are gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

STAND_IN = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    import submitit
    import bench.demo.run as demo

    folder = Path(sys.argv[1])
    mode = sys.argv[2]

    def sleeper(pid_file):
        Path(pid_file).write_text(f"{os.getpid()} {os.getppid()}")
        time.sleep(300)

    def run_demo(plan, printer):
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster="local")
        executor.update_parameters(timeout_min=10)
        executor.submit(sleeper, str(folder / "task.pid"))
        while not (folder / "task.pid").is_file():
            time.sleep(0.05)
        if mode == "fail":  # a failing cell
            raise demo.DemoError("training of cell x failed")
        print("ready", flush=True)
        time.sleep(300)

    demo.run_demo = run_demo
    sys.exit(demo.main(["--quick", "--no-progress", "--out", str(folder / "out")]))
''')


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; its parent (init here) reaps it


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, int, int]:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # A new session: the test's own process group never receives what the demo's children get.
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), mode], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not (tmp_path / "task.pid").is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the stand-in's job did not start"
        time.sleep(0.05)
    time.sleep(0.2)
    task, controller = (int(v) for v in (tmp_path / "task.pid").read_text().split())
    return proc, task, controller


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and prctl")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "SIGKILL", "failing cell"])
def test_the_demo_s_jobs_end_with_it(tmp_path, how):
    proc, task, controller = _start(tmp_path, "fail" if how == "failing cell" else "wait")
    try:
        if how != "failing cell":  # (a failing cell may already have ended the job by now)
            assert _alive(task) and _alive(controller)
            proc.stdout.readline()  # "ready": the demo is inside its work
            proc.send_signal(getattr(signal, how))
        proc.wait(timeout=30)
        # SIGINT to the job's group, SIGKILL 5 s later (JOB_STOP_GRACE_S); SIGKILL: the kernel's
        # parent-death signal makes the controller stop its task (SIGINT, SIGKILL after 1 s).
        left = _wait_gone([task, controller], 15)
        assert not left, f"{how}: still running after the demo ended: {left}"
        if how in ("SIGTERM", "SIGHUP"):
            assert proc.returncode == 128 + getattr(signal, how)
            assert "its jobs were stopped too" in proc.stderr.read()
        if how == "failing cell":
            assert proc.returncode != 0
    finally:
        for pid in (task, controller, proc.pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def quick_train(cfg, run_dir):
    """A stand-in for bench.train.loop.train: writes DONE."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "DONE").write_text("{}")
    return str(run_dir)


def test_jobs_started_inside_still_run_to_the_end(tmp_path):
    """The launcher's local executor works unchanged inside `owned_local_jobs` (new session, the
    parent-death signal): the cells finish and are reported done; leaving ends nothing that is left."""
    import cloudpickle

    from bench.demo.local_jobs import owned_local_jobs
    from bench.launch.submit import grid_status, submit_grid

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    overrides = [f"output_root={tmp_path}"]
    with owned_local_jobs() as groups:
        submit_grid("smoke", local=True, job_fn=quick_train, overrides=overrides, quiet=True)
        deadline = time.time() + 90
        while time.time() < deadline and not all(r["state"] == "done" for r in grid_status("smoke", overrides)):
            time.sleep(0.5)
        assert [r["state"] for r in grid_status("smoke", overrides)] == ["done", "done"]
        assert groups  # the controller was started through the owned path
    assert not [g for g in groups if _alive(g)]
