"""Diffusion maths on cases with known answers."""
import math

import pytest
import torch

from models.default_dtype import default_dtype
from models.diffusion import (
    DDIMSampler,
    EpsPrediction,
    PingPongSampler,
    RectifiedFlowSchedule,
    RFVelocity,
    VPCosineSchedule,
    VPrediction,
    X0Prediction,
    apply_guidance,
    make_parameterization,
)

SCHEDULES = [VPCosineSchedule(), RectifiedFlowSchedule()]


@pytest.fixture(autouse=True)
def float64():
    """Exact maths in float64, restored afterwards so other test modules keep float32."""
    with default_dtype(torch.float64):
        yield


def gaussian_x0(z, t, schedule, mu, s):
    """E[x0 | z_t] for data x0 ~ N(mu, s^2 I): the ideal denoiser."""
    a, sig = schedule.alpha_sigma(t)
    a, sig = a[:, None], sig[:, None]
    return mu + a * s**2 / (a**2 * s**2 + sig**2) * (z - a * mu)


def exact_flow(z1, t_from, t_to, schedule, mu, s):
    """Probability-flow ODE map for Gaussian data: (z - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) is invariant."""
    a1, s1 = schedule.alpha_sigma(t_from)
    a0, s0 = schedule.alpha_sigma(t_to)
    u = (z1 - a1 * mu) / math.sqrt(a1**2 * s**2 + s1**2)
    return a0 * mu + math.sqrt(a0**2 * s**2 + s0**2) * u


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_schedule_endpoints_and_inverse(schedule):
    t = torch.tensor([0.0, 1e-6, 0.25, 0.5, 0.75, 1.0 - 1e-6, 1.0])
    a, s = schedule.alpha_sigma(t)
    assert a[0] == pytest.approx(1.0, abs=1e-4) and s[0] == pytest.approx(0.0, abs=1e-4)
    assert a[-1] == pytest.approx(0.0, abs=1e-4) and s[-1] == pytest.approx(1.0, abs=1e-4)
    assert torch.all(a[1:] <= a[:-1]) and torch.all(s[1:] >= s[:-1])
    mid = t[1:-1]
    assert torch.allclose(schedule.t_from_logsnr(schedule.logsnr(mid)), mid, atol=1e-7)
    assert torch.allclose(schedule.snr(mid), (a[1:-1] / s[1:-1]) ** 2, rtol=1e-6)


def test_vp_cosine_matches_formula():
    sch = VPCosineSchedule(-20, 20)
    t = torch.linspace(0, 1, 11)
    b = math.atan(math.exp(-10))
    a = math.atan(math.exp(10)) - b
    expected = -2 * torch.log(torch.tan(a * t + b))
    assert torch.allclose(sch.logsnr(t), expected)
    assert sch.logsnr(torch.tensor(0.0)) == pytest.approx(20, abs=1e-6)
    assert sch.logsnr(torch.tensor(1.0)) == pytest.approx(-20, abs=1e-6)
    al, si = sch.alpha_sigma(t)
    assert torch.allclose(al**2 + si**2, torch.ones_like(t))


def test_rectified_flow_coefficients():
    t = torch.tensor([0.1, 0.5, 0.9])
    a, s = RectifiedFlowSchedule().alpha_sigma(t)
    assert torch.allclose(a, 1 - t) and torch.allclose(s, t)
    assert torch.allclose(RectifiedFlowSchedule().snr(t), ((1 - t) / t) ** 2)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["v", "eps", "x0"])
def test_parameterizations_round_trip(schedule, kind):
    torch.manual_seed(0)
    param = make_parameterization(kind, schedule)
    x0, eps = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    z = schedule.add_noise(x0, eps, t)
    target = param.target(x0, eps, t)
    assert torch.allclose(param.to_x0(target, z, t), x0, atol=1e-8)
    assert torch.allclose(param.to_eps(target, z, t), eps, atol=1e-8)
    assert torch.allclose(param.eps_from_x0(z, x0, t), eps, atol=1e-8)
    assert torch.allclose(param.x0_from_eps(z, eps, t), x0, atol=1e-8)


def test_v_definitions():
    torch.manual_seed(1)
    x0, eps, t = torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0.2, 0.7])
    vp = VPCosineSchedule()
    a, s = vp.alpha_sigma(t)
    assert torch.allclose(VPrediction(vp).target(x0, eps, t), a[:, None] * eps - s[:, None] * x0)
    assert torch.allclose(RFVelocity(RectifiedFlowSchedule()).target(x0, eps, t), eps - x0)
    assert isinstance(make_parameterization("v", RectifiedFlowSchedule()), RFVelocity)
    assert isinstance(make_parameterization("eps", vp), EpsPrediction)
    assert isinstance(make_parameterization("x0", vp), X0Prediction)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("steps", [1, 3, 25])
