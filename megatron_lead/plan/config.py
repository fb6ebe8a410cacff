"""The planner seen from a training config: its workload, its own layout, and the line `train` prints.

`estimate_for_train_config` is what the trainer calls at start-up; it never raises for a config
the trainer accepts (a model folder without a readable config.json gives a "no estimate" line).
"""

from __future__ import annotations

from megatron_lead.plan import planner as P
from megatron_lead.plan import report as R
from megatron_lead.plan.shapes import ModelShape, check_split, check_vllm_split, load_shape

ATTENTION_KERNELS = {"auto": "gpu", "te": "gpu", "sdpa": "gpu-local"}
"""model.attention -> saved-activation profile. `auto` is taken as Transformer Engine: the GPU
requirements install it (on a machine without it the run uses sdpa, `gpu-local`)."""


def workload_from_config(cfg) -> P.Workload:
    """The workload of a trainer config (None-valued GPU defaults taken as on a GPU)."""
    if cfg.model.attention not in ATTENTION_KERNELS:
        raise ValueError(f"model.attention={cfg.model.attention}: the planner models auto, te and sdpa "
                         "(Megatron's local attention keeps [s x s] scores)")
    rollout = cfg.rollout
    offload = getattr(rollout, "offload_train_state", None)
    return P.Workload(
        prompts_per_step=cfg.data.prompts_per_step, rollouts_per_prompt=rollout.n,
        max_prompt_len=cfg.data.max_prompt_len, max_response_len=rollout.max_response_len,
        mini_batch_prompts=cfg.ppo.mini_batch_prompts, micro_batch_size=cfg.ppo.micro_batch_size,
        pack_sequences=cfg.ppo.pack_sequences, max_tokens_per_micro_batch=cfg.ppo.max_tokens_per_micro_batch,
        bf16=True if cfg.optim.bf16 is None else cfg.optim.bf16,
        distributed_optimizer=True if cfg.optim.distributed_optimizer is None else cfg.optim.distributed_optimizer,
        optimizer=cfg.optim.optimizer,
        offload_train_state=True if offload is None else bool(offload),
        offload_weights=bool(getattr(rollout, "offload_weights", False)),
        kl_reference=cfg.loss.uses_reference, entropy=cfg.loss.wants_entropy, enforce_eager=rollout.enforce_eager,
        gpu_memory_utilization=rollout.gpu_memory_utilization, kv_cache_memory_bytes=rollout.kv_cache_memory_bytes,
        kernels=ATTENTION_KERNELS[cfg.model.attention])


def config_layout(cfg, shape: ModelShape, w: P.Workload, world: int
                  ) -> tuple[P.Layout | None, P.MicroBatch | None, str]:
    """The layout and micro-batch a config runs on `world` GPUs, or a one-line problem. The config
    has no expert-parallel key: a MoE model runs at EP=1 (planner.EP_NOTE)."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    vtp = cfg.rollout.tensor_parallel_size
    if world % (tp * pp):
        return None, None, (f"parallel: world size {world} is not a multiple of tensor_model_parallel_size x "
                            f"pipeline_model_parallel_size = {tp} x {pp}")
    if world % vtp:
        return None, None, f"rollout.tensor_parallel_size={vtp} does not divide the world size {world}"
    problem = check_split(shape, tp, pp) or check_vllm_split(shape, vtp)
    if not problem and shape.arch.is_moe and tp > 1:
        problem = P.MOE_TP_PROBLEM.format(tp=tp)
    if problem:
        return None, None, problem
    layout = P.Layout(tp=tp, pp=pp, dp=world // (tp * pp), vllm_tp=vtp,
                      distributed_optimizer=w.distributed_optimizer, offload=w.offload_train_state)
    micro = P.MicroBatch(pack=w.pack_sequences, micro_batch_size=w.micro_batch_size,
                         max_tokens=w.max_tokens_per_micro_batch)
    return layout, micro, ""


def estimate_for_train_config(cfg, world_size: int, gpu_memory_gb: float | None) -> tuple[str, bool]:
    """(one line for the log, whether the config fits) for `cfg` on `world_size` GPUs of
    `gpu_memory_gb` GiB each (torch's total_memory / 2**30): fits is False when a phase's planned
    peak exceeds the GPU's memory. None (no GPU): the line gives the peaks only and fits is True.
    Pure arithmetic on model.path's config.json: milliseconds."""
    import os

    try:
        shape = load_shape(os.path.join(cfg.model.path, "config.json"))
        w = workload_from_config(cfg)
    except (OSError, ValueError) as e:
        return f"plan: no estimate ({' '.join(str(e).split())})", True
    checked = gpu_memory_gb is not None
    # No reserve here: `train` stops only when the plan's peak exceeds the GPU itself (`plan`
    # keeps 5% free when it ranks layouts).
    cluster = P.Cluster(nodes=1, gpus_per_node=world_size, gpu_memory_gib=gpu_memory_gb if checked else 80.0,
                        reserve=0.0)
    layout, micro, problem = config_layout(cfg, shape, w, world_size)
    if problem:
        return f"plan: no estimate ({problem})", True
    est = P.evaluate(shape, w, cluster, layout, micro)
    return R.one_line(est, w, checked=checked), (est.fits or not checked)
