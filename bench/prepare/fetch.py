"""Fashion-MNIST for a machine without Debian's `dataset-fashion-mnist`: a folder the user names, or
the four files fetched once into a cache (`bench demo` asks for this; nothing else downloads).

Where the files come from, in order: `--data-root DIR` (checked, never fetched into); Debian's
folder (bench.prepare.sources.FASHION_MNIST_DIR); the cache (`$XDG_CACHE_HOME/redi-bench/
fashion-mnist`, by default `~/.cache/redi-bench/fashion-mnist`); else each missing file is fetched
from the dataset's own host into the cache, with a progress line, written under a temporary name,
checked and only then renamed into place. Offline, one line names both other ways.

The checksums are of the decompressed idx content (the bytes the harness reads), so the upstream
files and Debian's recompressed copies of the same data both pass.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Callable, Optional

from bench.atomic import atomic_write_with
from bench.prepare.sources import FASHION_MNIST_DIR, DatasetError

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# SHA-256 of each file's decompressed content (Debian's dataset-fashion-mnist holds the same data).
FASHION_MNIST_CONTENT_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
TIMEOUT_S = 30.0


class FetchError(DatasetError):
    """Fashion-MNIST is neither installed nor in the cache, and cannot be fetched."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "redi-bench" / "fashion-mnist"


def content_sha256(path: Path) -> str:
    """SHA-256 of a gzip file's decompressed content; DatasetError names a file that is not gzip."""
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except (OSError, EOFError, zlib.error) as err:  # zlib.error: a damaged deflate stream
        raise DatasetError(f"{path} is not a readable gzip file ({err})") from err
    return digest.hexdigest()


def complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FASHION_MNIST_CONTENT_SHA256)


def fashion_mnist_root(data_root: Optional[str], fetch: bool = True) -> Optional[str]:
    """The folder to read Fashion-MNIST from (None: Debian's), fetching into the cache if needed."""
    if data_root:
        folder = Path(data_root).expanduser()
        missing = [name for name in FASHION_MNIST_CONTENT_SHA256 if not (folder / name).is_file()]
        if missing:
            raise DatasetError(f"--data-root {folder}: {', '.join(missing)} not found; the folder must "
                               f"hold the four Fashion-MNIST files ({', '.join(FASHION_MNIST_CONTENT_SHA256)})")
        damaged = [name for name, sha in FASHION_MNIST_CONTENT_SHA256.items()
                   if content_sha256(folder / name) != sha]  # a partly copied file is not taken as the data
        if damaged:
            raise DatasetError(f"--data-root {folder}: {', '.join(damaged)} differ from Fashion-MNIST's files "
                               "(a partial copy?); copy them again")
        return str(folder.resolve())
    if complete(Path(FASHION_MNIST_DIR)):
        return None
    cache = cache_dir()
    if not complete(cache):
        if not fetch:
            raise FetchError(offline_message("not fetched"))
        fetch_all(cache)
    return str(cache)


def offline_message(reason: str) -> str:
    return (f"Fashion-MNIST is not installed and could not be fetched ({reason}): install Debian's "
            "package as root (apt-get install dataset-fashion-mnist), or pass --data-root DIR with "
            f"the four idx.gz files ({', '.join(FASHION_MNIST_CONTENT_SHA256)})")


def fetch_all(cache: Path, opener: Optional[Callable] = None) -> None:
    """Fetch every file the cache lacks; a file in place has passed its checksum."""
    missing = [name for name in FASHION_MNIST_CONTENT_SHA256 if not (cache / name).is_file()]
    if missing:
        print(f"Fashion-MNIST is not installed (Debian's dataset-fashion-mnist): fetching {len(missing)} "
              f"file(s) once from {FASHION_MNIST_URL} into {cache}", file=sys.stderr, flush=True)
    for name in missing:
        fetch_file(FASHION_MNIST_URL + name, cache / name, FASHION_MNIST_CONTENT_SHA256[name], opener)


def fetch_file(url: str, path: Path, sha256: str, opener: Optional[Callable] = None) -> Path:
    """Download `url` to `path` under a temporary name with a progress line; renamed into place only
    once its content checksum matches. `opener` defaults to urllib.request.urlopen."""
    opener = opener or urllib.request.urlopen

    def write(tmp: str) -> None:
        try:
            with opener(url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0)
                copy_with_progress(response, out, total, path.name)
        except (urllib.error.URLError, OSError) as err:  # no network, DNS, refused, reset
            raise FetchError(offline_message(f"{url}: {getattr(err, 'reason', err)}")) from None
        got = content_sha256(Path(tmp))
        if got != sha256:
            raise FetchError(f"{url}: the content's SHA-256 is {got[:12]}..., expected {sha256[:12]}...; "
                             "nothing was kept. Try again, or install dataset-fashion-mnist / pass --data-root DIR")

    return atomic_write_with(path, write)


def copy_with_progress(source, out, total: int, label: str, block: int = 1 << 16) -> int:
    """Copy `source` to `out`, printing `label: done/total MB (p%)` to stderr: in place on a
    terminal, else at every quarter."""
    done, shown, tty = 0, -1, sys.stderr.isatty()
    while chunk := source.read(block):
        out.write(chunk)
        done += len(chunk)
        percent = int(100 * done / total) if total else 0
        if (tty and percent != shown) or (not tty and percent // 25 != shown // 25):
            shown = percent
            sized = f"/{total / 1e6:.1f}" if total else ""
            print(f"\rfetching {label}: {done / 1e6:.1f}{sized} MB" + (f" ({percent}%)" if total else ""),
                  end="" if tty else "\n", file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr, flush=True)
    return done

