"""GPU transport: vLLM 0.32's weight-transfer API (`vllm.distributed.weight_transfer`).

- "ipc" (colocated): every trainer rank holds the full gathered tensors on its own GPU (the stream
  gives every rank every tensor); each rank shares CUDA IPC handles of them, vLLM all-gathers the
  handles over the trainer's default group, and trainer rank 0 ships them to the vLLM workers,
  which read the weights of their own GPU without a copy over the wire.
- "nccl" (separate rollout GPUs): trainer rank 0 broadcasts the tensors over an NCCL group it
  shares with the vLLM workers (rank 0 = trainer, 1.. = workers).

Both take the same bucketed stream as the CPU transport: buckets are flattened into vLLM's
`WeightSource` and vLLM's packed mode re-packs them into buffers of `bucket_bytes`.
vLLM's worker runs its layerwise reload between `start_weight_update` and `finish_weight_update`,
so checkpoint-format (HF) tensors are all it needs, as on CPU.

Not run by the CPU test suite (it needs CUDA); written against the vLLM 0.32 source.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from megatron_lead.rollout.sync.base import WeightSync
from megatron_lead.rollout.sync.stream import DEFAULT_BUCKET_BYTES, NamedTensor


class LLMWeightSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol over an in-process `vllm.LLM` handle."""

    def __init__(self, llm):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)
        self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights


class _NoClient:
    """Non-sender trainer ranks join the collectives but never call the inference side."""

    def __getattr__(self, name):
        raise RuntimeError(f"weight-sync client call {name} on a non-sender rank")


def _stream_source(metadata):
    """A vLLM WeightSource whose each round iterates the stream set for that round."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class RoundSource(WeightSource):
        def __init__(self):
            self.stream: Iterator[NamedTensor] | None = None

        def metadata(self):
            return [ParamMeta(name, dtype, tuple(shape)) for name, dtype, shape in metadata]

        def __iter__(self):
            if self.stream is None:
                raise RuntimeError("weight source iterated outside a sync round")
            stream, self.stream = self.stream, None
            return iter(stream)

    return RoundSource()


class TransferApiWeightSync(WeightSync):
    """One vLLM trainer-side transfer engine per trainer rank; rank 0 (the sender) holds the engine.

    metadata: [(hf_name, dtype, shape)] of the whole stream in order (`stream.policy_weight_metadata`),
    declared up front: NCCL sizes its receive buffers from it.
    nccl_init: for "nccl", dict(master_address=..., master_port=..., world_size=1 + vLLM workers).
    """

    transport = "transfer_api"

    def __init__(self, engine=None, backend: str = "ipc", *, metadata=None, rank: int | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, nccl_init: dict | None = None,
                 client=None):
        super().__init__(engine)
        if backend not in ("ipc", "nccl"):
            raise ValueError(f"transfer_api backend must be ipc or nccl, got {backend!r}")
        if metadata is None:
            raise ValueError("transfer_api weight sync needs the stream's metadata (policy_weight_metadata)")
        if backend == "nccl" and nccl_init is None:
            raise ValueError("the nccl transport needs nccl_init (master_address, master_port, world_size)")
        self.transport = backend
        self.rank = torch.distributed.get_rank() if rank is None else rank
        if self.rank == 0 and engine is None and client is None:
            raise ValueError("trainer rank 0 sends the weights: give it the rollout engine (or a client)")
        self.bucket_bytes = bucket_bytes
        self.backend = backend
        self.nccl_init = nccl_init
        self.client = client or (LLMWeightSyncClient(engine.llm) if engine is not None else _NoClient())
        self.source = _stream_source(metadata)
        self._trainer_engine = None

    def _trainer(self):
        # Built lazily, on the first sync: the NCCL rendezvous blocks until vLLM joins it.
        if self._trainer_engine is None:
            from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

            if self.backend == "ipc":
                from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

                info = IPCTrainerInitInfo(rank=self.rank, packed=True,
                                          packed_buffer_size_bytes=self.bucket_bytes)
            else:
                from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

                info = NCCLTrainerInitInfo(rank=self.rank, packed=True,
                                           packed_buffer_size_bytes=self.bucket_bytes, **self.nccl_init)
            self._trainer_engine = WeightTransferTrainerFactory.trainer_init(
                info, client=self.client, source=self.source)
        return self._trainer_engine

    def push(self, buckets: Iterator[list[NamedTensor]]) -> None:
        # Every rank runs this (IPC all-gathers handles over the default group); only rank 0 ships.
        self.source.stream = (item for bucket in buckets for item in bucket)
        self._trainer().send_weights()

    def drains_without_engine(self) -> bool:
        return False  # non-sender ranks still join vLLM's trainer-side collectives

    def close(self) -> None:
        if self._trainer_engine is not None:
            self._trainer_engine.shutdown()
            self._trainer_engine = None
