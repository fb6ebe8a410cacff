"""The trainer's rollout step, once per RL step: wake -> sync weights -> generate -> share -> pad.

    rollout_step:  vLLM's weights wake (GPU, colocated) and the current Megatron weights are
                   pushed into every vLLM replica (sync_policy_weights)
                   -> the KV cache wakes; each replica generates G rollouts for its own slice
                      of the step's prompts; vLLM sleeps again
                   -> the rollouts are shared, and each data-parallel rank keeps the ones it trains
                   -> right-padded [B, s] tokens + response mask + vLLM's log-probs (RolloutBatch)
                      and rollout/* metrics, the same on every rank

Megatron's log-probs of these tokens (PPO's old log-probs, and the rollout/trainer gap
`rollout/logprob_diff`) are not computed here but in the PPO phase (trainer/ppo.py), over the
very micro-batches the update runs: this package holds generation and the weight sync only.

Where things live:
- Every trainer rank hosts one in-process vLLM worker (engine.py, `external_launcher`); vLLM's TP
  groups are consecutive trainer ranks, so there are world / vllm_tp replicas. Replica r generates
  the r-th contiguous slice of the step's prompts: nothing is generated twice, and every rollout
  is kept. The first rank of each replica contributes its rollouts to one all-gather.
- Sampling seeds follow the prompt (`sampling_seed`: run seed, step, the prompt's dataset index),
  not the rank, so a step samples the same rollouts whatever the layout.
- The step's rollouts are ordered by prompt (prompt i's G rollouts are rows i*G .. i*G+G-1 of the
  global list). They are cut into `num_mini_batches` consecutive chunks (PPO mini-batches) and each
  chunk into dp consecutive parts; DP rank d keeps part d of every chunk, in chunk order.
- GPU memory (colocated): vLLM sleeps at level 2 between steps (weights and KV cache freed) and
  wakes in two stages, weights first, so the sync writes into them before the KV cache is
  allocated; `after_sync` lets the trainer free its own weights in between (policy/offload.py).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_lead.rollout.engine import Rollout, SamplingConfig
from megatron_lead.rollout.sync import SyncStats, sync_policy_weights


@dataclass
class RolloutBatch:
    tokens: torch.Tensor
    """[B, s] int64 prompt + response ids, right-padded with pad_id; row i is rollouts[i]."""
    response_mask: torch.Tensor
    """[B, s] bool, True on response tokens."""
    rollout_logprobs: torch.Tensor
    """[B, s] float32 vLLM's sampling log-probs on response tokens, 0 elsewhere."""
    response_lens: torch.Tensor
    """[B] int64 response tokens per rollout."""
    truncated: torch.Tensor
    """[B] bool, cut off at max_response_len (finish_reason "length"): no final answer."""
    rollouts: list[Rollout]
    """This data-parallel rank's rollouts (rows of the tensors above); prompt_index is the prompt's
    position in the step's global prompt list."""
    rows: list[int] = field(default_factory=list)
    """Position of each of this rank's rollouts in `all_rollouts`."""
    all_rollouts: list[Rollout] = field(default_factory=list)
    """Every rollout of the step, ordered by prompt (the same list on every rank)."""
    metrics: dict[str, float] = field(default_factory=dict)


def sampling_seed(run_seed: int, step: int, prompt_index: int) -> int:
    """The vLLM seed of one prompt's G samples: a hash of (run seed, step, dataset index)."""
    digest = hashlib.blake2b(f"{run_seed}:{step}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def pack_rollouts(rollouts: list[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of a list of rollouts (the RolloutBatch tensor fields)."""
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    b = len(rollouts)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.bool)
    logprobs = torch.zeros(b, width, dtype=torch.float32)
    for i, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.response_ids)
        tokens[i, :p + n] = torch.tensor(r.prompt_ids + r.response_ids, dtype=torch.long)
        mask[i, p:p + n] = True
        logprobs[i, p:p + n] = torch.tensor(r.logprobs, dtype=torch.float32)
    return dict(tokens=tokens, response_mask=mask, rollout_logprobs=logprobs,
                response_lens=torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.long),
                truncated=torch.tensor([r.truncated for r in rollouts], dtype=torch.bool))


def replica_slices(num_prompts: int, replicas: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) prompt ranges, one per replica, sizes differing by at most one."""
    base, extra = divmod(num_prompts, replicas)
    bounds, lo = [], 0
    for r in range(replicas):
        hi = lo + base + (r < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def data_parallel_rows(total: int, num_mini_batches: int, dp: int, dp_rank: int) -> list[int]:
    """Rows of the step's global rollout list that data-parallel rank dp_rank trains on."""
    if total % (num_mini_batches * dp):
        raise ValueError(f"{total} rollouts do not split into {num_mini_batches} mini-batches x "
                         f"{dp} data-parallel ranks")
    chunk = total // num_mini_batches
    part = chunk // dp
    return [k * chunk + dp_rank * part + j for k in range(num_mini_batches) for j in range(part)]


