"""Flow samplers against a float64 Gaussian oracle (closed-form optimal velocity).

Data per channel c: x1 ~ N(mu_c, s_c^2); noise N(0, 1). Along x_t = a_t x1 + b_t eps the optimal
velocity E[a'_t x1 + b'_t eps | x_t] and the score are closed form (jointly Gaussian):
    V_t = a^2 s^2 + b^2,   v = a' mu + (a' a s^2 + b' b) / V_t * (x - a mu),   score = -(x - a mu) / V_t.
The exact ODE flow maps x0 to mu + s * x0 (the unique increasing affine map N(0,1) -> N(mu, s^2)).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from models.flow import FlowPath
from models.flow_sampling import (
    sample_flow,
    sample_ode_euler,
    sample_ode_heun,
    sample_sde_euler_maruyama,
)
from models.guidance import Guidance

F64 = torch.float64  # the oracle and its references run in float64

# Per-channel data distribution: latent has 2 channels, semantic 1 (different scales on purpose).
MU_X, S_X = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.5, 2.0], dtype=F64)
MU_Z, S_Z = torch.tensor([1.0], dtype=F64), torch.tensor([1.5], dtype=F64)


class Out(NamedTuple):
    x: torch.Tensor
    z: torch.Tensor | None
    aligned: torch.Tensor | None


def path_coefficients(path: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(a, a', b, b') written out independently of models.flow."""
    if path == "linear":
        return t, torch.ones_like(t), 1 - t, -torch.ones_like(t)
    h = math.pi / 2
    return torch.sin(h * t), h * torch.cos(h * t), torch.cos(h * t), -h * torch.sin(h * t)


def oracle_velocity(x: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, s: torch.Tensor,
                    path: str = "linear") -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
    a, da, b, db = path_coefficients(path, t)
    mu, s = mu.to(x.dtype).view(1, -1, 1, 1), s.to(x.dtype).view(1, -1, 1, 1)
    var = a**2 * s**2 + b**2
    return da * mu + (da * a * s**2 + db * b) / var * (x - a * mu)


def oracle_score(x, t, mu, s, path="linear"):
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
    a, _, b, _ = path_coefficients(path, t)
    mu, s = mu.view(1, -1, 1, 1), s.view(1, -1, 1, 1)
    return -(x - a * mu) / (a**2 * s**2 + b**2)


class GaussianOracle:
    """Network stand-in with the README signature; counts calls and batch sizes."""

    def __init__(self, path: str = "linear") -> None:
        self.path, self.batches = path, []

    def __call__(self, x, t, y, z=None):
        self.batches.append(x.shape[0])
        vz = None if z is None else oracle_velocity(z, t, MU_Z, S_Z, self.path)
        return Out(oracle_velocity(x, t, MU_X, S_X, self.path), vz, None)


def oracle_predict(path: str = "linear"):
    def predict(x, z, t):
        vz = None if z is None else oracle_velocity(z, t, MU_Z, S_Z, path)
        return oracle_velocity(x, t, MU_X, S_X, path), vz
    return predict


def exact_endpoint(x0, mu, s):
    return mu.view(1, -1, 1, 1) + s.view(1, -1, 1, 1) * x0


def noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_velocity_to_score_matches_closed_form(path):
    x = noise((6, 2, 3, 3), 0)
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.8, 0.95], dtype=F64)
    got = FlowPath(path).velocity_to_score(oracle_velocity(x, t, MU_X, S_X, path), x, t)
    # float64 algebra on O(1) numbers: agreement to ~1e-12 relative, tolerance 1e-10.
    torch.testing.assert_close(got, oracle_score(x, t, MU_X, S_X, path), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_interpolate_and_target(path):
    x1, eps = noise((4, 2, 2, 2), 1), noise((4, 2, 2, 2), 2)
    t = torch.tensor([0.0, 0.25, 0.7, 1.0], dtype=F64)
    a, da, b, db = (c.view(-1, 1, 1, 1) for c in path_coefficients(path, t))
    x_t, u_t = FlowPath(path).interpolate(t, x1, eps)
    torch.testing.assert_close(x_t, a * x1 + b * eps, rtol=0, atol=1e-14)
    torch.testing.assert_close(u_t, da * x1 + db * eps, rtol=0, atol=1e-14)
    if path == "linear":  # t = 1 is data, t = 0 is noise, u = x1 - eps
        torch.testing.assert_close(x_t[-1], x1[-1]), torch.testing.assert_close(x_t[0], eps[0])
        torch.testing.assert_close(u_t, x1 - eps, rtol=0, atol=1e-14)


@pytest.mark.parametrize("sampler, order", [(sample_ode_euler, 1), (sample_ode_heun, 2)])
@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_ode_endpoint_converges_to_exact_map(sampler, order, path):
    """Deterministic: no Monte-Carlo error; the endpoint error must shrink like h^order."""
    x0, z0 = noise((64, 2, 2, 2), 3), noise((64, 1, 2, 2), 4)
    errors = []
    for n in (10, 40, 160):  # grid points -> 9, 39, 159 steps
        x1, z1 = sampler(oracle_predict(path), x0, z0, n)
        err = max((x1 - exact_endpoint(x0, MU_X, S_X)).abs().max(), (z1 - exact_endpoint(z0, MU_Z, S_Z)).abs().max())
        errors.append(float(err))
    # Step ratios are 39/9 = 4.3 and 159/39 = 4.1, so order p shrinks the error ~4^p: require
    # at least 3x per refinement for Euler and 10x for Heun (asymptotic 4x / 16x, margin for
    # pre-asymptotic behaviour at 9 steps).
    min_ratio = 3.0 if order == 1 else 10.0
    assert errors[0] / errors[1] > min_ratio and errors[1] / errors[2] > min_ratio, errors
    # Absolute bound at 159 steps: global error C h^p; the error is affine in x0 (max |x0| ~ 3.1
    # here) and largest on the s = 2 channel, measured C ~ 9 (Euler) and ~ 5 (Heun) on these
    # data, so C = 10 with h = 1/159 gives bounds 0.063 (Euler) and 4e-4 (Heun).
    h = 1.0 / 159
    assert errors[2] < 10.0 * h**order, errors


def test_ode_latent_only_and_nfe():
    calls = []

    def predict(x, z, t):
        calls.append(float(t[0]))
        return oracle_velocity(x, t, MU_X, S_X), None

    x0 = noise((8, 2, 2, 2), 5)
    x1, z1 = sample_ode_euler(predict, x0, None, 5)
    assert z1 is None and calls == [0.0, 0.25, 0.5, 0.75]  # SiT grid linspace(0, 1, 5), 4 steps
    calls.clear()
    sample_ode_heun(predict, x0, None, 5)
    assert len(calls) == 8 and calls[-1] == 1.0  # 2 evaluations per step, corrector at t = 1


def reference_sde(x, z, num_steps, gen, last_step, h):
    """The SDE of the module docstring written out for the linear path, sigma form (w = 1 - t)."""
    h = 0.0 if last_step is None else h
    ts = torch.linspace(0, 1 - h, num_steps, dtype=F64).tolist()
    dt = ts[1] - ts[0]
    states = [(x, MU_X, S_X), (z, MU_Z, S_Z)]
    for t in ts[:-1]:
        new = []
        for state, mu, s in states:  # noise drawn for x, then z
            v = oracle_velocity(state, t, mu, s)
            drift = v + (1 - t) * (t * v - state) / (1 - t)
            new.append((state + drift * dt
                        + math.sqrt(2 * (1 - t) * dt) * torch.randn(state.shape, generator=gen, dtype=F64), mu, s))
        states = new
    out, t = [], ts[-1]
    for state, mu, s in states:
        v = oracle_velocity(state, t, mu, s)
        score = (t * v - state) / (1 - t)
        if last_step == "Mean":
            state = state + (v + (1 - t) * score) * h
        elif last_step == "Euler":
            state = state + v * h
        elif last_step == "Tweedie":
            state = (state + (1 - t) ** 2 * score) / t
        out.append(state)
    return out


@pytest.mark.parametrize("last_step", ["Mean", "Euler", "Tweedie", None])
def test_sde_equals_reference_implementation(last_step):
    x0, z0 = noise((4, 2, 3, 3), 11), noise((4, 1, 3, 3), 12)
    got = sample_sde_euler_maruyama(oracle_predict(), x0, z0, 5, torch.Generator().manual_seed(3),
                                    last_step=last_step, last_step_size=0.1)
    ref = reference_sde(x0, z0, 5, torch.Generator().manual_seed(3), last_step, 0.1)
    for a, b in zip(got, ref):  # same float64 operations up to ordering: 1e-12
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def sde_chain_moments(mu, s, num_steps, last_step_size):
    """Exact mean/std of the discrete EM chain of the module docstring for this Gaussian
    (linear path, w = 1 - t): every step is affine in x plus independent Gaussian noise."""
    ts = torch.linspace(0, 1 - last_step_size, num_steps, dtype=F64).tolist()
    dt = ts[1] - ts[0]
    m, var = 0.0, 1.0
    for i, t in enumerate(ts):
        h = dt if i < num_steps - 1 else last_step_size
        v_t = t * t * s * s + (1 - t) ** 2
        w = 1 - t
        k = (t * s * s - (1 - t)) / v_t - w / v_t  # d(drift)/dx: velocity slope + w * score slope
        m = m + h * (mu + k * (m - t * mu))
        var = (1 + h * k) ** 2 * var + (2 * w * h if i < num_steps - 1 else 0.0)
    return m, math.sqrt(var)


def channel_moments(x):
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))


