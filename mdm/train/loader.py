"""A resumable, infinite, per-rank batch iterator over a map-style dataset (fine-tuning data).

Each epoch's order is a permutation drawn from ``(seed, epoch)``; rank ``r`` of ``W`` takes every W-th
index (padding the tail by wrapping, as ``DistributedSampler``). The position is ``(epoch, batches
consumed in the epoch)``, so resuming skips straight to the next unseen batch without replaying data.
Augmentation randomness comes from a DataLoader generator seeded by ``(seed, rank, epoch, start)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


class EpochLoader:
    """Infinite iterator of collated batches with ``state_dict()`` / ``load_state_dict()``.

    Args:
        dataset: map-style dataset.
        batch_size: samples per batch on this rank.
        collate: batch function.
        rank / world_size: this process and the number of processes.
        seed: base seed of the shuffles.
        num_workers: DataLoader workers.
        drop_last: drop the last incomplete batch of an epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        collate: Callable[[list[Any]], Any],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = True,
    ) -> None:
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("the training set is empty (were all records skipped? see the log above)")
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.drop_last = num_workers, drop_last
        self.epoch, self.consumed = 0, 0
        self._it: Iterator | None = None

    def _indices(self, epoch: int) -> list[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        per_rank = -(-n // self.world_size)
        order += order[: per_rank * self.world_size - n]  # pad by wrapping so every rank has per_rank
        return order[self.rank :: self.world_size]

    def batches_per_epoch(self) -> int:
        per_rank = -(-len(self.dataset) // self.world_size)  # type: ignore[arg-type]
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def _start(self) -> None:
        idx = self._indices(self.epoch)
        batches = [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        batches = batches[self.consumed :]
        g = torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.epoch) * 1_000_003 + self.consumed
        )
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            generator=g,
            persistent_workers=False,
        )
        self._it = iter(loader)

    def __iter__(self) -> EpochLoader:
        return self

    def __next__(self) -> Any:
        while True:
            if self._it is None:
                self._start()
            try:
                batch = next(self._it)  # type: ignore[arg-type]
                self.consumed += 1
                return batch
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.consumed = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._it = None
