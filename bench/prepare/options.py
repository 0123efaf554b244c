"""What one `bench prepare` is asked to do: `PrepareOptions`, the command line that fills them, the
checks made before the first file is written, and the settings whose hash names the result.

The content hash (`content_settings`) covers exactly what changes the prepared tensors; options that
only say how the work is done (batch size, array task, lanes, progress) are outside it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from bench.atomic import sha256_file, sha256_json
from bench.precision import resolve_precision
from bench.prepare.dataset import FORMAT_VERSION
from bench.prepare.embedded import ClassifierSettings, EmbeddedVAESettings
from bench.prepare.encoders import SemanticEncoder, build_semantic_encoder, load_vae
from bench.prepare.sources import DatasetError, ImageSource, open_split

CLASSIFIER_DATASETS = ("fashion_mnist", "digits")


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
    """Replace a prepared folder that holds other settings (otherwise that is an error)."""
    verify: bool = False
    """Check every prepared file against the manifest's sha256 (not only its size) and rebuild the
    damaged ones."""
    progress: bool = True
    lanes: int = 1
    """Processes at once on this machine, one compute thread each (the local profile's lanes): the
    VAE and the classifier train side by side, then the shards are dealt to `lanes` local tasks.
    Ignored inside a SLURM array (task_count > 1), where the scheduler runs the tasks."""
    device: str = "auto"
    """auto = cuda when available, else cpu (the embedded default runs on CPU)."""


def resolve_device(options: PrepareOptions) -> torch.device:
    """The device prepare encodes on: options.device, with auto = cuda when available, else cpu."""
    if options.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(options.device)


def encoder_dtype(cfg_encoder, options: PrepareOptions) -> Optional[torch.dtype]:
    """The autocast dtype prepare runs the semantic encoder in (None = fp32): encoder.precision on
    the device prepare encodes on (auto: bench.precision.auto_is_bf16)."""
    return resolve_precision(cfg_encoder.precision, resolve_device(options), key="encoder.precision")


def array_task(options: PrepareOptions) -> tuple[int, int]:
    """(index, count) of this array task: from the options, else from SLURM's variables, else (0, 1)."""
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


def content_settings(cfg_data, cfg_vae, cfg_encoder, options: PrepareOptions,
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
                    "store_features": cfg_encoder.store_features,
                    # only bf16 is named, so fp32 folders keep the hash they always had
                    **({"precision": "bf16"} if encoder_dtype(cfg_encoder, options) is not None else {})},
        "pca": {"path_sha256": _weights_fingerprint(options.pca_path and
                                                    str(Path(options.pca_path).with_suffix(
                                                        ".safetensors"))),
                "official_sha256": _weights_fingerprint(options.official_pca),
                **({"fit_images": cfg_encoder.pca_fit_images, "fit_subset": cfg_encoder.pca_fit_subset,
                    "fit_seed": options.seed} if cfg_encoder.pca_fit_images is not None else {})},
        "shard_size": options.shard_size,
        "classifier": (asdict(classifier_settings(cfg_data, options)) | {"seed": options.seed}
                       if wants_classifier(cfg_data, options) else None),
    }


def classifier_settings(cfg_data, options: PrepareOptions) -> ClassifierSettings:
    """The classifier settings in effect: on Fashion-MNIST it must reach 90% (docs/embedded.md)."""
    settings = options.classifier
    if cfg_data.name == "fashion_mnist" and settings.min_test_accuracy == 0.0:
        settings = replace(settings, min_test_accuracy=0.9)
    return settings


def wants_classifier(cfg_data, options: PrepareOptions) -> bool:
    """Whether this prepare trains the evaluation classifier (Fashion-MNIST and digits only)."""
    return options.train_classifier and cfg_data.name in CLASSIFIER_DATASETS


def check_inputs(cfg_data, cfg_vae, cfg_encoder, options: PrepareOptions):
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
    settings = content_settings(cfg_data, cfg_vae, cfg_encoder, options, sources, encoder)
    return sources, encoder, vae, settings, sha256_json(settings)


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
