"""Released SiT-ReDi checkpoints read from disk (the file side of models/official.py, which only maps
tensors): `.pt`/`.pth` through `torch.load(weights_only=True)` with the one class the official files
need allow-listed, or `.safetensors`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.backbone import BackboneConfig, JointDiT
from models.official import config_from_official_state_dict, extract_official_weights, import_official_state_dict


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
