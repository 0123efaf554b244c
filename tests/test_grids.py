"""Ablation grids (bench.launch.grids, ablations/grids/): every grid composes, cells are stable, errors are clear.

What is checked: every cell of every grid composes with `bench.compose.load_config` and every eval
setting validates; the paper grids follow the paper's protocol (DiT = DDPM + learned sigma + DDPM
sampling, SiT = flow + SDE, 250 steps, 50K samples) and evaluate only checkpoints they keep; the
smoke grid's cell names, overrides and run folders are pinned (a change in the hash is a change in
identity and must be deliberate); expansion does not depend on the YAML's mapping-key order; the
expansion rules (product, patches, exclude, explicit cells, setting match) give exactly the cells
enumerated by hand here; malformed grids fail with one error naming the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench.compose import load_config
from bench.launch.grids import (
    GRIDS_DIR,
    GridError,
    eval_config,
    expand,
    list_grids,
    load_grid,
    parse_grid,
    settings_for,
)
from bench.launch.jobs import metric_names
from bench.run_hash import run_dir

PAPER_CSV = Path(__file__).resolve().parents[1] / "results" / "paper"
MINI = ("mini_table1", "mini_table4", "mini_table6", "mini_figure7")
PAPER = ("table1", "table3", "table4", "table5_table10", "table6", "table9_figure2", "figure6", "figure7")


def test_the_grids_of_the_issue_exist():
    assert set(PAPER) | set(MINI) | {"smoke"} <= set(list_grids())


@pytest.mark.parametrize("name", list_grids())
def test_every_cell_and_every_setting_composes(name):
    grid = load_grid(name)
    cells = expand(grid)
    for cell in cells:
        # The cell's own override list reproduces its config exactly (nothing hidden in expand).
        assert load_config(cell.overrides) == cell.cfg
        assert cell.run_dir == run_dir(cell.cfg) and cell.cfg.grid == name
        # Evaluated steps exist as kept checkpoints: within the run and in train.milestones.
        assert all(0 < s <= cell.cfg.train.max_steps for s in cell.eval_steps)
        assert set(cell.eval_steps) <= set(cell.cfg.train.milestones) | {cell.cfg.train.max_steps}
        settings = settings_for(grid, cell)
        assert settings, f"{name}/{cell.name} has no evaluation setting"
        for setting in settings:
            cfg = eval_config(cell, setting)
            assert run_dir(cfg) == cell.run_dir  # evaluation never changes the run's identity
            assert metric_names(cfg)  # bench.evaluate.score_run can compute every requested metric
    for table in grid.regenerates:  # bench report pairs the grid with these published numbers
        assert (PAPER_CSV / f"{table}.csv").is_file() or table == "figure2", table


@pytest.mark.parametrize("name", PAPER)
def test_paper_grids_follow_the_paper_protocol(name):
    for cell in expand(name):
        cfg = cell.cfg
        assert cfg.data.name == "imagefolder" and cfg.data.image_size == 256
        assert cfg.eval.num_samples == 50_000 and cfg.eval.num_sampling_steps == 250
        if cfg.objective.transport == "ddpm":  # DiT rows
            assert cfg.model.learn_sigma and cfg.eval.sampler == "ddpm"
        else:  # SiT rows
            assert cfg.objective.transport == "flow" and cfg.eval.sampler == "sde"
        if cfg.model.fusion != "none":
            assert cfg.model.pca_rank == 8 or name == "figure7"


@pytest.mark.parametrize("name", MINI)
def test_mini_grids_run_on_the_embedded_default_with_two_seeds(name):
    cells = expand(name)
    assert all(c.cfg.data.name == "fashion_mnist" and c.cfg.model.size == "custom" for c in cells)
    assert {c.cfg.train.seed for c in cells} == {0, 1}
    assert all(c.cfg.train.max_steps <= 2000 for c in cells)  # ~10 CPU-minutes per cell


def test_table1_rows_and_long_runs():
    cells = {c.name: c for c in expand("table1")}
    assert len(cells) == 12  # {latent_only, repa, redi} x {DiT, SiT} x {L/2, XL/2}
    long = {name: (c.cfg.train.max_steps, c.eval_steps) for name, c in cells.items()
            if c.cfg.train.max_steps != 400_000}
    assert long == {"latent_only-dit_xl2": (7_000_000, (400_000, 7_000_000)),
                    "latent_only-sit_xl2": (7_000_000, (400_000, 7_000_000)),
                    "repa-dit_xl2": (850_000, (400_000, 850_000)),
                    "repa-sit_xl2": (4_000_000, (400_000, 4_000_000)),
                    "redi-sit_xl2": (4_000_000, (400_000, 700_000, 4_000_000))}
    assert cells["redi-dit_l2"].cfg.model.size == "L/2" and cells["redi-dit_l2"].eval_steps == (400_000,)


def test_table4_scores_one_model_with_and_without_rg():
    grid = load_grid("table4")
    scales = {c.name: {s.name: eval_config(c, s).eval.guidance.rg_scale for s in settings_for(grid, c)}
              for c in expand(grid)}
    assert scales == {"redi_rg-dit_b2": {"no_rg": 1.0, "rg": 1.5}, "redi_rg-dit_xl2": {"no_rg": 1.0, "rg": 1.1}}


# ----------------------------------------------------------------------------------------------
# Stability


# Pinned: the run folders of the smoke grid. A new identity field in bench/config.py changes them;
# update these only on purpose (old run folders would no longer be found). Last moved by
# scale=embedded's train.compile going from false to auto.
SMOKE = {"latent_only": "results/runs/smoke/latent_only-7a75c12d",
         "redi": "results/runs/smoke/redi-9862e21f"}


def test_smoke_cells_and_hashes_are_pinned():
    cells = expand("smoke")
    assert {c.name: str(c.run_dir) for c in cells} == SMOKE
    assert cells[1].overrides[-3:] == ("spec=redi", "train.milestones=[2,4]", "grid=smoke")
    assert [c.eval_steps for c in cells] == [(2, 4), (2, 4)]
    assert {c.name: str(c.run_dir) for c in expand("smoke")} == SMOKE  # and again


def _reverse_keys(value):
    if isinstance(value, dict):
        return {k: _reverse_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reverse_keys(v) for v in value]
    return value


@pytest.mark.parametrize("name", ["smoke", "mini_table6"])
def test_expansion_does_not_depend_on_yaml_key_order(name, tmp_path):
    original = (GRIDS_DIR / f"{name}.yaml").read_text()
    raw = yaml.safe_load(original)
    reordered = yaml.safe_dump(_reverse_keys(raw), sort_keys=False)
    assert reordered.splitlines()[0] != original.splitlines()[0] or len(raw) == 1
    (tmp_path / f"{name}.yaml").write_text(reordered)
    a, b = expand(load_grid(name)), expand(load_grid(name, tmp_path))
    assert [(c.name, c.overrides, c.run_dir) for c in a] == [(c.name, c.overrides, c.run_dir) for c in b]


# ----------------------------------------------------------------------------------------------
# Expansion rules, against a hand enumeration

RULES = """
name: rules
base: [scale=embedded, model.hidden_size=32, model.depth=2, model.num_heads=2, train.max_steps=40, train.ckpt_every=10]
specs: [latent_only, redi]
axes:
  train.seed: [0, 1]
  width: {narrow: [model.hidden_size=32], wide: [model.hidden_size=64]}
