"""Ablation grids: one YAML per paper table or figure (`ablations/grids/`), expanded into cells.

A grid is specs x axes x seeds in a few lines (ablations/README.md has the full schema):

    name: mini_table1
    title: "Table 1 (SiT rows), in miniature"
    regenerates: [table1]                  # table ids of results/paper/*.csv (bench report)
    base: [scale=embedded]                 # overrides every cell shares
    specs: [latent_only, repa, redi, redi_repa]
    axes:                                  # cartesian product, axes taken in sorted-name order
      train.seed: [0, 1]                   #   a list: values of one key
      backbone: {dit_b2: [model.size=B/2, objective.transport=ddpm]}   # a mapping: named bundles
    seeds: {paired: [0, 1, 2]}             # instead of a train.seed axis: train.seed=k and eval.seed=k
    cells: []                              # explicit extra cells: [overrides] or {name, overrides, eval_steps}
    patches: [{match: {spec: repa}, overrides: [train.max_steps=4000000]}]   # per-cell additions
    exclude: [{spec: latent_only, backbone: dit_b2}]
    eval: {steps: [...], overrides: [...], settings: [{name, overrides, match}], resources: {...}}
    resources: {gpus_per_node: 8, nodes: 1, hours: 24}

A cell is the list of overrides base + [spec=S] + axes + patches + extra + [train.milestones=...,
grid=NAME]; `bench.compose.load_config` turns it into a config, and `bench.identity.run_dir` into
its folder. Names, overrides and folders depend only on the YAML's content, never on the order of
its mapping keys. Evaluation settings may only change `eval.*` keys (non-identity), so every setting
of a cell evaluates the same run folder.
"""

from __future__ import annotations

import copy
import functools
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from bench.compose import ABLATIONS_DIR, available, load_config
from bench.config import ConfigError, ExperimentConfig
from bench.identity import run_dir as identity_run_dir

GRIDS_DIR = ABLATIONS_DIR / "grids"
SEED_KEY = "train.seed"  # the axis `seeds: {paired: [...]}` adds (with eval.seed of the same value)
TOP_KEYS = ("name", "title", "regenerates", "base", "specs", "axes", "seeds", "cells", "patches", "exclude",
            "eval", "resources", "throughput", "perf", "paper", "baseline", "notes")
EVAL_KEYS = ("steps", "overrides", "settings", "resources")
SETTING_KEYS = ("name", "overrides", "match")
PATCH_KEYS = ("match", "overrides", "eval_steps")
CELL_KEYS = ("name", "overrides", "eval_steps")
RESOURCE_TYPES = {"gpus_per_node": int, "nodes": int, "hours": (int, float), "cpus_per_task": int,
                  "mem_gb": (int, float)}
DEFAULT_SETTINGS = [{"name": "default", "overrides": [], "match": {}}]
SETTING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")  # what bench.evaluate.evaluation accepts


class GridError(ConfigError):
    """A grid file is missing or malformed; the message names the grid, the key and the fix."""


@dataclass
class Grid:
    """A parsed, validated grid file (plain lists and dicts, as `bench report` reads them)."""

    name: str
    path: Path
    title: str
    regenerates: list[str]
    base: list[str]
    specs: list[str]
    axes: dict[str, Any]
    cells: list[dict]
    patches: list[dict]
    exclude: list[dict]
    eval: dict
    resources: dict
    throughput: dict[str, float] = field(default_factory=dict)
    perf: list[str] = field(default_factory=list)
    paper: Optional[dict] = None
    baseline: Optional[str] = None
    notes: str = ""


@dataclass(frozen=True)
class Cell:
    """One training run of a grid: its overrides, composed config and run folder."""

    name: str
    overrides: tuple[str, ...]
    cfg: ExperimentConfig
    run_dir: Path
    labels: Mapping[str, str]
    """spec, cell name and each axis' label: what `match`, `patches` and `exclude` compare."""
    eval_steps: tuple[int, ...]
    """Training steps whose checkpoints the eval stage scores (<= train.max_steps)."""


@dataclass(frozen=True)
class Setting:
    """One evaluation protocol applied to a cell's checkpoints (e.g. a guidance scale)."""

    name: str
    overrides: tuple[str, ...]


# ----------------------------------------------------------------------------------------------
# Loading


def list_grids(grids_dir: Path | str = GRIDS_DIR) -> list[str]:
    """Names of the grid files in `grids_dir` (default `ablations/grids/`)."""
    return sorted(p.stem for p in Path(grids_dir).glob("*.yaml"))


