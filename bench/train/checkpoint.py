"""Atomic, verifiable training checkpoints: safetensors for tensors, JSON for everything else.

Layout of one checkpoint (`<run_dir>/checkpoints/<step:07d>/`):

    weights.safetensors   model.<name> and ema.<name> (prefixes `_orig_mod.` / `module.` stripped)
    state.safetensors     optimizer tensors (optim.<param index>.<key>) and RNG states (rng.<name>)
    state.json            step, optimizer param groups and non-tensor state, python/numpy RNG,
                          caller state (data position, ...), the sha256 of both safetensors files,
                          and "complete": true -- written last

A checkpoint is written into `<step>.tmp-<pid>/`, every file is fsynced, and the directory is renamed
into place, so a killed writer leaves only a tmp folder that is ignored (and removed on the next
start). When the storage refuses the write (a full disk, a quota, a read-only file system, the run
folder removed) the tmp folder is removed at once where possible and the error is one
bench.storage.StorageError saying how much a checkpoint needs; the newest complete checkpoint is
untouched. A checkpoint whose state.json is missing or unreadable, or whose files do not match the
recorded sha256 (a truncated or corrupted file), is invalid: `select_resume_checkpoint` moves it
aside to `<step>.corrupt` with a warning and falls back to the previous good one. "Latest" always
means the largest step number, never a file time or size.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from bench.atomic import atomic_write_text, crash_point, save_safetensors_file, sha256_file
from bench.runfolder import checkpoint_path, checkpoints_dir, list_checkpoints
from bench.storage import CHECKPOINT_OVERHEAD, writing

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.safetensors"
META_FILE = "state.json"
_STRIP_PREFIXES = ("_orig_mod.", "module.")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder is incomplete, truncated or does not match its recorded checksums."""


# ----------------------------------------------------------------------------------------------
# Small helpers


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove torch.compile's `_orig_mod.` and DDP's `module.` from every key (in any nesting)."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cpu_contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def python_numpy_rng_state() -> dict[str, Any]:
    """Python's and numpy's global RNG states as JSON (the trainer draws nothing from them, but
    libraries might; saving them costs nothing)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
    }


def restore_python_numpy_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": np_state["bit_generator"],
                         "state": {"key": np.asarray(np_state["key"], dtype=np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})


# ----------------------------------------------------------------------------------------------
# Optimizer state <-> (tensors, JSON)


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in group.items()}
              for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------
# Listing, verifying, pruning


# checkpoints_dir, checkpoint_path and list_checkpoints are the run folder's (bench.runfolder).


def read_meta(ckpt_dir: Path) -> dict:
    """state.json of a checkpoint; CorruptCheckpointError when missing, unreadable or incomplete."""
    path = Path(ckpt_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(f"{path}: cannot read ({err})") from None
    if not isinstance(meta, dict) or meta.get("complete") is not True or meta.get("format") != FORMAT_VERSION:
        raise CorruptCheckpointError(f"{path}: not a complete checkpoint of format {FORMAT_VERSION}")
    return meta


def verify_checkpoint(ckpt_dir: Path) -> dict:
    """Check state.json and the sha256 of every file it lists; return the metadata."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    for name, expected in meta.get("sha256", {}).items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path} is missing")
        if sha256_file(path) != expected:
            raise CorruptCheckpointError(f"{path} does not match its recorded sha256 (truncated or corrupted)")
    if set(meta.get("sha256", {})) != {WEIGHTS_FILE, STATE_FILE}:
        raise CorruptCheckpointError(f"{ckpt_dir / META_FILE} does not list the checksums of both files")
    if int(meta["step"]) != int(ckpt_dir.name):
        raise CorruptCheckpointError(f"{ckpt_dir}: folder name and recorded step {meta['step']} differ")
    return meta


def _quarantine(ckpt_dir: Path) -> Path:
    target = ckpt_dir.with_name(f"{ckpt_dir.name}.corrupt")
    suffix = 1
    while target.exists():
        target = ckpt_dir.with_name(f"{ckpt_dir.name}.corrupt{suffix}")
        suffix += 1
    os.replace(ckpt_dir, target)
    return target


