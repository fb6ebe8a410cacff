"""The LEAD policy loss (LEAD_SPEC.md section 7): PPO clipped surrogate + KL-to-reference term,
and the options peers' users expect (docs/TRAINER.md, "RL options"), all off by default.

Every response token carries its rollout's outcome advantage; no critic. `policy_loss` returns
a SUM over the micro-batch and an integer count, and Megatron divides the summed gradient by the
count summed over micro-batches and data-parallel ranks (`calculate_per_token_loss`, see
optim.wrap_ddp), so the gradient does not depend on how the mini-batch is split. What is summed
and counted sets the aggregation (`loss.agg_mode`):

    token_mean               sum_i sum_t l_it / sum_i L_i       count: loss tokens (the release)
    seq_mean_token_mean      sum_i (1/L_i) sum_t l_it / B       count: sequences
    seq_mean_token_sum       sum_i sum_t l_it / B               count: sequences
    seq_mean_token_sum_norm  sum_i sum_t l_it / (B * L_norm)    count: sequences (Dr. GRPO)

L_i: loss tokens of rollout i, B: rollouts with at least one loss token, both over the whole
mini-batch on every DP rank. A rollout never straddles micro-batches, so 1/L_i is local and the
count is additive: every mode is global, whatever the DP size and the micro-batch cuts.

Rollout correction (the rollout engine's sampling log-probs pi_rollout against the trainer's
pi_old on the same weights): the token-level truncated importance weight
w_t = min(pi_old / pi_rollout, C) multiplies each token's PPO term (`rollout_tis_weights`), and
`sequence_keep` says which rollouts keep their tokens in the loss when their sequence ratio
must stay in [1/C, C] (applied by trainer/ppo.py, once per step, to the response mask).
Metrics are sums too, for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_TYPES = ("mse", "k3", "none")
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
SEQ_RATIOS = ("geometric", "product")
# exp() of a log-ratio is clamped here (like verl): a stale or mismatched token must not overflow.
_MAX_LOG_RATIO = 20.0


@dataclass
class LossConfig:
    """Knobs of the policy loss. Defaults: the paper's main run; every option below is off."""

    eps_low: float = 0.2
    """Lower clip: the ratio is kept >= 1 - eps_low for negative advantages."""
    eps_high: float = 0.2
    """Upper clip: the ratio is kept <= 1 + eps_high for positive advantages (0.28 in ablations)."""
    kl_coef: float = 5e-4
    """Weight of the KL-to-reference term in the loss (0 turns it off)."""
    kl_type: str = "mse"
    """mse: 0.5 (logp - logp_ref)^2 (the release); k3: exp(ref - logp) - (ref - logp) - 1; none."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (loss -= coef * entropy); 0 in the paper (the release's trainer config: 0.001)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts; log-probs are of logits / temperature."""
    compute_entropy: bool = True
    """Report the mean token entropy (costs one more TP all-reduce per micro-batch)."""
    agg_mode: str = "token_mean"
    """How token losses become the mini-batch loss (module docstring): token_mean (the release,
    DAPO) | seq_mean_token_mean (GRPO's paper) | seq_mean_token_sum | seq_mean_token_sum_norm (Dr. GRPO)."""
    agg_norm_len: int = 0
    """L_norm of seq_mean_token_sum_norm, a constant (Dr. GRPO: the generation budget); 0 = the
    trainer's rollout.max_response_len."""
    rollout_tis_cap: float = 0.0
    """C of token-level truncated importance sampling: each token's PPO term times
    min(pi_old / pi_rollout, C), pi_rollout = vLLM's sampling probability; 0 = off, else >= 1."""
    rollout_seq_mask: float = 0.0
    """C of sequence-level masking: a rollout whose sequence ratio pi_old / pi_rollout (see
    rollout_seq_ratio) leaves [1/C, C] is taken out of the loss; 0 = off, else > 1."""
    rollout_seq_ratio: str = "geometric"
    """The sequence ratio of rollout_seq_mask: geometric (exp of the mean token log-ratio,
    length-free) | product (exp of the sum: the true sequence importance weight)."""
    mask_truncated: bool = False
    """Take rollouts cut off at rollout.max_response_len out of the loss (DAPO's overlong filtering)."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment over the last this many tokens before
    rollout.max_response_len (added to the rollout's advantage); 0 = off."""
    overlong_penalty: float = 1.0
    """The punishment at rollout.max_response_len (linear from 0 where the buffer starts)."""

    def validate(self) -> None:
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"loss.kl_type={self.kl_type!r} is not one of {', '.join(KL_TYPES)}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"loss clip ratios need 0 <= eps_low < 1 and eps_high >= 0, "
                             f"got {self.eps_low}/{self.eps_high}")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError("loss.kl_coef and loss.entropy_coef must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature={self.temperature} must be positive")
        if self.agg_mode not in AGG_MODES:
            raise ValueError(f"loss.agg_mode={self.agg_mode!r} is not one of {', '.join(AGG_MODES)}")
        if self.agg_norm_len < 0 or (self.agg_mode == "seq_mean_token_sum_norm" and self.agg_norm_len == 0):
            raise ValueError(f"loss.agg_norm_len={self.agg_norm_len} must be positive with "
                             "loss.agg_mode=seq_mean_token_sum_norm (the trainer sets rollout.max_response_len)")
        if self.rollout_tis_cap != 0 and not self.rollout_tis_cap >= 1:
            raise ValueError(f"loss.rollout_tis_cap={self.rollout_tis_cap} must be 0 (off) or >= 1")
        if self.rollout_seq_mask != 0 and not self.rollout_seq_mask > 1:
            raise ValueError(f"loss.rollout_seq_mask={self.rollout_seq_mask} must be 0 (off) or > 1")
        if self.rollout_seq_ratio not in SEQ_RATIOS:
            raise ValueError(f"loss.rollout_seq_ratio={self.rollout_seq_ratio!r} is not one of "
                             f"{', '.join(SEQ_RATIOS)}")
        if self.overlong_buffer < 0:
            raise ValueError(f"loss.overlong_buffer={self.overlong_buffer} must be >= 0")
        if not self.overlong_penalty >= 0:
            raise ValueError(f"loss.overlong_penalty={self.overlong_penalty} must be >= 0")

    @property
    def uses_reference(self) -> bool:
        return self.kl_type != "none" and self.kl_coef > 0

    @property
    def wants_entropy(self) -> bool:
        return self.compute_entropy or self.entropy_coef > 0

    @property
    def corrects_rollouts(self) -> bool:
        """Any rollout correction on (it needs vLLM's sampling log-probs)."""
        return self.rollout_tis_cap > 0 or self.rollout_seq_mask > 0

    @property
    def masks_rollouts(self) -> bool:
        """Some rollouts may leave the loss (a mini-batch may then have no loss token at all)."""
        return self.rollout_seq_mask > 0 or self.mask_truncated


