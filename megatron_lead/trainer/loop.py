"""The LEAD trainer: set up once, then one RL step after another.

    for each step:
        prompts       <- the sampler's global batch (the same on every rank)
        rollouts      <- weight sync, G samples per prompt from the vLLM replicas (the trainer's
                         gradients and optimizer state wait in host memory meanwhile, on GPU)
        scores        <- the grader (each rank grades a share of the responses)
        (refill)      <- with rollout.filter_groups: more rounds of prompts while too few groups
                         carry a signal (trainer.filtering)
        advantages    <- LEAD (or a baseline) over the data-parallel group; then the groups and
                         rows that train (filtering, overlong shaping: trainer.filtering)
        old log-probs <- Megatron's, on the micro-batches the update runs (ratio exactly 1)
        reference     <- the frozen reference's log-probs (KL term)
        update        <- PPO mini-batches through Megatron
        metrics, then checkpoint / HF export / validation when due

Every phase lives in its own module (rollout.step, trainer.grading, trainer.ppo,
trainer.checkpoint, trainer.metrics, trainer.validation, policy.offload); this file only
orchestrates them.
`build_run` creates the long-lived objects; `train` runs the loop and returns the summary.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_lead.trainer.config import TrainConfig, dump_yaml

CHECKPOINTS_DIR = "checkpoints"


@dataclass
class Run:
    """The long-lived objects of a run (built once by build_run)."""

    cfg: TrainConfig
    model: list
    optimizer: object
    scheduler: object
    reference: object
    engine: object
    weight_sync: object
    grader: object
    encoder: object
    records: list
    prompt_ids: list
    sampler: object
    lead: object
    val: dict = field(default_factory=dict)
    data_stats: dict = field(default_factory=dict)
    start_step: int = 0
    skips: object = None
    offload: object = None
    """policy.offload.TrainStateOffload when rollout.offload_train_state is on, else None."""


def _engine_config(cfg: TrainConfig):
    from megatron_lead.rollout.engine import EngineConfig

    kv = cfg.rollout.kv_cache_memory_bytes
    if kv is None and not torch.cuda.is_available():
        kv = 256 << 20  # vLLM-CPU sizes memory per NUMA node; a fraction of it is rarely right
    return EngineConfig(model_path=cfg.model.path, tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                        placement="colocate", dtype=cfg.rollout.dtype,
                        max_model_len=cfg.data.max_prompt_len + cfg.rollout.max_response_len,
                        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                        kv_cache_memory_bytes=kv, enforce_eager=cfg.rollout.enforce_eager, seed=cfg.seed)


def _load_data(cfg: TrainConfig, encoder, path: str, limit: int = 0):
    from megatron_lead.data import DataStats, load_prompts, spread

    stats = DataStats()
    records, ids = encoder.encode(load_prompts(path, stats), stats)
    if limit:
        keep = spread(len(records), limit)
        records, ids = [records[i] for i in keep], [ids[i] for i in keep]
    if not records:
        raise ValueError(f"{path}: no usable prompt left (all dropped; see the counts: {stats.as_dict()})")
    return records, ids, stats


@contextmanager
def _offloaded(offload, weights: bool = False):
    """The trainer's gradients and optimizer state (and weights) in host memory within the block."""
    if offload is None:
        yield
        return
    offload.offload_optimizer_and_grads()
    if weights:
        offload.offload_weights()
    try:
        yield
    finally:
        offload.reload()


def _check_memory_plan(cfg: TrainConfig, world: int) -> None:
    """Print the memory planner's estimate for this run (rank 0); on a GPU too small for a phase's
    planned peak, stop every rank with that line before anything is allocated (plan/config.py)."""
    from megatron_lead.plan import estimate_for_train_config

    gpu_gb = None
    if torch.cuda.is_available():
        gpu_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    line, fits = estimate_for_train_config(cfg, world, gpu_gb)
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, flush=True)
    if not fits:
        raise ValueError(line)


