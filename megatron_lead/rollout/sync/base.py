"""The weight-sync interface, its per-step stats and the factory that picks a transport."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator

import torch

from megatron_lead.rollout.sync.stream import (
    DEFAULT_BUCKET_BYTES, NamedTensor, iter_buckets, policy_weight_stream, tensor_bytes)

log = logging.getLogger("megatron_lead.rollout.sync")

# One transport: the engine always runs in the trainer's process (rollout.engine), CPU and GPU.
TRANSPORTS = ("reload",)


@dataclass
class SyncStats:
    transport: str
    seconds: float     # gather + transfer + load, wall time of the whole sync on this rank
    bytes: int         # tensor bytes moved into the engine (or drained, on a rank without one)
    tensors: int
    buckets: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def metrics(self) -> dict[str, float]:
        return {"rollout/sync_seconds": self.seconds, "rollout/sync_bytes": float(self.bytes),
                "rollout/sync_gb_per_s": self.gb_per_s}

    def line(self) -> str:
        return (f"weight sync ({self.transport}): {self.tensors} tensors in {self.buckets} buckets, "
                f"{self.bytes / 1e6:.2f} MB in {self.seconds:.3f} s ({self.gb_per_s:.3f} GB/s)")


class WeightSync(ABC):
    """Moves a bucketed (hf_name, tensor) stream into a RolloutEngine.

    engine=None: this rank hosts no engine but must still drain the stream (it is collective).
    """

    transport: ClassVar[str]

    def __init__(self, engine=None):
        self.engine = engine

    @abstractmethod
    def push(self, buckets: Iterator[list[NamedTensor]]) -> None:
        """Consume every bucket into the engine; the new weights are live when this returns."""

    def sync(self, named_tensors: Iterable[NamedTensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES
             ) -> SyncStats:
        stats = SyncStats(self.transport, 0.0, 0, 0, 0)

        def counted(buckets):
            for bucket in buckets:
                stats.buckets += 1
                stats.tensors += len(bucket)
                stats.bytes += sum(tensor_bytes(t) for _, t in bucket)
                yield bucket

        start = time.perf_counter()
        buckets = counted(iter_buckets(named_tensors, bucket_bytes))
        if self.engine is None:
            for _ in buckets:
                pass
        else:
            self.push(buckets)
        stats.seconds = time.perf_counter() - start
        if stats.tensors == 0:
            raise ValueError("weight sync got an empty stream: no tensors to load")
        log.info(stats.line())
        return stats


def make_weight_sync(engine=None, transport: str = "auto") -> WeightSync:
    """The transport for this engine: "reload", the in-process worker loading the stream.

    engine: this rank's RolloutEngine, or None on a rank that hosts none.
    """
    if transport == "auto":
        transport = "reload"
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown weight-sync transport {transport!r}; use one of {TRANSPORTS}")
    from megatron_lead.rollout.sync.reload import ReloadWeightSync

    return ReloadWeightSync(engine)


def sync_policy_weights(model_chunks: list, weight_sync: WeightSync, hf_config: Any = None,
                        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                        dtype: torch.dtype | None = None) -> SyncStats:
    """Collective over all trainer ranks: push the current Megatron weights into vLLM.

    Each rank passes its own WeightSync (engine=None where it hosts no engine). dtype: cast the
    stream to the engine's dtype if it differs from the model's.
    """
    return weight_sync.sync(policy_weight_stream(model_chunks, hf_config, dtype), bucket_bytes)
