"""The run folder (bench.runfolder) and the metrics logger (bench.metrics_log): the JSONL policy,
the checkpoint listing, file modes under the umask, seeded global RNGs, and the TensorBoard and W&B
sinks with the real libraries writing real files offline."""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import stat
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_train import one_thread, prepared_dir, tiny_config  # noqa: F401

from bench import runfolder
from bench.atomic import atomic_torch_module_dir, atomic_write_text
from bench.config import ConfigError
from bench.metrics_log import MetricsLogger
from bench.run_hash import run_hash
from bench.runfolder import RunFolderError, append_jsonl, read_jsonl, truncate_jsonl
from bench.train.loop import train

# ----------------------------------------------------------------------------------------------
# JSONL: one policy for every log


def test_torn_last_line_is_ignored_then_cut_by_the_next_append(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, [{"step": 1}, {"step": 2}])
    with open(path, "ab") as handle:
        handle.write(b'{"step": 3, "lo')  # a writer killed mid-append
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    with open(path, "ab") as handle:
        handle.write(b'ss": 1}')  # even a torn line that happens to parse has no newline: not counted
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    append_jsonl(path, [{"step": 3}])
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_a_corrupt_middle_line_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"step": 1}\n{"oops"\n{"step": 2}\n')
    with pytest.raises(RunFolderError, match=r"eval.jsonl line 2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(RunFolderError, match=r"line 2: expected a JSON object, got list"):
        read_jsonl(path)
    with pytest.raises(RunFolderError, match="line 2"):
        append_jsonl(path, [{"step": 3}], key=lambda row: row["step"])  # never appended past damage
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_append_with_a_key_writes_each_row_once(tmp_path):
    path = tmp_path / "eval.jsonl"
    rows = [{"step": 2, "metric": "fd"}, {"step": 4, "metric": "fd"}]
    assert append_jsonl(path, rows, key=runfolder.eval_key) == rows
    assert append_jsonl(path, rows + [{"step": 6, "metric": "fd"}] * 2, key=runfolder.eval_key) == \
        [{"step": 6, "metric": "fd"}]
    assert [r["step"] for r in read_jsonl(path)] == [2, 4, 6]


def test_truncate_cuts_from_the_first_row_past_the_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, [{"step": s} for s in (2, 4, 6, 8)])
    with open(path, "ab") as handle:
        handle.write(b'{"step": 1')
    assert truncate_jsonl(path, lambda row: row["step"] <= 4) == 2
    assert path.read_text() == '{"step": 2}\n{"step": 4}\n'
    assert truncate_jsonl(path, lambda row: row["step"] <= 0) == 2 and path.read_bytes() == b""
    assert truncate_jsonl(tmp_path / "absent.jsonl", lambda row: False) == 0


def test_checkpoint_listing_and_run_config(tmp_path):
    for name in ("0000010", "0000002", "0000050.tmp-99-ab", "0000004.corrupt"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    (tmp_path / "checkpoints" / "0000007").write_text("a file, not a checkpoint folder")
    assert runfolder.checkpoint_steps(tmp_path) == [2, 10]
    assert runfolder.checkpoint_path(tmp_path, 2) == tmp_path / "checkpoints" / "0000002"
    assert runfolder.checkpoint_steps(tmp_path / "nothing") == []
    with pytest.raises(RunFolderError, match="not a run folder written by `bench train`"):
        runfolder.read_run_config(tmp_path)
    runfolder.config_path(tmp_path).write_text("{broken")
    with pytest.raises(RunFolderError, match="config.json: not valid JSON"):
        runfolder.read_run_config(tmp_path)


# ----------------------------------------------------------------------------------------------
# Written files follow the umask


def _save_like_a_library(folder: str) -> None:
    """What diffusers' save_pretrained does: safetensors (which creates its files 0600) and JSON."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, os.path.join(folder, "weights.safetensors"))
    Path(folder, "config.json").write_text("{}")


@pytest.mark.parametrize("umask", [0o002, 0o022])
def test_written_files_and_folders_follow_the_umask(umask, prepared_dir, tmp_path):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a" / "file.txt", "x")
        atomic_torch_module_dir(tmp_path / "module", _save_like_a_library)
        out = train(tiny_config(prepared_dir, tmp_path / "runs", "train.max_steps=2"))
    finally:
        os.umask(old)
    paths = [tmp_path / "a" / "file.txt", tmp_path / "module", *(tmp_path / "module").iterdir(),
             *out.rglob("*")]
    assert len(paths) > 10 and any(p.is_dir() for p in out.rglob("*"))  # config, log, checkpoint files
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == expected, f"{path}: {oct(mode)} != {oct(expected)}"


# ----------------------------------------------------------------------------------------------
# The trainer's global RNGs and the lock


def test_two_identical_runs_store_identical_python_and_numpy_rng_states(prepared_dir, tmp_path):
    states = []
    for name in ("a", "b"):
        random.random(), np.random.rand(3)  # whatever the process drew before must not matter
        out = train(tiny_config(prepared_dir, tmp_path / name, "train.max_steps=2"))
        state = json.loads((runfolder.checkpoint_path(out, 2) / "state.json").read_text())
        states.append(state["python_numpy_rng"])
    assert states[0] == states[1]


def test_a_second_trainer_on_a_locked_run_refuses(prepared_dir, tmp_path):
    cfg = tiny_config(prepared_dir, tmp_path, "train.max_steps=2")
    from bench.run_hash import run_dir

    with runfolder.train_lock(run_dir(cfg)):
        with pytest.raises(RunFolderError, match=r"is being trained by pid \d+ on .*\.train\.lock"):
            train(cfg)
        assert not runfolder.config_path(run_dir(cfg)).exists()  # refused before writing anything
    assert train(cfg) == run_dir(cfg)  # released: the next one trains


# ----------------------------------------------------------------------------------------------
# Sinks: TensorBoard and W&B, real libraries, offline


def _wandb_history(run_dir: Path, runs: int = 1) -> list[dict]:
    """The history records of W&B's offline run file(s) under run_dir/wandb once `runs` of them hold
    their exit record: W&B's writer process may still be writing when `finish()` has returned."""
    import time

    deadline = time.monotonic() + 60
    while True:
        rows, exits = _wandb_records(run_dir)
        if exits >= runs or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _wandb_records(run_dir: Path) -> tuple[list[dict], int]:
    """(history rows, exit records) of W&B's offline run files: a LevelDB-style log (7-byte header,
    32 KiB blocks, records of crc32 + length + type) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    rows, exits = [], 0
    for path in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, block, pending, chunks = Path(path).read_bytes(), 7, 32768, b"", []
        while pos + 7 <= len(data):
            if block - pos % block < 7:
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
            chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
            if kind == 0:
                break
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                chunks.append(pending)
        for chunk in chunks:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            exits += record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows, exits


@pytest.mark.timeout(300)
def test_tensorboard_and_wandb_receive_the_logged_rows(prepared_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default must be offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(prepared_dir, tmp_path / "runs", "train.log_to=[tensorboard,wandb]")
    assert run_hash(cfg) == run_hash(tiny_config(prepared_dir, tmp_path / "runs"))  # not part of the identity
    out = train(cfg)
    rows = read_jsonl(out / runfolder.METRICS_FILE)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]

    events = EventAccumulator(str(out / runfolder.TENSORBOARD_DIR / "train"))
    events.Reload()
    assert {"train/loss", "train/loss/latent", "train/loss/semantic", "train/grad_norm"} <= \
        set(events.Tags()["scalars"])
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    # TensorBoard stores float32: the JSONL value rounded to float32, exactly.
    assert logged == [(r["step"], float(np.float32(r["loss"]))) for r in rows]

    history = _wandb_history(out)
    assert [h["_step"] for h in history] == [1, 2, 3, 4]
    assert [h["train/loss"] for h in history] == [r["loss"] for r in rows]
    assert {"train/loss/latent", "train/grad_norm", "train/images_per_s"} <= set(history[0])

    shutil.rmtree(runfolder.checkpoint_path(out, 4))  # as if killed after step 4's row, before its checkpoint
    (out / runfolder.DONE_FILE).unlink()
    train(cfg)  # resumes from 2: steps 3 and 4 are logged again, and TensorBoard shows them once
    events = EventAccumulator(str(out / runfolder.TENSORBOARD_DIR / "train"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == logged

    with MetricsLogger(out, ["tensorboard"]) as log:  # evaluation rows go the same way
        log.log_eval([{"step": 4, "metric": "fd_classifier", "setting": "default", "value": 12.5}])
    events = EventAccumulator(str(out / runfolder.TENSORBOARD_DIR / "eval"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/default/fd_classifier")] == [(4, 12.5)]
    assert read_jsonl(out / runfolder.EVAL_FILE)[0]["value"] == 12.5


def test_a_missing_sink_library_is_one_error_naming_the_setting(prepared_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb looks like
    cfg = tiny_config(prepared_dir, tmp_path / "runs", "train.log_to=[wandb]")
    with pytest.raises(ConfigError, match=r"train.log_to includes 'wandb' but the 'wandb' package is not installed"):
        train(cfg)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match=r"train.log_to='mlflow' is not allowed"):
        tiny_config(prepared_dir, tmp_path / "runs", "train.log_to=[mlflow]")


def test_the_logged_window_is_the_same_number_after_a_resume(prepared_dir, tmp_path):
    """Checkpoints every 3 steps, a row every 2; the row after a resume from
    step 3 averages steps 3 and 4 (step 3 carried by the checkpoint), as without the interruption."""
    overrides = ("train.max_steps=8", "train.ckpt_every=3", "train.log_every=2", "train.keep_last=5")
    whole = read_jsonl(train(tiny_config(prepared_dir, tmp_path / "a", *overrides)) / runfolder.METRICS_FILE)
    cfg = tiny_config(prepared_dir, tmp_path / "b", *overrides)
    out = train(cfg)
    for step in (6, 8):  # back to checkpoint 3, as if killed at step 5
        shutil.rmtree(runfolder.checkpoint_path(out, step))
    (out / runfolder.DONE_FILE).unlink()
    window = json.loads((runfolder.checkpoint_path(out, 3) / "state.json").read_text())["state"]["log_window"]
    assert window["steps"] == 1 and set(window["sums"]) >= {"loss", "grad_norm"}
    train(cfg)
    resumed = read_jsonl(out / runfolder.METRICS_FILE)
    measured = ("time", "elapsed_s", "images_per_s", "peak_memory_mb")
    strip = [{k: v for k, v in row.items() if k not in measured} for row in resumed]
    assert strip == [{k: v for k, v in row.items() if k not in measured} for row in whole]
    assert [r["step"] for r in resumed] == [2, 4, 6, 8]
