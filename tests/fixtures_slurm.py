"""The local SLURM cluster (slurm/local-cluster.sh) as a module fixture, for the tests that submit
to it (test_slurm_integration.py, test_rehearse.py).

`cluster` yields the SLURM_CONF of a running cluster: the one in the default folder when CI or a
person started it (left running), otherwise its own copy in a temporary folder on free ports
(stopped afterwards). Without root, slurm-wlm or munge it skips with the reason, except under
REDI_BENCH_CI=1 (.ci/run installs them), where a missing cluster is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "local-cluster.sh"
BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "scancel", "srun")


def why_skip() -> str | None:
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return f"SLURM/munge binaries absent ({', '.join(missing)}); apt-get install -y slurm-wlm munge"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd starts jobs as their user)"
    return None


def skip_without_cluster() -> None:
    reason = why_skip()
    if reason and os.environ.get("REDI_BENCH_CI"):
        pytest.fail(f"REDI_BENCH_CI=1 but {reason}")
    if reason:
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(action: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """SLURM_CONF of a running local cluster; stops it afterwards only if this fixture started it."""
    skip_without_cluster()
    env = dict(os.environ)
    running = run_script("status", env)  # the default folder: a cluster started by CI or by hand
    started = None
    if running.returncode != 0:
        env.update(LOCAL_SLURM_DIR=str(tmp_path_factory.mktemp("slurm")),
                   LOCAL_SLURM_CTLD_PORT=str(free_port()), LOCAL_SLURM_D_PORT=str(free_port()))
        started = run_script("start", env)
        assert started.returncode == 0, f"local-cluster.sh start failed:\n{started.stderr}"
        running = started
    conf = re.search(r"export SLURM_CONF=(\S+)", running.stdout).group(1)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if started is not None:
            stopped = run_script("stop", env)
            assert stopped.returncode == 0, stopped.stderr
