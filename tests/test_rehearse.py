"""`bench rehearse` end to end: the paper scale's path in miniature through the real local SLURM
cluster, run as a cluster user runs it.

The package is built as a wheel and installed (not editable) into a folder of its own; the
command runs from a folder outside the checkout with only that folder on PYTHONPATH (the
dependencies come from this environment). It writes the miniature's files (generated
ImageNet-layout JPEGs; SD-VAE (a quarter of its width), DINOv2-B/14-reg and Inception of the real
architectures with random weights; an ADM-layout reference batch), a site.yaml and a user grid `table1`, and runs `bench
weights`, `bench prepare --cluster`, `bench grid table1 --cluster` (train, then eval), `bench
status`, `bench report` and `bench export`. Each stage is checked on what it leaves: the prepare's
shards and manifest (the PCA job started only after every encoding task ended: afterok), a
checkpoint per cell, eval rows with FID, sFID, IS, precision and recall, the report's tables and
plots, the exported .npz's keys and shapes, and that the jobs' logs say what they are doing.

Slow (about three minutes on two cores: 15 SLURM jobs, each a new process) and needs the
local cluster (root, slurm-wlm, munge): skipped with the reason without it, except under
REDI_BENCH_CI=1, where it must run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures_slurm import cluster  # noqa: F401 (a fixture)

from bench import runfolder

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(1500),
              pytest.mark.skipif(importlib.util.find_spec("hatchling") is None and not os.environ.get("REDI_BENCH_CI"),
                                 reason="hatchling (the build backend, in the `test` extra) is not installed")]
REPO = Path(__file__).resolve().parents[1]
METRICS = {"fid", "sfid", "is", "precision", "recall"}
CELLS = {f"{spec}-seed={k}" for spec in ("latent_only", "repa", "redi") for k in (0, 1)}


def _install(root: Path) -> Path:
    """A wheel of the checkout, installed with --target (not editable); returns the site folder."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    wheels, site = root / "wheel", root / "site"
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = wheels.glob("redi_bench-*.whl")
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    return site


