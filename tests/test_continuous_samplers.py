"""Continuous samplers on the exact Gaussian toy: DDIM equivalence, churn = Euler at gamma 0, Heun accuracy, NFE."""

import inspect
import math

import pytest
import torch

from cdlm.config import load_group
from cdlm.samplers import check_knobs, get_sampler
from cdlm.samplers.continuous import continuous_grid, euler_step
from cdlm.types import ContinuousObjective, SamplerStep
from tests.toys import GaussianToy

CONTINUOUS = ("euler", "heun", "churn")


def run(obj, name, steps=16, n=8, seed=0, **knobs):
    """Sample with ``name``; returns (ids, the start state, the callback steps)."""
    spec = get_sampler(name, obj)
    g = torch.Generator().manual_seed(seed)
    x = obj.prior(n, 4, torch.device("cpu"), generator=g)
    record: list[SamplerStep] = []
    ids = spec.fn(obj, x, spec.grid(steps, torch.device("cpu")), generator=g, callback=record.append, **knobs)
    return ids, x, record


def test_toy_is_a_continuous_objective():
    assert isinstance(GaussianToy(), ContinuousObjective)


def test_euler_step_is_ddim_on_vp_and_linear_paths():
    g = torch.Generator().manual_seed(0)
    x0_hat, eps_true = torch.randn(2, 5, 3, generator=g, dtype=torch.float64).unbind(0)
    x0 = x0_hat + 0.1  # the network's estimate differs from the truth
    # VP path z = a x0 + s eps; DDIM: z' = a' x0_hat + s' eps_hat, eps_hat = (z - a x0_hat) / s
    a, a_next = 0.6, 0.8
    s, s_next = math.sqrt(1 - a**2), math.sqrt(1 - a_next**2)
    z = a * x0 + s * eps_true
    z_next = a_next * x0_hat + s_next * (z - a * x0_hat) / s
    torch.testing.assert_close(euler_step(z / a, x0_hat, s / a, s_next / a_next), z_next / a_next, rtol=1e-12, atol=0)
    # linear flow (FLM): z <- z + (c' - c) (x0_hat - z) / (1 - c), sigma = (1 - c) / c
    c, c_next = 0.3, 0.45
    z = c * x0 + (1 - c) * eps_true
    z_next = z + (c_next - c) * (x0_hat - z) / (1 - c)
    sig, sig_next = (1 - c) / c, (1 - c_next) / c_next
    torch.testing.assert_close(euler_step(z / c, x0_hat, sig, sig_next), z_next / c_next, rtol=1e-12, atol=1e-12)
    # per-row sigmas [B]
    sigmas = torch.tensor([1.0, 2.0], dtype=torch.float64)
    out = euler_step(z[:2], x0_hat[:2], sigmas, sigmas / 2)
    torch.testing.assert_close(out, x0_hat[:2] + 0.5 * (z[:2] - x0_hat[:2]))


def test_churn_without_noise_is_euler():
    obj = GaussianToy()
    ids_e, _, steps_e = run(obj, "euler", seed=3)
    ids_c, _, steps_c = run(obj, "churn", seed=3, gamma=0.0)
    ids_w, _, steps_w = run(obj, "churn", seed=3, gamma=0.2, t_lo=2.0, t_hi=3.0)  # empty window
    assert torch.equal(ids_e, ids_c) and torch.equal(ids_e, ids_w)
    assert torch.equal(steps_e[-1].x, steps_c[-1].x) and torch.equal(steps_e[-1].x, steps_w[-1].x)
    ids_h, _, steps_h = run(obj, "heun", seed=3)
    _, _, steps_ch = run(obj, "churn", seed=3, gamma=0.0, heun=True)
    assert torch.equal(steps_h[-1].x, steps_ch[-1].x)


