"""The prepared folder shard by shard: the plan of shards, which settings own the folder and what is
finished in it, and the passes that write it.

  pass 1  `encode_shard`: VAE posterior moments and raw encoder features (float16) plus the shard's
          float64 PCA sums (train split) -> `<split>/shard-XXXXX.enc.safetensors`;
  fit     `fit_pca`: once every train shard has its sums, merge them in shard order and eigendecompose
          (bench.prepare.pca) -> `pca.safetensors/.json` (`supplied_pca` when one is given instead);
  pass 2  `project_shard`: the features onto the first r_max components -> the final
          `<split>/shard-XXXXX.safetensors` (format in bench.prepare.dataset); the pass-1 file is removed.
Every file is written atomically (temporary name, then os.replace), so a finished file is a whole one.
The PCA files are read, fitted and written under `pca_lock`: array tasks that finish together would
otherwise fit side by side, and the first to project removes pass-1 files the other is still reading.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from bench.atomic import atomic_save_safetensors, atomic_write_json, crash_point
from bench.locks import LockBusy, exclusive
from bench.prepare.dataset import (
    FORMAT_VERSION,
    MANIFEST,
    PreparedDataError,
    check_files,
    read_manifest,
    shard_name,
)
from bench.prepare.encoders import LatentVAE, SemanticEncoder
from bench.prepare.options import PrepareError, PrepareOptions, check_inputs
from bench.prepare.pca import PCAError, PCAModel, PCAStats, import_official_pca
from bench.prepare.sources import ImageSource

PCA_LOCK = ".pca.lock"
OFFICIAL_PCA_ENCODER = "dinov2_vitb14_reg_"
"""ReDi's dino_pca_model.pth was fitted on DINOv2 ViT-B/14-reg tokens; its 768 dimensions would also
fit ViT-B/14 without registers, so the encoder is checked by id (the pickle does not record it)."""
CPU = torch.device("cpu")


def shard_plan(sources: dict[str, ImageSource], options: PrepareOptions) -> list[tuple[str, int, range]]:
    """Every shard as (split, shard index, image indices), in a fixed order."""
    plan = []
    for split, source in sources.items():
        limit = options.max_images.get(split)
        n = len(source) if limit is None else min(len(source), int(limit))
        for shard in range(math.ceil(n / options.shard_size)):
            plan.append((split, shard, range(shard * options.shard_size,
                                             min(n, (shard + 1) * options.shard_size))))
    return plan


def pca_fit_selection(num_train: int, cfg_encoder, seed: int) -> Optional[torch.Tensor]:
    """Which train images the PCA is fitted on (bool, one per image), or None for all of them.

    The paper: 76,800 randomly sampled images (`pca_fit_subset=random`, drawn with the prepare seed,
    so every array task draws the same subset); the official calc_pca.py: the first ~309K in its
    loader's order (`first`); the harness's default: every train image (None)."""
    wanted = cfg_encoder.pca_fit_images
    if wanted is None:
        return None
    if wanted > num_train:
        raise PrepareError(f"encoder.pca_fit_images={wanted} exceeds the {num_train} train images; "
                           "lower it or set it to null (fit on all of them)")
    chosen = (torch.arange(wanted) if cfg_encoder.pca_fit_subset == "first" else
              torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))[:wanted])
    mask = torch.zeros(num_train, dtype=torch.bool)
    mask[chosen] = True
    return mask


def claim_shard(claims_dir: str, split: str, index: int) -> bool:
    """True for the one lane whose O_EXCL create of this shard's claim file succeeds."""
    try:
        os.close(os.open(os.path.join(claims_dir, f"{split}-{index:05d}"), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def encoded_name(split: str, index: int) -> str:
    """The pass-1 file of a shard (moments, float16 features, PCA sums), beside its final name."""
    return shard_name(split, index).replace(".safetensors", ".enc.safetensors")


def encode_shard(vae: LatentVAE, encoder: SemanticEncoder, source: ImageSource, indices: range,
                 batch_size: int, fit_pca: bool, bar,
                 device: torch.device = CPU,
                 pca_rows: Optional[torch.Tensor] = None,
                 autocast_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Pass 1 for one shard: moments, float16 features, labels, indices (+ float64 PCA sums over the
    images `pca_rows` selects, a bool per image of the split; None: all). With `autocast_dtype`
    (encoder.precision) the semantic encoder runs under autocast, its features back in float32;
    the VAE always runs in fp32."""
    moments, features = [], []
    stats = PCAStats(encoder.info.channels) if fit_pca else None
    for start in range(indices.start, indices.stop, batch_size):
        batch = range(start, min(indices.stop, start + batch_size))
        images = source.images(batch).to(device)
        moments.append(vae.encode_moments(images).cpu())
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            feats = encoder.encode(images).cpu()  # (B, D, gh, gw) float32
        if stats is not None:
            fitted = feats if pca_rows is None else feats[pca_rows[batch.start:batch.stop]]
            stats.update(fitted.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]))
        features.append(feats.half())
        bar.update(len(batch))
    out = {"moments": torch.cat(moments), "features": torch.cat(features),
           "labels": source.labels[indices.start: indices.stop].clone(),
           "indices": torch.arange(indices.start, indices.stop, dtype=torch.int64)}
    if stats is not None:
        out |= stats.to_tensors()
    return out


@contextlib.contextmanager
def pca_lock(out: Path) -> Iterator[None]:
    """Hold the folder's PCA lock (bench.locks: flock, or an owner file where flock is refused);
    says so when another task holds it, then waits: its fit takes seconds to minutes."""
    path = Path(out) / PCA_LOCK
    with open(path, "a+b") as handle, contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive(handle, path, blocking=False))
        except LockBusy:
            print(f"prepare: another task is fitting or writing the PCA of {out}; waiting for it", flush=True)
            held.enter_context(exclusive(handle, path))
        yield


def stored_pca(out: Path, encoder: SemanticEncoder) -> Optional[PCAModel]:
    """The PCA an earlier run or another task saved in `out`, checked against the encoder; None if
    there is none. Call it under `pca_lock`: a PCA is two files, written one after the other."""
    if not (out / "pca.safetensors").is_file():
        return None
    return PCAModel.load(out / "pca.safetensors", encoder.info.encoder_id, encoder.info.channels)


def supplied_pca(encoder: SemanticEncoder, options: PrepareOptions, out: Path,
                 settings_hash: str) -> Optional[PCAModel]:
    """The PCA given by pca_path or official_pca, checked against the encoder (None: fit one)."""
    info = encoder.info
    if options.official_pca:
        if same_settings(out, settings_hash) and (out / "pca.safetensors").is_file():
            # Converted by an earlier (killed or array) run of these settings, whose hash covers the
            # pickle's sha256: read the safetensors copy and never unpickle the file again.
            with pca_lock(out):
                return stored_pca(out, encoder)
        if options.trust_pickle and not info.encoder_id.startswith(OFFICIAL_PCA_ENCODER):
            raise PCAError(f"official_pca (--official-pca) is ReDi's PCA of DINOv2 ViT-B/14-reg "
                           f"features, but the encoder is {info.encoder_id!r}; set encoder.kind=dinov2 "
                           "encoder.variant=vitb14_reg, or fit a PCA for this encoder (no --official-pca)")
        model = import_official_pca(options.official_pca, info.encoder_id, options.trust_pickle)
        model.check_matches(info.encoder_id, info.channels, where=options.official_pca)
        return model
    if options.pca_path:
        return PCAModel.load(options.pca_path, info.encoder_id, info.channels)
    return None


def fit_pca(out: Path, plan, encoder: SemanticEncoder,
            pca_rows: Optional[torch.Tensor] = None) -> Optional[PCAModel]:
    """Merge every train shard's sums (in shard order) and fit; None while some are missing.
    Call it under `pca_lock` (module docstring)."""
    from safetensors.torch import load_file

    train = [(split, index) for split, index, _ in plan if split == "train"]
    if not train:
        raise PrepareError("the PCA is fitted on the train split; include 'train' in splits or "
                           "pass pca_path")
    files = [out / encoded_name(split, index) for split, index in train]
    if not all(f.is_file() for f in files):
        return None
    crash_point("prepare:pca-fit")  # every train shard's sums present, none read yet
    total = PCAStats(encoder.info.channels)
    images = 0
    for f in files:
        tensors = load_file(str(f))
        total.merge(PCAStats.from_tensors(tensors))
        images += int(tensors["labels"].shape[0])
    if pca_rows is not None:
        images = int(pca_rows.sum())
    model = total.finalize(encoder.info.encoder_id, num_images=images)
    atomic_save_safetensors(out / "pca_stats.safetensors", total.to_tensors(prefix=""))
    model.save(out / "pca.safetensors")
    return model


def project_shard(out: Path, split: str, index: int, pca: PCAModel, r_max: int,
                  store_features: bool) -> None:
    """Pass 2 for one shard: PCA coordinates from the stored features; final shard; drop pass 1."""
    from safetensors.torch import load_file

    enc = out / encoded_name(split, index)
    tensors = load_file(str(enc))
    final = {key: tensors[key] for key in ("moments", "labels", "indices")}
    features = tensors["features"]
    # Chunks of 64 images bound the float64 temporaries (ImageNet: 64 x 256 tokens x 768).
    final["semantic"] = torch.cat([pca.project_map(features[i: i + 64].float(), r_max).float()
                                   for i in range(0, len(features), 64)])
    if store_features:
        final["features"] = tensors["features"]
    # One metadata key: safetensors writes the metadata map in a random order per process, so with
    # two keys a rebuilt (or killed and resumed) shard would differ from the original in its bytes.
    atomic_save_safetensors(out / shard_name(split, index), final, metadata={"format": FORMAT_VERSION})
    crash_point(f"prepare:projected:{split}/{index}")  # the final shard in place, pass 1's not removed
    enc.unlink()


def same_settings(out: Path, settings_hash: str) -> bool:
    """Whether `out` was claimed for these settings (its settings.json holds this hash)."""
    path = out / "settings.json"
    return path.is_file() and json.loads(path.read_text()).get("settings_hash") == settings_hash


def claim_folder(out: Path, settings_hash: str, settings: dict, options: PrepareOptions) -> None:
    """Refuse (or with overwrite, clear) a folder that holds another settings' work."""
    path = out / "settings.json"
    if path.is_file():
        previous = json.loads(path.read_text()).get("settings_hash")
        if previous != settings_hash:
            if not options.overwrite:
                raise PrepareError(f"{out} holds a prepare with other settings (hash {previous} vs "
                                   f"{settings_hash}); choose another data.prepared_dir or pass "
                                   "overwrite=True (--overwrite) to replace it")
            for name in ("train", "test", "vae", "classifier"):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in (MANIFEST, "settings.json", "pca.safetensors", "pca.json",
                         "pca_stats.safetensors"):
                (out / name).unlink(missing_ok=True)
    atomic_write_json(path, {"settings_hash": settings_hash, "settings": settings})


def up_to_date(out: Path, settings_hash: str, options: PrepareOptions) -> bool:
    """True when `out` holds a finished prepare of these settings whose files are intact (sizes;
    with options.verify also sha256). Damaged files are removed, with what was derived from them,
    and the manifest too: the run goes on and rebuilds them."""
    try:
        manifest = read_manifest(out, check=False)
    except PreparedDataError as err:
        if not same_settings(out, settings_hash):
            raise
        print(f"prepare: {err}; rebuilding it", flush=True)
        (out / MANIFEST).unlink()
        return False
    if manifest.get("settings_hash") != settings_hash:
        return False
    problems = check_files(out, manifest, hashes=options.verify)
    if not problems:
        checked = f"; {len(manifest.get('files') or {})} files match their sha256" if options.verify else ""
        print(f"prepare: {out} is up to date (settings {settings_hash[:12]}{checked})", flush=True)
        return True
    shards = [name for entry in manifest["splits"].values() for name in entry["shards"]]
    for problem in problems:
        print(f"prepare: damaged: {problem}", flush=True)
    bad = [name for name in manifest["files"] if any(problem.startswith(f"{out / name} ") for problem in problems)]
    doomed = set(bad)
    if any(name.startswith("vae/") for name in bad):  # every shard's moments came from the VAE
        doomed |= set(shards)
    if any(name.startswith("pca") for name in bad):  # the PCA is refitted from every train shard
        doomed |= set(shards) | {"pca.safetensors", "pca.json", "pca_stats.safetensors"}
    for folder in ("vae", "classifier"):
        if any(name.startswith(folder + "/") for name in bad):
            shutil.rmtree(out / folder, ignore_errors=True)
    for name in sorted(doomed):
        (out / name).unlink(missing_ok=True)
    (out / MANIFEST).unlink()
    print(f"prepare: rebuilding {len(doomed)} file(s)", flush=True)
    return False


@dataclass
class PrepareState:
    """What a prepared folder holds for given settings (`prepare_state`): the launcher submits
    only the shards that are missing, and nothing when `complete`."""

    out: Path
    settings_hash: str
    shards: list[str]
    """Every shard as `split/index`, in the order prepare deals them."""
    encoded: set[str]
    """Shards whose pass-1 file (moments, features, PCA sums) or final file exists."""
    final: set[str]
    complete: bool
    """manifest.json is there, of these settings, with intact files."""
    images: int


def prepare_state(cfg_data, cfg_vae, cfg_encoder, options: Optional[PrepareOptions] = None) -> PrepareState:
    """Check the settings as `run_prepare` would (same errors, before any job is queued) and read
    what `cfg_data.prepared_dir` already holds. Writes nothing, except that a finished folder with
    damaged files loses them and its manifest (as `run_prepare` would do first)."""
    options = options or PrepareOptions()
    out = Path(cfg_data.prepared_dir)
    sources, encoder, _, _, settings_hash = check_inputs(cfg_data, cfg_vae, cfg_encoder, options)
    complete = (out / MANIFEST).is_file() and up_to_date(out, settings_hash, options)
    plan = shard_plan(sources, options)
    same = complete or same_settings(out, settings_hash)
    names = [f"{split}/{index}" for split, index, _ in plan]
    final = {f"{s}/{i}" for s, i, _ in plan if same and (out / shard_name(s, i)).is_file()}
    encoded = final | {f"{s}/{i}" for s, i, _ in plan if same and (out / encoded_name(s, i)).is_file()}
    return PrepareState(out, settings_hash, names, encoded, final, complete, sum(len(r) for *_, r in plan))
