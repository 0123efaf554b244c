"""DiT (DDPM) transport: schedule, hybrid loss, respacing, ancestral sampling with guidance.

References are independent of models/ddpm.py: the schedule is rebuilt with plain Python floats, KLs
come from torch.distributions, the kept timesteps from exact fractions, and the Gaussian-data
sampler is checked against a closed-form recursion of the mean and variance of the chain.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from models.backbone import BackboneConfig, BackboneOutput, JointDiT
from models.ddpm import DDPMConfig, DDPMTransport, GaussianDiffusion, named_beta_schedule
from models.ddpm_sampling import respace, sample_ddpm, space_timesteps
from models.guidance import Guidance
from models.repa import repa_alignment_loss

F64 = torch.float64
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------
# Independent float64 reference of DiT's linear schedule (plain Python loops)


def reference_schedule(num_timesteps: int) -> dict[str, list[float]]:
    scale = 1000.0 / num_timesteps
    start, end = scale * 1e-4, scale * 0.02
    betas = [start + (end - start) * i / (num_timesteps - 1) for i in range(num_timesteps)]
    return schedule_from_betas(betas)


def schedule_from_betas(betas: list[float]) -> dict[str, list[float]]:
    alphas_cumprod, product = [], 1.0
    for beta in betas:
        product *= 1.0 - beta
        alphas_cumprod.append(product)
    prev = [1.0] + alphas_cumprod[:-1]
    post_var = [b * (1 - ap) / (1 - a) for b, a, ap in zip(betas, alphas_cumprod, prev)]
    return {
        "betas": betas,
        "alphas": [1.0 - b for b in betas],
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": [math.log(post_var[1])] + [math.log(v) for v in post_var[1:]],
        "posterior_mean_coef1": [b * math.sqrt(ap) / (1 - a) for b, a, ap in zip(betas, alphas_cumprod, prev)],
        "posterior_mean_coef2": [(1 - ap) * math.sqrt(1 - b) / (1 - a)
                                 for b, a, ap in zip(betas, alphas_cumprod, prev)],
    }


def reference_kept(num_timesteps: int, count: int) -> list[int]:
    """round(i * (T - 1) / (K - 1)) in exact arithmetic, ties to even like Python's round."""
    return sorted({round(Fraction(i * (num_timesteps - 1), count - 1)) for i in range(count)})


def test_schedule_matches_float64_reference() -> None:
    diffusion = GaussianDiffusion(named_beta_schedule("linear", 1000))
    ref = reference_schedule(1000)
    for name, values in ref.items():
        ours = getattr(diffusion, name)
        assert ours.dtype == F64, name
        # 1000 sequential float64 products: relative error <= ~1e3 ulp ~ 2e-13, hence 1e-12.
        torch.testing.assert_close(ours, torch.tensor(values, dtype=F64), rtol=1e-12, atol=0.0, msg=name)
    assert diffusion.betas[0].item() == pytest.approx(1e-4, abs=1e-18)
    assert diffusion.betas[-1].item() == pytest.approx(0.02, abs=1e-17)
    assert diffusion.posterior_variance[0].item() == 0.0  # tilde-beta_0 = 0, hence the clipped log
    # learn_sigma=False uses DiT's FIXED_LARGE: log beta_t, with log tilde-beta_1 at t = 0.
    fixed_large = [math.log(ref["posterior_variance"][1])] + [math.log(b) for b in ref["betas"][1:]]
    torch.testing.assert_close(diffusion.fixed_large_log_variance, torch.tensor(fixed_large, dtype=F64),
                               rtol=1e-12, atol=0.0)


def test_config_validation() -> None:
    base = dict(num_classes=10, latent_channels=4, semantic_channels=2)
    DDPMConfig(**base)
    bad = [
        dict(num_timesteps=20), dict(beta_schedule="cosine"), dict(p_drop=1.5), dict(lambda_z=-1.0),
        dict(drop_mode="batch"), dict(class_dropout_prob=-0.1), dict(num_classes=0), dict(latent_channels=0),
        dict(semantic_channels=0, p_drop=0.2), dict(lambda_repa=float("nan")),
    ]
    for override in bad:
        with pytest.raises(ValueError, match="DDPMConfig"):
            DDPMConfig(**{**base, **override})


# ----------------------------------------------------------------------------
# The VLB term


