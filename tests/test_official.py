"""The official ReDi/SiT layout imported into JointDiT computes what the official network computes.

Reference: tests/official_reference.py, an independent official-style model (one conv over [x, z],
one final linear over all channels, timm blocks with explicit softmax attention). Both models run in
float64 so that any layout error (a permuted channel, a swapped half) shows up far above rounding.
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from official_reference import OfficialReDiSiT, mae_pos_embed

from bench.train.released_checkpoints import load_official_checkpoint
from models.backbone import BackboneConfig, JointDiT, sincos_pos_embed_2d
from models.official_checkpoint import (
    config_from_official_state_dict,
    export_official_state_dict,
    extract_official_weights,
    import_official_state_dict,
)

C_X, C_Z, NUM_CLASSES, BATCH = 4, 3, 10, 3  # C_z != C_x so that a swapped split cannot pass
# float64 end to end: the two implementations differ only in summation order (SDPA vs explicit
# softmax, reordered matmuls), ~1e-15 relative on outputs of size ~1-10; 1e-10 leaves margin and is
# still ~1e8 times smaller than the effect of any layout mistake.
ATOL64 = 1e-10


def make_reference(semantic: int = C_Z, learn_sigma: bool = False, projector_dim: int = 0,
                   seed: int = 0) -> OfficialReDiSiT:
    torch.manual_seed(seed)
    ref = OfficialReDiSiT(input_size=8, patch=2, latent_channels=C_X, semantic_channels=semantic, width=64,
                          depth=3, heads=4, num_classes=NUM_CLASSES, learn_sigma=learn_sigma,
                          projector_dim=projector_dim, projector_hidden=32, repa_layer=2)
    with torch.no_grad():  # random everything (no zero-init heads): every weight must matter
        for name, p in ref.named_parameters():
            if name != "pos_embed":
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1)
    return ref.double().eval()


def import_into_joint(ref: OfficialReDiSiT) -> tuple[BackboneConfig, JointDiT]:
    sd = ref.official_state_dict()
    config = config_from_official_state_dict(sd, latent_channels=C_X, num_heads=4, align_layer=2)
    model = JointDiT(config).double().eval()
    model.load_state_dict(import_official_state_dict(sd, config))
    return config, model


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, C_X, 8, 8, generator=g, dtype=torch.float64)
    z = 4.0 * torch.randn(BATCH, C_Z, 8, 8, generator=g, dtype=torch.float64)  # PCA channels have std ~4
    t = torch.tensor([0.03, 0.71, 999.0], dtype=torch.float64)  # flow t in [0, 1] and a DDPM index
    y = torch.tensor([2, 7, NUM_CLASSES])  # includes the null label
    return x, z, t, y


def test_config_inference():
    ref = make_reference(learn_sigma=True, projector_dim=16)
    config = config_from_official_state_dict(ref.official_state_dict(), latent_channels=C_X, num_heads=4,
                                             align_layer=2)
    assert config == BackboneConfig(hidden_size=64, depth=3, num_heads=4, input_size=8, patch_size=2,
                                    latent_channels=C_X, semantic_channels=C_Z, num_classes=NUM_CLASSES,
                                    fusion="merged", learn_sigma=True, align_layer=2, projector_dim=16,
                                    projector_hidden=32)
    latent_only = config_from_official_state_dict(make_reference(semantic=0).official_state_dict(), num_heads=4)
    assert latent_only.fusion == "none" and latent_only.semantic_channels == 0


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("projector_dim", [0, 16])
def test_plain_forward_matches_official(learn_sigma, projector_dim):
    ref = make_reference(learn_sigma=learn_sigma, projector_dim=projector_dim)
    _, model = import_into_joint(ref)
    x, z, t, y = inputs()
    with torch.no_grad():
        full, ref_aligned = ref.forward_all(torch.cat([x, z], dim=1), t, y)
        official = ref(torch.cat([x, z], dim=1), t, y)
        out = model(x, t, y, z)
    joint = C_X + C_Z
    # official channels: [x pred, z pred] (+ [x var, z var]); ours: x = [pred, var], z = [pred, var]
    torch.testing.assert_close(out.x[:, :C_X], full[:, :C_X], atol=ATOL64, rtol=0)
    torch.testing.assert_close(out.z[:, :C_Z], full[:, C_X:joint], atol=ATOL64, rtol=0)
    torch.testing.assert_close(torch.cat([out.x[:, :C_X], out.z[:, :C_Z]], 1), official, atol=ATOL64, rtol=0)
    if learn_sigma:
        torch.testing.assert_close(out.x[:, C_X:], full[:, joint:joint + C_X], atol=ATOL64, rtol=0)
        torch.testing.assert_close(out.z[:, C_Z:], full[:, joint + C_X:], atol=ATOL64, rtol=0)
    assert out.x.shape[1] == C_X * (2 if learn_sigma else 1)
    if projector_dim:
        torch.testing.assert_close(out.aligned, ref_aligned, atol=ATOL64, rtol=0)
    else:
        assert out.aligned is None
    assert full.abs().max() > 0.5  # the comparison is not between near-zero tensors


def test_latent_only_checkpoint_matches_official_sit():
    ref = make_reference(semantic=0, learn_sigma=True)
    config, model = import_into_joint(ref)
    assert config.fusion == "none"
    x, _, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y).x, ref.forward_all(x, t, y)[0], atol=ATOL64, rtol=0)


def test_float32_forward_matches_official():
    ref = make_reference(learn_sigma=True).float()
    _, model = import_into_joint(ref)
    model.float()
    x, z, t, y = (v.float() if v.is_floating_point() else v for v in inputs())
    with torch.no_grad():
        official = ref(torch.cat([x, z], 1), t, y)
        out = model(x, t, y, z)
    # float32 rounding through 3 blocks with O(1) activations: ~1e-6; 1e-4 is far below a layout error.
    torch.testing.assert_close(torch.cat([out.x[:, :C_X], out.z[:, :C_Z]], 1), official, atol=1e-4, rtol=0)


def doubled(x, z, t, y_second):
    """The official doubled-batch convention: [x; x], [t; t], [y; y_second]."""
    return torch.cat([x, x]), torch.cat([z, z]), torch.cat([t, t]), y_second


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("mode", ["cfg_all", "cfg_latent", "rg"])
def test_guided_forward_matches_official(learn_sigma, mode):
    """Official forward_with_cfg / forward_with_cfg_vae / forward_with_rg vs our outputs combined by
    the rules of models/GUIDANCE.md written out here (and, independently, models.guidance)."""
    from models.guidance import Guidance, guided_prediction

    ref = make_reference(learn_sigma=learn_sigma)
    _, model = import_into_joint(ref)
    x, z, t, y = inputs()
    scale = 2.4 if mode != "rg" else 1.5
    null = torch.full_like(y, NUM_CLASSES)
    y2 = torch.cat([y, y if mode == "rg" else null])
    x2, z2, t2, _ = doubled(x, z, t, y2)
    official_fn = {"cfg_all": ref.forward_with_cfg, "cfg_latent": ref.forward_with_cfg_vae,
                   "rg": ref.forward_with_rg}[mode]
    with torch.no_grad():
        official = official_fn(torch.cat([x2, z2], 1), t2, y2, scale)[:BATCH]  # the kept (first) half
        z_second = torch.zeros_like(z) if mode == "rg" else z  # RG: semantic input exactly zero
        out = model(x2, t2, y2, torch.cat([z, z_second]))
    cond_x, other_x = out.x[:, :C_X].chunk(2)
    cond_z, other_z = out.z[:, :C_Z].chunk(2)
    guided_x = other_x + scale * (cond_x - other_x)
    guided_z = cond_z if mode == "cfg_latent" else other_z + scale * (cond_z - other_z)
    torch.testing.assert_close(official[:, :C_X], guided_x, atol=ATOL64, rtol=0)
    torch.testing.assert_close(official[:, C_X:], guided_z, atol=ATOL64, rtol=0)

    guidance = Guidance(latent_channels=C_X, semantic_channels=C_Z, null_class=NUM_CLASSES,
                        cfg_scale=scale if mode != "rg" else 1.0, rg_scale=scale if mode == "rg" else 1.0,
                        cfg_channels="latent" if mode == "cfg_latent" else "all")
    with torch.no_grad():
        ours = guided_prediction(model, x, z, t, y, guidance)
    # The guidance weights are formed in the output dtype (float64 here), so the same 1e-10 holds.
    torch.testing.assert_close(ours.x[:, :C_X], official[:, :C_X], atol=ATOL64, rtol=0)
    torch.testing.assert_close(ours.z[:, :C_Z], official[:, C_X:], atol=ATOL64, rtol=0)


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("semantic", [0, C_Z])
def test_import_export_roundtrip_is_identity(learn_sigma, semantic):
    sd = make_reference(semantic=semantic, learn_sigma=learn_sigma, projector_dim=16).float().official_state_dict()
    config = config_from_official_state_dict(sd, latent_channels=C_X, num_heads=4, align_layer=2)
    back = export_official_state_dict(import_official_state_dict(sd, config), config)
    assert list(back) == list(sd)  # same keys, same order
    for key in sd:
        assert back[key].dtype == sd[key].dtype and torch.equal(back[key], sd[key]), key
    # and the other direction, starting from a JointDiT
    model = JointDiT(config)
    again = import_official_state_dict(export_official_state_dict(model, config), config)
    assert set(again) == set(model.state_dict())
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


def test_fresh_pos_embed_matches_mae_convention():
    # Real XL size (1152 dims, 16x16 grid) and a tiny one. Different float64 sin/cos libraries
    # (numpy vs torch) may differ by an ulp before the float32 cast: 1e-7 ~ one float32 ulp at 1.
    for dim, grid in [(1152, 16), (64, 4)]:
        expected = torch.from_numpy(mae_pos_embed(dim, grid)).float()
        torch.testing.assert_close(sincos_pos_embed_2d(dim, grid), expected, atol=1e-7, rtol=0)


def test_extract_and_load_official_checkpoint_file(tmp_path):
    ref = make_reference(learn_sigma=False).float()
    ema = ref.official_state_dict()
    raw = {f"module._orig_mod.{k}": v + 1.0 for k, v in ema.items()}  # "model": different values
    obj = {"model": raw, "ema": dict(ema), "opt": {"state": {}, "param_groups": []},
           "args": argparse.Namespace(model="SiT-XL/2", cfg_vae="False")}
    assert all(torch.equal(a, ema[k]) for k, a in extract_official_weights(obj).items())
    picked = extract_official_weights(obj, use_ema=False)
    assert set(picked) == set(ema) and torch.equal(picked["pos_embed"], ema["pos_embed"] + 1.0)
    path = tmp_path / "0400000.pt"
    torch.save(obj, path)
    config, model = load_official_checkpoint(path, num_heads=4)
    assert not model.training and config.semantic_channels == C_Z
    exported = export_official_state_dict(model, config)
    assert all(torch.equal(exported[k], v) for k, v in ema.items())


def test_clear_errors():
    sd = make_reference().official_state_dict()
    config = config_from_official_state_dict(sd, latent_channels=C_X, num_heads=4)
    with pytest.raises(ValueError, match="missing keys"):
        import_official_state_dict({k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.weight"}, config)
    with pytest.raises(ValueError, match="shapes do not match"):
        import_official_state_dict(sd, BackboneConfig(**{**config.__dict__, "semantic_channels": 2}))
    with pytest.raises(ValueError, match="separate"):
        import_official_state_dict(sd, BackboneConfig(**{**config.__dict__, "fusion": "separate"}))
    with pytest.raises(ValueError, match="num_heads"):
        config_from_official_state_dict(sd, latent_channels=C_X)  # width 64 is not a registry size
    with pytest.raises(ValueError, match="fewer than latent_channels"):
        config_from_official_state_dict(sd, latent_channels=16, num_heads=4)
    with pytest.raises(ValueError, match="x_embedder"):
        extract_official_weights({"ema": {"foo": torch.zeros(1)}})
