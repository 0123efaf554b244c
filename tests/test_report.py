"""bench.report.summary / bench.report.plots: tables, seed statistics, provenance, paper columns, speed-ups, plots.

Fixture run folders are written by hand in the trainer's and evaluator's formats (config.json =
the full ExperimentConfig as JSON, metrics.jsonl, eval.jsonl rows with provenance, DONE marker),
with values chosen so that every expected number is computed by hand in this file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench import runfolder
from bench.config import (
    DataConfig,
    EncoderConfig,
    EvalConfig,
    ExperimentConfig,
    GuidanceConfig,
    ModelConfig,
    ObjectiveConfig,
    TrainConfig,
    VAEConfig,
)
from bench.report.published import load_paper_numbers
from bench.report.stats import mean_ci95, speedup
from bench.report.summary import ReportError, gather, main, summarize, write_report
from bench.report.tables import render_markdown
from bench.report.vocabulary import NOT_MEASURED

GOLDEN = Path(__file__).parent / "golden" / "report_mini_fixture.md"
GRID = "mini_fixture"
STEPS = [250, 500, 1000, 2000]
# Two-sided 95% Student-t quantiles from printed tables (not from scipy, which the code uses).
T975 = {1: 12.706204736174707, 2: 4.302652729749464}
# Exact up to float64 rounding of a handful of operations.
TOL = 1e-9

# Provenance as bench.evaluate.score_run records it (sample count under "n", sampling steps under
# "sampling_steps", the classifier's network id; accuracy rows carry no reference hash).
PROV = dict(backend="torch-fidelity", backend_version="0.3.0",
            feature_network="fmnist-classifier-d64", feature_weights_sha256="ab" * 32,
            reference_sha256="cd" * 32, n=2000, sampler="euler", sampling_steps=25,
            guidance=dataclasses.asdict(GuidanceConfig()), weights="ema", precision="fp32",
            setting_hash="0123abcd", label_sampling="random")


def embedded_config(spec: str, seed: int) -> ExperimentConfig:
    fusion = "none" if spec in ("latent_only", "repa") else "merged"
    return ExperimentConfig(
        spec=spec, grid=GRID,
        model=ModelConfig(size="custom", hidden_size=32, depth=2, num_heads=2, patch_size=1,
                          fusion=fusion, pca_rank=4),
        objective=ObjectiveConfig(lambda_repa=0.5 if spec.endswith("repa") else 0.0, align_layer=1),
        train=TrainConfig(batch_size=8, max_steps=2000, seed=seed, log_every=250),
        eval=EvalConfig(sampler="euler", num_sampling_steps=25, num_samples=2000))


def eval_row(step: int, metric: str, value: float, prov: dict = PROV, **extra) -> dict:
    reference = None if metric == "accuracy" else prov["reference_sha256"]
    return {"step": step, "metric": metric, "value": value, "setting": "no_cfg", **prov,
            "reference_sha256": reference, "seed": 0, "wall_time_s": 1.0,
            "created_at": "2025-01-01T00:00:00+00:00", **extra}


def write_run(root: Path, cfg: ExperimentConfig, evals: list[dict], *, last_step: int = 2000,
              done: bool = True, folder: str | None = None) -> Path:
    # Fixed folder names (not the config hash) so the golden file survives new config fields.
    run = root / cfg.grid / (folder or f"{cfg.spec}-0000000{cfg.train.seed}")
    run.mkdir(parents=True)
    runfolder.config_path(run).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    ticks = []
    for step in range(250, last_step + 1, 250):
        tick = {"step": step, "loss": 2.0 / math.sqrt(step) + 0.01 * cfg.train.seed,
                "loss/latent": 1.5 / math.sqrt(step), "lr": 3e-4, "grad_norm": 1.0,
                "images_per_s": 100.0}
        if cfg.spec.startswith("redi"):
            tick["loss/semantic"] = 0.5 / math.sqrt(step)
        ticks.append(tick)
    runfolder.append_jsonl(run / runfolder.METRICS_FILE, ticks)
    runfolder.append_jsonl(run / runfolder.EVAL_FILE, evals)
    if done:
        runfolder.write_done(run, last_step, 0.0)
    return run


FD = {("latent_only", 0): [40, 30, 20, 10], ("latent_only", 1): [42, 32, 22, 12],
      ("redi", 0): [30, 15, 9, 7], ("redi", 1): [32, 17, 11, 9], ("repa", 0): [35, 25, 15, 9],
      ("redi_repa", 0): [28, 14]}
ACCURACY = {0: 0.60, 1: 0.64}  # by seed, the same at every step


def build_fixture(root: Path) -> dict:
    """Six runs: two seeds of latent_only and redi, one repa (plus one row evaluated with another
    sample count), one redi_repa still training (evaluated up to step 500)."""
    for (spec, seed), values in FD.items():
        rows = [eval_row(s, "fd_classifier", v) for s, v in zip(STEPS, values)]
        rows += [eval_row(s, "accuracy", ACCURACY[seed]) for s in STEPS[: len(values)]]
        if spec == "repa":
            rows.append(eval_row(2000, "fd_classifier", 14.0, {**PROV, "n": 1000}))
        in_progress = spec == "redi_repa"
        write_run(root, embedded_config(spec, seed), rows, last_step=750 if in_progress else 2000,
                  done=not in_progress)
    return {"name": GRID, "regenerates": "table1",
            "specs": ["latent_only", "repa", "redi", "redi_repa"],
            "eval": {"steps": STEPS, "settings": {"no_cfg": {}, "cfg": {"cfg_scale": 2.0}}}}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    grid = build_fixture(root)
    return summarize(gather(GRID, root, grid=grid))


def cell(report, condition: str, step: int, metric: str = "fd_classifier", group: int = 0):
    c = report.cells
    rows = c[(c["condition"] == condition) & (c["step"] == step) & (c["metric"] == metric)
             & (c["group"] == group)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


# ------------------------------------------------------------------------------------------------
# Statistics and the speed-up


def test_mean_ci95_uses_student_t_with_n_minus_1_dof():
    mean, half, n = mean_ci95([10.0, 12.0])
    # s = sqrt(2), s / sqrt(2) = 1, so the half-width is the t quantile itself.
    assert (mean, n) == (11.0, 2) and half == pytest.approx(T975[1], abs=TOL)
    mean, half, n = mean_ci95([1.0, 2.0, 6.0])
    s = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    assert mean == pytest.approx(3.0, abs=TOL)
    assert half == pytest.approx(T975[2] * s / math.sqrt(3), abs=TOL)
    value, half, n = mean_ci95([7.5])
    assert (value, n) == (7.5, 1) and math.isnan(half)  # one seed: a value, no interval
    assert mean_ci95([])[2] == 0


def test_speedup_worked_example():
    # Baseline final FID 10 at 400K; the method has FID 20 at 100K and 8 at 200K. Interpolating
    # FID linearly against log(step), 10 is reached at
    #   exp(log(1e5) + (20 - 10) / (20 - 8) * (log(2e5) - log(1e5))) = 1e5 * 2 ** (10 / 12)
    # and the speed-up is 400K divided by that step.
    expected_step = math.exp(math.log(1e5) + (20 - 10) / (20 - 8) * (math.log(2e5) - math.log(1e5)))
    assert expected_step == pytest.approx(1e5 * 2 ** (10 / 12), rel=1e-12)
    base = pd.Series([30.0, 15.0, 10.0], index=[1e5, 2e5, 4e5])
    method = pd.Series([20.0, 8.0, 5.0], index=[1e5, 2e5, 4e5])
    result = speedup(base, method)
    assert result.reached and result.target == 10.0 and result.baseline_step == 400_000
    # rel 1e-12: the same formula in float64, only the operation order differs.
    assert result.step == pytest.approx(expected_step, rel=1e-12)
    assert result.factor == pytest.approx(4e5 / expected_step, rel=1e-12)  # about 2.24
    assert result.points == ((1e5, 20.0), (2e5, 8.0))
    assert "2.24x sooner" in result.describe()


def test_speedup_not_reached_first_point_and_higher_is_better():
    base = pd.Series([20.0, 10.0], index=[100, 400])
    never = speedup(base, pd.Series([30.0, 12.0], index=[100, 400]))
    assert not never.reached and never.factor is None and "not reached" in never.describe()
    first = speedup(base, pd.Series([9.0, 5.0], index=[100, 400]))
    assert first.step == 100 and first.factor == 4.0 and "lower bound" in first.note
    # Accuracy: higher is better; target 0.8 between 0.7 at 100 and 0.9 at 200 -> halfway in log.
    up = speedup(pd.Series([0.5, 0.8], index=[100, 400]), pd.Series([0.7, 0.9], index=[100, 200]),
                 lower_is_better=False)
    assert up.step == pytest.approx(100 * math.sqrt(2), rel=1e-12)
    with pytest.raises(ReportError, match="step <= 0"):
        speedup(pd.Series([1.0], index=[0]), pd.Series([1.0], index=[1]))


def test_speedup_where_the_baseline_got_worse_targets_its_best_value():
    """The quick demo's case: FD rises with training. Against the baseline's last (worse) value
    every method would look 4x faster; the target is the baseline's best value, at its step."""
    base = pd.Series([40.0, 50.0, 60.0], index=[100, 200, 400])  # best at 100, then worse
    rising = pd.Series([45.0, 55.0, 65.0], index=[100, 200, 400])  # never as good as 40
    result = speedup(base, rising)
    assert (result.target, result.baseline_step, result.target_kind) == (40.0, 100, "best")
    assert not result.reached and "sooner" not in result.describe()
    assert "baseline's best fid 40" in result.describe() and "got worse after its best: 60" in result.note
    # A method as good as the baseline's best at the same first step: reached, but not sooner.
    same = speedup(base, pd.Series([39.0, 58.0, 70.0], index=[100, 200, 400]))
    assert same.reached and same.factor == 1.0 and "not sooner" in same.describe()
    assert "x sooner" not in same.describe()
    # Best in the middle: target 30 at 200; the method reaches it halfway (in log) from 100 to 200.
    middle = speedup(pd.Series([50.0, 30.0, 35.0], index=[100, 200, 400]),
                     pd.Series([40.0, 20.0], index=[50, 100]))
    assert (middle.target, middle.baseline_step) == (30.0, 200)
    assert middle.step == pytest.approx(50 * math.sqrt(2), rel=1e-12)
    assert middle.factor == pytest.approx(200 / (50 * math.sqrt(2)), rel=1e-12)
    # A baseline that improves to the end keeps the paper's definition: its final value.
    assert speedup(pd.Series([20.0, 10.0], index=[100, 400]), rising).target_kind == "final"


