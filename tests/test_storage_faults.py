"""Real storage faults under real commands: `bench train`, `bench eval`, `bench prepare` and
`bench report` writing onto a small tmpfs that fills up or is remounted read-only, and a run folder
removed mid-run. Each fault must end the command with one line (`bench <cmd>: error: ...`, exit 2,
no traceback) naming the path and what happened, leave the newest complete state intact and nothing
half-written under a finished name, and the same command, re-run once the fault is fixed (space
freed, remounted read-write, the folder copied to a disk with room), must finish with files
byte-identical to an uninterrupted run's (the measured fields of tests/test_kill.py apart).

A fault hits an exact write: the command stops itself at a named point
(REDI_BENCH_KILL_AT=<point>[@N]:STOP, bench.atomic.crash_point), the test fills the tmpfs with a
ballast file (or remounts it read-only) and lets it continue (SIGCONT). A full tmpfs still lets a
file grow within its last 4 kB page, so the appends that are made to fail are each file's first.

Mounting needs root (CI runs as root): without it the tests skip, saying why; with
REDI_BENCH_CI=1 they fail instead. Every mount is unmounted in teardown.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from fixtures_train import add_embedded_eval_assets, one_thread, prepared_dir, tiny_config, write_prepared  # noqa: F401
from test_kill import EVAL_OVERRIDES, TRAIN_MEASURED, _env, _files, _outputs, _rows, trained_run  # noqa: F401
from test_prepare import _cli, _shards, tiny_vae_dir  # noqa: F401

from bench import cli, runfolder
from bench.atomic import TMP_MARK
from bench.compose import dumps
from bench.evaluate.sampling import read_shard
from bench.evaluate.score_run import evaluate
from bench.train.checkpoint import verify_checkpoint
from bench.train.loop import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # real commands in subprocesses (torch import: 3-10 s each)


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `folder`, always unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True, timeout=60)
        why = done.stderr.strip() if done.returncode else ""
    except OSError as err:
        why = str(err)
    if why:
        reason = f"cannot mount a tmpfs ({why}): these tests need root"
        if os.environ.get("REDI_BENCH_CI") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(folder)], capture_output=True)
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path, leave: int = 0) -> Path:
    """A ballast file that takes every free byte of `folder`'s file system but `leave`."""
    ballast = folder / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:  # unbuffered: nothing is left to flush (and fail) at close
            try:
                os.write(fd, bytes(65536))
            except OSError as err:
                assert err.errno == errno.ENOSPC
                break
        os.ftruncate(fd, max(os.fstat(fd).st_size - leave, 0))
    finally:
        os.close(fd)
    return ballast


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "bench.cli", *args]


