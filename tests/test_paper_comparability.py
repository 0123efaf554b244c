"""`bench report` says which paper-scale rows are not comparable with the paper, and why.

Run folders are written in the trainer's and evaluator's formats into the folders grid `table1`
expands to, so the real `bench report table1` command reads them. One run follows the paper's
protocol exactly; the others differ in one thing each (the reference batch, raw weights, bf16
training), and the report must name exactly that thing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from bench.config import GuidanceConfig
from bench.launch import grids
from bench.report.comparability import (
    INCEPTION_2015_SHA256_PREFIX,
    protocol_differences,
    training_differences,
)
from bench.report.summary import gather, main, summarize

GOOD = dict(backend="torch-fidelity", feature_network="inception-v3-compat-pool3",
            feature_weights_sha256=INCEPTION_2015_SHA256_PREFIX + "0" * 56,
            reference_sha256="ad" * 32, reference_is_adm=True, n=50_000, sampler="sde",
            sampling_steps=250, guidance=dataclasses.asdict(GuidanceConfig()), weights="ema")


def write_run(folder: Path, config: dict, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 400_000, "loss": 0.5}) + "\n")
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "DONE").write_text("")


def fid_row(value: float, **changes) -> dict:
    return {"step": 400_000, "metric": "fid", "value": value, "setting": "no_cfg", "seed": 0,
            "created_at": "2026-01-01T00:00:00+00:00", **{**GOOD, **changes}}


@pytest.fixture(scope="module")
def table1_runs(tmp_path_factory) -> Path:
    """Four cells of grid table1 at 400K: the paper's protocol, a wrong reference, raw weights,
    and a bf16-trained run."""
    root = tmp_path_factory.mktemp("runs")
    cells = {(c.labels["spec"], c.labels["backbone"]): c
             for c in grids.expand(grids.load_grid("table1"))}
    plan = {("redi", "sit_xl2"): ({}, {}),
            ("latent_only", "sit_xl2"): ({}, {"reference_sha256": "ef" * 32,
                                              "reference_is_adm": False}),
            ("repa", "sit_xl2"): ({}, {"weights": "raw"}),
            ("redi", "sit_l2"): ({"precision": "bf16"}, {})}
    for key, (train, prov) in plan.items():
        cell = cells[key]
        config = dataclasses.asdict(cell.cfg)
        assert config["train"]["precision"] == "fp32"  # the paper scale's default
        config["train"].update(train)
        write_run(root / "table1" / cell.run_dir.name, config, [fid_row(8.0, **prov)])
    return root


def test_report_table1_names_each_difference(table1_runs, tmp_path, capsys):
    assert main(["table1", "--runs-root", str(table1_runs), "--out", str(tmp_path),
                 "--no-plots"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("not comparable with the paper")]
    assert len(lines) == 3, out
    # train.precision varies within spec redi, so the rows are labelled with it
    by_row = {line.split(": ")[1].split(" [")[0]: line for line in lines}
    xl, repa, bf16 = ("SiT-XL/2 (precision=fp32) at 400K", "SiT-XL/2 w/ REPA (precision=fp32) at 400K",
                      "SiT-L/2 w/ ReDi (precision=bf16) at 400K")
    assert set(by_row) == {xl, repa, bf16}
    assert "reference efefefefefef is not ADM's VIRTUAL_imagenet256_labeled.npz" in by_row[xl]
    assert "raw weights, the paper samples the EMA" in by_row[repa]
    assert "trained in bf16, the paper in fp32 with TF32" in by_row[bf16]
    # each row names only its own difference
    assert all(line.split("]: ", 1)[1].count("; ") == 0 for line in lines), lines
    # the run that follows the protocol gets the paper's 7.5 and a difference
    good = [line for line in out.splitlines()
            if line.startswith("| SiT-XL/2 w/ ReDi (precision=fp32) | 400K |")]
    assert len(good) == 1 and "| 8.00 | 7.5 | +0.50 |" in good[0], out
    report = (tmp_path / "table1" / "report.md").read_text()
    assert "## Not comparable with the paper" in report and bf16 in report


def test_accept_bf16_waives_only_the_precision(table1_runs):
    cells = summarize(gather("table1", table1_runs), accept=["bf16"]).cells
    # measured cells (the wrong reference is another evaluator: set apart from the main table)
    fid = cells[(cells["metric"] == "fid") & (cells["step"] == 400_000)
                & cells["mean"].notna()].set_index("condition")
    bf16 = "SiT-L/2 w/ ReDi (precision=bf16)"
    assert fid.loc[bf16, "paper_comparable"]
    assert fid.loc[bf16, "diff"] == pytest.approx(8.0 - 9.4, abs=1e-9)
    assert not fid.loc["SiT-XL/2 w/ REPA (precision=fp32)", "paper_comparable"]
    assert not fid.loc["SiT-XL/2 (precision=fp32)", "paper_comparable"]


def test_auto_precision_is_read_from_the_checkpoint(table1_runs, tmp_path):
    # train.precision=auto: what the trainer resolved is in each checkpoint's state.json
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(table1_runs, root)
    folder = next(p for p in (root / "table1").iterdir() if p.name.startswith("redi-")
                  and json.loads((p / "config.json").read_text())["model"]["size"] == "XL/2")
    config = json.loads((folder / "config.json").read_text())
    config["train"]["precision"] = "auto"
    (folder / "config.json").write_text(json.dumps(config))
    ckpt = folder / "checkpoints" / "0400000"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 400_000, "state": {"precision": "bf16"}}))
    def redi_xl():
        cells = summarize(gather("table1", root)).cells
        return cells[cells["condition"].str.startswith("SiT-XL/2 w/ ReDi")].iloc[0]
    assert "trained in bf16" in redi_xl()["paper_reason"]
    (ckpt / "state.json").write_text(json.dumps({"step": 400_000, "state": {"precision": "fp32"}}))
    assert redi_xl()["paper_comparable"]


def _prov(**changes) -> dict:
    p = {**GOOD, **changes}
    p["n_samples"] = p.pop("n")
    p["num_sampling_steps"] = p.pop("sampling_steps")
    return p


PAPER_CFG = {"train.precision": "fp32", "train.batch_size": 256}


@pytest.mark.parametrize("changes,expected", [
    ({}, []),
    ({"feature_weights_sha256": "ab" * 32}, ["Inception weights abababababab are not the 2015"]),
    ({"feature_network": "dinov2-vitl14-cls"}, ["dinov2-vitl14-cls features, not Inception-v3"]),
    ({"reference_is_adm": None}, ["is not ADM's VIRTUAL_imagenet256_labeled.npz"]),
    ({"n": 10_000}, ["n=10000 samples, the paper uses 50K"]),
    ({"sampler": "euler", "sampling_steps": 50}, ["sampled with euler-50, the paper with sde-em-250"]),
    ({"guidance": {**GOOD["guidance"], "interval_low": 0.1}}, ["guidance interval [0.1, 1]"]),
    ({"weights": "raw"}, ["raw weights, the paper samples the EMA"]),
    ({"precision": "bf16"}, ["sampled in bf16, the paper in fp32"]),
])
def test_each_protocol_difference_is_named(changes, expected):
    prov = _prov(**changes)
    got = protocol_differences(PAPER_CFG, prov, "fid", prov["guidance"], "sde-em-250")
    assert len(got) == len(expected) and all(e in g for e, g in zip(expected, got)), got


def test_is_needs_no_reference_and_training_differences():
    prov = _prov(reference_is_adm=None, reference_sha256=None)
    assert protocol_differences(PAPER_CFG, prov, "is", prov["guidance"], "sde-em-250") == []
    assert training_differences({"train.precision": "fp32", "train.batch_size": 1024}) == [
        "batch 1024, the paper trains at 256"]
    assert "unresolved" in training_differences({"trained_precision": "auto (unresolved)",
                                                 "train.batch_size": 256})[0]
    assert training_differences({"train.precision": "bf16", "train.batch_size": 256},
                                accept=["bf16"]) == []


def _cell_rows(root: Path, grid: str, rows: list[dict], **train) -> None:
    (cell,) = grids.expand(grids.load_grid(grid))
    config = dataclasses.asdict(cell.cfg)
    config["train"].update(train)
    write_run(root / grid / cell.run_dir.name, config, rows)


CFG24 = {**GOOD["guidance"], "cfg_scale": 2.4, "cfg_channels": "latent"}


def test_table2_rows_match_by_epochs_and_other_systems_are_shown_as_published(tmp_path, capsys):
    # 350 and 800 epochs = 1,751,400 and 4,003,200 iterations at 5,004 per epoch (the grid's header)
    rows = [{**fid_row(v, guidance=CFG24), "step": step, "metric": metric, "setting": "cfg2.4_latent",
             **({"reference_is_adm": None, "reference_sha256": None} if metric == "is" else {})}
            for step, values in ((1_751_400, (1.80, 4.70, 270.0, 0.78, 0.62)),
                                 (4_003_200, (1.70, 4.60, 290.0, 0.79, 0.63)))
            for metric, v in zip(("fid", "sfid", "is", "precision", "recall"), values)]
    _cell_rows(tmp_path, "table2", rows)
    assert main(["table2", "--runs-root", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--no-plots"]) == 0
    report = summarize(gather("table2", tmp_path))
    c = report.cells.set_index(["step", "metric"])
    # Table 2: ReDi 350 ep 1.72 / 4.68 / 278.7 / 0.77 / 0.63; 800 ep 1.61 / 4.66 / 295.1 / 0.78 / 0.64
    for (step, metric), paper in {(1_751_400, "fid"): 1.72, (1_751_400, "is"): 278.7,
                                  (4_003_200, "fid"): 1.61, (4_003_200, "sfid"): 4.66,
                                  (4_003_200, "recall"): 0.64}.items():
        assert c.loc[(step, metric), "paper"] == paper and c.loc[(step, metric), "paper_comparable"]
    assert c.loc[(4_003_200, "fid"), "diff"] == pytest.approx(1.70 - 1.61, abs=1e-9)
    published = report.published.set_index("system")
    assert published.loc["VAR", "fid"] == 1.80 and published.loc["VAR", "length"] == "350 ep"
    assert published.loc["SiT-XL/2 w/ REPA", "is"] == 284.0
    assert "SiT-XL/2 w/ ReDi" not in published.index  # trained by the grid, not listed as published
    text = (tmp_path / "out" / "table2" / "report.md").read_text()
    assert "## As published, not trained by this grid" in text and "| MDT |" in text


def test_readme_checkpoint_compares_fid_and_sfid_only(tmp_path):
    # The README's IS/precision/recall come from swapped evaluator arguments (results/paper/README.md)
    rows = [{**fid_row(v, guidance=CFG24), "step": 3_000_000, "metric": m, "setting": "cfg2.4_latent"}
            for m, v in (("fid", 1.70), ("sfid", 4.60), ("precision", 0.78), ("recall", 0.60))]
    _cell_rows(tmp_path, "readme_checkpoint", rows)
    c = summarize(gather("readme_checkpoint", tmp_path)).cells.set_index("metric")
    assert c.loc["fid", "paper"] == 1.64 and c.loc["fid", "paper_comparable"]
    assert c.loc["sfid", "paper_comparable"]
    assert not c.loc["precision", "paper_comparable"]
    assert "swapped" in c.loc["recall", "paper_reason"]
