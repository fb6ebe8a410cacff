"""PeakMeter's arithmetic on a fake CUDA module (the metrics are GPU-only; on CPU they are absent)."""

from __future__ import annotations

from megatron_lead.gpu_memory import GB, PeakMeter

TOTAL = 80 * GB


class FakeCuda:
    """Device used memory = PyTorch's reserved memory + what other allocators (vLLM) have mapped."""

    def __init__(self, reserved=0, other=0):
        self.reserved, self.other, self.peak = reserved, other, reserved
        self.resets = 0

    def alloc(self, nbytes):  # PyTorch's caching allocator grows / shrinks
        self.reserved += nbytes
        self.peak = max(self.peak, self.reserved)

    def synchronize(self):
        pass

    def mem_get_info(self):
        return TOTAL - self.reserved - self.other, TOTAL

    def memory_reserved(self):
        return self.reserved

    def max_memory_reserved(self):
        return self.peak

    def reset_peak_memory_stats(self):
        self.resets += 1
        self.peak = self.reserved


def test_a_megatron_phase_counts_its_transient_peak_on_top_of_everything_resident():
    cuda = FakeCuda(reserved=30 * GB, other=2 * GB)  # a sleeping vLLM still holds 2 GB
    cuda.alloc(5 * GB)                              # an earlier phase's peak: not this phase's
    cuda.alloc(-5 * GB)
    meter = PeakMeter(cuda)
    assert cuda.resets == 1
    cuda.alloc(12 * GB)   # activations of the largest micro-batch
    cuda.alloc(-12 * GB)  # freed again before the phase ends
    assert meter.peak_bytes() == 30 * GB + 2 * GB + 12 * GB
    assert meter.reserved_bytes() == 30 * GB


def test_generation_counts_memory_mapped_outside_pytorch():
    cuda = FakeCuda(reserved=4 * GB)
    meter = PeakMeter(cuda)
    cuda.other = 50 * GB  # vLLM wakes: weights and KV cache through its own allocator
    assert meter.peak_bytes() == 54 * GB


def test_nothing_is_measured_without_cuda():
    meter = PeakMeter()  # this machine has no CUDA
    assert not meter.active and meter.peak_bytes() is None and meter.reserved_bytes() is None
