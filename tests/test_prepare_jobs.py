"""`bench prepare ... --debug/--local/--cluster`: prepare as an encoding array plus a PCA job
(bench.launch.prepare_jobs), on the tiny prepare of tests/test_prepare.py (digits, a random f=4
AutoencoderKL, EfficientNet-Lite0 at 64 px).

The shards the jobs write are the tensors one `run_prepare` call writes (compared exactly); a
finished folder submits nothing; a second submission deals only the shards without a file; the
jobs' submit/start/end rows are in `<prepared_dir>/jobs.jsonl` and `bench status --prepare` reads
them; bad settings fail before anything is queued or written. On the local SLURM cluster (slow):
a task killed mid-array leaves the PCA job waiting forever (afterok), and submitting again cancels
it and deals only the missing shards. The whole paper-scale path is tests/test_rehearse.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures_slurm import cluster  # noqa: F401 (a fixture)
from safetensors.torch import load_file

from bench.launch import prepare_jobs
from bench.launch.profiles import LaunchError
from bench.prepare.pipeline import PrepareOptions, run_prepare
from bench.runfolder import JOBS_FILE, read_jsonl

REPO = Path(__file__).resolve().parents[1]
SIZES = {"train": 96, "test": 40}  # 3 + 2 shards of 32


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A randomly initialised f=4 AutoencoderKL (32x32 -> 4x8x8): the pipeline, not its quality."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    folder = tmp_path_factory.mktemp("vae") / "tiny"
    vae.save_pretrained(folder)
    return folder


def _overrides(out: Path, vae_dir: Path) -> list[str]:
    return ["data.name=digits", f"data.prepared_dir={out}", "vae.kind=diffusers", f"vae.path={vae_dir}",
            "vae.scaling_factor=0.5", "encoder.pca_rank_max=4", "model.pca_rank=4"]


def _options() -> PrepareOptions:
    return PrepareOptions(shard_size=32, batch_size=16, max_images=dict(SIZES), efficientnet_input_size=64,
                          train_classifier=False, progress=False)


def _shards(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(out)): load_file(str(p)) for p in sorted(out.glob("*/shard-*.safetensors"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, vae_dir):
    from bench.compose import load_config

    out = tmp_path_factory.mktemp("reference") / "prepared"
    cfg = load_config(_overrides(out, vae_dir))
    run_prepare(cfg.data, cfg.vae, cfg.encoder, _options())
    return _shards(out)


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory, vae_dir):
    out = tmp_path_factory.mktemp("debug") / "prepared"
    summary = prepare_jobs.submit_prepare(_overrides(out, vae_dir), _options(), debug=True, tasks=2, quiet=True)
    return out, summary


def test_debug_jobs_write_what_one_call_writes(debug_run, reference):
    out, summary = debug_run
    assert not summary.get("failed") and (out / "manifest.json").is_file()
    assert [j["cell"] for j in summary["jobs"]] == ["encode-0", "encode-1", "pca"]
    assert sorted(summary["jobs"][0]["shards"] + summary["jobs"][1]["shards"]) == \
        ["test/0", "test/1", "train/0", "train/1", "train/2"]
    arrayed = _shards(out)
    assert arrayed.keys() == reference.keys()
    for name, tensors in reference.items():
        for key, value in tensors.items():
            assert torch.equal(value, arrayed[name][key]), (name, key)
    assert not list(out.glob("*/*.enc.safetensors"))


def test_jobs_are_recorded_and_status_reads_them(debug_run):
    out, _ = debug_run
    rows = read_jsonl(out / JOBS_FILE)
    assert [r["event"] for r in rows] == ["submit"] * 3 + ["start", "end"] * 3
    assert {r["outcome"] for r in rows if r["event"] == "end"} == {"done"}
    status = prepare_jobs.prepare_status(out)
    assert status["complete"] and status["total"] == 5 and status["final"] == 5 and status["encoded"] == 0
    assert [(j["job"], j["state"]) for j in status["jobs"]] == [("encode-0", "done"), ("encode-1", "done"),
                                                                ("pca", "done")]
    text = prepare_jobs.format_prepare_status(status)
    assert "done (manifest.json written)" in text and "jobs: 3 done" in text


def test_a_finished_folder_submits_nothing(debug_run, vae_dir):
    out, _ = debug_run
    before = len(read_jsonl(out / JOBS_FILE))
    again = prepare_jobs.submit_prepare(_overrides(out, vae_dir), _options(), debug=True, quiet=True)
    assert again["jobs"] == [] and "up to date" in again["note"]
    assert len(read_jsonl(out / JOBS_FILE)) == before


def test_resubmission_deals_only_missing_shards(debug_run, vae_dir, tmp_path, reference):
    import shutil

    out = tmp_path / "prepared"
    shutil.copytree(debug_run[0], out)
    (out / "manifest.json").unlink()
    (out / "train" / "shard-00001.safetensors").unlink()
    summary = prepare_jobs.submit_prepare(_overrides(out, vae_dir), _options(), debug=True, tasks=4, quiet=True)
    assert [(j["cell"], j["shards"]) for j in summary["jobs"]] == [("encode-0", ["train/1"]), ("pca", [])]
    assert (out / "manifest.json").is_file()
    assert torch.equal(_shards(out)["train/shard-00001.safetensors"]["semantic"],
                       reference["train/shard-00001.safetensors"]["semantic"])


def test_bad_settings_fail_before_anything_is_queued(vae_dir, tmp_path):
    out = tmp_path / "prepared"
    with pytest.raises(ValueError, match="encoder.weights: file .*absent.pth not found"):
        prepare_jobs.submit_prepare([*_overrides(out, vae_dir), "data.image_size=256", "encoder.kind=dinov2",
                                     f"encoder.weights={tmp_path / 'absent.pth'}"], _options(), debug=True)
    with pytest.raises(ValueError, match="vae.path="):
        prepare_jobs.submit_prepare([*_overrides(out, vae_dir), f"vae.path={tmp_path / 'no-vae'}"], _options(),
                                    debug=True)
    assert not out.exists()
    with pytest.raises(LaunchError, match="one of --cluster"):
        prepare_jobs.submit_prepare(_overrides(out, vae_dir), _options(), local=True, debug=True)


def test_cli_options_without_a_launcher_are_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "prepare", "data.name=digits", "--tasks", "2"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--tasks and --hours go with --cluster" in proc.stderr


@pytest.mark.slow
def test_local_jobs_pca_waits_for_the_tasks_and_a_second_submit_waits(vae_dir, tmp_path, reference):
    out = tmp_path / "prepared"
    first = prepare_jobs.submit_prepare(_overrides(out, vae_dir), _options(), local=True, tasks=2, quiet=True)
    second = prepare_jobs.submit_prepare(_overrides(out, vae_dir), _options(), local=True, tasks=2, quiet=True)
    assert len(first["jobs"]) == 3 and second["jobs"] == [] and "already submitted" in second["note"]
    deadline = time.time() + 240
    while time.time() < deadline and not all(j["state"] == "done" for j in prepare_jobs.prepare_status(out)["jobs"]):
        time.sleep(1)
    rows = read_jsonl(out / JOBS_FILE)
    assert {r["outcome"] for r in rows if r["event"] == "end"} == {"done"}, [r for r in rows if r["event"] == "end"]
    ends = [r["unix"] for r in rows if r["event"] == "end" and r["cell"].startswith("encode-")]
    (start,) = [r["unix"] for r in rows if r["event"] == "start" and r["cell"] == "pca"]
    assert len(ends) == 2 and (out / "manifest.json").is_file()
    pca_end = next(r["unix"] for r in rows if r["event"] == "end" and r["cell"] == "pca")
    assert pca_end >= max(ends) and start <= pca_end  # it started at once, then waited for the tasks
    assert _shards(out).keys() == reference.keys()


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_on_slurm_a_failed_task_leaves_a_pca_job_that_a_resubmission_replaces(  # noqa: F811 (cluster)
        cluster, vae_dir, tmp_path, reference, monkeypatch):
    """A task killed mid-array (REDI_BENCH_KILL_AT, passed to the job by sbatch) leaves the PCA job
    pending forever (afterok); submitting again cancels it and deals only the shards still missing."""
    out = tmp_path / "prepared"
    monkeypatch.setenv("REDI_BENCH_KILL_AT", "prepare:encoded:train/0")
    first = prepare_jobs.submit_prepare(_overrides(out, vae_dir), _options(), cluster="local-slurm", tasks=2,
                                        quiet=True)
    monkeypatch.delenv("REDI_BENCH_KILL_AT")
    assert first["jobs"][-1]["after"] == first["jobs"][0]["array_id"]
    _until(lambda: {j["job"]: j["state"] for j in prepare_jobs.prepare_status(out)["jobs"]}
           == {"encode-0": "failed", "encode-1": "done", "pca": "queued"}, out)
    assert "will never start" in prepare_jobs.format_prepare_status(prepare_jobs.prepare_status(out))
    second = prepare_jobs.submit_prepare(_overrides(out, vae_dir), _options(), cluster="local-slurm", tasks=2,
                                         quiet=True)
    assert [(j["cell"], j["shards"]) for j in second["jobs"]] == [("encode-0", ["train/2"]),
                                                                  ("encode-1", ["test/1"]), ("pca", [])]
    old_pca = first["jobs"][-1]["job_id"]
    gone = subprocess.run(["squeue", "-h", "-t", "all", "-j", old_pca, "-o", "%T"], capture_output=True, text=True,
                          timeout=60).stdout.strip()
    assert gone == "CANCELLED", gone
    _until(lambda: prepare_jobs.prepare_status(out)["complete"], out)
    assert _shards(out).keys() == reference.keys()
    for name, tensors in reference.items():
        assert torch.equal(tensors["semantic"], _shards(out)[name]["semantic"]), name


def _until(predicate, out: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, prepare_jobs.format_prepare_status(prepare_jobs.prepare_status(out))
        time.sleep(1)