def ode_map_error(obj, name, steps):
    """Max error of the final state against the exact ODE map, relative to the exact state's scale about ``mu``."""
    _, x_start, record = run(obj, name, steps=steps, n=16)
    s2, mu = obj.s**2, obj.mu
    exact = mu + math.sqrt((s2 + obj.sigma_min**2) / (s2 + obj.sigma_max**2)) * (x_start.double() - mu)
    assert record[-1].x.dtype == torch.float64
    return ((record[-1].x - exact).abs().max() / (exact - mu).abs().max()).item()


def test_heun_follows_the_exact_ode_map_at_second_order():
    # x(sigma) = mu + sqrt((s^2 + sigma^2) / (s^2 + sigma_max^2)) (x(sigma_max) - mu) on the toy
    obj = GaussianToy()
    heun = {steps: ode_map_error(obj, "heun", steps) for steps in (32, 64, 128)}
    euler = {steps: ode_map_error(obj, "euler", steps) for steps in (64, 128)}
    assert heun[128] < 1e-3 and heun[64] < 3e-3
    assert heun[32] / heun[64] > 3.5 and heun[64] / heun[128] > 3.5  # second order
    assert 1.7 < euler[64] / euler[128] < 2.3 and euler[128] > 10 * heun[128]  # first order


def test_heun_samples_have_the_data_variance():
    obj = GaussianToy()
    _, _, record = run(obj, "heun", steps=32, n=1000)  # 1000 x 4 positions x 3 dims
    x0 = record[-1].x0
    assert abs(x0.var().item() / obj.s**2 - 1) < 0.1
    assert abs(x0.mean().item() - obj.mu) < 0.1


def test_churn_samples_have_the_data_variance():
    obj = GaussianToy()
    _, _, record = run(obj, "churn", steps=32, n=1000, gamma=0.3, heun=True)
    assert abs(record[-1].x0.var().item() / obj.s**2 - 1) < 0.1


@pytest.mark.parametrize(
    ("name", "knobs", "nfe"),
    [("euler", {}, 10), ("heun", {}, 19), ("churn", {}, 10), ("churn", {"heun": True}, 19)],
)
def test_nfe_and_callback(name, knobs, nfe):
    obj = GaussianToy()
    ids, _, record = run(obj, name, steps=10, **knobs)
    assert [s.index for s in record] == list(range(10)) and record[-1].nfe == nfe
    assert record[-1].t == 0.0 and record[0].t == pytest.approx(0.9)
    assert ids.shape == (8, 4) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < obj.vocab_size
    assert torch.equal(ids, obj.decode(record[-1].x0.float()))


def test_self_conditioning_is_carried():
    obj = GaussianToy()
    run(obj, "heun", steps=4)
    assert obj.calls == [False] + [True] * 6
    obj.calls.clear()
    run(obj, "heun", steps=4, self_cond=False)
    assert obj.calls == [False] * 7


def test_churn_is_seeded():
    obj = GaussianToy()
    _, _, a = run(obj, "churn", seed=1, gamma=0.2)
    _, _, b = run(obj, "churn", seed=1, gamma=0.2)
    _, _, c = run(obj, "churn", seed=2, gamma=0.2)
    assert torch.equal(a[-1].x, b[-1].x) and not torch.equal(a[-1].x, c[-1].x)
    _, _, d = run(obj, "euler", seed=1)
    assert not torch.equal(a[-1].x, d[-1].x)  # the churn noise did act