def build_run(cfg: TrainConfig, resume: bool = False) -> Run:
    """Collective: process groups, data, policy, optimizer, reference, vLLM, grader, LEAD; resume."""
    from megatron.core import parallel_state

    from megatron_lead.data import PromptEncoder, PromptSampler
    from megatron_lead.lead import AdvantageComputer
    from megatron_lead.policy.convert.checkpoint import load_hf_weights
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.offload import TrainStateOffload
    from megatron_lead.policy.optim import build_optimizer, wrap_ddp
    from megatron_lead.policy.parallel import init_parallel
    from megatron_lead.policy.reference import ReferenceWeights
    from megatron_lead.rewards import Grader
    from megatron_lead.rollout.engine import RolloutEngine
    from megatron_lead.rollout.sync import make_weight_sync
    from megatron_lead.trainer.checkpoint import latest_checkpoint, load_checkpoint
    from megatron_lead.trainer.skips import SkipGuard

    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    cfg.validate(world_size=world)  # before anything heavy
    _check_memory_plan(cfg, world)
    init_parallel(tp, pp, seed=cfg.seed)
    if dist.get_rank() == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(cfg))

    encoder = PromptEncoder(cfg.model.tokenizer or cfg.model.path, instruction=cfg.data.instruction,
                            use_chat_template=cfg.data.use_chat_template, max_prompt_len=cfg.data.max_prompt_len)
    records, prompt_ids, stats = _load_data(cfg, encoder, cfg.data.train_path)
    if len(records) < cfg.data.prompts_per_step:
        raise ValueError(f"data.train_path={cfg.data.train_path}: {len(records)} usable prompts, fewer than "
                         f"data.prompts_per_step={cfg.data.prompts_per_step}")
    val = {}
    if cfg.data.val_path and cfg.validation.every >= 0:
        v_records, v_ids, _ = _load_data(cfg, encoder, cfg.data.val_path, cfg.validation.max_prompts)
        val = dict(prompts=v_ids, answers=[r.answer for r in v_records], levels=[r.level for r in v_records])

    dtype = torch.bfloat16 if cfg.optim.use_bf16 else torch.float32
    model = build_model(cfg.model.path, dtype=dtype, attention=cfg.model.attention, init_weights=False,
                        compile_layers=cfg.model.compile_layers)
    load_hf_weights(model, cfg.model.path)
    reference = ReferenceWeights(model) if cfg.loss.uses_reference else None  # the base weights
    model = wrap_ddp(model, cfg.optim)
    optimizer, scheduler = build_optimizer(model, cfg.optim)
    offload = TrainStateOffload(model, optimizer) if cfg.rollout.offloads else None

    # vLLM sizes its KV cache from the memory free at its start: the trainer's state waits on
    # the host meanwhile (on GPU; vLLM checks that gpu_memory_utilization of the GPU is free).
    with _offloaded(offload):
        engine = RolloutEngine(_engine_config(cfg))
        engine.sleep()  # GPU: the first step wakes it like every other (no-op on CPU)
    run = Run(cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler, reference=reference,
              engine=engine, weight_sync=make_weight_sync(engine), offload=offload,
              grader=Grader(num_workers=cfg.grading.workers, timeout=cfg.grading.timeout),
              encoder=encoder, records=records, prompt_ids=prompt_ids,
              sampler=PromptSampler(len(records), cfg.data.prompts_per_step, seed=cfg.seed,
                                    groups=[r.level for r in records] if cfg.data.stratify_levels else None),
              lead=AdvantageComputer(cfg.lead, group=parallel_state.get_data_parallel_group()),
              val=val, data_stats=stats.as_dict(), skips=SkipGuard(cfg.ppo.max_consecutive_skipped_steps))
    if resume:
        path = latest_checkpoint(os.path.join(cfg.run_dir, CHECKPOINTS_DIR))
        if path is not None:
            state = load_checkpoint(path, model, optimizer, scheduler)
            run.lead.load_state_dict(state["lead"])
            run.sampler.load_state_dict(state["sampler"])
            run.skips.load_state_dict(state.get("skips", {}))
            run.start_step = int(state["step"])
    return run


