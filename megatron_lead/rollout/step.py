"""The trainer's rollout step, once per RL step: sync weights -> generate -> pack -> old log-probs.

    rollout_step:  push the current Megatron weights into vLLM (sync.sync_policy_weights)
                   -> G rollouts per prompt of this data-parallel rank (engine.generate)
                   -> right-padded [B, s] tokens + response mask (RolloutBatch)
                   -> Megatron's log-probs of the same tokens at the sampling temperature
                      (PPO's old_logprobs) and rollout/* metrics, the same on every rank

Where things live:
- Prompts are this DP rank's share. Inside one model-parallel (TP x PP) group every rank must
  feed Megatron the same tokens (unseeded engines would sample differently), so the group's
  first rank's rollouts are broadcast to the group. That rank needs an engine; the others may
  pass engine=None (on CPU every rank has one and generates too, but its rollouts are dropped).
  A single engine serving several DP ranks (GPU colocate with DP > 1) is not handled here.
- old_logprobs are on the last pipeline stage only (None on the others), as train_step reads
  them (MicroBatch.old_logprobs); the metrics are reduced so every rank holds the same values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

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
    metrics: dict[str, float] = field(default_factory=dict)


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


def _generate_in_model_parallel_group(engine, prompts, sampling) -> list[Rollout]:
    """The model-parallel group's first rank's rollouts, on every rank of the group."""
    from megatron.core import parallel_state

    group = parallel_state.get_model_parallel_group()
    src = dist.get_process_group_ranks(group)[0]
    rollouts = [] if engine is None else engine.generate(prompts, sampling)
    if dist.get_world_size(group) > 1:
        box = [rollouts]
        dist.broadcast_object_list(box, src=src, group=group)
        rollouts = box[0]
    return rollouts


def rollout_step(model_chunks: list, engine, weight_sync, prompts: list[list[int]],
                 sampling: SamplingConfig, *, micro_batch_size: int, pad_id: int,
                 hf_config: Any = None) -> RolloutBatch:
    """Collective over all trainer ranks: one RL step's rollouts of this DP rank's prompts.

    engine / weight_sync: this rank's RolloutEngine and WeightSync (None / a draining sync on a
    rank without an engine). B = len(prompts) * sampling.n must divide by micro_batch_size.
    """
    from megatron.core import parallel_state

    from megatron_lead.policy.parallel import reduce_scalars
    from megatron_lead.policy.train_step import forward_logprobs, split_micro_batches

    if sampling.temperature <= 0:
        raise ValueError(f"rollout_step needs temperature > 0 (old log-probs are of logits / "
                         f"temperature), got {sampling.temperature}")
    if not prompts:
        raise ValueError("rollout_step got no prompts")
    if (len(prompts) * sampling.n) % micro_batch_size:
        raise ValueError(f"{len(prompts)} prompts x n={sampling.n} rollouts are not divisible by "
                         f"micro_batch_size {micro_batch_size}")

    # 0. The group's generating rank has an engine: checked on every rank of the group, so a
    # missing one fails everywhere at once instead of leaving the others in a collective.
    group = parallel_state.get_model_parallel_group()
    src = dist.get_process_group_ranks(group)[0]
    (missing,) = reduce_scalars([float(dist.get_rank() == src and engine is None)], [group])
    if missing:
        raise ValueError(f"rank {src} (first of its model-parallel group) needs a rollout engine")

    # 1. Current weights into vLLM (collective: ranks without an engine drain the stream).
    if engine is not None:
        engine.wake_up()  # GPU colocate: weights and KV cache back from sleep; no-op on CPU
    sync = sync_policy_weights(model_chunks, weight_sync, hf_config)

    # 2. G rollouts per prompt; the same ones on every rank of the model-parallel group.
    start = time.perf_counter()
    rollouts = _generate_in_model_parallel_group(engine, prompts, sampling)
    generate_seconds = time.perf_counter() - start
    if engine is not None:
        engine.sleep()  # GPU colocate: free the memory for the Megatron passes; no-op on CPU

    # 3. Pack, right-padded (Megatron's RoPE takes every row from position 0).
    packed = pack_rollouts(rollouts, pad_id)

    # 4. Megatron's log-probs of the sampled tokens: PPO's old_logprobs (last stage only).
    # (advantages are not known yet and not read by a forward-only pass: zeros fill the field)
    micro_batches = split_micro_batches(micro_batch_size, tokens=packed["tokens"],
                                        response_mask=packed["response_mask"],
                                        advantages=torch.zeros(len(rollouts)))
    per_micro_batch = forward_logprobs(model_chunks, micro_batches, sampling.temperature)
    old_logprobs = torch.cat(per_micro_batch) if per_micro_batch else None

    # 5. Metrics, the same on every rank: log-prob gap over PP (only the last stage has it, the
    # others add 0) then token-weighted over DP; counts over DP; times of the slowest rank.
    mask = packed["response_mask"]
    num_tokens = float(mask.sum())
    diff_sum = 0.0
    if old_logprobs is not None:
        diff_sum = logprob_diff(packed["rollout_logprobs"], old_logprobs, mask) * num_tokens
    (diff_sum,) = reduce_scalars([diff_sum], [parallel_state.get_pipeline_model_parallel_group()])
    diff_sum, tokens, truncated, count = reduce_scalars(
        [diff_sum, num_tokens, float(packed["truncated"].sum()), float(len(rollouts))],
        [parallel_state.get_data_parallel_group()])
    sync_seconds, generate_seconds = reduce_scalars([sync.seconds, generate_seconds], [dist.group.WORLD],
                                                    dist.ReduceOp.MAX)
    sync.seconds = sync_seconds
    metrics = {
        **sync.metrics(),
        "rollout/generate_seconds": generate_seconds,
        "rollout/logprob_diff": diff_sum / max(tokens, 1.0),
        "rollout/truncated_frac": truncated / count,
        "rollout/response_len_mean": tokens / count,
    }
    return RolloutBatch(old_logprobs=old_logprobs, rollouts=rollouts, metrics=metrics, **packed)