def test_provisional_only_when_the_baseline_is_not_evaluated_to_its_last_step():
    """A baseline evaluated to the end whose best value came early is final, not provisional (the
    quick demo printed "provisional: evaluated only up to 100" for a baseline measured up to 400)."""
    from bench.report.stats import find_speedups

    conditions = pd.DataFrame({"condition": ["base", "meth"], "spec": ["latent_only", "redi"],
                               "model": ["SiT-tiny/1", "SiT-tiny/1"]})

    def cells(base_steps):
        rows = [{"setting": "plain", "metric": "fid", "group": 0, "n_seeds": 2, "condition": "base",
                 "step": s, "mean": v} for s, v in base_steps]
        rows += [{"setting": "plain", "metric": "fid", "group": 0, "n_seeds": 2, "condition": "meth",
                  "step": s, "mean": v} for s, v in ((100, 45.0), (200, 35.0), (400, 30.0))]
        return pd.DataFrame(rows)

    grid = {"baseline": "latent_only"}
    final = {"base": 400, "meth": 400}
    peaked = find_speedups(cells([(100, 40.0), (200, 50.0), (400, 60.0)]), conditions, "fid", grid, final)
    assert peaked and all("provisional" not in r["note"] for r in peaked)
    partial = find_speedups(cells([(100, 40.0), (200, 38.0)]), conditions, "fid", grid, final)
    assert partial and all("provisional: the baseline is evaluated only up to 200" in r["note"] for r in partial)


