"""Bitstream diffusion (CoBit, docs/math.md §4): bits, the matched filter, the entropy-rate schedule, training."""

from __future__ import annotations

import math

import pytest
import torch

import cdlm
from cdlm.cli import schedule_cmd
from cdlm.objectives.bits import bit_width, bits_to_ids, code_table, decode_bits, ids_to_bits
from cdlm.objectives.bitstream import Bitstream, matched_filter
from cdlm.objectives.entropy_rate import EntropyRateSchedule
from cdlm.objectives.noise_schedule import NoiseSchedule
from cdlm.plots import plot_entropy_rate
from cdlm.samplers import get_sampler
from tests.conftest import tiny_backbone
from tests.runs import CrashAt, LossRecorder, fit

SCHEDULE = [  # a schedule that fits within a 12-step tiny run
    "objective=bitstream",
    "sampler=churn",
    "objective.schedule.warmup_batches=3",
    "objective.schedule.ramp_batches=4",
    "objective.schedule.refresh_every=2",
    "objective.schedule.fifo_size=256",
    "objective.schedule.bins=16",
    "objective.ode_steps=4",
]


@pytest.mark.parametrize(("vocab", "k"), [(2, 1), (86, 7), (128, 7), (129, 8), (4096, 12), (50257, 16)])
def test_bits_round_trip(vocab: int, k: int) -> None:
    assert bit_width(vocab) == k
    ids = torch.arange(vocab)
    bits = ids_to_bits(ids, k)
    assert bits.shape == (vocab, k) and set(bits.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(bits_to_ids(bits), ids)
    assert torch.equal(bits[5 % vocab], torch.tensor([float(c) for c in format(5 % vocab, f"0{k}b")]))  # MSB first


def test_invalid_codes_are_repaired_to_the_most_probable_valid_id_and_counted() -> None:
    objective = Bitstream(tiny_backbone(), 5)  # k = 3: codes 5, 6, 7 are invalid
    probs = torch.tensor([[[0.9, 0.2, 0.8], [0.9, 0.9, 0.6], [0.1, 0.6, 0.4]]])  # codes 5 (101), 7, 2
    ids, invalid = decode_bits(probs, 5)
    assert invalid.tolist() == [[True, True, False]] and ids[0, 2] == 2
    table = code_table(5).double()  # brute force over the valid ids
    for pos in (0, 1):
        p = probs[0, pos].double()
        logp = (table * p.log() + (1 - table) * (1 - p).log()).sum(-1)
        assert ids[0, pos] == logp.argmax()
    assert torch.equal(objective.decode(probs), ids) and objective.invalid_decoded == 2


def test_matched_filter_is_the_exact_bit_posterior_log_odds() -> None:
    g = torch.Generator().manual_seed(0)
    for s in (0.05, 0.3, 1.0, 4.0):
        b = torch.randint(0, 2, (4, 6, 7), generator=g).double()
        x = b + s * torch.randn(b.shape, generator=g, dtype=torch.float64)
        sigma = torch.full((4,), s, dtype=torch.float64)
        exact = torch.distributions.Normal(1.0, s).log_prob(x) - torch.distributions.Normal(0.0, s).log_prob(x)
        got = matched_filter(x, sigma).double()
        torch.testing.assert_close(got, exact.clamp(-30, 30), rtol=1e-5, atol=1e-4)
    # with the zero-initialised head the denoiser is the exact posterior mean of a fair bit
    objective = Bitstream(tiny_backbone(), 11).eval()
    x = torch.rand(2, 5, objective.bits) * 2 - 0.5
    sigma = torch.tensor([0.4, 0.4])
    posterior = torch.sigmoid(matched_filter(x, sigma))
    torch.testing.assert_close(objective.denoise(x, sigma), posterior)


def observed(schedule: EntropyRateSchedule, n: int = 2048, seed: int = 0) -> torch.Tensor:
    """Feeds observations with ``m = sigma^2 / (1 + sigma^2) / 4`` (rate ``r = 1 / (4 (1 + sigma^2))``)."""
    log_range = (math.log(schedule.sigma_min), math.log(schedule.sigma_max))
    log_sigma = torch.empty(n, dtype=torch.float64).uniform_(*log_range, generator=torch.Generator().manual_seed(seed))
    sigma = log_sigma.exp()
    schedule.observe(sigma, 0.25 * sigma.square() / (1 + sigma.square()))
    return sigma


def test_refit_recovers_the_entropy_rate_density() -> None:
    schedule = EntropyRateSchedule(bins=32, fifo_size=4096, warmup_batches=0)
    observed(schedule)
    centres = (0.5 * (schedule.log_edges[1:] + schedule.log_edges[:-1])).exp()
    y = (centres / 0.1) ** 3
    expected = y / (1 + y) * (0.25 / (1 + centres.square())).sqrt()  # g(sigma) sqrt(r)
    expected = expected / expected.sum()
    assert schedule.fitted
    torch.testing.assert_close(schedule.mass, expected, rtol=0.06, atol=1e-4)


def test_sampler_grid_is_the_inverse_cdf_of_the_learned_law() -> None:
    schedule = EntropyRateSchedule(bins=32, fifo_size=4096, warmup_batches=0, ramp_batches=0)  # q from the 1st fit
    observed(schedule)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    sigma = schedule.sigma_of_t(t)
    assert sigma.dtype == torch.float64 and (sigma.diff() > 0).all()
    assert sigma[0] == pytest.approx(schedule.sigma_min) and sigma[-1] == pytest.approx(schedule.sigma_max)
    # the CDF of the histogram (log-uniform inside a cell) at sigma(t) is t
    edges, mass = schedule.log_edges, schedule.mass
    cell = (torch.bucketize(sigma.log(), edges, right=True) - 1).clamp(0, schedule.bins - 1)
    frac = (sigma.log() - edges[cell]) / (edges[cell + 1] - edges[cell])
    cdf = torch.cat([mass.new_zeros(1), mass.cumsum(0)])[cell] + frac * mass[cell]
    torch.testing.assert_close(cdf, t, rtol=0, atol=1e-9)
    # the objective's sigma(t) is this map
    schedule_args = {"bins": 32, "fifo_size": 4096, "warmup_batches": 0, "ramp_batches": 0}
    objective = Bitstream(tiny_backbone(), 11, schedule=schedule_args)
    observed(objective.schedule)
    torch.testing.assert_close(objective.sigma(t), sigma)


def test_warmup_law_ramp_and_refresh() -> None:
    schedule = EntropyRateSchedule(bins=16, fifo_size=256, warmup_batches=3, ramp_batches=4, refresh_every=2)
    sigma = torch.logspace(-2, 1, 16, dtype=torch.float64)
    u = torch.linspace(0.01, 0.99, 9)
    warm = schedule.sample_training_sigma(u)
    assert (warm.log().median() - (-1.2)).abs() < 0.1  # the warm-up law N(-1.2, 1.2^2)
    for batch in range(1, 10):
        schedule.observe(sigma, 0.25 * sigma.square() / (1 + sigma.square()))
        assert schedule.fitted == (batch >= 3) and int(schedule.batches) == batch
        assert schedule.ramp() == (0.0 if batch < 3 else min((batch - 3) / 4, 1.0))
    assert int(schedule.fifo_filled) == 144 and int(schedule.fifo_next) == 144


def truncated_normal_cdf(schedule: EntropyRateSchedule, sigma: torch.Tensor) -> torch.Tensor:
    """CDF at ``sigma`` of the warm-up law: ``log sigma ~ N(-1.2, 1.2^2)`` truncated to the schedule's range."""
    normal = torch.distributions.Normal(torch.tensor(-1.2, dtype=torch.float64), 1.2)
    lo, hi = normal.cdf(schedule.log_edges[0]), normal.cdf(schedule.log_edges[-1])
    return (normal.cdf(sigma.log()) - lo) / (hi - lo)


def test_an_unfitted_schedule_samples_the_warmup_law_it_was_trained_under() -> None:
    schedule = EntropyRateSchedule()  # the defaults: 128 cells, warm-up law N(-1.2, 1.2^2)
    assert not schedule.fitted and schedule.ramp() == 0.0
    t = torch.linspace(0, 1, 257, dtype=torch.float64)
    sigma = schedule.sigma_of_t(t)
    assert sigma.dtype == torch.float64 and (sigma.diff() > 0).all()
    assert sigma[0] == pytest.approx(schedule.sigma_min, rel=1e-12)
    assert sigma[-1] == pytest.approx(schedule.sigma_max, rel=1e-12)
    assert (sigma >= schedule.sigma_min * (1 - 1e-12)).all() and (sigma <= schedule.sigma_max * (1 + 1e-12)).all()
    # the very law training draws from, and (up to the 0.08-wide cells) the truncated normal
    assert torch.equal(sigma, schedule.sample_training_sigma(t))
    torch.testing.assert_close(truncated_normal_cdf(schedule, sigma), t, rtol=0, atol=2e-3)
    assert schedule.sigma_of_t(torch.tensor(0.5, dtype=torch.float64)).log() == pytest.approx(-1.2, abs=0.01)


def test_an_unfitted_bitstream_model_samples_with_every_sampler() -> None:
    objective = Bitstream(tiny_backbone(), 11).eval()
    assert objective.sigma_min == objective.schedule.sigma_min and objective.sigma_max == objective.schedule.sigma_max
    for name in ("euler", "heun", "churn"):
        spec = get_sampler(name, objective)
        g = torch.Generator().manual_seed(0)
        x = objective.prior(2, 8, torch.device("cpu"), generator=g)
        ids = spec.fn(objective, x, spec.grid(4, torch.device("cpu")), generator=g)
        assert ids.shape == (2, 8) and 0 <= int(ids.min()) and int(ids.max()) < 11, name


def test_fitted_and_ramped_sigma_of_t_is_exactly_the_inverse_cdf_of_q() -> None:
    """Committed results were sampled with ``sigma(t) = inverse_cdf(q, t)``: a ramped table must give it bit for bit."""
    schedule = EntropyRateSchedule(bins=16, fifo_size=256, warmup_batches=3, ramp_batches=4, refresh_every=2)
    sigma = torch.logspace(-2.5, 1.8, 64, dtype=torch.float64)
    for _ in range(9):  # fitted at batch 3, ramp complete at batch 7
        schedule.observe(sigma, 0.25 * sigma.square() / (1 + sigma.square()))
    assert schedule.fitted and schedule.ramp() == 1.0
    t = torch.cat([torch.linspace(0, 1, 1001, dtype=torch.float64), torch.rand(1000, dtype=torch.float64)])
    assert torch.equal(schedule.sigma_of_t(t), schedule.inverse_cdf(schedule.mass, t))  # the old formula
    assert torch.equal(schedule.training_mass(), (1 - 1.0) * schedule.warm_mass + 1.0 * schedule.mass)  # old training
    assert not torch.equal(schedule.sigma_of_t(t), schedule.inverse_cdf(schedule.warm_mass, t))


def test_mid_ramp_sigma_of_t_is_the_inverse_cdf_of_the_training_mixture() -> None:
    schedule = EntropyRateSchedule(bins=16, fifo_size=256, warmup_batches=3, ramp_batches=4, refresh_every=2)
    sigma = torch.logspace(-2.5, 1.8, 64, dtype=torch.float64)
    for _ in range(5):
        schedule.observe(sigma, 0.25 * sigma.square() / (1 + sigma.square()))
    assert schedule.fitted and schedule.ramp() == 0.5
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    mixture = 0.5 * schedule.warm_mass + 0.5 * schedule.mass
    torch.testing.assert_close(schedule.sigma_of_t(t), schedule.inverse_cdf(mixture, t), rtol=1e-12, atol=0)
    assert torch.equal(schedule.sigma_of_t(t), schedule.sample_training_sigma(t))


def test_ode_bound_at_init_is_about_k_bits_per_token() -> None:
    # zero head: the model is iid fair bits, so the bound is k ln 2 nats per token up to the dequantisation gap
    objective = Bitstream(tiny_backbone(), 128, ode_steps=16).eval()
    ids = torch.randint(128, (8, 8), generator=torch.Generator().manual_seed(0))
    out = objective.nll({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert abs(out.loss.item() - 7 * math.log(2)) < 0.25, out.loss.item()


def schedule_state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.objective.schedule.state_dict().items()}


def test_tables_survive_save_load_and_resume_exactly(tmp_path) -> None:
    full = LossRecorder()
    module, _, _ = fit(tmp_path / "full", *SCHEDULE, callbacks=(full,))
    reference = schedule_state(module)
    assert module.objective.schedule.fitted and int(reference["batches"]) == 12
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "killed", *SCHEDULE, callbacks=(CrashAt(10),))
    resumed = LossRecorder()
    module_r, _, _ = fit(tmp_path / "killed", *SCHEDULE, "resume=auto", callbacks=(resumed,))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], rel=1e-6, abs=1e-6), step
    for key, value in schedule_state(module_r).items():
        assert torch.equal(value, reference[key]), key
    loaded = cdlm.load(module.save_pretrained(tmp_path / "pretrained"))
    png = schedule_cmd([f"path={tmp_path / 'pretrained'}", f"out={tmp_path / 'schedule.png'}"])  # cdlm schedule
    assert png.is_file() and png.stat().st_size > 1000
    for key, value in schedule_state(loaded).items():
        assert torch.equal(value, reference[key]), key
    ids, texts = loaded.generate(2, 16, "churn", steps=8, seed=0)
    assert ids.shape == (2, 16) and len(texts) == 2


