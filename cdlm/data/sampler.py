"""The training rows' order: a resumable, rank-sharded, epoch-by-epoch shuffle that owns its own position.

Epoch ``e`` visits the rows in the order ``StatefulDataLoader(shuffle=True, generator=manual_seed(seed))`` gives
them (a ``randperm(n)`` per epoch from one seeded generator); rank ``r`` of ``W`` reads ``perm[r::W]``, cut
to whole batches (the tail that does not fill one batch on every rank is left out of that epoch), so the ``W``
ranks' step-``k`` batches together are the one-process batch of ``W * B`` rows.

The sampler keeps its position (``epoch``, rows ``yielded`` in it) and hands it to the loader's checkpointed state
(``StatefulDataLoader`` saves a ``Stateful`` sampler's ``state_dict``); it never takes the epoch from Lightning,
whose epoch counter is not what the uninterrupted run had after resuming from a checkpoint written at an epoch's
last batch. So a resumed run reads exactly the rows the uninterrupted run reads (docs/runs.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Row indices of rank ``rank`` of ``world_size``, epoch after epoch, from a saved position.

    Args:
        n_rows: rows in the dataset.
        batch_size: rows per batch on each rank; an epoch yields whole batches only.
        seed: the shuffle's seed (``permutation``).
        rank, world_size: this process's share (``perm[rank::world_size]``).
        shuffle: False keeps the rows in order (every epoch the same).
    """

    def __init__(
        self, n_rows: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.n_rows, self.seed, self.rank, self.world_size, self.shuffle = n_rows, seed, rank, world_size, shuffle
        self.per_rank = n_rows // world_size // batch_size * batch_size
        self.epoch, self.yielded = 0, 0
        self._generator_at = 0, torch.Generator().manual_seed(seed).get_state()  # (epoch, state before its draw)

    def __len__(self) -> int:
        return self.per_rank

    def order(self, epoch: int) -> np.ndarray:
        """This rank's rows of ``epoch``, in order ``[per_rank]`` int64 (8 bytes a row, not a Python list)."""
        perm = self.permutation(epoch) if self.shuffle else torch.arange(self.n_rows)  # [n_rows]
        return perm[: self.per_rank * self.world_size][self.rank :: self.world_size].numpy()

    def permutation(self, epoch: int) -> torch.Tensor:
        """The rows of ``epoch`` in the order ``StatefulDataLoader(shuffle=True, generator=manual_seed(seed))`` gives
        them (cdlm's loader before this sampler, so earlier runs keep their order): each epoch draws a
        ``randperm(n_rows)`` and then the loader's base seed from one generator."""
        done, state = self._generator_at
        if done > epoch:
            done, state = 0, torch.Generator().manual_seed(self.seed).get_state()
        generator = torch.Generator()
        generator.set_state(state)
        for _ in range(epoch - done):
            torch.randperm(self.n_rows, generator=generator)
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader's base seed
        self._generator_at = epoch, generator.get_state()
        return torch.randperm(self.n_rows, generator=generator)

    def __iter__(self) -> Iterator[int]:
        if self.yielded >= self.per_rank:  # the last epoch was read to its end: the next one begins
            self.epoch, self.yielded = self.epoch + 1, 0
        order = self.order(self.epoch)
        while self.yielded < len(order):
            for index in order[self.yielded : self.yielded + 4096].tolist():
                self.yielded += 1
                yield index

    def state_dict(self) -> dict[str, int]:
        """The position over all ranks: ``epoch`` and the ``rows`` of it read so far by all ranks together."""
        return {"epoch": self.epoch, "rows": self.yielded * self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` (which every rank reads from rank 0's checkpoint: all ranks are at one position);
        with another number of ranks the position over all ranks is kept, rounded down to a row per rank."""
        self.epoch, self.yielded = int(state["epoch"]), int(state["rows"]) // self.world_size