def test_speedup_on_the_papers_own_table_points_lies_between_the_tabulated_bounds():
    # x23 (SiT): the baseline's 8.3 at 7M is crossed between ReDi's 9.7 at 300K and 7.5 at 400K
    # (Table 9), so the log-interpolated factor must lie in (7M/400K, 7M/300K) = (17.5, 23.3).
    paper = load_paper_numbers("table9")
    redi = paper[(paper["method"] == "redi") & (paper["metric"] == "fid")]
    curve = pd.Series(redi["value"].to_numpy(), index=redi["iterations"].astype(float).to_numpy())
    base = paper[(paper["method"] == "latent_only") & (paper["metric"] == "fid")]
    result = speedup(pd.Series(base["value"].to_numpy(), index=base["iterations"].astype(float)),
                     curve)
    assert result.points == ((300_000, 9.7), (400_000, 7.5))
    assert 7e6 / 4e5 < result.factor < 7e6 / 3e5


# ------------------------------------------------------------------------------------------------
# Tables from the fixture grid


def test_tidy_tables_hold_every_run_row_and_status(report):
    g = report.gathered
    assert len(g.runs) == 6
    assert sorted(g.runs["status"]) == ["done"] * 5 + ["training"]
    assert g.runs.loc[g.runs["status"] == "training", "last_step"].item() == 750
    assert {"model.fusion", "train.seed", "objective.lambda_repa"} <= set(g.runs.columns)
    # eval rows joined with their run's flattened config (json_normalize).
    assert len(g.evals) == sum(len(v) for v in FD.values()) * 2 + 1
    assert (g.evals["data.name"] == "fashion_mnist").all()
    assert len(g.metrics) == 5 * 8 + 3


def test_cells_equal_hand_computed_mean_and_interval(report):
    for step, (a, b) in zip(STEPS, zip(FD[("latent_only", 0)], FD[("latent_only", 1)])):
        c = cell(report, "SiT-tiny/1", step)
        mean = (a + b) / 2
        half = T975[1] * np.std([a, b], ddof=1) / math.sqrt(2)
        assert c["n_seeds"] == 2 and c["mean"] == pytest.approx(mean, abs=TOL)
        assert c["half_width"] == pytest.approx(half, abs=TOL)
        assert json.loads(c["seeds"]) == [0, 1]
    acc = cell(report, "SiT-tiny/1 w/ ReDi", 2000, "accuracy")
    assert acc["mean"] == pytest.approx(0.62, abs=TOL)
    assert acc["half_width"] == pytest.approx(T975[1] * 0.02 * math.sqrt(2) / math.sqrt(2), abs=TOL)
    single = cell(report, "SiT-tiny/1 w/ REPA", 2000)
    assert single["mean"] == 9.0 and single["n_seeds"] == 1 and math.isnan(single["half_width"])


def test_unmeasured_cells_are_not_measured_never_zero(report):
    for step in (1000, 2000):
        c = cell(report, "SiT-tiny/1 w/ REPA + ReDi", step)
        assert c["n_seeds"] == 0 and math.isnan(c["mean"])
    text = render_markdown(report)
    assert "| SiT-tiny/1 w/ REPA + ReDi | 2K | 0 of 1 | not measured |" in text
    assert "no_cfg/fd_classifier: SiT-tiny/1 w/ REPA + ReDi at step 2000" in report.missing
    # declared by the grid, measured nowhere: every expected cell is listed, not one line
    assert "setting cfg: SiT-tiny/1 at step 500 (nothing measured in this setting yet)" in report.missing


def test_mismatched_provenance_is_set_apart_with_the_reason(report):
    main = cell(report, "SiT-tiny/1 w/ REPA", 2000)
    apart = cell(report, "SiT-tiny/1 w/ REPA", 2000, group=1)
    assert main["mean"] == 9.0  # the n=1000 value 14.0 is not averaged in
    assert apart["mean"] == 14.0 and "n_samples 1000 (main table: 2000)" in apart["set_apart_reason"]
    assert "n=1000" in apart["evaluator"] and "n=2000" in main["evaluator"]
    assert "Why set apart: n_samples 1000 (main table: 2000)." in render_markdown(report)


def test_other_reference_is_set_apart_not_averaged(tmp_path):
    other = {**PROV, "reference_sha256": "ef" * 32}
    # The field names (n_samples, num_sampling_steps) are the same provenance as the
    # evaluator's (n, sampling_steps): seeds 0 and 2 are averaged.
    names = {"n": "n_samples", "sampling_steps": "num_sampling_steps"}
    renamed = {names.get(k, k): v for k, v in PROV.items()}
    write_run(tmp_path, embedded_config("redi", 0), [eval_row(2000, "fd_classifier", 7.0)])
    write_run(tmp_path, embedded_config("redi", 1), [eval_row(2000, "fd_classifier", 9.0, other)])
    write_run(tmp_path, embedded_config("redi", 2),
              [eval_row(2000, "fd_classifier", 8.0, renamed)])
    rep = summarize(gather(GRID, tmp_path, grid={"name": GRID}))
    main = cell(rep, "SiT-tiny/1 w/ ReDi", 2000)
    apart = cell(rep, "SiT-tiny/1 w/ ReDi", 2000, group=1)
    assert (main["mean"], main["n_seeds"], apart["mean"], apart["n_seeds"]) == (7.5, 2, 9.0, 1)
    assert apart["set_apart_reason"].startswith("reference_sha256 efefefefefef")


