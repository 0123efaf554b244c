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
    eval: {steps: [...], overrides: [...], settings: [{name, overrides, match, steps}], resources: {...}}
    resources: {gpus_per_node: 8, nodes: 1, hours: 24}

The keys and their types are the dataclasses `GridSchema` and friends below, merged with the YAML
through OmegaConf as experiment configs are. A cell is the list of overrides base + [spec=S] + axes
+ patches + extra + command line + [train.milestones=..., grid=NAME]; `bench.compose.load_config`
turns it into a config, and `bench.run_hash.run_dir` into its folder. Names, overrides and folders
depend only on the YAML's content, never on the order of its mapping keys. Evaluation settings may
only change `eval.*` keys (non-identity), so every setting of a cell evaluates the same run folder;
`eval.*` keys given on the command line win over them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import re
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from omegaconf import MISSING

from bench import resources
from bench.compose import ABLATIONS_DIR, available, load_config
from bench.config import ConfigError, ExperimentConfig
from bench.run_hash import run_dir as identity_run_dir

GRIDS_DIR = ABLATIONS_DIR / "grids"  # the shipped grids; a user folder's grids/ come first (bench.resources)
SEED_KEY = "train.seed"  # the axis `seeds: {paired: [...]}` adds (with eval.seed of the same value)
SETTING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")  # what bench.evaluate.score_run accepts


# ----------------------------------------------------------------------------------------------
# The schema: what a grid file may hold, typed. OmegaConf merges the YAML into these dataclasses
# (as bench.compose does for experiment configs), so an unknown key or a value of the wrong type
# fails with the key's path; the checks OmegaConf cannot express follow in `parse_grid`.


@dataclass
class ResourcesSchema:
    """SLURM resources of a stage; unset keys fall back to the cluster profile."""

    gpus_per_node: Optional[int] = None
    nodes: Optional[int] = None
    hours: Optional[float] = None
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None


@dataclass
class SettingSchema:
    """One evaluation protocol: a name (recorded in eval.jsonl), eval.* overrides, the cells it fits
    and, optionally, the only checkpoints it scores (e.g. an expensive guided setting at the final
    step alone; empty: every step the cell's eval stage scores)."""

    name: str = MISSING
    overrides: list[str] = field(default_factory=list)
    match: dict[str, Any] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)


@dataclass
class EvalSchema:
    steps: list[int] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    settings: list[Any] = field(default_factory=lambda: [{"name": "default"}])  # SettingSchema each
    resources: ResourcesSchema = field(default_factory=ResourcesSchema)


@dataclass
class PatchSchema:
    match: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)


@dataclass
class CellSchema:
    """An explicit extra cell; in the YAML also just its list of overrides."""

    name: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)


@dataclass
class GridSchema:
    """A grid file (ablations/README.md documents each key)."""

    name: str = MISSING
    title: str = ""
    regenerates: list[str] = field(default_factory=list)  # a single id may be written without [ ]
    base: list[str] = field(default_factory=list)
    specs: list[str] = field(default_factory=list)
    axes: dict[str, Any] = field(default_factory=dict)  # key: [values] or name: {label: [overrides]}
    seeds: Any = None  # {paired: [0, 1, 2]}; any shape here, so with_paired_seeds can say what is wrong
    cells: list[Any] = field(default_factory=list)  # CellSchema each
    patches: list[Any] = field(default_factory=list)  # PatchSchema each
    exclude: list[dict[str, Any]] = field(default_factory=list)
    eval: EvalSchema = field(default_factory=EvalSchema)
    resources: ResourcesSchema = field(default_factory=ResourcesSchema)
    throughput: dict[str, float] = field(default_factory=dict)  # model size -> images/s per GPU
    perf: list[str] = field(default_factory=list)  # `bench perf` commands that measure this grid
    paper: Optional[dict[str, Any]] = None
    baseline: Optional[str] = None
    notes: str = ""


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
    command_line: tuple[str, ...] = ()
    """The overrides given to `expand` (the user's command line): they also win over the grid's
    evaluation settings (`eval_config`)."""