def generate_distributed(engine, prompts: Sequence[Sequence[int]], seeds: Sequence[int],
                         sampling: SamplingConfig, vllm_tp: int = 1) -> tuple[list[Rollout], int]:
    """Collective over all trainer ranks: every prompt's G rollouts, generated once, on every rank.

    Returns (all rollouts ordered by prompt, number of sequences generated over all replicas).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % vllm_tp:
        raise ValueError(f"trainer world size {world} is not divisible by vLLM tensor_parallel_size {vllm_tp}")
    lo, hi = replica_slices(len(prompts), world // vllm_tp)[rank // vllm_tp]
    local = engine.generate(prompts[lo:hi], sampling, seeds[lo:hi]) if hi > lo else []
    for r in local:
        r.prompt_index += lo
    # The ranks of one replica hold the same rollouts: only its first rank contributes them.
    mine = local if rank % vllm_tp == 0 else []
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    rollouts = [r for part in parts for r in part]
    return rollouts, len(rollouts)


@dataclass
class Generation:
    rollouts: list[Rollout]
    """Every rollout of the call, ordered by prompt (the same list on every rank)."""
    sync: SyncStats
    """The weight sync before generating (this rank's)."""
    seconds: float
    """Generation wall time on this rank."""
    peak_bytes: int | None
    """Device memory in use at the end of generation, vLLM still awake (GPU only; else None)."""


def generate_with_current_weights(model_chunks: list, engine, weight_sync, prompts: Sequence[Sequence[int]],
                                  seeds: Sequence[int | None], sampling: SamplingConfig, *, vllm_tp: int = 1,
                                  hf_config=None, after_sync: Callable[[], object] | None = None) -> Generation:
    """Collective over all trainer ranks: vLLM's weights wake (GPU, colocated; a no-op on CPU), the
    current Megatron weights are pushed into every replica, `after_sync` runs, the KV cache wakes,
    every replica generates its slice of the prompts, and vLLM sleeps again (level 2: the next
    sync rewrites the weights anyway)."""
    from megatron_lead.gpu_memory import PeakMeter

    memory = PeakMeter()
    engine.wake_up(["weights"])
    sync = sync_policy_weights(model_chunks, weight_sync, hf_config)
    if after_sync is not None:
        after_sync()
    engine.wake_up(["kv_cache"])
    start = time.perf_counter()
    rollouts, _ = generate_distributed(engine, prompts, seeds, sampling, vllm_tp)
    seconds = time.perf_counter() - start
    peak = memory.peak_bytes()  # vLLM's weights and KV cache are still mapped here
    engine.sleep()
    return Generation(rollouts=rollouts, sync=sync, seconds=seconds, peak_bytes=peak)


def _check_engines(engine) -> None:
    """Every rank hosts an engine: checked collectively, so a missing one fails on every rank."""
    from megatron_lead.policy.parallel import errors_on_any_rank

    errors = errors_on_any_rank(f"rank {dist.get_rank()}" if engine is None else None)
    if errors:
        raise ValueError(f"every trainer rank needs a rollout engine; missing on {', '.join(errors)}")


def rollout_step(model_chunks: list, engine, weight_sync, prompts: list[list[int]],
                 sampling: SamplingConfig, *, pad_id: int, seeds: Sequence[int] | None = None,
                 vllm_tp: int = 1, num_mini_batches: int = 1, hf_config=None,
                 after_sync: Callable[[], object] | None = None) -> RolloutBatch:
    """Collective over all trainer ranks: one RL step's rollouts of the step's global prompt list.

    prompts: the step's prompts (token ids), the same list on every rank. seeds: one sampling seed
    per prompt (default sampling.seed + i). after_sync: called once the weights are in vLLM and
    before its KV cache wakes (the trainer offloads its weights there).
    """
    from megatron.core import parallel_state

    from megatron_lead.gpu_memory import GB
    from megatron_lead.policy.parallel import reduce_scalars

    if sampling.temperature <= 0:
        raise ValueError(f"rollout_step needs temperature > 0 (old log-probs are of logits / "
                         f"temperature), got {sampling.temperature}")
    if not prompts:
        raise ValueError("rollout_step got no prompts")
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    total = len(prompts) * sampling.n
    rows = data_parallel_rows(total, num_mini_batches, dp, dp_rank)
    if seeds is None:
        seeds = [None if sampling.seed is None else sampling.seed + i for i in range(len(prompts))]
    _check_engines(engine)

    # 1. Current weights into every replica; each replica generates its slice of the prompts, and
    #    every rank receives every rollout.
    gen = generate_with_current_weights(model_chunks, engine, weight_sync, prompts, seeds, sampling,
                                        vllm_tp=vllm_tp, hf_config=hf_config, after_sync=after_sync)
    all_rollouts, generated, sync = gen.rollouts, len(gen.rollouts), gen.sync
    if generated != total:
        raise RuntimeError(f"the replicas returned {generated} rollouts, expected {total}")

    # 2. This DP rank's rollouts, right-padded (Megatron's RoPE takes every row from position 0).
    rollouts = [all_rollouts[i] for i in rows]
    packed = pack_rollouts(rollouts, pad_id)

    # 3. Metrics, the same on every rank: counts from the global list; times and memory of the
    #    slowest / fullest rank.
    sync_seconds, generate_seconds, peak_gb = reduce_scalars(
        [sync.seconds, gen.seconds, (gen.peak_bytes or 0) / GB], [dist.group.WORLD], dist.ReduceOp.MAX)
    sync.seconds = sync_seconds
    lengths = [len(r.response_ids) for r in all_rollouts]
    metrics = {
        **sync.metrics(),
        "rollout/generate_seconds": generate_seconds,
        "rollout/generated_sequences": float(generated),
        "rollout/generated_tokens": float(sum(lengths)),
        "rollout/truncated_frac": sum(r.truncated for r in all_rollouts) / len(all_rollouts),
        "rollout/response_len_mean": sum(lengths) / len(lengths),
    }
    if gen.peak_bytes is not None:
        metrics["memory/peak_generate_gb"] = peak_gb
    return RolloutBatch(rollouts=rollouts, rows=rows, all_rollouts=all_rollouts, metrics=metrics, **packed)
