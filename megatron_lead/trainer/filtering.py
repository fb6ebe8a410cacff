"""Which sampled rollouts train, and how truncation is shaped: group filtering with DAPO's refill
(rollout.filter_groups, rollout.refill_max_rounds) and DAPO's overlong shaping (loss.overlong_*,
loss.mask_truncated). Everything here is off by default: `training_set` then hands the step's
batch and LEAD's advantages through untouched.

Group filtering. A prompt group whose G rollouts all score the same (all right or all wrong)
has no correctness signal: GRPO gives it zero advantage, and DAPO drops it and samples more
prompts until the step is full. LEAD's groups carry a second signal, the efficiency reward
(length against the prompt's target), which varies inside an all-correct group as soon as the
lengths differ: that is the signal LEAD shortens solved prompts with. So a zero-variance group
is kept when its efficiency reward still varies (rollout.filter_keep_eff_varying, on by default;
with lead.method=grpo the efficiency reward is 0 and the rule is DAPO's).

Where and in which order (the design, docs/TRAINER.md "RL options"):
1. every generation round samples the sampler's next `data.prompts_per_step` prompts (refill
   rounds: more prompts, as DAPO); the keep decision is per group, from the group's own scores
   and LEAD's efficiency rewards, computed on the global rollout list that every rank holds (no
   collective: the same on every rank);
2. LEAD runs ONCE over everything sampled (all rounds), on the usual DP shards: its PSI
   controller must see the policy's real accuracy and lengths, not the survivors of a filter that
   removes all-correct prompts by construction; a kept rollout's advantage is exactly what LEAD
   gives it over that batch;
3. the kept groups, in sampling order, are cut to at most `prompts_per_step` and to a whole
   number of PPO mini-batches (`ppo.mini_batch_prompts` groups each; the rest is counted as
   unused), and these rows are dealt to the DP ranks exactly as rollout.step.data_parallel_rows
   deals a full step: mini-batch k is the same set of rollouts at every DP size, and every rank
   runs the same number of updates; LEAD's advantages reach the rank that trains a row through one
   all-reduce over the DP group (each row's value comes from the one rank that computed it).
"""

from __future__ import annotations

import torch

from megatron_lead.rollout.step import RolloutBatch, data_parallel_rows, pack_rollouts

# Rewards closer than this count as equal (the efficiency reward moves by >= 1 token / target).
_EQUAL = 1e-9


