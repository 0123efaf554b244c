"""Nothing lost, nothing doubled: `bench train` and `bench eval` killed with SIGKILL at named moments
(mid-append, mid-checkpoint, mid-shard, while DONE is written) and re-run with the same command
leave exactly the files of an uninterrupted run; two trainers or two evaluators on one run folder.

The kills are deterministic: REDI_BENCH_KILL_AT=<point>[@N][:STOP] makes the process SIGKILL (or
SIGSTOP) itself at the N-th time it reaches a named point (bench.atomic.crash_point). Every kill is
asserted to have happened (exit by SIGKILL), so a point that is never reached fails the test.

Fields compared with a tolerance of "anything": only the measured ones. metrics.jsonl: `time`,
`elapsed_s`, `images_per_s` (wall clock) and `peak_memory_mb` (the process's memory); DONE: `time`;
eval.jsonl: `sampling_seconds`, `metric_seconds`, `wall_time_s`, `created_at`; sample shards: the
member `seconds`. Everything else, checkpoints included, must be byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_train import add_embedded_eval_assets, one_thread, prepared_dir, tiny_config, write_prepared  # noqa: F401

from bench import runfolder
from bench.atomic import KILL_ENV, TMP_MARK
from bench.compose import dumps
from bench.evaluate.sampling import read_shard, sample
from bench.evaluate.score_run import evaluate
from bench.train.loop import train

REPO = Path(__file__).resolve().parents[1]
TRAIN_MEASURED = ("time", "elapsed_s", "images_per_s", "peak_memory_mb")
EVAL_MEASURED = ("sampling_seconds", "metric_seconds", "wall_time_s", "created_at")
EVAL_OVERRIDES = ("eval.sampler=euler", "eval.num_sampling_steps=3", "eval.num_samples=32",
                  "eval.batch_size=4", "eval.label_sampling=random", "train.ema_decay=0.1")
SHARD = "8"  # 32 samples = 4 shards per checkpoint
pytestmark = pytest.mark.slow  # every test runs the real CLI in subprocesses (torch import: 3-10 s each)


def _env(kill_at: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    return env


def _bench(args: list[str], cwd: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=cwd, env=_env(kill_at),
                          capture_output=True, text=True, timeout=300)


def _killed_at(args: list[str], cwd: Path, points: list[str]) -> None:
    for point in points:
        done = _bench(args, cwd, point)
        assert done.returncode == -signal.SIGKILL, f"not killed at {point}: {done.stdout}{done.stderr}"
    done = _bench(args, cwd)
    assert done.returncode == 0, done.stdout + done.stderr


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _rows(path: Path, measured: tuple[str, ...]) -> list[list]:
    """Rows with their key order, the measured fields left out; the file must end with a newline."""
    text = path.read_text()
    assert text.endswith("\n")
    return [[(k, v) for k, v in json.loads(line).items() if k not in measured] for line in text.splitlines()]


# ----------------------------------------------------------------------------------------------
# bench train


@pytest.mark.timeout(600)
def test_train_killed_at_six_moments_then_rerun_equals_an_uninterrupted_run(prepared_dir, tmp_path):
    # ckpt_every (5) is not a multiple of log_every (2): checkpoint 5 carries a half window.
    cfg = tiny_config(prepared_dir, tmp_path / "runs", "train.max_steps=12", "train.ckpt_every=5",
                      "train.log_every=2", "train.keep_last=10")
    reference = train(cfg, tmp_path / "reference")
    config = tmp_path / "config.json"
    config.write_text(dumps(cfg))
    killed = tmp_path / "killed"
    _killed_at(["train", "--config", str(config), "--run-dir", str(killed)], tmp_path, [
        "append:metrics.jsonl@1",  # the first row torn, before any checkpoint
        "train:step@3",            # row 2 complete, no checkpoint: the restart from 0 must cut it
        "append:metrics.jsonl@3",  # checkpoint 5 written mid-window (5-6), then row 6 torn
        "checkpoint:files@1",      # resumed at 5 (row 6 from the carried window), checkpoint 10's
                                   # tensors written, its state.json not yet
        "atomic:state.json@1",     # checkpoint 10's state.json written to its temporary name
        "atomic:DONE",             # every checkpoint written, DONE at its temporary name
    ])
    assert _files(killed) == _files(reference)  # no leftovers, nothing quarantined
    assert runfolder.checkpoint_steps(killed) == [5, 10, 12]
    for step in (5, 10, 12):
        for name in ("weights.safetensors", "state.safetensors", "state.json"):
            a, b = (runfolder.checkpoint_path(d, step) / name for d in (reference, killed))
            assert a.read_bytes() == b.read_bytes(), f"checkpoint {step}: {name} differs"
    assert (killed / "config.json").read_bytes() == (reference / "config.json").read_bytes()
    assert _rows(killed / "metrics.jsonl", TRAIN_MEASURED) == _rows(reference / "metrics.jsonl", TRAIN_MEASURED)
    assert [r["step"] for r in runfolder.read_jsonl(killed / "metrics.jsonl")] == [2, 4, 6, 8, 10, 12]
    assert _rows(killed / "DONE", ("time",)) == _rows(reference / "DONE", ("time",))


@pytest.mark.timeout(300)
def test_a_second_trainer_refuses_and_a_killed_holder_does_not_block(prepared_dir, tmp_path):
    cfg = tiny_config(prepared_dir, tmp_path / "runs", "train.max_steps=4")
    config = tmp_path / "config.json"
    config.write_text(dumps(cfg))
    args = ["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]
    first = subprocess.Popen([sys.executable, "-m", "bench.cli", *args], cwd=tmp_path,
                             env=_env("train:step@2:STOP"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # stopped after step 2, holding the lock
        assert os.WIFSTOPPED(status), "the first trainer ended before it reached step 2"
        second = _bench(args, tmp_path)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"is being trained by pid {first.pid}" in second.stderr and "bench train: error:" in second.stderr
    finally:
        first.kill()  # SIGKILL while stopped: the kernel drops its lock
        first.wait()
    third = _bench(args, tmp_path)
    assert third.returncode == 0, third.stderr
    assert runfolder.logged_steps(tmp_path / "run") == [1, 2, 3, 4]  # each row once


# ----------------------------------------------------------------------------------------------
# bench eval / bench sample


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 4-step run (checkpoints 2 and 4) on data with the embedded VAE and classifier."""
    import torch

    root = tmp_path_factory.mktemp("kill_eval")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prepared = add_embedded_eval_assets(write_prepared(root / "prepared"))
        return train(tiny_config(prepared, root / "runs", *EVAL_OVERRIDES))
    finally:
        torch.set_num_threads(threads)


