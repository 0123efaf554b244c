"""The flow objective (eq. 17-18): loss math, label dropout, modality drop, REPA, precision."""
from __future__ import annotations

import math
import time
from typing import NamedTuple

import pytest
import torch

from models.flow import FlowConfig, FlowTransport
from models.joint_objective import joint_mse

F64 = torch.float64
CX, CZ, NUM_CLASSES = 3, 2, 7
# float64 throughout and the same operations up to ordering: agreement to ~1e-15; 1e-12 is tight
# enough to catch any wrong coefficient, mask or reduction.
TOL = dict(rtol=0, atol=1e-12)


class Out(NamedTuple):
    x: torch.Tensor
    z: torch.Tensor | None
    aligned: torch.Tensor | None


class HandModel:
    """A fixed, hand-built prediction of the inputs; records what the objective fed it."""

    def __init__(self, k: int = 1, aligned: bool = False) -> None:
        self.k, self.aligned, self.calls = k, aligned, []

    def __call__(self, x, t, y, z=None):
        self.calls.append(dict(x=x, t=t, y=y, z=z))
        tb = t.view(-1, 1, 1, 1)
        px = 0.7 * x + 0.3 * tb - 0.1 * y.view(-1, 1, 1, 1)
        if z is not None:
            px = px + 0.2 * z.mean(dim=1, keepdim=True)  # the latent prediction sees z
        pz = None if z is None else -0.3 * z + 0.5 * tb
        if self.k == 2:  # learned-variance channels, arbitrary values the loss must ignore
            px = torch.cat([px, 100 + px], dim=1)
            pz = None if pz is None else torch.cat([pz, -100 + pz], dim=1)
        aligned = x.flatten(2).transpose(1, 2) if self.aligned else None
        return Out(px, pz, aligned)


def path_coefficients(path, t):
    """(a, a', b, b') of x_t = a x1 + b eps, written out independently of models.flow."""
    t = t.view(-1, 1, 1, 1)
    if path == "linear":
        return t, torch.ones_like(t), 1 - t, -torch.ones_like(t)
    h = math.pi / 2
    return torch.sin(h * t), h * torch.cos(h * t), torch.cos(h * t), -h * torch.sin(h * t)


def data(batch=8, seed=0, semantic=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CX, 4, 4, generator=gen, dtype=F64)
    z = torch.randn(batch, CZ, 4, 4, generator=gen, dtype=F64) * 3 if semantic else None
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return x, z, y


def replay(seed, x, z):
    """The documented draw order: t, eps_x, label uniforms, drop uniforms, eps_z."""
    gen = torch.Generator().manual_seed(seed)
    b = x.shape[0]
    t = torch.rand(b, generator=gen, dtype=F64)
    eps_x = torch.randn(x.shape, generator=gen, dtype=F64)
    label_u, drop_u = torch.rand(b, generator=gen, dtype=F64), torch.rand(b, generator=gen, dtype=F64)
    eps_z = None if z is None else torch.randn(z.shape, generator=gen, dtype=F64)
    return t, eps_x, eps_z, label_u, drop_u


def config(**kw) -> FlowConfig:
    base = dict(num_classes=NUM_CLASSES, latent_channels=CX, semantic_channels=CZ)
    return FlowConfig(**{**base, **kw})


@pytest.mark.parametrize("path", ["linear", "gvp"])
@pytest.mark.parametrize("k", [1, 2])
def test_loss_equals_direct_computation(path, k):
    cfg = config(path=path, lambda_z=0.7, p_drop=0.4, class_dropout_prob=0.5)
    x, z, y = data()
    model = HandModel(k=k)
    losses = FlowTransport(cfg).training_losses(model, x, z, y, torch.Generator().manual_seed(3))

    t, eps_x, eps_z, label_u, drop_u = replay(3, x, z)
    a, da, b, db = path_coefficients(path, t)
    keep = drop_u >= 0.4
    assert 0 < int(keep.sum()) < len(keep), "seed should give a mix of kept and dropped samples"
    y_in = torch.where(label_u < 0.5, NUM_CLASSES, y)
    x_t, z_t = a * x + b * eps_x, a * z + b * eps_z
    z_in = torch.where(keep.view(-1, 1, 1, 1), z_t, 0.0)  # dropped: exact zeros (paper §3.5)
    call = model.calls[0]
    torch.testing.assert_close(call["t"], t, **TOL)  # same t for both modalities
    torch.testing.assert_close(call["x"], x_t, **TOL)
    torch.testing.assert_close(call["z"], z_in, **TOL)
    assert torch.equal(call["y"], y_in) and bool((y_in == NUM_CLASSES).any())
    assert torch.equal(call["z"][~keep], torch.zeros_like(z[~keep]))

    out = HandModel()(x_t, t, y_in, z_in)  # the same prediction without variance channels
    latent = ((out.x - (da * x + db * eps_x)) ** 2).mean(dim=(1, 2, 3))  # mean over C_x H W
    semantic = ((out.z - (da * z + db * eps_z)) ** 2).mean(dim=(1, 2, 3))  # mean over C_z H W
    expected = (latent + torch.where(keep, 0.7 * semantic, 0.0)).mean()  # float64 weight
    torch.testing.assert_close(losses["loss"], expected, **TOL)
    torch.testing.assert_close(losses["loss/latent"], latent.mean(), **TOL)
    torch.testing.assert_close(losses["loss/semantic"], semantic[keep].mean(), **TOL)
    assert set(losses) == {"loss", "loss/latent", "loss/semantic"}


