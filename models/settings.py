"""The core's settings and their rules, written once, importing nothing (no torch).

The core validates its own configs with these (models.backbone, models.flow, models.joint_objective),
and bench/config.py checks a run's config with the same ones when it loads, under the user's key
names and without loading torch, so the two cannot accept different values. A check returns the
problem as the end of a sentence (None when the value is fine); the caller puts its own key name in
front and raises its own error type.
"""

from __future__ import annotations

import math
from typing import Optional

# Table 7 of the paper (B, L, XL; identical for DiT and SiT) plus DiT's S.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (1, 2, 4, 8)
FUSIONS = ("none", "merged", "separate")
TRANSPORTS = ("flow", "ddpm")
FLOW_PATHS = ("linear", "gvp")
DROP_MODES = ("sample", "batch_official")


def split_model_size(name: str) -> Optional[tuple[str, int]]:
    """("XL", 2) for "XL/2", "SiT-XL/2" or "DiT-XL/2"; None for a name outside the registry."""
    size, _, patch = name.removeprefix("SiT-").removeprefix("DiT-").partition("/")
    if size not in MODEL_SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
        return None
    return size, int(patch)


def choice_problem(value: object, allowed: tuple) -> Optional[str]:
    return None if value in allowed else f"={value!r} is not allowed; choose one of {list(allowed)}"


def probability_problem(value: float) -> Optional[str]:
    """A probability: finite and in [0, 1] (NaN compares False with everything, so it is refused)."""
    if isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0:
        return None
    return f"={value!r} is a probability and must be finite and lie in [0, 1]"


def p_drop_problem(p_drop: float, has_semantic: bool) -> Optional[str]:
    """The modality drop of Representation Guidance (docs/method.md, "The modality drop"): a
    probability, above 0 only where there are semantic channels to drop."""
    problem = probability_problem(p_drop)
    if problem is None and p_drop > 0 and not has_semantic:
        problem = (f"={p_drop!r} needs semantic channels, but the model has none (latent only): "
                   "nothing to drop; set p_drop=0 or give the model semantic channels")
    return problem


def p_drop_run_problem(p_drop: float, has_semantic: bool) -> Optional[str]:
    """What a training run accepts: p_drop_problem, and not 1 (why: docs/method.md, "The modality
    drop"); the core still computes 1, whose mask arithmetic is well defined and tested."""
    problem = p_drop_problem(p_drop, has_semantic)
    if problem is None and p_drop == 1.0:
        problem = ("=1.0 drops the semantic channels at every step, so the semantic head is never "
                   "trained; Representation Guidance needs a small drop (the paper: 0.2), and 0 "
                   "trains plain ReDi")
    return problem