def load_grid(name: str, grids_dir: Path | str = GRIDS_DIR) -> Grid:
    """Read and validate grid `name` (or a path to a grid YAML); GridError lists the known grids."""
    import yaml

    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = Path(grids_dir) / f"{name}.yaml"
    if not path.is_file():
        raise GridError(f"unknown grid {name!r}; available grids: {', '.join(list_grids(grids_dir)) or 'none'} "
                        f"(files in {grids_dir})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML ({err})") from None
    return parse_grid(raw, path)


def _fail(path: Path, message: str) -> GridError:
    return GridError(f"grid {path.stem} ({path}): {message}")


def _strings(path: Path, key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, f"{key} must be a list of `key=value` strings, got {value!r}")
    return list(value)


def _keys(path: Path, where: str, data: Any, allowed: Sequence[str]) -> dict:
    if not isinstance(data, dict):
        raise _fail(path, f"{where} must be a mapping with keys {list(allowed)}, got {data!r}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise _fail(path, f"unknown key(s) {unknown} in {where}; valid keys: {list(allowed)}")
    return data


def _steps(path: Path, key: str, value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                              for v in value):
        raise _fail(path, f"{key} must be a list of positive integers (training steps), got {value!r}")
    return sorted(set(value))


def _resources(path: Path, where: str, value: Any) -> dict:
    data = _keys(path, where, value or {}, tuple(RESOURCE_TYPES))
    for key, expected in RESOURCE_TYPES.items():
        if key in data and (not isinstance(data[key], expected) or isinstance(data[key], bool) or data[key] < 0):
            raise _fail(path, f"{where}.{key} must be a non-negative number, got {data[key]!r}")
    return dict(data)


def _eval_only(path: Path, where: str, overrides: list[str]) -> list[str]:
    for item in overrides:
        if not item.startswith("eval."):
            raise _fail(path, f"{where}: {item!r} is not an eval.* key; evaluation overrides must not "
                              "change the trained model (put training settings in base, axes or cells)")
    return overrides


def parse_grid(raw: Any, path: Path) -> Grid:
    """Validate the YAML content of a grid file (see the module docstring for the schema)."""
    data = _keys(path, "the file", raw, TOP_KEYS)
    if data.get("name") != path.stem:
        raise _fail(path, f"name: {data.get('name')!r} must equal the file name {path.stem!r}")
    specs = data.get("specs") or []
    known = available("spec")
    if not isinstance(specs, list) or any(s not in known for s in specs):
        raise _fail(path, f"specs: {specs!r} must be a list of specs from {known}")
    axes = data.get("axes") or {}
    if not isinstance(axes, dict):
        raise _fail(path, f"axes must be a mapping (key: [values] or name: {{label: [overrides]}}), got {axes!r}")
    axes = with_paired_seeds(path, data.get("seeds"), axes)
    for key, values in axes.items():
        if isinstance(values, dict):
            if not values:
                raise _fail(path, f"axes.{key} has no bundles")
            for label, bundle in values.items():
                _strings(path, f"axes.{key}.{label}", bundle)
        elif not isinstance(values, list) or not values:
            raise _fail(path, f"axes.{key} must be a non-empty list of values or a mapping of bundles")
    cells = []
    for index, item in enumerate(data.get("cells") or []):
        item = {"overrides": item} if isinstance(item, list) else _keys(path, f"cells[{index}]", item, CELL_KEYS)
        cells.append({"name": item.get("name"), "overrides": _strings(path, f"cells[{index}]", item.get("overrides")),
                      "eval_steps": _steps(path, f"cells[{index}].eval_steps", item.get("eval_steps")) or None})
    patches = []
    for index, item in enumerate(data.get("patches") or []):
        item = _keys(path, f"patches[{index}]", item, PATCH_KEYS)
        patches.append({"match": _keys(path, f"patches[{index}].match", item.get("match") or {}, _label_keys(axes)),
                        "overrides": _strings(path, f"patches[{index}].overrides", item.get("overrides")),
                        "eval_steps": _steps(path, f"patches[{index}].eval_steps", item.get("eval_steps")) or None})
    exclude = [_keys(path, f"exclude[{i}]", m, _label_keys(axes)) for i, m in enumerate(data.get("exclude") or [])]
    ev = _keys(path, "eval", data.get("eval") or {}, EVAL_KEYS)
    settings = []
    for index, item in enumerate(ev.get("settings") or DEFAULT_SETTINGS):
        item = _keys(path, f"eval.settings[{index}]", item, SETTING_KEYS)
        if not isinstance(item.get("name"), str) or not SETTING_NAME.fullmatch(item["name"]):
            raise _fail(path, f"eval.settings[{index}] needs a name of letters, digits and _.+=- "
                              f"(it is recorded in eval.jsonl), got {item.get('name')!r}")
        settings.append({"name": item["name"],
                         "overrides": _eval_only(path, f"eval.settings[{index}]",
                                                 _strings(path, f"eval.settings[{index}].overrides",
                                                          item.get("overrides"))),
                         "match": _keys(path, f"eval.settings[{index}].match", item.get("match") or {},
                                        _label_keys(axes))})
    evaluation = {"steps": _steps(path, "eval.steps", ev.get("steps")),
                  "overrides": _eval_only(path, "eval.overrides", _strings(path, "eval.overrides", ev.get("overrides"))),
                  "settings": settings, "resources": _resources(path, "eval.resources", ev.get("resources"))}
    throughput = data.get("throughput") or {}
    if not isinstance(throughput, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in throughput.values()):
        raise _fail(path, f"throughput must map model sizes to images/s per GPU (> 0), got {throughput!r}")
    regenerates = data.get("regenerates") or []
    return Grid(name=path.stem, path=path, title=str(data.get("title") or ""),
                regenerates=[regenerates] if isinstance(regenerates, str) else [str(r) for r in regenerates],
                base=_strings(path, "base", data.get("base")), specs=list(specs), axes=dict(axes), cells=cells,
                patches=patches, exclude=exclude, eval=evaluation,
                resources=_resources(path, "resources", data.get("resources")),
                throughput={str(k): float(v) for k, v in throughput.items()},
                perf=_strings(path, "perf", data.get("perf")), paper=data.get("paper"),
                baseline=data.get("baseline"), notes=str(data.get("notes") or ""))


class PairedSeeds(list):
    """The values of the axis `train.seed` that `seeds: {paired: [...]}` adds (a list of ints)."""


def with_paired_seeds(path: Path, value: Any, axes: dict) -> dict:
    """`axes` plus, for `seeds: {paired: [k, ...]}`, the axis train.seed whose value k sets
    train.seed=k AND eval.seed=k (cells `...-seed=k`; `match`/`exclude` name it `train.seed`).

    Common random numbers: every random stream of a run is derived from (train.seed, purpose)
    (bench.train.loop.derive_seed), so seed k of every spec sees the same data order, VAE posterior
    noise, diffusion times and latent noise; eval.seed=k gives the same class labels and initial
    sampling noise at evaluation. Different k are independent replicates: the report's paired
    differences (bench.report.stats.paired_difference) have n = the number of seeds.
    """
    if value is None:
        return axes
    if not isinstance(value, dict) or set(value) != {"paired"}:
        raise _fail(path, f"seeds must be {{paired: [0, 1, 2]}} (common random numbers across specs), "
                          f"got {value!r}")
    seeds = value["paired"]
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in seeds):
        raise _fail(path, f"seeds.paired must be a non-empty list of distinct non-negative integers, got {seeds!r}")
    if SEED_KEY in axes:
        raise _fail(path, f"give the seeds once: either axes.{SEED_KEY} (independent of the sampling seed) "
                          "or seeds.paired (train.seed and eval.seed together), not both")
    return {**axes, SEED_KEY: PairedSeeds(seeds)}


