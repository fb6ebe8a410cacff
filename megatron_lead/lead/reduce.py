"""Batch statistics reduced over the data-parallel group.

Every statistic LEAD needs (per-prompt group moments, PSI moments, whitening moments) is a
*sum* over rollouts, so each rank sums what it holds and one all-reduce makes the numbers
global. A prompt's rollouts may therefore sit on any ranks, and the result does not depend on
the number of ranks. Sums are float64: the variances are formed as E[x^2] - E[x]^2.

`group=None` means single-process: no collective is issued. The trainer passes its
data-parallel group explicitly, so a test or the replay tool can never reduce over the wrong
group by accident.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class GroupReducer:
    """Issues the collectives for one process group and counts them (benchmarks report it)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.calls = 0

    @property
    def distributed(self) -> bool:
        return self.group is not None and dist.get_world_size(self.group) > 1

    def _device(self) -> torch.device:
        # NCCL reduces only CUDA tensors; gloo only CPU ones.
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if not self.distributed:
            return t
        self.calls += 1
        buf = t.to(self._device())
        dist.all_reduce(buf, op=op, group=self.group)
        return buf.to(t.device)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the group (returns a tensor on t's device)."""
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def min(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise minimum over the group."""
        return self._all_reduce(t, dist.ReduceOp.MIN)

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate 1-D/2-D tensors of different lengths from every rank (rank order)."""
        if not self.distributed:
            return t
        self.calls += 1
        parts: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, t.cpu(), group=self.group)
        return torch.cat(parts).to(t.device)