SDE_SAMPLES = 625 * 64  # per channel: batch 625 x 8 x 8 independent elements


def run_sde(num_steps, last_step_size, seed=0):
    x0, z0 = noise((625, 2, 8, 8), seed), noise((625, 1, 8, 8), seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    return sample_sde_euler_maruyama(oracle_predict(), x0, z0, num_steps, gen, last_step="Mean",
                                     last_step_size=last_step_size)


def test_sde_matches_exact_chain_moments():
    """The sampler's output distribution equals the EM chain's (computed exactly above)."""
    for num_steps in (10, 40, 160):
        x, z = run_sde(num_steps, 0.04)
        for sample, mus, ss in ((x, MU_X, S_X), (z, MU_Z, S_Z)):
            mean, std = channel_moments(sample)
            for c in range(len(mus)):
                m_ref, sd_ref = sde_chain_moments(float(mus[c]), float(ss[c]), num_steps, 0.04)
                # 5 Monte-Carlo standard errors: sd/sqrt(N) for the mean, sd/sqrt(2N) for the std.
                assert abs(float(mean[c]) - m_ref) < 5 * sd_ref / math.sqrt(SDE_SAMPLES)
                assert abs(float(std[c]) - sd_ref) < 5 * sd_ref / math.sqrt(2 * SDE_SAMPLES)


def test_sde_converges_to_data_distribution():
    """Shrinking the grid (and the last step with it, 0.4 / num_steps) carries N(0, I) to the data."""
    errors = []
    for num_steps in (10, 40, 160):
        x, _ = run_sde(num_steps, 0.4 / num_steps)
        _, std = channel_moments(x)
        errors.append(abs(float(std[1]) - float(S_X[1])))  # the s = 2 channel has the largest bias
    # Exact chain bias for s = 2: 0.19, 0.049, 0.012 (first order); MC std error of the sample
    # std is 2 / sqrt(2 * 40000) = 0.007, so 0.049 vs 0.012 is separated by > 4 MC sigma.
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.0125 + 5 * 2.0 / math.sqrt(2 * SDE_SAMPLES), errors
    x, z = run_sde(160, 0.4 / 160)
    for sample, mus, ss in ((x, MU_X, S_X), (z, MU_Z, S_Z)):
        mean, std = channel_moments(sample)
        # bias <= 1% of s at 160 steps (chain), plus 5 MC standard errors.
        assert torch.all((mean - mus).abs() < 5 * ss / math.sqrt(SDE_SAMPLES))
        assert torch.all((std - ss).abs() < 0.01 * ss + 5 * ss / math.sqrt(2 * SDE_SAMPLES))


@pytest.mark.parametrize("method, calls", [("euler", 9), ("heun", 18), ("sde", 10)])
def test_sample_flow_entry_point(method, calls):
    guidance = Guidance(latent_channels=2, semantic_channels=1)
    oracle = GaussianOracle()
    y = torch.zeros(16, dtype=torch.long)
    gen = torch.Generator().manual_seed(7)
    x, z = sample_flow(oracle, (16, 2, 4, 4), (16, 1, 4, 4), y, guidance, method, 10, generator=gen,
                       dtype=torch.float64)
    assert oracle.batches == [16] * calls  # one unguided network call per evaluation
    # Same seed -> identical; the initial noise is the generator's first draws (x, then z).
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn((16, 2, 4, 4), generator=gen, dtype=F64)
    z0 = torch.randn((16, 1, 4, 4), generator=gen, dtype=F64)
    if method == "euler":
        ref = sample_ode_euler(oracle_predict(), x0, z0, 10)
    elif method == "heun":
        ref = sample_ode_heun(oracle_predict(), x0, z0, 10)
    else:
        ref = sample_sde_euler_maruyama(oracle_predict(), x0, z0, 10, gen)
    torch.testing.assert_close(x, ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(z, ref[1], rtol=0, atol=1e-12)
    x2, _ = sample_flow(oracle, (16, 2, 4, 4), (16, 1, 4, 4), y, guidance, method, 10,
                        generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert not torch.allclose(x, x2)


def test_sample_flow_guided_is_one_call_per_step():
    oracle = GaussianOracle()
    guidance = Guidance(latent_channels=2, semantic_channels=1, cfg_scale=2.0, null_class=10, rg_scale=1.5)
    y = torch.arange(4)
    x, z = sample_flow(oracle, (4, 2, 2, 2), (4, 1, 2, 2), y, guidance, "sde", 6,
                       generator=torch.Generator().manual_seed(0))
    assert oracle.batches == [12] * 6 and x.dtype == torch.float32  # 3 branches, SDE: 6 NFE


def test_sample_flow_latent_only_and_errors():
    oracle = GaussianOracle()
    guidance = Guidance(latent_channels=2, semantic_channels=0)
    y = torch.zeros(3, dtype=torch.long)
    x, z = sample_flow(oracle, (3, 2, 2, 2), None, y, guidance, "euler", 4, generator=torch.Generator())
    assert z is None and x.shape == (3, 2, 2, 2)
    with pytest.raises(ValueError, match="method"):
        sample_flow(oracle, (3, 2, 2, 2), None, y, guidance, "dopri5", 4, generator=torch.Generator())
    with pytest.raises(ValueError, match="shape_z"):
        sample_flow(oracle, (3, 2, 2, 2), (3, 1, 2, 2), y, guidance, "euler", 4, generator=torch.Generator())
    with pytest.raises(ValueError, match="num_steps"):
        sample_flow(oracle, (3, 2, 2, 2), None, y, guidance, "euler", 1, generator=torch.Generator())
    with pytest.raises(ValueError, match="last_step"):
        sample_sde_euler_maruyama(oracle_predict(), torch.zeros(1, 2, 1, 1, dtype=F64), None, 4, torch.Generator(),
                                  last_step="mean")


class ConditionedNet:
    """A network whose velocity depends on x, z, t and the label (unlike the Gaussian oracle, which
    ignores y and z), so CFG and RG really change its output. Records its batch sizes."""

    def __init__(self) -> None:
        self.batches = []

    def __call__(self, x, t, y, z=None):
        self.batches.append(x.shape[0])
        tb, yb = t.view(-1, 1, 1, 1), y.to(x.dtype).view(-1, 1, 1, 1)
        vx = -0.8 * x + 0.3 * torch.tanh(z.sum(1, keepdim=True)) + 0.2 * yb * (1 - tb) + 0.1 * tb
        vz = -0.5 * z + 0.1 * x.mean(1, keepdim=True) - 0.05 * yb
        return Out(vx, vz, None)


@pytest.mark.parametrize("method", ["euler", "heun", "sde"])
def test_all_weights_one_sampler_equals_unguided(method):
    """Every guidance weight at 1 (any channels, an interval, a null class) gives exactly
    the unguided sampler, with one single-branch call per evaluation."""
    y = torch.tensor([0, 3, 7, 9])
    runs = []
    for guidance in (Guidance(latent_channels=2, semantic_channels=1),
                     Guidance(latent_channels=2, semantic_channels=1, cfg_scale=1.0, rg_scale=1.0,
                              cfg_channels="all", rg_channels="latent", interval=(0.2, 0.7), null_class=10)):
        net = ConditionedNet()
        runs.append(sample_flow(net, (4, 2, 3, 3), (4, 1, 3, 3), y, guidance, method, 6,
                                generator=torch.Generator().manual_seed(1), dtype=F64) + (net.batches,))
    (x0, z0, calls0), (x1, z1, calls1) = runs
    assert torch.equal(x0, x1) and torch.equal(z0, z1) and calls0 == calls1 and set(calls1) == {4}


def test_guided_sde_equals_separate_calls_with_interval_on_one_minus_t():
    """The guided sampler (CFG on latent channels with an interval, plus RG) equals the
    same SDE driven by three separate network calls combined by GUIDANCE.md's rule, with the
    interval read on the noise level s = 1 - t; and it makes one batched call per evaluation."""
    w, w_r, null, low, high = 2.4, 1.5, 10, 0.5, 1.0
    guidance = Guidance(latent_channels=2, semantic_channels=1, cfg_scale=w, rg_scale=w_r, null_class=null,
                        interval=(low, high))
    y = torch.tensor([1, 4, 8])
    net = ConditionedNet()
    x, z = sample_flow(net, (3, 2, 2, 2), (3, 1, 2, 2), y, guidance, "sde", 8,
                       generator=torch.Generator().manual_seed(5), dtype=F64)
    # one call per evaluation: 3 branches while s = 1 - t is inside [0.5, 1] (t = 0, 0.14, 0.27,
    # 0.41 on linspace(0, 0.96, 8)), then 2 (the class-dropped branch is skipped outside it)
    assert net.batches == [9] * 4 + [6] * 4

    separate = ConditionedNet()

    def manual(xs, zs, t):
        c = separate(xs, t, y, zs)
        u = separate(xs, t, torch.full_like(y, null), zs)
        r = separate(xs, t, y, torch.zeros_like(zs))
        inside = ((1 - t >= low) & (1 - t <= high)).to(F64).view(-1, 1, 1, 1)
        vx = c.x + inside * (w - 1) * (c.x - u.x) + (w_r - 1) * (c.x - r.x)  # CFG on latents only
        vz = c.z + (w_r - 1) * (c.z - r.z)
        return vx, vz

    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn((3, 2, 2, 2), generator=gen, dtype=F64)
    z0 = torch.randn((3, 1, 2, 2), generator=gen, dtype=F64)
    ref = sample_sde_euler_maruyama(manual, x0, z0, 8, gen)
    # the same float64 operations, reordered: agreement to rounding
    torch.testing.assert_close(x, ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(z, ref[1], rtol=0, atol=1e-12)
    # the interval mattered: without it (CFG everywhere) the result differs
    everywhere = sample_flow(ConditionedNet(), (3, 2, 2, 2), (3, 1, 2, 2), y,
                             Guidance(latent_channels=2, semantic_channels=1, cfg_scale=w, rg_scale=w_r,
                                      null_class=null), "sde", 8,
                             generator=torch.Generator().manual_seed(5), dtype=F64)
    assert not torch.allclose(everywhere[0], x)


def test_sde_defaults_are_sits():
    """Sample_flow's SDE defaults are SiT's (sample_ddp.py): 250 evaluations on
    linspace(0, 0.96, 250); the last one is the deterministic "Mean" step of size 0.04 to t = 1."""
    times = []

    def spy(x, t, y, z=None):
        times.append(float(t[0]))
        return Out(-x, None, None)

    guidance = Guidance(latent_channels=2, semantic_channels=0)
    y = torch.zeros(2, dtype=torch.long)
    x = sample_flow(spy, (2, 2, 2, 2), None, y, guidance, generator=torch.Generator().manual_seed(0), dtype=F64)[0]
    assert len(times) == 250
    torch.testing.assert_close(torch.tensor(times, dtype=F64), torch.linspace(0, 0.96, 250, dtype=F64),
                               rtol=0, atol=1e-12)
    # explicit SiT settings reproduce the defaults bit for bit (same draws)
    explicit = sample_flow(spy, (2, 2, 2, 2), None, y, guidance, "sde", 250, generator=torch.Generator().manual_seed(0),
                           dtype=F64, diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean",
                           last_step_size=0.04)[0]
    assert torch.equal(x, explicit)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_flow_loss_of_the_optimal_velocity_has_the_known_value(path):
    """The joint flow loss against a known answer. For Gaussian data the optimal velocity is
    E[u | x_t], so at that prediction the expected loss given t is the conditional variance
    Var(u | x_t) = Var(u) - Cov(u, x_t)^2 / Var(x_t) per element, averaged per modality and
    summed with lambda_z; a prediction off by a constant c adds exactly c^2 in expectation."""
    from models.flow import FlowConfig, FlowTransport

    batch, side, lambda_z = 2000, 4, 0.5
    data = torch.Generator().manual_seed(0)
    x1 = MU_X.view(1, -1, 1, 1) + S_X.view(1, -1, 1, 1) * torch.randn(batch, 2, side, side, generator=data, dtype=F64)
    z1 = MU_Z.view(1, -1, 1, 1) + S_Z.view(1, -1, 1, 1) * torch.randn(batch, 1, side, side, generator=data, dtype=F64)
    transport = FlowTransport(FlowConfig(num_classes=1, latent_channels=2, semantic_channels=1, path=path,
                                         lambda_z=lambda_z, class_dropout_prob=0.0))
    y = torch.zeros(batch, dtype=torch.long)
    t = torch.rand(batch, generator=torch.Generator().manual_seed(1), dtype=F64)  # the loss's first draw

    def conditional_variance(s):  # (B, C): Var(u | x_t) for each sample's t and each channel's std s
        a, da, b, db = (c.view(-1, 1) for c in path_coefficients(path, t))
        s2 = s.view(1, -1) ** 2
        return da**2 * s2 + db**2 - (a * da * s2 + b * db) ** 2 / (a**2 * s2 + b**2)

    vx, vz = conditional_variance(S_X), conditional_variance(S_Z)
    expected = (vx.mean(1) + lambda_z * vz.mean(1)).mean()
    # (v - u) is N(0, V) per element: its square has variance 2 V^2; per sample the modality means
    # average 2*16 and 1*16 elements. Standard error of the batch mean, float64 throughout.
    var_i = 2 * (vx**2).sum(1) / (2 * side * side) ** 2 * side * side \
        + lambda_z**2 * 2 * (vz**2).sum(1) / (side * side) ** 2 * side * side
    stderr = float(var_i.sum().sqrt() / batch)
    for offset in (0.0, 0.3):
        class Shifted(GaussianOracle):
            def __call__(self, x, t, y, z=None):
                out = super().__call__(x, t, y, z)
                return Out(out.x + offset, out.z + offset, None)

        losses = transport.training_losses(Shifted(path), x1, z1, y, torch.Generator().manual_seed(1))
        want = float(expected) + (1 + lambda_z) * offset**2
        assert abs(float(losses["loss"]) - want) < 5 * stderr + 1e-12, (float(losses["loss"]), want, stderr)
    assert stderr < 0.01 * float(expected)  # the check resolves errors of about 5% of the loss
