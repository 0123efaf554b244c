"""The training data: the prepared train split, checked against the config, and how global batch
`step` becomes the model's inputs on every rank (`TrainingData.batch`).

The order: global batch `step` is positions [step*B, (step+1)*B) of an endless stream of per-epoch
permutations seeded by (train.seed, epoch) (`GlobalBatchSampler`), so the position is a function of
the step and a resume continues the exact order. Every rank assembles the whole global batch (the
latent moments, PCA coordinates and labels are a few MB) and draws its VAE posterior noise; only the
REPA targets are this rank's rows (docs/runs.md, "Training: resume, ranks and paired seeds").
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from bench.config import ConfigError, ExperimentConfig
from bench.prepare.dataset import (
    FeatureRows,
    Manifest,
    PreparedDataError,
    check_same_images,
    load_prepared,
    read_manifest,
)
from bench.prepare.encoders import build_semantic_encoder, sample_latents
from bench.prepare.sources import open_split
from bench.run_hash import derive_seed
from bench.train.step import repa_tokens


class GlobalBatchSampler:
    """Global batch `step` = positions [step*B, (step+1)*B) of the concatenated per-epoch permutations."""

    def __init__(self, num_items: int, batch_size: int, seed: int) -> None:
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.num_items, generator=generator)
        return self._perms[epoch]

    def position(self, step: int) -> dict:
        """The stream position before global batch `step` (saved in checkpoints)."""
        seen = step * self.batch_size
        return {"samples_seen": seen, "epoch": seen // self.num_items, "offset": seen % self.num_items}

    def indices(self, step: int) -> torch.Tensor:
        positions = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, offsets = positions // self.num_items, positions % self.num_items
        out = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self.permutation(epoch)[offsets[mask]]
        return out


def _encoder_matches(kind: str, variant: str, encoder_id: str) -> bool:
    if kind == "dinov2":
        return encoder_id.startswith(f"dinov2_{variant}_") and encoder_id.endswith("px") and \
            encoder_id[len(f"dinov2_{variant}_"):-2].isdigit()
    return encoder_id.startswith(f"{kind}_")


def check_prepared(cfg: ExperimentConfig, manifest: Manifest, prepared_dir: str,
                   align: Optional[Manifest] = None) -> None:
    """ConfigError when the prepared shards do not fit the config (nothing has been written yet).
    `align`: the manifest of data.align_prepared_dir (read it with `read_align_manifest`)."""
    where = f"data.prepared_dir={prepared_dir}"
    encoder_id = manifest["encoder"]["encoder_id"]
    if not _encoder_matches(cfg.encoder.kind, cfg.encoder.variant, encoder_id):
        wanted = cfg.encoder.kind + (f" {cfg.encoder.variant}" if cfg.encoder.kind == "dinov2" else "")
        raise ConfigError(f"{where}: shards from another encoder ({encoder_id!r}) but encoder.kind/"
                          f"variant ask for {wanted}; point data.prepared_dir at shards of this encoder "
                          "or re-run `bench prepare`")
    for key in ("name", "image_size", "num_classes"):
        if manifest["data"][key] != getattr(cfg.data, key):
            raise ConfigError(f"{where}: shards were prepared with data.{key}={manifest['data'][key]!r}, "
                              f"the config says {getattr(cfg.data, key)!r}")
    if manifest["vae"]["kind"] != cfg.vae.kind:
        raise ConfigError(f"{where}: shards were encoded by a {manifest['vae']['kind']!r} VAE, the config "
                          f"says vae.kind={cfg.vae.kind!r}")
    if cfg.vae.kind == "diffusers" and not math.isclose(manifest["scaling_factor"], cfg.vae.scaling_factor):
        raise ConfigError(f"{where}: shards record vae.scaling_factor={manifest['scaling_factor']}, the "
                          f"config says {cfg.vae.scaling_factor}")
    if cfg.semantic_channels:
        try:
            manifest.check_rank(cfg.semantic_channels)
        except PreparedDataError as err:
            raise ConfigError(str(err)) from None
    if align is not None:
        check_align_prepared(cfg, manifest, align)
    elif cfg.objective.lambda_repa > 0 and not cfg.encoder.online_features and not manifest["store_features"]:
        raise ConfigError(f"objective.lambda_repa > 0 needs the raw encoder features, but {prepared_dir} "
                          "was prepared with encoder.store_features=false; re-run prepare with "
                          "encoder.store_features=true or set encoder.online_features=true")


def read_align_manifest(cfg: ExperimentConfig) -> Optional[Manifest]:
    """The manifest of data.align_prepared_dir, or None when the REPA target comes from
    data.prepared_dir (or the encoder online)."""
    return read_manifest(cfg.data.align_prepared_dir) if cfg.data.align_prepared_dir else None


def check_align_prepared(cfg: ExperimentConfig, manifest: Manifest, align: Manifest) -> None:
    """ConfigError unless data.align_prepared_dir holds objective.align_encoder's raw features of
    the same images, in the same row order, as data.prepared_dir: row i of its features is then the
    REPA target of row i of the latents."""
    where, name = f"data.align_prepared_dir={cfg.data.align_prepared_dir}", cfg.objective.align_encoder
    kind, variant = ("dinov2", name.removeprefix("dinov2_")) if name.startswith("dinov2_") else (name, "")
    encoder_id = align["encoder"]["encoder_id"]
    if not _encoder_matches(kind, variant, encoder_id):
        raise ConfigError(f"{where}: its shards come from encoder {encoder_id!r}, but "
                          f"objective.align_encoder={name}; set objective.align_encoder to that folder's "
                          "encoder or point data.align_prepared_dir at shards of this one")
    if not align["store_features"]:
        raise ConfigError(f"{where} was prepared with encoder.store_features=false: it holds no raw "
                          "features to align to; prepare it again with encoder.store_features=true")
    try:
        check_same_images(manifest, align)
    except PreparedDataError as err:
        raise ConfigError(f"{where}: {err}") from None


class TrainingData:
    """The train split of the prepared folder and how one global batch becomes model inputs.

    The REPA target is the stored raw encoder features (default), those stored in a second prepared
    folder of the same images (data.align_prepared_dir: another encoder, e.g. DINOv2-B/14 without
    registers as REPA published, while the PCA channels keep theirs; rank r reads its own rows of
    it) or, with encoder.online_features, the encoder run on this rank's images each step (the
    official code's way; the images are read again from data.name through the shards' `indices`).
    """

    def __init__(self, cfg: ExperimentConfig, manifest: dict, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.use_features = cfg.objective.lambda_repa > 0
        self.online = self.use_features and cfg.encoder.online_features
        self.aligned = (FeatureRows(cfg.data.align_prepared_dir, "train")
                        if self.use_features and cfg.data.align_prepared_dir else None)
        self.dataset = load_prepared(cfg.data.prepared_dir, "train", max(cfg.semantic_channels, 1),
                                     whiten=cfg.model.whiten,
                                     with_features=self.use_features and not self.online and self.aligned is None)
        self.scaling_factor = float(manifest["scaling_factor"])
        self.sampler = GlobalBatchSampler(len(self.dataset), cfg.train.batch_size, cfg.train.seed)
        if self.online:
            self._open_encoder(manifest)

    def _open_encoder(self, manifest: dict) -> None:
        from safetensors import safe_open


        self.encoder = build_semantic_encoder(self.cfg.encoder, self.cfg.data.image_size,
                                              int(manifest["encoder"]["input_size"])).to(self.device)
        if self.encoder.info.encoder_id != manifest["encoder"]["encoder_id"]:
            raise ConfigError(f"encoder.online_features: the encoder is {self.encoder.info.encoder_id!r} but "
                              f"the shards were prepared with {manifest['encoder']['encoder_id']!r}")
        self.images = open_split(self.cfg.data, "train")
        parts = []
        for shard in self.dataset.shards:  # dataset row -> image index in the split
            with safe_open(str(shard), framework="pt") as handle:
                parts.append(handle.get_tensor("indices").clone())
        self.image_index = torch.cat(parts)

    def alignment_source(self) -> dict:
        """The provenance of the REPA targets read from data.align_prepared_dir (checkpoint state)."""
        manifest = self.aligned.manifest
        return {"encoder_id": manifest["encoder"]["encoder_id"], "prepared": manifest.get("settings_hash")}

    def _rows(self, indices: torch.Tensor, local: slice) -> dict[str, torch.Tensor]:
        ds, stored = self.dataset, self.use_features and not self.online and self.aligned is None
        if ds.in_memory:
            out = {"moments": ds.moments[indices], "semantic": ds.semantic[indices], "label": ds.labels[indices]}
            if stored:
                out["features"] = ds.features[indices[local]]
        else:  # larger-than-memory splits: item by item from the memory-mapped shards
            items = [ds[int(i)] for i in indices]
            out = {key: torch.stack([item[key] for item in items]) for key in ("moments", "semantic", "label")}
            if stored:
                out["features"] = torch.stack([item["features"] for item in items[local]])
        if self.aligned is not None:
            out["features"] = self.aligned.rows(indices[local])
        if self.online:
            images = self.images.images(self.image_index[indices[local]].tolist())
            out["features"] = self.encoder.encode(images.to(self.device))  # (B_local, D, gh, gw)
        return out

    def batch(self, step: int, generator: torch.Generator, local: slice, token_grid: int):
        """(x, z, y, align_target) of global batch `step`; align_target has zeros outside `local`."""

        rows = self._rows(self.sampler.indices(step), local)
        moments = rows["moments"].to(self.device, torch.float32)
        x = sample_latents(moments, self.scaling_factor, generator)  # (B, C_x, h, w), official sample_posterior
        z = rows["semantic"].to(self.device, torch.float32) if self.cfg.semantic_channels else None
        y = rows["label"].to(self.device, torch.long)
        if not self.cfg.model.conditional:
            y = torch.zeros_like(y)
        target = None
        if self.use_features:
            feats = repa_tokens(rows["features"].to(self.device), token_grid)  # (B_local, L, D)
            target = feats.new_zeros((x.shape[0], *feats.shape[1:]))
            target[local] = feats
        return x, z, y, target
