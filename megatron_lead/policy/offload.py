"""Move the trainer's GPU state to host memory while the colocated vLLM generates, and back.

In a colocated step vLLM and Megatron share each GPU. During generation Megatron needs none of
its state, yet without this its fp32 gradient buffer (4 bytes/param), fp32 main params and Adam
moments (12 bytes/param, sharded over DP by the distributed optimizer) and bf16 weights
(2 bytes/param) would stay resident and leave vLLM less room for its KV cache. `TrainStateOffload`
frees them around generation:

    offload_optimizer_and_grads()   before vLLM wakes (the weight sync still reads the weights)
    offload_weights()               optional: after the sync, before vLLM's KV cache wakes
    reload()                        after generation, before the log-prob passes and the update

How: each tensor's storage is copied byte for byte into a host buffer (pinned when CUDA is
there, allocated once and reused every step) and then resized to 0 bytes; reload resizes it back
and copies the bytes in. Every tensor object stays the same and every view into a storage stays
a view into it (params are views into Megatron DDP's param buffer, `main_grad`s into its grad
buffer, the distributed optimizer's fp32 shards of fp32 params into the params), so Megatron,
the reference swap and the optimizer's bookkeeping never notice; the round trip is bit-exact
(tests/test_policy_offload.py, on CPU, where `resize_(0)` frees host memory the same way).

Why not Megatron-Core 0.16.1's own RL helpers (docs/GPU.md has the argument in full):
`DistributedDataParallel.offload_grad_buffers` discards the gradients (`reload_from_cpu` zeroes
them), and `MegatronOptimizer.offload_to_cpu` rebinds `p.data` to a pageable `.cpu()` copy
allocated anew each call, which breaks the views above (the fp32 distributed optimizer's shards,
the fp32 optimizer's params that ARE the weights) and does nothing to tensors that are not CUDA.
"""

from __future__ import annotations

import gc

import torch

_KINDS = ("grads", "optimizer", "weights")


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over the whole storage of t (whatever t's offset, shape and dtype)."""
    storage = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage, 0, (storage.nbytes(),))


def _inner_optimizers(optimizer) -> list:
    if optimizer is None:
        return []
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


class TrainStateOffload:
    """Frees and restores the storages of a Megatron policy's gradients, optimizer state and
    (optionally) weights; see the module docstring for when each call happens."""

    def __init__(self, model_chunks: list, optimizer, pin: bool | None = None):
        self.model_chunks = model_chunks
        self.optimizer = optimizer
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._host: dict[int, torch.Tensor] = {}      # id(owner tensor) -> host bytes, reused
        self._owners: dict[int, torch.Tensor] = {}    # keeps each owner alive (stable ids)
        self._away: list[tuple[torch.Tensor, int]] = []  # (owner, nbytes) now freed

    # ---- what lives where ------------------------------------------------------------------

    def _weights(self) -> list[torch.Tensor]:
        return [p for chunk in self.model_chunks for p in chunk.parameters()]

    def _grads(self) -> list[torch.Tensor]:
        out = []
        for chunk in self.model_chunks:
            for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", []):
                if buffer.grad_data is not None:
                    out.append(buffer.grad_data)
        return out

    def _optimizer_state(self) -> list[torch.Tensor]:
        """Adam's moments (and any other state tensor), and the main params that are not the
        weights themselves (fp32 copies of bf16 params; the fp32 optimizers' params are)."""
        weights = {_storage_key(p) for p in self._weights()}
        out = []
        for inner in _inner_optimizers(self.optimizer):
            torch_opt = getattr(inner, "optimizer", None)
            if torch_opt is None:
                continue
            for group in torch_opt.param_groups:
                out += [p for p in group["params"] if _storage_key(p) not in weights]
            for state in torch_opt.state.values():
                out += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        return out

    def _tensors(self, kind: str) -> list[torch.Tensor]:
        return {"grads": self._grads, "optimizer": self._optimizer_state, "weights": self._weights}[kind]()

    # ---- moving -----------------------------------------------------------------------------

    def _offload(self, tensors: list[torch.Tensor]) -> int:
        owners: dict[int, torch.Tensor] = {}
        for t in tensors:  # one owner per storage (params share the DDP buffer's); freed ones have 0 bytes
            if t.untyped_storage().nbytes() > 0:
                owners.setdefault(_storage_key(t), t)
        moved = []
        for t in owners.values():
            nbytes = t.untyped_storage().nbytes()
            host = self._host.get(id(t))
            if host is None or host.numel() != nbytes:
                host = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=self.pin)
                self._host[id(t)], self._owners[id(t)] = host, t
            host.copy_(_byte_view(t), non_blocking=True)
            moved.append((t, nbytes))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the host copies are complete before the storages go
        for t, _ in moved:
            t.untyped_storage().resize_(0)
        self._away += moved
        if moved and torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()  # back to the driver, where vLLM's allocator finds it
        return sum(n for _, n in moved)

    def offload_optimizer_and_grads(self) -> int:
        """Free the gradient buffers and the optimizer state; returns the bytes moved."""
        return self._offload(self._tensors("grads") + self._tensors("optimizer"))

    def offload_weights(self) -> int:
        """Free the weights too (after the weight sync has read them); returns the bytes moved."""
        return self._offload(self._tensors("weights"))

    def reload(self) -> int:
        """Everything offloaded back, bit for bit; returns the bytes moved."""
        total = 0
        for t, nbytes in self._away:
            t.untyped_storage().resize_(nbytes)
            _byte_view(t).copy_(self._host[id(t)], non_blocking=True)
            total += nbytes
        if self._away and torch.cuda.is_available():
            torch.cuda.synchronize()
        self._away = []
        return total

    @property
    def offloaded(self) -> bool:
        return bool(self._away)
