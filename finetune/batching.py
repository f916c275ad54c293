"""Dataloaders: the task's collator over length-aware batches.

Training batches are seeded and reproducible for a (seed, epoch), so that a resumed run skips exactly the
batches it already trained on; evaluation batches are sorted by length (little padding, memory peaks
at once) and carry their feature indices, so that outputs go back to dataset order after gathering.
A streamed training split (``data.streaming``) is batched by :class:`StreamBatches`, one epoch at a time.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from datasets.distributed import split_dataset_by_node
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


class StreamBatches:
    """This process's training batches of a stream (``data.streaming``), one epoch at a time.

    Each epoch the whole stream is shuffled with a buffer (``data.shuffle_buffer``, seeded by run seed + epoch)
    and dealt out by ``datasets.distributed.split_dataset_by_node``: with as many files (shards) as a multiple of
    the process count each process reads its own files, otherwise every process reads the stream and keeps
    every ``num_processes``-th example, so that each example goes to exactly one process. The examples are
    checked (``Task.prepare_stream``) and tokenized (``Task.features``) as they are read; in the second case
    datasets applies the split last, so each process also tokenizes the examples it then leaves to the others
    (give the stream several files to avoid that).

    Batches are full (``train.batch_size``), and an epoch ends for all processes together when one of them has
    no full batch left (one flag reduced per micro-batch; otherwise the others would wait forever in the next
    gradient all-reduce): at most ``batch_size x processes`` examples at the end of an epoch are left out of it.
    A resumed run skips the examples its process already trained on in the epoch (batches x batch size), before
    they are tokenized: exact, and the stream is read again up to there."""

    def __init__(self, task: Task, stream: datasets.IterableDataset, config: Config, accelerator: Accelerator,
                 where: str):
        self.task, self.stream, self.config, self.accelerator, self.where = task, stream, config, accelerator, where

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``epoch`` after the first ``skip_batches`` of this process, on its device."""
        t, accelerator = self.config.train, self.accelerator
        examples = self.stream
        if self.config.data.shuffle_buffer:
            examples = examples.shuffle(seed=self.config.run.seed + epoch, buffer_size=self.config.data.shuffle_buffer)
        skip = skip_batches * t.batch_size
        if accelerator.num_processes > 1:
            own_files = examples.num_shards % accelerator.num_processes == 0
            examples = split_dataset_by_node(examples, accelerator.process_index, accelerator.num_processes,
                                             strategy="shards" if own_files else "examples")
            # datasets deals the examples out as they are iterated, around every step added later: a skip counts
            # this process's examples when it reads its own files, but the whole stream's otherwise.
            skip = skip if own_files else skip * accelerator.num_processes
        if skip:
            examples = examples.skip(skip)
        features = self.task.features(self.task.prepare_stream(examples, self.where), "train")
        rows = iter(features)
        while True:
            chunk = [row for _, row in zip(range(t.batch_size), rows)]
            full = len(chunk) == t.batch_size
            if not self._everyone(full):
                return
            yield send_to_device(self.task.collate(chunk), accelerator.device)

    def _everyone(self, full: bool) -> bool:
        """Whether every process has a full batch (a collective when there are several)."""
        if self.accelerator.num_processes == 1:
            return full
        flag = torch.tensor(int(full), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "min").item())


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


def split_batch(batch: dict[str, Any], max_tokens: int) -> list[dict[str, Any]]:
    """``batch`` cut into consecutive groups of rows of at most ``max_tokens`` tokens each (rows x the padded
    length; at least one row per part). Tensors whose first dimension is the rows are sliced; anything else
    goes to every part unchanged. One part (the batch itself) when it fits."""
    rows, length = batch["input_ids"].shape[:2]
    per_part = max(1, max_tokens // max(1, length))
    if per_part >= rows:
        return [batch]
    return [{key: value[start:start + per_part] if torch.is_tensor(value) and value.dim() and value.shape[0] == rows
             else value for key, value in batch.items()}
            for start in range(0, rows, per_part)]
