"""Checkpoints: atomic layout, exact optimizer/RNG round trip, wrapper prefixes, latest-by-step,
pruning, and detection of truncated or corrupted checkpoints (resume falls back, bit-exactly)."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
from fixtures_train import one_thread, prepared_dir, tensors_of, tiny_config  # noqa: F401
from torch import nn

from bench import runfolder
from bench.run_hash import run_dir
from bench.train import checkpoint as ckpt
from bench.train.loop import train


def _tiny_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.SiLU(), nn.Linear(5, 2))
    ema = nn.Sequential(nn.Linear(3, 5), nn.SiLU(), nn.Linear(5, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, ema, optimizer


def _step(model, optimizer, generator):
    loss = model(torch.randn(4, 3, generator=generator)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_round_trip_restores_optimizer_and_generators_exactly(tmp_path):
    model, ema, optimizer = _tiny_setup()
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        _step(model, optimizer, generator)
    path = ckpt.save_checkpoint(tmp_path, 3, model=model, ema=ema, optimizer=optimizer,
                                rng={"objective": generator.get_state()}, state={"data": {"samples_seen": 12}})
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "state.safetensors", "weights.safetensors"]
    _step(model, optimizer, generator)  # the continuation we must reproduce

    model2, ema2, optimizer2 = _tiny_setup(seed=1)  # different init: everything must come from disk
    meta, rng = ckpt.load_checkpoint(path, model=model2, ema=ema2, optimizer=optimizer2, device=torch.device("cpu"))
    assert meta["step"] == 3 and meta["state"] == {"data": {"samples_seen": 12}}
    generator2 = torch.Generator()
    generator2.set_state(rng["objective"])
    _step(model2, optimizer2, generator2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)  # bit-identical: AdamW moments, step count and the data draws restored
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), ema2.parameters()))


def test_wrapper_prefixes_are_stripped(tmp_path):
    model, ema, optimizer = _tiny_setup()

    class Compiled(nn.Module):  # what torch.compile returns: the module under `_orig_mod`
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    path = ckpt.save_checkpoint(tmp_path, 1, model=Compiled(model), ema=ema, optimizer=optimizer, rng={}, state={})
    keys = set(ckpt.load_weights(path, "model"))
    assert keys == set(model.state_dict())
    assert ckpt.strip_wrapper_prefixes({"module._orig_mod.0.weight": 1}) == {"0.weight": 1}


def test_latest_is_chosen_by_step_number_not_time(tmp_path):
    model, ema, optimizer = _tiny_setup()
    for step in (10, 2, 100):
        ckpt.save_checkpoint(tmp_path, step, model=model, ema=ema, optimizer=optimizer, rng={}, state={})
    os.utime(runfolder.checkpoint_path(tmp_path, 2), (2e9, 2e9))  # newest mtime on the oldest step
    (tmp_path / "checkpoints" / "0000050.tmp-999").mkdir()  # a killed writer's leftover is ignored
    assert ckpt.select_resume_checkpoint(tmp_path) == runfolder.checkpoint_path(tmp_path, 100)
    assert [s for s, _ in runfolder.list_checkpoints(tmp_path)] == [2, 10, 100]
    ckpt.remove_stale_temporaries(tmp_path)
    assert not (tmp_path / "checkpoints" / "0000050.tmp-999").exists()


def test_pruning_keeps_the_last_k_and_the_milestones(tmp_path):
    model, ema, optimizer = _tiny_setup()
    for step in range(1, 8):
        ckpt.save_checkpoint(tmp_path, step, model=model, ema=ema, optimizer=optimizer, rng={}, state={})
    assert ckpt.prune_checkpoints(tmp_path, keep_last=2, keep_steps=[3]) == [1, 2, 4, 5]
    assert [s for s, _ in runfolder.list_checkpoints(tmp_path)] == [3, 6, 7]


def _truncate(path):
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _flip_byte(path):
    state = path / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-3] ^= 0xFF  # same size, one bit pattern changed inside a tensor
    state.write_bytes(bytes(data))


def _drop_meta(path):
    (path / "state.json").unlink()


def _incomplete_meta(path):
    (path / "state.json").write_text('{"format": 1, "step": 4')


@pytest.mark.parametrize("damage", [_truncate, _flip_byte, _drop_meta, _incomplete_meta])
def test_damaged_final_checkpoint_of_a_finished_run_is_rebuilt_from_the_previous_one(damage, prepared_dir, tmp_path,
                                                                                     capsys):
    """DONE stays: a finished run whose final checkpoint is corrupt must not say 'nothing to do'."""
    cfg = tiny_config(prepared_dir, tmp_path, "train.max_steps=4", "train.ckpt_every=2")
    out = train(cfg)
    final = runfolder.checkpoint_path(out, 4)
    expected, log = tensors_of(final), (out / runfolder.METRICS_FILE).read_text()
    damage(final)
    with pytest.raises(ckpt.CorruptCheckpointError):
        ckpt.verify_checkpoint(final)
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="checkpoint at step 4 is invalid"):
        train(cfg)
    said = capsys.readouterr().out
    assert "marked finished but its final checkpoint is unusable" in said and "nothing to do" not in said
    assert "resuming from checkpoint step 2" in said
    assert (out / "checkpoints" / "0000004.corrupt").is_dir()  # kept aside, never picked again
    again = tensors_of(runfolder.checkpoint_path(out, 4))  # steps 3-4 replayed from checkpoint 2
    assert all(torch.equal(expected[k], again[k]) for k in expected)
    assert (out / "DONE").is_file() and ckpt.verify_checkpoint(runfolder.checkpoint_path(out, 4))
    assert [r["step"] for r in runfolder.read_jsonl(out / runfolder.METRICS_FILE)] == [1, 2, 3, 4]
    assert len(log.splitlines()) == 4
    train(cfg)
    assert "nothing to do" in capsys.readouterr().out  # repaired: finished again


def test_no_valid_checkpoint_starts_from_scratch(prepared_dir, tmp_path):
    cfg = tiny_config(prepared_dir, tmp_path, "train.max_steps=2", "train.ckpt_every=2")
    out = train(cfg)
    expected = tensors_of(runfolder.checkpoint_path(out, 2))
    _truncate(runfolder.checkpoint_path(out, 2))
    (out / "DONE").unlink()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        train(cfg)
    again = tensors_of(runfolder.checkpoint_path(out, 2))
    assert all(torch.equal(expected[k], again[k]) for k in expected)
    shutil.rmtree(run_dir(cfg))