def test_ddim_exact_for_point_mass(schedule, steps):
    """With data at a single point the ideal denoiser is exact, and DDIM follows the probability-flow map
    z_t = alpha_t mu + sigma_t u exactly, whatever the step count."""
    mu = torch.tensor([0.3, -1.2])
    sampler = DDIMSampler(schedule)
    grid = sampler.timesteps(steps)
    z = torch.randn(5, 2)
    start = z.clone()
    t0 = grid[0].clamp(max=1 - 1e-9)  # noise end with a finite logSNR
    grid[0] = t0
    for i in range(steps):
        t, tn = grid[i].expand(5), grid[i + 1].expand(5)
        z = sampler.step(z, mu.expand(5, 2), t, tn)
    assert torch.allclose(z, mu.expand(5, 2), atol=1e-7)
    if steps == 1:
        return  # the single step lands on t = 0, where DDIM returns x0 itself (checked above)
    # intermediate points lie on the exact map
    a, s = schedule.alpha_sigma(grid[1].expand(5))
    z1 = sampler.step(start, mu.expand(5, 2), grid[0].expand(5), grid[1].expand(5))
    u = (start - schedule.alpha(t0) * mu) / schedule.sigma(t0)
    assert torch.allclose(z1, a[:, None] * mu + s[:, None] * u, atol=1e-7)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_ddim_converges_to_probability_flow_for_gaussian(schedule):
    """Gaussian data: DDIM with the ideal denoiser converges to the exact probability-flow map at first order."""
    mu, s = 0.5, 0.3
    torch.manual_seed(2)
    t_start, t_end = 0.98, 0.02
    z1 = torch.randn(64, 1)
    exact = exact_flow(z1, torch.tensor(t_start), torch.tensor(t_end), schedule, mu, s)
    errors = []
    sampler = DDIMSampler(schedule)
    for steps in (10, 20, 40, 80):
        grid = torch.linspace(t_start, t_end, steps + 1)
        z = z1.clone()
        for i in range(steps):
            t = grid[i].expand(64)
            z = sampler.step(z, gaussian_x0(z, t, schedule, mu, s), t, grid[i + 1].expand(64))
        errors.append((z - exact).abs().max().item())
    assert errors[-1] < 2e-2
    for coarse, fine in zip(errors, errors[1:]):
        assert 1.6 < coarse / fine < 2.5  # halving the step halves the error


def test_per_sample_timesteps_match_separate_runs():
    """A batch whose samples sit at different times equals stepping each sample alone."""
    sch = VPCosineSchedule()
    sampler = DDIMSampler(sch)
    torch.manual_seed(3)
    z, x0 = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    t = torch.tensor([0.9, 0.5, 0.1])
    tn = torch.tensor([0.85, 0.3, 0.0])
    batched = sampler.step(z, x0, t, tn)
    for i in range(3):
        alone = sampler.step(z[i:i + 1], x0[i:i + 1], t[i:i + 1], tn[i:i + 1])
        assert torch.allclose(batched[i:i + 1], alone)
    assert torch.allclose(batched[2], x0[2])  # last step returns x0


def test_ddim_grid_is_uniform():
    g = DDIMSampler(VPCosineSchedule()).timesteps(4)
    assert torch.allclose(g, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=g.dtype))


def test_pingpong_grid_and_step():
    sch = RectifiedFlowSchedule()
    sampler = PingPongSampler(sch)
    g = sampler.timesteps(8)
    half = torch.linspace(-6, 2, 9, dtype=torch.float64)
    expected = torch.sigmoid(-half)
    expected[0], expected[-1] = 1.0, 0.0
    assert torch.allclose(g, expected)
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    t, tn = torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.0])
    out = sampler.step(torch.zeros(2, 3), x0, t, tn, noise)
    assert torch.allclose(out[0], 0.5 * x0[0] + 0.5 * noise[0])
    assert torch.allclose(out[1], x0[1])
    with pytest.raises(ValueError):
        sampler.step(torch.zeros(2, 3), x0, t, tn)
    # on a VP schedule the same half-logSNR grid maps through the schedule's own inverse
    gv = PingPongSampler(VPCosineSchedule()).timesteps(4)
    inner = VPCosineSchedule().logsnr(gv[1:-1])
    assert torch.allclose(inner, 2 * torch.linspace(-6, 2, 5, dtype=torch.float64)[1:-1], atol=1e-6)


def test_guidance_formula():
    cond, uncond = torch.randn(3, 2, 2), torch.randn(3, 2, 2)
    scale = torch.tensor([1.0, 3.0, 0.0])
    out = apply_guidance(cond, uncond, scale)
    assert torch.allclose(out[0], cond[0])
    assert torch.allclose(out[1], uncond[1] + 3 * (cond[1] - uncond[1]))
    assert torch.allclose(out[2], uncond[2])
