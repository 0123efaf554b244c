"""Exclusive locks on run-folder files that also work where `flock` does not.

`exclusive(handle, path)` takes an flock on the open file, as before; the kernel releases it when
its holder dies however it dies. Some cluster file systems refuse flock (Lustre mounted without
`flock`, some NFS setups: ENOSYS, ENOLCK, EOPNOTSUPP). There the lock is an owner file beside the
locked one, `<file>.owner`, created with O_EXCL (atomic on Lustre and NFSv3+), holding the
holder's host, pid and a heartbeat timestamp that a thread refreshes every HEARTBEAT_S seconds
while the lock is held. An owner file is stale, and is taken over with a message saying whose it
was, when its heartbeat is older than STALE_S, or when it names this host and a pid that no longer
runs (a holder killed with SIGKILL leaves its file behind; nothing else would remove it).

REDI_BENCH_LOCKS chooses: `auto` (the default: flock, owner files where flock is refused), `file`
(owner files always: for NFS mounted with `local_lock=flock`, where flock succeeds but locks one
node only) or `flock` (flock or one LockError naming the mount point). REDI_BENCH_LOCK_HEARTBEAT
and REDI_BENCH_LOCK_STALE set the two intervals in seconds (default 15 and 120); nodes' clocks
must agree to well within STALE_S, as NTP keeps them.

Torch-free: the run folder's readers and writers import it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Optional

UNSUPPORTED = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})
MODES = ("auto", "file", "flock")
OWNER_SUFFIX = ".owner"
POLL_S = 0.05  # how often a blocked writer looks at an owner file again
_warned: set[str] = set()  # mount points whose fallback this process has announced


class LockError(ValueError):
    """A lock cannot be taken on this file system (REDI_BENCH_LOCKS=flock where flock is refused)."""


class LockBusy(BlockingIOError):
    """A non-blocking lock is held by someone else; `holder` says who (None: read the file)."""

    def __init__(self, holder: Optional[str] = None) -> None:
        super().__init__(errno.EWOULDBLOCK, "lock held")
        self.holder = holder


def _setting(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    try:
        return float(value) if value else default
    except ValueError:
        raise LockError(f"{name}={value!r} is not a number of seconds") from None


def mode() -> str:
    chosen = os.environ.get("REDI_BENCH_LOCKS", "auto") or "auto"
    if chosen not in MODES:
        raise LockError(f"REDI_BENCH_LOCKS={chosen!r}: choose one of {', '.join(MODES)}")
    return chosen


def mount_of(path: Path) -> tuple[str, str]:
    """(mount point, file system type) of the mount holding `path` (from /proc/self/mounts)."""
    target, best = str(Path(path).resolve()), ("/", "unknown")
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fields[2])
    return best


def _refused(path: Path, err: OSError) -> None:
    """flock is refused on `path`'s mount: a LockError in `flock` mode, else one note per mount."""
    point, kind = mount_of(path.parent)
    why = f"flock is not supported on {point} ({kind}; {errno.errorcode.get(err.errno, err.errno)})"
    if mode() == "flock":
        raise LockError(f"{why}, and REDI_BENCH_LOCKS=flock allows no other lock: mount {point} with "
                        "flock (Lustre: -o flock) or set REDI_BENCH_LOCKS=auto to use owner files") from None
    if point not in _warned:
        _warned.add(point)
        print(f"bench: {why}: locking with owner files (host, pid, heartbeat) there instead",
              file=sys.stderr, flush=True)


@contextmanager
def exclusive(handle: IO, path: Path, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the open file `handle` (at `path`) for the block. Non-blocking:
    LockBusy at once when another process holds it."""
    path = Path(path)
    if mode() != "file":
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockBusy() from None
        except OSError as err:
            if err.errno not in UNSUPPORTED:
                raise
            _refused(path, err)
        else:
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return
    owner = OwnerFile(path.with_name(path.name + OWNER_SUFFIX))
    owner.acquire(blocking)
    try:
        yield
    finally:
        owner.release()


class OwnerFile:
    """The O_EXCL owner file that stands in for flock (the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.heartbeat_s = _setting("REDI_BENCH_LOCK_HEARTBEAT", 15.0)
        self.stale_s = _setting("REDI_BENCH_LOCK_STALE", 120.0)
        self.token = uuid.uuid4().hex
        self.fd: Optional[int] = None
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    def _record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(),
                           "token": self.token}).encode().ljust(256) + b"\n"  # fixed length: one pwrite

    def acquire(self, blocking: bool) -> None:
        while True:
            try:
                self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                holder = read_owner(self.path)
                stale = self.stale_reason(holder)
                if stale:
                    self._take_over(holder, stale)
                    continue
                if not blocking:
                    raise LockBusy(describe(holder)) from None
                time.sleep(POLL_S)
                continue
            os.pwrite(self.fd, self._record(), 0)
            os.fsync(self.fd)
            self._beat = threading.Thread(target=self._heartbeat, name=f"lock {self.path.name}", daemon=True)
            self._beat.start()
            return

    def _heartbeat(self) -> None:
        # Writes go to this process's own open file: if the lock was taken over meanwhile (this
        # process looked dead), they land in the unlinked file and never touch the new owner's.
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.pwrite(self.fd, self._record(), 0)
            except OSError:
                return

    def stale_reason(self, holder: Optional[dict]) -> str:
        """Why the owner file `holder` is stale ("" while it is live; a file being written is live)."""
        if holder is None:  # being written, or its writer died between creating and writing it
            age = time.time() - _mtime(self.path)
            return f"it is empty and {age:.0f} s old" if age > self.stale_s else ""
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_s:
            return f"its heartbeat is {age:.0f} s old (stale after {self.stale_s:g} s)"
        if holder.get("host") == socket.gethostname() and not _pid_runs(int(holder.get("pid", 0))):
            return "that process no longer runs"
        return ""

    def _take_over(self, holder: dict, why: str) -> None:
        """Remove a stale owner file, once: a second owner file `<owner>.takeover` (O_EXCL) lets one
        contender do it; the owner file is re-read under it, so a fresh one is never removed."""
        claim = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if time.time() - _mtime(claim) > self.stale_s:  # a contender died while taking over
                claim.unlink(missing_ok=True)
            time.sleep(POLL_S)
            return
        try:
            if read_owner(self.path) == holder:
                self.path.unlink(missing_ok=True)
                print(f"bench: taking over the stale lock {self.path} of {describe(holder)}: {why}",
                      file=sys.stderr, flush=True)
        finally:
            os.close(fd)
            claim.unlink(missing_ok=True)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.fd is None:
            return
        try:
            mine = os.fstat(self.fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            mine = False
        os.close(self.fd)
        self.fd = None
        if mine:
            self.path.unlink(missing_ok=True)
        else:
            print(f"bench: the lock {self.path} was taken over while this process held it (it looked "
                  "stale: was the process suspended?)", file=sys.stderr, flush=True)


def read_owner(path: Path) -> Optional[dict]:
    """An owner file's record; None while it is being written (empty or torn) or gone."""
    try:
        record = json.loads(Path(path).read_bytes().strip() or b"null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None  # a damaged file holds no owner


def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')}"


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return pid > 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()
