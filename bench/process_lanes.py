"""Lanes: work run side by side in spawned processes on this machine, each with its own threads.

Used where one command splits its work over the cores itself (prepare's VAE beside its classifier
and its encoding tasks, the demo's measurement of the machine); a grid's jobs get their lanes from
the local executor instead (`slurm/profiles/local.yaml`).

A lane process
- runs torch with `threads` compute threads (a spawned process starts with torch's default, one
  thread per core, and two such lanes on two cores would each try to use both);
- ends quietly on Ctrl-C: the terminal sends SIGINT to its whole process group, lanes included, and
  a traceback from each lane would bury the one line the command prints about the stop;
- ends when the process that started it dies (Linux: the parent-death signal), so a killed command
  leaves no lane computing in the background. Lanes write their files atomically, so a stop leaves
  at most temporaries, which the next run removes.
"""

from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context


def _end_quietly(signum, _frame) -> None:
    os._exit(128 + signum)


def _init_lane(threads: int, parent: int) -> None:
    signal.signal(signal.SIGINT, _end_quietly)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGINT), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(130)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def lane_pool(lanes: int, threads: int = 1) -> ProcessPoolExecutor:
    """A pool of `lanes` spawned lane processes with `threads` compute threads each."""
    return ProcessPoolExecutor(max_workers=lanes, mp_context=get_context("spawn"),
                               initializer=_init_lane, initargs=(threads, os.getpid()))


def start_lane(fn, *args, threads: int = 1):
    """`fn(*args)` in one lane process; returns its future (the process exits after it)."""
    pool = lane_pool(1, threads)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future