def _rollout_metrics(batch, scores, reasons, result, dp_group) -> dict[str, float]:
    from megatron_lead.policy.parallel import reduce_scalars
    from megatron_lead.trainer.grading import reason_counts
    from megatron_lead.trainer.metrics import length_stats

    everything = batch.all_rollouts
    lengths = [len(r.response_ids) for r in everything]
    out = {"reward/correct_mean": sum(scores) / len(scores), **reason_counts(reasons),
           **length_stats("response/length", lengths),
           "response/truncated_frac": sum(r.truncated for r in everything) / len(everything)}
    for label, truncated in (("stopped", False), ("truncated", True)):  # by finish reason
        out.update(length_stats(f"response/length_{label}",
                                [n for n, r in zip(lengths, everything) if r.truncated == truncated]))
    correct = [n for n, s in zip(lengths, scores) if s > 0.5]
    out.update(length_stats("response/length_correct", correct))
    adv, eff = result.advantages, result.eff_reward
    n, s1, s2, e1 = reduce_scalars([float(adv.numel()), float(adv.sum()), float((adv * adv).sum()),
                                    float(eff.sum())], [dp_group])
    (amax,) = reduce_scalars([float(adv.abs().max()) if adv.numel() else 0.0], [dp_group], dist.ReduceOp.MAX)
    out.update({"adv/mean": s1 / n, "adv/std": max(s2 / n - (s1 / n) ** 2, 0.0) ** 0.5, "adv/abs_max": amax,
                "reward/eff_mean": e1 / n,
                "lead/target_std": float(result.targets.std(unbiased=False)) if result.targets.numel() else 0.0})
    out.update(result.metrics)
    return out


def _sample_round(run: Run, step: int, r: int, num_updates: int, timer) -> tuple:
    """One generation round: the sampler's next prompts -> rollouts -> scores. Round r > 0 (a
    refill) samples with seeds of its own, so a prompt drawn again in a step gets new samples."""
    from megatron_lead.rollout.engine import SamplingConfig
    from megatron_lead.rollout.step import rollout_step, sampling_seed
    from megatron_lead.trainer.grading import grade_rollouts

    cfg = run.cfg
    with timer("data"):
        indices = run.sampler.next_batch()
        prompts = [run.prompt_ids[i] for i in indices]
        answers = [run.records[i].answer for i in indices]
    with timer("rollout"), _offloaded(run.offload):
        sampling = SamplingConfig(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  max_response_len=cfg.rollout.max_response_len)
        after_sync = run.offload.offload_weights if run.offload and cfg.rollout.offload_weights else None
        batch = rollout_step(run.model, run.engine, run.weight_sync, prompts, sampling, pad_id=run.encoder.pad_token_id,
                             seeds=[sampling_seed(cfg.seed, step, i + r * len(run.records)) for i in indices],
                             vllm_tp=cfg.rollout.tensor_parallel_size, num_mini_batches=num_updates,
                             after_sync=after_sync)
    with timer("grade"):
        scores, reasons = grade_rollouts(run.grader, run.encoder.decode, batch.all_rollouts, answers)
    return batch, scores, reasons