def test_mini_grid_shows_paper_only_as_context_and_never_a_difference(report):
    c = report.cells
    assert not c["paper_comparable"].any() and c["diff"].isna().all()
    paper = load_paper_numbers("table1")
    expected = paper[(paper["model"] == "SiT-XL/2") & (paper["method"] == "redi")
                     & (paper["iterations"] == 400_000) & (paper["metric"] == "fid")]["value"].item()
    final = cell(report, "SiT-tiny/1 w/ ReDi", 2000)
    assert final["paper"] == expected == 7.5
    assert final["paper_label"] == "SiT-XL/2 w/ ReDi, 400K (table1)"
    assert "not ImageNet 256" in final["paper_reason"]
    assert math.isnan(cell(report, "SiT-tiny/1 w/ ReDi", 1000)["paper"])  # context once, at the end
    text = render_markdown(report)
    headers = [line for line in text.splitlines() if line.startswith("| Model |")]
    assert headers and all("paper FID, context only" in h and "Δ" not in h for h in headers)


# The paper's evaluation protocol as the evaluator records it: the 2015 Inception port (its SHA-256
# starts with the 8 hex digits in its torch hub file name), ADM's reference batch, 50K samples.
PAPER_PROV = {**PROV, "feature_network": "inception-v3-compat-pool3", "n": 50_000,
              "feature_weights_sha256": "6726825d" + "0" * 56, "reference_is_adm": True}


def paper_scale_config(spec: str = "redi", grid: str = "table1", **train) -> ExperimentConfig:
    return ExperimentConfig(
        spec=spec, grid=grid,
        data=DataConfig(name="imagefolder", image_size=256, num_classes=1000),
        vae=VAEConfig(kind="diffusers"), encoder=EncoderConfig(kind="dinov2", pca_rank_max=32),
        model=ModelConfig(size="XL/2", fusion="merged", pca_rank=8),
        train=TrainConfig(**{"max_steps": 400_000, "seed": 0, "precision": "fp32", **train}),
        eval=EvalConfig(sampler="sde", num_sampling_steps=250, num_samples=50_000,
                        feature_network="inception"))


def test_full_scale_grid_matches_the_paper_row_and_gives_the_difference(tmp_path):
    cfg = paper_scale_config()
    prov = {**PAPER_PROV, "sampler": "sde", "sampling_steps": 250}
    write_run(tmp_path, cfg, [eval_row(400_000, "fid", 7.0, prov), eval_row(200_000, "fid", 9.0, prov)],
              last_step=250, folder="redi-00000000")
    rep = summarize(gather("table1", tmp_path, grid={"name": "table1", "regenerates": "table1"}))
    final = cell(rep, "SiT-XL/2 w/ ReDi", 400_000, "fid")
    assert final["paper_comparable"] and final["paper"] == 7.5
    assert final["diff"] == pytest.approx(7.0 - 7.5, abs=TOL)
    assert math.isnan(cell(rep, "SiT-XL/2 w/ ReDi", 200_000, "fid")["paper"])  # no 200K row
    text = render_markdown(rep)
    assert "| SiT-XL/2 w/ ReDi | 400K | 1 | 7.00 | 7.5 | -0.50 |" in text


def test_per_row_guidance_of_a_setting_stays_in_one_column(tmp_path):
    # Table 4: one setting scores DiT-B/2 with w_r = 1.5 and DiT-XL/2 with w_r = 1.1 (grid match);
    # the evaluator is the same, so both rows share the column and the paper's rows match exactly.
    prov = {**PAPER_PROV, "sampler": "ddpm", "sampling_steps": 250}
    for size, w_r, fid_rg, fid in (("B/2", 1.5, 21.0, 26.0), ("XL/2", 1.1, 6.5, 9.0)):
        cfg = ExperimentConfig(
            spec="redi_rg", grid="table4",
            data=DataConfig(name="imagefolder", image_size=256, num_classes=1000),
            model=ModelConfig(size=size, fusion="merged", pca_rank=8, learn_sigma=True),
            objective=ObjectiveConfig(transport="ddpm", p_drop=0.2),
            train=TrainConfig(precision="fp32"),
            eval=EvalConfig(sampler="ddpm", feature_network="inception"))
        guided = {**prov, "guidance": {**PROV["guidance"], "rg_scale": w_r}}
        rows = [eval_row(400_000, "fid", fid, prov, setting="no_rg"),
                eval_row(400_000, "fid", fid_rg, guided, setting="rg")]
        write_run(tmp_path, cfg, rows, last_step=250, folder=f"redi_rg-{size[:-2]}")
    rep = summarize(gather("table4", tmp_path, grid={"name": "table4", "regenerates": ["table4"]}))
    assert (rep.cells["group"] == 0).all()
    got = {(r.setting, r.condition): (r.mean, r.paper, r.diff) for r in rep.cells.itertuples()}
    # Paper Table 4: B 25.7 -> 20.2 with RG (w_r 1.5); XL 8.7 -> 5.9 (w_r 1.1).
    for key, (mean, paper) in {("no_rg", "DiT-B/2 w/ ReDi (p_drop)"): (26.0, 25.7),
                               ("rg", "DiT-B/2 w/ ReDi (p_drop)"): (21.0, 20.2),
                               ("no_rg", "DiT-XL/2 w/ ReDi (p_drop)"): (9.0, 8.7),
                               ("rg", "DiT-XL/2 w/ ReDi (p_drop)"): (6.5, 5.9)}.items():
        assert got[key][:2] == (mean, paper) and got[key][2] == pytest.approx(mean - paper, abs=TOL)
    text = render_markdown(rep)
    assert "| DiT-XL/2 w/ ReDi (p_drop) | 400K | 1 | rg_scale=1.1 | 6.50 | 5.9 | +0.60 |" in text