def group_signals(lengths, scores, G: int, lead_cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt group of G consecutive rollouts: (correctness varies, efficiency reward varies,
    all correct), [P] bool each. The efficiency rewards are LEAD's own (`eff_reward` of a
    throwaway AdvantageComputer over the global list, one process: the run's PSI state is not
    touched, and every method's reward is the one its advantages use)."""
    from megatron_lead.lead import AdvantageComputer, RolloutShard

    n = len(scores)
    P = n // G
    shard = RolloutShard(prompt_index=torch.arange(n) // G, length=lengths, score=scores, num_prompts=P)
    correct = shard.score > lead_cfg.correct_threshold
    eff = AdvantageComputer(lead_cfg)(shard).eff_reward

    def varies(x: torch.Tensor) -> torch.Tensor:
        x = x.view(P, G)
        return (x.max(1).values - x.min(1).values) > _EQUAL

    return varies(shard.score), varies(eff), correct.view(P, G).all(1)


def keep_groups(lengths, scores, G: int, lead_cfg, keep_eff_varying: bool) -> torch.Tensor:
    """[P] bool: the group has a correctness signal, or (keep_eff_varying) an efficiency one."""
    corr, eff, _ = group_signals(lengths, scores, G, lead_cfg)
    return corr | eff if keep_eff_varying else corr


def _lengths(rollouts) -> list[int]:
    return [len(r.response_ids) for r in rollouts]


def wants_refill(cfg, rounds: list[tuple]) -> bool:
    """Sample one more round? Group filtering is on, fewer than prompts_per_step groups kept so
    far, and fewer than 1 + rollout.refill_max_rounds rounds done. rounds: (batch, scores, reasons)."""
    if not cfg.rollout.filter_groups or len(rounds) > cfg.rollout.refill_max_rounds:
        return False
    kept = sum(int(keep_groups(_lengths(b.all_rollouts), s, cfg.rollout.n, cfg.lead,
                               cfg.rollout.filter_keep_eff_varying).sum()) for b, s, _ in rounds)
    return kept < cfg.data.prompts_per_step


def merge_rounds(rounds: list[tuple], G: int, pad_id: int) -> tuple[RolloutBatch, list[float], list[str]]:
    """One batch of every round's rollouts, as if the step had sampled all their prompts at once:
    round r's prompts follow round r-1's (prompt_index shifted), each rank keeps its rows of every
    round (LEAD's shard). One round is returned as it is."""
    if len(rounds) == 1:
        return rounds[0]
    everything, rows, scores, reasons, offset = [], [], [], [], 0
    for batch, s, why in rounds:
        for r in batch.all_rollouts:  # the rank's rollouts are the same objects
            r.prompt_index += offset // G
        rows += [offset + i for i in batch.rows]
        everything += batch.all_rollouts
        scores += list(s)
        reasons += list(why)
        offset += len(batch.all_rollouts)
    mine = [everything[i] for i in rows]
    metrics = dict(rounds[-1][0].metrics)
    for key in ("rollout/generated_sequences", "rollout/generated_tokens", "rollout/generate_seconds",
                "rollout/sync_seconds", "rollout/sync_bytes"):
        if key in metrics:
            metrics[key] = sum(b.metrics.get(key, 0.0) for b, _, _ in rounds)
    lengths = _lengths(everything)
    metrics["rollout/truncated_frac"] = sum(r.truncated for r in everything) / len(everything)
    metrics["rollout/response_len_mean"] = sum(lengths) / len(lengths)
    batch = RolloutBatch(rollouts=mine, rows=rows, all_rollouts=everything, metrics=metrics,
                         **pack_rollouts(mine, pad_id))
    return batch, scores, reasons


def select_groups(keep: torch.Tensor, limit: int, mini_batch_prompts: int) -> list[int]:
    """The kept groups that train: the first ones in sampling order, at most `limit`, cut to a
    whole number of mini-batches of `mini_batch_prompts` groups."""
    kept = [g for g, k in enumerate(keep.tolist()) if k][:limit]
    return kept[:len(kept) // mini_batch_prompts * mini_batch_prompts]


def global_advantages(advantages: torch.Tensor, rows: list[int], total: int, dp_group) -> torch.Tensor:
    """[total] float64: every rollout's advantage on every rank. Each DP rank holds LEAD's values
    for its own rows (disjoint over the DP group), so one sum over the group assembles them exactly."""
    from megatron_lead.lead.reduce import GroupReducer

    out = torch.zeros(total, dtype=torch.float64)
    out[torch.tensor(rows, dtype=torch.long)] = advantages.detach().to(torch.float64).cpu()
    return GroupReducer(dp_group).sum(out)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), scaled by `penalty`:
    0 up to max_len - buffer, then linear down to -penalty at max_len (and below past it)."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float64)
    start = max_len - buffer
    return (-(lengths.to(torch.float64) - start).clamp(0.0, float(buffer)) / buffer) * penalty


def training_set(cfg, batch: RolloutBatch, scores: list[float], advantages: torch.Tensor, num_updates: int,
                 pad_id: int, dp_group=None, dp: int = 1, dp_rank: int = 0):
    """(this rank's training batch, its advantages, number of updates, loss_rows or None, metrics).

    Without any option: the batch, LEAD's advantages and num_updates as they are. Filtering picks
    the training groups (module docstring); the overlong punishment is added to the advantages of
    the rows that train, and loss.mask_truncated marks truncated rows out of the loss (loss_rows).
    Metrics (`filter/*`, `overlong/*`) are counts over the global lists: the same on every rank.
    """
    G, metrics = cfg.rollout.n, {}
    train_rows = None  # global rows that train; None: the step's rows as dealt by rollout_step
    if cfg.rollout.filter_groups:
        everything = batch.all_rollouts
        corr, eff, all_correct = group_signals(_lengths(everything), scores, G, cfg.lead)
        keep = corr | eff if cfg.rollout.filter_keep_eff_varying else corr
        used = select_groups(keep, cfg.data.prompts_per_step, cfg.ppo.mini_batch_prompts)
        num_updates = len(used) // cfg.ppo.mini_batch_prompts
        train_rows = [g * G + j for g in used for j in range(G)]
        full = global_advantages(advantages, batch.rows, len(everything), dp_group)
        mine = [train_rows[i] for i in data_parallel_rows(len(train_rows), num_updates, dp, dp_rank)] \
            if train_rows else []
        rollouts = [everything[i] for i in mine]
        advantages = full[torch.tensor(mine, dtype=torch.long)]
        batch = RolloutBatch(rollouts=rollouts, rows=mine, all_rollouts=everything, metrics=batch.metrics,
                             **(pack_rollouts(rollouts, pad_id) if rollouts else _empty_tensors()))
        dropped = ~keep
        metrics.update({"filter/groups": float(keep.numel()), "filter/kept": float(keep.sum()),
                        "filter/dropped_all_correct": float((dropped & all_correct).sum()),
                        "filter/dropped_all_wrong": float((dropped & ~all_correct).sum()),
                        "filter/kept_for_efficiency": float((keep & ~corr).sum()),
                        "filter/unused": float(keep.sum()) - len(used), "filter/trained": float(len(used)),
                        "filter/rounds": float(keep.numel() // cfg.data.prompts_per_step)})
    loss, trained = cfg.loss, train_rows if train_rows is not None else range(len(batch.all_rollouts))
    if loss.overlong_buffer > 0:
        every = torch.tensor(_lengths(batch.all_rollouts), dtype=torch.float64)
        pen = overlong_penalty(every, cfg.rollout.max_response_len, loss.overlong_buffer, loss.overlong_penalty)
        advantages = advantages.to(torch.float64) + pen[torch.tensor(batch.rows, dtype=torch.long)]
        metrics.update({"overlong/penalty_mean": float(pen.mean()),
                        "overlong/penalized_frac": float((pen < 0).double().mean())})
    loss_rows = None
    if loss.mask_truncated:
        loss_rows = ~batch.truncated
        metrics["overlong/masked_frac"] = (sum(batch.all_rollouts[i].truncated for i in trained)
                                           / max(len(trained), 1))
    return batch, advantages, num_updates, loss_rows, metrics


def _empty_tensors() -> dict[str, torch.Tensor]:
    """RolloutBatch tensors of no rollout (a rank with nothing to train this step)."""
    return dict(tokens=torch.zeros(0, 1, dtype=torch.long), response_mask=torch.zeros(0, 1, dtype=torch.bool),
                rollout_logprobs=torch.zeros(0, 1), response_lens=torch.zeros(0, dtype=torch.long),
                truncated=torch.zeros(0, dtype=torch.bool))