def _label_keys(axes: Mapping[str, Any]) -> tuple[str, ...]:
    return ("spec", "cell", *axes)


# ----------------------------------------------------------------------------------------------
# Expansion


def format_value(value: Any) -> str:
    """A YAML scalar as Hydra override text (true/false/null, lists as [a,b])."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def _matches(match: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    for key, wanted in match.items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if key not in labels or labels[key] not in {format_value(o) for o in options}:
            return False
    return True


@functools.lru_cache(maxsize=1024)
def _compose(overrides: tuple[str, ...]) -> ExperimentConfig:
    return load_config(overrides)


def compose(overrides: Iterable[str]) -> ExperimentConfig:
    """`load_config`, memoised (a grid is expanded by submit, status and report); returns a copy."""
    return copy.deepcopy(_compose(tuple(overrides)))


def _raw_cells(grid: Grid) -> list[tuple[str, dict[str, str], list[str], Optional[list[int]]]]:
    """(name, labels, overrides, eval_steps) before patches, in a key-order-independent order."""
    out = []
    axis_names = sorted(grid.axes)
    choices = []
    for key in axis_names:
        values = grid.axes[key]
        if isinstance(values, PairedSeeds):
            choices.append([(key, str(k), f"seed={k}", [f"{SEED_KEY}={k}", f"eval.seed={k}"]) for k in values])
        elif isinstance(values, dict):
            choices.append([(key, str(label), label, list(bundle)) for label, bundle in sorted(values.items())])
        else:
            short = key.rsplit(".", 1)[-1]
            choices.append([(key, format_value(v), f"{short}={format_value(v)}", [f"{key}={format_value(v)}"])
                            for v in values])
    for spec in grid.specs:
        for combo in itertools.product(*choices):
            labels = {"spec": spec, **{key: label for key, label, _, _ in combo}}
            name = "-".join([spec, *(short for _, _, short, _ in combo)])
            overrides = [*grid.base, f"spec={spec}", *(o for *_, bundle in combo for o in bundle)]
            out.append((name, labels, overrides, None))
    for index, extra in enumerate(grid.cells):
        specs = [o.split("=", 1)[1] for o in extra["overrides"] if o.startswith("spec=")]
        spec = specs[-1] if specs else ExperimentConfig().spec
        name = extra["name"] or f"{spec}-extra{index}"
        out.append((name, {"spec": spec}, [*grid.base, *extra["overrides"]], extra["eval_steps"]))
    return out


def expand(grid: Grid | str, overrides: Sequence[str] = ()) -> list[Cell]:
    """Every cell of `grid`; `overrides` (e.g. output_root=..., data.prepared_dir=...) go to all cells.

    Raises GridError when a cell does not compose, two cells share a name or a run folder, or an
    evaluation step is not a checkpoint step of its cell.
    """
    grid = load_grid(grid) if isinstance(grid, str) else grid
    cells: list[Cell] = []
    seen_names: dict[str, str] = {}
    seen_dirs: dict[Path, str] = {}
    for name, labels, cell_overrides, eval_steps in _raw_cells(grid):
        labels = {**labels, "cell": name}
        if any(_matches(m, labels) for m in grid.exclude):
            continue
        cell_overrides = list(cell_overrides)
        for patch in grid.patches:
            if _matches(patch["match"], labels):
                cell_overrides += patch["overrides"]
                eval_steps = patch["eval_steps"] or eval_steps
        cell_overrides += list(overrides)
        try:
            cfg = compose([*cell_overrides, f"grid={grid.name}"])
        except ConfigError as err:
            raise GridError(f"grid {grid.name}, cell {name}: {err}") from None
        steps = tuple(s for s in (eval_steps or grid.eval["steps"]) if s <= cfg.train.max_steps)
        for step in steps:
            if step % cfg.train.ckpt_every and step != cfg.train.max_steps:
                raise GridError(f"grid {grid.name}, cell {name}: eval step {step} is not a checkpoint step "
                                f"(train.ckpt_every={cfg.train.ckpt_every}, train.max_steps={cfg.train.max_steps})")
        if steps:  # keep the evaluated checkpoints (train.milestones does not change the run hash)
            milestones = sorted(set(steps) | set(cfg.train.milestones))
            cell_overrides.append(f"train.milestones={format_value(milestones)}")
            cfg.train.milestones = milestones  # what composing the new override list gives, without a recompose
        cell_overrides.append(f"grid={grid.name}")
        folder = identity_run_dir(cfg)
        if name in seen_names:
            raise GridError(f"grid {grid.name}: two cells are named {name!r}; give explicit cells a name")
        if folder in seen_dirs:
            raise GridError(f"grid {grid.name}: cells {seen_dirs[folder]!r} and {name!r} are the same run "
                            f"({folder}); remove one or make them differ in a training setting")
        seen_names[name], seen_dirs[folder] = name, name
        cells.append(Cell(name, tuple(cell_overrides), cfg, folder, labels, steps))
    if not cells:
        raise GridError(f"grid {grid.name} has no cells (specs: {grid.specs}, cells: {len(grid.cells)})")
    return cells


# ----------------------------------------------------------------------------------------------
# Evaluation settings


def settings_for(grid: Grid, cell: Cell) -> list[Setting]:
    """The evaluation settings that apply to `cell` (those whose `match` it satisfies)."""
    out: dict[str, Setting] = {}
    for item in grid.eval["settings"]:
        if _matches(item["match"], cell.labels):
            if item["name"] in out:
                raise GridError(f"grid {grid.name}, cell {cell.name}: two eval settings named "
                                f"{item['name']!r} match it; make their `match` disjoint")
            out[item["name"]] = Setting(item["name"], tuple([*grid.eval["overrides"], *item["overrides"]]))
    return list(out.values())


def eval_config(cell: Cell, setting: Setting) -> ExperimentConfig:
    """The cell's config with the setting's `eval.*` overrides (same run folder, validated)."""
    from omegaconf import OmegaConf

    try:
        merged = OmegaConf.merge(OmegaConf.structured(cell.cfg), OmegaConf.from_dotlist(list(setting.overrides)))
        cfg = OmegaConf.to_object(merged)
    except ConfigError as err:
        raise GridError(f"cell {cell.name}, eval setting {setting.name}: {err}") from None
    except Exception as err:  # omegaconf: unknown key or wrong type
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GridError(f"cell {cell.name}, eval setting {setting.name}: {first}") from None
    assert isinstance(cfg, ExperimentConfig)
    return cfg
