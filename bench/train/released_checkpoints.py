"""Released SiT-ReDi checkpoints read from disk (the file side of models/official_checkpoint.py, which only maps
tensors): `.pt`/`.pth` through `torch.load(weights_only=True)` with the one class the official files
need allow-listed, or `.safetensors`; and `import_official_run`, which turns one into a run folder
(`bench import-official`, bench/launch/import_official.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.atomic import atomic_write_json, atomic_write_text, sha256_file
from bench.compose import dumps
from bench.prepare.dataset import PreparedDataError, read_manifest
from bench.prepare.pca import PCAError, PCAModel, import_official_pca
from bench.run_hash import run_hash
from bench.train import checkpoint as ckpt_io
from bench.train.build import backbone_settings
from models.backbone import MODEL_SIZES, BackboneConfig, JointDiT
from models.official_checkpoint import (
    config_from_official_state_dict,
    extract_official_weights,
    import_official_state_dict,
)


def load_official_checkpoint(path: str | Path, *, use_ema: bool = True, latent_channels: int = 4,
                             **config_kwargs) -> tuple[BackboneConfig, JointDiT]:
    """Read an official checkpoint file and return (config, JointDiT in eval mode) computing what the
    official model computes. `config_kwargs` go to `config_from_official_state_dict` (num_heads, ...).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        obj = load_file(str(path))
    else:
        # the official files carry an argparse.Namespace under "args": allow only that class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = extract_official_weights(obj, use_ema=use_ema)
    config = config_from_official_state_dict(sd, latent_channels, **config_kwargs)
    model = JointDiT(config)
    model.load_state_dict(import_official_state_dict(sd, config))
    return config, model.eval()


# ------------------------------------------------------------------------------------------------
# A released checkpoint as a run folder (`bench import-official`)

IMPORT_FILE = "imported.json"


class OfficialImportError(ValueError):
    """A released checkpoint cannot become a run folder; the message says what to change."""


def read_official_file(path: str | Path) -> dict:
    """The object inside an official checkpoint file, read without unpickling arbitrary classes."""
    path = Path(path)
    if not path.is_file():
        raise OfficialImportError(f"official checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        raise OfficialImportError(f"{path} is not a checkpoint torch can read with weights_only=True "
                           f"({type(err).__name__}: {str(err)[:200]})") from None


def official_overrides(sd: dict[str, torch.Tensor], latent_channels: int = 4,
                       num_heads: int | None = None) -> list[str]:
    """The config overrides describing the network in an official state dict: size (a registry name
    when hidden size, depth and heads are one, else `custom`), r, fusion, learn_sigma and the spec."""

    shape = config_from_official_state_dict(sd, latent_channels, num_heads=num_heads or 1)
    registry = next((name for name, s in MODEL_SIZES.items()
                     if (s["hidden_size"], s["depth"]) == (shape.hidden_size, shape.depth)
                     and num_heads in (None, s["num_heads"])), None)
    if registry is None and num_heads is None:
        raise OfficialImportError(f"the checkpoint's width {shape.hidden_size} and depth {shape.depth} are "
                           "not a registry size (Table 7); pass --num-heads")
    size = ([f"model.size={registry}/{shape.patch_size}"] if registry else
            ["model.size=custom", f"model.hidden_size={shape.hidden_size}", f"model.depth={shape.depth}",
             f"model.num_heads={num_heads}", f"model.patch_size={shape.patch_size}"])
    semantic, repa = shape.semantic_channels, shape.projector_dim > 0
    spec = ("redi_repa" if repa else "redi") if semantic else ("repa" if repa else "latent_only")
    rank = [f"model.pca_rank={semantic}", f"encoder.pca_rank_max={max(semantic, 8)}"] if semantic else []
    return [f"spec={spec}", *size, *rank, f"model.learn_sigma={str(shape.learn_sigma).lower()}"]