def test_tiny_bitstream_run_learns_beyond_the_matched_filter(tmp_path) -> None:
    recorder = LossRecorder()
    module, _, datamodule = fit(tmp_path, *SCHEDULE, "trainer.max_steps=50", "module.lr=3e-3", callbacks=(recorder,))
    assert all(math.isfinite(v) for v in recorder.losses.values())
    objective = module.objective.eval()
    batch = next(iter(datamodule.val_dataloader()))
    b = objective.clean_state(batch["input_ids"])  # [B, L, k]
    g = torch.Generator().manual_seed(0)
    for s in (0.5, 1.0, 2.0):
        x = b + s * torch.randn(b.shape, generator=g)
        sigma = torch.full((b.shape[0],), s)
        with torch.no_grad():
            trained = (objective.denoise(x, sigma) - b).square().mean()
        filter_only = (torch.sigmoid(matched_filter(x, sigma)) - b).square().mean()  # the model at init
        assert trained < 0.97 * filter_only, (s, float(trained), float(filter_only))


def test_the_schedule_is_a_noise_schedule_and_plots_live_outside_the_objectives() -> None:
    objective = Bitstream(tiny_backbone(), 11)
    assert isinstance(objective.schedule, NoiseSchedule) and objective.state_width == objective.bits
    assert all(not hasattr(objective.schedule, name) for name in ("plot", "plot_laws", "plot_rate"))
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    assert torch.equal(objective.sigma(t), objective.schedule.sigma_of_t(t))


