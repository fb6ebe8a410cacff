"""The LEAD policy loss (LEAD_SPEC.md section 7): PPO clipped surrogate + KL-to-reference term.

Every response token carries its rollout's outcome advantage; no critic. The loss is a
token-mean over the GLOBAL batch: `policy_loss` returns token SUMS and the token count, and
Megatron divides by the count summed over micro-batches and data-parallel ranks
(`calculate_per_token_loss`, see train_step.py), so the gradient does not depend on how the
batch is split. Metrics are sums too, for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_TYPES = ("mse", "k3", "none")


@dataclass
class LossConfig:
    """Knobs of the policy loss. Defaults: the paper's main run."""

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

    @property
    def uses_reference(self) -> bool:
        return self.kl_type != "none" and self.kl_coef > 0

    @property
    def wants_entropy(self) -> bool:
        return self.compute_entropy or self.entropy_coef > 0


def kl_to_reference(logp: torch.Tensor, ref_logp: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimate between the policy and the frozen reference."""
    if kl_type == "mse":
        return 0.5 * (logp - ref_logp).square()
    if kl_type == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1.0
    raise ValueError(f"kl_type={kl_type!r} is not one of mse, k3")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over response tokens of the per-token loss, the token count, and metric sums.

    logp (with grad), old_logp, ref_logp, entropy, mask: [b, s] aligned with the tokens;
    advantages: [b, s] per token or [b] per rollout (broadcast to its tokens).
    Metric sums (detached): loss, pg_loss, kl_ref, ppo_kl (old - new), clip_frac, entropy.
    """
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logp.dtype)

    # Padding may hold garbage log-probs; zero them before exp so no inf/nan leaks into grads.
    log_ratio = torch.where(mask, logp - old_logp, 0.0)
    # Clamped like verl: a stale or mismatched token must not overflow exp().
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
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

    loss_sum = total(per_token)
    stats["loss"] = loss_sum
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {k: v.detach().float() for k, v in stats.items()}
