"""`site.yaml`: this machine's paths, said once (docs/cluster.md, "The site file").

The first `site.yaml` on the search path (bench.resources) names the pretrained files, the data and
the output root. Every stage applies it to the config it composes: after the scale and spec YAMLs,
before the command line, so `key=value` on the command line still wins. A path applies only where
the composed config uses it, so one file serves both scales:

    key                      applies when
    output_root              always
    data.root                data.name=imagefolder (the embedded datasets have their standard place)
    data.prepared_dir        data.name=imagefolder
    vae.path                 vae.kind=diffusers
    encoder.weights          encoder.kind=dinov2
    eval.inception_weights   eval.feature_network=inception
    eval.dinov2_weights      eval.feature_network=dinov2
    eval.reference           eval.expected_reference is set (ADM's ImageNet 256 batch)

None of these keys is in the run hash (bench.config `_not_identity`), so a site file moves where
files are found, never which run a folder holds. A relative path is taken relative to the folder
that holds site.yaml (after `~` and $VARIABLES are expanded), so jobs started from any working
directory see the same files.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from bench import resources
from bench.config import ConfigError, ExperimentConfig

SITE_KEYS: dict[str, tuple[str, Callable[[ExperimentConfig], bool]]] = {
    "output_root": ("always", lambda cfg: True),
    "data.root": ("data.name=imagefolder", lambda cfg: cfg.data.name == "imagefolder"),
    "data.prepared_dir": ("data.name=imagefolder", lambda cfg: cfg.data.name == "imagefolder"),
    "vae.path": ("vae.kind=diffusers", lambda cfg: cfg.vae.kind == "diffusers"),
    "encoder.weights": ("encoder.kind=dinov2", lambda cfg: cfg.encoder.kind == "dinov2"),
    "eval.inception_weights": ("eval.feature_network=inception",
                               lambda cfg: cfg.eval.feature_network == "inception"),
    "eval.dinov2_weights": ("eval.feature_network=dinov2", lambda cfg: cfg.eval.feature_network == "dinov2"),
    "eval.reference": ("eval.expected_reference is set", lambda cfg: cfg.eval.expected_reference is not None),
}


class SiteError(ConfigError):
    """site.yaml is not valid YAML, has a key that is not a site path, or a value that is not a path."""


@dataclass(frozen=True)
class Site:
    """The paths of one site file, by dotted key (absolute, `~` expanded)."""

    path: Optional[Path]
    paths: dict[str, str]


NO_SITE = Site(None, {})


def load_site(path: Optional[Path] = None) -> Site:
    """Read `path` (None: the first site.yaml on the search path; none at all: NO_SITE)."""
    import yaml

    path = resources.site_file() if path is None else Path(path)
    if path is None:
        return NO_SITE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SiteError(f"site file {path}: cannot read it ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise SiteError(f"site file {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except UnicodeDecodeError as err:
        raise SiteError(f"site file {path}: not UTF-8 text ({err.reason}); save it as UTF-8") from None
    paths = {}
    for key, value in _flatten(data or {}, path).items():
        if key not in SITE_KEYS:
            raise SiteError(f"site file {path}: {key} is not a site path; the keys are {sorted(SITE_KEYS)} "
                            "(other settings go on the command line or in a scale/spec YAML)")
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise SiteError(f"site file {path}: {key} must be a path (a non-empty string), got {value!r}")
        paths[key] = _absolute(value, path.parent, repo_id_allowed=key == "vae.path")
    return Site(path, paths)


def _flatten(data: Any, path: Path, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the top level"
        raise SiteError(f"site file {path}: {where} must be a mapping of keys, got {data!r}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and any(k.startswith(full + ".") for k in SITE_KEYS):
            out.update(_flatten(value, path, full + "."))
        else:
            out[full] = value
    return out


def _absolute(value: str, base: Path, repo_id_allowed: bool) -> str:
    """`~` and $VARIABLES expanded, relative to site.yaml's folder; a Hugging Face repo id
    (`org/name`, not on disk and without a leading ./) is kept as written for vae.path."""
    expanded = Path(os.path.expandvars(value)).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    candidate = (base / expanded).resolve()
    repo_id = repo_id_allowed and value.count("/") == 1 and not value.startswith(".") and not candidate.exists()
    return value if repo_id else str(candidate)


def override_keys(overrides: Iterable[str]) -> set[str]:
    """The dotted keys a list of `key=value` overrides sets (`+`, `++`, `~` stripped)."""
    return {item.split("=", 1)[0].strip().lstrip("+~") for item in overrides}


def apply_site(cfg: ExperimentConfig, site: Site, keep: Iterable[str] = ()) -> ExperimentConfig:
    """A copy of `cfg` with the site's paths that apply to it, except the keys in `keep` (those
    the command line set)."""
    keep = set(keep)
    out = copy.deepcopy(cfg)
    for key, value in site.paths.items():
        if key in keep or not SITE_KEYS[key][1](cfg):
            continue
        set_key(out, key, value)
    return out


def set_key(cfg: Any, key: str, value: Any) -> None:
    *sections, name = key.split(".")
    target = cfg
    for section in sections:
        target = getattr(target, section)
    setattr(target, name, value)


def get_key(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def site_paths_of(source: ExperimentConfig, target: ExperimentConfig) -> ExperimentConfig:
    """`target` with the values of every site key taken from `source` (the config a job was
    composed with, site and command line applied at submission)."""
    out = copy.deepcopy(target)
    for key in SITE_KEYS:
        set_key(out, key, get_key(source, key))
    return out