def train_step(run: Run, step: int) -> dict[str, float]:
    """One RL step; returns its metrics (the same on every rank)."""
    from megatron.core import parallel_state as ps

    from megatron_lead.gpu_memory import GB, PeakMeter
    from megatron_lead.policy.parallel import reduce_scalars
    from megatron_lead.trainer import filtering
    from megatron_lead.trainer.metrics import PhaseTimer
    from megatron_lead.trainer.ppo import (
        compute_advantages, mini_batches, old_logprob_pass, ppo_update, reference_pass, rollout_correction_pass)

    cfg, timer, pad = run.cfg, PhaseTimer(), run.encoder.pad_token_id
    num_updates = cfg.data.prompts_per_step // cfg.ppo.mini_batch_prompts
    rounds = [_sample_round(run, step, 0, num_updates, timer)]
    while filtering.wants_refill(cfg, rounds):
        rounds.append(_sample_round(run, step, len(rounds), num_updates, timer))
    batch, scores, reasons = filtering.merge_rounds(rounds, cfg.rollout.n, pad)
    with timer("advantages"):
        result = compute_advantages(run.lead, batch, scores, len(scores) // cfg.rollout.n)
        train_batch, advantages, num_updates, loss_rows, shaping = filtering.training_set(
            cfg, batch, scores, result.advantages, num_updates, pad, ps.get_data_parallel_group(),
            ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())
    memory = PeakMeter()  # GPU only: the Megatron passes, vLLM asleep
    with timer("old_logprobs"):
        batches = mini_batches(train_batch, advantages, num_updates, cfg.ppo.micro_batch_size,
                               pack=cfg.ppo.pack_sequences, max_tokens=cfg.ppo.max_tokens_per_micro_batch,
                               loss_rows=loss_rows)
        logprob_metrics = old_logprob_pass(run.model, batches, cfg.loss.temperature)
        logprob_metrics.update(rollout_correction_pass(batches, cfg.loss))
    with timer("reference"):
        reference_pass(run.model, run.reference, batches, cfg.loss.temperature)
    with timer("train"):
        train = ppo_update(run.model, run.optimizer, run.scheduler, batches, cfg.loss, cfg.ppo.epochs)
    metrics = {**batch.metrics, **logprob_metrics, **shaping,
               **_rollout_metrics(batch, scores, reasons, result, ps.get_data_parallel_group()), **train}
    if memory.active:
        peak, reserved = reduce_scalars([memory.peak_bytes() / GB, memory.reserved_bytes() / GB],
                                        [dist.group.WORLD], dist.ReduceOp.MAX)
        metrics.update({"memory/peak_train_gb": peak, "memory/reserved_gb": reserved})
    metrics.update(timer.metrics())
    metrics["perf/generated_tokens_per_second"] = metrics["rollout/generated_tokens"] / max(
        metrics["time/rollout_seconds"], 1e-9)
    metrics["perf/train_tokens_per_second"] = train["train/tokens"] / max(metrics["time/train_seconds"], 1e-9)
    metrics["lead/compute_fraction"] = metrics["time/advantages_seconds"] / max(metrics["time/step_seconds"], 1e-9)
    return metrics


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _validate(run: Run) -> dict:
    from megatron_lead.trainer.validation import validate

    if not run.val:
        return {}
    with _offloaded(run.offload):
        return validate(run.model, run.engine, run.weight_sync, run.grader, run.encoder.decode,
                        run.val["prompts"], run.val["answers"], run.val["levels"],
                        run.cfg.rollout.max_response_len, run.cfg.rollout.tensor_parallel_size)


def train(cfg: TrainConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Collective: the whole run (or up to max_steps steps this call, for tests); returns the summary."""
    from megatron_lead.policy.convert.gather import save_hf_checkpoint
    from megatron_lead.trainer.checkpoint import save_checkpoint
    from megatron_lead.trainer.metrics import MetricsLogger
    from megatron_lead.trainer.validation import flatten

    started = time.perf_counter()
    run = build_run(cfg, resume=resume)
    rank0 = dist.get_rank() == 0
    logger = MetricsLogger(cfg.run_dir, cfg.ppo.steps, run.start_step, enabled=rank0,
                           tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                           label="LEAD" if cfg.lead.method == "lead" else cfg.lead.method)
    summary = {"data": run.data_stats, "start_step": run.start_step}
    try:
        if run.start_step == 0 and cfg.validation.every > 0:
            summary["before"] = _validate(run)  # logged with step 0's metrics
        last = cfg.ppo.steps
        stop = last if max_steps is None else min(last, run.start_step + max_steps)
        metrics: dict = {}
        for step in range(run.start_step, stop):
            metrics = train_step(run, step)
            if step == 0:
                metrics.update(flatten(summary.get("before", {}), "val_before"))
            done = step + 1
            if done < last and _due(done, cfg.validation.every, last):
                metrics.update(flatten(_validate(run), "val"))
            logger.log(step, metrics)
            run.skips.update(step, metrics)  # too many non-finite steps in a row: stop
            if _due(done, cfg.checkpoint.every, last) or done == stop:
                save_checkpoint(os.path.join(cfg.run_dir, CHECKPOINTS_DIR), done, run.model, run.optimizer,
                                run.scheduler, {"step": done, "lead": run.lead.state_dict(),
                                                "sampler": run.sampler.state_dict(),
                                                "skips": run.skips.state_dict()},
                                keep_last=cfg.checkpoint.keep_last)
            if done < last and cfg.checkpoint.hf_export_every > 0 and done % cfg.checkpoint.hf_export_every == 0:
                save_hf_checkpoint(run.model, os.path.join(cfg.run_dir, "hf_export", f"step_{done:08d}"),
                                   hf_source_dir=cfg.model.path)
        summary["last"] = metrics
        summary["skips"] = run.skips.summary()
        summary["steps_done"] = stop
        if stop == last:
            summary["after"] = _validate(run)
            save_hf_checkpoint(run.model, os.path.join(cfg.run_dir, "hf"), hf_source_dir=cfg.model.path)
        summary["wall_seconds"] = time.perf_counter() - started
        if rank0:
            with open(os.path.join(cfg.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2, default=float)
    finally:
        logger.close()
        run.grader.close()
        run.engine.close()
    return summary