def test_schedule_plot(tmp_path) -> None:
    objective = Bitstream(tiny_backbone(), 11, schedule={"bins": 16, "fifo_size": 512, "warmup_batches": 0})
    assert "warm-up law" in objective.schedule.law_name() and "not fitted" in objective.schedule.law_name()
    unfitted = plot_entropy_rate(objective.schedule, tmp_path / "none.png")  # the warm-up law, said so in the title
    assert unfitted.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    observed(objective.schedule, n=512)
    assert objective.schedule.ramp() < 1.0 and "ramp in progress" in objective.schedule.law_name()
    png = plot_entropy_rate(objective.schedule, tmp_path / "schedule.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schedule_command_refuses_a_model_without_a_table_schedule(tiny_run) -> None:
    from cdlm.config import ConfigError

    run_dir, _ = tiny_run  # a masked model
    with pytest.raises(ConfigError, match="MaskedDiffusion has no learned table schedule"):
        schedule_cmd([f"path={run_dir / 'final'}"])


def test_a_run_shorter_than_the_warmup_samples_under_its_training_law(tmp_path) -> None:
    """The bug: a run that ends before ``warmup_batches`` could not be sampled (``sigma(t)`` raised)."""
    module, _, _ = fit(tmp_path, "objective=bitstream", "sampler=churn", "trainer.max_steps=4", "objective.ode_steps=4")
    schedule = module.objective.schedule
    assert not schedule.fitted and int(schedule.batches) == 4 < schedule.warmup_batches
    for sampler in ("churn", "euler"):
        ids, texts = module.generate(2, 16, sampler, steps=8, seed=0)
        assert ids.shape == (2, 16) and len(texts) == 2 and all(isinstance(text, str) for text in texts)
    png = schedule_cmd([f"path={module.save_pretrained(tmp_path / 'pretrained')}", f"out={tmp_path / 's.png'}"])
    assert png.is_file() and png.stat().st_size > 1000  # `cdlm schedule` plots the warm-up law