def test_fixture_speedups_equal_hand_interpolation(report):
    rows = {(s["method"], s["baseline"]): s for s in report.speedups}
    redi = rows[("SiT-tiny/1 w/ ReDi", "SiT-tiny/1")]
    # Baseline final: mean(10, 12) = 11 at 2000. ReDi means: 16 at 500, 10 at 1000.
    step = math.exp(math.log(500) + (16 - 11) / (16 - 10) * (math.log(1000) - math.log(500)))
    assert redi["step"] == pytest.approx(step, rel=1e-12)
    assert redi["factor"] == pytest.approx(2000 / step, rel=1e-12)
    assert json.loads(redi["points"]) == [[500, 16], [1000, 10]]
    assert "x23 (SiT-XL/2, x23_sit)" == redi["paper_claim"]  # the DiT claim is not a SiT claim
    # The grid's baseline first, and REPA as the second baseline of the methods beyond it.
    from bench.report.stats import speedup_pairs

    pairs = {(m, b) for m, b, _ in speedup_pairs(report.conditions, list(report.conditions[
        "condition"]), {"baseline": "latent_only"})}
    assert pairs == set(rows) == {("SiT-tiny/1 w/ REPA", "SiT-tiny/1"),
                                  ("SiT-tiny/1 w/ ReDi", "SiT-tiny/1"),
                                  ("SiT-tiny/1 w/ REPA + ReDi", "SiT-tiny/1"),
                                  ("SiT-tiny/1 w/ ReDi", "SiT-tiny/1 w/ REPA"),
                                  ("SiT-tiny/1 w/ REPA + ReDi", "SiT-tiny/1 w/ REPA")}
    waiting = rows[("SiT-tiny/1 w/ REPA + ReDi", "SiT-tiny/1")]
    assert not waiting["reached"]
    # Stated only where the paired difference at 2K survives Holm: ReDi's two seeds, -3 each.
    assert [k for k, s in rows.items() if s["licensed"]] == [("SiT-tiny/1 w/ ReDi", "SiT-tiny/1")]
    assert "| none: no paired difference | no seed measured for both |" in render_markdown(report)