def _jsonable(value):
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def import_official_run(ckpt: str | Path, cfg, run_dir: Path, step: int, *,
                        pca: str | Path | None = None, trust_pickle: bool = False,
                        obj: dict | None = None) -> Path:
    """Write `run_dir` (config.json, checkpoints/<step>/, imported.json, DONE) from a released
    checkpoint, so `bench sample/eval/report` use it like a trained run.

    The network is the one `cfg` describes on its prepared data (whose VAE decodes the samples); the
    checkpoint must match it key for key and shape for shape. Raw weights are the file's "model"
    (its "ema" when the file has only one set), EMA weights its "ema". The official code trains in
    fp32 with TF32, so the checkpoint records precision fp32. `pca` (ReDi's dino_pca_model.pth, a
    pickle: needs `trust_pickle`) is converted, stored beside it and compared with the prepared PCA.
    """

    ckpt, run_dir = Path(ckpt), Path(run_dir)
    try:
        manifest = read_manifest(cfg.data.prepared_dir)
    except PreparedDataError as err:
        raise OfficialImportError(f"{err}. The prepared folder supplies the VAE that decodes the samples; "
                           "prepare one with `bench prepare scale=paper ... --official-pca PCA "
                           "--trust-pickle` or pass data.prepared_dir=") from None
    obj = read_official_file(ckpt) if obj is None else obj
    try:
        ema_sd = extract_official_weights(obj, use_ema=True)
        raw_sd = extract_official_weights(obj, use_ema=False)
        config = backbone_settings(cfg, manifest)
        ema_state, raw_state = (import_official_state_dict(sd, config) for sd in (ema_sd, raw_sd))
    except ValueError as err:
        raise OfficialImportError(f"{ckpt} does not fit the run's config: {err} (model.size, "
                           "model.pca_rank, model.learn_sigma, data.num_classes, objective.lambda_repa)") from None
    ema, model = JointDiT(config), JointDiT(config)
    ema.load_state_dict(ema_state)
    model.load_state_dict(raw_state)
    imported = {"source": str(ckpt), "source_sha256": sha256_file(ckpt), "step": int(step),
                "sets": sorted(k for k in ("model", "ema") if isinstance(obj.get(k), dict)),
                "args": _jsonable(obj.get("args")), "precision": "fp32",
                "note": "released checkpoint, trained by the official code (fp32 with TF32)"}
    official_pca = None
    if pca is not None:
        official_pca, imported["pca"] = _import_pca(pca, trust_pickle, manifest, cfg)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise OfficialImportError(f"{run_dir} already exists and is not empty; remove it or import "
                           "elsewhere (--out)")
    run_dir.mkdir(parents=True, exist_ok=True)
    if official_pca is not None:
        official_pca.save(run_dir / "official_pca.safetensors")
    atomic_write_text(run_dir / "config.json", dumps(cfg) + "\n")
    state = {"run_hash": run_hash(cfg), "prepared": manifest.get("settings_hash"), "precision": "fp32",
             "world_size": None, "imported": True}
    optimizer = torch.optim.AdamW(model.parameters())  # no state: the file's optimizer is not kept
    ckpt_io.save_checkpoint(run_dir, int(step), model=model, ema=ema, optimizer=optimizer, rng={},
                            state=state)
    atomic_write_json(run_dir / IMPORT_FILE, imported)
    if int(step) == cfg.train.max_steps:
        atomic_write_text(run_dir / "DONE", "")
    return run_dir


def _import_pca(path, trust_pickle: bool, manifest: dict, cfg):
    """The official PCA, converted, and whether the prepared data's PCA is the same one (the first
    r components up to sign, and the standardisation mean): if not, the run's semantic channels
    are not the ones the checkpoint was trained on (sampling, which discards them, is unaffected)."""

    try:
        official = import_official_pca(path, manifest["encoder"]["encoder_id"], trust_pickle)
    except PCAError as err:
        raise OfficialImportError(str(err)) from None
    prepared = Path(cfg.data.prepared_dir) / (manifest.get("pca") or {}).get("file", "pca.safetensors")
    same = None
    if prepared.is_file():
        mine, r = PCAModel.load(prepared), cfg.model.pca_rank
        same = bool(mine.components.shape == official.components.shape
                    and torch.allclose(mine.components[:r].abs(), official.components[:r].abs(), atol=1e-6)
                    and torch.allclose(mine.mean, official.mean, atol=1e-6))
    return official, {"source": str(path), "file": "official_pca.safetensors",
                      "prepared_pca_matches": same}
