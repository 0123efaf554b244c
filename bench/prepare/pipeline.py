"""`bench prepare`: images -> VAE moments + PCA-reduced semantic features, as resumable shards.

Two passes, each shard written atomically (temporary name, then os.replace):
  pass 1  per shard: VAE posterior moments and raw encoder features (float16) plus the shard's
          float64 PCA sums (train split) -> `<split>/shard-XXXXX.enc.safetensors`;
  fit     once every train shard has its sums: merge them in shard order and eigendecompose
          (bench.prepare.pca) -> `pca.safetensors/.json` (skipped when a PCA is supplied);
  pass 2  per shard: project the features onto the first r_max components -> the final
          `<split>/shard-XXXXX.safetensors` (format in bench.prepare.dataset); the pass-1 file is removed.
Shards are dealt to array tasks round-robin (task index/count from the options or
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT). A task finds finished work and skips it, so a killed
run resumes, and any task that finds all train sums present fits the PCA (the result is the same
whoever does it). `manifest.json` is written when every shard is final, and a second call with the
same settings (same content hash) returns at once.

The embedded default (`prepare_embedded`) also trains the tiny AutoencoderKL and the evaluation
classifier first (bench.prepare.embedded), in task 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from bench.atomic import (
    atomic_save_safetensors,
    atomic_write_json,
    crash_point,
    remove_stale_temporaries,
    sha256_file,
    sha256_json,
)
from bench.compose import load_config
from bench.config import DataConfig, EncoderConfig, VAEConfig
from bench.prepare.dataset import (  # noqa: F401
    FORMAT_VERSION,
    MANIFEST,
    PreparedDataError,
    check_files,
    load_prepared,
    read_manifest,
    shard_name,
    write_manifest,
)
from bench.prepare.embedded import (
    ClassifierSettings,
    EmbeddedVAESettings,
    classifier_info,
    train_classifier,
    train_embedded_vae,
)
from bench.prepare.encoders import LatentVAE, SemanticEncoder, build_semantic_encoder, load_vae
from bench.prepare.pca import PCAError, PCAModel, PCAStats, import_official_pca
from bench.prepare.sources import DatasetError, ImageSource, open_split
from bench.process_lanes import start_lane
from bench.progress import Progress
from bench.storage import guard

CLASSIFIER_DATASETS = ("fashion_mnist", "digits")
OFFICIAL_PCA_ENCODER = "dinov2_vitb14_reg_"
"""ReDi's dino_pca_model.pth was fitted on DINOv2 ViT-B/14-reg tokens; its 768 dimensions would also
fit ViT-B/14 without registers, so the encoder is checked by id (the pickle does not record it)."""
CPU = torch.device("cpu")


class PrepareError(ValueError):
    """Prepare cannot run with these settings or this folder; the message says what to change."""


@dataclass
class PrepareOptions:
    """Prepare-only knobs (not part of the experiment config)."""

    shard_size: int = 1024
    batch_size: int = 16
    """Encoder batch; EfficientNet-Lite0 on CPU is fastest at small batches (cache-bound)."""
    task_index: Optional[int] = None
    task_count: Optional[int] = None
    """Array task; None reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (else 0 of 1)."""
    claims_dir: Optional[str] = None
    """Set by this machine's lanes (`lanes` > 1) for their own calls: instead of a fixed share, each
    lane encodes the next shard no lane has claimed (an O_EXCL file here), so a slower lane takes
    fewer shards. Not part of the content hash: which lane encodes a shard does not change it."""
    shards: tuple[str, ...] = ()
    """`split/index` names of the shards this array task encodes (the launcher deals only the
    unfinished ones, bench.launch.prepare_jobs); empty: the task's round-robin share of all of them."""
    splits: tuple[str, ...] = ("train", "test")
    max_images: dict = field(default_factory=dict)
    """Per split, keep only the first N images (e.g. {"train": 20000}); the classifier and the
    embedded VAE still use the whole train split."""
    efficientnet_input_size: int = 128
    pca_path: Optional[str] = None
    """Use this PCA (a .safetensors/.json pair) instead of fitting one."""
    official_pca: Optional[str] = None
    """Import ReDi's pcs/dino_pca_model.pth (a pickle: needs trust_pickle=True)."""
    trust_pickle: bool = False
    seed: int = 0
    vae: EmbeddedVAESettings = field(default_factory=EmbeddedVAESettings)
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    train_classifier: bool = True
    overwrite: bool = False
    verify: bool = False
    """Check every prepared file against the manifest's sha256 (not only its size) and rebuild the
    damaged ones."""
    """Replace a prepared folder that holds other settings (otherwise that is an error)."""
    progress: bool = True
    lanes: int = 1
    """Processes at once on this machine, one compute thread each (the local profile's lanes): the
    VAE and the classifier train side by side, then the shards are dealt to `lanes` local tasks.
    Ignored inside a SLURM array (task_count > 1), where the scheduler runs the tasks."""
    device: str = "auto"
    """auto = cuda when available, else cpu (the embedded default runs on CPU)."""