def test_joint_mse_dropped_term_is_exactly_zero_with_no_gradient():
    gen = torch.Generator().manual_seed(0)
    px, tx = torch.randn(4, CX, 2, 2, generator=gen), torch.randn(4, CX, 2, 2, generator=gen)
    pz = torch.randn(4, CZ, 2, 2, generator=gen).requires_grad_()
    tz = torch.randn(4, CZ, 2, 2, generator=gen)
    keep = torch.tensor([True, False, True, False])
    terms = joint_mse(px, tx, pz, tz, keep, 2.0)
    assert torch.equal(terms.total[~keep], terms.latent[~keep])
    torch.testing.assert_close(terms.total[keep], terms.latent[keep] + 2.0 * terms.semantic[keep], rtol=1e-6, atol=0)
    terms.total.sum().backward()
    assert torch.equal(pz.grad[~keep], torch.zeros_like(pz.grad[~keep])) and bool(pz.grad[keep].abs().sum() > 0)
    half = joint_mse(px.bfloat16(), tx, pz.detach().bfloat16(), tz, None, 1.0)
    assert half.total.dtype == torch.float32  # loss math in float32 even for bf16 predictions


def test_batch_official_zeroes_clean_target_for_the_whole_step():
    x, z, y = data()
    model = HandModel()
    losses = FlowTransport(config(drop_mode="batch_official", p_drop=1.0)).training_losses(
        model, x, z, y, torch.Generator().manual_seed(5))
    t, eps_x, eps_z, _, _ = replay(5, x, z)
    # Official: x1[:, latent:] = 0 before interpolation -> z_t = (1 - t) eps_z, scaled noise, not zeros.
    torch.testing.assert_close(model.calls[0]["z"], (1 - t).view(-1, 1, 1, 1) * eps_z, **TOL)
    torch.testing.assert_close(losses["loss"], losses["loss/latent"], **TOL)  # lambda = 0 for the step
    assert float(losses["loss/semantic"]) == 0.0  # every sample dropped: logged as 0 by definition

    # p_drop = 0.5: each step drops all or none of the batch.
    outcomes = set()
    for seed in range(12):
        model = HandModel()
        FlowTransport(config(drop_mode="batch_official", p_drop=0.5)).training_losses(
            model, x, z, y, torch.Generator().manual_seed(seed))
        t, _, eps_z, _, drop_u = replay(seed, x, z)
        dropped = bool(drop_u[0] < 0.5)
        z_clean = torch.zeros_like(z) if dropped else z
        torch.testing.assert_close(model.calls[0]["z"],
                                   t.view(-1, 1, 1, 1) * z_clean + (1 - t).view(-1, 1, 1, 1) * eps_z, **TOL)
        outcomes.add(dropped)
    assert outcomes == {True, False}


def test_drop_pattern_reproducible_from_seed():
    x, z, y = data(batch=64)

    def pattern(seed):
        model = HandModel()
        FlowTransport(config(p_drop=0.5)).training_losses(model, x, z, y, torch.Generator().manual_seed(seed))
        return (model.calls[0]["z"] == 0).flatten(1).all(dim=1)  # rows of exact zeros = dropped

    assert torch.equal(pattern(1), pattern(1))
    assert not torch.equal(pattern(1), pattern(2))  # 64 fair coins: equal with prob 2^-64
    assert 10 < int(pattern(1).sum()) < 54  # about half dropped (binomial(64, 0.5) within 5.5 sd)


