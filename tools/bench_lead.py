"""Times the full LEAD advantage computation (targets -> rewards -> PSI -> whitening).

    python tools/bench_lead.py [--prompts 4096] [--group 16] [--method lead] [--repeats 50]

Single process on one CPU thread (torch.set_num_threads(1)), so it measures the arithmetic;
then the same step on 2 gloo ranks to count the collectives one step issues.
"""

import argparse
import statistics
import time

import torch

from megatron_lead.launch import run_local
from megatron_lead.lead import AdvantageComputer, LeadConfig, RolloutShard


def make_shard(prompts: int, group: int, seed: int = 0, rank: int = 0, world: int = 1) -> RolloutShard:
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(prompts).repeat_interleave(group)
    length = (torch.rand(prompts * group, generator=g) * 8000).round()
    score = (torch.rand(prompts * group, generator=g) < 0.5).double()
    keep = torch.arange(prompts * group) % world == rank  # round-robin: every prompt on every rank
    return RolloutShard(prompt_index=idx[keep], length=length[keep], score=score[keep], num_prompts=prompts)


def _count_collectives(rank, world, prompts, group, method):
    import torch.distributed as dist

    comp = AdvantageComputer(LeadConfig.for_method(method), group=dist.group.WORLD)
    res = comp(make_shard(prompts, group, rank=rank, world=world))
    return res.metrics["lead/collectives"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4096)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--method", default="lead")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)

    comp = AdvantageComputer(LeadConfig.for_method(args.method))
    shard = make_shard(args.prompts, args.group)
    for _ in range(5):
        comp(shard)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        comp(shard)
        times.append((time.perf_counter() - t0) * 1e3)
    calls = run_local(_count_collectives, 2, args.prompts, args.group, args.method, cpu_only=True)[0]
    print(f"method={args.method} prompts={args.prompts} group={args.group} rollouts={args.prompts * args.group} "
          f"threads=1: median {statistics.median(times):.2f} ms, min {min(times):.2f} ms, "
          f"max {max(times):.2f} ms over {args.repeats} steps; collectives per step (2 ranks): {int(calls)}")


if __name__ == "__main__":
    main()
