"""Compose an experiment from `ablations/` with Hydra and return the typed `ExperimentConfig`.

Hydra only composes: the schema is registered in its ConfigStore, YAML files add deltas, overrides
come last, and `OmegaConf.to_object` hands back plain dataclasses (validated in `__post_init__`).
Every failure is re-raised as one `ConfigError` whose message names the offending key.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable

from bench.config import ConfigError, ExperimentConfig

ABLATIONS_DIR = Path(__file__).resolve().parents[1] / "ablations"
_SCHEMA_NAME = "base_schema"


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=_SCHEMA_NAME, node=ExperimentConfig)


def available(group: str) -> list[str]:
    """The options of a config group in `ablations/` (e.g. the specs)."""
    return sorted(p.stem for p in (ABLATIONS_DIR / group).glob("*.yaml"))


def load_config(overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Compose `ablations/config.yaml` with `overrides` (`key=value`, `spec=redi`, `scale=paper`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    _register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ABLATIONS_DIR), version_base=None):
            composed = compose(config_name="config", overrides=overrides)
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
    return cfg


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
    return " ".join(lines)[:600]


def to_dict(cfg: Any) -> dict:
    """The config as plain JSON-able dicts (what is written next to the checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> ExperimentConfig:
    """Rebuild the dataclasses from `to_dict` output (a run folder's `config.json`)."""
    from omegaconf import OmegaConf

    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), data)
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"saved config is not valid for this version of redi-bench: {_explain(err)}") from None
    assert isinstance(cfg, ExperimentConfig)
    return cfg


def dumps(cfg: ExperimentConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