def stopped_at(args: list[str], point: str) -> subprocess.Popen:
    """The command, stopped (SIGSTOP) the first time it reaches `point`."""
    process = subprocess.Popen(_command(args), env=_env(f"{point}:STOP"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _, status = os.waitpid(process.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"ended before {point}: {process.communicate()}"
    return process


def resumed(process: subprocess.Popen) -> subprocess.CompletedProcess:
    process.send_signal(signal.SIGCONT)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(_command(args), env=_env(), capture_output=True, text=True, timeout=300)


def one_line_error(done: subprocess.CompletedProcess, command: str, says: str) -> str:
    """The single error line of a failed command, which must contain `says`."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith(f"bench {command}: error: ")]
    assert len(errors) == 1 and says in errors[0], done.stderr
    return errors[0]


def no_temporaries(root: Path) -> None:
    assert [p for p in root.rglob("*") if TMP_MARK in p.name] == []


# ----------------------------------------------------------------------------------------------
# bench train: a full disk at the first log row and at a checkpoint, a read-only remount, a
# removed run folder


TRAIN = ("train.max_steps=6", "train.ckpt_every=2", "train.log_every=1", "train.keep_last=2")


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory) -> tuple[Path, Path]:
    """(config.json, the uninterrupted run) of a 6-step run with checkpoints 2, 4, 6."""
    import torch

    root = tmp_path_factory.mktemp("storage_train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_config(write_prepared(root / "prepared"), root / "runs", *TRAIN)
        reference = train(cfg, root / "reference")
    finally:
        torch.set_num_threads(threads)
    config = root / "config.json"
    config.write_text(dumps(cfg))
    return config, reference


def same_as_reference(run: Path, reference: Path) -> None:
    assert _files(run) == _files(reference)
    for step in runfolder.checkpoint_steps(reference):
        for name in ("weights.safetensors", "state.safetensors", "state.json"):
            a, b = (runfolder.checkpoint_path(d, step) / name for d in (reference, run))
            assert a.read_bytes() == b.read_bytes(), f"checkpoint {step}: {name} differs"
    assert (run / "config.json").read_bytes() == (reference / "config.json").read_bytes()
    assert _rows(run / "metrics.jsonl", TRAIN_MEASURED) == _rows(reference / "metrics.jsonl", TRAIN_MEASURED)
    assert _rows(run / "DONE", ("time",)) == _rows(reference / "DONE", ("time",))


@pytest.mark.timeout(600)
def test_train_full_disk_read_only_and_a_full_checkpoint_then_resume_on_a_disk_with_room(train_reference,
                                                                                         tmp_path):
    config, reference = train_reference
    with tmpfs(tmp_path / "fs", "16m") as fs:
        folder = fs / "run"
        args = ["train", "--config", str(config), "--run-dir", str(folder)]

        # 1. The disk fills before the first metrics row: nothing is logged, no checkpoint.
        process = stopped_at(args, "train:step@1")
        ballast = fill(fs)
        one_line_error(resumed(process), "train", f"no space left on the device holding {folder / 'metrics.jsonl'}")
        assert runfolder.read_jsonl(folder / "metrics.jsonl") == [] and runfolder.checkpoint_steps(folder) == []
        assert (folder / "metrics.jsonl").stat().st_size == 0  # the refused bytes were cut off again
        ballast.unlink()

        # 2. Read-only after checkpoint 2: the third row is refused, checkpoint 2 stays loadable.
        process = stopped_at(args, "train:step@3")
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True, capture_output=True)
        one_line_error(resumed(process), "train", f"the file system holding {folder / 'metrics.jsonl'} is read-only")
        subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=True, capture_output=True)
        assert runfolder.logged_steps(folder) == [1, 2] and runfolder.checkpoint_steps(folder) == [2]
        verify_checkpoint(runfolder.checkpoint_path(folder, 2))

        # 3. 300 kB left: the preflight warns, checkpoint 4 (~0.9 MB) does not fit, nothing of it stays.
        fill(fs, leave=300 * 1024)
        done = run(args)
        assert f"bench train: warning: {folder} has 0.3 MB free" in done.stderr, done.stderr
        one_line_error(done, "train", f"no space left on the device holding {runfolder.checkpoint_path(folder, 4)}: "
                                      "0.3 MB free, a checkpoint needs about 0.9 MB")
        assert runfolder.checkpoint_steps(folder) == [2]
        verify_checkpoint(runfolder.checkpoint_path(folder, 2))
        assert sorted(p.name for p in runfolder.checkpoints_dir(folder).iterdir()) == ["0000002"]

        # 4. The run folder copied to a disk with room: the same command finishes it exactly.
        moved = Path(shutil.copytree(folder, tmp_path / "moved"))
    done = run(["train", "--config", str(config), "--run-dir", str(moved)])
    assert done.returncode == 0, done.stderr
    assert "resuming from checkpoint step 2" in done.stdout
    same_as_reference(moved, reference)


@pytest.mark.timeout(300)
def test_train_run_folder_removed_midway_is_one_error_and_is_not_recreated(train_reference, tmp_path):
    config, reference = train_reference
    folder = tmp_path / "run"
    args = ["train", "--config", str(config), "--run-dir", str(folder)]
    process = stopped_at(args, "train:step@3")
    folder.rename(tmp_path / "aside")  # gone from its path, as after `rm -r` (but kept to restore)
    one_line_error(resumed(process), "train", f"the folder {folder} was removed while the command was writing")
    assert not folder.exists()  # not re-created half-empty by the next write
    (tmp_path / "aside").rename(folder)  # restored
    done = run(args)
    assert done.returncode == 0, done.stderr
    assert _rows(folder / "metrics.jsonl", TRAIN_MEASURED) == _rows(reference / "metrics.jsonl", TRAIN_MEASURED)
    for name in ("weights.safetensors", "state.safetensors", "state.json"):
        a, b = (runfolder.checkpoint_path(d, 6) / name for d in (reference, folder))
        assert a.read_bytes() == b.read_bytes(), name


# ----------------------------------------------------------------------------------------------
# bench eval: a full disk at a sample shard and at the first eval.jsonl row


@pytest.mark.timeout(600)
def test_eval_full_disk_at_a_shard_and_at_the_rows_then_resume_equals_an_uninterrupted_run(trained_run, tmp_path):
    with tmpfs(tmp_path / "fs", "16m") as fs:
        folder = fs / "run"  # the same path for both: rows record run_dir and samples_dir
        shutil.copytree(trained_run, folder)
        evaluate(None, folder, shard_size=8, progress=False)
        reference = _outputs(folder)
        shutil.rmtree(folder)
        shutil.copytree(trained_run, folder)
        args = ["eval", str(folder), "--shard-size", "8", "--no-progress"]

        process = stopped_at(args, "sample:shard@1")  # step 2's shard 0 finished
        ballast = fill(fs)
        line = one_line_error(resumed(process), "eval", "no space left on the device holding ")
        assert "shard-00001.npz: 0.0 MB free, the file needs about" in line
        shards = sorted((folder / "samples").rglob("shard-*.npz"))
        assert [p.name for p in shards] == ["shard-00000.npz"] and read_shard(shards[0])["images"].shape[0] == 8
        no_temporaries(folder)
        ballast.unlink()

        process = stopped_at(args, "eval:rows@1")  # step 2's rows computed, eval.jsonl not yet written
        ballast = fill(fs)
        one_line_error(resumed(process), "eval", f"no space left on the device holding {folder / 'eval.jsonl'}")
        assert runfolder.read_eval_rows(folder) == []
        ballast.unlink()

        done = run(args)
        assert done.returncode == 0, done.stderr
        assert _outputs(folder) == reference
        no_temporaries(folder)


# ----------------------------------------------------------------------------------------------
# bench prepare: a full disk at a shard and at the PCA


def test_prepare_full_disk_at_a_shard_and_at_the_pca_then_resume_equals_an_uninterrupted_run(tiny_vae_dir,
                                                                                              tmp_path):
    from safetensors.torch import load_file

    def args(out: Path) -> list[str]:
        return _cli(out, tiny_vae_dir)[3:]  # without `python -m bench.cli`

    reference = tmp_path / "reference"
    assert cli.main(args(reference)) == 0  # in this process (one thread): a torch import saved
    with tmpfs(tmp_path / "fs", "16m") as fs:
        out = fs / "prepared"
        process = stopped_at(args(out), "prepare:encoded:train/0")
        ballast = fill(fs)
        line = one_line_error(resumed(process), "prepare", f"no space left on the device holding {out / 'train'}")
        assert "shard-00001.enc.safetensors: 0.0 MB free, the file needs about" in line
        assert sorted(p.name for p in (out / "train").glob("*.safetensors")) == ["shard-00000.enc.safetensors"]
        load_file(str(out / "train" / "shard-00000.enc.safetensors"))  # complete and readable
        no_temporaries(out)
        ballast.unlink()

        process = stopped_at(args(out), "prepare:encoded:test/1")  # the last shard of pass 1
        ballast = fill(fs)
        pca_stats = out / "pca_stats.safetensors"
        one_line_error(resumed(process), "prepare", f"no space left on the device holding {pca_stats}")
        assert not (out / "pca.safetensors").exists() and not (out / "manifest.json").exists()
        no_temporaries(out)
        ballast.unlink()

        done = run(args(out))
        assert done.returncode == 0, done.stderr
        first, again = _shards(reference), _shards(out)
        assert first.keys() == again.keys() and len(first) == 8
        for name in first:
            assert all(first[name][k].equal(again[name][k]) for k in first[name]), name
        for name in ("pca.safetensors", "pca_stats.safetensors"):
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
        no_temporaries(out)


# ----------------------------------------------------------------------------------------------
# bench report: a full disk mid-report, the folder copied to a disk with room


def test_report_full_disk_then_the_copied_folder_finishes_identical(tmp_path):
    from test_report import GRID, _strip_pdf_dates, build_fixture

    build_fixture(tmp_path / "runs")

    def report(out: Path) -> list[str]:
        return ["report", GRID, f"output_root={tmp_path / 'runs'}", "--out", str(out)]

    assert cli.main(report(tmp_path / "reference")) == 0  # in this process: a start-up saved
    reference = tmp_path / "reference" / GRID
    with tmpfs(tmp_path / "fs", "64k") as fs:
        one_line_error(run(report(fs)), "report", f"no space left on the device holding {fs / GRID}/")
        written = sorted(p.name for p in (fs / GRID).iterdir())
        assert written and len(written) < len(list(reference.iterdir()))
        for name in written:  # what is there under a finished name is complete
            assert _strip_pdf_dates((fs / GRID / name).read_bytes()) == \
                _strip_pdf_dates((reference / name).read_bytes()), name
        moved = Path(shutil.copytree(fs, tmp_path / "moved", dirs_exist_ok=True))
    assert run(report(moved)).returncode == 0
    names = sorted(p.name for p in (moved / GRID).iterdir())
    assert names == sorted(p.name for p in reference.iterdir())
    for name in names:
        assert _strip_pdf_dates((moved / GRID / name).read_bytes()) == _strip_pdf_dates((reference / name).read_bytes())



# ----------------------------------------------------------------------------------------------
# safetensors on a full disk: its SafetensorError carries only the text "(os error 28)"


def test_safetensors_error_on_a_full_disk_is_classified_and_leaves_no_temporary(tmp_path):
    import torch
    from safetensors.torch import save_file

    from bench.atomic import atomic_save_safetensors
    from bench.storage import StorageError, error_number

    tensors = {"x": torch.zeros(256 * 1024)}  # 1 MB
    with tmpfs(tmp_path / "fs", "64k") as fs:
        with pytest.raises(Exception) as raised:
            save_file(tensors, str(fs / "direct.safetensors"))
        assert type(raised.value).__name__ == "SafetensorError" and error_number(raised.value) == errno.ENOSPC
        with pytest.raises(StorageError, match=f"holding {fs / 'x.safetensors'}: .* the file needs about 1.0 MB"):
            atomic_save_safetensors(fs / "x.safetensors", tensors)
        assert list(fs.iterdir()) == []  # no temporary (safetensors removes its own partial file too)
