"""Megatron DDP wrapping, Megatron's optimizer, the lr schedule, and one optimizer step.

GPU: bf16 params with fp32 master weights and the distributed optimizer. CPU (tests, CI): fp32
and the plain optimizer by default; bf16 and the distributed optimizer also run there (gloo),
so the tests check the GPU's configuration too (cpu_compat, item 7). Gradient clipping is Megatron's own on both (its CUDA-only asserts are
redirected by cpu_compat), so the CPU tests exercise the code path the GPU runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class OptimConfig:
    """Optimizer, schedule and clipping. Defaults: the paper's run (Adam, lr 2e-6 constant, clip 1.0)."""

    optimizer: str = "adam"
    """adam (AdamW-style decoupled weight decay, as Megatron's) | sgd."""
    lr: float = 2e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the cosine decay."""
    lr_schedule: str = "constant"
    """constant (after warmup) | cosine (warmup, then cosine decay to min_lr at total_steps)."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many optimizer steps."""
    total_steps: int = 1000
    """Optimizer steps of the whole run (the end of the cosine decay)."""
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    bf16: bool | None = None
    """bf16 params and compute with fp32 master weights; None = on with CUDA, off on CPU (where
    it runs too, slowly: the tests use it)."""
    distributed_optimizer: bool | None = None
    """Shard optimizer state over DP (Megatron's distributed optimizer); None = on with CUDA, off
    on CPU (where it runs over gloo: the tests use it)."""

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optim.optimizer={self.optimizer!r} is not one of "
                             f"{', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"optim.lr_schedule={self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim needs 0 <= min_lr <= lr, got min_lr={self.min_lr} lr={self.lr}")
        if self.warmup_steps < 0 or self.total_steps <= self.warmup_steps:
            raise ValueError(f"optim needs 0 <= warmup_steps < total_steps, "
                             f"got {self.warmup_steps} and {self.total_steps}")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad={self.clip_grad} must be >= 0")

    @property
    def use_bf16(self) -> bool:
        return torch.cuda.is_available() if self.bf16 is None else self.bf16

    @property
    def use_distributed_optimizer(self) -> bool:
        return torch.cuda.is_available() if self.distributed_optimizer is None else self.distributed_optimizer


def wrap_ddp(modules: list[torch.nn.Module], cfg: OptimConfig) -> list[torch.nn.Module]:
    """Wrap each model chunk in Megatron's DistributedDataParallel (fp32 grad buffers).

    Also sets, on the shared model config, what the schedules need for training:
    `calculate_per_token_loss` (the loss is a token-sum; grads are summed over DP and divided
    by the global token count once, in finalize_model_grads) and `finalize_model_grads_func`
    (without it the schedule never reduces gradients over DP).
    """
    from megatron.core.distributed import (
        DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads)

    config = modules[0].config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=m,
                                disable_bucketing=(i > 0))
        for i, m in enumerate(modules)
    ]


def build_optimizer(model: list[torch.nn.Module], cfg: OptimConfig):
    """Megatron's optimizer over the DDP-wrapped chunks, and its lr scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg.validate()
    opt_config = OptimizerConfig(
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        sgd_momentum=cfg.sgd_momentum,
        # Global norm over the model-parallel group, TP duplicates and tied copies counted once.
        clip_grad=cfg.clip_grad,
        bf16=cfg.use_bf16,
        params_dtype=torch.bfloat16 if cfg.use_bf16 else torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    # The schedules multiply the loss by this before backward (1 unless fp16 loss scaling).
    model[0].config.grad_scale_func = optimizer.scale_loss
    return optimizer, build_scheduler(optimizer, cfg)


def build_scheduler(optimizer, cfg: OptimConfig):
    """Megatron's OptimizerParamScheduler: linear warmup from 0, then constant or cosine to min_lr.

    It sets the lr of every param group; the update of step n (from 0) uses lr * n / warmup_steps
    during the warmup, as in Megatron-LM.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    cfg.validate()
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=cfg.total_steps,
        lr_decay_style=cfg.lr_schedule,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.total_steps,
        wd_incr_style="constant",
    )


def optimizer_step(optimizer, scheduler, loss_finite: bool = True) -> dict[str, float]:
    """Clip (Megatron's global norm), update, advance the lr schedule; or skip a non-finite update.

    Megatron checks grads for inf/nan only with an fp16 loss scaler, so in fp32 and bf16 a NaN
    gradient would pass through clipping into Adam and poison the weights and both moments for
    good. So the global grad norm (over the model-parallel group; the grads are already reduced
    over DP, so every rank sees the same value) is checked first: when it, or the loss
    (`loss_finite`, global too), is not finite, nothing is touched (weights, Adam state, lr
    schedule) and the update counts as skipped. The norm is then computed twice per update (once
    more in Megatron's clipping), a small cost next to the forward/backward.

    Returns grad_norm (before clipping), the lr used, and skipped (1.0 for a skipped update).
    """
    lr = optimizer.param_groups[0]["lr"]
    found_inf = optimizer.prepare_grads()  # main grads ready (mixed precision), scaler's check
    norm = optimizer.get_grad_norm()
    norm = float("nan") if norm is None else float(norm)
    if found_inf or not loss_finite or not math.isfinite(norm):
        return {"grad_norm": norm, "lr": lr, "skipped": 1.0}
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return {"grad_norm": float("nan") if grad_norm is None else float(grad_norm), "lr": lr,
            "skipped": float(not ok)}
