"""Dataloaders: the task's collator over length-aware batches.

Training batches are seeded and reproducible for a (seed, epoch), so that a resumed run skips exactly the
batches it already trained on; evaluation batches are sorted by length (little padding, memory peaks
at once) and carry their feature indices, so that outputs go back to dataset order after gathering.
"""

from __future__ import annotations

import math
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from finetune.config import Config
from finetune.tasks.base import Task

INDEX = "feature_index"
"""The batch key holding each evaluation row's feature index."""


class LengthGroupedBatchSampler:
    """Seeded batches of indices, reproducible for a (seed, epoch): shuffled, and when grouping by
    length, sorted inside chunks of 50 batches so a batch holds similar lengths (less padding)
    while the batch order stays random. Resume skips batches of this exact order.

    With several processes only full batches are kept, as many as a multiple of the process count:
    accelerate then deals them out round-robin without padding the epoch with repeated examples, so
    no example is seen twice in an epoch (the few left over change from epoch to epoch)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool,
                 num_processes: int = 1):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.num_processes = num_processes
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.num_processes > 1:
            return len(self.lengths) // self.batch_size // self.num_processes * self.num_processes
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).numpy()
        if self.group_by_length:
            chunk = self.batch_size * 50
            order = np.concatenate([
                part[np.argsort(-self.lengths[part], kind="stable")]
                for part in np.split(order, range(chunk, len(order), chunk))
            ])
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        if self.group_by_length:
            batch_order = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in batch_order]
        if self.num_processes > 1:
            batches = [b for b in batches if len(b) == self.batch_size][:len(self)]
        yield from batches


def train_dataloader(task: Task, features: datasets.Dataset, config: Config, num_processes: int = 1) -> DataLoader:
    t = config.train
    sampler = LengthGroupedBatchSampler(features["length"], t.batch_size, config.run.seed, t.group_by_length,
                                        num_processes)
    workers = dataloader_workers(config)
    return DataLoader(features, batch_sampler=sampler, collate_fn=task.collate,
                      num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None,
                      # its own generator: creating an iterator must not draw from the global RNG,
                      # or a resumed run's dropout masks would differ from an uninterrupted one
                      generator=torch.Generator().manual_seed(config.run.seed))


def dataloader_workers(config: Config) -> int:
    """``train.num_workers``, or its default: 2 prefetching workers on a GPU, none on CPUs."""
    if config.train.num_workers is not None:
        return config.train.num_workers
    return 2 if torch.cuda.is_available() else 0


class LengthSortedBatches:
    """Batches of feature indices, longest first (memory peaks at once, little padding). All batches
    are full but the last, and ``batch_size`` is exposed, which is what accelerate needs to shard
    them and to drop the examples it repeats to even out the last round (``gather_for_metrics``)."""

    drop_last = False

    def __init__(self, lengths: list[int], batch_size: int):
        self.order = np.argsort(-np.asarray(lengths), kind="stable").tolist()
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.order), self.batch_size):
            yield self.order[start:start + self.batch_size]


def eval_dataloader(task: Task, features: datasets.Dataset, batch_size: int) -> DataLoader:
    """Length-sorted batches; each carries its feature indices (``INDEX``) so outputs go back in dataset order."""
    indexed = features.add_column(INDEX, list(range(len(features))))

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = task.collate(rows)
        batch[INDEX] = torch.tensor([row[INDEX] for row in rows], dtype=torch.long)
        return batch

    return DataLoader(indexed, batch_sampler=LengthSortedBatches(features["length"], batch_size), collate_fn=collate)
