"""launch.run_local: a rank that dies without reporting is named as the cause of a failed run."""

import os
import signal
import time

import pytest

from megatron_lead.launch import run_local


def _one_rank_killed(rank: int, world: int):
    import torch
    import torch.distributed as dist

    if rank == 1:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    # Rank 0 waits in a read on its peer; the peer's death resets the connection at once, so rank 0
    # reports its own error before the parent's poll can see that rank 1 died.
    dist.all_reduce(torch.ones(1))
    return rank


def test_a_silently_dead_rank_is_named_before_the_errors_of_its_peers():
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        run_local(_one_rank_killed, 2, timeout=120)
    first = str(info.value).splitlines()[0]
    assert first == "rank 1 died with exit code -9 without reporting", str(info.value)[-2000:]
    assert time.monotonic() - start < 60
