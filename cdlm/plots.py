"""Figures of a model's learned state, drawn outside the model layer (matplotlib is imported only when drawing).

``plot_entropy_rate``: bitstream's learned entropy-rate noise schedule (docs/math.md §4), written by
``cdlm schedule`` (``cdlm.api.schedule``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cdlm.objectives.entropy_rate import EntropyRateSchedule


def plot_entropy_rate(schedule: EntropyRateSchedule, path: str | Path) -> Path:
    """Write a PNG of the sampling law ``schedule.sigma_of_t`` follows (density over ``log sigma``) and the rate ``r``.

    A fitted table is drawn against the warm-up law; an unfitted one draws the warm-up law the model was trained and
    is sampled under, and the title says so (``schedule.law_name()``). Returns ``path``.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plotting a schedule needs matplotlib: pip install 'cdlm[plot]'") from err
    centres = (0.5 * (schedule.log_edges[1:] + schedule.log_edges[:-1])).exp().cpu()  # [bins] sigma at cell centres
    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    laws, rate = fig.subplots(1, 2)
    draw_laws(laws, schedule, centres)
    draw_rate(rate, schedule, centres)
    fig.suptitle(f"sampling law σ(t): {schedule.law_name()}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def draw_laws(ax: Any, schedule: EntropyRateSchedule, centres: torch.Tensor) -> None:
    """Densities per unit ``log sigma`` on ``ax``: the warm-up law, ``q`` if fitted, the mixture mid-ramp."""
    width = float(schedule.log_edges[1] - schedule.log_edges[0])
    warm = f"warm-up N({schedule.warmup_mean:g}, {schedule.warmup_std:g}²)"
    if schedule.fitted:
        ax.plot(centres, (schedule.mass / width).cpu(), label="learned q (entropy rate)")
        if schedule.ramp() < 1.0:
            mixture = (schedule.training_mass() / width).cpu()
            ax.plot(centres, mixture, ":", label=f"mixture, w = {schedule.ramp():.3g}")
    ax.plot(centres, (schedule.warm_mass / width).cpu(), "--" if schedule.fitted else "-", label=warm)
    title = "training / sampling law" if schedule.fitted else "warm-up law (table not fitted)"
    ax.set(xscale="log", xlabel="σ", ylabel="density per unit log σ", title=title)
    ax.legend()


def draw_rate(ax: Any, schedule: EntropyRateSchedule, centres: torch.Tensor) -> None:
    """The information rate ``r(sigma)`` of the last fit on ``ax``, or a note that there is none yet."""
    ax.set(xscale="log", xlim=(schedule.sigma_min, schedule.sigma_max), xlabel="σ", ylabel="mean mse / σ²")
    ax.set_title("information rate r(σ)")
    if schedule.fitted:
        ax.plot(centres, schedule.rate.cpu())
        ax.set_yscale("log")
    else:
        note = f"not measured yet: the table is fitted\nafter warmup_batches = {schedule.warmup_batches}"
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
