"""Run a function on N local processes joined in one gloo (CPU) process group.

Used by the replay tool's `--ranks N`, the multi-process tests, and CPU runs of the trainer
without torchrun. Each rank's return value comes back to the caller, in rank order; an
exception on any rank is re-raised here with that rank's traceback text.

CPU only: the ranks set no CUDA device and join a gloo group, so on a machine with CUDA every
rank would put its model on cuda:0 and reduce GPU tensors through gloo. There, more than one
rank is refused with a line that names torchrun, which gives each rank its LOCAL_RANK device and
NCCL (`policy.parallel.init_parallel`); `cpu_only=True` lets functions that never touch CUDA
(the replay's math) run anyway.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, store: str, fn: Callable, args: tuple, queue) -> None:
    # MASTER_* are for libraries that read them; our group rendezvous through a file, so a port
    # taken by another process between free_port() and here cannot break the start.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
        dist.barrier()  # every rank has its connections before any rank can finish and close them
        # Pickled to bytes here: a tensor put on the queue as is travels as a shared-memory handle
        # that dies with this process, before the parent has read it.
        result = pickle.dumps(fn(rank, world_size, *args))
        dist.barrier()  # no rank tears the group down while another still uses it
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def refuse_on_cuda(world_size: int) -> None:
    """ValueError when `world_size` > 1 local ranks would share cuda:0 (see the module docstring)."""
    if world_size > 1 and torch.cuda.is_available():
        raise ValueError(f"{world_size} local ranks (a CPU gloo group) would all use cuda:0: on a machine with "
                         f"CUDA start them with torchrun --nproc-per-node {world_size} -m megatron_lead.cli COMMAND ...")


def run_local(fn: Callable[..., Any], world_size: int, *args, timeout: float | None = 600.0,
              cpu_only: bool = False) -> list:
    """Call fn(rank, world_size, *args) on `world_size` processes; return the results by rank.

    fn must be importable at module level (spawned processes re-import it). timeout: seconds for
    the whole run (None: no limit). A rank that dies without reporting (killed, out of memory)
    fails the run within seconds, naming the rank; the other ranks are then terminated.
    cpu_only: fn never touches CUDA, so several ranks are fine on a machine with GPUs; otherwise
    more than one rank there is refused before any process starts (`refuse_on_cuda`).
    """
    import queue as queue_module
    import time

    if not cpu_only:
        refuse_on_cuda(world_size)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    store_dir = tempfile.mkdtemp(prefix="megatron-lead-rdzv-")
    store = os.path.join(store_dir, "store")
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, store, fn, args, queue), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    reported: set[int] = set()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, ok, value = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
                if dead:
                    r = dead[0]
                    errors.append(f"rank {r} died with exit code {procs[r].exitcode} without reporting")
                elif deadline is not None and time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout:.0f}s waiting for {world_size - len(results)} rank(s)")
                continue
            if ok:
                results[rank] = pickle.loads(value)
            else:
                reported.add(rank)
                errors.append(f"rank {rank} failed:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
        # A rank that died silently (SIGKILL, out of memory) is the cause; the errors its peers
        # report (a gloo "connection reset") are the consequence, and may arrive first.
        silent = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results
                  and r not in reported and not any(e.startswith(f"rank {r} died") for e in errors)]
        if errors:
            errors[:0] = [f"rank {r} died with exit code {procs[r].exitcode} without reporting" for r in silent]
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(store_dir, ignore_errors=True)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
