"""Discrete samplers: determinism, cache equivalence, registry and space checks, float64 draws."""

import pytest
import torch

from cdlm.samplers import SAMPLERS, check_knobs, get_sampler
from cdlm.samplers.categorical import sample_categorical, top_p_filter
from cdlm.samplers.grids import linear_grid
from cdlm.types import SamplerStep


def run(obj, seed, **knobs):
    spec = get_sampler("ancestral", obj)
    steps: list[SamplerStep] = []
    g = torch.Generator().manual_seed(seed)
    x = spec.fn(
        obj, obj.prior(3, 24, torch.device("cpu")), linear_grid(64), generator=g, callback=steps.append, **knobs
    )
    return x, steps


def test_cached_equals_uncached(masked_objective):
    cached, steps_c = run(masked_objective, 0, cache=True)
    uncached, steps_u = run(masked_objective, 0, cache=False)
    assert torch.equal(cached, uncached)
    assert steps_c[-1].nfe < steps_u[-1].nfe  # the cache saved network calls
    assert steps_u[-1].nfe == 64


def test_samples_are_complete_and_seeded(masked_objective):
    a, _ = run(masked_objective, 1)
    b, _ = run(masked_objective, 1)
    c, _ = run(masked_objective, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a != masked_objective.mask_id).all() and a.max() < masked_objective.vocab_size


def test_top_p_keeps_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    kept = top_p_filter(probs, 0.7)
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_float64_categorical_matches_probabilities():
    probs = torch.tensor([0.7, 0.2, 0.0999, 1e-4], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = sample_categorical(probs.expand(400_000, 4), g)
    freq = torch.bincount(draws, minlength=4).double() / 400_000
    torch.testing.assert_close(freq, probs, atol=3e-3, rtol=0)
    assert freq[3] > 0  # the rare token is still drawn


def test_registry_refuses_space_mismatch(masked_objective):
    assert SAMPLERS["ancestral"].space == "discrete"

    class Continuous:
        space = "continuous"

    with pytest.raises(ValueError, match="works on discrete objectives"):
        get_sampler("ancestral", Continuous())
    with pytest.raises(ValueError, match="registered samplers"):
        get_sampler("no-such-sampler", masked_objective)
    with pytest.raises(ValueError, match="valid options"):
        check_knobs(get_sampler("ancestral"), {"temperature": 0.7})


def test_inverse_cdf_never_draws_a_zero_mass_token_and_takes_unnormalised_rows():
    from cdlm.samplers.categorical import inverse_cdf

    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0], dtype=torch.float64)  # unnormalised, zeros at both ends
    draws = inverse_cdf(weights.expand(200_000, 5), torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=5).double() / 200_000
    assert freq[0] == freq[2] == freq[4] == 0
    torch.testing.assert_close(freq, weights / weights.sum(), atol=4e-3, rtol=0)


def test_one_ancestral_step_draws_the_mdlm_posterior():
    """From [MASK]: stay with probability stay / norm, else token v with probability moved p_v / norm."""
    from cdlm.samplers.discrete import CleanProbs, ancestral_draws

    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    moved, stay = 0.3, 0.2  # norm = moved + stay
    n = 200_000
    g = torch.Generator().manual_seed(2)
    draw, best = ancestral_draws(CleanProbs(p.log().expand(n, 4)), moved, stay, moved + stay, g)
    freq = torch.bincount(draw, minlength=5).double() / n  # index 4 = [MASK]
    expected = torch.cat([moved * p.double(), torch.tensor([stay], dtype=torch.float64)]) / (moved + stay)
    torch.testing.assert_close(freq, expected, atol=4e-3, rtol=0)
    assert bool((best == 0).all())


def test_ancestral_step_on_indexed_rows_draws_the_nucleus_posterior():
    """CleanProbs over the denoiser's rows picked by ``index``, nucleus-filtered: each position's own law."""
    from cdlm.samplers.discrete import CleanProbs, ancestral_draws

    rows = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]).log()  # [R = 2, V = 4]
    index = torch.arange(200_000) % 2  # positions alternate between the rows
    moved, stay = 0.3, 0.2
    draw, best = ancestral_draws(
        CleanProbs(rows, 0.75, index), moved, stay, moved + stay, torch.Generator().manual_seed(3)
    )
    for row in (0, 1):
        freq = torch.bincount(draw[index == row], minlength=5).double() / 100_000
        kept = top_p_filter(rows[row].double().exp()[None], 0.75)[0]
        expected = torch.cat([moved * kept, torch.tensor([stay], dtype=torch.float64)]) / (moved + stay)
        torch.testing.assert_close(freq, expected, atol=5e-3, rtol=0)
        assert bool((best[index == row] == rows[row].argmax()).all())
