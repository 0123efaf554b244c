"""Storage faults as one clear error, and the free-space preflight (torch-free).

A shared cluster's disks fill up, run into a quota, turn read-only (a storage fault, a remount) or
lose a folder while a job writes into it (a clean-up script, a colleague's `rm -r`). Every write
of the harness goes through `writing(path, ...)` (bench.atomic, the JSONL appender, checkpoints),
which turns such an OSError -- or safetensors' SafetensorError wrapping one, which carries only
the text "... (os error 28)" -- into a `StorageError`: a ValueError defined in bench/, so the CLI
prints it as one line and exits non-zero. The message names the path, what happened and what to
do; the writers leave nothing half-written under a finished name (temporaries are removed, never
renamed into place), so the same command, re-run once the fault is fixed, resumes exactly.

A folder removed mid-run would otherwise be re-created silently by the next write (every writer
creates its parents), leaving a run folder without its config and early logs. A command that owns
a folder wraps its work in `guard(folder)`: every write under it first checks that the folder is
still there and the one it started with (same device and inode: a folder re-made under the same
name may get the old inode back, and then passes), one `stat` per write.

The preflight (`preflight_warning`) compares the free space of the output folder's file system
with what a planned run writes: its checkpoints (model, EMA and AdamW's two moments, float32,
times the checkpoints kept at once) and, for a grid's evaluation, its sample shards.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from models.settings import MODEL_SIZES, split_model_size

PathLike = Union[str, os.PathLike]
MB = 1 << 20
VANISHED = (errno.ENOENT, errno.ESTALE)
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, *VANISHED)
# A checkpoint stores four float32 copies of the parameters: the model, its EMA and AdamW's two
# moments (bench.train.checkpoint); the RNG states, the optimizer's JSON and the safetensors headers
# add some 20-40 kB.
CHECKPOINT_COPIES = 4
CHECKPOINT_OVERHEAD = 64 * 1024
_guarded: dict[str, Optional[tuple[int, int]]] = {}  # folder -> (device, inode), None: not made yet


class StorageError(ValueError):
    """A write failed because of the storage (full, over quota, read-only, folder removed)."""

    def __init__(self, message: str, path: PathLike, errno_: int) -> None:
        super().__init__(message)
        self.path, self.errno = str(path), errno_


def error_number(err: BaseException) -> Optional[int]:
    """The errno behind `err`: an OSError's, a StorageError's (an outer writer re-words it with what
    it knows: the whole checkpoint's size, say), or the `(os error N)` of safetensors' SafetensorError."""
    if isinstance(err, (OSError, StorageError)):
        return err.errno
    if type(err).__name__ == "SafetensorError":
        found = re.search(r"\(os error (\d+)\)", str(err))
        return int(found.group(1)) if found else None
    return None


def free_bytes(path: PathLike) -> Optional[int]:
    """Bytes an unprivileged writer may still use on the file system holding `path` (or its nearest
    existing parent); None when nothing of it exists or statvfs fails."""
    for folder in (Path(path), *Path(path).absolute().parents):
        try:
            stat = os.statvfs(folder)
        except OSError:
            continue
        return stat.f_bavail * stat.f_frsize
    return None


def _mb(count: float) -> str:
    return f"{count / MB:.1f} MB" if count < 10 * MB else f"{count / MB:.0f} MB"


def _owner(path: Path) -> Path:
    """The guarded folder holding `path` (the run or prepared folder), else its parent folder."""
    text = os.path.abspath(path)
    owners = [f for f in _guarded if text == f or text.startswith(f.rstrip("/") + "/")]
    return Path(max(owners, key=len)) if owners else Path(text).parent


def _removed_folder(path: Path) -> Optional[Path]:
    """The folder above `path` that is gone (a guarded one first, else the highest missing parent);
    None when `path`'s folder exists, i.e. the ENOENT was about something else."""
    text = os.path.abspath(path)
    for folder, identity in sorted(_guarded.items(), key=lambda item: len(item[0])):
        if identity is not None and text.startswith(folder.rstrip("/") + "/") and _identity(folder) != identity:
            return Path(folder)
    missing = [p for p in Path(text).parents if not p.exists()]
    return missing[-1] if missing else None


def _identity(folder: str) -> Optional[tuple[int, int]]:
    try:
        stat = os.stat(folder)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


# ----------------------------------------------------------------------------------------------
# Classifying a failed write


def storage_error(err: BaseException, path: PathLike, needed: Optional[int] = None,
                  what: str = "the file") -> Optional[StorageError]:
    """The StorageError that `err` (raised while writing `path`) stands for, or None when it is
    not a storage fault (a missing input file, a bug): those keep their own error."""
    number, path = error_number(err), Path(path)
    owner = _owner(path)
    again = "then run the same command again: it resumes from the last complete file it wrote"
    if number == errno.ENOSPC:
        free = free_bytes(path)
        room = f"{_mb(free)} free" if free is not None else "no free space"
        need = f", {what} needs about {_mb(needed)}" if needed else ""
        return StorageError(f"no space left on the device holding {path}: {room}{need}. Free space there, "
                            f"or copy {owner} to a disk with room and point the command at the copy; "
                            f"{again}", path, number)
    if number == errno.EDQUOT:
        need = f" ({what} needs about {_mb(needed)})" if needed else ""
        return StorageError(f"disk quota exceeded on the file system holding {path}{need}. Free space within "
                            f"your quota (`quota -s` or your cluster's tool shows it) or copy {owner} to a "
                            f"file system with quota left and point the command at the copy; {again}",
                            path, number)
    if number == errno.EROFS:
        return StorageError(f"the file system holding {path} is read-only (a storage fault or a remount). "
                            f"Once it is writable again, or with {owner} copied to a writable disk and the "
                            f"command pointed at the copy, {again}", path, number)
    if number in VANISHED:
        removed = _removed_folder(path)
        if removed is None and number == errno.ENOENT:
            return None
        return vanished_error(removed or path.parent, path, number)
    return None


def vanished_error(folder: Path, path: PathLike, number: int = errno.ENOENT) -> StorageError:
    stale = " (a stale NFS handle)" if number == errno.ESTALE else ""
    return StorageError(f"the folder {folder} was removed while the command was writing into it{stale} "
                        f"(writing {path}); nothing more is written there. Restore it, or point the "
                        "command at a copy, and run the same command again: it resumes from what the "
                        "folder holds (from the start, if nothing)", path, number)


def as_storage_error(err: BaseException, where: PathLike = "the output folder") -> Optional[StorageError]:
    """`err` as a StorageError when it is one or a storage fault that reached the top without passing
    a `writing` block (a library's own file, a folder made up front): a full disk, a quota, a
    read-only file system or a stale handle, at the OSError's file name (else `where`); else None."""
    if isinstance(err, StorageError):
        return err
    if error_number(err) not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ESTALE):
        return None  # a plain ENOENT without a known path is a missing input, not a vanished folder
    return storage_error(err, getattr(err, "filename", None) or where)