def select_resume_checkpoint(run_dir: Path, quarantine: bool = True) -> Path | None:
    """The valid checkpoint with the largest step, or None. Invalid newer ones are reported with a
    warning and (when `quarantine`) renamed to `<step>.corrupt` so that they are never picked again."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CorruptCheckpointError as err:
            where = ""
            if quarantine:
                where = f"; moved to {_quarantine(path).name}"
            warnings.warn(f"checkpoint at step {step} is invalid ({err}){where}; trying the previous one",
                          RuntimeWarning, stacklevel=2)
    return None


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete `<step>.tmp-*` folders left by a writer that was killed mid-checkpoint."""
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for path in root.iterdir():
            if ".tmp-" in path.name or ".old-" in path.name:
                shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep_last: int, keep_steps: Iterable[int] = ()) -> list[int]:
    """Delete all but the newest `keep_last` checkpoints and those in `keep_steps` (milestones, the
    final step). Returns the deleted steps."""
    keep = set(int(s) for s in keep_steps)
    listed = list_checkpoints(run_dir)
    keep.update(step for step, _ in listed[-keep_last:])
    deleted = []
    with writing(checkpoints_dir(run_dir)):  # a read-only file system refuses deletions too
        for step, path in listed:
            if step not in keep:
                shutil.rmtree(path)
                deleted.append(step)
    return deleted


# ----------------------------------------------------------------------------------------------
# Save and load


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> Path:
    """Write checkpoint `step` atomically and return its folder.

    `rng` holds RNG state tensors (torch CPU/CUDA, the objective's and the data's generators);
    `state` is any JSON-able caller state (data position, run hash, ...). An existing folder of
    the same step (e.g. one quarantined run replayed) is replaced.
    """
    weights = {f"model.{k}": v for k, v in strip_wrapper_prefixes(unwrap_model(model).state_dict()).items()}
    weights.update({f"ema.{k}": v for k, v in strip_wrapper_prefixes(unwrap_model(ema).state_dict()).items()})
    optim_tensors, optim_meta = _split_optimizer_state(optimizer.state_dict())
    tensors = dict(optim_tensors)
    tensors.update({f"rng.{name}": value for name, value in rng.items()})
    final = checkpoint_path(run_dir, step)
    tmp = checkpoints_dir(run_dir) / f"{step:07d}.tmp-{os.getpid()}"
    needed = sum(t.numel() * t.element_size() for t in (*weights.values(), *tensors.values())) + CHECKPOINT_OVERHEAD
    with writing(final, needed, "a checkpoint"):
        try:
            _write_checkpoint_folder(tmp, weights, tensors, {
                "format": FORMAT_VERSION, "step": int(step), "optimizer": optim_meta,
                "python_numpy_rng": python_numpy_rng_state(), "state": state})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
            raise
        if final.exists():  # rename(2) cannot replace a non-empty folder: move the old one out first
            old = final.with_name(f"{step:07d}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    return final


def _write_checkpoint_folder(tmp: Path, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                             meta: dict[str, Any]) -> None:
    """The checkpoint's files in the fresh folder `tmp`: both safetensors files fsynced, then
    state.json (with their sha256 and "complete": true) last."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_safetensors_file(_cpu_contiguous(weights), tmp / WEIGHTS_FILE, {"format": str(FORMAT_VERSION)})
    save_safetensors_file(_cpu_contiguous(tensors), tmp / STATE_FILE, {"format": str(FORMAT_VERSION)})
    for name in (WEIGHTS_FILE, STATE_FILE):
        _fsync_file(tmp / name)
    crash_point("checkpoint:files")
    meta = {**meta, "sha256": {name: sha256_file(tmp / name) for name in (WEIGHTS_FILE, STATE_FILE)},
            "complete": True}
    atomic_write_text(tmp / META_FILE, json.dumps(meta))
    _fsync_dir(tmp)


def _load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """safetensors' load_file maps the file into memory and its tensors alias that mapping, so a
    later change to the file (pruning, a rewrite) would reach them; copy them out."""
    return {k: v.clone() for k, v in load_file(str(path), device=str(device)).items()}


def load_weights(ckpt_dir: Path, which: str = "ema", device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The `model` or `ema` state dict of a checkpoint (verified against its sha256 first)."""
    if which not in ("model", "ema"):
        raise ValueError(f"which must be 'model' or 'ema', got {which!r}")
    verify_checkpoint(ckpt_dir)
    tensors = _load_tensors(Path(ckpt_dir) / WEIGHTS_FILE, device)
    prefix = f"{which}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_checkpoint(
    ckpt_dir: Path,
    *,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model, EMA, optimizer and python/numpy RNG in place (strict key match); return
    (metadata incl. the caller's `state`, the RNG tensors for the caller's generators)."""
    ckpt_dir = Path(ckpt_dir)
    meta = verify_checkpoint(ckpt_dir)
    weights = _load_tensors(ckpt_dir / WEIGHTS_FILE)
    unwrap_model(model).load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("model.")})
    unwrap_model(ema).load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("ema.")})
    tensors = _load_tensors(ckpt_dir / STATE_FILE)
    optimizer.load_state_dict(_join_optimizer_state(tensors, meta["optimizer"]))
    restore_python_numpy_rng_state(meta["python_numpy_rng"])
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    return meta, rng
