"""Curriculum learning for SFT (seed 002): easy examples first, then everything mixed.

--curriculum length         difficulty = number of tokens of the example
--curriculum <column>       difficulty = a numeric column of the data rows (e.g. "level")
--curriculum-epochs K       the first K epochs visit the examples from easiest to hardest (ties keep
                            the data order); later epochs shuffle them as usual (seeded)

The schedule is deliberately simple: a sorted pass lets the model learn short, easy patterns before
long ones (the seed's "progressively harder data"); mixing afterwards avoids the forgetting a
fixed order causes.
"""
from __future__ import annotations

import logging

import torch
from transformers import Trainer

log = logging.getLogger("aitraining")


def order(difficulties: list[float]) -> list[int]:
    """Indices from easiest to hardest; a stable sort, so equal difficulties keep the data order."""
    return sorted(range(len(difficulties)), key=lambda i: difficulties[i])


def sort_records(records: list[dict], key: str) -> list[dict]:
    """Records in curriculum order by a column (the loader put its value in record['difficulty'])."""
    if key == "length":
        return records  # measured in tokens after tokenizing: see sort_dataset
    return [records[i] for i in order([r["difficulty"] for r in records])]


def sort_dataset(dataset, key: str):
    """A tokenized dataset in curriculum order ('length': by token count)."""
    if key != "length":
        return dataset
    return dataset.select(order([len(ids) for ids in dataset["input_ids"]]))


class CurriculumSampler(torch.utils.data.Sampler):
    """In order for the first `ordered_epochs` epochs, then a seeded permutation per epoch."""

    def __init__(self, n: int, ordered_epochs: int, seed: int):
        self.n, self.ordered_epochs, self.seed = n, ordered_epochs, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, epoch: int) -> list[int]:
        if epoch < self.ordered_epochs:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1  # when nobody calls set_epoch, count the passes ourselves
        return iter(self.indices(epoch))

    def __len__(self) -> int:
        return self.n


class CurriculumTrainer(Trainer):
    """transformers' Trainer whose training sampler follows the curriculum (the dataset is already
    sorted easy -> hard)."""

    curriculum_epochs = 1

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return CurriculumSampler(len(dataset), self.curriculum_epochs, self.args.seed)