def _device(options: PrepareOptions) -> torch.device:
    if options.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(options.device)


def _task(options: PrepareOptions) -> tuple[int, int]:
    index = options.task_index
    count = options.task_count
    if index is None:  # SLURM numbers tasks from --array's first id (SLURM_ARRAY_TASK_MIN)
        index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")) - int(
            os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    if count is None:
        count = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
    if count < 1 or not 0 <= index < count:
        raise PrepareError(f"task index {index} of {count} tasks is invalid (0 <= index < count)")
    return index, count


def _weights_fingerprint(path: Optional[str]) -> Optional[str]:
    return sha256_file(path) if path and Path(path).is_file() else None


def _vae_fingerprint(cfg_vae, options: PrepareOptions) -> dict:
    if cfg_vae.kind == "embedded" and not cfg_vae.path:
        return {"kind": "embedded", "trained": asdict(options.vae), "seed": options.seed}
    folder = Path(cfg_vae.path or "")
    files = sorted(p for p in folder.glob("*") if p.suffix in (".json", ".safetensors", ".bin"))
    return {"kind": cfg_vae.kind, "path": cfg_vae.path, "scaling_factor": cfg_vae.scaling_factor,
            "files": {p.name: sha256_file(p) for p in files} if folder.is_dir() else None}


def _settings(cfg_data, cfg_vae, cfg_encoder, options: PrepareOptions,
              sources: dict[str, ImageSource], encoder: SemanticEncoder) -> dict:
    """Everything that changes the prepared tensors (the content hash covers exactly this)."""
    return {
        "format": FORMAT_VERSION,
        "data": {"name": cfg_data.name, "image_size": cfg_data.image_size,
                 "num_classes": cfg_data.num_classes,
                 "inputs": {s: src.fingerprint for s, src in sources.items()},
                 "max_images": {s: options.max_images.get(s) for s in sources}},
        "vae": _vae_fingerprint(cfg_vae, options),
        "encoder": {"info": encoder.info.to_json() | {"weights": None},
                    "weights_sha256": _weights_fingerprint(encoder.info.weights),
                    "pca_rank_max": cfg_encoder.pca_rank_max,
                    "store_features": cfg_encoder.store_features},
        "pca": {"path_sha256": _weights_fingerprint(options.pca_path and
                                                    str(Path(options.pca_path).with_suffix(
                                                        ".safetensors"))),
                "official_sha256": _weights_fingerprint(options.official_pca),
                **({"fit_images": cfg_encoder.pca_fit_images, "fit_subset": cfg_encoder.pca_fit_subset,
                    "fit_seed": options.seed} if cfg_encoder.pca_fit_images is not None else {})},
        "shard_size": options.shard_size,
        "classifier": (asdict(_classifier_settings(cfg_data, options)) | {"seed": options.seed}
                       if _wants_classifier(cfg_data, options) else None),
    }


