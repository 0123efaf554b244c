"""`bench demo --quick` through the real CLI, as a newcomer would run it: prepare, the local executor,
training, evaluation and the report end to end, then a second call that must reuse everything.
Output goes to tmp_path (options), never to the repository's results/.

Time: docs/demo.md has what a first call took; the slowest measured was 11.8 min, on a 2-core
machine at load average 3-7 with an older one-lane demo. DEMO_TIMEOUT_S bounds one call;
every test here gets pytest-timeout's limit raised to cover its calls (the module fixture's first
call counts against the first test that uses it), so pytest's global 600 s (pyproject.toml)
never kills a demo that is still within its own limit."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.demo.calibrate import Costs, estimate, lane_split
from bench.demo.plan import MIN_TICKS, Printer, Work, fmt_time
from bench.demo.run import DemoError, first_failure

DEMO_TIMEOUT_S = 1500  # one `bench demo --quick` call: 2x the slowest first call measured (11.8 min)
pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_S + 300)  # one call + a reusing one + the checks
SPECS = ("latent_only", "repa", "redi_rg")
SEEDS = (0, 1)  # paired
STEPS = (100, 200)  # ablations/grids/demo_quick.yaml
EVALUATIONS = len(SPECS) * len(SEEDS) * len(STEPS) + len(SEEDS)  # + RG for redi_rg at the last step


def _command() -> list[str]:
    script = Path(sys.executable).with_name("bench")  # the venv's console script
    return [str(script)] if script.is_file() else [sys.executable, "-m", "bench.cli"]


def _demo(tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    args = ["demo", "--quick", "--out", str(tmp_path / "out"), "--runs-root", str(tmp_path / "runs"),
            "--prepared-dir", str(tmp_path / "prepared"), "--every", "5"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    began = time.time()
    # cwd=tmp_path: even a default relative path could not reach the repository's results/
    proc = subprocess.run(_command() + args, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=DEMO_TIMEOUT_S)
    return proc, time.time() - began


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 5_000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    proc, seconds = _demo(tmp)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return tmp, proc, seconds


def test_quick_demo_writes_every_promised_file(first_run):
    tmp, proc, seconds = first_run
    out = tmp / "out"
    assert proc.stdout.rstrip().endswith(f"bench demo: output in {out}")
    # before any work: this machine measured and every stage estimated
    estimate_line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("estimate for this machine"))
    assert "prepare ~" in estimate_line and "training ~" in estimate_line and "evaluation ~" in estimate_line
    # progress: the running cells, their steps, images/s and the time left were printed while training
    train_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("train ") and "img/s" in ln]
    assert train_lines and all(" left" in ln and (" s0 " in ln or " s1 " in ln) for ln in train_lines), proc.stdout
    assert any(ln.startswith(f"eval: {EVALUATIONS} evaluations") for ln in proc.stdout.splitlines()), proc.stdout

    # the table: every spec at every step, plus redi_rg sampled with RG at the last step, with sane
    # numbers and 95% intervals over the two paired seeds
    rows = list(csv.DictReader((out / "table.csv").open()))
    plain = {(r["spec"], int(r["step"])) for r in rows if r["sampling"] == "no guidance"}
    assert plain == {(s, t) for s in SPECS for t in STEPS}
    guided = [r for r in rows if r["sampling"] != "no guidance"]
    assert {(r["spec"], r["sampling"], int(r["step"])) for r in guided} == \
        {("redi_rg", "RG w_r=1.5", STEPS[-1])}
    for r in rows:
        assert 0 < float(r["fd_classifier"]) < 1e4 and 0 <= float(r["accuracy"]) <= 1, r
        assert float(r["fd_classifier_n"]) == len(SEEDS) and float(r["fd_classifier_half_width"]) > 0, r
    summary = (out / "summary.md").read_text()
    for spec in SPECS:
        assert f"| {spec} | no guidance | 2 |" in summary
    assert "| redi_rg | RG w_r=1.5 | 2 |" in summary and "FD @200" in summary and "acc @200" in summary
    assert " ± " in summary and "Paired differences" in summary and "paired seeds" in summary
    assert "corrected by Holm's step-down method" in summary and " tests, corrected" in summary
    assert "no difference shown (interval [" in summary or "✱" in summary
    assert "cores" in summary and "torch" in summary and "this call:" in summary and "CPU kernels" in summary
    assert "estimated before any work" in summary and "2 at a time" in summary
    assert "Speed-ups" in summary

    # figures: the convergence plot, and one sample figure per spec; ReDi figures carry a second
    # panel (the generated semantic maps), so they are wider than the latent-only ones
    _png_size(out / "convergence.png")
    widths = {name: _png_size(out / f"samples_{name}.png")[0]
              for name in (*SPECS, "redi_rg_rg1.5")}
    assert widths["redi_rg"] > 1.5 * widths["latent_only"] and widths["redi_rg_rg1.5"] > 1.5 * widths["repa"]

    # bench report's own files, including the per-setting plot of the setting with a dot in its name
    for name in ("report.md", "table.csv", "table.tex", "speedups.csv",
                 "convergence_plain_fd_classifier.png", "convergence_rg1.5_fd_classifier.png"):
        assert (out / "report" / name).is_file(), name
    runs = sorted((tmp / "runs" / "demo_quick").glob("*-*"))
    assert sorted(p.name.split("-")[0] for p in runs) == sorted(SPECS * len(SEEDS))
    assert all((p / "DONE").is_file() and (p / "eval.jsonl").is_file() for p in runs)
    calls = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines()]
    assert len(calls) == 1 and calls[0]["prepare"] is False and calls[0]["trained"] == len(SPECS) * len(SEEDS)
    assert calls[0]["evaluated"] == EVALUATIONS and calls[0]["estimate"]["lanes"] == 2
    # the stages add up to the call (six values rounded to 0.1 s: 0.3 s at most), and the up-front
    # measurement is its own stage, not the report's
    stages = [calls[0][f"{stage}_s"] for stage in ("measure", "prepare", "train", "eval", "report")]
    assert abs(sum(stages) - calls[0]["total_s"]) < 0.31 and stages[0] >= calls[0]["estimate"]["calibration_s"]
    units = calls[0]["estimate"]["units"]  # what the estimate came from, to check it against the stages
    assert set(units["sample_step_s"]) == {"none", "rg"} and units["decode_image_s"] > 0
    assert units["vae_step_s"] > 0 and units["encode_image_s"] > 0 and set(units["train_step_s"]) == set(SPECS)
    assert calls[0]["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", calls[0]["commit"])


def test_second_call_reuses_everything(first_run):
    tmp, _, first_seconds = first_run
    summary_before = (tmp / "out" / "table.csv").read_text()
    proc, seconds = _demo(tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is up to date" in proc.stdout
    assert f"{len(SPECS) * len(SEEDS)} finished earlier (reused), 0 to train" in proc.stdout
    assert f"{EVALUATIONS} measured earlier (reused), 0 to run" in proc.stdout
    assert seconds < max(60.0, first_seconds / 4), (seconds, first_seconds)  # nothing trained again
    assert (tmp / "out" / "table.csv").read_text() == summary_before  # same numbers, regenerated
    calls = [json.loads(line) for line in (tmp / "out" / "invocations.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and calls[1]["prepare"] is True
    assert calls[1]["trained"] == 0 and calls[1]["evaluated"] == 0
    assert "first call in this folder" in (tmp / "out" / "summary.md").read_text()


def test_a_failing_cell_stops_the_demo_with_its_log(first_run, tmp_path):
    """A prepared shard overwritten with zeros of the same size (prepare's cheap size check passes, so
    the demo does not rebuild it; a deleted shard would be rebuilt): every cell fails when training
    loads it; the demo must say so with the log, not hang."""
    import shutil

    tmp, _, _ = first_run
    shutil.copytree(tmp / "prepared", tmp_path / "prepared")
    shard = next((tmp_path / "prepared" / "train").glob("shard-*.safetensors"))
    shard.write_bytes(bytes(shard.stat().st_size))
    proc, seconds = _demo(tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:]
    error = proc.stderr.strip()
    assert error.startswith("bench demo: error: training of cell ") and "Traceback" not in error
    log = Path(error.split("log: ", 1)[1].split()[0])
    assert log.is_file() and shard.name in log.read_text()
    assert seconds < 120


def test_failure_message_names_the_log_and_progress_helpers(capsys):
    rows = [{"cell": "latent_only", "state": "done", "detail": "", "log": None, "eval_errors": []},
            {"cell": "redi", "state": "failed", "detail": "job ended without reporting an outcome",
             "log": "/x/.submitit/train/1/1_0_log.err", "eval_errors": []}]
    message = first_failure(rows, "train")
    assert "cell redi failed" in message and "/x/.submitit/train/1/1_0_log.err" in message
    assert first_failure(rows, "eval") is None
    rows[0]["eval_errors"] = ["plain: MetricError: too few samples\n    log: /y.err"]
    assert "/y.err" in first_failure(rows, "eval")
    assert issubclass(DemoError, ValueError)  # bench.cli prints it as one line
    assert (fmt_time(59), fmt_time(61), fmt_time(3725), fmt_time(None)) == ("0m59s", "1m01s", "1h02m", "?")
    printer = Printer(enabled=True, every=3600, tty=False)
    printer.line("train 1/4 a", key="a")
    printer.line("train 1/4 a again", key="a")  # same cell within `every`: not repeated
    printer.line("train 2/4 b", key="b")  # a new cell: printed at once
    assert capsys.readouterr().out.splitlines() == ["train 1/4 a", "train 2/4 b"]


def test_time_left_is_smoothed_and_shown_only_when_measured():
    """A tick at a third of the predicted speed (a loaded moment, a cell starting) moves the speed
    factor by RATE_SMOOTHING of the difference, not all the way; the same tick twice counts once."""
    work = Work(cells=[])
    for step in (1, 2):
        work.observe("run-a", {"step": step * 10, "images_per_s": 300.0}, predicted_images_per_s=300.0)
    work.observe("run-a", {"step": 20, "images_per_s": 1.0}, predicted_images_per_s=300.0)  # seen: ignored
    assert not work.measured and work.speed == 1.0
    work.observe("run-b", {"step": 10, "images_per_s": 100.0}, predicted_images_per_s=300.0)
    assert work.measured and work.ticks == MIN_TICKS
    assert work.speed == 0.3 * (100.0 / 300.0) + 0.7 * 1.0  # exact in float64
    work.observe("run-b", {"step": 20, "images_per_s": 0}, predicted_images_per_s=300.0)  # no rate
    assert work.ticks == MIN_TICKS


def test_estimate_follows_the_lanes_and_the_counts():
    """bench.demo.calibrate.estimate against arithmetic done here by hand."""
    costs = Costs(train_step_s={"a": 0.5, "b": 1.0}, sample_step_s={"none": 0.002, "rg": 0.005},
                  decode_image_s=0.01, score_image_s=0.02, vae_step_s=0.4, classifier_step_s=0.2,
                  encode_image_s=0.01, lanes=2, threads=1)
    # as bench.launch.submit deals jobs: longest first to the least loaded lane
    assert lane_split(["a", "b", "c", "d", "e"], [1, 1, 2, 2, 1], 2) == [["a", "c", "e"], ["b", "d"]]
    plain, guided = (10, 5, "none"), (10, 5, "rg")
    got = estimate(costs, [("a", 100), ("b", 100), ("a", 100)], [[plain, plain], [guided]],
                   {"vae_steps": 100, "classifier_steps": 300, "images": 1000, "reference_images": 500})
    assert got.train_s == 100 * 0.5 + 100 * 0.5  # lane 0: b (100 s); lane 1: a, a (100 s)
    plain_s = 10 * (5 * 0.002 + 0.01 + 0.02) + 3.0  # sampling, decoding and scoring, the overhead
    guided_s = 10 * (5 * 0.005 + 0.01 + 0.02) + 3.0  # the guided step as timed, not 2x the plain one
    assert got.eval_s == pytest.approx(2 * plain_s + 500 * 0.02)  # the longer lane's job + the reference
    assert 2 * plain_s > guided_s
    assert got.prepare_s == max(100 * 0.4, 300 * 0.2) + 1000 * 0.01 / 2  # VAE beside classifier
    assert got.total_s == got.prepare_s + got.train_s + got.eval_s
    assert estimate(costs, [], [], None).total_s == 0.0
    assert estimate(costs, [], [[guided]], None).eval_s == pytest.approx(guided_s)  # no reference: cached
    # A mode not timed costs its passes times the unguided step.
    assert costs.evaluation_s(10, 5, "cfg+rg") == pytest.approx(10 * (5 * 3 * 0.002 + 0.03) + 3.0)
    # A compiled spec pays its compile once per cell that still trains: lanes b (100 s) and a, a (120 s).
    compiled = dataclasses.replace(costs, train_compile_s={"a": 10.0})
    assert estimate(compiled, [("a", 100), ("b", 100), ("a", 100)], [], None).train_s == 2 * (100 * 0.5 + 10.0)
    assert estimate(compiled, [("a", 0)], [], None).train_s == 0.0
    # Lanes that end training first evaluate meanwhile: lane 0 trains b (100 s), lane 1 a (50 s), so
    # 50 lane-seconds of evaluation are done by the end of training and the rest spreads over both.
    big_plain, big_guided = (1000, 5, "none"), (1000, 5, "rg")
    plain_job, guided_job = 2 * (1000 * 0.04 + 3.0), 1000 * 0.055 + 3.0  # 86 s and 58 s, in two lanes
    apart = estimate(costs, [("a", 100), ("b", 100)], [[big_plain, big_plain], [big_guided]], None)
    assert apart.eval_s == pytest.approx(plain_job * (1 - 50 / (plain_job + guided_job)))
    # Not more than all jobs but the largest: a cell still training keeps its own evaluations.
    one_left = estimate(costs, [("b", 1000)], [[big_plain, big_plain], [big_guided]], None)
    assert one_left.eval_s == pytest.approx(plain_job * (1 - guided_job / (plain_job + guided_job)))


def test_the_eval_stages_time_left_has_no_training_beside_it():
    """In the eval stage (rows None) no lane idles beside training: three cells in two lanes would
    otherwise take a phantom cell's idle lane-seconds off the evaluation's time left."""
    from types import SimpleNamespace

    from bench.demo.plan import stage_estimate

    costs = Costs(train_step_s={"a": 1.0}, sample_step_s={"none": 0.002}, decode_image_s=0.01,
                  score_image_s=0.02, lanes=2, threads=1)
    cells = [SimpleNamespace(name=f"c{k}", cfg=SimpleNamespace(spec="a", train=SimpleNamespace(max_steps=100)))
             for k in range(3)]
    evaluation = SimpleNamespace(eval=SimpleNamespace(
        num_samples=1000, num_sampling_steps=5, guidance=SimpleNamespace(cfg_scale=1.0, rg_scale=1.0)))
    todo = [(cell, "default", evaluation, 100) for cell in cells]
    alone = estimate(costs, [], [[(1000, 5, "none")]] * 3, None).eval_s
    assert stage_estimate(Work(cells, costs=costs), None, todo).eval_s == pytest.approx(alone)
    training = [{"state": "done", "step": 100}, {"state": "done", "step": 100}, {"state": "running", "step": 0}]
    assert stage_estimate(Work(cells, costs=costs), training, todo).eval_s < alone  # the idle lane evaluates


def test_costs_units_are_the_measurements_rounded():
    costs = Costs(train_step_s={"a": 0.123456789}, sample_step_s={"none": 0.00123456}, decode_image_s=0.5,
                  lanes=2, threads=1, seconds=30.0)
    units = costs.units()
    assert units["train_step_s"] == {"a": 0.1235} and units["sample_step_s"] == {"none": 0.001235}
    assert units["decode_image_s"] == 0.5 and units["vae_step_s"] is None
    assert not {"lanes", "threads", "seconds"} & set(units)  # recorded beside, not among, the units
    json.dumps(units)  # goes into invocations.jsonl as is


def test_the_unguided_step_is_timed_whenever_evaluations_are_left():
    """Even when only guided evaluations are left (a resumed demo), the unguided step is timed: the
    time left predicts the finished unguided evaluations with it."""
    from types import SimpleNamespace

    from bench.demo.plan import sampling_to_time

    def evaluation(spec, rg_scale, batch=250):
        cfg = SimpleNamespace(eval=SimpleNamespace(guidance=SimpleNamespace(cfg_scale=1.0, rg_scale=rg_scale),
                                                   batch_size=batch))
        return (SimpleNamespace(cfg=SimpleNamespace(spec=spec)), "s", cfg, 600)

    assert sampling_to_time([evaluation("redi_rg", 1.5)]) == {"rg": ("redi_rg", 250), "none": ("redi_rg", 250)}
    assert sampling_to_time([evaluation("latent_only", 1.0, 64), evaluation("redi_rg", 1.5)]) == {
        "none": ("latent_only", 64), "rg": ("redi_rg", 250)}
    assert sampling_to_time([]) == {}


def test_guidance_modes_and_their_passes():
    from bench.demo.calibrate import guidance_mode, passes

    modes = {(c, r): guidance_mode(c, r) for c in (1.0, 4.0) for r in (1.0, 1.5)}
    assert modes == {(1.0, 1.0): "none", (4.0, 1.0): "cfg", (1.0, 1.5): "rg", (4.0, 1.5): "cfg+rg"}
    assert [passes(m) for m in ("none", "cfg", "rg", "cfg+rg")] == [1, 2, 2, 3]


def test_measured_eval_speed_compares_wall_times_with_the_calibration(tmp_path):
    """Once evaluations finish, the time left uses their wall times over the calibration's
    prediction (each (checkpoint, setting) once, though eval.jsonl has a row per metric)."""
    from types import SimpleNamespace

    from bench.demo.plan import measured_eval_speed

    costs = Costs(train_step_s={}, sample_step_s={"none": 0.002, "rg": 0.005})
    rows = [{"step": 300, "setting": "plain", "metric": metric, "n": 100, "sampling_steps": 10,
             "guidance": {"cfg_scale": 1.0, "rg_scale": 1.0}, "wall_time_s": 10.0} for metric in ("fd", "acc")]
    rows.append({"step": 600, "setting": "rg1.5", "metric": "fd", "n": 100, "sampling_steps": 10,
                 "guidance": {"cfg_scale": 1.0, "rg_scale": 1.5}, "wall_time_s": 16.0})
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # wall_time_s covers sampling and metrics, not the start EVAL_OVERHEAD_S stands for
    predicted = 100 * 10 * 0.002 + 100 * 10 * 0.005  # 2 s + 5 s
    got = measured_eval_speed([SimpleNamespace(run_dir=tmp_path)], costs)
    assert got == pytest.approx(predicted / 26.0)
    assert measured_eval_speed([SimpleNamespace(run_dir=tmp_path / "none")], costs) is None


@pytest.mark.parametrize("steps, compiles", [(600, True), (200, False)])
def test_calibration_compiles_where_the_runs_compile_and_times_the_compile(steps, compiles, monkeypatch):
    """train.compile=auto: the demo's 600-step cells compile on a CPU, the quick demo's 200-step ones
    do not; a compiled spec's warm-cache compile (a fresh compile's first call, less a step) is measured."""
    import time as time_module
    from types import SimpleNamespace

    import bench.perf.training as training
    from bench.demo.calibrate import _measure_lane

    built = []

    def train_workload(spec, cfg, geometry, pool, device, options):
        built.append(options.compile)
        first = len(built) == 2  # the rebuilt workload's first call stands for the warm compile
        return SimpleNamespace(run=lambda: time_module.sleep(0.05 if first else 0.0))

    monkeypatch.setattr(training, "build_train_workload", train_workload)
    overrides = ["spec=redi", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", f"train.max_steps={steps}"]
    out = _measure_lane({"specs": {"redi": overrides}, "sampling": {}, "prepare": None, "budget_s": 0.0})
    assert built == ([True, True] if compiles else [False])
    assert ("compile" in out) is compiles
    if compiles:
        assert 0.03 <= out["compile"]["redi"] < 1.0  # the 50 ms call (this VM's clock: 46-50 ms)


def test_calibration_times_each_guidance_mode_and_what_follows_sampling(monkeypatch):
    """Each mode the evaluations sample in is timed on its own workload (a guided step is not
    assumed to cost its passes times the plain one), and the decode and the scoring per sample
    on the evaluation's networks (random weights)."""
    import time as time_module
    from types import SimpleNamespace

    import bench.perf.infer as infer
    import bench.perf.training as training
    import bench.prepare.embedded as embedded
    from bench.demo.calibrate import _measure_lane

    sleeps = {"none": 0.0, "cfg": 0.0, "rg": 0.02}

    def sample_workloads(spec, cfg, geometry, batch, device, precision, seed=0):
        return [SimpleNamespace(run=lambda s=s: time_module.sleep(s), fields={"guidance": mode})
                for mode, s in sleeps.items()]

    monkeypatch.setattr(training, "build_train_workload", lambda *a, **k: SimpleNamespace(run=lambda: None))
    monkeypatch.setattr(infer, "build_sample_workloads", sample_workloads)
    overrides = ["spec=redi_rg", "model.hidden_size=32", "model.depth=1", "model.num_heads=2"]
    out = _measure_lane({"specs": {"redi_rg": overrides}, "sampling": {"none": ("redi_rg", 4), "rg": ("redi_rg", 4)},
                         "finish": (embedded.EmbeddedVAESettings(block_out_channels=(8, 8)),
                                    embedded.ClassifierSettings(width=8, feature_dim=8), 4),
                         "prepare": None, "budget_s": 0.0})
    assert set(out["sample_step_s"]) == {"none", "rg"}
    assert out["sample_step_s"]["rg"] >= 0.02 / 4 > out["sample_step_s"]["none"]  # per image of the batch
    assert out["decode_image_s"] > 0 and out["score_image_s"] > 0


