"""Guidance (models/GUIDANCE.md): one batched call equals the combination of separate calls."""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

from models.guidance import Guidance, guided_prediction

F64 = torch.float64
CX, CZ, NUM_CLASSES, B = 2, 3, 5, 4
# Batched and separate calls run the same float64 convolutions; they agree to rounding (~1e-15),
# so 1e-12 leaves room for reordered reductions and still catches any wrong coefficient (also
# a weight such as w - 1 = 1.4 rounded through float32, off by ~2e-8).
TOL = dict(rtol=0, atol=1e-12)


class Out(NamedTuple):
    x: torch.Tensor
    z: torch.Tensor | None
    aligned: torch.Tensor | None


class TinyJointNet(nn.Module):
    """Per-sample nonlinear net with the README signature; output depends on x, z, t and y.
    k = 2 adds learned-variance channels ([prediction, variance] per modality). Records batches."""

    def __init__(self, cz: int = CZ, k: int = 1, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.cz, self.k, self.batches = cz, k, []
        c_in, c_out = CX + cz, (CX + cz) * k
        self.weight = nn.Parameter(torch.randn(c_out, c_in, 3, 3, generator=gen, dtype=F64) * 0.3)
        self.label = nn.Parameter(torch.randn(NUM_CLASSES + 1, c_out, generator=gen, dtype=F64))
        self.time = nn.Parameter(torch.randn(c_out, generator=gen, dtype=F64))

    def forward(self, x, t, y, z=None):
        self.batches.append(x.shape[0])
        h = x if z is None else torch.cat([x, z], dim=1)  # (N, C_x + C_z, H, W)
        o = torch.tanh(nn.functional.conv2d(h, self.weight, padding=1))
        o = o + self.label[y][:, :, None, None] + torch.outer(t, self.time)[:, :, None, None]
        ox, oz = o.split([CX * self.k, self.cz * self.k], dim=1)
        return Out(ox, oz if z is not None else None, o.flatten(2).transpose(1, 2))


def inputs(seed: int = 1, cz: int = CZ):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, CX, 4, 4, generator=gen, dtype=F64)
    z = torch.randn(B, cz, 4, 4, generator=gen, dtype=F64) if cz else None
    t = torch.rand(B, generator=gen, dtype=F64)
    y = torch.randint(0, NUM_CLASSES, (B,), generator=gen)
    return x, z, t, y


def branches(net, x, z, t, y):
    """f_c, f_u, f_r from three separate calls (GUIDANCE.md)."""
    f_c = net(x, t, y, z=z)
    f_u = net(x, t, torch.full_like(y, NUM_CLASSES), z=z)
    f_r = net(x, t, y, z=torch.zeros_like(z))
    return f_c, f_u, f_r


def guidance(**kw) -> Guidance:
    return Guidance(latent_channels=CX, semantic_channels=CZ, null_class=NUM_CLASSES, **kw)


def test_all_weights_one_is_the_plain_conditional_call():
    net = TinyJointNet()
    x, z, t, y = inputs()
    out = guided_prediction(net, x, z, t, y, guidance(cfg_scale=1.0, rg_scale=1.0, interval=(0.2, 0.4)),
                            noise_level=0.3)
    assert net.batches == [B]
    ref = net(x, t, y, z=z)
    torch.testing.assert_close(out.x, ref.x, rtol=0, atol=0)
    torch.testing.assert_close(out.z, ref.z, rtol=0, atol=0)


@pytest.mark.parametrize("w, w_r, batch", [(2.4, 1.0, 2 * B), (1.0, 1.7, 2 * B), (2.4, 1.7, 3 * B), (0.0, 0.0, 3 * B)])
def test_batched_equals_separate_calls(w, w_r, batch):
    net = TinyJointNet()
    x, z, t, y = inputs()
    out = guided_prediction(net, x, z, t, y, guidance(cfg_scale=w, cfg_channels="all", rg_scale=w_r))
    assert net.batches == [batch]  # exactly one call on 2 or 3 branches
    f_c, f_u, f_r = branches(net, x, z, t, y)
    for name in ("x", "z"):
        c, u, r = (getattr(f, name) for f in (f_c, f_u, f_r))
        torch.testing.assert_close(getattr(out, name), c + (w - 1) * (c - u) + (w_r - 1) * (c - r), **TOL)
    torch.testing.assert_close(out.aligned, f_c.aligned, **TOL)  # conditional branch


@pytest.mark.parametrize("cfg_channels", ["all", "latent"])
def test_rg_off_is_standard_cfg(cfg_channels):
    net = TinyJointNet()
    x, z, t, y = inputs()
    out = guided_prediction(net, x, z, t, y, guidance(cfg_scale=3.0, cfg_channels=cfg_channels))
    f_c, f_u, _ = branches(net, x, z, t, y)
    torch.testing.assert_close(out.x, f_u.x + 3.0 * (f_c.x - f_u.x), **TOL)
    expected_z = f_u.z + 3.0 * (f_c.z - f_u.z) if cfg_channels == "all" else f_c.z  # latent-only CFG
    torch.testing.assert_close(out.z, expected_z, **TOL)


