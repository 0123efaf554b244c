"""Shared fixtures of the training tests: a tiny prepared folder and tiny configs.

Running `bench prepare` (VAE and classifier training, EfficientNet features) takes minutes, so the
fixture writes the prepared format of `bench.prepare.dataset` directly: random moments / PCA coordinates /
float16 features in real shards with a valid manifest, through the same atomic safetensors writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch

from bench.atomic import atomic_save_safetensors, atomic_write_json
from bench.compose import load_config
from bench.config import ExperimentConfig
from bench.prepare.dataset import FORMAT_VERSION, MANIFEST, shard_name

LATENT_CHANNELS, GRID, R_MAX, FEATURE_DIM = 4, 8, 4, 16
EFFICIENTNET_ID = "efficientnet_lite0_block7_128px"
SPECS = ["latent_only", "redi", "redi_rg", "redi_repa", "repa"]


def write_prepared(root: Path, *, train_count: int = 48, shard_size: int = 20, seed: int = 0,
                   encoder_id: str = EFFICIENTNET_ID, store_features: bool = True,
                   image_indices: Optional[torch.Tensor] = None, features: Optional[torch.Tensor] = None) -> Path:
    """A prepared folder in `bench.prepare.dataset`'s format (train split only) with random tensors.

    `image_indices` (N,) and `features` (N, D, GRID, GRID) replace the defaults (arange, random D=16).
    """
    generator = torch.Generator().manual_seed(seed)
    if image_indices is None:
        image_indices = torch.arange(train_count)
    if features is None:
        features = torch.randn(train_count, FEATURE_DIM, GRID, GRID, generator=generator)
    splits = {"train": {"shards": [], "counts": [], "count": train_count}}
    for index, begin in enumerate(range(0, train_count, shard_size)):
        n = min(shard_size, train_count - begin)
        tensors = {
            # [mean, std] along channels; std > 0 like a VAE posterior
            "moments": torch.cat([torch.randn(n, LATENT_CHANNELS, GRID, GRID, generator=generator),
                                  0.1 + 0.1 * torch.rand(n, LATENT_CHANNELS, GRID, GRID, generator=generator)], 1),
            "semantic": torch.randn(n, R_MAX, GRID, GRID, generator=generator),
            "labels": torch.randint(0, 10, (n,), generator=generator),
            "indices": image_indices[begin: begin + n].clone(),
        }
        if store_features:
            tensors["features"] = features[begin: begin + n].half()
        atomic_save_safetensors(root / shard_name("train", index), tensors, metadata={"format": FORMAT_VERSION})
        splits["train"]["shards"].append(shard_name("train", index))
        splits["train"]["counts"].append(n)
    manifest = {
        "format": FORMAT_VERSION, "settings_hash": f"test-{seed}",
        "data": {"name": "digits", "image_size": 32, "num_classes": 10},
        "vae": {"kind": "embedded", "path": "vae", "latent_channels": LATENT_CHANNELS, "downsample": 4,
                "scaling_factor": 0.5},
        "scaling_factor": 0.5, "latent_channels": LATENT_CHANNELS, "latent_grid": [GRID, GRID],
        "encoder": {"encoder_id": encoder_id, "grid": [GRID, GRID], "channels": int(features.shape[1]),
                    "input_size": 128, "preprocessing": "test", "description": "random test features"},
        "semantic_grid": [GRID, GRID], "r_max": R_MAX, "store_features": store_features,
        "pca": {"eigenvalues": [4.0, 2.0, 1.0, 0.5][:R_MAX]},
        "splits": splits, "classifier": None, "timings": {},
    }
    atomic_write_json(root / MANIFEST, manifest)
    return root


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("prepared"))


def tiny_config(prepared: Path, output_root: Path, *overrides: str, spec: str = "redi") -> ExperimentConfig:
    """A tiny CPU run of `spec` on the fixture data: hidden 32, depth 2, batch 8, 4 steps."""
    return load_config(tiny_overrides(prepared, output_root, *overrides, spec=spec))


def tiny_overrides(prepared: Path, output_root: Path, *overrides: str, spec: str = "redi") -> list[str]:
    """The command-line overrides of `tiny_config`."""
    return [
        f"spec={spec}", f"data.prepared_dir={prepared}", "data.name=digits", f"output_root={output_root}",
        "model.size=custom", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=1",
        f"model.pca_rank={R_MAX}", f"encoder.pca_rank_max={R_MAX}", "objective.align_layer=1",
        "objective.projector_hidden=32", "optim.lr=1e-3", "train.batch_size=8", "train.max_steps=4",
        "train.ckpt_every=2", "train.log_every=1", "train.ema_decay=0.9",
        # fp32 and eager on every CPU: scale=embedded's `auto` would pick bf16 only where it is native,
        # and compile runs of 500 steps or more; the bit-exact comparisons must not depend on the
        # machine or the run's length. Tests of bf16 and of torch.compile ask for them.
        "train.precision=fp32", "eval.precision=fp32", "train.compile=false", *overrides,
    ]


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's weights (model.* and ema.*), copied out of the file mapping."""
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(path / "weights.safetensors")).items()}



@pytest.fixture(autouse=True)
def one_thread():
    """Bit-exact comparisons need the same kernels as the single-threaded subprocesses; a module
    that imports this fixture runs every test on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def add_embedded_eval_assets(prepared: Path, classifier_epochs: float = 3.0) -> Path:
    """The embedded VAE (one step on random images) and the evaluation classifier (a few epochs on
    320 digits, enough for features that vary), trained by bench.prepare.embedded and recorded in the
    manifest the way `bench prepare` records them. Returns `prepared`."""
    import json

    from bench.atomic import atomic_write_json
    from bench.prepare.embedded import ClassifierSettings, EmbeddedVAESettings, train_classifier, train_embedded_vae
    from bench.prepare.sources import digits

    images = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    vae = train_embedded_vae(images, EmbeddedVAESettings(block_out_channels=(8, 8, 8), steps=1, batch_size=4,
                                                         scale_images=8), 0, prepared / "vae", progress=False)
    train_split, test_split = digits("train", 32), digits("test", 32)
    classifier = train_classifier(
        train_split.images(range(320)), train_split.labels[:320], test_split.images(range(64)),
        test_split.labels[:64], 10, ClassifierSettings(width=8, feature_dim=8, epochs=classifier_epochs,
                                                       batch_size=32, lr=1e-2),
        0, prepared / "classifier", progress=False)
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["scaling_factor"] = manifest["vae"]["scaling_factor"] = vae["scaling_factor"]
    manifest["classifier"] = {"path": "classifier", "test_accuracy": classifier["test_accuracy"]}
    atomic_write_json(prepared / "manifest.json", manifest)
    return prepared
