"""The run folder: its file names, its JSONL logs, its checkpoint listing, its config and its lock.

One run lives in `results/runs/<grid>/<spec>-<hash>/` (`bench.run_hash.run_dir`):

    config.json                    CONFIG_FILE: the resolved config, written once by `bench train`
    DONE                           DONE_FILE: written after the checkpoint at train.max_steps
    metrics.jsonl                  METRICS_FILE: one row per training log tick (bench.metrics_log)
    eval.jsonl                     EVAL_FILE: one row per (step, metric, setting) (bench eval)
    jobs.jsonl                     JOBS_FILE: submit / start / end rows of the launcher
    checkpoints/<step:07d>/        CHECKPOINTS_DIR: one folder per checkpoint (bench.train.checkpoint)
    samples/<step:07d>/<hash>/     SAMPLES_DIR: sample shards of one sampling setting (bench sample)
    tensorboard/, wandb/           the optional sinks of train.log_to (bench.metrics_log)
    .train.lock                    TRAIN_LOCK: held by the one `bench train` working on the run
    .train.lock.owner              its stand-in where flock is refused (bench.locks)

JSONL policy (every reader and writer of the three logs goes through `read_jsonl` / `append_jsonl`):
a line counts once its newline is written. A last line without its newline is a torn append (a
writer killed mid-write): readers ignore it, and the next append cuts it off before writing, under
an exclusive lock on the file (bench.locks: flock, or an owner file `<log>.owner` where the file
system refuses flock), so concurrent appenders never cut each other's line. A line in the
middle that is not a JSON object was edited or corrupted by something else: reading it is an error
naming the file and the line. Blank lines are ignored.

Checkpoints: a checkpoint folder is written under a temporary name and renamed to its step number
when complete, so `list_checkpoints` lists the step-named folders; whether their files match their
checksums is `bench.train.checkpoint.verify_checkpoint`'s business (it needs no more than this
listing, but the loading side imports torch).

This module imports no torch: `bench status`, `bench report` and the launcher read run folders with it.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from bench.atomic import PathLike, atomic_write_text, crash_point
from bench.compose import from_dict  # Hydra/OmegaConf: loaded only by the readers that need a config
from bench.locks import exclusive
from bench.storage import writing

CONFIG_FILE = "config.json"
DONE_FILE = "DONE"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
JOBS_FILE = "jobs.jsonl"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
TRAIN_LOCK = ".train.lock"


class RunFolderError(ValueError):
    """A run folder is missing, busy or holds a file that is not what the harness wrote."""


# ----------------------------------------------------------------------------------------------
# JSONL


def _parse(path: Path, text: str) -> list[dict]:
    lines = text.split("\n")  # the last element is "" when the text ends with a newline
    complete, rows = lines[:-1], []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise RunFolderError(f"{path} line {number}: not valid JSON ({err}); this file is only ever "
                                 "appended to by the harness, so something else changed it: fix or "
                                 "delete that line") from None
        if not isinstance(row, dict):
            raise RunFolderError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows  # lines[-1] is "" or a torn append: ignored


def read_jsonl(path: PathLike) -> list[dict]:
    """The complete rows of a JSONL file ([] when it does not exist); see the module's policy."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # NotADirectory: a parent is a file (/dev/null/...)
        return []
    return _parse(path, text)


@contextmanager
def _locked_log(path: Path, read: bool) -> Iterator[Any]:
    """The file opened for appending, exclusively locked (bench.locks: flock, or an owner file
    where the file system refuses flock), its torn last line cut off; yields the handle and (when
    `read`, else b"") its complete lines as bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle, exclusive(handle, path):
        size = handle.seek(0, os.SEEK_END)
        if size:
            handle.seek(size - 1)
            torn = handle.read(1) != b"\n"
        else:
            torn = False
        data = b""
        if read or torn:  # a long log is read whole only when needed (after a kill: rarely)
            handle.seek(0)
            data = handle.read()
            data = data[: data.rfind(b"\n") + 1]
            if torn:  # the torn append of a killed writer
                handle.truncate(len(data))
        handle.seek(0, os.SEEK_END)
        yield handle, data if read else b""


def append_jsonl(path: PathLike, rows: Sequence[dict],
                 key: Optional[Callable[[dict], Any]] = None) -> list[dict]:
    """Append `rows` (one line each, keys in the given order) and fsync; returns the rows written.

    With `key`, rows whose key is already in the file (or earlier in `rows`) are skipped, decided
    under the same lock as the write: two processes adding the same row write it once.
    """
    path = Path(path)
    with writing(path), _locked_log(path, read=key is not None) as (handle, existing):
        if key is not None:
            seen = {key(row) for row in _parse(path, existing.decode("utf-8"))}
            fresh = []
            for row in rows:
                if key(row) not in seen:
                    seen.add(key(row))
                    fresh.append(row)
            rows = fresh
        if rows:
            data = "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")
            crash_point(f"append:{path.name}", lambda: _write_half(handle, data))
            _append_or_undo(handle.fileno(), data)
    return list(rows)


def _append_or_undo(fd: int, data: bytes) -> None:
    """Write `data` at the end of the file and fsync; when the storage refuses part of it (full,
    over quota), cut the file back to its old length so no torn line is left (best effort: a
    read-only file system refuses the cut too, and then the next append cuts it)."""
    start = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:  # os.write, not the buffered handle: nothing is left to flush at close
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass
        raise


def _write_half(handle, data: bytes) -> None:
    """What a writer killed mid-append leaves: the first half of its bytes (for the kill tests)."""
    handle.write(data[: len(data) // 2])
    handle.flush()
    os.fsync(handle.fileno())


def truncate_jsonl(path: PathLike, keep: Callable[[dict], bool]) -> int:
    """Cut the file before its first row for which `keep` is false (and cut a torn last line);
    returns the number of rows cut. A log is ordered, so this means "forget everything from that
    row on": one ftruncate, which a kill cannot leave half done."""
    path = Path(path)
    if not path.is_file():
        return 0
    with writing(path), _locked_log(path, read=True) as (handle, existing):
        _parse(path, existing.decode("utf-8"))  # a corrupted middle line is an error, not cut silently
        offset = 0
        for line in existing.split(b"\n")[:-1]:
            if line.strip() and not keep(json.loads(line)):
                handle.truncate(offset)
                handle.flush()
                os.fsync(handle.fileno())
                return len(_parse(path, existing[offset:].decode("utf-8")))
            offset += len(line) + 1
    return 0