@pytest.mark.parametrize("rg_channels", ["all", "latent"])
def test_cfg_off_is_eq13(rg_channels):
    net = TinyJointNet()
    x, z, t, y = inputs()
    out = guided_prediction(net, x, z, t, y, guidance(rg_scale=1.5, rg_channels=rg_channels))
    f_c, _, f_r = branches(net, x, z, t, y)
    torch.testing.assert_close(out.x, f_r.x + 1.5 * (f_c.x - f_r.x), **TOL)  # eps_r + w_r (eps_c - eps_r)
    expected_z = f_r.z + 1.5 * (f_c.z - f_r.z) if rg_channels == "all" else f_c.z
    torch.testing.assert_close(out.z, expected_z, **TOL)


def test_interval_applies_cfg_only_inside():
    net = TinyJointNet()
    x, z, t, y = inputs()
    s = torch.tensor([0.1, 0.3, 0.9, 1.0], dtype=F64)
    out = guided_prediction(net, x, z, t, y, guidance(cfg_scale=2.0, cfg_channels="all", interval=(0.3, 0.9)),
                            noise_level=s)
    f_c, f_u, _ = branches(net, x, z, t, y)
    inside = torch.tensor([False, True, True, False])  # bounds inclusive
    for name in ("x", "z"):
        c, u = getattr(f_c, name), getattr(f_u, name)
        expected = torch.where(inside.view(-1, 1, 1, 1), u + 2.0 * (c - u), c)
        torch.testing.assert_close(getattr(out, name), expected, **TOL)
    # Every sample outside: the class-dropped branch is skipped (one call of batch B), RG still on.
    net.batches.clear()
    out = guided_prediction(net, x, z, t, y, guidance(cfg_scale=2.0, rg_scale=1.3, interval=(0.3, 0.9)),
                            noise_level=0.95)
    assert net.batches == [2 * B]
    f_c, _, f_r = branches(net, x, z, t, y)
    torch.testing.assert_close(out.x, f_c.x + 0.3 * (f_c.x - f_r.x), **TOL)


def test_learned_variance_channels_come_from_conditional_branch():
    net = TinyJointNet(k=2)
    x, z, t, y = inputs()
    out = guided_prediction(net, x, z, t, y, guidance(cfg_scale=2.0, cfg_channels="all", rg_scale=1.5))
    f_c, f_u, f_r = branches(net, x, z, t, y)
    assert out.x.shape == (B, 2 * CX, 4, 4) and out.z.shape == (B, 2 * CZ, 4, 4)
    torch.testing.assert_close(out.x[:, CX:], f_c.x[:, CX:], rtol=0, atol=0)
    torch.testing.assert_close(out.z[:, CZ:], f_c.z[:, CZ:], rtol=0, atol=0)
    c, u, r = f_c.x[:, :CX], f_u.x[:, :CX], f_r.x[:, :CX]
    torch.testing.assert_close(out.x[:, :CX], c + (c - u) + 0.5 * (c - r), **TOL)


def test_latent_only_model():
    net = TinyJointNet(cz=0)
    x, _, t, y = inputs(cz=0)
    g = Guidance(latent_channels=CX, semantic_channels=0, cfg_scale=2.0, null_class=NUM_CLASSES)
    out = guided_prediction(net, x, None, 0.5, y, g)  # scalar t is broadcast to (B,)
    t_vec = torch.full((B,), 0.5, dtype=F64)
    c, u = net(x, t_vec, y).x, net(x, t_vec, torch.full_like(y, NUM_CLASSES)).x
    assert out.z is None
    torch.testing.assert_close(out.x, u + 2.0 * (c - u), **TOL)
    with pytest.raises(ValueError, match="semantic"):
        Guidance(latent_channels=CX, semantic_channels=0, rg_scale=1.5)
    with pytest.raises(ValueError, match="latent-only"):  # channels declared but no z passed
        guided_prediction(net, x, None, t, y, guidance(rg_scale=1.5))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(cfg_scale=-0.5), "cfg_scale"),
        (dict(rg_scale=-1.0), "rg_scale"),
        (dict(interval=(0.6, 0.4)), "interval"),
        (dict(interval=(-0.1, 0.4)), "interval"),
        (dict(cfg_channels="semantic"), "cfg_channels"),
        (dict(rg_channels="none"), "rg_channels"),
    ],
)
def test_invalid_guidance_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        guidance(**kw)


def test_call_time_errors():
    net = TinyJointNet()
    x, z, t, y = inputs()
    with pytest.raises(ValueError, match="null_class"):
        Guidance(latent_channels=CX, semantic_channels=CZ, cfg_scale=2.0)
    with pytest.raises(ValueError, match="noise_level"):  # interval but no noise level
        guided_prediction(net, x, z, t, y, guidance(cfg_scale=2.0, interval=(0.0, 0.5)))
    with pytest.raises(ValueError, match="noise_level"):
        guided_prediction(net, x, z, t, y, guidance(cfg_scale=2.0), noise_level=1.5)
    with pytest.raises(ValueError, match="channels"):
        guided_prediction(net, x, z[:, :1], t, y, guidance(rg_scale=1.5))