def _sample_files(folder: Path) -> list:
    """Every finished sample file under `folder` (shards as arrays without `seconds`)."""
    files = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or TMP_MARK in path.name:
            continue
        if path.suffix == ".npz":
            members = sorted((k, v.dtype.str, v.tobytes()) for k, v in read_shard(path).items() if k != "seconds")
            files.append((str(path.relative_to(folder)), members))
        else:
            files.append((str(path.relative_to(folder)), path.read_bytes()))
    return files


def _outputs(run: Path) -> dict:
    """eval.jsonl rows and every sample file, without the measured fields."""
    return {"eval": _rows(run / "eval.jsonl", EVAL_MEASURED), "files": _sample_files(run / "samples")}


@pytest.mark.timeout(600)
def test_sample_killed_between_and_mid_shard_then_rerun_equals_an_uninterrupted_run(trained_run, tmp_path):
    reference = Path(shutil.copytree(trained_run, tmp_path / "reference"))
    sample(reference, 2, shard_size=int(SHARD), progress=False)
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    _killed_at(["sample", str(run), "--step", "2", "--shard-size", SHARD, "--no-progress"], tmp_path,
               ["sample:shard@2", "atomic:shard-00003.npz"])
    assert _sample_files(run / "samples") == _sample_files(reference / "samples")
    assert len(_sample_files(run / "samples")) == 4 + 3  # 4 shards, plan.json, grid.png, its PCA view


@pytest.mark.timeout(900)
def test_eval_killed_mid_shard_and_mid_append_then_rerun_equals_an_uninterrupted_run(trained_run, tmp_path):
    run = tmp_path / "run"  # the same path for both, since rows record run_dir and samples_dir
    shutil.copytree(trained_run, run)
    assert len(evaluate(None, run, shard_size=int(SHARD), progress=False)) == 4  # 2 steps x (fd, accuracy)
    reference = _outputs(run)
    shutil.rmtree(run)
    shutil.copytree(trained_run, run)
    _killed_at(["eval", str(run), "--shard-size", SHARD, "--no-progress"], tmp_path, [
        "atomic:shard-00001.npz",   # step 2's shard 1 written to its temporary name
        "sample:shard@3",           # step 2's shards 1-3 finished, no metric yet
        "append:eval.jsonl@1",      # step 2's two rows half written
        "append:eval.jsonl@2",      # step 2's rows whole, step 4's half written
    ])
    assert _outputs(run) == reference
    assert len(reference["files"]) == 2 * (4 + 2) + 2  # per step: 4 shards, plan.json, grid.png; 2 PCA grids
    leftovers = [p.name for p in (run / "samples").rglob("*") if TMP_MARK in p.name]
    assert leftovers == [] or all(p.startswith(".shard-00001.npz.tmp-") for p in leftovers), leftovers


@pytest.mark.timeout(600)
def test_two_evaluations_of_one_run_add_each_row_once(trained_run, tmp_path):
    """The first evaluator is stopped with its rows computed and not yet appended while a second
    one evaluates everything; resumed, the first finds its rows there and writes none."""
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    args = [sys.executable, "-m", "bench.cli", "eval", str(run), "--shard-size", SHARD, "--no-progress"]
    first = subprocess.Popen(args, cwd=tmp_path, env=_env("eval:rows:STOP"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the first evaluator ended before computing its rows"
        second = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 0 and "4 new row(s)" in second.stdout, second.stdout + second.stderr
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0 and "0 new row(s)" in out, out + err
    keys = [runfolder.eval_key(r) for r in runfolder.read_eval_rows(run)]
    assert len(keys) == 4 and len(set(keys)) == 4
    assert (run / "eval.jsonl").read_text().count("\n") == 4
