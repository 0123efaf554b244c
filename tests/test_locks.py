"""Locks where flock is refused (Lustre without -o flock, some NFS): the training lock and the JSONL
appends fall back to O_EXCL owner files with host, pid and heartbeat (bench.locks). The refusal is
injected: fcntl.flock raising OSError(ENOSYS), in this process and, through a sitecustomize module,
in `bench train` subprocesses."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_train import one_thread, prepared_dir, tiny_config  # noqa: F401

from bench import locks, runfolder
from bench.compose import dumps

REPO = Path(__file__).resolve().parents[1]
REFUSE = ("import errno, fcntl\n"
          "def _refused(*args):\n"
          "    raise OSError(errno.ENOSYS, 'Function not implemented')\n"
          "fcntl.flock = _refused\n")


@pytest.fixture()
def no_flock(monkeypatch):
    def refused(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", refused)
    monkeypatch.setattr(locks, "_warned", set())
    monkeypatch.delenv("REDI_BENCH_LOCKS", raising=False)


def _owner(run: Path) -> Path:
    return run / (runfolder.TRAIN_LOCK + locks.OWNER_SUFFIX)


def test_train_lock_falls_back_to_an_owner_file(no_flock, tmp_path, capsys):
    run = tmp_path / "run"
    with runfolder.train_lock(run):
        record = json.loads(_owner(run).read_text())
        assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
        assert time.time() - record["heartbeat"] < 60
        with pytest.raises(runfolder.RunFolderError, match=f"is being trained by pid {os.getpid()} on "):
            with runfolder.train_lock(run):
                pass
    assert not _owner(run).exists()  # released
    err = capsys.readouterr().err
    point, _ = locks.mount_of(run)
    assert err.count("flock is not supported") == 1 and f"on {point} (" in err and "ENOSYS" in err


def test_jsonl_appends_fall_back_and_leave_no_owner_file(no_flock, tmp_path):
    log = tmp_path / "metrics.jsonl"
    runfolder.append_jsonl(log, [{"step": 1}, {"step": 2}])
    assert runfolder.append_jsonl(log, [{"step": 2}, {"step": 3}], key=lambda r: r["step"]) == [{"step": 3}]
    assert runfolder.truncate_jsonl(log, lambda r: r["step"] <= 2) == 1
    assert [r["step"] for r in runfolder.read_jsonl(log)] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_the_heartbeat_is_refreshed_while_held(no_flock, tmp_path, monkeypatch):
    monkeypatch.setenv("REDI_BENCH_LOCK_HEARTBEAT", "0.05")
    with runfolder.train_lock(tmp_path):
        first = json.loads(_owner(tmp_path).read_text())["heartbeat"]
        time.sleep(0.4)
        assert json.loads(_owner(tmp_path).read_text())["heartbeat"] > first + 0.2


def _plant(owner: Path, host: str, pid: int, age: float) -> None:
    owner.write_text(json.dumps({"host": host, "pid": pid, "heartbeat": time.time() - age, "token": "x"}))


@pytest.mark.parametrize("host, pid, age, why", [
    ("this", 2 ** 22 + 12345, 0, "that process no longer runs"),  # above Linux's pid_max: never runs
    ("node-b", 1, 500, "its heartbeat is 500 s old (stale after 120 s)"),
])
def test_a_stale_owner_file_is_taken_over_with_a_message(no_flock, tmp_path, capsys, host, pid, age, why):
    _plant(_owner(tmp_path), socket.gethostname() if host == "this" else host, pid, age)
    with runfolder.train_lock(tmp_path):
        assert json.loads(_owner(tmp_path).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"taking over the stale lock {_owner(tmp_path)} of pid {pid} on " in err and why in err


def test_a_live_owner_on_another_node_is_respected(no_flock, tmp_path):
    _plant(_owner(tmp_path), "node-b", 4242, 5)
    with pytest.raises(runfolder.RunFolderError, match="is being trained by pid 4242 on node-b"):
        with runfolder.train_lock(tmp_path):
            pass
    assert json.loads(_owner(tmp_path).read_text())["host"] == "node-b"  # untouched


def test_flock_only_mode_is_one_error_naming_the_mount(no_flock, tmp_path, monkeypatch):
    monkeypatch.setenv("REDI_BENCH_LOCKS", "flock")
    point, kind = locks.mount_of(tmp_path)
    with pytest.raises(locks.LockError, match=f"flock is not supported on {point} \\({kind}; ENOSYS\\)"):
        with runfolder.train_lock(tmp_path):
            pass
    monkeypatch.setenv("REDI_BENCH_LOCKS", "sometimes")
    with pytest.raises(locks.LockError, match="REDI_BENCH_LOCKS='sometimes': choose one of auto, file, flock"):
        runfolder.append_jsonl(tmp_path / "x.jsonl", [{"a": 1}])


def test_other_flock_errors_are_not_hidden(monkeypatch, tmp_path):
    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error"):
        runfolder.append_jsonl(tmp_path / "x.jsonl", [{"a": 1}])


# ----------------------------------------------------------------------------------------------
# Processes


def _env(tmp_path: Path, **extra: str) -> dict:
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(REFUSE)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(inject), str(REPO)]))
    for key in ("REDI_BENCH_KILL_AT", "REDI_BENCH_LOCKS"):
        env.pop(key, None)
    return {**env, **extra}


COUNTER = """
import sys, time
from pathlib import Path
from bench.locks import exclusive
counter = Path(sys.argv[1])
for _ in range(40):
    with open(counter, "a+") as handle, exclusive(handle, counter):
        handle.seek(0)
        value = int(handle.read() or 0)
        time.sleep(0.002)  # widen the window a missing lock would lose an update in
        handle.seek(0)
        handle.truncate()
        handle.write(str(value + 1))
        handle.flush()
