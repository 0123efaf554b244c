"""bench.storage: storage faults as one clear error, the vanished-folder guard, the JSONL undo, the
requeue refusal and the free-space preflight's estimates (fast; the real faults on a tmpfs are in
test_storage_faults.py)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from fixtures_train import one_thread, prepared_dir, tiny_config  # noqa: F401

from bench import cli, runfolder, storage
from bench.atomic import atomic_write_text
from bench.compose import load_config
from bench.storage import StorageError, storage_error


def _one_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text and isinstance(err, ValueError) and type(err).__module__.startswith("bench.")
    return text


@pytest.mark.parametrize("number, says", [
    (errno.ENOSPC, "no space left on the device holding"),
    (errno.EDQUOT, "disk quota exceeded on the file system holding"),
    (errno.EROFS, "is read-only"),
    (errno.ESTALE, "was removed while the command was writing into it (a stale NFS handle)"),
])
def test_each_fault_names_the_path_what_happened_and_what_to_do(tmp_path, number, says):
    path = tmp_path / "run" / "metrics.jsonl"
    fault = storage_error(OSError(number, os.strerror(number), str(path)), path, needed=3 * 2**20)
    text = _one_line(fault)
    assert says in text and str(path) in text
    if number == errno.ESTALE:  # the removed folder is the one named, not only the file's path
        assert text.startswith(f"the folder {path.parent} was removed"), text
    assert "run the same command again" in text and fault.errno == number
    if number == errno.ENOSPC:
        assert "needs about 3.0 MB" in text and " MB free" in text


def test_other_errors_are_left_alone(tmp_path):
    missing_input = tmp_path / "absent.json"  # its folder exists: an ordinary missing file
    assert storage_error(FileNotFoundError(errno.ENOENT, "No such file", str(missing_input)), missing_input) is None
    assert storage_error(PermissionError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert storage_error(RuntimeError("a bug"), tmp_path) is None
    with pytest.raises(KeyError), storage.writing(tmp_path / "x"):
        raise KeyError("not a storage fault")


def test_a_vanished_folder_names_the_highest_missing_folder(tmp_path):
    path = tmp_path / "run" / "samples" / "0000002" / "shard.npz"
    text = _one_line(storage_error(FileNotFoundError(errno.ENOENT, "No such file"), path))
    assert text.startswith(f"the folder {tmp_path / 'run'} was removed while the command was writing")


def test_a_guarded_folder_removed_midway_is_an_error_and_is_not_recreated(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with storage.guard(run):
        atomic_write_text(run / "a.txt", "a")
        runfolder.append_jsonl(run / "log.jsonl", [{"step": 1}])
        shutil.rmtree(run)
        for write in (lambda: atomic_write_text(run / "sub" / "b.txt", "b"),
                      lambda: runfolder.append_jsonl(run / "log.jsonl", [{"step": 2}])):
            with pytest.raises(StorageError, match=f"the folder {run} was removed"):
                write()
            assert not run.exists()
    atomic_write_text(run / "d.txt", "d")  # the guard ended: writes as usual


def test_a_guard_on_a_folder_not_made_yet_watches_it_from_its_first_write(tmp_path):
    out = tmp_path / "prepared"
    with storage.guard(out):
        atomic_write_text(out / "a.txt", "a")  # creates it
        atomic_write_text(out / "b.txt", "b")  # its identity is recorded from here on
        shutil.rmtree(out)
        with pytest.raises(StorageError, match="was removed"):
            atomic_write_text(out / "c.txt", "c")


def test_processes_that_probe_one_new_folder_together_all_pass(tmp_path):
    """The ranks of one torchrun (and the tasks of an array) check the same new run folder at once:
    one probe removes the empty folder it made while another is between its mkdir and its probe
    file. Each must still pass, and no probe file is left (the folder itself may stay, empty, when
    its maker could not remove it while another probe was inside). 8 threads x 150 rounds: without
    the retries this failed within the first rounds here."""
    import threading

    from bench.atomic import check_writable_dir

    errors, gate = [], threading.Barrier(8)

    def probe(folder: Path) -> None:
        gate.wait()
        try:
            check_writable_dir(folder, "--run-dir")
        except Exception as err:  # noqa: BLE001 - collected and reported by the assertion
            errors.append(err)

    for round_ in range(150):
        folder = tmp_path / f"grid{round_}" / "run"
        threads = [threading.Thread(target=probe, args=(folder,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not folder.exists() or not any(folder.iterdir())
    assert errors == []


def test_a_refused_append_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    """The storage takes part of the bytes, then refuses: the file is cut back, no torn line."""
    log = tmp_path / "metrics.jsonl"
    runfolder.append_jsonl(log, [{"step": 1}])
    before = log.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 4:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(StorageError, match=f"no space left on the device holding {log}"):
        runfolder.append_jsonl(log, [{"step": 2, "loss": 0.5}])
    monkeypatch.undo()
    assert log.read_bytes() == before
    assert runfolder.read_jsonl(log) == [{"step": 1}]


def _raise_read_only(argv) -> int:
    raise OSError(errno.EROFS, "Read-only file system", "/somewhere/events.out")


def test_a_fault_outside_the_writers_is_still_one_line(monkeypatch, capsys):
    """An OSError from a library's own file (not through bench.storage) reaches the CLI: one line."""
    monkeypatch.setitem(cli.SUBCOMMANDS, "report", ("", "test_storage:_raise_read_only"))
    assert cli.main(["report"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("bench report: error: the file system holding /somewhere/events.out is read-only")


def _full_disk(cfg, run_dir):
    raise storage_error(OSError(errno.ENOSPC, "No space left on device"), Path(run_dir) / "checkpoints")


def _read_only(cfg, run_dir):  # a raw OSError, as a library's own write raises it
    raise OSError(errno.EROFS, "Read-only file system", str(Path(run_dir) / "tensorboard" / "events"))


@pytest.mark.parametrize("fn, says", [(_full_disk, "no space left on the device holding"),
                                      (_read_only, "the file system holding")])
def test_a_job_stopped_by_a_storage_fault_is_not_requeued_and_status_shows_why(tmp_path, capsys, fn, says):
    from bench.launch.jobs import TrainJob
    from bench.launch.status import job_state

    job = TrainJob("g", "cell", load_config([]), str(tmp_path), fn=fn)
    assert job.checkpoint() is not None  # before any fault: a time limit requeues it
    with pytest.raises(StorageError, match=says):
        job()
    assert job.checkpoint() is None  # submitit does not requeue when checkpoint() returns None
    assert f"bench train: error: {says}" in capsys.readouterr().err  # the job log's one line
    events = runfolder.read_jsonl(tmp_path / "jobs.jsonl")
    state, detail, _ = job_state({"job_id": None}, events, {})
    assert state == "failed" and detail.startswith(f"StorageError: {says}")


# ----------------------------------------------------------------------------------------------
# The preflight's estimates


def test_the_size_only_parameter_estimate_matches_the_published_model_sizes():
    """DiT's Table 1 (SiT has the same backbones): S/2 33M, B/2 130M, L/2 458M, XL/2 675M; the
    estimate leaves out the embeddings and the output layer, within 1%."""
    for size, published in {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}.items():
        cfg = load_config(["spec=latent_only", f"model.size={size}/2"])
        estimate = storage.estimate_parameters(cfg.model, 1000)
        assert abs(estimate - published) / published < 0.01, (size, estimate)


def test_the_checkpoint_estimate_is_within_6_percent_above_a_real_checkpoint(prepared_dir, tmp_path):
    """The estimate `bench train` warns with (from the built model) against the bytes on disk of a
    real checkpoint of the tiny model (where its fixed 64 kB allowance weighs most: 5% high)."""
    from bench.prepare.dataset import read_manifest
    from bench.train.build import build_model
    from bench.train.loop import train

    cfg = tiny_config(prepared_dir, tmp_path / "runs", "train.max_steps=2")
    run = train(cfg)
    on_disk = sum(p.stat().st_size for p in runfolder.checkpoint_path(run, 2).iterdir())
    model = build_model(cfg, read_manifest(prepared_dir))
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    estimate = storage.checkpoint_bytes(sum(p.numel() for p in model.parameters() if p.requires_grad), weights)
    assert 0 <= (estimate - on_disk) / on_disk < 0.06, (estimate, on_disk)  # warns early, never late
    rough = storage.checkpoint_bytes(storage.estimate_parameters(cfg.model, cfg.num_model_classes))
    assert abs(rough - on_disk) / on_disk < 0.25, (rough, on_disk)  # size-only: embeddings left out


@pytest.mark.parametrize("settings, held", [
    (dict(max_steps=10, ckpt_every=2, keep_last=2, milestones=[]), 4),   # 2 kept + final + the new one
    (dict(max_steps=4, ckpt_every=2, keep_last=2, milestones=[]), 2),    # only two are ever written
    (dict(max_steps=10, ckpt_every=2, keep_last=1, milestones=[4]), 4),  # 1 + milestone + final + new
])
def test_checkpoints_held_at_once(settings, held):
    assert storage.checkpoints_held(SimpleNamespace(**settings)) == held


def test_the_preflight_warns_in_grid_and_doctor_when_the_disk_is_short(tmp_path, monkeypatch):
    from bench.launch.submit import disk_space_note
    from bench.perf.doctor import disk_check

    cfg = load_config(["scale=paper", f"output_root={tmp_path}"])
    plan = [SimpleNamespace(cell=SimpleNamespace(cfg=cfg), job=SimpleNamespace(cfg=cfg), steps=(1, 2))]
    monkeypatch.setattr(storage, "free_bytes", lambda path: 2**30)
    note = disk_space_note(plan, "train", str(tmp_path))
    assert note.startswith(f"warning: {tmp_path} has 1024 MB free, but the 1 train job(s)")
    # XL/2 at 675M parameters: 4 copies of float32, ~10.8 GB a checkpoint
    assert float(note.split("will write about ")[1].split(" MB")[0]) > 3 * 10_000
    assert "will write about" in disk_space_note(plan, "eval", str(tmp_path))  # 50K samples of 256 px, twice
    check = disk_check(cfg)
    assert check.status == "WARN" and "1024 MB free" in check.detail
    assert storage.preflight_warning(tmp_path, 2**29, "x") is None
