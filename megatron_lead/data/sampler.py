"""Which prompts each training step uses: a seeded, resumable shuffle over epochs.

The sampler hands out *global* batches (indices into the whole prompt list); the trainer
splits each batch over the data-parallel ranks. Every rank runs its own sampler, and they agree
because the order is a pure function of (seed, epoch, position): no global RNG, no
communication. The same seed therefore gives the same prompts at every step whatever the number
of ranks, and (epoch, position) in the checkpoint is enough to resume exactly.
"""

from __future__ import annotations

import hashlib

import torch

STATE_KEYS = ("epoch", "position", "seed", "num_prompts", "batch_size")


def epoch_permutation(num_prompts: int, seed: int, epoch: int) -> list[int]:
    """The order of epoch `epoch`: torch.randperm from a generator seeded with (seed, epoch).

    The pair is hashed to one 64-bit seed, so no two (seed, epoch) pairs share a stream (as
    seed + epoch would for (1, 0) and (0, 1)), and torch's CPU generator makes it the same
    list on every machine.
    """
    digest = hashlib.sha256(f"megatron-lead-sampler:{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(num_prompts, generator=generator).tolist()


def spread(num: int, limit: int) -> list[int]:
    """`limit` indices spread evenly over range(num) (all when limit is 0 or >= num): a capped
    validation set keeps every part of a file sorted by level or source, not only its head."""
    if not limit or limit >= num:
        return list(range(num))
    return [(i * num) // limit for i in range(limit)]


def stratified(order: list[int], groups: list) -> list[int]:
    """`order` interleaved round-robin over the groups (levels) of its items, each group keeping
    its relative order and the groups taken in order of first appearance: consecutive batches of
    the result hold the groups in equal numbers (while every group lasts). A pure function of its
    inputs, so a stratified sampler resumes from (epoch, position) as a plain one does."""
    buckets: dict = {}
    for i in order:
        buckets.setdefault(groups[i], []).append(i)
    lists, out = list(buckets.values()), []
    for k in range(max((len(b) for b in lists), default=0)):
        out.extend(b[k] for b in lists if k < len(b))
    return out


class PromptSampler:
    """Global batches of prompt indices, each epoch a fresh permutation.

    drop_last=True: when fewer than `batch_size` prompts are left in an epoch they are skipped
    and the next epoch starts, so every step has the same global batch size (the LEAD
    statistics and the loss normalisation assume it). drop_last=False: the epoch ends with one
    short batch instead.

    `epoch` is the epoch of the last batch handed out, `position` how many of its prompts have
    been handed out; the next epoch is entered lazily, on the call that needs it.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int, drop_last: bool = True,
                 groups: list | None = None):
        """groups: a label per prompt (its level) to stratify every batch by (`stratified`), or None."""
        if num_prompts < 1:
            raise ValueError(f"num_prompts={num_prompts} must be at least 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if drop_last and batch_size > num_prompts:
            raise ValueError(f"batch_size={batch_size} is larger than num_prompts={num_prompts} "
                             "(with drop_last no batch would ever be full)")
        if groups is not None and len(groups) != num_prompts:
            raise ValueError(f"{len(groups)} group labels for {num_prompts} prompts")
        self.groups = groups
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._perm: list[int] | None = None
        self._perm_epoch = -1

    def _order(self) -> list[int]:
        if self._perm_epoch != self.epoch:  # cached: one randperm per epoch, not per step
            self._perm = epoch_permutation(self.num_prompts, self.seed, self.epoch)
            if self.groups is not None:
                self._perm = stratified(self._perm, self.groups)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> list[int]:
        """Global indices of the next batch (`batch_size` of them, or fewer only at the end of
        an epoch with drop_last=False)."""
        left = self.num_prompts - self.position
        if left <= 0 or (self.drop_last and left < self.batch_size):
            self.epoch += 1
            self.position = 0
        start = self.position
        self.position = min(start + self.batch_size, self.num_prompts)
        return self._order()[start:self.position]

    def state_dict(self) -> dict[str, int]:
        return {key: getattr(self, key) for key in STATE_KEYS}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`. The dataset and batch size must be the same as when it was
        saved (else the saved position means other prompts); the saved seed is adopted so a
        resumed run continues the stream it started."""
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"sampler state lacks {', '.join(missing)}")
        for key in ("num_prompts", "batch_size"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]} but this run has "
                                 f"{key}={getattr(self, key)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_prompts:
            raise ValueError(f"sampler state has epoch={epoch}, position={position}: out of range")
        self.seed, self.epoch, self.position = int(state["seed"]), epoch, position
        self._perm_epoch = -1
