"""Peak GPU memory of a phase of a step, counting every allocator on the device (GPU only).

A colocated step has two allocators on each GPU: PyTorch's caching allocator (Megatron) and
vLLM's CuMemAllocator, which maps its weights and KV cache with the CUDA driver's virtual memory
calls and unmaps them when vLLM sleeps, without PyTorch's allocator knowing. So neither
`torch.cuda.max_memory_reserved` (PyTorch's view; it may still count a pool vLLM has unmapped)
nor one reading of the device can tell a phase's peak alone. `PeakMeter` combines them:

    peak = max(used now, used at start + (PyTorch's peak reserved - PyTorch's reserved at start))

where `used` is the device's used memory (cudaMemGetInfo: total - free; every allocator, the
CUDA context, NCCL). The first term is the peak of a phase whose memory is all in place when it
is read (generation: vLLM's weights and KV cache are mapped until it sleeps, so rollout.step
reads it right before); the second that of a phase where only PyTorch's allocator grows (the
Megatron passes, with vLLM asleep). On CPU nothing is measured and the metrics are absent.
"""

from __future__ import annotations

import torch

GB = 1024 ** 3


class PeakMeter:
    """Started at the beginning of a phase; `peak_bytes()` at its end (or at its peak moment)."""

    def __init__(self, cuda=None):
        """cuda: the torch.cuda-like module to read (tests pass a fake); None = torch.cuda, and
        no measurement without CUDA."""
        self.cuda = cuda if cuda is not None else (torch.cuda if torch.cuda.is_available() else None)
        if self.cuda is None:
            return
        self.cuda.synchronize()
        self.used_start = self._used()
        self.reserved_start = self.cuda.memory_reserved()
        self.cuda.reset_peak_memory_stats()

    @property
    def active(self) -> bool:
        return self.cuda is not None

    def _used(self) -> int:
        free, total = self.cuda.mem_get_info()
        return total - free

    def peak_bytes(self) -> int | None:
        """The phase's peak device memory so far (bytes); None without CUDA."""
        if self.cuda is None:
            return None
        self.cuda.synchronize()
        grown = self.cuda.max_memory_reserved() - self.reserved_start
        return max(self._used(), self.used_start + grown)

    def reserved_bytes(self) -> int | None:
        """What PyTorch's allocator holds now (bytes); None without CUDA."""
        return None if self.cuda is None else self.cuda.memory_reserved()
