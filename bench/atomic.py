"""Atomic file writes and content hashes.

Every file the harness writes goes to a temporary name in the same folder and is then moved into
place with `os.replace`, which is atomic on POSIX: a reader (or a re-run after a crash) sees either
the old file or the complete new one, never a partial file. Temporary names hold `.tmp-<pid>-` so a
crashed writer's leftovers are easy to recognise and never mistaken for finished output. A full
disk, a quota, a read-only file system or a folder removed mid-write is one StorageError
(bench.storage) naming the file, its temporary removed.

Temporary files and folders are created with the modes every Unix tool asks for (0666 / 0777), so
the process umask decides what the finished files are, as for any other program: a group on a
shared cluster can read results when the umask says so (tempfile's private 0600 / 0700 did not).

`crash_point(name)` is a test-only hook: when the environment variable REDI_BENCH_KILL_AT names
this point (`NAME`, `NAME@N` for its N-th time in the process, `...:STOP` to stop instead of
die), the process sends itself SIGKILL (or SIGSTOP) there. The kill tests use it to die at an
exact moment (mid-append, mid-checkpoint) instead of sleeping and hoping; unset, it costs one
environment lookup. Points: `atomic:<file name>` (temporary written, not yet renamed; `atomic:<dir>/`
for a folder written at once), `prepare:encoded:<split>/<shard>` and `prepare:projected:<split>/<shard>`
(bench prepare's two passes),
`append:<file name>` (half a JSONL append written), `checkpoint:files` (a checkpoint's tensors
written, its state.json not yet), `train:step` (after an optimiser step), `sample:shard` (after
a sample shard), `eval:rows` (an evaluation's rows computed, not yet appended).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import stat
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

from bench.storage import writing

if TYPE_CHECKING:  # torch is imported where tensors are written, so JSON/text users stay light
    import torch

PathLike = Union[str, os.PathLike]

TMP_MARK = ".tmp-"
KILL_ENV = "REDI_BENCH_KILL_AT"
_crash_hits: dict[str, int] = {}


def crash_point(name: str, before: Optional[Callable[[], None]] = None) -> None:
    """Test-only: die here when REDI_BENCH_KILL_AT names this point (module docstring); `before`
    runs first (e.g. writes half a line)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    stop = spec.endswith(":STOP")
    point, _, count = spec.removesuffix(":STOP").partition("@")
    if point != name:
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] == int(count or 1):
        if stop:  # stopped, the process holds its locks until SIGCONT or SIGKILL
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        if before is not None:
            before()
        os.kill(os.getpid(), signal.SIGKILL)


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def _create_temporary_file(path: Path) -> Path:
    """A new empty file beside `path`, mode 0666 minus the umask (O_EXCL: never someone else's)."""
    while True:
        tmp = _temporary_name(path)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _make_temporary_dir(directory: Path) -> Path:
    """A new empty folder beside `directory`, mode 0777 minus the umask."""
    while True:
        tmp = _temporary_name(directory)
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status; else set and restore)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors_file(tensors: Mapping[str, torch.Tensor], path: PathLike,
                          metadata: Optional[Mapping[str, str]] = None) -> None:
    """safetensors' save_file, then the mode the umask asks for: safetensors creates its files 0600."""
    from safetensors.torch import save_file  # imports torch, only when tensors are written

    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata is not None else None)
    os.chmod(path, 0o666 & ~current_umask())


