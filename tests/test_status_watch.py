"""`bench status` for jobs you watch: step, images/s and ETA per cell from metrics.jsonl; ended
jobs' states and exit codes from `sacct` where the cluster has accounting, from `squeue` where it has
none (sacct missing or "Slurm accounting storage is disabled", as on the suite's local cluster).

The sacct answers below are written in sacct's `-n -P -X -o JobID,State,ExitCode` format (no
cluster with accounting is at hand here); the local-cluster test at the end asks the real one."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from bench.cli import main as cli_main
from bench.launch import status as launch_status
from bench.launch.grids import expand
from bench.launch.jobs import append_record
from bench.runfolder import METRICS_FILE, append_jsonl

SUBMIT = {"event": "submit", "stage": "train", "executor": "slurm", "lane": None}
# What sacct prints for the jobs of an array whose tasks ended in every way SLURM ends a job.
SACCT_ANSWER = """4242_0|OUT_OF_MEMORY|0:125
4242_1|NODE_FAIL|0:0
4242_2|TIMEOUT|0:0
4242_3|CANCELLED by 1000|0:15
4242_4|FAILED|1:0
4242_5|COMPLETED|0:0
"""


def _bin(folder: Path, squeue: str, sacct: str | None) -> str:
    """A PATH holding only a fake `squeue` printing `squeue` and, unless None, a fake `sacct` whose
    script body is `sacct` (shell built-ins only); each logs its arguments to <folder>/calls."""
    folder.mkdir(parents=True, exist_ok=True)
    scripts = {"squeue": _printing(squeue)}
    if sacct is not None:
        scripts["sacct"] = sacct
    for name, body in scripts.items():
        (folder / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{folder}/calls"\n{body}')
        (folder / name).chmod(0o755)
    return str(folder)


def _printing(text: str) -> str:
    return "".join(f"echo '{line}'\n" for line in text.splitlines())


def _states(monkeypatch, tmp_path, ids, squeue="", sacct=None) -> dict:
    monkeypatch.setenv("PATH", _bin(tmp_path / "bin", squeue, sacct))
    submits = [{**SUBMIT, "job_id": j} for j in ids]
    return launch_status.scheduler_states(submits)


def test_ended_jobs_are_told_by_sacct_with_their_exit_codes(monkeypatch, tmp_path):
    ids = [f"4242_{i}" for i in range(6)]
    # Gone from squeue (ended longer than MinJobAge ago): only accounting knows how they ended.
    states = _states(monkeypatch, tmp_path, ids, squeue="", sacct=_printing(SACCT_ANSWER))
    start = {"event": "start", "stage": "train", "restarts": 0}
    shown = {j: launch_status.job_state({**SUBMIT, "job_id": j}, [{**start, "job_id": j}], states)[:2] for j in ids}
    assert shown["4242_0"] == ("failed", "job ran out of memory (raise mem_gb) (SLURM state OUT_OF_MEMORY, "
                                         "exit code 0:125)")
    assert shown["4242_1"] == ("failed", "job its node failed (SLURM state NODE_FAIL, exit code 0:0)")
    assert shown["4242_2"][0] == "timeout" and "exit code 0:0" in shown["4242_2"][1]
    assert shown["4242_3"][0] == "cancelled" and "(SLURM state CANCELLED, exit code 0:15)" in shown["4242_3"][1]
    assert shown["4242_4"][0] == "failed" and shown["4242_4"][1].startswith(
        "job ended as FAILED, exit code 1:0 without reporting an outcome")
    calls = (tmp_path / "bin" / "calls").read_text().splitlines()
    assert f"sacct -n -P -X -j {','.join(ids)} -o JobID,State,ExitCode" in calls


def test_sacct_is_not_asked_about_queued_or_running_jobs(monkeypatch, tmp_path):
    states = _states(monkeypatch, tmp_path, ["5_0", "5_1"], squeue="5_0 RUNNING\n5_1 PENDING\n",
                     sacct="echo '5_0|FAILED|1:0'\n")
    assert states == {"5_0": "RUNNING", "5_1": "PENDING"}
    assert not any(c.startswith("sacct") for c in (tmp_path / "bin" / "calls").read_text().splitlines())


@pytest.mark.parametrize("sacct", [
    None,  # not installed
    "echo 'Slurm accounting storage is disabled' >&2\nexit 1\n",  # what the suite's local cluster says
    "echo 'sacct: error: Problem talking to the database: Connection refused' >&2\nexit 1\n",
])
def test_without_accounting_squeues_answer_stands(monkeypatch, tmp_path, sacct):
    states = _states(monkeypatch, tmp_path, ["6_0", "6_1"], squeue="6_0 TIMEOUT\n", sacct=sacct)
    assert states == {"6_0": "TIMEOUT"}  # 6_1: gone from squeue too, so only its records tell
    assert launch_status.job_state({**SUBMIT, "job_id": "6_0"}, [], states)[0] == "timeout"
    state, detail, _ = launch_status.job_state({**SUBMIT, "job_id": "6_1"}, [], states)
    assert state == "failed" and detail.startswith("job ended without reporting an outcome")


def test_status_shows_step_images_per_second_and_eta(monkeypatch, tmp_path, capsys):
    out = [f"output_root={tmp_path / 'runs'}"]
    cells = expand("smoke", out)
    batch, total = cells[0].cfg.train.batch_size, cells[0].cfg.train.max_steps
    for index, cell in enumerate(cells):
        append_record(cell.run_dir, {**SUBMIT, "cell": cell.name, "job_id": f"9_{index}"})
        append_record(cell.run_dir, {"event": "start", "stage": "train", "job_id": f"9_{index}", "restarts": 0})
    rate = 2.0 * batch  # 2 steps/s: the ETA is (total - step) / 2 seconds
    step = total // 2
    append_jsonl(cells[0].run_dir / METRICS_FILE, [{"step": step - 1, "loss": 1.0, "images_per_s": 1.0},
                                                   {"step": step, "loss": 0.9, "images_per_s": rate}])
    append_jsonl(cells[1].run_dir / METRICS_FILE, [{"step": 1, "loss": 1.0, "images_per_s": rate}])
    monkeypatch.setenv("PATH", _bin(tmp_path / "bin", "9_0 RUNNING\n", "echo '9_1|OUT_OF_MEMORY|0:125'\n"))
    rows = {r["cell"]: r for r in launch_status.grid_status("smoke", out)}
    first, second = rows[cells[0].name], rows[cells[1].name]
    assert (first["state"], first["step"], first["images_per_s"]) == ("running", step, rate)
    assert first["eta_s"] == pytest.approx((total - step) / 2.0)
    assert second["state"] == "failed" and "SLURM state OUT_OF_MEMORY, exit code 0:125" in second["detail"]
    assert cli_main(["status", "smoke", *out]) == 0
    shown = capsys.readouterr().out.splitlines()
    header = next(line for line in shown if line.startswith("cell "))
    assert header.split() == ["cell", "state", "step", "img/s", "eta", "eval", "last", "metric", "job"]
    eta = launch_status.format_duration((total - step) / 2.0)
    running = next(line for line in shown if line.startswith(cells[0].name + " "))
    assert f" {step}/{total} " in running and f" {rate:.1f} " in running and f" {eta} " in running
    failed = next(line for line in shown if line.startswith(cells[1].name + " "))
    assert f" 1/{total} " in failed and " - " in failed  # a failed job has no ETA


# ----------------------------------------------------------------------------------------------
# The suite's local SLURM cluster (no accounting daemon)

@pytest.fixture()
def local_cluster(tmp_path):
    """SLURM_CONF of the local cluster: the default one if it runs, else one started here and
    stopped afterwards."""
    import re

    from fixtures_slurm import free_port as _free_port
    from fixtures_slurm import run_script as _script
    from fixtures_slurm import why_skip as _why_skip

    reason = _why_skip()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ)
    running, started = _script("status", env), False
    if running.returncode != 0:
        # A short folder of its own: under pytest-xdist, tmp_path makes slurmstepd's socket paths
        # longer than the 107 characters Linux allows.
        env.update(LOCAL_SLURM_DIR=tempfile.mkdtemp(prefix="slurm-", dir="/tmp"),
                   LOCAL_SLURM_CTLD_PORT=str(_free_port()),
                   LOCAL_SLURM_D_PORT=str(_free_port()))
        running, started = _script("start", env), True
        assert running.returncode == 0, running.stderr
    try:
        yield re.search(r"export SLURM_CONF=(\S+)", running.stdout).group(1)
    finally:
        if started:
            assert _script("stop", env).returncode == 0
            shutil.rmtree(env["LOCAL_SLURM_DIR"], ignore_errors=True)


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_on_the_local_cluster_sacct_falls_back_to_squeue(local_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", local_cluster)
    job = subprocess.run(["sbatch", "--parsable", "-o", str(tmp_path / "job.out"), "--wrap", "exit 3"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    submit = {**SUBMIT, "job_id": job}
    deadline = time.monotonic() + 120
    while (states := launch_status.scheduler_states([submit])).get(job) in launch_status.QUEUED | launch_status.RUNNING:
        assert time.monotonic() < deadline, states
        time.sleep(0.5)
    answer = subprocess.run(["sacct", "-n", "-j", job], capture_output=True, text=True, timeout=60)
    assert answer.returncode != 0 and "accounting storage is disabled" in answer.stderr  # no accounting here
    assert launch_status._sacct({job}) == {}
    assert states == {job: "FAILED"}  # squeue -t all, within MinJobAge
    state, detail, _ = launch_status.job_state(submit, [], states)
    assert state == "failed" and detail.startswith("job ended as FAILED without reporting an outcome")