@dataclass(frozen=True)
class Setting:
    """One evaluation protocol applied to a cell's checkpoints (e.g. a guidance scale)."""

    name: str
    overrides: tuple[str, ...]
    steps: tuple[int, ...] = ()
    """The only training steps this setting scores; empty: all of the cell's."""

    def scores(self, steps: Iterable[int]) -> list[int]:
        """Of a cell's evaluation steps, those this setting scores."""
        return [s for s in steps if not self.steps or s in self.steps]


# ----------------------------------------------------------------------------------------------
# Loading


def list_grids(grids_dir: Path | str | None = None) -> list[str]:
    """Names of the grid files in `grids_dir` (None: the search path's and the shipped ones)."""
    if grids_dir is None:
        return list(resources.items("grids"))
    return sorted(p.stem for p in Path(grids_dir).glob("*.yaml"))


def grid_path(name: str, grids_dir: Path | str | None = None) -> Path:
    """The YAML of grid `name` (or `name` itself when it is a path to one)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    if grids_dir is not None and (Path(grids_dir) / f"{name}.yaml").is_file():
        return Path(grids_dir) / f"{name}.yaml"
    item = resources.find("grids", name) if grids_dir is None else None
    if item is not None:
        return item.path
    where = str(grids_dir) if grids_dir is not None else ", ".join(str(d) for d, _ in resources.search_dirs("grids"))
    raise GridError(f"unknown grid {name!r}; available grids: {', '.join(list_grids(grids_dir)) or 'none'} "
                    f"(files in {where})")


def load_grid(name: str, grids_dir: Path | str | None = None) -> Grid:
    """Read and validate grid `name` (or a path to a grid YAML); GridError lists the known grids."""
    import yaml

    path = grid_path(name, grids_dir)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML ({err})") from None
    return parse_grid(raw, path)


def _fail(path: Path, message: str) -> GridError:
    return GridError(f"grid {path.stem} ({path}): {message}")


def _typed(path: Path, where: str, schema: type, raw: Any) -> Any:
    """`raw` merged into `schema` (OmegaConf structured config) -> a schema instance, or GridError
    naming the grid, `where`.key, what is wrong and what is allowed."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

    valid = [f.name for f in dataclass_fields(schema)]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail(path, f"{where} must be a mapping with keys {valid}, got {raw!r}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw))
    except ConfigKeyError:
        unknown = sorted(set(map(str, raw)) - set(valid))
        raise _fail(path, f"unknown key(s) {unknown} in {where}; valid keys: {valid}") from None
    except MissingMandatoryValue as err:
        raise _fail(path, f"{where} needs `{err.full_key}`") from None
    except OmegaConfBaseException as err:
        key = str(getattr(err, "full_key", "") or "")
        loc = key if where == "the file" else f"{where}.{key}"
        expected, value = _expected_and_given(schema, raw, key)
        raise _fail(path, f"{loc} must be {expected}, got {value!r} (a list is written [a, b]; "
                          "overrides are `key=value` strings)") from None


def _expected_and_given(schema: type, raw: Any, key: str) -> tuple[str, Any]:
    """The schema's type at dotted/indexed `key` (as text) and the value the YAML gave there."""
    import typing

    expected: Any = schema
    value = raw
    for part in re.findall(r"[^.\[\]]+", key):
        if dataclasses.is_dataclass(expected):
            expected = typing.get_type_hints(expected).get(part, Any)
        elif typing.get_origin(expected) in (list, dict):
            expected = typing.get_args(expected)[-1]
        try:
            value = value[int(part)] if isinstance(value, list) else value[part]
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    text = getattr(expected, "__name__", None) if not typing.get_args(expected) else None
    return (text or str(expected).replace("typing.", "")), value


def _keys(path: Path, where: str, data: Any, allowed: Sequence[str]) -> dict:
    """A `match`/`exclude` mapping: its keys must be labels of the cells (spec, cell, axis names)."""
    if not isinstance(data, dict):
        raise _fail(path, f"{where} must be a mapping with keys {list(allowed)}, got {data!r}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise _fail(path, f"unknown key(s) {unknown} in {where}; valid keys: {list(allowed)}")
    return data


def _steps(path: Path, key: str, value: list[int]) -> list[int]:
    if any(v <= 0 for v in value):
        raise _fail(path, f"{key} must be a list of positive integers (training steps), got {value!r}")
    return sorted(set(value))


def _resources(path: Path, where: str, value: ResourcesSchema) -> dict:
    data = {k: v for k, v in vars(value).items() if v is not None}
    for key, number in data.items():
        if number < 0:
            raise _fail(path, f"{where}.{key} must be a non-negative number, got {number!r}")
    return data


def _eval_only(path: Path, where: str, overrides: list[str]) -> list[str]:
    for item in overrides:
        if not item.startswith("eval."):
            raise _fail(path, f"{where}: {item!r} is not an eval.* key; evaluation overrides must not "
                              "change the trained model (put training settings in base, axes or cells)")
    return overrides


def _check_axes(path: Path, axes: dict) -> dict:
    """Every axis is a non-empty list of values or a non-empty mapping of labelled override bundles."""
    for key, values in axes.items():
        if isinstance(values, dict):
            if not values:
                raise _fail(path, f"axes.{key} has no bundles")
            for label, bundle in values.items():
                if not isinstance(bundle, list) or not all(isinstance(v, str) for v in bundle):
                    raise _fail(path, f"axes.{key}.{label} must be a list of `key=value` strings, got {bundle!r}")
        elif not isinstance(values, list) or not values:
            raise _fail(path, f"axes.{key} must be a non-empty list of values or a mapping of bundles")
    return axes


def _cells(path: Path, items: list) -> list[dict]:
    cells = []
    for index, item in enumerate(items):
        cell: CellSchema = _typed(path, f"cells[{index}]", CellSchema,
                                  {"overrides": item} if isinstance(item, list) else item)
        cells.append({"name": cell.name, "overrides": cell.overrides,
                      "eval_steps": _steps(path, f"cells[{index}].eval_steps", cell.eval_steps) or None})
    return cells


def _patches(path: Path, items: list, labels: Sequence[str]) -> list[dict]:
    patches = []
    for index, item in enumerate(items):
        patch: PatchSchema = _typed(path, f"patches[{index}]", PatchSchema, item)
        patches.append({"match": _keys(path, f"patches[{index}].match", patch.match, labels),
                        "overrides": patch.overrides,
                        "eval_steps": _steps(path, f"patches[{index}].eval_steps", patch.eval_steps) or None})
    return patches


def _evaluation(path: Path, data: EvalSchema, labels: Sequence[str], cells: list[dict], patches: list[dict]) -> dict:
    """The eval section: named settings of eval.* overrides, scoring only steps the eval stage scores."""
    settings = []
    for index, item in enumerate(data.settings):
        where = f"eval.settings[{index}]"
        setting: SettingSchema = _typed(path, where, SettingSchema, item)
        if not SETTING_NAME.fullmatch(setting.name):
            raise _fail(path, f"{where} needs a name of letters, digits and _.+=- "
                              f"(it is recorded in eval.jsonl), got {setting.name!r}")
        settings.append({"name": setting.name, "overrides": _eval_only(path, where, setting.overrides),
                         "match": _keys(path, f"{where}.match", setting.match, labels),
                         "steps": _steps(path, f"{where}.steps", setting.steps)})
    scored = set(data.steps) | {s for c in cells for s in c["eval_steps"] or ()} \
        | {s for p in patches for s in p["eval_steps"] or ()}
    for index, setting in enumerate(settings):
        if stray := sorted(set(setting["steps"]) - scored):
            raise _fail(path, f"eval.settings[{index}].steps {stray} are not steps the eval stage scores "
                              f"(eval.steps and the cells' eval_steps: {sorted(scored)})")
    return {"steps": _steps(path, "eval.steps", data.steps),
            "overrides": _eval_only(path, "eval.overrides", data.overrides),
            "settings": settings, "resources": _resources(path, "eval.resources", data.resources)}


def parse_grid(raw: Any, path: Path) -> Grid:
    """Validate the YAML content of a grid file: types and keys through `GridSchema`, then the
    rules a schema cannot state (names, specs, axes, labels, eval-only overrides)."""
    if isinstance(raw, dict) and isinstance(raw.get("regenerates"), str):
        raw = {**raw, "regenerates": [raw["regenerates"]]}
    data: GridSchema = _typed(path, "the file", GridSchema, raw)
    if data.name != path.stem:
        raise _fail(path, f"name: {data.name!r} must equal the file name {path.stem!r}")
    known = available("spec")
    if any(s not in known for s in data.specs):
        raise _fail(path, f"specs: {data.specs!r} must be a list of specs from {known}")
    axes = _check_axes(path, with_paired_seeds(path, data.seeds, data.axes))
    labels = _label_keys(axes)
    cells = _cells(path, data.cells)
    patches = _patches(path, data.patches, labels)
    exclude = [_keys(path, f"exclude[{i}]", m, labels) for i, m in enumerate(data.exclude)]
    evaluation = _evaluation(path, data.eval, labels, cells, patches)
    if not all(v > 0 for v in data.throughput.values()):
        raise _fail(path, f"throughput must map model sizes to images/s per GPU (> 0), got {data.throughput!r}")
    return Grid(name=path.stem, path=path, title=data.title, regenerates=data.regenerates, base=data.base,
                specs=data.specs, axes=axes, cells=cells, patches=patches, exclude=exclude, eval=evaluation,
                resources=_resources(path, "resources", data.resources), throughput=data.throughput,
                perf=data.perf, paper=data.paper, baseline=data.baseline, notes=data.notes)


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
def _compose(overrides: tuple[str, ...], search: tuple[str, ...]) -> ExperimentConfig:
    return load_config(overrides)


def compose(overrides: Iterable[str]) -> ExperimentConfig:
    """`load_config`, memoised (a grid is expanded by submit, status and report); returns a copy.
    The memo is per search path (the user folders decide specs, scales and the site file)."""
    search = tuple(str(f) for f in resources.user_folders())
    return copy.deepcopy(_compose(tuple(overrides), search))


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
        cells.append(Cell(name, tuple(cell_overrides), cfg, folder, labels, steps, tuple(overrides)))
    if not cells:
        raise GridError(f"grid {grid.name} has no cells (specs: {grid.specs}, cells: {len(grid.cells)})")
    return cells


# ----------------------------------------------------------------------------------------------
# Evaluation settings


def settings_for(grid: Grid, cell: Cell) -> list[Setting]:
    """The evaluation settings that apply to `cell`: those whose `match` it satisfies and, for a
    setting restricted to some `steps`, that score at least one of the cell's evaluation steps."""
    out: dict[str, Setting] = {}
    for item in grid.eval["settings"]:
        if item.get("steps") and cell.eval_steps and not set(item["steps"]) & set(cell.eval_steps):
            continue  # none of the steps it scores is a checkpoint this cell's eval stage scores
        if _matches(item["match"], cell.labels):
            if item["name"] in out:
                raise GridError(f"grid {grid.name}, cell {cell.name}: two eval settings named "
                                f"{item['name']!r} match it; make their `match` disjoint")
            out[item["name"]] = Setting(item["name"], tuple([*grid.eval["overrides"], *item["overrides"]]),
                                        tuple(item.get("steps") or ()))
    return list(out.values())


def eval_config(cell: Cell, setting: Setting) -> ExperimentConfig:
    """The cell's config with the setting's `eval.*` overrides (same run folder, validated), then
    the command line's `eval.*` overrides again: what the user typed wins over the grid's file."""
    from omegaconf import OmegaConf

    typed = [o for o in cell.command_line if o.startswith("eval.")]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cell.cfg), OmegaConf.from_dotlist(list(setting.overrides)),
                                 OmegaConf.from_dotlist(typed))
        cfg = OmegaConf.to_object(merged)
    except ConfigError as err:
        raise GridError(f"cell {cell.name}, eval setting {setting.name}: {err}") from None
    except Exception as err:  # omegaconf: unknown key or wrong type
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GridError(f"cell {cell.name}, eval setting {setting.name}: {first}") from None
    assert isinstance(cfg, ExperimentConfig)
    return cfg