@pytest.mark.parametrize("setting", ["fp32", "bf16", "auto"])
def test_calibration_times_the_precision_the_runs_resolve(setting, monkeypatch):
    """The estimate's training and sampling units run in the precision `bench train` and `bench
    sample` resolve from the same config (auto: bf16 only where this CPU runs it natively)."""
    from types import SimpleNamespace

    import torch

    import bench.perf.infer as infer
    import bench.perf.training as training
    import bench.prepare.embedded as embedded
    from bench.demo.calibrate import _measure_lane
    from bench.precision import resolve_precision

    seen = {}

    def train_workload(spec, cfg, geometry, pool, device, options):
        seen["train"] = options.precision
        return SimpleNamespace(run=lambda: None)

    def sample_workloads(spec, cfg, geometry, batch, device, precision, seed=0):
        seen["sample"] = precision
        return [SimpleNamespace(run=lambda: None, fields={"guidance": "none"})]

    monkeypatch.setattr(training, "build_train_workload", train_workload)
    monkeypatch.setattr(infer, "build_sample_workloads", sample_workloads)
    overrides = ["spec=redi", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                 f"train.precision={setting}", f"eval.precision={setting}"]
    _measure_lane({"specs": {"redi": overrides}, "sampling": {"none": ("redi", 4)}, "prepare": None,
                   "finish": (embedded.EmbeddedVAESettings(block_out_channels=(8, 8)),
                              embedded.ClassifierSettings(width=8, feature_dim=8), 4), "budget_s": 0.0})
    expected = "fp32" if resolve_precision(setting, torch.device("cpu")) is None else "bf16"
    assert seen == {"train": expected, "sample": expected}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_calibration_times_prepare_in_the_precision_prepare_resolves(precision, monkeypatch):
    """The semantic encoder runs under encoder.precision as prepare resolves it; the VAE and the
    classifier in fp32, as prepare runs them."""
    import torch
    from diffusers import AutoencoderKL

    import bench.prepare.embedded as embedded
    from bench.demo.calibrate import _measure_prepare
    from bench.prepare.encoders import SemanticEncoder

    seen = set()

    def autocast_dtype():
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None

    def watch(name, real):
        def run(self, *args, **kwargs):
            seen.add((name, autocast_dtype()))
            return real(self, *args, **kwargs)
        return run

    vae_losses = embedded.vae_losses
    monkeypatch.setattr(embedded, "vae_losses", lambda vae, x, g, dtype=None: (
        seen.add(("vae step", dtype)) or vae_losses(vae, x, g, dtype)))
    monkeypatch.setattr(AutoencoderKL, "encode", watch("vae", AutoencoderKL.encode))
    monkeypatch.setattr(SemanticEncoder, "encode", watch("encoder", SemanticEncoder.encode))
    monkeypatch.setattr(embedded.EvalClassifier, "logits", watch("classifier", embedded.EvalClassifier.logits))
    _measure_prepare(0.0, embedded.EmbeddedVAESettings(block_out_channels=(8, 8), batch_size=2),
                     embedded.ClassifierSettings(width=8, feature_dim=8, batch_size=2), 2, precision)
    dtype = torch.bfloat16 if precision == "bf16" else None
    assert seen == {("vae step", None), ("vae", None), ("encoder", dtype), ("classifier", None)}


