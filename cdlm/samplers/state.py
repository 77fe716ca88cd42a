"""The float64 state of the continuous samplers: fused in-place updates and the noise they add (docs/math.md §0).

A step of ``euler`` / ``heun`` / ``churn`` / ``flowmap`` around the network is a few elementwise passes over
``[B, L, D]`` (``D = V`` for the one-hot flows: as large as the network's logits). On CPUs such a pass is
memory-bound, a fresh float64 ``[B, L, V]`` tensor costs page faults worth several passes, and a mixed-dtype
elementwise op several more. So the state is one float64 buffer the sampler owns and updates in place, and each
update runs chunk by chunk (``CHUNK_ELEMENTS``), all its operations on a chunk while the chunk is in cache: the
network's float32 estimate is converted a chunk at a time, and the float32 input of the next network call is written
in the same pass. Each update performs the operations of the out-of-place formula it replaces, element by element and
in the same order, so the values are the same bit for bit (no fused multiply-add: ``torch.addcmul`` rounds once where
``a * b + c`` rounds twice).

The network's float32 inputs are two buffers used in turn (``NetworkInputs``). The noise of ``churn`` and of
``flowmap``'s renoising is drawn by ``StateNoise``: on CPUs in parts from generators of their own, by parallel
threads, each draw made during the update that adds the one before (one Mersenne-twister generator fills a tensor
serially at ~3 ns a number: ~14 ms for ``[8, 256, 2048]``, a tenth of a quickstart-size network call).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

import torch

CHUNK_ELEMENTS = 2**18  # elements per chunk of a fused update: 2 MiB of float64, about a core's L2 cache
NOISE_STREAMS = 16  # parts of a CPU noise draw, each from its own generator; fixed, so draws do not depend on threads
PARALLEL_NOISE = 2**16  # elements from which the parts are drawn in parallel threads (below, one after another)


def element_chunks(n: int, step: int | None = None) -> list[slice]:
    """Slices of ``step`` (default ``CHUNK_ELEMENTS``) elements, the last may be shorter, covering ``n`` elements."""
    step = step or CHUNK_ELEMENTS
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


@lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool of ``workers`` threads for the noise parts (``torch`` releases the GIL while it draws)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cdlm-noise")


class StateNoise:
    """The ``draws`` standard normal draws ``[B, L, D]`` float32 of a run, one at a time (``take``).

    On CPUs a draw is cut into ``NOISE_STREAMS`` contiguous parts, each drawn from its own generator, seeded once
    from the run's ``generator`` (one ``randint`` of it): the draws are iid ``N(0, 1)``, as one generator's are
    (though not the same numbers), and reproducible from the run's seed whatever the threads do (the parts and
    their generators do not depend on them, and each generator fills its parts in draw order). The parts are drawn
    by parallel threads, and the next draw is started as soon as one is taken, into a second buffer, so that it is
    drawn during the state update that uses this one (``overlap``). Elsewhere (CUDA draws in parallel already) the
    run's ``generator`` fills one buffer at every ``take``.
    """

    def __init__(self, like: torch.Tensor, generator: torch.Generator | None, draws: int) -> None:
        self.generator, self.left = generator, draws
        cpu = like.device.type == "cpu"
        self.buffers = [torch.empty(like.shape, dtype=torch.float32, device=like.device) for _ in range(1 + cpu)]
        self.turn, self.generators, self.prefetched = 0, [], False  # prefetched: buffers[turn] holds the next draw
        self.pending: deque[tuple[torch.Tensor, torch.Generator]] = deque()  # parts of the draw in progress
        self.helpers: list[Future] = []  # pool threads drawing pending parts
        if cpu:
            seeds = torch.randint(0, 2**62, (NOISE_STREAMS,), generator=generator).tolist()
            self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def _parts(self, buffer: torch.Tensor) -> list[tuple[torch.Tensor, torch.Generator]]:
        flat, n = buffer.view(-1), buffer.numel()
        bounds = [n * k // NOISE_STREAMS for k in range(NOISE_STREAMS + 1)]
        return [(flat[lo:hi], g) for lo, hi, g in zip(bounds, bounds[1:], self.generators)]

    def _drain(self) -> None:
        """Draw pending parts until none is left (run by the pool threads and by the caller)."""
        while True:
            try:
                part, generator = self.pending.popleft()
            except IndexError:
                return
            part.normal_(generator=generator)

    def _start(self, buffer: torch.Tensor, helpers: int) -> None:
        """Queue the parts of a draw into ``buffer`` and let ``helpers`` pool threads draw them."""
        self.pending.extend(self._parts(buffer))
        self.helpers = [_pool(helpers).submit(self._drain) for _ in range(helpers)] if helpers else []

    def settle(self) -> None:
        """Finish the draw in progress, if any (the caller draws pending parts too)."""
        self._drain()
        for helper in self.helpers:
            helper.result()
        self.helpers = []

    def take(self) -> torch.Tensor:
        """The next draw ``[B, L, D]`` float32, valid until the next ``take``; starts the one after, if any."""
        if self.left <= 0:
            raise RuntimeError("StateNoise: every draw of the run was taken")
        self.left -= 1
        buffer = self.buffers[self.turn]
        if not self.generators:
            return buffer.normal_(generator=self.generator)
        threads = min(torch.get_num_threads(), NOISE_STREAMS)
        parallel = threads > 1 and buffer.numel() >= PARALLEL_NOISE
        if not self.prefetched:  # draw it now
            self._start(buffer, threads - 1 if parallel else 0)
        self.settle()
        self.prefetched = bool(self.left and parallel)
        if self.prefetched:  # the next draw, during the update that uses this one (overlap)
            self.turn ^= 1
            self._start(self.buffers[self.turn], 1)
        return buffer

    @contextmanager
    def overlap(self) -> Iterator[None]:
        """Run the block (the state update that uses the draw just taken) on one intra-op thread while a pool
        thread draws the next one, then finish that draw: the update and the draw share the cores, and no draw is
        in progress when the block is left (so none competes with the network)."""
        if not self.helpers:
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            self.settle()


class NetworkInputs:
    """Two float32 ``[B, L, D]`` buffers handed out in turn as the network's inputs (``next``).

    The buffer a pass writes is never the one the latest network call read, which may live on in that call's output
    (the self-conditioning input); owned buffers spare the allocator a fresh ``[B, L, D]`` at every call.
    """

    def __init__(self, like: torch.Tensor) -> None:
        self.buffers = [torch.empty(like.shape, dtype=torch.float32, device=like.device) for _ in range(2)]
        self.turn = 1

    def next(self) -> torch.Tensor:
        """The buffer the next network call will read (the other one than last time)."""
        self.turn ^= 1
        return self.buffers[self.turn]


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1)


def perturb_(x: torch.Tensor, eps: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """``x <- x + scale eps`` in place (``torch.addcmul(x, eps, scale)``'s values) and ``out <- float32(x)``.

    ``x`` float64 ``[B, L, D]`` (contiguous), ``eps`` ``[B, L, D]`` (any float dtype), ``scale`` 0-d float64, ``out``
    float32 ``[B, L, D]``: the next network input.
    """
    fx, fe, fo = x.view(-1), _flat(eps), _flat(out)
    for part in element_chunks(fx.numel()):
        fo[part].copy_(fx[part].addcmul_(fe[part].double(), scale))


def euler_(
    x: torch.Tensor,
    x0: torch.Tensor,
    ratio: torch.Tensor,
    out: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> None:
    """``x <- x0 + ratio (x - x0)`` in place: ``euler_step(x, x0.double(), sigma, sigma_next)``'s values with
    ``ratio = sigma_next / sigma`` (0-d float64); then, with ``eps``, ``x <- x + scale eps`` (``perturb_``); then,
    with ``out``, ``out <- float32(x)``.

    ``x`` float64 ``[B, L, D]`` (contiguous); ``x0``, ``eps`` ``[B, L, D]`` in any float dtype (converted to float64
    a chunk at a time); ``out`` float32 ``[B, L, D]``.
    """
    fx, f0, fe, fo = x.view(-1), _flat(x0), _flat(eps), _flat(out)
    for part in element_chunks(fx.numel()):
        d = f0[part].double()
        xp = fx[part].sub_(d).mul_(ratio).add_(d)
        if fe is not None:
            xp.addcmul_(fe[part].double(), scale)
        if fo is not None:
            fo[part].copy_(xp)


def heun_predict_(x: torch.Tensor, x0: torch.Tensor, ratio: torch.Tensor, out: torch.Tensor) -> None:
    """The second-order step's predictor as the corrector's network input: ``out <- float32(x_next)``,
    ``x_next = euler_step(x, x0, sigma, sigma_next)`` with ``x0`` in float64 and ``ratio = sigma_next / sigma``
    (0-d float64). ``x`` is left as it is: ``heun_correct_`` steps from it.
    """
    fx, f0, fo = x.view(-1), _flat(x0), _flat(out)
    for part in element_chunks(fx.numel()):
        d = f0[part].double()
        fo[part].copy_(torch.sub(fx[part], d).mul_(ratio).add_(d))  # (x - x0) ratio + x0


def heun_correct_(
    x: torch.Tensor,
    x0: torch.Tensor,
    x0_next: torch.Tensor,
    ratio: torch.Tensor,
    out: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> None:
    """The second-order step (docs/math.md §0) in place: the DDIM step with the mean of the two clean estimates,
    ``x <- euler_step(x, (x0 + x0_next) / 2, sigma, sigma_next)`` (the formula's values with the estimates in
    float64), ``ratio = sigma_next / sigma`` (0-d float64); then, with ``eps``, ``x <- x + scale eps`` (``perturb_``);
    then, with ``out``, ``out <- float32(x)``.

    ``x0`` is the estimate at ``(x, sigma)``, ``x0_next`` the one at the predictor ``euler_step(x, x0, ..)`` (any
    float dtype). For ``sigma_next / sigma -> 1`` this is Heun's trapezoid (EDM Alg. 1): they differ by
    ``O(h^2) (x0_next - x0)`` for a step ``h = 1 - sigma_next / sigma``; unlike the trapezoid written in ``sigma``,
    whose correction is ``(sigma - sigma_next) / (2 sigma_next) (x0_next - x0)``, it stays bounded when the ratio is
    large (the first interval of a uniform ``t`` grid spans a ratio of hundreds for FLM).
    """
    fx, f0, f1, fe, fo = x.view(-1), _flat(x0), _flat(x0_next), _flat(eps), _flat(out)
    for part in element_chunks(fx.numel()):
        mean = f0[part].double().add_(f1[part].double()).mul_(0.5)  # (x0 + x0_next) / 2
        xp = fx[part].sub_(mean).mul_(ratio).add_(mean)  # euler_step(x, mean, sigma, sigma_next)
        if fe is not None:
            xp.addcmul_(fe[part].double(), scale)
        if fo is not None:
            fo[part].copy_(xp)