@pytest.fixture(scope="module")
def rehearsal(cluster, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    root = tmp_path_factory.mktemp("rehearse")
    began = time.time()
    site = _install(root)
    outside = root / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REDI_BENCH_PATH")}
    env.update(PYTHONPATH=str(site), SLURM_CONF=cluster, HF_HUB_OFFLINE="1")
    where = subprocess.run([sys.executable, "-c", "import bench; print(bench.__file__)"], cwd=outside, env=env,
                           capture_output=True, text=True, timeout=120)
    installed = time.time()
    work = root / "work"
    proc = subprocess.run([sys.executable, "-m", "bench", "rehearse", "--cluster", "local-slurm", "--workdir",
                           str(work), "--timeout-min", "15"], cwd=outside, env=env, capture_output=True,
                          text=True, timeout=1400)
    seconds = {"install": installed - began, "rehearse": time.time() - installed}
    print(f"rehearsal: install {seconds['install']:.0f} s, bench rehearse {seconds['rehearse']:.0f} s")
    return {"proc": proc, "work": work, "site": site, "module": where.stdout.strip(), "seconds": seconds}


def test_it_runs_from_a_wheel_outside_the_checkout(rehearsal):
    proc = rehearsal["proc"]
    assert proc.returncode == 0, (proc.stdout[-6000:] + proc.stderr[-3000:])
    assert Path(rehearsal["module"]).is_relative_to(rehearsal["site"]), rehearsal["module"]
    record = json.loads((rehearsal["work"] / "rehearsal.json").read_text())
    commands = [s["command"] for s in record["steps"]]
    for wanted in ("bench weights scale=paper", "bench prepare scale=paper", "bench grid table1 --cluster local-slurm",
                   "bench grid table1 --stage eval", "bench status table1", "bench report table1", "bench export"):
        assert any(c.startswith(wanted) for c in commands), (wanted, commands)
    assert all(s["exit"] == 0 for s in record["steps"]), record["steps"]
    weights = proc.stdout.split("$ bench weights")[1].split("$ bench prepare")[0]
    for key in ("vae.path", "encoder.weights", "eval.inception_weights", "eval.reference"):
        assert f"{key}:" in weights, weights
    assert weights.count("present: ") == 4 and "missing" not in weights.lower(), weights


def _runs(work: Path) -> dict[str, Path]:
    runs = {}
    for run in (work / "runs" / "table1").iterdir():
        if (run / "config.json").is_file():
            cell = json.loads((run / "config.json").read_text())
            runs[f"{cell['spec']}-seed={cell['train']['seed']}"] = run
    return runs


def test_prepare_ran_as_an_array_then_the_pca_job(rehearsal):
    prepared = rehearsal["work"] / "prepared" / "in256-mini"
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["vae"]["latent_channels"] == 4 and manifest["vae"]["downsample"] == 8
    assert manifest["encoder"]["encoder_id"] == "dinov2_vitb14_reg_224px"
    assert sorted(p.name for p in (prepared / "train").iterdir()) == [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert not list(prepared.glob("*/*.enc.safetensors"))  # every pass-1 file projected and removed
    rows = runfolder.read_jsonl(prepared / runfolder.JOBS_FILE)
    submits = [r for r in rows if r["event"] == "submit"]
    encode = [r for r in submits if r["cell"].startswith("encode-")]
    (pca,) = [r for r in submits if r["cell"] == "pca"]
    assert len(encode) == 2 and len({r["array_id"] for r in encode}) == 1 and pca["after"] == encode[0]["array_id"]
    ends = [r["unix"] for r in rows if r["event"] == "end" and r["cell"].startswith("encode-")]
    (pca_start,) = [r["unix"] for r in rows if r["event"] == "start" and r["cell"] == "pca"]
    assert len(ends) == 2 and pca_start >= max(ends)  # afterok: the PCA job waited for the whole array
    assert all(r["outcome"] == "done" for r in rows if r["event"] == "end")


def test_every_cell_trained_and_has_all_five_metrics(rehearsal):
    runs = _runs(rehearsal["work"])
    assert set(runs) == CELLS
    for cell, run in runs.items():
        assert (run / runfolder.DONE_FILE).is_file() and 4 in runfolder.checkpoint_steps(run), cell
        rows = [r for r in runfolder.read_eval_rows(run) if r["step"] == 4 and r["setting"] == "no_cfg"]
        assert {r["metric"] for r in rows} == METRICS, (cell, rows)
        for r in rows:
            assert math.isfinite(r["value"]) and r["n"] == 4 and r["feature_network"].startswith("inception")
            assert r["reference_is_adm"] in (False, None)  # a generated reference is never taken for ADM's


def test_report_and_export(rehearsal):
    work = rehearsal["work"]
    report = work / "results" / "reports" / "table1"
    files = {p.suffix for p in report.rglob("*") if p.is_file()}
    assert {".md", ".csv", ".png"} <= files, sorted(p.name for p in report.rglob("*"))
    text = "\n".join(p.read_text() for p in report.rglob("*.md"))
    assert "latent_only" in text and "redi" in text and "fid" in text.lower()
    runs = _runs(work)
    with np.load(runs["redi-seed=0"] / "export-no_cfg.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        assert npz["arr_0"].shape == (4, 256, 256, 3) and npz["arr_0"].dtype == np.uint8
        assert npz["arr_1"].shape == (4,) and npz["arr_1"].max() < 3


def _logs(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(folder.rglob("*_log.out")))


def test_job_logs_carry_progress_lines(rehearsal):
    """Without a terminal every job prints plain progress lines (bench.progress): done/total, rate."""
    work = rehearsal["work"]
    prepare, runs = _logs(work / "prepared"), work / "runs" / "table1" / ".submitit"
    train, evaluation = _logs(runs / "train"), _logs(runs / "eval")
    assert re.search(r"^prepare task \d/2: images \d+/\d+ \(100\.0%\) .*img/s", prepare, re.M), prepare
    assert "prepare: finished" in prepare
    assert len(re.findall(r"^train step 4/4 \(100\.0%\) loss \d+\.\d+ [\d.]+ img/s", train, re.M)) == 6, train
    assert len(re.findall(r"^sample step 4: images 4/4 \(100\.0%\)", evaluation, re.M)) == 6, evaluation
    assert train.count("bench: train of cell") == 6 and evaluation.count("bench: eval of cell") == 6
