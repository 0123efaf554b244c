"""Cluster profiles (`slurm/profiles/*.yaml`, and a user folder's `profiles/` first: bench.resources),
the per-job resource request a grid makes within one, and the errors of `bench grid` that the user
can fix before anything is submitted."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bench import resources
from bench.config import ConfigError
from bench.launch.grids import Grid

PROFILES_DIR = resources.shipped("profiles")  # what ships; a user folder's profiles/ come first


class LaunchError(ConfigError):
    """Something the user can fix before anything is submitted (bad profile, options, scheduler)."""


class ProfileError(LaunchError):
    """A cluster profile is missing, has an unknown key or a value of the wrong type."""


class SchedulerError(LaunchError):
    """The scheduler could not be reached or refused the submission."""


# ----------------------------------------------------------------------------------------------
# Cluster profiles (slurm/profiles/*.yaml)

PROFILE_TYPES: dict[str, tuple] = {
    "description": (str,), "executor": (str,), "partition": (str, type(None)), "account": (str, type(None)),
    "qos": (str, type(None)), "constraint": (str, type(None)), "gpus_per_node": (int,), "cpus_per_task": (int,),
    "mem_gb": (int, float, type(None)), "time_min": (int,), "signal_delay_s": (int,), "max_num_timeout": (int,),
    "array_parallelism": (int,), "setup": (list,), "additional_parameters": (dict,), "throughput": (dict,),
}


@dataclass(frozen=True)
class Profile:
    """Where and how jobs run: the scheduler's partition, limits, requeue budget and setup lines."""

    name: str
    executor: str = "slurm"
    description: str = ""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: Optional[float] = None
    time_min: int = 60
    signal_delay_s: int = 90
    max_num_timeout: int = 3
    array_parallelism: int = 256
    setup: tuple[str, ...] = ()
    additional_parameters: dict = field(default_factory=dict)
    throughput: dict = field(default_factory=dict)


def list_profiles(profiles_dir: Path | str | None = None) -> list[str]:
    """Names of the cluster profiles in `profiles_dir` (None: the search path's and the shipped ones)."""
    if profiles_dir is None:
        return list(resources.items("profiles"))
    return sorted(p.stem for p in Path(profiles_dir).glob("*.yaml"))


def profile_path(name: str, profiles_dir: Path | str | None = None) -> Path:
    if profiles_dir is not None and (Path(profiles_dir) / f"{name}.yaml").is_file():
        return Path(profiles_dir) / f"{name}.yaml"
    item = resources.find("profiles", name) if profiles_dir is None else None
    if item is not None:
        return item.path
    where = str(profiles_dir) if profiles_dir is not None else ", ".join(
        str(d) for d, _ in resources.search_dirs("profiles"))
    raise ProfileError(f"unknown cluster profile {name!r}; available profiles: "
                       f"{', '.join(list_profiles(profiles_dir)) or 'none'} (files in {where})")


def load_profile(name: str, profiles_dir: Path | str | None = None) -> Profile:
    """Read and validate profile `name`; ProfileError names the bad key and lists the valid ones."""
    import yaml

    path = profile_path(name, profiles_dir)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ProfileError(f"profile {name} ({path}): not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"profile {name} ({path}): expected a mapping of keys {sorted(PROFILE_TYPES)}")
    unknown = sorted(set(data) - set(PROFILE_TYPES))
    if unknown:
        raise ProfileError(f"profile {name} ({path}): unknown key(s) {unknown}; valid keys: {sorted(PROFILE_TYPES)}")
    for key, value in data.items():
        types = PROFILE_TYPES[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ProfileError(f"profile {name} ({path}): {key} must be {wanted}, got {value!r}")
    if data.get("executor", "slurm") not in ("slurm", "local"):
        raise ProfileError(f"profile {name}: executor must be slurm or local (debug is --debug), "
                           f"got {data['executor']!r}")
    for key in ("time_min", "max_num_timeout", "array_parallelism", "cpus_per_task"):
        if key in data and data[key] < 1:
            raise ProfileError(f"profile {name}: {key} must be >= 1 (requeue after timeouts needs max_num_timeout > 0)")
    if data.get("signal_delay_s", 0) < 0 or data.get("gpus_per_node", 0) < 0:
        raise ProfileError(f"profile {name}: signal_delay_s and gpus_per_node must be >= 0")
    if not all(isinstance(s, str) for s in data.get("setup", [])):
        raise ProfileError(f"profile {name}: setup must be a list of shell lines")
    return Profile(name=name, **{**data, "setup": tuple(data.get("setup", ()))})


def job_resources(grid: Grid, profile: Optional[Profile], stage: str) -> dict:
    """The per-job request: the grid's `resources` (eval: `eval.resources` on top) within the profile.

    Local and debug runs take the machine's profile as is (a grid's 8-GPU request does not apply).
    """
    want = {**grid.resources, **(grid.eval["resources"] if stage == "eval" else {})}
    if profile is None:  # dry run without a profile: the grid's own request
        gpus = int(want.get("gpus_per_node", 0))
        return {"nodes": int(want.get("nodes", 1)), "gpus_per_node": gpus, "tasks_per_node": max(gpus, 1),
                "cpus_per_task": int(want.get("cpus_per_task", 1)), "mem_gb": want.get("mem_gb"),
                "timeout_min": int(float(want.get("hours", 24)) * 60)}
    if profile.executor == "local":
        gpus, nodes, cpus, mem, minutes = profile.gpus_per_node, 1, profile.cpus_per_task, None, profile.time_min
    else:
        gpus = int(want.get("gpus_per_node", profile.gpus_per_node))
        if gpus > profile.gpus_per_node:
            raise ProfileError(f"grid {grid.name} asks for {gpus} GPUs per node but profile {profile.name} has "
                               f"{profile.gpus_per_node}; use a GPU profile or lower the grid's resources")
        nodes, cpus = int(want.get("nodes", 1)), int(want.get("cpus_per_task", profile.cpus_per_task))
        mem = want.get("mem_gb", profile.mem_gb)
        hours = want.get("hours")
        minutes = min(profile.time_min, int(float(hours) * 60)) if hours else profile.time_min
    return {"nodes": nodes, "gpus_per_node": gpus, "tasks_per_node": max(gpus, 1), "cpus_per_task": cpus,
            "mem_gb": mem, "timeout_min": max(int(minutes), 1)}
