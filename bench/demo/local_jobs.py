"""The demo's local jobs end with it: each starts in a process group of its own, which is ended
however the demo ends (Ctrl-C, SIGTERM, SIGHUP, a failing cell, an error) and, should the demo be
SIGKILLed, by the kernel (the parent-death signal of the job's controller). The jobs' controllers
write their stderr to a log, not to the user's terminal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

JOB_STOP_GRACE_S = 5.0  # SIGINT first (the job records `interrupted`), SIGKILL after this long


@contextlib.contextmanager
def children_stderr_to(log: Path):
    """Processes started inside get `log` as their stderr; this process keeps its own.

    The local executor starts one controller process per job (`submitit.local._local`) on the
    terminal's stderr. Ctrl-C reaches it with the rest of the terminal's process group and its
    KeyboardInterrupt traceback landed in the user's terminal after "bench demo: stopped"; its
    jobs already write their own logs. Popen inherits file descriptor 2 as it is at the fork, so
    pointing fd 2 at a log file while the jobs are submitted sends the controllers' output there.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(log, "ab") as handle:
            os.dup2(handle.fileno(), 2)
        yield log
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _parent_death_signal() -> Optional[Callable[[], None]]:
    """A preexec_fn that asks the kernel to send SIGINT to the child when this process dies (Linux
    prctl PR_SET_PDEATHSIG; None elsewhere). SIGINT, because submitit's local controller answers it by
    stopping its tasks (SIGINT, then SIGKILL) in a `finally`; SIGTERM it would only forward, and the
    tasks ignore SIGTERM."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: nothing is loaded after fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        # A demo started in the background (`nohup bench demo &`) runs with SIGINT ignored, which
        # the controller would inherit, and then neither this signal nor _end_groups' would stop it.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        prctl(1, int(signal.SIGINT), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the demo died between fork and prctl
            os.kill(os.getpid(), signal.SIGINT)
    return preexec


def _end_groups(groups: Sequence[int], grace_s: float = JOB_STOP_GRACE_S) -> None:
    """SIGINT every process group, SIGKILL what is left of them after `grace_s`."""
    def alive(group: int) -> bool:
        with contextlib.suppress(OSError):  # reap the controller if it has ended (it is our child)
            os.waitpid(group, os.WNOHANG)
        if Path("/proc/self/stat").is_file():  # zombies (ended, not reaped by init) do not count
            for stat in Path("/proc").glob("[0-9]*/stat"):
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
                    if fields[0] != "Z" and int(fields[2]) == group:
                        return True
            return False
        try:
            os.killpg(group, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    live = [g for g in groups if alive(g)]
    for group in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGINT)
    deadline = time.time() + grace_s
    while live and time.time() < deadline:
        time.sleep(0.1)
        live = [g for g in live if alive(g)]
    for group in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


@contextlib.contextmanager
def owned_local_jobs() -> Iterator[list[int]]:
    """Inside: every submitit local job starts in a new process group (its controller and tasks) with
    the parent-death signal set; SIGTERM and SIGHUP raise SystemExit. On leaving, however that
    happens, the groups are ended. Yields the list of group ids (the controllers' pids)."""
    from submitit.local import local as submitit_local

    groups: list[int] = []
    preexec = _parent_death_signal()
    original = submitit_local.start_controller

    def start_controller(*args, **kwargs):
        popen = subprocess.Popen

        class OwnedPopen(popen):  # type: ignore[misc,valid-type]
            def __init__(self, *a, **k):
                k["start_new_session"] = True  # the controller leads a group its tasks join
                if preexec is not None:
                    k["preexec_fn"] = preexec
                super().__init__(*a, **k)
                groups.append(self.pid)
        subprocess.Popen = OwnedPopen  # only while submitit starts this one controller
        try:
            return original(*args, **kwargs)
        finally:
            subprocess.Popen = popen

    def stop(signum, _frame) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    submitit_local.start_controller = start_controller
    try:
        yield groups
    finally:
        submitit_local.start_controller = original
        _end_groups(groups)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
