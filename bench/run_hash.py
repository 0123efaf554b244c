"""Run identity: the folder a run lives in is a hash of the settings that change its results.

`results/runs/<grid>/<spec>-<hash>`: fields marked `identity=False` in `bench/config.py` (logging,
paths, evaluation) are excluded, so re-submitting the same cell with another log interval lands in
the same folder and resumes. The hash is the first 8 hex digits of SHA-1 over canonical JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from bench.config import ExperimentConfig


def identity_dict(obj: Any) -> Any:
    """The result-changing part of a config, as nested plain dicts. A field marked
    `identity="when_set"` counts only when it is not None, so adding one kept every hash."""
    if dataclasses.is_dataclass(obj):
        return {
            f.name: identity_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.metadata.get("identity", True)
            and not (f.metadata.get("identity") == "when_set" and getattr(obj, f.name) is None)
        }
    if isinstance(obj, (list, tuple)):
        return [identity_dict(v) for v in obj]
    return obj


def run_hash(cfg: ExperimentConfig) -> str:
    canonical = json.dumps(identity_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(canonical.encode()).hexdigest()[:8]


def run_dir(cfg: ExperimentConfig) -> Path:
    """`<output_root>/<grid>/<spec>-<hash>` (relative paths are relative to the working directory)."""
    return Path(cfg.output_root) / cfg.grid / f"{cfg.spec}-{run_hash(cfg)}"


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed for one named random stream of a run (independent streams, stable across
    versions): training's init/objective/noise streams and sampling's labels/noise per shard."""
    text = "/".join(str(part) for part in (seed, *names))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)