def test_the_summary_states_the_t_quantile_of_its_seed_count():
    from types import SimpleNamespace

    from bench.demo.output import seeds_note

    def cells(*seeds):
        return [SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(seed=s))) for s in seeds]
    assert "With 3 seeds the t-interval is wide (t = 4.30 for 2 degrees" in seeds_note(cells(0, 1, 2, 0, 1, 2))
    assert "t = 12.71 for 1 degree of" in seeds_note(cells(0, 1, 0, 1))
    assert seeds_note(cells(0, 0)).startswith("With one seed there is no interval")


def test_unwritable_output_folder_fails_before_any_work(tmp_path):
    """Found out up front, one line, not at the report stage after all the work."""
    for option in ("--out", "--runs-root", "--prepared-dir"):
        began = time.time()
        proc = subprocess.run(_command() + ["demo", "--quick", option, "/dev/null/demo"], cwd=tmp_path,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert proc.stderr.strip() == (f"bench demo: error: {option} /dev/null/demo: /dev/null is not a "
                                       "folder; choose another path")
        assert time.time() - began < 60


def test_ctrl_c_stops_quietly(first_run, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) during training: no traceback from the
    demo or from the local executor's processes."""
    import shutil
    import signal

    tmp, _, _ = first_run
    shutil.copytree(tmp / "prepared", tmp_path / "prepared")
    args = ["demo", "--quick", "--out", str(tmp_path / "out"), "--runs-root", str(tmp_path / "runs"),
            "--prepared-dir", str(tmp_path / "prepared"), "--every", "1"]
    proc = subprocess.Popen(_command() + args, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal gives it
    lines = []
    for line in proc.stdout:  # until training is under way
        lines.append(line)
        if line.startswith("train 0/"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "bench demo: stopped" in err and "run the same command again to resume" in err
    # the executor's output went to its log instead of the terminal (resuming is the second
    # call's test: a full re-run here would cost another training of every cell)
    assert (tmp_path / "runs" / "demo_quick" / ".submitit" / "executors.log").is_file()


_SUBMIT_AND_WAIT = """
import sys, time
from pathlib import Path
import submitit
from bench.demo.local_jobs import children_stderr_to
folder = Path(sys.argv[1])
executor = submitit.LocalExecutor(folder=folder / "%j")
executor.update_parameters(timeout_min=5)
with children_stderr_to(folder / "executors.log"):
    executor.submit(time.sleep, 120)
print("submitted", flush=True)
try:
    time.sleep(120)
except KeyboardInterrupt:
    print("stopped", file=sys.stderr)
"""


def test_ctrl_c_reaches_the_local_executor_without_a_traceback_on_the_terminal(tmp_path):
    """The mechanism behind the demo's quiet Ctrl-C, without a demo: the local executor's controller
    gets the terminal's SIGINT and prints a KeyboardInterrupt traceback; it must go to the log."""
    import signal

    proc = subprocess.Popen([sys.executable, "-c", _SUBMIT_AND_WAIT, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "submitted"
    began = time.time()  # the controller is up once it has opened its job's log files
    while not list(tmp_path.glob("*/*_log.err")) and time.time() - began < 120:
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert err == "stopped\n", err  # nothing from the controller on the terminal
    assert "KeyboardInterrupt" in (tmp_path / "executors.log").read_text()  # it went to the log
