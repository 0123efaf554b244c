"""Import/export of the official ReDi/SiT checkpoint layout (zelaki/ReDi `models.py`, a SiT).

The official network takes ONE channel-concatenated input [x (C_x), z (C_z)] on the latent grid:
- `x_embedder.proj.weight`: (D, C_x + C_z, p, p) and one bias (D,);
- `final_layer.linear`: (p*p*c_out, D) with c_out = C_x + C_z, or 2 (C_x + C_z) with learn_sigma;
  output row = (p_row * p + p_col) * c_out + channel, channels ordered
  [x pred (C_x), z pred (C_z)] + ([x var (C_x), z var (C_z)] if learn_sigma);
- everything else (`t_embedder`, `y_embedder`, `blocks`, `final_layer.adaLN_modulation`, `pos_embed`,
  optional `projector`) has the same name and shape as in `JointDiT`.

`JointDiT` with fusion "merged" splits the conv by input channel (`x_embedder.proj` keeps the bias,
`z_embedder.proj` takes the semantic slice) and the final linear by output channel
(`final_layer.linear` -> [x pred, x var], `final_layer.linear_z` -> [z pred, z var]); it computes the
same function (eq. 7-8 of the paper). Differences to keep in mind:
- The official SiT forward with learn_sigma returns only the prediction half; `JointDiT` returns both
  halves per modality (flow sampling ignores the variance channels).
- The official label embedder drops labels at random in train mode; `JointDiT` never draws random
  numbers (the objective does the dropping), so compare against the official model in eval mode.
- Separate-token models have no official counterpart and cannot be exported.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from models.backbone import MODEL_SIZES, BackboneConfig, JointDiT

_PREFIXES = ("module.", "_orig_mod.")


def extract_official_weights(obj: dict, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The weights inside an official checkpoint object {"model", "ema", "opt", "args"} (or a bare
    state dict), with DDP `module.` / torch.compile `_orig_mod.` prefixes stripped.

    `use_ema` picks "ema" (what the official sampler loads) when present, else "model".
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a checkpoint dict, got {type(obj).__name__}")
    order = ("ema", "model") if use_ema else ("model", "ema")
    weights = next((obj[key] for key in order if isinstance(obj.get(key), dict)), obj)
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        while key.startswith(_PREFIXES):
            key = key.removeprefix("module.").removeprefix("_orig_mod.")
        out[key] = value
    if "x_embedder.proj.weight" not in out:
        raise ValueError("no SiT weights found: expected 'x_embedder.proj.weight' in the checkpoint "
                         f"(top-level keys: {sorted(obj)[:8]})")
    return out


def config_from_official_state_dict(sd: dict[str, torch.Tensor], latent_channels: int = 4, *,
                                    num_heads: int | None = None, align_layer: int = 8,
                                    class_dropout_prob: float = 0.1) -> BackboneConfig:
    """Infer the BackboneConfig (fusion "merged", or "none" without semantic channels) from weights.

    Depth, hidden size, patch, channels (semantic = input channels - latent_channels), grid size,
    mlp ratio, classes (the table is assumed to hold a null row, as with class_dropout_prob > 0),
    learn_sigma and the projector are read from shapes. The head count and the REPA layer are not
    stored in the weights: num_heads defaults to the registry size with this hidden size (Table 7),
    align_layer to the official default 8.
    """
    embed = sd["x_embedder.proj.weight"]  # (D, C_x + C_z, p, p)
    hidden, in_channels, patch = embed.shape[0], embed.shape[1], embed.shape[2]
    semantic = in_channels - latent_channels
    if semantic < 0:
        raise ValueError(f"checkpoint has {in_channels} input channels, fewer than latent_channels={latent_channels}")
    if num_heads is None:
        heads = {s["hidden_size"]: s["num_heads"] for s in MODEL_SIZES.values()}
        if hidden not in heads:
            raise ValueError(f"hidden size {hidden} is not a registry size; pass num_heads explicitly")
        num_heads = heads[hidden]
    block_ids = {int(m.group(1)) for key in sd if (m := re.match(r"blocks\.(\d+)\.", key))}
    if not block_ids:
        raise ValueError("no 'blocks.N.*' keys in the state dict: not a SiT/ReDi checkpoint")
    outputs = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    if outputs not in (in_channels, 2 * in_channels):
        raise ValueError(f"final layer has {outputs} channels per pixel; expected {in_channels} "
                         f"or {2 * in_channels} (learn_sigma) for {in_channels} input channels")
    tokens = sd["pos_embed"].shape[1]
    grid = round(tokens**0.5)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} tokens, not a square grid")
    has_projector = "projector.0.weight" in sd
    return BackboneConfig(
        hidden_size=hidden, depth=max(block_ids) + 1, num_heads=num_heads, input_size=grid * patch,
        patch_size=patch, latent_channels=latent_channels, semantic_channels=semantic,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - (1 if class_dropout_prob > 0 else 0),
        class_dropout_prob=class_dropout_prob, fusion="merged" if semantic else "none",
        learn_sigma=outputs == 2 * in_channels, align_layer=align_layer,
        projector_dim=sd["projector.4.weight"].shape[0] if has_projector else 0,
        projector_hidden=sd["projector.0.weight"].shape[0] if has_projector else 2048,
    )


def _head_channels(config: BackboneConfig) -> tuple[list[int], list[int]]:
    """Official output-channel indices feeding our latent head and our semantic head, in our order
    [pred, var]: official channels are [x pred, z pred] (+ [x var, z var] with learn_sigma)."""
    c_x, c_z = config.latent_channels, config.semantic_channels
    joint = c_x + c_z
    halves = (0, joint) if config.learn_sigma else (0,)
    latent = [half + ch for half in halves for ch in range(c_x)]
    semantic = [half + c_x + ch for half in halves for ch in range(c_z)]
    return latent, semantic


def _check_exportable(config: BackboneConfig) -> None:
    if config.fusion == "separate":
        raise ValueError("separate-token models have no official layout (the official code only "
                         "implements merged tokens); use fusion 'merged' or 'none'")


def import_official_state_dict(sd: dict[str, torch.Tensor], config: BackboneConfig) -> dict[str, torch.Tensor]:
    """Official SiT/ReDi state dict -> state dict for `JointDiT(config).load_state_dict` (strict).

    Only the patch embedding and the final linear are re-arranged (pure index copies, bit-exact);
    all other tensors pass through. Raises ValueError on missing or unexpected keys.
    """
    _check_exportable(config)
    expected = {k: v.shape for k, v in export_official_state_dict(_meta_model(config), config).items()}
    if set(sd) != set(expected):
        missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        raise ValueError(f"checkpoint does not match the config: missing keys {missing[:6]}, "
                         f"unexpected keys {extra[:6]}; check depth/projector/learn_sigma")
    wrong = [f"{k}: {tuple(sd[k].shape)} vs {tuple(shape)}" for k, shape in expected.items() if sd[k].shape != shape]
    if wrong:
        raise ValueError(f"checkpoint shapes do not match the config (checkpoint vs config): {wrong[:4]}; "
                         "check channels/patch/hidden size/learn_sigma")
    c_x, c_z, p = config.latent_channels, config.semantic_channels, config.patch_size
    latent_rows, semantic_rows = _head_channels(config)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "x_embedder.proj.weight":
            # (D, C_x + C_z, p, p) -> latent (D, C_x, p, p) and semantic (D, C_z, p, p) input slices
            out[key] = value[:, :c_x].clone()
            if c_z:
                out["z_embedder.proj.weight"] = value[:, c_x:].clone()
        elif key in ("final_layer.linear.weight", "final_layer.linear.bias"):
            per_patch = value.reshape(p * p, -1, *value.shape[1:])  # (p*p, c_out[, D])
            out[key] = per_patch[:, latent_rows].reshape(-1, *value.shape[1:]).clone()
            if c_z:
                name = key.replace("linear", "linear_z")
                out[name] = per_patch[:, semantic_rows].reshape(-1, *value.shape[1:]).clone()
        else:
            out[key] = value
    return out


def export_official_state_dict(model_or_sd: nn.Module | dict[str, torch.Tensor],
                               config: BackboneConfig) -> dict[str, torch.Tensor]:
    """JointDiT (or its state dict) -> the official layout; the exact inverse of the import."""
    _check_exportable(config)
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    latent_rows, semantic_rows = _head_channels(config)
    p, joint = config.patch_size, len(latent_rows) + len(semantic_rows)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith(("z_embedder.", "final_layer.linear_z.")):
            continue  # merged into the official tensors below
        if key == "x_embedder.proj.weight" and config.semantic_channels:
            value = torch.cat([value, sd["z_embedder.proj.weight"]], dim=1)  # (D, C_x + C_z, p, p)
        elif key in ("final_layer.linear.weight", "final_layer.linear.bias") and config.semantic_channels:
            rest = value.shape[1:]
            merged = value.new_empty(p * p, joint, *rest)
            merged[:, latent_rows] = value.reshape(p * p, len(latent_rows), *rest)
            semantic = sd[key.replace("linear", "linear_z")]
            merged[:, semantic_rows] = semantic.reshape(p * p, len(semantic_rows), *rest)
            value = merged.reshape(-1, *rest)
        out[key] = value
    return out


def _meta_model(config: BackboneConfig) -> JointDiT:
    """A shape-only JointDiT on the meta device (no memory, no init cost), for key/shape checks."""
    with torch.device("meta"):
        return JointDiT(config)