def test_grid():
    ts = continuous_grid(4)
    assert ts.dtype == torch.float64 and torch.equal(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        continuous_grid(0)


def test_registry_and_configs(masked_objective):
    toy = GaussianToy()
    for name in CONTINUOUS:
        spec = get_sampler(name, toy)
        assert spec.space == "continuous"
        with pytest.raises(ValueError, match="works on continuous objectives"):
            get_sampler(name, masked_objective)
        node = dict(load_group("sampler", name))
        assert node.pop("name") == name and node.pop("steps") == 128
        assert set(node) == set(spec.knobs())
        check_knobs(spec, node)
        defaults = {k: p.default for k, p in inspect.signature(spec.fn).parameters.items()}
        assert all(node[k] == defaults[k] for k in node)
    with pytest.raises(ValueError, match="works on discrete objectives"):
        get_sampler("ancestral", toy)


def test_fused_state_updates_give_the_formulas_values_bit_for_bit(monkeypatch):
    """cdlm.samplers.state: chunked in-place passes = the out-of-place formulas (chunks of 7 elements here)."""
    from cdlm.samplers import state

    monkeypatch.setattr(state, "CHUNK_ELEMENTS", 7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 40
    x0 = torch.randn(3, 5, 11, generator=g).softmax(-1)  # float32, as the networks return it
    eps = torch.randn(3, 5, 11, generator=g)
    sigma, sigma_next = torch.tensor(2.5, dtype=torch.float64), torch.tensor(1.7, dtype=torch.float64)
    scale = (sigma**2 - sigma_next**2).sqrt()
    ratio = sigma_next / sigma

    y, out = x.clone(), torch.empty(3, 5, 11)
    state.euler_(y, x0, ratio, out, eps, scale)
    expected = torch.addcmul(euler_step(x, x0.double(), sigma, sigma_next), eps, scale)
    assert torch.equal(y, expected) and torch.equal(out, expected.float())

    y = x.clone()
    state.perturb_(y, eps, scale, out)
    assert torch.equal(y, torch.addcmul(x, eps, scale)) and torch.equal(out, y.float())

    x_next, y = euler_step(x, x0.double(), sigma, sigma_next), x.clone()
    state.heun_predict_(y, x0, ratio, out)
    assert torch.equal(out, x_next.float()) and torch.equal(y, x)
    x0_next = torch.randn(3, 5, 11, generator=g).softmax(-1)
    state.heun_correct_(y, x0, x0_next, ratio, out, eps, scale)
    expected = torch.addcmul(euler_step(x, (x0.double() + x0_next.double()) * 0.5, sigma, sigma_next), eps, scale)
    assert torch.equal(y, expected) and torch.equal(out, expected.float())


def test_state_noise_is_standard_normal_and_does_not_depend_on_threads():
    from cdlm.samplers.state import StateNoise

    threads = torch.get_num_threads()
    like = torch.empty(4, 64, 300)  # 76,800 elements: drawn in parallel parts where threads allow
    try:
        draws = []
        for n in (1, 2):  # one thread: drawn when taken; two: the next draw is made during overlap()
            torch.set_num_threads(n)
            noise, taken = StateNoise(like, torch.Generator().manual_seed(5), 4), []
            for k in range(4):
                taken.append(noise.take().clone())
                with noise.overlap():  # one intra-op thread while the next draw (if any) is made
                    assert torch.get_num_threads() == (1 if k < 3 else n)
                assert torch.get_num_threads() == n and not noise.pending and not noise.helpers
            draws.append(torch.stack(taken))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0][0], draws[0][1])
    assert abs(draws[0].mean().item()) < 0.01 and abs(draws[0].var().item() - 1) < 0.01


@pytest.mark.parametrize("knobs", [{}, {"heun": True}, {"t_lo": 0.0, "t_hi": 1.0}])
def test_churn_without_a_callback_takes_the_same_steps(knobs):
    """Without a callback the next step's churn is added in the same pass as this step's update: same values."""
    obj = GaussianToy()
    spec = get_sampler("churn", obj)
    last = []
    decode = obj.decode
    obj.decode = lambda x: last.append(x) or decode(x)
    for callback in (None, lambda step: None):
        g = torch.Generator().manual_seed(4)
        x = obj.prior(8, 4, torch.device("cpu"), generator=g)
        spec.fn(obj, x, spec.grid(12, torch.device("cpu")), generator=g, callback=callback, gamma=0.3, **knobs)
    assert torch.equal(last[0], last[1])