def test_markdown_matches_golden_file(report):
    text = render_markdown(report)
    if os.environ.get("REDI_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "set REDI_UPDATE_GOLDEN=1 to regenerate after a deliberate change"


def test_written_files_and_plots_open_as_images(report, tmp_path):
    out = write_report(report, tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "table.csv", "table.tex", "cells.csv", "speedups.csv", "runs.csv",
            "evals.csv", "metrics.csv"} <= names
    for stem in ("convergence_no_cfg_fd_classifier", "convergence_no_cfg_accuracy", "loss_curves"):
        with Image.open(out / f"{stem}.png") as image:
            image.verify()
        assert (out / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    table = pd.read_csv(out / "table.csv")
    assert (table["block"] == "main").sum() == 16
    assert NOT_MEASURED in set(table.iloc[:, 3])
    tex = (out / "table.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and "w/ REPA + ReDi" in tex
    assert not any(n.startswith(".") for n in names)  # no temporaries left behind


def test_cli_prints_table_and_folder_and_fails_cleanly(tmp_path, capsys):
    build_fixture(tmp_path / "runs")
    code = main([GRID, "--runs-root", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"),
                 "--no-plots"])
    printed = capsys.readouterr().out
    assert code == 0 and f"wrote {tmp_path / 'rep' / GRID}" in printed
    assert "| SiT-tiny/1 w/ ReDi | 2K | 2 | 8.00 ± 12.71 |" in printed
    from bench.cli import main as bench_main  # the `bench` front door routes to bench.report.summary:main

    assert bench_main(["report", GRID, "--runs-root", str(tmp_path / "runs"), "--out",
                       str(tmp_path / "rep2"), "--no-plots"]) == 0
    assert (tmp_path / "rep2" / GRID / "report.md").is_file()
    capsys.readouterr()
    assert main(["nothing_here", "--runs-root", str(tmp_path / "runs")]) == 2
    assert "unknown grid 'nothing_here'" in capsys.readouterr().err
    code = main([GRID, "--runs-root", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"),
                 "--metric", "kid", "--no-plots"])
    assert code == 2 and "--metric 'kid' was not measured" in capsys.readouterr().err


def test_truncated_last_line_is_skipped_but_corrupt_middle_line_is_an_error(tmp_path):
    run = write_run(tmp_path, embedded_config("redi", 0), [eval_row(2000, "fd_classifier", 7.0)])
    with open(run / "eval.jsonl", "a") as f:
        f.write('{"step": 2000, "metr')  # a writer mid-append
    assert len(gather(GRID, tmp_path, grid={"name": GRID}).evals) == 1
    (run / "eval.jsonl").write_text('{"oops"\n' + json.dumps(eval_row(250, "fid", 1.0)) + "\n")
    with pytest.raises(ReportError, match="eval.jsonl line 1"):
        gather(GRID, tmp_path, grid={"name": GRID})


# ------------------------------------------------------------------------------------------------
# Run folders written by the real trainer and evaluator (bench.train.loop, bench.evaluate.score_run, tiny sizes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three 4-step runs (latent_only seed 0, redi seeds 0 and 1) trained by bench.train.loop.train and
    scored by bench.evaluate.score_run.evaluate (FD and accuracy on a tiny classifier, 16 samples, checkpoints
    2 and 4), on the trainer's test fixture data with a tiny VAE and classifier from bench.prepare.embedded
    (the way tests/test_evaluate.py builds its prepared folder)."""
    import torch
    from fixtures_train import add_embedded_eval_assets, tiny_config, write_prepared  # tests/ is on sys.path

    from bench.evaluate.score_run import evaluate
    from bench.train.loop import train

    root = tmp_path_factory.mktemp("real")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: one thread is much faster on a busy 2-core machine
    try:
        prepared = write_prepared(root / "prepared")
        add_embedded_eval_assets(prepared, classifier_epochs=1.0)
        for spec, seed in (("latent_only", 0), ("redi", 0), ("redi", 1)):
            cfg = tiny_config(prepared, root / "runs", "grid=real_fixture", f"train.seed={seed}",
                              "eval.sampler=euler", "eval.num_sampling_steps=2",
                              "eval.num_samples=16", "eval.batch_size=8", spec=spec)
            evaluate(None, train(cfg), shard_size=8, progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "runs"


def test_report_on_real_trainer_and_evaluator_folders(trained, tmp_path):
    rep = summarize(gather("real_fixture", trained, grid={"name": "real_fixture"}))
    g = rep.gathered
    assert list(g.runs["status"]) == ["done"] * 3 and set(g.runs["last_step"]) == {4}
    assert set(g.runs["data.name"]) == {"digits"} and "model.hidden_size" in g.runs
    assert list(rep.conditions["condition"]) == ["SiT-tiny/1", "SiT-tiny/1 w/ ReDi"]
    assert (rep.cells["group"] == 0).all() and (rep.cells["n_seeds"] > 0).all()
    # By hand from the evaluator's own eval.jsonl lines: mean and t-interval of the two ReDi seeds.
    for metric in ("fd_classifier", "accuracy"):
        for step in (2, 4):
            values = [json.loads(line)["value"] for run in sorted(trained.glob("real_fixture/redi-*"))
                      for line in (run / "eval.jsonl").read_text().splitlines()
                      if json.loads(line)["step"] == step and json.loads(line)["metric"] == metric]
            c = cell(rep, "SiT-tiny/1 w/ ReDi", step, metric)
            assert len(values) == 2 and c["n_seeds"] == 2
            # rel 1e-12: the same two-number mean and std in float64, only in another order.
            assert c["mean"] == pytest.approx(np.mean(values), rel=1e-12, abs=1e-15)
            half = T975[1] * np.std(values, ddof=1) / math.sqrt(2)
            assert c["half_width"] == pytest.approx(half, rel=1e-9, abs=1e-15)
    assert cell(rep, "SiT-tiny/1", 4)["evaluator"] == "FD (digits classifier features, n=16)"
    # Loss curves equal a hand mean of the trainer's own metrics.jsonl lines.
    from bench.report.plots import loss_curves

    conditions = {r: "SiT-tiny/1" if r.startswith("latent") else "SiT-tiny/1 w/ ReDi"
                  for r in g.runs["run"]}
    curves = loss_curves(g.metrics, conditions, "loss/semantic").set_index(["condition", "step"])
    by_hand = [json.loads(line)["loss/semantic"] for run in sorted(trained.glob("real_fixture/redi-*"))
               for line in (run / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["step"] == 3]
    assert curves.loc[("SiT-tiny/1 w/ ReDi", 3), "mean"] == pytest.approx(np.mean(by_hand), rel=1e-12)
    assert ("SiT-tiny/1", 3) not in curves.index  # latent-only logs no semantic loss
    out = write_report(rep, tmp_path / "out")
    for stem in ("loss_curves", "convergence_default_fd_classifier"):
        with Image.open(out / f"{stem}.png") as image:
            image.verify()
    assert "loss/semantic" in pd.read_csv(out / "metrics.csv").columns


def test_grid_in_progress_without_any_evaluation(tmp_path):
    write_run(tmp_path, embedded_config("redi", 0), [], last_step=500, done=False)
    grid = {"name": GRID, "eval": {"steps": STEPS, "settings": ["no_cfg"]}}
    rep = summarize(gather(GRID, tmp_path, grid=grid))
    text = render_markdown(rep)
    assert rep.cells.empty and "Nothing is evaluated yet" in text
    # one line per expected cell (the grid's steps), not one line for the whole setting
    assert sum("setting no_cfg: SiT-tiny/1 w/ ReDi at step" in line for line in text.splitlines()) == len(STEPS)
    assert "training 1" in text
    out = write_report(rep, tmp_path / "out")
    assert (out / "loss_curves.png").is_file() and not list(out.glob("convergence_*"))


def test_real_grid_file_in_progress_lists_every_cell(tmp_path, capsys):
    from bench.launch import grids

    cells = grids.expand(grids.load_grid("mini_table1"))
    by_name = {c.name: c for c in cells}
    for name, values in {"latent_only-seed=0": [30.0, 20.0, 10.0], "redi-seed=0": [20.0, 12.0, 8.0]}.items():
        cell_ = by_name[name]
        folder = tmp_path / "mini_table1" / cell_.run_dir.name
        rows = [eval_row(s, "fd_classifier", v) for s, v in zip(cell_.eval_steps, values)]
        write_run(tmp_path, cell_.cfg, rows, folder=folder.name)
    assert main(["mini_table1", "--runs-root", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--no-plots"]) == 0
    text = (tmp_path / "out" / "mini_table1" / "report.md").read_text()
    assert "Runs: 8 in the grid; done 2, not started 6." in text
    assert "| SiT-tiny/1 w/ REPA | 2K | 0 of 2 | not measured |" in text
    assert "no_cfg/fd_classifier: SiT-tiny/1 w/ REPA + ReDi at step 500" in text
    assert "| SiT-tiny/1 w/ ReDi | 2K | 1 of 2 | 8.00 | 7.5 | SiT-XL/2 w/ ReDi, 400K (table1) |" in text
    assert "not from bench.launch.grids" not in text  # the cells came from the grid, not from folders


def test_report_imports_no_training_code(tmp_path):
    # The report layer reads results/ only (bench/report/__init__.py); it must not pull in the trainer, sampler,
    # evaluator or the model core (checked in a fresh interpreter, after a full report with plots).
    # models.settings is the torch-free table of names and rules that bench.config shares with the core.
    import subprocess
    import sys

    build_fixture(tmp_path / "runs")
    code = (f"import sys; from bench.report.summary import main; "
            f"assert main(['{GRID}', r'output_root={tmp_path / 'runs'}', '--out', "
            f"r'{tmp_path / 'out'}']) == 0; "
            "core = {m for m in sys.modules if m.split('.')[0] == 'models'} - {'models', 'models.settings'}; "
            "bad = sorted(core | {m for m in sys.modules if m in "
            "('bench.train.loop', 'bench.train.build', 'bench.evaluate.sampling', 'bench.evaluate.score_run')}); "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_plots_have_log_steps_evaluator_axis_one_line_per_condition_and_seed_bands(report, monkeypatch,
                                                                                    tmp_path):
    """FD against iterations on a log axis, the evaluator named on the y axis, one line per
    condition (legend with its seed count), a 95% band where a point has >= 2 seeds; loss curves
    with one panel per logged term."""
    from matplotlib.collections import PolyCollection

    import bench.report.plots as plots

    figures = {}

    def keep(figure, stem):  # capture the figure instead of writing PNG/PDF
        figures[stem.name] = figure
        return []

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_convergence(report, tmp_path)
    plots.plot_losses(report, tmp_path)
    axis = figures["convergence_no_cfg_fd_classifier"].axes[0]
    assert axis.get_xscale() == "log" and "iterations" in axis.get_xlabel()
    assert axis.get_ylabel() == "FD (Fashion-MNIST classifier features, n=2000)"
    legend = [t.get_text() for t in axis.get_legend().get_texts()]
    assert legend == ["SiT-tiny/1 (2 seeds)", "SiT-tiny/1 w/ REPA (1 seed)", "SiT-tiny/1 w/ ReDi (2 seeds)",
                      "SiT-tiny/1 w/ REPA + ReDi (1 seed)"]
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert list(lines["SiT-tiny/1 w/ ReDi (2 seeds)"].get_xdata()) == STEPS
    means = [(a + b) / 2 for a, b in zip(FD[("redi", 0)], FD[("redi", 1)])]
    assert list(lines["SiT-tiny/1 w/ ReDi (2 seeds)"].get_ydata()) == pytest.approx(means, abs=TOL)
    assert list(lines["SiT-tiny/1 w/ REPA + ReDi (1 seed)"].get_xdata()) == [250, 500]
    # bands only for the two conditions with two seeds (latent only and ReDi)
    assert sum(isinstance(c, PolyCollection) for c in axis.collections) == 2
    # accuracy bands are drawn inside [0, 1] even where a 2-seed t-interval runs past them
    import dataclasses

    cells = report.cells.copy()
    wide = (cells["metric"] == "accuracy") & (cells["n_seeds"] >= 2)
    cells.loc[wide, "ci_low"], cells.loc[wide, "ci_high"] = cells.loc[wide, "mean"] - 0.9, cells.loc[wide, "mean"] + 0.9
    plots.plot_convergence(dataclasses.replace(report, cells=cells), tmp_path)
    bands = [c for c in figures["convergence_no_cfg_accuracy"].axes[0].collections if isinstance(c, PolyCollection)]
    y = np.concatenate([path.vertices[:, 1] for band in bands for path in band.get_paths()])
    assert len(bands) == 2 and y.min() == 0 and y.max() == 1
    loss = figures["loss_curves"]
    assert [a.get_title() for a in loss.axes] == ["loss", "loss/latent", "loss/semantic"]
    assert all(a.get_xscale() == "log" for a in loss.axes)


def test_real_folders_with_another_sample_count_are_set_apart(trained, tmp_path):
    """On folders written by the real trainer and evaluator: one ReDi seed re-scored by
    bench.evaluate.score_run with 8 samples instead of 16 is not averaged with the other seed; it is set
    apart, and the report says why."""
    import shutil

    import torch

    from bench.evaluate.score_run import evaluate

    root = tmp_path / "runs"
    shutil.copytree(trained / "real_fixture", root / "real_fixture")
    runs = sorted((root / "real_fixture").glob("redi-*"))
    kept = {json.loads(line)["step"]: json.loads(line)["value"]
            for line in (runs[0] / "eval.jsonl").read_text().splitlines()
            if json.loads(line)["metric"] == "fd_classifier"}
    (runs[1] / "eval.jsonl").unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        evaluate(None, runs[1], overrides=["eval.num_samples=8"], shard_size=8, progress=False)
    finally:
        torch.set_num_threads(threads)
    rep = summarize(gather("real_fixture", root, grid={"name": "real_fixture"}))
    main_cell = cell(rep, "SiT-tiny/1 w/ ReDi", 4)
    apart = cell(rep, "SiT-tiny/1 w/ ReDi", 4, group=1)
    assert main_cell["n_seeds"] == 1 and main_cell["mean"] == pytest.approx(kept[4], rel=1e-12)
    assert apart["n_seeds"] == 1 and "n_samples 8 (main table: 16)" in apart["set_apart_reason"]
    assert "n=8" in apart["evaluator"] and "n=16" in main_cell["evaluator"]
    assert "Why set apart: n_samples 8 (main table: 16)." in render_markdown(rep)


def _write_grid_runs(root: Path, name: str, measured: bool) -> int:
    """The run folders of a real grid as bench.launch.grids expands it, every applicable eval
    setting measured at every step (or none); returns the number of (setting, run, step) cells."""
    from bench.launch import grids

    grid = grids.load_grid(name)
    count = 0
    for cell in grids.expand(grid):
        rows = []
        for setting in grids.settings_for(grid, cell):
            for step in setting.scores(cell.eval_steps):
                rows += [eval_row(step, "fd_classifier", 10.0, setting=setting.name),
                         eval_row(step, "accuracy", 0.5, setting=setting.name)]
                count += 1
        run = root / name / cell.run_dir.name
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps(dataclasses.asdict(cell.cfg)))
        if measured:
            (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return count


def test_settings_a_grid_does_not_apply_are_never_missing(tmp_path):
    """demo_quick's rg1.5 matches only redi_rg and scores only the final step 200: a
    complete grid has nothing missing, and an empty one misses exactly its 7 cells (3 specs x 2
    steps plain + 1 with RG; each cell is a spec's seed mean, from 14 run evaluations: 2 paired
    seeds). RG measured at step 100 too (as the demo did before RG moved to the last step) is shown,
    not dropped."""
    assert _write_grid_runs(tmp_path / "full", "demo_quick", measured=True) == 14
    report = summarize(gather("demo_quick", tmp_path / "full"))
    assert report.missing == []
    rg = report.cells[(report.cells["setting"] == "rg1.5") & (report.cells["metric"] == "fd_classifier")]
    assert set(rg["spec"]) == {"redi_rg"} and list(rg["step"]) == [200]
    _write_grid_runs(tmp_path / "empty", "demo_quick", measured=False)
    missing = summarize(gather("demo_quick", tmp_path / "empty")).missing
    assert len(missing) == 7 and [m for m in missing if "setting rg1.5:" in m] == \
        ["setting rg1.5: SiT-tiny/1 w/ ReDi (p_drop) at step 200 (nothing measured in this setting yet)"]
    for run in (tmp_path / "full" / "demo_quick").glob("redi_rg-*"):
        with (run / "eval.jsonl").open("a") as handle:
            handle.write(json.dumps(eval_row(100, "fd_classifier", 12.0, setting="rg1.5")) + "\n")
    report = summarize(gather("demo_quick", tmp_path / "full"))
    rg = report.cells[(report.cells["setting"] == "rg1.5") & (report.cells["metric"] == "fd_classifier")]
    assert report.missing == [] and list(rg["step"]) == [100, 200] and list(rg["mean"]) == [12.0, 10.0]


def test_report_cli_counts_every_missing_cell_and_names_unknown_grids(tmp_path, capsys):
    """No runs of table1 at all: every expected cell is listed, not one line per setting."""
    from bench.launch import grids

    cells = grids.expand(grids.load_grid("table1"))
    expected = sum(len(c.eval_steps) for c in cells)
    assert len(cells) == 12 and expected > 12
    assert main(["table1", f"output_root={tmp_path / 'runs'}", "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert f"nothing measured yet: {expected} cells (listed in report.md)" in captured.out
    assert captured.err == ""  # output_root= is the spelling of bench grid and bench status
    assert main(["nosuchgrid", f"output_root={tmp_path / 'runs'}", "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench report: error: unknown grid 'nosuchgrid'") and "table1" in err
    # the old option still works, with a deprecation line
    assert main(["table1", "--runs-root", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    assert "--runs-root is deprecated; write output_root=" in capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["--out", "/dev/null/reports"], "--out /dev/null/reports/mini_table1: /dev/null is not a folder"),
    (["--out", "/proc/redi-bench-reports"], "--out /proc/redi-bench-reports/mini_table1: cannot write there"),
    (["output_root="], "output_root is empty"),
])
def test_report_unwritable_or_odd_paths_are_one_line(tmp_path, capsys, args, fragment):
    """Checked before any work: one line, exit 2, no traceback."""
    argv = ["mini_table1", f"output_root={tmp_path}", "--out", str(tmp_path / "out"), "--no-plots", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err


def _strip_pdf_dates(data: bytes) -> bytes:
    import re

    return re.sub(rb"/CreationDate \([^)]*\)", b"", data)  # the one wall-clock field of the files


@pytest.mark.timeout(600)
def test_kill9_while_writing_then_rerun_is_byte_identical(tmp_path):
    """`bench report` SIGKILLed at deterministic points (REDI_BENCH_KILL_AT, bench.atomic.crash_point:
    the file's bytes written to its temporary name, not yet renamed) while its first, a middle and its
    last file are written; a re-run leaves the same files, byte for byte (PDFs apart from their
    CreationDate), as an uninterrupted run, and no temporaries. Each killed run starts over in the
    folder the previous one left."""
    import subprocess
    import sys

    build_fixture(tmp_path / "runs")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}

    def report(out: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
        extra = {"REDI_BENCH_KILL_AT": kill_at} if kill_at else {}
        return subprocess.run([sys.executable, "-m", "bench.cli", "report", GRID, "--runs-root",
                               str(tmp_path / "runs"), "--out", str(out)], env={**env, **extra},
                              capture_output=True, text=True, timeout=240)

    assert report(tmp_path / "reference").returncode == 0
    reference = tmp_path / "reference" / GRID
    out = tmp_path / "killed"
    for point in ("atomic:report.md", "atomic:runs.csv", "atomic:loss_curves.pdf"):  # one after another
        killed = report(out, point)
        assert killed.returncode == -9, f"{point} was not reached: {killed.stdout}{killed.stderr}"
        assert any(".tmp-" in p.name for p in (out / GRID).iterdir())  # the interrupted write's temporary
    rerun = report(out)
    assert rerun.returncode == 0, rerun.stderr
    names = sorted(p.name for p in (out / GRID).iterdir())
    assert names == sorted(p.name for p in reference.iterdir())
    for name in names:
        assert _strip_pdf_dates((out / GRID / name).read_bytes()) == \
            _strip_pdf_dates((reference / name).read_bytes()), name