def _vlb_case(t_values: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (len(t_values), 2, 3, 3)
    x0 = torch.rand(shape, generator=g, dtype=F64) * 1.6 - 0.8  # inside (-1, 1): no edge bins
    noise = torch.randn(shape, generator=g, dtype=F64)
    eps = noise + 0.3 * torch.randn(shape, generator=g, dtype=F64)  # an imperfect prediction
    v = torch.rand(shape, generator=g, dtype=F64) * 2 - 1
    return x0, noise, eps, v, torch.tensor(t_values)


def test_vlb_kl_equals_direct_gaussian_kl() -> None:
    T = 50
    diffusion, ref = GaussianDiffusion(named_beta_schedule("linear", T)), reference_schedule(T)
    x0, noise, eps, v, t = _vlb_case([1, 7, 23, 49])
    expected = []
    for i, ti in enumerate(t.tolist()):
        ab, c1, c2 = ref["alphas_cumprod"][ti], ref["posterior_mean_coef1"][ti], ref["posterior_mean_coef2"][ti]
        x_t = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i]
        x0_hat = (x_t - math.sqrt(1 - ab) * eps[i]) / math.sqrt(ab)
        frac = (v[i] + 1) / 2
        log_var = frac * math.log(ref["betas"][ti]) + (1 - frac) * ref["posterior_log_variance_clipped"][ti]
        q = torch.distributions.Normal(c1 * x0[i] + c2 * x_t, math.sqrt(ref["posterior_variance"][ti]))
        p = torch.distributions.Normal(c1 * x0_hat + c2 * x_t, torch.exp(0.5 * log_var))
        expected.append(torch.distributions.kl_divergence(q, p).mean() / LN2)
    x_t = diffusion.q_sample(x0, t, noise)
    ours = diffusion.vb_terms_bpd(x0, x_t, t, eps, v)
    # Same quantities by a different algebra in float64: agreement to ~1e-13; 1e-10 leaves margin.
    torch.testing.assert_close(ours, torch.stack(expected), rtol=1e-10, atol=1e-12)

    # Hand-made case: the exact noise makes the means equal, so only the variances differ:
    # v = -1 (tilde-beta) gives KL = 0; v = +1 (beta) gives 0.5 (r - 1 - ln r) / ln 2, r = tilde-beta / beta.
    ones = torch.ones_like(v)
    assert diffusion.vb_terms_bpd(x0, x_t, t, noise, -ones).abs().max().item() < 1e-12
    r = torch.tensor([ref["posterior_variance"][ti] / ref["betas"][ti] for ti in t.tolist()], dtype=F64)
    torch.testing.assert_close(diffusion.vb_terms_bpd(x0, x_t, t, noise, ones), 0.5 * (r - 1 - torch.log(r)) / LN2,
                               rtol=1e-9, atol=1e-13)


def test_vlb_at_t0_is_discretized_decoder_nll() -> None:
    diffusion, ref = GaussianDiffusion(named_beta_schedule("linear", 1000)), reference_schedule(1000)
    x0, noise, _, v, _ = _vlb_case([0, 0, 0])
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = -1.0, 1.0  # exercise both edge bins
    t = torch.zeros(3, dtype=torch.long)
    eps = noise + 0.05 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    x_t = diffusion.q_sample(x0, t, noise)
    ab = ref["alphas_cumprod"][0]
    mean = (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)  # at t = 0 the posterior mean is x0_hat
    frac = (v + 1) / 2
    std = torch.exp(0.5 * (frac * math.log(ref["betas"][0]) + (1 - frac) * ref["posterior_log_variance_clipped"][0]))
    cdf = lambda u: torch.special.ndtr((u - mean) / std)  # exact normal CDF  # noqa: E731
    prob = torch.where(x0 < -0.999, cdf(x0 + 1 / 255), torch.where(x0 > 0.999, 1 - cdf(x0 - 1 / 255),
                                                                    cdf(x0 + 1 / 255) - cdf(x0 - 1 / 255)))
    expected = (-torch.log(prob)).mean(dim=(1, 2, 3)) / LN2
    ours = diffusion.vb_terms_bpd(x0, x_t, t, eps, v)
    # DiT's tanh CDF approximation is within 2e-4 of the exact CDF; bins here hold >= ~0.1 mass,
    # so each log-probability moves by < ~4e-3 nats; 5e-3 bits on the mean is the stated bound.
    torch.testing.assert_close(ours, expected, rtol=0, atol=5e-3)


# ----------------------------------------------------------------------------
# The training objective with a stand-in network whose outputs are parameters


