"""Compose an experiment from `ablations/` with Hydra and return the typed `ExperimentConfig`.

Hydra only composes: the schema is registered in its ConfigStore, YAML files add deltas, the site
file's paths follow (bench.site), overrides come last, and `OmegaConf.to_object` hands back plain
dataclasses (validated in `__post_init__`). Specs and scales of the user folders on the search path
(bench.resources) come before the shipped ones of the same name. Every failure is re-raised as one
`ConfigError` whose message names the offending key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from bench import resources
from bench.config import ConfigError, ExperimentConfig
from bench.site import apply_site, load_site, override_keys

ABLATIONS_DIR = resources.shipped("ablations")  # what ships; user folders come first (config_dir)
GROUPS = ("spec", "scale")  # the config groups of ablations/ (grids/ are read by bench.launch.grids)
_SCHEMA_NAME = "base_schema"


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=_SCHEMA_NAME, node=ExperimentConfig)


def available(group: str) -> list[str]:
    """The options of a config group (e.g. the specs): the user folders' and the shipped ones."""
    return list(resources.items(group))


@contextlib.contextmanager
def config_dir() -> Iterator[Path]:
    """The folder Hydra composes from: the shipped `ablations/`, or, when user folders add specs or
    scales, a temporary copy with theirs laid over it (a user's scale named paper replaces the
    shipped one; Hydra's own search path would look in the shipped folder first)."""
    extra = {g: [i for i in resources.items(g).values() if i.origin != resources.SHIPPED] for g in GROUPS}
    if not any(extra.values()):
        yield ABLATIONS_DIR
        return
    with tempfile.TemporaryDirectory(prefix="redi-bench-config-") as tmp:
        shutil.copy2(ABLATIONS_DIR / "config.yaml", tmp)
        for group in GROUPS:
            shutil.copytree(ABLATIONS_DIR / group, Path(tmp) / group)
            for item in extra[group]:
                shutil.copy2(item.path, Path(tmp) / group / f"{item.name}.yaml")
        yield Path(tmp)


def _section_error(path: Sequence[str], cls: type) -> ConfigError:
    """`a.b.typo` is not a setting: name it and list the valid keys of its section."""
    names = [f.name for f in dataclasses.fields(cls)]
    section = ".".join(path[:-1]) or "the top level"
    return ConfigError(f"{'.'.join(path)} is not a setting: {section} has the keys {names}. "
                       "The settings are a fixed typed schema (bench/config.py); check the spelling")


def check_key(key: str, cls: type = ExperimentConfig) -> None:
    """Raise ConfigError unless the dotted `key` names a field of the typed schema.

    Hydra would let `+section.new_key=...` add a key that nothing reads (silently: the run and its
    hash stay the same), and its own error for a mistyped key recommends exactly that `+`.
    """
    parts = key.split(".")
    for index, name in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            raise _section_error(parts[: index + 1], cls)
        kind = _field_type(cls, name)
        if index < len(parts) - 1:
            if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
                raise ConfigError(f"{'.'.join(parts[: index + 1])} is a value, not a section; "
                                  f"{key} does not exist")
            cls = kind


def check_dict_keys(data: Any, cls: type = ExperimentConfig, prefix: str = "") -> None:
    """Every key of a nested dict (a saved config.json) must be a field of the schema."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a JSON object, "
                          f"got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    for name, value in data.items():
        if name not in names:
            raise _section_error([*filter(None, prefix.rstrip(".").split(".")), str(name)], cls)
        kind = _field_type(cls, name)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            check_dict_keys(value, kind, f"{prefix}{name}.")


def _field_type(cls: type, name: str) -> Any:
    import typing

    return typing.get_type_hints(cls)[name]


AUTO_IS_NULL = ("train.compile",)
"""Optional booleans whose None means `auto`: `key=auto` is spelled `key=null` for Hydra."""


def _spell_auto(overrides: Sequence[str]) -> list[str]:
    """`train.compile=auto` as Hydra reads it (`train.compile=null`); everything else unchanged."""
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        out.append(f"{key}=null" if key.strip() in AUTO_IS_NULL and value.strip().lower() == "auto" else item)
    return out


def _check_overrides(overrides: Sequence[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip().lstrip("+~")
        if key in GROUPS or key.split("@", 1)[0] in GROUPS:
            continue  # spec=..., scale=...: config groups, not settings
        check_key(key)


def load_config(overrides: Iterable[str] = (), site: bool = True) -> ExperimentConfig:
    """Compose `ablations/config.yaml` with `overrides` (`key=value`, `spec=redi`, `scale=paper`).

    The site file's paths (bench.site) are applied except where `overrides` set the same key;
    `site=False` composes without them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = _spell_auto(list(overrides))
    _check_overrides(overrides)
    paths = load_site() if site else None
    _register_schema()
    GlobalHydra.instance().clear()
    try:
        with config_dir() as folder, initialize_config_dir(config_dir=str(folder), version_base=None):
            composed = compose(config_name="config", overrides=overrides)
        check_dict_keys(OmegaConf.to_container(composed))  # a YAML delta cannot add keys either
        cfg = OmegaConf.to_object(composed)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    except Exception as err:  # hydra's composition errors carry the useful text
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(_explain(err)) from None
    finally:
        GlobalHydra.instance().clear()
    assert isinstance(cfg, ExperimentConfig)
    return apply_site(cfg, paths, keep=override_keys(overrides)) if paths is not None else cfg


def _explain(err: Exception) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    if "Could not find" in text or "Could not load" in text:
        for group in ("spec", "scale"):
            if f"'{group}/" in text:
                return f"{first}. Available {group}s: {available(group)}"
    if err.__cause__ is not None and str(err.__cause__).strip():
        text = f"{text}: {str(err.__cause__).strip()}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("full_key:", "object_type", "reference_type"))]
    key = getattr(err, "full_key", None)  # omegaconf knows the key even when its text does not say it
    prefix = f"{key}: " if key and key not in lines[0] else ""
    return (prefix + " ".join(lines))[:600]


def to_dict(cfg: Any) -> dict:
    """The config as plain JSON-able dicts (what is written next to the checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> ExperimentConfig:
    """Rebuild the dataclasses from `to_dict` output (a run folder's `config.json`)."""
    from omegaconf import OmegaConf

    check_dict_keys(data)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), data)
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"saved config is not valid for this version of redi-bench: {_explain(err)}") from None
    assert isinstance(cfg, ExperimentConfig)
    return cfg


def load_config_file(path: str | Path) -> ExperimentConfig:
    """A saved `config.json` (`bench train --config`): every failure is one line naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--config {path}: not valid JSON (line {err.lineno}, column {err.colno}: "
                          f"{err.msg})") from None
    try:
        return from_dict(data)
    except ConfigError as err:
        text = str(err).removeprefix("saved config is not valid for this version of redi-bench: ")
        raise ConfigError(f"--config {path}: {text}") from None


def dumps(cfg: ExperimentConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