@contextmanager
def writing(path: PathLike, needed: Optional[int] = None, what: str = "the file") -> Iterator[None]:
    """Turn a storage fault raised in the block (which writes `path`, about `needed` bytes) into
    a StorageError; first check that no guarded folder above `path` has vanished."""
    check_guarded(path)
    try:
        yield
    except Exception as err:
        fault = storage_error(err, path, needed, what)
        if fault is None:
            raise
        raise fault from None


@contextmanager
def guard(folder: PathLike) -> Iterator[None]:
    """While the block runs, a write under `folder` fails with a StorageError once `folder` is
    removed (or replaced by a folder with another inode), instead of re-creating it empty. A
    folder that does not exist yet is watched from the first write that finds it."""
    key = os.path.abspath(folder)
    previous = _guarded.get(key, False)
    _guarded[key] = _identity(key)
    try:
        yield
    finally:
        if previous is not False:
            _guarded[key] = previous
        else:
            _guarded.pop(key, None)


def check_guarded(path: PathLike) -> None:
    """StorageError when a guarded folder above `path` is gone or is another folder now."""
    text = os.path.abspath(path)
    for folder, identity in list(_guarded.items()):
        if text != folder and not text.startswith(folder.rstrip("/") + "/"):
            continue
        now = _identity(folder)
        if identity is None:  # not made yet when the guard began: watched from now on
            _guarded[folder] = now
        elif now != identity:
            raise vanished_error(Path(folder), path)


# ----------------------------------------------------------------------------------------------
# What a planned run writes, and the preflight


def checkpoint_bytes(parameters: int, weights_bytes: Optional[int] = None) -> int:
    """About the bytes of one checkpoint (bench.train.checkpoint) of a model with `parameters`
    trainable parameters: model and EMA weights (`weights_bytes`, the state dict's size, when the
    model is built; else float32 parameters) and AdamW's two float32 moments."""
    weights = 4 * int(parameters) if weights_bytes is None else int(weights_bytes)
    return 2 * weights + (CHECKPOINT_COPIES - 2) * 4 * int(parameters) + CHECKPOINT_OVERHEAD


def estimate_parameters(model_cfg, num_classes: int) -> int:
    """The backbone's parameters from its size alone: 18 h^2 per block (attention 4 h^2, MLP 8 h^2,
    adaLN 6 h^2), the timestep MLP and final adaLN (3 h^2) and the label table; the patch and
    positional embeddings and the output layer are left out (under 1% at XL/2)."""
    if model_cfg.size == "custom":
        depth, hidden = model_cfg.depth, model_cfg.hidden_size
    else:
        size = MODEL_SIZES[split_model_size(model_cfg.size)[0]]  # torch-free: models.settings
        depth, hidden = size["depth"], size["hidden_size"]
    return 18 * hidden * hidden * depth + 3 * hidden * hidden + (num_classes + 1 + 256) * hidden


def checkpoints_held(train_cfg) -> int:
    """The most checkpoints a run holds at once: the last `keep_last`, the milestones and the final
    step, plus the new one written before the oldest is pruned."""
    saved = set(range(train_cfg.ckpt_every, train_cfg.max_steps + 1, train_cfg.ckpt_every))
    kept = {s for s in train_cfg.milestones if 0 < s <= train_cfg.max_steps} | {train_cfg.max_steps}
    return min(len(saved | kept), train_cfg.keep_last + len(kept) + 1)


def sample_bytes(cfg) -> int:
    """About the bytes of one evaluation's sample shards: uint8 images and the float32 latent and
    semantic channels beside them (bench.evaluate.sampling)."""
    side = cfg.data.image_size
    per_sample = 3 * side * side + 4 * (4 + cfg.semantic_channels) * (side // 8) ** 2
    return cfg.eval.num_samples * per_sample


def preflight_warning(folder: PathLike, needed: int, what: str) -> Optional[str]:
    """A one-line warning when the file system holding `folder` has less free space than `needed`
    bytes (None otherwise): a warning, not a refusal, since pruning and other jobs change it."""
    free = free_bytes(folder)
    if free is None or free >= needed:
        return None
    return (f"warning: {folder} has {_mb(free)} free, but {what} will write about {_mb(needed)}; "
            "free space or choose an output folder on a disk with room before it fills (a full disk "
            "stops the run, which the same command then resumes)")
