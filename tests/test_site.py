"""The search path and the site file (bench.resources, bench.site; docs/cluster.md).

A user folder's grids, specs, scales and profiles come before the shipped ones of the same name;
`site.yaml` puts this machine's paths into the config every stage composes, only where that config
uses them, below the command line, and never into the run hash. Each stage is checked through the
function it calls: `load_config` (prepare, train, doctor, weights), the grid's cells and their eval
configs (`bench grid`, both stages), `resolve_run_config` (eval, sample, export of a run folder)
and `bench report`'s default output root.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from bench import resources
from bench.cli import main as cli_main
from bench.compose import available, load_config, to_dict
from bench.launch.grids import eval_config, expand, list_grids, load_grid, settings_for
from bench.launch.profiles import list_profiles, load_profile
from bench.launch.submit import format_catalogue
from bench.run_hash import run_hash
from bench.site import SITE_KEYS, SiteError, load_site

PAPER_PATHS = {"output_root": "runs", "data.root": "/data/imagenet", "data.prepared_dir": "prepared/in256",
               "vae.path": "/models/sd-vae-ft-ema", "encoder.weights": "/models/dinov2.safetensors",
               "eval.inception_weights": "/models/inception.pth", "eval.reference": "/models/ref.npz"}


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """An unrelated working folder, and no user folder from the caller's environment."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(resources.SEARCH_ENV, raising=False)
    return work