def atomic_write_with(path: PathLike, write: Callable[[str], None], needed: Optional[int] = None) -> Path:
    """Call `write(tmp_path)`, fsync the result, then rename it onto `path`.

    A full disk, a quota, a read-only file system or a vanished folder is a StorageError naming
    `path` (and the `needed` bytes, when the caller knows them); the temporary is removed first.
    """
    path = Path(path)
    with writing(path, needed):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(_create_temporary_file(path))
        try:
            write(tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            crash_point(f"atomic:{path.name}")  # the worst moment: the data written, not yet in place
            os.replace(tmp, path)
        except BaseException:
            # Never leave a partial file behind, whatever interrupted the write (on a read-only
            # file system the unlink fails too: the next run's stale-temporary sweep removes it).
            with suppress(OSError):
                os.unlink(tmp)
            raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return atomic_write_with(path, write, needed=len(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    """Write `obj` as indented, key-sorted JSON atomically (sorted so equal content = equal bytes)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor],
                            metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Save a dict of tensors as safetensors atomically (tensors made contiguous, on CPU)."""
    clean = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    needed = sum(t.numel() * t.element_size() for t in clean.values())
    return atomic_write_with(path, lambda tmp: save_safetensors_file(clean, tmp, meta), needed=needed)


def atomic_torch_module_dir(directory: PathLike, save: Callable[[str], None]) -> Path:
    """Let `save(tmp_dir)` fill a temporary folder, then rename it onto `directory`.

    Used for diffusers' `save_pretrained`, which writes several files; the folder appears complete
    or not at all. An existing `directory` is replaced.
    """
    directory = Path(directory)
    with writing(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_temporary_dir(directory)
        try:
            save(str(tmp))
            _follow_umask(tmp)
            crash_point(f"atomic:{directory.name}/")
            if directory.exists():
                old = directory.with_name(f".{directory.name}{TMP_MARK}old-{os.getpid()}")
                os.replace(directory, old)
                os.replace(tmp, directory)
                _remove_tree(old)
            else:
                os.replace(tmp, directory)
        except BaseException:
            _remove_tree(tmp)
            raise
    return directory


def _follow_umask(folder: Path) -> None:
    """Give what a library wrote into `folder` the modes of the umask (safetensors writes 0600)."""
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_size)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of the canonical (key-sorted, compact) JSON form of `obj`."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def remove_stale_temporaries(directory: PathLike) -> int:
    """Delete leftover temporary files of crashed writers in `directory`; returns how many."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for entry in directory.iterdir():
        if entry.name.startswith(".") and TMP_MARK in entry.name:
            if entry.is_dir():
                _remove_tree(entry)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


class OutputPathError(ValueError):
    """A folder the command must write to cannot be written; the message names it and the option."""


def _probe(path: Path, made: list[Path], attempts: int = 5) -> None:
    """Create `path` and a file in it. Processes that start together (the ranks of one torchrun, the
    tasks of an array) probe the same new folder: one may remove it, empty, between another's mkdir
    and its probe file (ENOENT), or between the two halves of pathlib's mkdir of a missing parent
    (EEXIST, then not a folder); the other one makes it again. `made` gathers every folder this
    call found missing before an attempt: the caller removes them again."""
    for attempt in range(attempts):
        made += [p for p in (path, *path.parents) if not p.exists() and p not in made]
        try:
            path.mkdir(parents=True, exist_ok=True)
            os.unlink(_create_temporary_file(path / ".write-probe"))
            return
        except (FileNotFoundError, FileExistsError):
            if attempt == attempts - 1:
                raise


def check_writable_dir(path: PathLike, option: str) -> Path:
    """Create `path` if needed and prove it takes a file, before any work is done.

    `option` names how the user chose the folder (`--out`, `output_root=`), so the one-line error
    says what to change. A probe file is written and removed: permission bits alone do not say it
    (root ignores them; a read-only mount does not).
    """
    if not str(path).strip():
        raise OutputPathError(f"{option.rstrip('= ')} is empty; give a folder (relative paths are "
                              "under the current folder)")
    path = Path(path).expanduser()
    named = f"{option}{path}" if option.endswith("=") else f"{option} {path}"
    for existing in (path, *path.parents):  # the nearest that exists, in one stat (others may probe it)
        try:
            if not stat.S_ISDIR(existing.stat().st_mode):
                raise OutputPathError(f"{named}: {existing} is not a folder; choose another path")
            break
        except (FileNotFoundError, NotADirectoryError):  # missing, or below a file (/dev/null/x)
            continue
    # Folders made for the probe are removed again: a command that fails later (a config or data
    # error) leaves no empty run folder behind; the real writes create them. (One that another
    # process is probing at that moment stays, empty.)
    made: list[Path] = []
    try:
        _probe(path, made)
    except OSError as err:
        raise OutputPathError(f"{named}: cannot write there ({err.strerror or err}); "
                              "choose a writable folder") from None
    finally:
        for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
    return path