def test_no_drop_when_p_drop_zero_and_modes_agree():
    x, z, y = data()
    a = FlowTransport(config(p_drop=0.0)).training_losses(HandModel(), x, z, y, torch.Generator().manual_seed(4))
    b = FlowTransport(config(p_drop=0.0, drop_mode="batch_official")).training_losses(
        HandModel(), x, z, y, torch.Generator().manual_seed(4))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_latent_only_keys_and_repa():
    x, _, y = data(semantic=False)
    latent_only = config(semantic_channels=0)
    losses = FlowTransport(latent_only).training_losses(HandModel(), x, None, y, torch.Generator())
    assert set(losses) == {"loss", "loss/latent"}
    torch.testing.assert_close(losses["loss"], losses["loss/latent"], **TOL)

    target = torch.randn(x.shape[0], 16, CX, dtype=F64, generator=torch.Generator().manual_seed(9))
    seen = []

    def alignment(aligned, align_target):
        seen.append((aligned, align_target))
        return ((aligned - align_target) ** 2).mean()

    cfg = config(semantic_channels=0, lambda_repa=0.5)
    losses = FlowTransport(cfg, alignment_loss=alignment).training_losses(
        HandModel(aligned=True), x, None, y, torch.Generator().manual_seed(1), align_target=target)
    assert set(losses) == {"loss", "loss/latent", "loss/repa"}
    torch.testing.assert_close(losses["loss/repa"], alignment(*seen[0]), **TOL)
    torch.testing.assert_close(losses["loss"], losses["loss/latent"] + 0.5 * losses["loss/repa"], **TOL)
    # Default alignment loss is models.repa's negative cosine: in [-1, 1].
    default = FlowTransport(cfg).training_losses(HandModel(aligned=True), x, None, y, torch.Generator(),
                                                 align_target=target)
    assert -1.0 <= float(default["loss/repa"]) <= 1.0
    with pytest.raises(ValueError, match="align_target"):
        FlowTransport(cfg).training_losses(HandModel(aligned=True), x, None, y, torch.Generator())
    with pytest.raises(ValueError, match="projector"):
        FlowTransport(cfg).training_losses(HandModel(aligned=False), x, None, y, torch.Generator(), align_target=target)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(p_drop=1.5), "p_drop"),
        (dict(class_dropout_prob=-0.1), "class_dropout_prob"),
        (dict(lambda_z=-1.0), "lambda_z"),
        (dict(lambda_repa=float("nan")), "lambda_repa"),
        (dict(path="vp"), "path"),
        (dict(drop_mode="per_batch"), "drop_mode"),
        (dict(semantic_channels=0, p_drop=0.2), "p_drop"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_invalid_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        config(**kw)


def test_bad_inputs_raise():
    x, z, y = data()
    transport = FlowTransport(config())
    with pytest.raises(ValueError, match="z must be"):
        transport.training_losses(HandModel(), x, None, y, torch.Generator())
    with pytest.raises(ValueError, match="x must be"):
        transport.training_losses(HandModel(), x[:, :1], z, y, torch.Generator())
    with pytest.raises(ValueError, match="labels"):
        transport.training_losses(HandModel(), x, z, y + NUM_CLASSES + 1, torch.Generator())


def tiny_model(**overrides):
    from models.backbone import BackboneConfig, JointDiT

    cfg = BackboneConfig(hidden_size=64, depth=2, num_heads=4, input_size=8, patch_size=1, latent_channels=CX,
                         semantic_channels=CZ, num_classes=NUM_CLASSES, fusion="merged", **overrides)
    torch.manual_seed(0)  # parameter init uses the global RNG
    return JointDiT(cfg)


def test_bf16_autocast_step_on_cpu():
    model = tiny_model(learn_sigma=True, projector_dim=16, align_layer=1)
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(4, CX, 8, 8, generator=gen), torch.randn(4, CZ, 8, 8, generator=gen)
    y, target = torch.arange(4), torch.randn(4, 64, 16, generator=gen)
    transport = FlowTransport(config(p_drop=0.5, lambda_repa=0.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = transport.training_losses(model, x, z, y, gen, align_target=target)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_tiny_model_overfits_one_batch():
    """Fixed batch, t and noise (the generator is re-seeded each step): pure regression, so the
    loss must drop well below its initial value (~E[u^2] ~ 2 with zero-initialised heads).

    "Within 30 s on CPU" is measured as CPU time of this process with one intra-op thread: on a
    shared machine wall time also counts other jobs (and oversubscribed OpenMP threads spin), which
    made a wall-clock bound fail under load although the work takes ~0.6 s (49 steps) when idle.
    """
    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    x, z = torch.randn(4, CX, 8, 8, generator=gen), torch.randn(4, CZ, 8, 8, generator=gen)
    y = torch.arange(4)
    transport = FlowTransport(config(class_dropout_prob=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start, first = time.process_time(), None
        for _ in range(400):
            loss = transport.training_losses(model, x, z, y, torch.Generator().manual_seed(0))["loss"]
            first = loss.item() if first is None else first
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < first / 10 or time.process_time() - start > 30:
                break
        cpu_seconds = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < first / 10, (first, loss.item())
    assert cpu_seconds < 30