exclude:
  - {spec: latent_only, width: wide}
patches:
  - {match: {spec: redi, train.seed: 1}, overrides: [train.max_steps=20]}
cells:
  - [spec=repa, train.seed=3]
  - {name: special, overrides: [spec=redi, model.pca_rank=4], eval_steps: [10]}
eval:
  steps: [10, 30]
  settings:
    - {name: plain}
    - {name: rg, match: {spec: redi}, overrides: [eval.guidance.rg_scale=1.5]}
"""


def _grid(tmp_path: Path, text: str, name: str = "rules"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return load_grid(name, tmp_path)


def test_expansion_rules_match_a_hand_enumeration(tmp_path):
    grid = _grid(tmp_path, RULES)
    cells = {c.name: c for c in expand(grid)}
    # 2 specs x 2 seeds x 2 widths = 8, minus latent_only x wide (2), plus 2 explicit cells.
    assert sorted(cells) == sorted([
        "latent_only-seed=0-narrow", "latent_only-seed=1-narrow",
        "redi-seed=0-narrow", "redi-seed=0-wide", "redi-seed=1-narrow", "redi-seed=1-wide",
        "repa-extra0", "special"])
    assert cells["redi-seed=1-wide"].cfg.model.hidden_size == 64
    assert cells["redi-seed=1-wide"].cfg.train.max_steps == 20  # patched
    assert cells["redi-seed=0-wide"].cfg.train.max_steps == 40  # not matched
    assert cells["redi-seed=1-wide"].eval_steps == (10,)  # 30 > max_steps 20 is dropped
    assert cells["redi-seed=0-wide"].eval_steps == (10, 30)
    assert cells["special"].eval_steps == (10,) and cells["special"].cfg.model.pca_rank == 4
    assert cells["repa-extra0"].cfg.spec == "repa" and cells["repa-extra0"].cfg.train.seed == 3
    assert [s.name for s in settings_for(grid, cells["redi-seed=0-wide"])] == ["plain", "rg"]
    assert [s.name for s in settings_for(grid, cells["latent_only-seed=0-narrow"])] == ["plain"]
    rg = [s for s in settings_for(grid, cells["special"]) if s.name == "rg"][0]
    assert eval_config(cells["special"], rg).eval.guidance.rg_scale == 1.5


def test_a_setting_restricted_to_steps_scores_only_those(tmp_path):
    """`steps:` on a setting (the demo's RG at its final checkpoint only): the setting scores only
    those of a cell's evaluation steps, and does not apply to a cell that scores none of them."""
    from bench.launch.status import eval_pairs

    grid = _grid(tmp_path, RULES.replace("overrides: [eval.guidance.rg_scale=1.5]}",
                                         "overrides: [eval.guidance.rg_scale=1.5], steps: [30]}"))
    cells = {c.name: c for c in expand(grid)}
    full, short = cells["redi-seed=0-wide"], cells["redi-seed=1-wide"]  # eval steps (10, 30) and (10,)
    pairs = {s.name: steps for s, _, steps in eval_pairs(grid, full, tmp_path)}
    assert pairs == {"plain": [10, 30], "rg": [30]}
    assert [s.name for s in settings_for(grid, short)] == ["plain"]
    assert [s.name for s in settings_for(grid, cells["special"])] == ["plain"]  # eval_steps [10]
    rg = [s for s in settings_for(grid, full) if s.name == "rg"][0]
    assert rg.steps == (30,) and rg.scores([10, 30]) == [30]
    # the demo grids use it: RG at the last step only, plain at every step
    for name, last in (("demo", 600), ("demo_quick", 200)):
        demo = load_grid(name)
        cell = next(c for c in expand(demo) if c.cfg.spec == "redi_rg")
        assert {s.name: s.scores(cell.eval_steps) for s in settings_for(demo, cell)} == \
            {"plain": list(cell.eval_steps), "rg1.5": [last]}


def test_extra_overrides_reach_every_cell_without_changing_identity(tmp_path):
    a = expand("smoke")
    b = expand("smoke", [f"output_root={tmp_path}", "data.prepared_dir=/elsewhere"])
    assert [c.run_dir.name for c in a] == [c.run_dir.name for c in b]
    assert all(c.run_dir.parent == tmp_path / "smoke" for c in b)


# ----------------------------------------------------------------------------------------------
# Errors


def test_unknown_grid_lists_the_available_ones():
    with pytest.raises(GridError, match="unknown grid 'nope'.*mini_table1.*smoke"):
        load_grid("nope")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t + "colour: red\n", r"unknown key\(s\) \['colour'\].*valid keys"),
    (lambda t: t.replace("name: rules", "name: other"), "must equal the file name"),
    (lambda t: t.replace("specs: [latent_only, redi]", "specs: [latent_only, nope]"), "specs"),
    (lambda t: t.replace("overrides: [eval.guidance.rg_scale=1.5]", "overrides: [train.seed=9]"),
     "not an eval.\\* key"),
    (lambda t: t.replace("steps: [10, 30]", "steps: [10, 15]"), "eval step 15 is not a checkpoint step"),
    (lambda t: t.replace("[spec=repa, train.seed=3]", "[spec=repa, train.sed=3]"), "cell repa-extra0"),
    (lambda t: t.replace("[spec=repa, train.seed=3]", "[spec=redi, train.seed=0]"), "are the same run"),
    (lambda t: t.replace("{name: plain}", "{name: rg}"), "two eval settings named 'rg'"),
    (lambda t: t.replace("{name: plain}", "{name: 'no cfg'}"), "needs a name of letters"),
    (lambda t: t.replace("{spec: latent_only, width: wide}", "{spec: latent_only, colour: wide}"),
     r"unknown key\(s\) \['colour'\] in exclude"),
    # Types and keys come from the schema (GridSchema merged through OmegaConf); the message still
    # names the grid, where the key is, and what was expected.
    (lambda t: t.replace("train.max_steps=20]}", "train.max_steps=20], colour: red}"),
     r"grid rules .*unknown key\(s\) \['colour'\] in patches\[0\]; valid keys: \['match', 'overrides', 'eval_steps'\]"),
    (lambda t: t.replace("steps: [10, 30]", "steps: [10, ten]"),
     r"grid rules .*: eval\.steps\[1\] must be int, got 'ten'"),
    (lambda t: t.replace("eval_steps: [10]", "eval_steps: 10"), r"cells\[1\]\.eval_steps must be list\[int\], got 10"),
    (lambda t: t + "resources: {hours: many}\n", r": resources\.hours must be Optional\[float\], got 'many'"),
    (lambda t: t + "resources: {nodes: -1}\n", r"resources\.nodes must be a non-negative number"),
    (lambda t: t.replace("{name: plain}", "{overrides: []}"), r"eval\.settings\[0\] needs `name`"),
    (lambda t: t.replace("{name: plain}", "{name: plain, steps: [20]}"),
     r"eval\.settings\[0\]\.steps \[20\] are not steps the eval stage scores \(.*\[10, 30\]\)"),
])
def test_malformed_grids_fail_with_one_clear_error(tmp_path, edit, message):
    grid_text = edit(RULES)
    with pytest.raises(GridError, match=message):
        grid = _grid(tmp_path, grid_text)
        for cell in expand(grid):
            settings_for(grid, cell)