def write_site(folder: Path, paths: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    nested: dict = {}
    for key, value in paths.items():
        *sections, name = key.split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = value
    path = folder / "site.yaml"
    path.write_text(json.dumps(nested), encoding="utf-8")  # JSON is YAML
    return path


def test_user_folders_come_first_and_say_where_they_came_from(elsewhere, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    (mine / "spec").mkdir(parents=True)
    (mine / "grids").mkdir()
    (mine / "profiles").mkdir()
    (mine / "spec" / "redi.yaml").write_text("# @package _global_\nspec: redi\nmodel:\n  fusion: merged\n"
                                             "  pca_rank: 4\n")
    (mine / "spec" / "mine.yaml").write_text("# @package _global_\nspec: mine\nmodel:\n  fusion: none\n")
    smoke = (resources.shipped("ablations") / "grids" / "smoke.yaml").read_text()
    (mine / "grids" / "smoke.yaml").write_text(re.sub(r"(?m)^title: .*$", 'title: "MINE smoke"', smoke))
    (mine / "profiles" / "local.yaml").write_text("executor: local\ncpus_per_task: 3\n")
    (mine / "profiles" / "mycluster.yaml").write_text("executor: slurm\npartition: gpu\n")
    assert load_config(["spec=redi"]).model.pca_rank == 8 and "mine" not in available("spec")

    monkeypatch.setenv(resources.SEARCH_ENV, str(mine))
    assert load_config(["spec=redi"]).model.pca_rank == 4  # the user's redi hides the shipped one
    assert load_config(["spec=mine"]).model.fusion == "none" and "mine" in available("spec")
    assert load_config(["spec=repa"]).objective.lambda_repa > 0  # shipped specs still compose
    assert load_grid("smoke").title.startswith("MINE") and "table1" in list_grids()
    assert load_profile("local").cpus_per_task == 3 and "mycluster" in list_profiles()
    listing = format_catalogue()
    assert "MINE smoke" in listing and f"[from {mine}]" in listing and f"mycluster [from {mine}]" in listing
    (table1,) = [line for line in listing.splitlines() if line.startswith("table1 ")]
    (smoke_line,) = [line for line in listing.splitlines() if line.startswith("smoke ")]
    assert "[from" not in table1 and smoke_line.endswith(f"[from {mine}]")


def test_the_working_folders_redi_bench_is_searched_after_the_variable(elsewhere, tmp_path, monkeypatch):
    local = elsewhere / resources.LOCAL_FOLDER
    (local / "profiles").mkdir(parents=True)
    (local / "profiles" / "local.yaml").write_text("executor: local\ncpus_per_task: 5\n")
    assert resources.user_folders() == [local.resolve()]
    assert load_profile("local").cpus_per_task == 5
    first = tmp_path / "first"
    (first / "profiles").mkdir(parents=True)
    (first / "profiles" / "local.yaml").write_text("executor: local\ncpus_per_task: 7\n")
    monkeypatch.setenv(resources.SEARCH_ENV, str(first))
    assert resources.user_folders() == [first.resolve(), local.resolve()]
    assert load_profile("local").cpus_per_task == 7


def test_a_missing_folder_on_the_search_path_is_one_error(elsewhere, monkeypatch, capsys):
    monkeypatch.setenv(resources.SEARCH_ENV, "/no/such/folder")
    with pytest.raises(resources.ResourceError, match="REDI_BENCH_PATH names /no/such/folder"):
        resources.user_folders()
    assert cli_main(["grid", "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/no/such/folder" in err


def test_site_paths_apply_where_the_config_uses_them_and_the_command_line_wins(elsewhere):
    site = write_site(elsewhere / resources.LOCAL_FOLDER, PAPER_PATHS)
    paper = load_config(["scale=paper"])
    folder = site.parent.resolve()
    assert paper.output_root == str(folder / "runs")  # relative to site.yaml's folder
    assert paper.data.prepared_dir == str(folder / "prepared/in256") and paper.data.root == "/data/imagenet"
    assert (paper.vae.path, paper.encoder.weights) == ("/models/sd-vae-ft-ema", "/models/dinov2.safetensors")
    assert (paper.eval.inception_weights, paper.eval.reference) == ("/models/inception.pth", "/models/ref.npz")

    embedded = load_config([])  # the same file serves the embedded default: only output_root applies
    bare = load_config([], site=False)
    assert embedded.output_root == str(folder / "runs")
    assert (embedded.data.root, embedded.data.prepared_dir, embedded.vae.path, embedded.encoder.weights,
            embedded.eval.inception_weights, embedded.eval.reference) == (
        bare.data.root, bare.data.prepared_dir, bare.vae.path, bare.encoder.weights,
        bare.eval.inception_weights, bare.eval.reference)

    mine = load_config(["scale=paper", "vae.path=/other/vae", "output_root=/other/runs"])
    assert (mine.vae.path, mine.output_root) == ("/other/vae", "/other/runs")
    assert mine.encoder.weights == "/models/dinov2.safetensors"
    # No site key is in the run hash: a site file moves files, never runs.
    assert run_hash(paper) == run_hash(load_config(["scale=paper"], site=False))
    assert set(SITE_KEYS) == set(PAPER_PATHS) | {"eval.dinov2_weights"}


def test_a_grid_carries_the_site_paths_into_both_stages(elsewhere):
    write_site(elsewhere / resources.LOCAL_FOLDER, PAPER_PATHS)
    grid = load_grid("table1")
    cells = expand(grid)
    assert cells and all(c.cfg.vae.path == "/models/sd-vae-ft-ema" for c in cells)
    cell = cells[0]
    assert str(cell.run_dir).startswith(str((elsewhere / resources.LOCAL_FOLDER / "runs").resolve()))
    for setting in settings_for(grid, cell):
        cfg = eval_config(cell, setting)
        assert (cfg.vae.path, cfg.eval.inception_weights, cfg.eval.reference) == (
            "/models/sd-vae-ft-ema", "/models/inception.pth", "/models/ref.npz")
    overridden = expand(grid, ["vae.path=/cli/vae"])
    assert all(c.cfg.vae.path == "/cli/vae" for c in overridden)


def test_a_run_folder_is_evaluated_with_this_machines_paths(elsewhere, tmp_path):
    from bench.evaluate.sampling import resolve_run_config

    trained = load_config(["scale=paper", "vae.path=/train/machine/vae", "eval.inception_weights=/train/inc.pth"],
                          site=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(trained)))
    assert resolve_run_config(run).vae.path == "/train/machine/vae"  # no site file: the saved paths

    write_site(elsewhere / resources.LOCAL_FOLDER, PAPER_PATHS)
    here = resolve_run_config(run)
    assert (here.vae.path, here.eval.inception_weights, here.encoder.weights) == (
        "/models/sd-vae-ft-ema", "/models/inception.pth", "/models/dinov2.safetensors")
    assert run_hash(here) == run_hash(trained)
    cli = resolve_run_config(run, overrides=["eval.inception_weights=/cli/inc.pth"])
    assert cli.eval.inception_weights == "/cli/inc.pth"  # the command line wins
    # A queued eval job gets the config the launcher composed at submission (site applied there).
    submitted = load_config(["scale=paper", "vae.path=/submitted/vae"])
    assert resolve_run_config(run, submitted).vae.path == "/submitted/vae"


def test_report_looks_for_runs_under_the_sites_output_root(elsewhere, monkeypatch):
    from bench.report import summary

    seen = []

    def gather(name, runs_root="results/runs", grid=None):
        seen.append(str(runs_root))
        raise summary.ReportError("stop here")

    monkeypatch.setattr(summary, "gather", gather)
    write_site(elsewhere / resources.LOCAL_FOLDER, {"output_root": "/site/runs"})
    assert cli_main(["report", "mini_table1", "--no-plots"]) == 2
    assert cli_main(["report", "mini_table1", "--no-plots", "output_root=/cli/runs"]) == 2
    assert seen == ["/site/runs", "/cli/runs"]


@pytest.mark.parametrize("text, wanted", [
    ("vae:\n  path: /x\n  kind: diffusers\n", "vae.path.kind|vae.kind is not a site path"),
    ("train: {batch_size: 4}\n", "train is not a site path|train.batch_size is not a site path"),
    ("vae: {path: [a, b]}\n", "vae.path must be a path"),
    ("output_root: ''\n", "output_root must be a path"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    ("vae: {path: [unclosed\n", "not valid YAML"),
])
def test_a_bad_site_file_is_one_error_naming_the_file_and_key(elsewhere, capsys, text, wanted):
    site = elsewhere / resources.LOCAL_FOLDER / "site.yaml"
    site.parent.mkdir()
    site.write_text(text)
    with pytest.raises(SiteError, match=wanted) as caught:
        load_site()
    assert str(site) in str(caught.value)
    assert cli_main(["weights", "scale=paper"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(site) in err and "Traceback" not in err


def test_a_missing_optional_package_names_its_extra(monkeypatch):
    from bench.prepare.sources import digits

    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(resources.ResourceError, match=r"data.name=digits needs the Python package sklearn.*"
                                                      r"pip install 'redi-bench\[embedded\]'"):
        digits("train")
    with pytest.raises(resources.ResourceError, match=r"redi-bench\[all\]"):
        resources.require("no_such_module_here", "this check")
