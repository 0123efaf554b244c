"""ExperimentConfig + prepared manifest -> the network (`JointDiT`) and the objective (flow or DDPM).

The manifest written by `bench prepare` (bench/prepare/dataset.py) fixes what the config cannot know: the
latent channels and grid of the VAE, and the encoder's feature dimension (the REPA projector's
output). Everything else comes from the config:

- size: a registry name ("XL/2", "B/2", ...) or `custom` with hidden_size/depth/num_heads/patch_size;
- semantic_channels = cfg.semantic_channels (0 for fusion none, else model.pca_rank);
- num_classes = cfg.num_model_classes (1 for unconditional models);
- learn_sigma: taken from cfg.model.learn_sigma for both transports. DDPM supports both (learned
  range with the hybrid loss, DiT's default, or DiT's fixed large variance); the flow transport
  reads only the prediction half, so learn_sigma there just costs an unused head (as the official
  SiT/ReDi code, whose train script sets it False);
- projector_dim = encoder feature dim when objective.lambda_repa > 0, else no projector: the
  dimension of the alignment encoder's manifest when the targets come from a second prepared
  folder (data.align_prepared_dir), else of the prepared data's encoder.
"""

from __future__ import annotations

from typing import Optional, Union

from bench.config import ConfigError, ExperimentConfig
from models.backbone import BackboneConfig, JointDiT, backbone_config
from models.ddpm import DDPMConfig, DDPMTransport
from models.flow import FlowConfig, FlowTransport

Transport = Union[FlowTransport, DDPMTransport]


def _manifest_value(manifest: dict, key: str):
    try:
        return manifest[key]
    except KeyError:
        raise ConfigError(f"the prepared manifest has no {key!r}; re-run `bench prepare` with this "
                          "version of redi-bench") from None


def backbone_settings(cfg: ExperimentConfig, manifest: dict, align_manifest: Optional[dict] = None
                      ) -> BackboneConfig:
    """The BackboneConfig of `cfg` on the prepared data described by `manifest`; `align_manifest`
    is that of data.align_prepared_dir, whose encoder then sizes the REPA projector."""
    grid = _manifest_value(manifest, "latent_grid")
    if grid[0] != grid[1]:
        raise ConfigError(f"the prepared latents are {grid[0]}x{grid[1]}; the backbone needs a square grid")
    model, objective = cfg.model, cfg.objective
    aligned_to = manifest if align_manifest is None else align_manifest
    projector_dim = int(_manifest_value(aligned_to, "encoder")["channels"]) if objective.lambda_repa > 0 else 0
    fields = dict(
        input_size=int(grid[0]),
        latent_channels=int(_manifest_value(manifest, "latent_channels")),
        semantic_channels=cfg.semantic_channels,
        num_classes=cfg.num_model_classes,
        class_dropout_prob=model.class_dropout_prob,
        fusion=model.fusion,
        learn_sigma=model.learn_sigma,
        grad_checkpointing=model.grad_checkpointing,
        align_layer=objective.align_layer,
        projector_dim=projector_dim,
        projector_hidden=objective.projector_hidden,
    )
    try:
        if model.size == "custom":
            return BackboneConfig(hidden_size=model.hidden_size, depth=model.depth,
                                  num_heads=model.num_heads, patch_size=model.patch_size, **fields)
        return backbone_config(model.size, **fields)
    except ValueError as err:  # name the config keys, not the dataclass fields
        raise ConfigError(f"model/objective settings do not make a valid backbone: {err} "
                          "(model.size/hidden_size/depth/num_heads/patch_size, objective.align_layer)") from None


def build_model(cfg: ExperimentConfig, manifest: dict, align_manifest: Optional[dict] = None) -> JointDiT:
    """A freshly initialised JointDiT for `cfg` (seed the global torch RNG first for a fixed init)."""
    return JointDiT(backbone_settings(cfg, manifest, align_manifest))


def build_transport(cfg: ExperimentConfig, manifest: dict, processes: int = 1) -> Transport:
    """The training objective of `cfg` (flow: SiT velocity loss; ddpm: DiT's hybrid loss).

    `processes` is the number of training processes (DDP ranks); only objective.drop_mode=
    batch_official reads it (docs/method.md, "The modality drop").
    """
    objective = cfg.objective
    shared = dict(  # models.joint_objective.JointObjectiveConfig: the fields both transports share
        num_classes=cfg.num_model_classes,
        latent_channels=int(_manifest_value(manifest, "latent_channels")),
        semantic_channels=cfg.semantic_channels,
        lambda_z=objective.lambda_z,
        p_drop=objective.p_drop,
        drop_mode=objective.drop_mode,
        class_dropout_prob=cfg.model.class_dropout_prob,
        lambda_repa=objective.lambda_repa,
        drop_groups=processes,
    )
    try:
        if objective.transport == "flow":
            return FlowTransport(FlowConfig(path=objective.path, **shared))
        return DDPMTransport(DDPMConfig(learn_sigma=cfg.model.learn_sigma, **shared))
    except ValueError as err:
        raise ConfigError(f"objective settings are not valid: {err}") from None