def _classifier_settings(cfg_data, options: PrepareOptions) -> ClassifierSettings:
    """The classifier settings in effect: on Fashion-MNIST it must reach 90% (docs/embedded.md)."""
    settings = options.classifier
    if cfg_data.name == "fashion_mnist" and settings.min_test_accuracy == 0.0:
        settings = replace(settings, min_test_accuracy=0.9)
    return settings


def _wants_classifier(cfg_data, options: PrepareOptions) -> bool:
    return options.train_classifier and cfg_data.name in CLASSIFIER_DATASETS


def _up_to_date(out: Path, settings_hash: str, options: PrepareOptions) -> bool:
    """True when `out` holds a finished prepare of these settings whose files are intact (sizes;
    with options.verify also sha256). Damaged files are removed, with what was derived from them,
    and the manifest too: the run goes on and rebuilds them."""
    try:
        manifest = read_manifest(out, check=False)
    except PreparedDataError as err:
        if not _same_settings(out, settings_hash):
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


def _plan(sources: dict[str, ImageSource], options: PrepareOptions) -> list[tuple[str, int, range]]:
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


def _claim(claims_dir: str, split: str, index: int) -> bool:
    """True for the one lane whose O_EXCL create of this shard's claim file succeeds."""
    try:
        os.close(os.open(os.path.join(claims_dir, f"{split}-{index:05d}"), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def _enc_name(split: str, index: int) -> str:
    return shard_name(split, index).replace(".safetensors", ".enc.safetensors")


def _same_settings(out: Path, settings_hash: str) -> bool:
    path = out / "settings.json"
    return path.is_file() and json.loads(path.read_text()).get("settings_hash") == settings_hash


def _claim_folder(out: Path, settings_hash: str, settings: dict, options: PrepareOptions) -> None:
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


def _encode_shard(vae: LatentVAE, encoder: SemanticEncoder, source: ImageSource, indices: range,
                  batch_size: int, fit_pca: bool, bar,
                  device: torch.device = CPU,
                  pca_rows: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Pass 1 for one shard: moments, float16 features, labels, indices (+ float64 PCA sums over the
    images `pca_rows` selects, a bool per image of the split; None: all)."""
    moments, features = [], []
    stats = PCAStats(encoder.info.channels) if fit_pca else None
    for start in range(indices.start, indices.stop, batch_size):
        batch = range(start, min(indices.stop, start + batch_size))
        images = source.images(batch).to(device)
        moments.append(vae.encode_moments(images).cpu())
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


def _ensure_embedded_assets(out: Path, cfg_data, cfg_vae, sources: dict[str, ImageSource],
                            options: PrepareOptions, task_index: int) -> None:
    """Train the embedded VAE and the evaluation classifier when they are missing (task 0)."""
    need_vae = cfg_vae.kind == "embedded" and not cfg_vae.path and \
        not (out / "vae" / "training.json").is_file()  # written after the weights
    need_classifier = _wants_classifier(cfg_data, options) and classifier_info(out / "classifier") is None
    if not (need_vae or need_classifier):
        return
    if task_index != 0:
        raise PrepareError("the embedded VAE/classifier are trained by array task 0; run task 0 "
                           "first (or prepare once with task_count=1), then the other tasks")
    train = sources.get("train") or open_split(cfg_data, "train")
    train_images = train.images(range(len(train)))
    side = None
    if need_vae and need_classifier and options.lanes > 1:  # side by side, one thread each
        side = start_lane(_classifier_lane, cfg_data, options, out)
        need_classifier = False
    with _threads(1 if side else None):
        _train_assets(out, cfg_data, sources, options, train, train_images, need_vae, need_classifier)
    if side is not None:
        side.result()  # re-raises the classifier's error, if any


def _train_assets(out: Path, cfg_data, sources: dict, options: PrepareOptions, train, train_images,
                  need_vae: bool, need_classifier: bool) -> None:
    if need_vae:
        print("prepare: training the embedded AutoencoderKL ...", flush=True)
        summary = train_embedded_vae(train_images, options.vae, options.seed, out / "vae",
                                     options.progress)
        print(f"prepare: VAE done in {summary['seconds']:.0f}s, PSNR {summary['train_psnr_db']:.1f} dB, "
              f"scaling factor {summary['scaling_factor']:.4f}", flush=True)
    if need_classifier:
        test = sources.get("test") or open_split(cfg_data, "test")
        print("prepare: training the evaluation classifier ...", flush=True)
        summary = train_classifier(train_images, train.labels, test.images(range(len(test))),
                                   test.labels, cfg_data.num_classes,
                                   _classifier_settings(cfg_data, options),
                                   options.seed, out / "classifier", options.progress)
        print(f"prepare: classifier test accuracy {summary['test_accuracy']:.4f} "
              f"({summary['seconds']:.0f}s)", flush=True)


def _classifier_lane(cfg_data, options: PrepareOptions, out: Path) -> None:
    """The evaluation classifier in a lane of its own (bench.process_lanes: a spawned process, one thread)."""
    train = open_split(cfg_data, "train")
    _train_assets(out, cfg_data, {}, options, train, train.images(range(len(train))), False, True)


def _encode_lane(cfg_data, cfg_vae, cfg_encoder, options: PrepareOptions, task_index: int) -> None:
    """Local task `task_index` of `options.lanes`: its share of the shards (run in a lane process,
    or in this one for task 0)."""
    run_prepare(cfg_data, cfg_vae, cfg_encoder, replace(options, task_index=task_index,
                                                        task_count=options.lanes, lanes=1, progress=False))


@contextlib.contextmanager
def _threads(count: Optional[int]):
    """torch's compute threads inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _supplied_pca(encoder: SemanticEncoder, options: PrepareOptions, out: Path,
                  settings_hash: str) -> Optional[PCAModel]:
    """The PCA given by pca_path or official_pca, checked against the encoder (None: fit one)."""
    info = encoder.info
    if options.official_pca:
        if _same_settings(out, settings_hash) and (out / "pca.safetensors").is_file():
            # Converted by an earlier (killed or array) run of these settings, whose hash covers the
            # pickle's sha256: read the safetensors copy and never unpickle the file again.
            return PCAModel.load(out / "pca.safetensors", info.encoder_id, info.channels)
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


def _fit_pca(out: Path, plan, encoder: SemanticEncoder,
             pca_rows: Optional[torch.Tensor] = None) -> Optional[PCAModel]:
    """Merge every train shard's sums (in shard order) and fit; None while some are missing."""
    from safetensors.torch import load_file

    train = [(split, index) for split, index, _ in plan if split == "train"]
    if not train:
        raise PrepareError("the PCA is fitted on the train split; include 'train' in splits or "
                           "pass pca_path")
    files = [out / _enc_name(split, index) for split, index in train]
    if not all(f.is_file() for f in files):
        return None
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


def _project_shard(out: Path, split: str, index: int, pca: PCAModel, r_max: int,
                   store_features: bool) -> None:
    """Pass 2 for one shard: PCA coordinates from the stored features; final shard; drop pass 1."""
    from safetensors.torch import load_file

    enc = out / _enc_name(split, index)
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


def _checked(cfg_data, cfg_vae, cfg_encoder, options: PrepareOptions):
    """Everything that can fail cheaply, before the first file is written: the splits, the encoder,
    the VAE and their fit with the data. Returns (sources, encoder, vae or None, settings, hash)."""
    if options.shard_size < 1 or options.batch_size < 1:
        raise PrepareError("shard_size and batch_size must be >= 1")
    sources = {split: open_split(cfg_data, split) for split in options.splits}
    for split, source in sources.items():
        if len(source) == 0:
            raise DatasetError(f"the {split} split of data.name={cfg_data.name} is empty")
        if int(source.labels.max()) >= cfg_data.num_classes:
            raise PrepareError(f"labels go up to {int(source.labels.max())} but data.num_classes="
                               f"{cfg_data.num_classes}; set data.num_classes to the class count")
    encoder = build_semantic_encoder(cfg_encoder, cfg_data.image_size,
                                     options.efficientnet_input_size)
    if cfg_encoder.pca_rank_max > encoder.info.channels:
        raise PrepareError(f"encoder.pca_rank_max={cfg_encoder.pca_rank_max} exceeds the encoder's "
                           f"{encoder.info.channels} channels ({encoder.info.encoder_id})")
    downsample = (2 ** (len(options.vae.block_out_channels) - 1) if cfg_vae.kind == "embedded"
                  and not cfg_vae.path else None)
    vae = None if downsample else load_vae(cfg_vae)
    downsample = downsample or vae.info.downsample
    if cfg_data.image_size % downsample:
        raise PrepareError(f"data.image_size={cfg_data.image_size} is not a multiple of the VAE's "
                           f"downsampling factor {downsample}")
    settings = _settings(cfg_data, cfg_vae, cfg_encoder, options, sources, encoder)
    return sources, encoder, vae, settings, sha256_json(settings)


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
    sources, encoder, _, _, settings_hash = _checked(cfg_data, cfg_vae, cfg_encoder, options)
    complete = (out / MANIFEST).is_file() and _up_to_date(out, settings_hash, options)
    plan = _plan(sources, options)
    same = complete or _same_settings(out, settings_hash)
    names = [f"{split}/{index}" for split, index, _ in plan]
    final = {f"{s}/{i}" for s, i, _ in plan if same and (out / shard_name(s, i)).is_file()}
    encoded = final | {f"{s}/{i}" for s, i, _ in plan if same and (out / _enc_name(s, i)).is_file()}
    return PrepareState(out, settings_hash, names, encoded, final, complete, sum(len(r) for *_, r in plan))


@dataclass
class _PrepareCall:
    """What the steps of one `run_prepare` call share: the configs, this task, the checked inputs."""

    cfg_data: DataConfig
    cfg_vae: VAEConfig
    cfg_encoder: EncoderConfig
    options: PrepareOptions
    out: Path
    task_index: int
    task_count: int
    sources: dict[str, ImageSource]
    encoder: SemanticEncoder
    vae: Optional[LatentVAE]
    settings_hash: str
    started: float
    device: torch.device = CPU


def run_prepare(cfg_data, cfg_vae, cfg_encoder, options: Optional[PrepareOptions] = None) -> Path:
    """Prepare `cfg_data` with the VAE and semantic encoder of the configs (bench.config's
    DataConfig, VAEConfig, EncoderConfig) into `cfg_data.prepared_dir`; returns that folder.

    Returns after this task's share when other array tasks still have work; the folder is complete
    when `manifest.json` exists. Read it with `bench.prepare.dataset.load_prepared`.
    """
    options = options or PrepareOptions()
    task_index, task_count = _task(options)
    out = Path(cfg_data.prepared_dir)
    started = time.time()
    sources, encoder, vae, settings, settings_hash = _checked(cfg_data, cfg_vae, cfg_encoder, options)
    if (out / MANIFEST).is_file() and _up_to_date(out, settings_hash, options):
        return out
    pca = _supplied_pca(encoder, options, out, settings_hash)  # validated before anything is written
    if pca is None and "train" not in sources:
        raise PrepareError("the PCA is fitted on the train split; include 'train' in splits or "
                           "pass pca_path (a PCA fitted earlier)")
    call = _PrepareCall(cfg_data, cfg_vae, cfg_encoder, options, out, task_index, task_count,
                        sources, encoder, vae, settings_hash, started)
    pca = _start_folder(call, settings, pca)
    lane_timings = {}
    if task_count == 1 and options.lanes > 1:
        lane_timings = _run_lanes(call)
        call.options = replace(options, lanes=1)
    call.vae = call.vae or load_vae(cfg_vae, embedded_dir=out / "vae")
    call.device = _device(call.options)
    call.vae, call.encoder = call.vae.to(call.device), encoder.to(call.device)

    plan = _plan(sources, call.options)
    pca_rows = pca_fit_selection(sum(len(r) for s, _, r in plan if s == "train"), cfg_encoder,
                                 call.options.seed) if pca is None else None
    mine, count, encode_seconds = _encode_share(call, plan, pca_rows)
    if pca is None:
        pca = _fitted_pca(call, plan, pca_rows)
    if pca is None:
        print("prepare: this task's shards are encoded; the PCA waits for the other tasks' "
              "train shards. Re-run prepare (any task) once they finish.", flush=True)
        return out
    _project_and_finish(call, plan, mine, pca, {"encode_seconds": encode_seconds,
                                                "encoded_images": count, **lane_timings})
    return out


def _start_folder(call: _PrepareCall, settings: dict, pca: Optional[PCAModel]) -> Optional[PCAModel]:
    """Claim the folder for these settings, clear a killed run's temporaries (a lone task only),
    store a supplied PCA or read one an earlier run fitted, and train the embedded VAE and the
    classifier if they are missing. Returns the PCA known so far (None: still to fit)."""
    out, info = call.out, call.encoder.info
    out.mkdir(parents=True, exist_ok=True)
    _claim_folder(out, call.settings_hash, settings, call.options)
    if call.task_count == 1:
        remove_stale_temporaries(out)
        for split in call.sources:
            remove_stale_temporaries(out / split)
    if pca is not None and not (out / "pca.safetensors").is_file():
        pca.save(out / "pca.safetensors")  # a supplied/imported PCA, converted once
    elif pca is None and (out / "pca.safetensors").is_file():  # fitted by an earlier (array) run
        pca = PCAModel.load(out / "pca.safetensors", info.encoder_id, info.channels)
    _ensure_embedded_assets(out, call.cfg_data, call.cfg_vae, call.sources, call.options, call.task_index)
    return pca


def _run_lanes(call: _PrepareCall) -> dict:
    """This machine's lanes: tasks 1..lanes-1 in spawned processes, task 0 here, one thread each;
    then the calling `run_prepare` finishes as the only task (fits the PCA if no task did, projects
    what is left, writes the manifest), exactly as after a SLURM array. Returns their timings."""
    # Shards are claimed, not dealt: with a fixed half each, one lane of a 2-vCPU EPYC encoded
    # at 99-102 images/s and the other at 133-135, and the faster one idled for 80-90 s.
    options, configs = call.options, (call.cfg_data, call.cfg_vae, call.cfg_encoder)
    lanes_started = time.time()
    claims = tempfile.mkdtemp(prefix="redi-bench-prepare-claims-")
    try:
        lane_options = replace(options, claims_dir=claims)
        lanes = [start_lane(_encode_lane, *configs, lane_options, i) for i in range(1, options.lanes)]
        with _threads(1):
            _encode_lane(*configs, lane_options, 0)
        for lane in lanes:
            lane.result()
    finally:
        shutil.rmtree(claims, ignore_errors=True)
    return {"lanes": options.lanes, "lanes_seconds": time.time() - lanes_started}


def _encode_share(call: _PrepareCall, plan, pca_rows: Optional[torch.Tensor]) -> tuple[list, int, float]:
    """Pass 1 over this task's shards not encoded yet. Returns the shards this call projects (its
    share; a lane: the shards it claimed), the images encoded and the seconds that took."""
    options, out = call.options, call.out
    claims = options.claims_dir
    if options.shards:  # the launcher's list for this array task
        mine = [item for item in plan if f"{item[0]}/{item[1]}" in set(options.shards)]
    else:
        mine = plan if claims else [item for position, item in enumerate(plan)
                                    if position % call.task_count == call.task_index]
    todo = [(s, i, r) for s, i, r in mine if not (out / shard_name(s, i)).is_file()
            and not (out / _enc_name(s, i)).is_file()]
    encode_start = time.time()
    count, claimed = 0, []
    # A bar on a terminal; in a batch job's log, a plain line every REDI_BENCH_PROGRESS_EVERY seconds.
    with Progress(f"prepare task {call.task_index}/{call.task_count}: images",
                  sum(len(r) for _, _, r in todo) // (options.lanes if claims else 1),
                  enabled=options.progress) as bar:
        for split, index, indices in todo:
            if claims and not _claim(claims, split, index):
                continue  # another lane has it
            count += len(indices)
            claimed.append((split, index, indices))
            tensors = _encode_shard(call.vae, call.encoder, call.sources[split], indices,
                                    options.batch_size, fit_pca=(split == "train"), bar=bar,
                                    device=call.device, pca_rows=pca_rows)
            atomic_save_safetensors(out / _enc_name(split, index), tensors,
                                    metadata={"format": FORMAT_VERSION, "pass": "1"})
            crash_point(f"prepare:encoded:{split}/{index}")
    encode_seconds = time.time() - encode_start
    if count:
        print(f"prepare: encoded {count} images in {encode_seconds:.1f}s "
              f"({count / max(encode_seconds, 1e-9):.1f} images/s)", flush=True)
    # A lane projects what it encoded; the call that started the lanes, the rest.
    return (claimed if claims else mine), count, encode_seconds


def _fitted_pca(call: _PrepareCall, plan, pca_rows: Optional[torch.Tensor]) -> Optional[PCAModel]:
    """The PCA another task fitted meanwhile, else one fitted here; None while train sums are missing."""
    info = call.encoder.info
    if (call.out / "pca.safetensors").is_file():
        return PCAModel.load(call.out / "pca.safetensors", info.encoder_id, info.channels)
    return _fit_pca(call.out, plan, call.encoder, pca_rows)


def _project_and_finish(call: _PrepareCall, plan, mine: list, pca: PCAModel, timings: dict) -> None:
    """Pass 2 over `mine`; then, once every shard of the plan is final, the manifest."""
    out, cfg_encoder = call.out, call.cfg_encoder
    for split, index, _ in mine:
        if not (out / shard_name(split, index)).is_file():
            _project_shard(out, split, index, pca, cfg_encoder.pca_rank_max,
                           cfg_encoder.store_features)
        else:  # killed between writing the final shard and removing its pass-1 file
            (out / _enc_name(split, index)).unlink(missing_ok=True)
    if all((out / shard_name(s, i)).is_file() for s, i, _ in plan):
        write_manifest(out, call.settings_hash, call.cfg_data, cfg_encoder, call.vae.info,
                       call.encoder.info, pca, plan, classifier_info(out / "classifier"),
                       {"last_task_seconds": time.time() - call.started, **timings})
        print(f"prepare: finished {out} ({len(plan)} shards)", flush=True)
    else:
        print("prepare: this task is done; other tasks' shards are still missing", flush=True)


def prepare_embedded(prepared_dir: str | Path = "results/prepared", data_name: str = "fashion_mnist",
                     options: Optional[PrepareOptions] = None, pca_rank_max: int = 16,
                     data_root: Optional[str] = None) -> Path:
    """The embedded default: Fashion-MNIST 32x32 (or digits for tests), the tiny AutoencoderKL and
    the evaluation classifier trained here, EfficientNet-Lite0 block-7 features PCA'd to r_max."""

    options = options or PrepareOptions()
    cfg_data = DataConfig(name=data_name, root=data_root, image_size=32, num_classes=10,
                          prepared_dir=str(prepared_dir))
    cfg_encoder = EncoderConfig(kind="efficientnet_lite0", pca_rank_max=pca_rank_max)
    return run_prepare(cfg_data, VAEConfig(kind="embedded"), cfg_encoder, options)


def _parse_max_images(values: list[str]) -> dict:
    limits = {}
    for value in values:
        split, _, count = value.partition("=")
        if not count.isdigit():
            raise PrepareError(f"--max-images {value!r}: write SPLIT=N, e.g. --max-images train=20000")
        limits[split] = int(count)
    return limits


def build_parser():
    """The arguments of `bench prepare` (the launcher adds --cluster/--local/--debug to them)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="bench prepare",
        description="Images -> VAE latent moments and PCA-reduced semantic features, as shards in "
                    "data.prepared_dir. Resumable. On a cluster: --cluster PROFILE submits the encoding "
                    "as a job array and the PCA fit as a job that waits for it, and returns at once.",
        epilog="Examples:\n  bench prepare                                  # the embedded default "
               "(Fashion-MNIST)\n  bench prepare scale=paper data.root=/data/imagenet "
               "vae.path=/models/sd-vae-ft-ema encoder.weights=/models/dinov2_vitb14_reg4_pretrain.pth"
               "\n  bench prepare scale=paper --cluster mycluster --tasks 64   # then: bench status --prepare "
               "scale=paper\n  (data.root holds train/<class>/ and val/<class>/; scale=paper is ImageNet 256 "
               "with SD-VAE and DINOv2-B/14-reg)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides (data.*, vae.*, encoder.*)")
    defaults = PrepareOptions()
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--task-index", type=int, help="array task (default: $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--task-count", type=int, help="array size (default: $SLURM_ARRAY_TASK_COUNT)")
    parser.add_argument("--splits", default=",".join(defaults.splits), help="comma-separated")
    parser.add_argument("--max-images", action="append", default=[], metavar="SPLIT=N",
                        help="keep the first N images of a split")
    parser.add_argument("--pca", dest="pca_path", help="use this PCA (.safetensors) instead of fitting")
    parser.add_argument("--official-pca", help="import ReDi's pcs/dino_pca_model.pth (a pickle)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow unpickling --official-pca (only for a file you trust)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a prepared folder that holds other settings")
    parser.add_argument("--verify", action="store_true",
                        help="check every prepared file's sha256 against the manifest and rebuild "
                             "damaged ones (sizes are always checked)")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-classifier", action="store_true",
                        help="do not train the evaluation classifier (fashion_mnist, digits)")
    return parser


def options_from_args(args) -> PrepareOptions:
    """PrepareOptions from `build_parser()`'s parsed arguments."""
    return PrepareOptions(
        shard_size=args.shard_size, batch_size=args.batch_size, task_index=args.task_index,
        task_count=args.task_count, splits=tuple(s for s in args.splits.split(",") if s),
        max_images=_parse_max_images(args.max_images), pca_path=args.pca_path,
        official_pca=args.official_pca, trust_pickle=args.trust_pickle, overwrite=args.overwrite,
        verify=args.verify,
        device=args.device, seed=args.seed, progress=not args.no_progress,
        train_classifier=not args.no_classifier)


def main(argv=None) -> int:
    """`bench prepare [key=value ...] [options]`: the data/vae/encoder groups of the experiment
    config say what to prepare (the same overrides as `bench train`), the options how."""
    import sys

    args = build_parser().parse_intermixed_args(  # overrides may follow options
        list(sys.argv[1:] if argv is None else argv))
    cfg = load_config(args.overrides)
    with guard(cfg.data.prepared_dir):  # a removed folder is one error (bench.storage), not re-created
        out = run_prepare(cfg.data, cfg.vae, cfg.encoder, options_from_args(args))  # errors: one line (bench.cli)
    print(f"prepare: output in {out}", flush=True)
    return 0
