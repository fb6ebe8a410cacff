"""The trainer's rollout step, once per RL step: sync weights -> generate -> share -> pack -> old log-probs.

    rollout_step:  push the current Megatron weights into every vLLM replica (sync_policy_weights)
                   -> each replica generates G rollouts for its own slice of the step's prompts
                   -> the rollouts are shared, and each data-parallel rank keeps the ones it trains
                   -> right-padded [B, s] tokens + response mask (RolloutBatch)
                   -> Megatron's log-probs of the same tokens at the sampling temperature
                      (PPO's old_logprobs) and rollout/* metrics, the same on every rank

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
- old_logprobs are on the last pipeline stage only (None on the others), as train_step reads
  them (MicroBatch.old_logprobs); the metrics are reduced so every rank holds the same values.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_lead.rollout.engine import Rollout, SamplingConfig
from megatron_lead.rollout.metrics import logprob_diff
from megatron_lead.rollout.sync import sync_policy_weights


@dataclass
class RolloutBatch:
    tokens: torch.Tensor
    """[B, s] int64 prompt + response ids, right-padded with pad_id; row i is rollouts[i]."""
    response_mask: torch.Tensor
    """[B, s] bool, True on response tokens."""
    rollout_logprobs: torch.Tensor
    """[B, s] float32 vLLM's sampling log-probs on response tokens, 0 elsewhere."""
    old_logprobs: torch.Tensor | None
    """[B, s] float32 Megatron's log-probs (of logits / temperature), aligned with tokens; the
    last pipeline stage only (None on the others)."""
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
    """Right-padded tensors of a list of rollouts (the RolloutBatch fields but old_logprobs)."""
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


def _check_engines(engine) -> None:
    """Every rank hosts an engine: checked collectively, so a missing one fails on every rank."""
    from megatron_lead.policy.parallel import errors_on_any_rank

    errors = errors_on_any_rank(f"rank {dist.get_rank()}" if engine is None else None)
    if errors:
        raise ValueError(f"every trainer rank needs a rollout engine; missing on {', '.join(errors)}")


def rollout_step(model_chunks: list, engine, weight_sync, prompts: list[list[int]],
                 sampling: SamplingConfig, *, micro_batch_size: int, pad_id: int,
                 seeds: Sequence[int] | None = None, vllm_tp: int = 1, num_mini_batches: int = 1,
                 hf_config=None, pack: bool = False, max_tokens: int = 0) -> RolloutBatch:
    """Collective over all trainer ranks: one RL step's rollouts of the step's global prompt list.

    prompts: the step's prompts (token ids), the same list on every rank. seeds: one sampling seed
    per prompt (default sampling.seed + i). The rows this data-parallel rank keeps
    (len(prompts) * G / dp of them) must divide by micro_batch_size. pack / max_tokens: how the old
    log-prob pass cuts micro-batches (train_step.make_micro_batches).
    """
    from megatron.core import parallel_state

    from megatron_lead.policy.parallel import reduce_scalars
    from megatron_lead.policy.train_step import forward_logprobs, make_micro_batches

    if sampling.temperature <= 0:
        raise ValueError(f"rollout_step needs temperature > 0 (old log-probs are of logits / "
                         f"temperature), got {sampling.temperature}")
    if not prompts:
        raise ValueError("rollout_step got no prompts")
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    total = len(prompts) * sampling.n
    rows = data_parallel_rows(total, num_mini_batches, dp, dp_rank)
    if len(rows) % micro_batch_size:
        raise ValueError(f"{len(prompts)} prompts x n={sampling.n} rollouts over {dp} data-parallel "
                         f"rank(s) are not divisible by micro_batch_size {micro_batch_size}")
    if seeds is None:
        seeds = [None if sampling.seed is None else sampling.seed + i for i in range(len(prompts))]
    _check_engines(engine)

    # 1. Current weights into every replica (collective over all ranks).
    engine.wake_up()  # GPU colocate: weights and KV cache back from sleep; no-op on CPU
    sync = sync_policy_weights(model_chunks, weight_sync, hf_config)

    # 2. Each replica: its slice of the prompts; then every rank holds every rollout.
    start = time.perf_counter()
    all_rollouts, generated = generate_distributed(engine, prompts, seeds, sampling, vllm_tp)
    generate_seconds = time.perf_counter() - start
    engine.sleep()  # GPU colocate: free the memory for the Megatron passes; no-op on CPU
    if generated != total:
        raise RuntimeError(f"the replicas returned {generated} rollouts, expected {total}")

    # 3. This DP rank's rollouts, right-padded (Megatron's RoPE takes every row from position 0).
    rollouts = [all_rollouts[i] for i in rows]
    packed = pack_rollouts(rollouts, pad_id)

    # 4. Megatron's log-probs of the sampled tokens: PPO's old_logprobs (last stage only).
    # (advantages are not known yet and not read by a forward-only pass: zeros fill the field)
    micro_batches = make_micro_batches(micro_batch_size, pack, max_tokens, tokens=packed["tokens"],
                                       response_mask=packed["response_mask"],
                                       advantages=torch.zeros(len(rollouts)))
    per_micro_batch = forward_logprobs(model_chunks, micro_batches, sampling.temperature)
    old_logprobs = torch.cat(per_micro_batch) if per_micro_batch else None

    # 5. Metrics, the same on every rank: log-prob gap over PP (only the last stage has it, the
    # others add 0) then token-weighted over DP; counts from the global list; times of the
    # slowest rank.
    mask = packed["response_mask"]
    num_tokens = float(mask.sum())
    diff_sum = 0.0
    if old_logprobs is not None:
        diff_sum = logprob_diff(packed["rollout_logprobs"], old_logprobs, mask) * num_tokens
    (diff_sum,) = reduce_scalars([diff_sum], [parallel_state.get_pipeline_model_parallel_group()])
    diff_sum, tokens = reduce_scalars([diff_sum, num_tokens], [parallel_state.get_data_parallel_group()])
    sync_seconds, generate_seconds = reduce_scalars([sync.seconds, generate_seconds], [dist.group.WORLD],
                                                    dist.ReduceOp.MAX)
    sync.seconds = sync_seconds
    lengths = [len(r.response_ids) for r in all_rollouts]
    metrics = {
        **sync.metrics(),
        "rollout/generate_seconds": generate_seconds,
        "rollout/generated_sequences": float(generated),
        "rollout/generated_tokens": float(sum(lengths)),
        "rollout/logprob_diff": diff_sum / max(tokens, 1.0),
        "rollout/truncated_frac": sum(r.truncated for r in all_rollouts) / len(all_rollouts),
        "rollout/response_len_mean": sum(lengths) / len(lengths),
    }
    return RolloutBatch(old_logprobs=old_logprobs, rollouts=rollouts, rows=rows,
                        all_rollouts=all_rollouts, metrics=metrics, **packed)