# ----------------------------------------------------------------------------------------------
# Config, DONE, checkpoints, samples


def config_path(run_dir: PathLike) -> Path:
    return Path(run_dir) / CONFIG_FILE


def read_config_json(run_dir: PathLike) -> Optional[dict]:
    """config.json as plain JSON (None when the folder has none), for readers that need no typed
    config (`bench report` also reads folders written by older versions)."""
    path = config_path(run_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise RunFolderError(f"{path}: not valid JSON ({err}); it is written once by `bench train`, "
                             "so something else changed it") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_run_config(run_dir: PathLike):
    """The resolved `ExperimentConfig` that `bench train` saved in `run_dir/config.json`."""

    data = read_config_json(run_dir)
    if data is None:
        raise RunFolderError(f"{config_path(run_dir)} not found: {run_dir} is not a run folder written "
                             "by `bench train`")
    return from_dict(data)


def is_done(run_dir: PathLike) -> bool:
    return (Path(run_dir) / DONE_FILE).is_file()


def write_done(run_dir: PathLike, step: int, wall_time: float) -> None:
    """DONE holds the final step and the wall-clock time it was written (`time`)."""
    atomic_write_text(Path(run_dir) / DONE_FILE, json.dumps({"step": int(step), "time": wall_time}) + "\n")


def checkpoints_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def checkpoint_path(run_dir: PathLike, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"{int(step):07d}"


def list_checkpoints(run_dir: PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every step-named checkpoint folder, ascending (not verified)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((int(p.name), p) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def checkpoint_steps(run_dir: PathLike) -> list[int]:
    """The steps of `list_checkpoints`."""
    return [step for step, _ in list_checkpoints(run_dir)]


def samples_dir(run_dir: PathLike, step: int, setting_hash: str) -> Path:
    return Path(run_dir) / SAMPLES_DIR / f"{int(step):07d}" / setting_hash


# ----------------------------------------------------------------------------------------------
# Reading the logs


def logged_steps(run_dir: PathLike) -> list[int]:
    """The steps of metrics.jsonl's rows, in file order."""
    return [int(r["step"]) for r in read_jsonl(Path(run_dir) / METRICS_FILE)
            if isinstance(r.get("step"), (int, float))]


def last_logged_step(run_dir: PathLike) -> Optional[int]:
    """The last step logged in metrics.jsonl (None before the first log tick)."""
    steps = logged_steps(run_dir)
    return max(steps) if steps else None


def eval_key(row: dict) -> tuple[int, str, str]:
    """What makes an eval.jsonl row unique: (step, metric, setting)."""
    return int(row["step"]), str(row["metric"]), str(row.get("setting", "default"))


def read_eval_rows(run_dir: PathLike) -> list[dict]:
    return read_jsonl(Path(run_dir) / EVAL_FILE)


# ----------------------------------------------------------------------------------------------
# The training lock


@contextmanager
def train_lock(run_dir: PathLike) -> Iterator[None]:
    """Hold the run's training lock for the duration of the block, or raise RunFolderError at once.

    An exclusive, non-blocking flock on `.train.lock`: the kernel releases it when its holder
    exits or is killed, so a lock left by a dead process never blocks the next run. The lock file
    keeps the holder's pid and host for the error message; its presence alone means nothing.
    Where the file system refuses flock, `.train.lock.owner` holds the lock instead (bench.locks:
    host, pid and a heartbeat; a dead holder's file is taken over with a message).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / TRAIN_LOCK
    # Held on a read-only descriptor (flock needs no write access): no file of the run stays open
    # for writing between writes, so a file system can be remounted read-only under a running job.
    with open(os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)) as handle, ExitStack() as held:
        try:
            held.enter_context(exclusive(handle, path, blocking=False))
        except BlockingIOError as err:
            holder = getattr(err, "holder", None) or handle.read().strip() or "another process"
            raise RunFolderError(f"{run_dir} is being trained by {holder} (it holds {path}); wait for it "
                                 "to finish or stop it, then run the same command again to resume") from None
        path.write_text(f"pid {os.getpid()} on {os.uname().nodename}\n")
        yield

