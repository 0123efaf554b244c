"""Progress lines without a terminal (bench.progress): when they are printed and what they say, and
that training, sampling, evaluation and prepare print them (tqdm bars on a terminal instead)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_train import R_MAX, add_embedded_eval_assets, one_thread, tiny_config, write_prepared  # noqa: F401

from bench import progress as progress_module
from bench.progress import Progress, ProgressError, format_duration

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(?P<label>.+?) (?P<done>\d+)/(?P<total>\d+) \((?P<pct>[\d.]+)%\)(?P<rest>.*)$")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress_module, "time", fake)
    return fake


def test_durations():
    assert [format_duration(s) for s in (0, 59.6, 3725, 86399, 3 * 86400 + 4 * 3600 + 12 * 60 + 30)] == \
        ["0:00:00", "0:01:00", "1:02:05", "23:59:59", "3d 04:12"]


def test_lines_on_the_first_step_every_interval_and_at_the_end(clock):
    out = io.StringIO()
    bar = Progress("train step", 400000, initial=1000, images_per_unit=256, stream=out, terminal=False, every=60)
    clock.now += 2.0
    bar.update(1)  # the first step (after a resume from 1000): printed at once, its rate over its 2 s
    for _ in range(200):
        clock.now += 0.5
        bar.update(1)
        if bar.done == 1100:
            bar.set_postfix(loss=0.41234)
    bar.close()
    # 1 step of 256 images in 2 s: 128 img/s, 398999 steps left = 797998 s; then 120 steps in 60 s:
    # 512 img/s, 398879 steps left = 199440 s; at the end 80 steps in 40 s, 398799 steps = 199400 s.
    assert out.getvalue().splitlines() == [
        "train step 1001/400000 (0.3%) 128.0 img/s eta 9d 05:39",
        "train step 1121/400000 (0.3%) loss 0.4123 512.0 img/s eta 2d 07:24",
        "train step 1201/400000 (0.3%) loss 0.4123 512.0 img/s eta 2d 07:23"]


def test_the_end_line_is_not_repeated_and_the_total_may_be_unknown(clock):
    out = io.StringIO()
    with Progress("eval sample features: images", None, stream=out, terminal=False, every=0) as bar:
        clock.now += 0.5
        bar.update(100)
        clock.now += 0.5
        bar.update(50)
    assert out.getvalue().splitlines() == ["eval sample features: images 100 200.0 img/s",
                                           "eval sample features: images 150 100.0 img/s"]


def test_iterating_reports_and_closes(clock):
    out = io.StringIO()
    bar = Progress("prepare embedded VAE step", 3, images_per_unit=16, stream=out, terminal=False,
                   iterable=range(3), every=3600)
    for _ in bar:
        clock.now += 1.0
    assert [LINE.match(ln)["done"] for ln in out.getvalue().splitlines()] == ["1", "3"]
    assert out.getvalue().splitlines()[-1] == "prepare embedded VAE step 3/3 (100.0%) 16.0 img/s"


def test_a_terminal_gets_the_bar_and_a_disabled_progress_prints_nothing(capsys):
    out = io.StringIO()
    with Progress("sample step 4: images", 10, stream=out, terminal=True) as bar:
        assert bar.bar is not None
        bar.update(10)
    with Progress("sample step 4: images", 10, stream=out, terminal=False, enabled=False) as bar:
        bar.update(10)
    assert out.getvalue() == "" and capsys.readouterr().out == ""


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv(progress_module.EVERY_ENV, value)
    with pytest.raises(ProgressError, match=f"REDI_BENCH_PROGRESS_EVERY='{value}': give the seconds"):
        Progress("x", 1, terminal=False)


# ----------------------------------------------------------------------------------------------
# The four users


def _lines(text: str, label: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m and m["label"] == label]


@pytest.mark.timeout(300)
def test_training_under_torchrun_prints_from_rank_0_only(tmp_path):
    prepared = write_prepared(tmp_path / "prepared")
    cfg = tiny_config(prepared, tmp_path / "runs", "train.max_steps=3", "train.ckpt_every=3")
    config = tmp_path / "config.json"
    from bench.compose import dumps

    config.write_text(dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="",
               REDI_BENCH_PROGRESS_EVERY="0")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "bench.cli", "train", "--config", str(config), "--run-dir", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    # torchrun's own summary fills the tail of stderr; a failing rank's reason (a Python traceback,
    # or the C++ exception behind a SIGABRT) is printed before it
    reasons = [line for line in done.stderr.splitlines()
               if re.search(r"Error|terminate called|what\(\)|Traceback", line)][:20]
    assert done.returncode == 0, "\n".join(reasons) + "\n...\n" + done.stderr[-2000:]
    lines = _lines(done.stdout, "train step")
    assert [(m["done"], m["total"]) for m in lines] == [("1", "3"), ("2", "3"), ("3", "3")], done.stdout
    # the ranks leave without the interpreter's teardown (bench.train.loop.leave_finished_rank):
    # what they printed last is still flushed
    assert done.stdout.rstrip().endswith(f"train: finished 3 steps in {tmp_path / 'run'}"), done.stdout[-500:]
    assert re.fullmatch(r" loss \d+\.\d{4} [\d.]+ img/s", lines[-1]["rest"]), lines[-1][0]
    assert re.fullmatch(r" loss \d+\.\d{4} [\d.]+ img/s eta \d+:\d\d:\d\d", lines[0]["rest"]), lines[0][0]


@pytest.mark.timeout(300)
def test_sampling_and_evaluation_print_progress(tmp_path, capsys, monkeypatch):
    from bench.evaluate.score_run import evaluate
    from bench.train.loop import train

    monkeypatch.setenv(progress_module.EVERY_ENV, "3600")  # first and last lines only
    prepared = add_embedded_eval_assets(write_prepared(tmp_path / "prepared"), classifier_epochs=1.0)
    run = train(tiny_config(prepared, tmp_path / "runs", "train.max_steps=2", "train.ckpt_every=2"))
    capsys.readouterr()
    evaluate(None, run, [2], "default", ["eval.sampler=euler", "eval.num_sampling_steps=2", "eval.num_samples=24",
                                         "eval.batch_size=8", "eval.metrics=[fid]"], shard_size=8, progress=True)
    out = capsys.readouterr().out
    sampled = _lines(out, "sample step 2: images")
    assert [(m["done"], m["total"]) for m in sampled] == [("8", "24"), ("24", "24")], out
    features = _lines(out, "eval sample features: images")
    assert [m["done"] for m in features][-1] == "24", out
    assert any(m["label"].startswith("eval reference") for m in map(LINE.match, out.splitlines()) if m), out


@pytest.mark.timeout(300)
def test_prepare_prints_progress(tmp_path, capsys, monkeypatch):
    from bench.prepare.embedded import EmbeddedVAESettings
    from bench.prepare.pipeline import PrepareOptions, prepare_embedded

    monkeypatch.setenv(progress_module.EVERY_ENV, "3600")
    options = PrepareOptions(shard_size=16, batch_size=8, max_images={"train": 32, "test": 16},
                             efficientnet_input_size=64, train_classifier=False, progress=True,
                             vae=EmbeddedVAESettings(block_out_channels=(8, 16, 16), steps=3, batch_size=8,
                                                     scale_images=16))
    prepare_embedded(tmp_path / "prepared", data_name="digits", options=options, pca_rank_max=R_MAX)
    out = capsys.readouterr().out
    assert [(m["done"], m["total"]) for m in _lines(out, "prepare embedded VAE step")] == [("1", "3"), ("3", "3")]
    encoded = _lines(out, "prepare task 0/1: images")
    assert encoded and encoded[-1]["done"] == encoded[-1]["total"] == "48", out


def test_a_bad_interval_stops_training_before_it_writes(tmp_path, monkeypatch):
    from bench.train.loop import train

    monkeypatch.setenv(progress_module.EVERY_ENV, "1m")
    cfg = tiny_config(write_prepared(tmp_path / "prepared"), tmp_path / "runs")
    with pytest.raises(ProgressError, match="REDI_BENCH_PROGRESS_EVERY='1m'"):
        train(cfg)
    assert not (tmp_path / "runs").exists()
