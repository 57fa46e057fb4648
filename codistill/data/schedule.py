"""The deterministic batch schedule: (seed, step) → example indices, identical on every peer.

Peers never share a data loader, yet DML needs them to see the same batch at the same step.
So the order is a pure function of the seed and the epoch: any process — a thread in the
local runner, a Ray worker on another node, a worker restarted from a checkpoint — computes
the same indices for the same step without talking to anyone.
"""

from __future__ import annotations

import torch

from codistill.errors import ConfigError


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for key in keys:  # a simple, stable mix of the keys (Python's hash() is salted per process)
        seed = (seed * 1_000_003 + int(key) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class BatchSchedule:
    """Which training examples a peer uses at each step.

    With `num_shards` > 1 the training set is split once (from the seed) into disjoint,
    equal parts and peer `shard` draws only from its own part; otherwise every peer
    draws from the whole set in the same order. The last incomplete batch of an epoch
    is dropped so every step has the same batch size on every peer.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, shard: int = 0, num_shards: int = 1):
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not in 0..{num_shards - 1}")
        self.seed = seed
        self.batch_size = batch_size
        if num_shards > 1:
            split = torch.randperm(num_examples, generator=_generator(seed, 7919))
            per_shard = num_examples // num_shards
            self.pool = split[shard * per_shard:(shard + 1) * per_shard]
        else:
            self.pool = torch.arange(num_examples)
        if batch_size > len(self.pool):
            # A corpus smaller than one batch: the user's setting, said in one line (exit 2).
            raise ConfigError("data.batch_size", f"is {batch_size}, more than the {len(self.pool)} training examples "
                              f"(windows, for text) each peer draws from; lower data.batch_size or give more data")
        self.steps_per_epoch = len(self.pool) // batch_size
        # (epoch, its order), replaced as one object: the local runner's peer threads share a
        # schedule, and a teacher may read the next epoch while a peer trains on this one.
        self._epoch_order: tuple[int, torch.Tensor] = (-1, self.pool)

    def indices(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        cached_epoch, order = self._epoch_order
        if cached_epoch != epoch:
            order = self.pool[torch.randperm(len(self.pool), generator=_generator(self.seed, epoch))]
            self._epoch_order = (epoch, order)
        return order[position * self.batch_size:(position + 1) * self.batch_size]

    def generator(self, step: int) -> torch.Generator:
        """Random numbers for augmenting the batch of `step`, the same on every peer."""
        return _generator(self.seed, step, 104729)
