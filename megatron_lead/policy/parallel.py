"""Process groups for the policy: torch.distributed + Megatron's tensor/pipeline-parallel state."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_lead.policy import cpu_compat


def init_parallel(tp: int = 1, pp: int = 1, backend: str | None = None, seed: int = 1234) -> None:
    """Join (or reuse) the default process group and split it into TP x PP x DP groups.

    Reuses an existing default group (launch.run_local, a prior init); otherwise initialises one
    from the torchrun environment, or a group of one process when WORLD_SIZE is not set.
    backend: None picks nccl with CUDA, else gloo.
    """
    cpu_compat.apply()
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor and pipeline parallel sizes must be >= 1, got tp={tp} pp={pp}")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            _single_process_env()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by tp x pp = {tp} x {pp} = {tp * pp}")

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)


def _single_process_env() -> None:
    from megatron_lead.launch import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def destroy_parallel() -> None:
    """Tear down Megatron's groups (the default torch.distributed group stays)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def pp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank()


def tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def pp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size()


def reduce_scalars(values: list[float], groups: list, op=dist.ReduceOp.SUM) -> list[float]:
    """All-reduce a few float64 scalars over each group in turn (metrics; one call per group).

    The buffer lives where the group's backend reduces: CUDA for NCCL, CPU for gloo.
    """
    t = torch.tensor(values, dtype=torch.float64)
    for group in groups:
        if dist.get_world_size(group) > 1:
            on_gpu = dist.get_backend(group) == "nccl"
            buf = t.to(torch.device("cuda", torch.cuda.current_device())) if on_gpu else t
            dist.all_reduce(buf, op=op, group=group)
            t = buf.cpu()
    return t.tolist()


def errors_on_any_rank(error: str | None) -> list[str]:
    """Collective over all ranks: the error texts of the ranks that failed, in rank order.

    For multi-rank writes: a rank that failed goes on to this call instead of raising at once,
    so no other rank is left waiting in a collective; then every rank knows the outcome.
    """
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return [e for e in errors if e]
