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


def _rank_and_world(rank: int, world: int):
    return rank, world


def _fake_cuda(monkeypatch, devices: int):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)


REFUSAL = ("2 local ranks (a CPU gloo group) would all use cuda:0: on a machine with CUDA start them with "
           "torchrun --nproc-per-node 2 -m megatron_lead.cli COMMAND ...")


def test_several_local_ranks_are_refused_on_a_cuda_machine_before_any_process_starts(monkeypatch):
    import megatron_lead.launch as launch

    _fake_cuda(monkeypatch, 8)
    monkeypatch.setattr(launch.mp, "get_context", lambda *a, **k: pytest.fail("a process was started"))
    with pytest.raises(ValueError) as info:
        run_local(_rank_and_world, 2)
    assert str(info.value) == REFUSAL
    launch.refuse_on_cuda(1)  # one rank has cuda:0 to itself


def test_cpu_only_functions_still_run_on_several_ranks_of_a_cuda_machine(monkeypatch):
    _fake_cuda(monkeypatch, 8)  # the parent's view only: the spawned ranks see this CPU machine
    assert run_local(_rank_and_world, 2, cpu_only=True, timeout=120) == [(0, 2), (1, 2)]


@pytest.mark.slow
def test_train_nproc_on_a_cuda_machine_prints_the_refusal_as_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import fault_inject as fi

    from megatron_lead.cli import main

    fi.prepare(str(tmp_path))
    capsys.readouterr()  # the tiny model's "Writing model shards" progress
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MEGATRON_LEAD_DEBUG", raising=False)
    _fake_cuda(monkeypatch, 2)
    code = main(["train", *fi.overrides(str(tmp_path), str(tmp_path / "run"), 1), "--nproc", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert (code, err) == (2, [f"megatron-lead train: error: {REFUSAL}"])