def test_parse_rejects_non_mapping(tmp_path):
    with pytest.raises(GridError, match="must be a mapping"):
        parse_grid(["not", "a", "mapping"], tmp_path / "x.yaml")


def test_report_reads_grids_through_this_module(tmp_path):
    from bench.report.summary import load_grid_spec

    fields, expected = load_grid_spec("smoke", tmp_path)
    assert fields["regenerates"] == [] and fields["eval"]["settings"][0]["name"] == "default"
    assert [item[0].name for item in expected] == [Path(p).name for p in SMOKE.values()]


# ----------------------------------------------------------------------------------------------
# The smoke grid's evaluation is valid on real data, and the command line wins


def test_smoke_eval_has_enough_samples_for_the_prepared_classifier():
    """FD needs at least as many samples as feature dimensions; `bench prepare` trains the
    classifier with ClassifierSettings' defaults, the features the smoke grid is scored on."""
    from bench.prepare.embedded import ClassifierSettings

    grid = load_grid("smoke")
    for cell in expand(grid):
        for setting in settings_for(grid, cell):
            cfg = eval_config(cell, setting)
            assert cfg.eval.feature_network == "classifier"
            assert cfg.eval.num_samples >= ClassifierSettings().feature_dim


def test_command_line_eval_overrides_win_over_the_grids_eval_settings():
    grid = load_grid("smoke")
    cells = expand(grid, ["eval.num_samples=300", "eval.batch_size=50"])
    for cell in cells:
        for setting in settings_for(grid, cell):
            cfg = eval_config(cell, setting)
            assert (cfg.eval.num_samples, cfg.eval.batch_size) == (300, 50)  # the user's, not the grid's 128/64
            assert cfg.eval.num_sampling_steps == 2  # what the user did not type stays the grid's
    plain = expand(grid)  # without a command line the grid's settings apply
    assert eval_config(plain[0], settings_for(grid, plain[0])[0]).eval.num_samples == 128
    assert [c.run_dir for c in cells] == [c.run_dir for c in plain]  # eval.* never changes identity