class ParamModel(nn.Module):
    """Returns fixed parameter tensors as the prediction and records its inputs."""

    def __init__(self, batch: int, cx: int, cz: int, hw: int, k: int, seed: int = 0, align_dim: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.px = nn.Parameter(0.5 * torch.randn(batch, k * cx, hw, hw, generator=g))
        self.pz = nn.Parameter(0.5 * torch.randn(batch, k * cz, hw, hw, generator=g)) if cz else None
        self.aligned = nn.Parameter(torch.randn(batch, hw * hw, align_dim, generator=g)) if align_dim else None
        self.calls: list[tuple] = []

    def forward(self, x, t, y, z=None):
        self.calls.append((x.detach().clone(), t.clone(), y.clone(), None if z is None else z.detach().clone()))
        return BackboneOutput(self.px, self.pz, self.aligned)


def _batch(batch: int = 6, cx: int = 3, cz: int = 2, hw: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cx, hw, hw, generator=g)
    z = torch.randn(batch, cz, hw, hw, generator=g) if cz else None
    return x, z, torch.randint(0, 10, (batch,), generator=g)


def test_simple_loss_matches_independent_recomputation_and_hybrid_adds_only_vlb() -> None:
    x, z, y = _batch()
    cfg = DDPMConfig(num_classes=10, latent_channels=3, semantic_channels=2, lambda_z=0.7, learn_sigma=False)
    fixed = ParamModel(6, 3, 2, 4, k=1)
    losses = DDPMTransport(cfg).training_losses(fixed, x, z, y, torch.Generator().manual_seed(5))
    assert set(losses) == {"loss", "loss/latent", "loss/semantic"}  # fixed variance: no VLB term

    # Replay the documented draw order: t, eps_x, label uniforms, drop uniforms, eps_z.
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (6,), generator=g)
    eps_x = torch.randn(x.shape, generator=g)
    torch.rand(6, generator=g), torch.rand(6, generator=g)
    eps_z = torch.randn(z.shape, generator=g)
    ab = torch.tensor(reference_schedule(1000)["alphas_cumprod"], dtype=F64)[t].view(-1, 1, 1, 1)
    x_t = (ab.sqrt() * x + (1 - ab).sqrt() * eps_x).float()
    x_in, t_in, _, z_in = fixed.calls[0]
    # float32 inputs: 1e-6 relative is a few ulp.
    torch.testing.assert_close(x_in, x_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z_in, (ab.sqrt() * z + (1 - ab).sqrt() * eps_z).float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(t_in, t.float())  # DiT convention: the integer index as a float
    latent = ((fixed.px - eps_x) ** 2).mean()  # equal element counts per sample: global mean
    semantic = ((fixed.pz - eps_z) ** 2).mean()
    torch.testing.assert_close(losses["loss/latent"], latent.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(losses["loss/semantic"], semantic.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(losses["loss"], latent + 0.7 * semantic, rtol=1e-6, atol=0)

    # learn_sigma: same eps channels plus variance channels -> the same simple terms, plus the VLB.
    hybrid = ParamModel(6, 3, 2, 4, k=2)
    with torch.no_grad():
        hybrid.px[:, :3], hybrid.pz[:, :2] = fixed.px, fixed.pz
    cfg_h = DDPMConfig(num_classes=10, latent_channels=3, semantic_channels=2, lambda_z=0.7)
    hl = DDPMTransport(cfg_h).training_losses(hybrid, x, z, y, torch.Generator().manual_seed(5))
    assert set(hl) == {"loss", "loss/latent", "loss/semantic", "loss/vlb"}
    assert torch.equal(hl["loss/latent"], losses["loss/latent"])
    torch.testing.assert_close(hl["loss"] - hl["loss/vlb"], losses["loss"], rtol=1e-6, atol=1e-7)
    assert hl["loss/vlb"].item() > 0

    # Stop-grad: the VLB term leaves the eps gradient unchanged and does train the variance.
    losses["loss"].backward()
    hl["loss"].backward()
    torch.testing.assert_close(hybrid.px.grad[:, :3], fixed.px.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(hybrid.pz.grad[:, :2], fixed.pz.grad, rtol=1e-5, atol=1e-9)
    assert hybrid.px.grad[:, 3:].abs().sum() > 0 and hybrid.pz.grad[:, 2:].abs().sum() > 0


def test_sample_mode_drop_zeroes_input_and_masks_every_semantic_term() -> None:
    x, z, y = _batch(batch=16)
    cfg = DDPMConfig(num_classes=10, latent_channels=3, semantic_channels=2, p_drop=0.5, lambda_z=0.7)
    transport, model = DDPMTransport(cfg), ParamModel(16, 3, 2, 4, k=2)
    terms = transport.per_sample_losses(model, x, z, y, torch.Generator().manual_seed(3))
    kept, z_in = terms.semantic_kept, model.calls[0][3]
    assert 0 < int(kept.sum()) < 16  # both cases present with this seed
    assert torch.equal(z_in[~kept], torch.zeros_like(z_in[~kept]))  # "zero out z_t" (sec. 3.5)
    assert (z_in[kept].abs().sum(dim=(1, 2, 3)) > 0).all()
    for term in (terms.semantic_mse, terms.vlb_semantic):
        assert torch.equal(term[~kept], torch.zeros_like(term[~kept])) and (term[kept] > 0).all()
    losses = transport.training_losses(model, x, z, y, torch.Generator().manual_seed(3))
    expected = (terms.latent_mse + 0.7 * terms.semantic_mse + terms.vlb_latent + 0.7 * terms.vlb_semantic).mean()
    torch.testing.assert_close(losses["loss"], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(losses["loss/vlb"], (terms.vlb_latent + 0.7 * terms.vlb_semantic).mean().detach())
    torch.testing.assert_close(losses["loss/semantic"], terms.semantic_mse[kept].mean().detach())

    # p_drop = 1: no gradient reaches the semantic head at all.
    all_dropped = DDPMTransport(DDPMConfig(num_classes=10, latent_channels=3, semantic_channels=2, p_drop=1.0))
    model_b = ParamModel(16, 3, 2, 4, k=2)
    out = all_dropped.training_losses(model_b, x, z, y, torch.Generator().manual_seed(3))
    out["loss"].backward()
    assert out["loss/semantic"].item() == 0.0 and torch.count_nonzero(model_b.pz.grad) == 0


def test_batch_official_mode_drops_whole_batch_and_noises_zero_target() -> None:
    x, z, y = _batch(batch=8)
    cfg = DDPMConfig(num_classes=10, latent_channels=3, semantic_channels=2, p_drop=1.0, drop_mode="batch_official")
    model = ParamModel(8, 3, 2, 4, k=2)
    terms = DDPMTransport(cfg).per_sample_losses(model, x, z, y, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 1000, (8,), generator=g)
    torch.randn(x.shape, generator=g), torch.rand(8, generator=g), torch.rand(8, generator=g)  # eps_x, labels, drop
    eps_z = torch.randn(z.shape, generator=g)
    ab = torch.tensor(reference_schedule(1000)["alphas_cumprod"], dtype=F64)[t].view(-1, 1, 1, 1)
    # official: clean target zeroed before noising -> input is scaled noise, not zeros.
    torch.testing.assert_close(model.calls[0][3], ((1 - ab).sqrt() * eps_z).float(), rtol=1e-6, atol=1e-6)
    assert not terms.semantic_kept.any()
    assert torch.count_nonzero(terms.semantic_mse) == 0 and torch.count_nonzero(terms.vlb_semantic) == 0
    # With p_drop = 0.5 the decision is one per batch: all kept or all dropped, both seen over seeds.
    half = DDPMTransport(DDPMConfig(num_classes=10, latent_channels=3, semantic_channels=2, p_drop=0.5,
                                    drop_mode="batch_official"))
    outcomes = set()
    for seed in range(12):
        kept = half.per_sample_losses(model, x, z, y, torch.Generator().manual_seed(seed)).semantic_kept
        assert bool(kept.all()) or not bool(kept.any())
        outcomes.add(bool(kept.all()))
    assert outcomes == {True, False}


def test_drop_rates_label_dropout_and_uniform_timesteps() -> None:
    n = 4000
    x, z, y = _batch(batch=n, hw=1)
    cfg = DDPMConfig(num_classes=10, latent_channels=3, semantic_channels=2, p_drop=0.2, class_dropout_prob=0.1)
    terms = DDPMTransport(cfg).per_sample_losses(ParamModel(n, 3, 2, 1, k=2), x, z, y, torch.Generator().manual_seed(0))
    # Binomial rates, n = 4000: std 0.0063 (p=0.2) and 0.0047 (p=0.1); tolerances are ~5 std.
    assert abs((~terms.semantic_kept).float().mean().item() - 0.2) < 0.032
    null = terms.labels == 10
    assert abs(null.float().mean().item() - 0.1) < 0.024
    assert torch.equal(terms.labels[~null], y[~null])  # undropped labels untouched
    # Uniform t on {0..999}: mean 499.5, std of the mean 288.7 / sqrt(4000) = 4.6; 5 std = 23.
    assert terms.t.min() >= 0 and terms.t.max() <= 999 and abs(terms.t.float().mean().item() - 499.5) < 23


@pytest.mark.parametrize("cz,learn_sigma,lambda_repa",
                         [(0, True, 0.0), (2, False, 0.0), (2, True, 0.5), (0, False, 0.5)])
def test_loss_keys_follow_the_spec(cz: int, learn_sigma: bool, lambda_repa: float) -> None:
    x, z, y = _batch(cz=cz)
    cfg = DDPMConfig(num_classes=10, latent_channels=3, semantic_channels=cz, learn_sigma=learn_sigma,
                     lambda_repa=lambda_repa)
    model = ParamModel(6, 3, cz, 4, k=2 if learn_sigma else 1, align_dim=5)
    target = torch.randn(6, 16, 5, generator=torch.Generator().manual_seed(9))
    losses = DDPMTransport(cfg).training_losses(model, x, z, y, torch.Generator().manual_seed(0), align_target=target)
    expected = {"loss", "loss/latent"} | ({"loss/semantic"} if cz else set())
    expected |= ({"loss/vlb"} if learn_sigma else set()) | ({"loss/repa"} if lambda_repa else set())
    assert set(losses) == expected
    if lambda_repa:
        repa = repa_alignment_loss(model.aligned, target)
        torch.testing.assert_close(losses["loss/repa"], repa.detach())
        rest = losses["loss/latent"] + losses.get("loss/semantic", 0) + losses.get("loss/vlb", 0)
        torch.testing.assert_close(losses["loss"], rest + lambda_repa * repa, rtol=1e-6, atol=1e-7)
        with pytest.raises(ValueError, match="align_target"):
            DDPMTransport(cfg).training_losses(model, x, z, y, torch.Generator().manual_seed(0))


def test_reproducible_from_seed_and_bad_inputs_rejected() -> None:
    x, z, y = _batch()
    transport = DDPMTransport(DDPMConfig(num_classes=10, latent_channels=3, semantic_channels=2, p_drop=0.3))
    model = ParamModel(6, 3, 2, 4, k=2)
    first = transport.training_losses(model, x, z, y, torch.Generator().manual_seed(11))
    again = transport.training_losses(model, x, z, y, torch.Generator().manual_seed(11))
    other = transport.training_losses(model, x, z, y, torch.Generator().manual_seed(12))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["loss"], other["loss"])
    with pytest.raises(ValueError, match="learn_sigma"):  # the network's variance head is missing
        transport.training_losses(ParamModel(6, 3, 2, 4, k=1), x, z, y, torch.Generator())
    with pytest.raises(ValueError, match="z must be"):
        transport.training_losses(model, x, None, y, torch.Generator())
    with pytest.raises(ValueError, match="Generator"):
        transport.training_losses(model, x, z, y, None)
    with pytest.raises(ValueError, match="labels"):
        transport.training_losses(model, x, z, y + 20, torch.Generator())


# ----------------------------------------------------------------------------
# Respacing


def test_space_timesteps_and_respaced_betas_reproduce_cumulative_alphas() -> None:
    for count in (2, 10, 25, 100, 250, 1000):
        kept = space_timesteps(1000, count)
        assert kept == reference_kept(1000, count), count
    assert space_timesteps(1000, 250)[:3] == [0, 4, 8] and space_timesteps(1000, 250)[-1] == 999
    sections = space_timesteps(300, [10, 15, 20])  # improved-DDPM docstring example
    assert len(sections) == 45 and [sum(lo <= s < lo + 100 for s in sections) for lo in (0, 100, 200)] == [10, 15, 20]
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(100, 101)

    base = GaussianDiffusion(named_beta_schedule("linear", 1000))
    ref = reference_schedule(1000)
    kept, spaced = respace(base, 250)
    assert spaced.num_timesteps == 250
    # The respaced chain's marginals equal the original ones at the kept steps (float64 round trip).
    torch.testing.assert_close(spaced.alphas_cumprod, torch.tensor([ref["alphas_cumprod"][k] for k in kept], dtype=F64),
                               rtol=1e-12, atol=0)
    # Respaced posterior quantities follow from the respaced betas by the same formulas.
    respaced_ref = schedule_from_betas([1 - a / b for a, b in zip(
        [ref["alphas_cumprod"][k] for k in kept], [1.0] + [ref["alphas_cumprod"][k] for k in kept[:-1]])])
    for name in ("posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        torch.testing.assert_close(getattr(spaced, name), torch.tensor(respaced_ref[name], dtype=F64),
                                   rtol=1e-10, atol=0)
    _, identity = respace(base, 1000)
    torch.testing.assert_close(identity.betas, base.betas, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------
# Sampling on Gaussian data with the exact epsilon (float64)

MU_X, S_X = [0.5, -1.0], [0.3, 2.0]  # latent: 2 channels, different scales on purpose
MU_Z, S_Z = [0.0], [1.0]
V_X, V_Z = 1.0, -1.0  # variance outputs: beta for x, tilde-beta for z (checks the routing)


def exact_eps_model(ref: dict[str, list[float]]):
    """E[eps | x_t] for data N(mu, s^2) per channel, evaluated at the ORIGINAL timestep t:
    sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)."""

    def eps(state: torch.Tensor, ab: float, mu: list[float], s: list[float]) -> torch.Tensor:
        m = torch.tensor(mu, dtype=F64).view(1, -1, 1, 1)
        var = torch.tensor(s, dtype=F64).view(1, -1, 1, 1) ** 2
        return math.sqrt(1 - ab) * (state - math.sqrt(ab) * m) / (ab * var + 1 - ab)

    def model(x, t, y, z=None):
        ab = ref["alphas_cumprod"][int(t[0])]
        out_x = torch.cat([eps(x, ab, MU_X, S_X), torch.full_like(x, V_X)], dim=1)
        out_z = torch.cat([eps(z, ab, MU_Z, S_Z), torch.full_like(z, V_Z)], dim=1)
        return BackboneOutput(out_x, out_z, None)

    return model


def chain_moments(ref: dict[str, list[float]], kept: list[int], mu: float, s: float, v: float) -> tuple[float, float]:
    """Mean and std after the respaced ancestral chain from N(0, 1), in closed form: each step is
    x <- A x + b + sigma xi with the exact eps affine in x (independent of the sampler code)."""
    sub = schedule_from_betas([1 - a / b for a, b in zip(
        [ref["alphas_cumprod"][k] for k in kept], [1.0] + [ref["alphas_cumprod"][k] for k in kept[:-1]])])
    mean, var = 0.0, 1.0
    for i in reversed(range(len(kept))):
        ab = sub["alphas_cumprod"][i]
        a = math.sqrt(1 - ab) / (ab * s * s + 1 - ab)  # eps = a (x - sqrt(ab) mu)
        scale_x0, shift_x0 = (1 - math.sqrt(1 - ab) * a) / math.sqrt(ab), math.sqrt(1 - ab) * a * mu
        A = sub["posterior_mean_coef1"][i] * scale_x0 + sub["posterior_mean_coef2"][i]
        b = sub["posterior_mean_coef1"][i] * shift_x0
        frac = (v + 1) / 2
        step_var = math.exp(frac * math.log(sub["betas"][i]) + (1 - frac) * sub["posterior_log_variance_clipped"][i])
        mean, var = A * mean + b, A * A * var + (step_var if i > 0 else 0.0)
    return mean, math.sqrt(var)


@pytest.mark.parametrize("num_steps", [250, 10])
def test_exact_eps_sampler_reaches_gaussian_data(num_steps: int) -> None:
    ref = reference_schedule(1000)
    batch, side = 256, 16  # 65536 independent draws per channel
    x, z = sample_ddpm(exact_eps_model(ref), (batch, 2, side, side), (batch, 1, side, side),
                       torch.zeros(batch, dtype=torch.long), None, num_steps,
                       generator=torch.Generator().manual_seed(0), dtype=F64)
    kept = reference_kept(1000, num_steps)
    n = batch * side * side
    errors = []
    for samples, mus, ss, v in ((x, MU_X, S_X, V_X), (z, MU_Z, S_Z, V_Z)):
        for c, (mu, s) in enumerate(zip(mus, ss)):
            chain_mean, chain_std = chain_moments(ref, kept, mu, s, v)
            got = samples[:, c].flatten()
            # Monte Carlo: std error of the mean chain_std / sqrt(n), of the std chain_std / sqrt(2n); 5 of each.
            assert abs(got.mean().item() - chain_mean) < 5 * chain_std / math.sqrt(n)
            assert abs(got.std().item() - chain_std) < 5 * chain_std / math.sqrt(2 * n)
            errors.append(abs(chain_std / s - 1))
            assert abs(chain_mean - mu) < 1e-3 * max(1.0, abs(mu))  # prior mismatch sqrt(abar_T) mu ~ 1e-5
    if num_steps == 250:
        # DiT's 250 steps: the chain's std is within 3% of the data std in every channel
        # (discretisation error of DDPM with these fixed variances: 1.4%, 0.5%, 1.7%).
        assert max(errors) < 0.03
        sample_err = abs(x[:, 1].std().item() / S_X[1] - 1)
        assert sample_err < 0.03 + 5 / math.sqrt(2 * n)
    else:
        # 10 steps are visibly off (>= 10% in every channel): the tolerance above is not vacuous.
        assert min(errors) > 0.10


def test_sampler_feeds_original_timesteps_and_fixed_variance_path() -> None:
    seen: list[float] = []

    def spy(x, t, y, z=None):
        seen.append(float(t[0]))
        assert torch.equal(t, torch.full_like(t, t[0].item()))
        return BackboneOutput(torch.zeros_like(x), None, None)  # C_x channels: DiT's fixed large variance

    x, z = sample_ddpm(spy, (2, 3, 4, 4), None, torch.tensor([1, 2]), None, 25, generator=torch.Generator())
    assert z is None and x.shape == (2, 3, 4, 4) and torch.isfinite(x).all()
    assert seen == [float(k) for k in reversed(reference_kept(1000, 25))]


def test_guided_two_step_chain_matches_manual_computation() -> None:
    """Two respaced steps (t = 999, then 0) with CFG (latent only) + RG on epsilon, recomputed by hand.
    The CFG interval [0.5, 1] is active at t = 999 (s = 1) and not at t = 0 (s = 0): s = t / (T - 1)."""

    def net(x, t, y, z=None):
        yy = y.to(x.dtype).view(-1, 1, 1, 1)
        ex = 0.5 * x + 0.3 * z.sum(1, keepdim=True) + 0.1 * yy
        ez = 0.2 * z - 0.1 * x.mean(1, keepdim=True) + 0.05 * yy
        return BackboneOutput(torch.cat([ex, torch.tanh(x + 0.1 * yy)], 1),
                              torch.cat([ez, 0.5 * torch.tanh(z - yy)], 1), None)

    w, wr, null = 2.0, 1.5, 10
    guidance = Guidance(latent_channels=2, semantic_channels=1, cfg_scale=w, rg_scale=wr, null_class=null,
                        interval=(0.5, 1.0))
    y = torch.tensor([3, 7])
    x_out, z_out = sample_ddpm(net, (2, 2, 3, 3), (2, 1, 3, 3), y, guidance, 2,
                               generator=torch.Generator().manual_seed(6), dtype=F64)

    ref = reference_schedule(1000)
    g = torch.Generator().manual_seed(6)
    x, z = torch.randn(2, 2, 3, 3, generator=g, dtype=F64), torch.randn(2, 1, 3, 3, generator=g, dtype=F64)
    kept = [0, 999]
    sub = schedule_from_betas([1 - ref["alphas_cumprod"][0], 1 - ref["alphas_cumprod"][999] / ref["alphas_cumprod"][0]])
    for i in (1, 0):
        t = torch.full((2,), float(kept[i]), dtype=F64)
        c, u, r = net(x, t, y, z), net(x, t, torch.full_like(y, null), z), net(x, t, y, torch.zeros_like(z))
        # eq. 13 + CFG (GUIDANCE.md): f_c + (w-1)(f_c - f_u) + (w_r-1)(f_c - f_r); CFG on latent only.
        w_step = w if kept[i] == 999 else 1.0  # inside the interval only at s = 1
        ex = c.x[:, :2] + (w_step - 1) * (c.x[:, :2] - u.x[:, :2]) + (wr - 1) * (c.x[:, :2] - r.x[:, :2])
        ez = c.z[:, :1] + (wr - 1) * (c.z[:, :1] - r.z[:, :1])
        new = []
        for state, eps, v in ((x, ex, c.x[:, 2:]), (z, ez, c.z[:, 1:])):  # variance: conditional branch
            ab = sub["alphas_cumprod"][i]
            x0_hat = (state - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
            mean = sub["posterior_mean_coef1"][i] * x0_hat + sub["posterior_mean_coef2"][i] * state
            frac = (v + 1) / 2
            log_var = frac * math.log(sub["betas"][i]) + (1 - frac) * sub["posterior_log_variance_clipped"][i]
            new.append(mean if i == 0
                       else mean + torch.exp(0.5 * log_var) * torch.randn(state.shape, generator=g, dtype=F64))
        x, z = new
    # float64 throughout, same draws: agreement to rounding.
    torch.testing.assert_close(x_out, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z_out, z, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------
# A tiny joint DiT end to end


def test_tiny_joint_dit_trains_and_samples_with_cfg_and_rg() -> None:
    torch.manual_seed(0)  # parameter init only; the objective and sampler use explicit generators
    bcfg = BackboneConfig(hidden_size=64, depth=2, num_heads=4, input_size=8, patch_size=1, latent_channels=4,
                          semantic_channels=2, num_classes=10, fusion="merged", learn_sigma=True)
    model = JointDiT(bcfg)
    transport = DDPMTransport(DDPMConfig(num_classes=10, latent_channels=4, semantic_channels=2, p_drop=0.2))
    g = torch.Generator().manual_seed(0)
    y = torch.arange(16) % 10
    x = 0.5 * torch.randn(16, 4, 8, 8, generator=g) + (y.float() / 10).view(-1, 1, 1, 1)
    z = 0.5 * torch.randn(16, 2, 8, 8, generator=g) - (y.float() / 10).view(-1, 1, 1, 1)

    def eval_loss() -> float:
        with torch.no_grad():  # fixed draws so before/after are comparable
            return sum(transport.training_losses(model, x, z, y, torch.Generator().manual_seed(s))["loss"].item()
                       for s in range(4))

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    train_gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        loss = transport.training_losses(model, x, z, y, train_gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.9 * before, (before, after)  # zero-init heads start at eps = 0: loss ~ 2 + vlb

    model.eval()
    calls: list[int] = []
    model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    guidance = Guidance(latent_channels=4, semantic_channels=2, cfg_scale=2.4, rg_scale=1.5, null_class=10)
    ys = torch.tensor([1, 2, 3])
    xs, zs = sample_ddpm(model, (3, 4, 8, 8), (3, 2, 8, 8), ys, guidance, 5, generator=torch.Generator().manual_seed(2))
    assert (xs.shape == (3, 4, 8, 8) and zs.shape == (3, 2, 8, 8)
            and torch.isfinite(xs).all() and torch.isfinite(zs).all())
    assert calls == [9] * 5  # one batched call of 3 branches per step
    again = sample_ddpm(model, (3, 4, 8, 8), (3, 2, 8, 8), ys, guidance, 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(xs, again[0]) and torch.equal(zs, again[1])
    plain = sample_ddpm(model, (3, 4, 8, 8), (3, 2, 8, 8), ys, None, 5, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(xs, plain[0])  # guidance changes the trajectory


def test_all_weights_one_equals_the_unguided_sampler() -> None:
    """Every guidance weight at 1 (with an interval and a null class) gives exactly the
    unguided ancestral sampler, one single-branch call per step, on a net that depends on y and z."""

    def net(x, t, y, z=None):
        calls.append(x.shape[0])
        yy = y.to(x.dtype).view(-1, 1, 1, 1)
        ex = 0.5 * x + 0.3 * z.sum(1, keepdim=True) + 0.1 * yy
        return BackboneOutput(torch.cat([ex, torch.tanh(x)], 1), torch.cat([0.2 * z - 0.05 * yy, -z.tanh()], 1), None)

    y = torch.tensor([3, 7])
    outputs = []
    for guidance in (None, Guidance(latent_channels=2, semantic_channels=1, cfg_scale=1.0, rg_scale=1.0,
                                    cfg_channels="all", interval=(0.3, 0.6), null_class=10)):
        calls: list[int] = []
        outputs.append(sample_ddpm(net, (2, 2, 3, 3), (2, 1, 3, 3), y, guidance, 7,
                                   generator=torch.Generator().manual_seed(3), dtype=F64))
        assert calls == [2] * 7
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


@pytest.mark.parametrize("table", ["table1", "table3", "table4", "table6"])
def test_dit_rows_of_the_paper_grids_use_the_ddpm_transport(table) -> None:
    """The DiT rows of Tables 1, 3, 4 and 6 select this transport through the config key
    objective.transport (learned variance, DDPM sampling); Table 1's SiT rows stay on the flow."""
    from bench.launch.grids import expand

    cells = expand(table)
    dit = [c for c in cells if table != "table1" or "dit" in c.name]
    assert dit and all(c.cfg.objective.transport == "ddpm" and c.cfg.model.learn_sigma
                       and c.cfg.eval.sampler == "ddpm" for c in dit)
    if table == "table1":
        sit = [c for c in cells if "sit" in c.name]
        assert len(sit) == len(dit) == 6 and all(c.cfg.objective.transport == "flow" for c in sit)