"""


def test_two_processes_exclude_each_other_through_owner_files(tmp_path):
    counter = tmp_path / "counter"
    env = _env(tmp_path)
    workers = [subprocess.Popen([sys.executable, "-c", COUNTER, str(counter)], env=env, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    errors = [w.communicate(timeout=120)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    assert "flock is not supported" in errors[0]  # the refusal was injected, the fallback used
    assert counter.read_text() == "80"  # no update lost: the two never held the lock at once
    assert not (tmp_path / "counter.owner").exists()


@pytest.mark.timeout(300)
def test_bench_train_without_flock_refuses_a_second_trainer_and_takes_over_a_killed_one(prepared_dir, tmp_path):
    from bench.atomic import KILL_ENV

    cfg = tiny_config(prepared_dir, tmp_path / "runs", "train.max_steps=4")
    config = tmp_path / "config.json"
    config.write_text(dumps(cfg))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "bench.cli", "train", "--config", str(config), "--run-dir", str(run)]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path, **{KILL_ENV: "train:step@2:STOP"}),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # stopped after step 2, holding the lock
        assert os.WIFSTOPPED(status), "the first trainer ended before it reached step 2"
        assert json.loads(_owner(run).read_text())["pid"] == first.pid
        second = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
        lines = [ln for ln in second.stderr.splitlines() if not ln.startswith("bench: flock is not supported")]
        assert second.returncode == 2 and len(lines) == 1, second.stderr  # one line, no traceback
        assert f"bench train: error: {run} is being trained by pid {first.pid} on " in lines[0]
    finally:
        os.kill(first.pid, signal.SIGKILL)  # its owner file stays behind: nothing releases it
        first.wait()
    assert _owner(run).exists()
    third = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert f"taking over the stale lock {_owner(run)} of pid {first.pid} on " in third.stderr
    assert "that process no longer runs" in third.stderr and "Traceback" not in third.stderr
    assert runfolder.logged_steps(run) == [1, 2, 3, 4] and not _owner(run).exists()