def kl_to_reference(logp: torch.Tensor, ref_logp: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimate between the policy and the frozen reference."""
    if kl_type == "mse":
        return 0.5 * (logp - ref_logp).square()
    if kl_type == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1.0
    raise ValueError(f"kl_type={kl_type!r} is not one of mse, k3")


# ------------------------------------------------------------------ sequences of a micro-batch

def segment_ids(shape: torch.Size, cu_seqlens: torch.Tensor | None = None,
                device: torch.device | None = None) -> tuple[torch.Tensor, int]:
    """([b, s] int64 rollout index of every column, number of rollouts) of a micro-batch: its rows
    when padded, the pieces between cu_seqlens boundaries when packed ([1, T])."""
    b, s = shape
    if cu_seqlens is None:
        return torch.arange(b, device=device).unsqueeze(1).expand(b, s), b
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    index = torch.arange(s, device=device)
    return torch.bucketize(index, cu[1:], right=True).clamp_max(cu.numel() - 2).unsqueeze(0), cu.numel() - 1


def per_sequence_sum(values: torch.Tensor, mask: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """[n] sums of `values` over each rollout's masked tokens (float64)."""
    out = torch.zeros(n, dtype=torch.float64, device=values.device)
    return out.index_add_(0, seg[mask], values[mask].double())


def rollout_log_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(pi_old / pi_rollout) per token, 0 off the mask (padding may hold garbage)."""
    return torch.where(mask, old_logp.double() - rollout_logp.double(), 0.0)


def rollout_tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                        cap: float) -> torch.Tensor:
    """Token-level truncated importance weights min(pi_old / pi_rollout, cap), 0 off the mask.
    No gradient: pi_old and pi_rollout are both fixed before the update."""
    ratio = torch.exp(rollout_log_ratio(old_logp, rollout_logp, mask.bool()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    return torch.where(mask.bool(), ratio.clamp_max(cap), 0.0)


def sequence_log_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                       seg: torch.Tensor, n: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """([n] log of each rollout's sequence ratio, [n] its token count): `product` sums the token
    log-ratios (log pi_old(y) / pi_rollout(y)), `geometric` averages them (0 for no token)."""
    mask = mask.bool()
    total = per_sequence_sum(rollout_log_ratio(old_logp, rollout_logp, mask), mask, seg, n)
    count = per_sequence_sum(torch.ones_like(old_logp), mask, seg, n)
    if kind == "geometric":
        total = total / count.clamp_min(1.0)
    elif kind != "product":
        raise ValueError(f"loss.rollout_seq_ratio={kind!r} is not one of {', '.join(SEQ_RATIOS)}")
    return total, count


def sequence_keep(log_ratio: torch.Tensor, cap: float) -> torch.Tensor:
    """[n] True where the sequence ratio exp(log_ratio) lies in [1/cap, cap] (ends included)."""
    bound = torch.log(torch.tensor(cap, dtype=torch.float64))
    return log_ratio.abs() <= bound


def _aggregation(mask: torch.Tensor, cfg: LossConfig, cu_seqlens: torch.Tensor | None):
    """(per-token scale, int count) of cfg.agg_mode: loss = sum(scale * l) / global sum(count)."""
    if cfg.agg_mode == "token_mean":
        return None, mask.sum().to(torch.int)
    seg, n = segment_ids(mask.shape, cu_seqlens, mask.device)
    lengths = per_sequence_sum(torch.ones(mask.shape, device=mask.device), mask, seg, n)
    count = (lengths > 0).sum().to(torch.int)
    if cfg.agg_mode == "seq_mean_token_mean":
        scale = (1.0 / lengths.clamp_min(1.0))[seg]
    elif cfg.agg_mode == "seq_mean_token_sum":
        scale = None
    else:  # seq_mean_token_sum_norm (validated)
        scale = torch.full(mask.shape, 1.0 / cfg.agg_norm_len, dtype=torch.float64, device=mask.device)
    return scale, count


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch's loss sum, its int count (the module docstring's table), and metric sums.

    logp (with grad), old_logp, ref_logp, entropy, rollout_logp, mask: [b, s] aligned with the
    tokens; advantages: [b, s] per token or [b] per rollout (broadcast to its tokens).
    cu_seqlens: the rollouts' boundaries of a packed micro-batch ([1, T]); None = one per row.
    Metric sums (detached): loss (the aggregated sum, over `loss_count`), and token sums of
    pg_loss, kl_ref, ppo_kl (old - new), clip_frac, entropy (over `num_tokens`).
    """
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logp.dtype)

    # Padding may hold garbage log-probs; zero them before exp so no inf/nan leaks into grads.
    log_ratio = torch.where(mask, logp - old_logp, 0.0)
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    if cfg.rollout_tis_cap > 0:
        if rollout_logp is None:
            raise ValueError(f"loss.rollout_tis_cap={cfg.rollout_tis_cap} needs the rollout's sampling log-probs")
        pg = pg * rollout_tis_weights(old_logp, rollout_logp, mask, cfg.rollout_tis_cap).to(pg.dtype)
    per_token = pg

    def total(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, 0.0).sum()

    stats = {
        "pg_loss": total(pg),
        "ppo_kl": total(-log_ratio),
        "clip_frac": total((pg_clipped > pg_unclipped).float()),
    }
    if cfg.uses_reference:
        if ref_logp is None:
            raise ValueError(f"loss.kl_type={cfg.kl_type} with kl_coef={cfg.kl_coef} "
                             "needs reference log-probs")
        kl = kl_to_reference(logp, torch.where(mask, ref_logp, logp.detach()), cfg.kl_type)
        per_token = per_token + cfg.kl_coef * kl
        stats["kl_ref"] = total(kl)
    if entropy is not None:
        if cfg.entropy_coef > 0:
            per_token = per_token - cfg.entropy_coef * entropy
        stats["entropy"] = total(entropy)

    scale, count = _aggregation(mask, cfg, cu_seqlens)
    loss_sum = total(per_token if scale is None else per_token * scale.to(per_token.dtype))
    stats["loss"] = loss_sum
    stats["num_tokens"] = mask.sum()
    stats["loss_count"] = count
    return loss_sum, count, {k: v.detach().float() for k, v in stats.items()}
