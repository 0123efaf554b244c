"""Atomic file writes and content hashes.

Every file the harness writes goes to a temporary name in the same folder and is then moved into
place with `os.replace`, which is atomic on POSIX: a reader (or a re-run after a crash) sees either
the old file or the complete new one, never a partial file. Temporary names end in `.tmp-<pid>` so
a crashed writer's leftovers are easy to recognise and never mistaken for finished output.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

if TYPE_CHECKING:  # torch is imported where tensors are written, so JSON/text users stay light
    import torch

PathLike = Union[str, os.PathLike]

TMP_MARK = ".tmp-"
KILL_ENV = "REDI_BENCH_TEST_KILL_AT"


def maybe_kill(point: str) -> None:
    """Test hook for the kill -9 tests: SIGKILL this process at `point` when REDI_BENCH_TEST_KILL_AT
    names it (e.g. `write:manifest.json`: a file written, not yet renamed into place). Never set it
    outside tests."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, fsync the result, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        maybe_kill(f"write:{path.name}")  # the worst moment: the data written, not yet in place
        os.replace(tmp, path)
    except BaseException:
        # Never leave a partial file behind, whatever interrupted the write.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return _atomic_write(path, write)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    """Write `obj` as indented, key-sorted JSON atomically (sorted so equal content = equal bytes)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor],
                            metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Save a dict of tensors as safetensors atomically (tensors made contiguous, on CPU)."""
    from safetensors.torch import save_file  # imports torch, only when tensors are written

    clean = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return _atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=meta))


def atomic_torch_module_dir(directory: PathLike, save: Callable[[str], None]) -> Path:
    """Let `save(tmp_dir)` fill a temporary folder, then rename it onto `directory`.

    Used for diffusers' `save_pretrained`, which writes several files; the folder appears complete
    or not at all. An existing `directory` is replaced.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}{TMP_MARK}{os.getpid()}-",
                                dir=directory.parent))
    try:
        save(str(tmp))
        maybe_kill(f"write:{directory.name}/")
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
