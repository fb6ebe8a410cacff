"""Settings of the advantage computation: LEAD and the baselines it is compared with.

A *method* is a named preset of four independent choices (target, reward, normalisation,
weighting); every choice can also be overridden on its own, so ablations are one flag away.
Defaults are the paper's (LEAD_SPEC.md sections 1-6).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

TARGETS = ("mean_correct", "min_correct", "median_correct", "mean_all", "global")
REWARDS = ("symmetric", "budget", "none")
NORMALISATIONS = ("decoupled", "combined", "drpo")
WEIGHTINGS = ("psi", "static")

# method -> the choices it stands for (spec section 10).
METHODS: dict[str, dict] = {
    # LEAD: per-prompt mean-of-correct target, symmetric reward, decoupled norm, PSI weights.
    "lead": dict(target="mean_correct", reward="symmetric", normalisation="decoupled", weighting="psi"),
    # GRPO on correctness alone: the control of every comparison table. As the release's GRPO
    # baseline, its advantages are the group-normalised correctness, not whitened (whiten=True
    # turns the batch whitening back on).
    "grpo": dict(target="mean_correct", reward="none", normalisation="decoupled", weighting="static",
                 static_w_corr=1.0, whiten=False),
    # GRPO, combine-then-normalise: r = w_c r_corr + w_e r_eff, one group normalisation.
    "grpo_combined": dict(target="mean_correct", reward="symmetric", normalisation="combined", weighting="static"),
    # Decoupled normalisation with fixed weights (GDPO-style; LEAD's "no PSI" ablation).
    "static": dict(target="mean_correct", reward="symmetric", normalisation="decoupled", weighting="static"),
    # ShorterBetter's target: the shortest correct rollout (SOL) instead of the mean.
    "sol": dict(target="min_correct", reward="symmetric", normalisation="decoupled", weighting="psi"),
    # One length budget for every prompt: no reward up to the budget, linear penalty beyond it.
    "budget": dict(target="global", reward="budget", normalisation="decoupled", weighting="static"),
    # LEAD ablations.
    "lead_global_target": dict(target="global", reward="symmetric", normalisation="decoupled", weighting="psi"),
    "lead_mean_all": dict(target="mean_all", reward="symmetric", normalisation="decoupled", weighting="psi"),
    "lead_median": dict(target="median_correct", reward="symmetric", normalisation="decoupled", weighting="psi"),
    # DRPO-style decoupling (not DRPO's full objective): correctness as in GRPO, and a length
    # signal among the correct rollouts only, normalised over them (a softmax of r_eff / drpo_tau
    # scaled to mean 1), so it is never negative and a correct rollout never gets a negative
    # advantage; the shortest correct rollout is the target, so shorter correct ones get more.
    # Not whitened (whitening would shift correct rollouts below 0). advantages.py has the formula.
    "drpo": dict(target="min_correct", reward="symmetric", normalisation="drpo", weighting="static",
                 static_w_corr=0.5, whiten=False),
}


@dataclass
class LeadConfig:
    """Every knob of the advantage computation. Build with `LeadConfig.for_method(...)`."""

    method: str = "lead"
    """Name of the preset the four choices below came from (reported in metrics)."""
    target: str = "mean_correct"
    """Per-prompt target length L*: mean_correct | min_correct | median_correct | mean_all | global."""
    reward: str = "symmetric"
    """Efficiency reward: symmetric max(-1, 1-|L-L*|/L*) | budget (penalty past L*) | none (always 0)."""
    normalisation: str = "decoupled"
    """decoupled: each reward normalised in its group, then weighted; combined: weight, then normalise;
    drpo: GRPO correctness plus a length bonus normalised within the correct rollouts only."""
    weighting: str = "psi"
    """psi: weights from the Potential-Scaled Instability controller; static: fixed static_w_corr."""
    l_min: float = 1000.0
    """Lower clamp of the target length (tokens)."""
    l_max: float = 8000.0
    """Upper clamp of the target and the sentinel target of unsolved prompts (= max response length)."""
    global_target: float = 4000.0
    """The single target/budget B used when target == 'global' (tokens)."""
    beta: float = 0.95
    """EMA factor of the PSI weights."""
    lambda_min: float = 0.3
    """Floor of the correctness weight actually used each step."""
    alpha: float = 1.0
    """Exponent of the headroom potentials."""
    eps: float = 1e-8
    """Epsilon of the coefficients of variation and of the weight normalisation."""
    init_w_corr: float = 0.5
    """Starting EMA weight of correctness (efficiency starts at 1 - this)."""
    static_w_corr: float = 0.5
    """Correctness weight for weighting == 'static' (efficiency gets 1 - this)."""
    correct_threshold: float = 0.5
    """A rollout is correct when its correctness score is above this."""
    group_std_eps: float = 1e-6
    """Added to the unbiased group std in the group normalisation."""
    whiten: bool = True
    """Whiten the combined advantages over all response tokens of the batch (off in `grpo`)."""
    whiten_eps: float = 1e-8
    """Added to the token variance before rsqrt in the whitening."""
    drpo_tau: float = 0.2
    """Temperature of the softmax over a prompt's correct rollouts in normalisation 'drpo': the
    smaller, the more of the length bonus goes to the most efficient correct rollout."""

    @classmethod
    def for_method(cls, method: str = "lead", **overrides) -> "LeadConfig":
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"unknown LEAD setting(s): {', '.join(bad)}")
        cfg = cls(method=method, **METHODS[method])
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name, allowed in (("target", TARGETS), ("reward", REWARDS),
                              ("normalisation", NORMALISATIONS), ("weighting", WEIGHTINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"lead.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not 0 < self.l_min <= self.l_max:
            raise ValueError(f"lead.l_min={self.l_min} and lead.l_max={self.l_max} need 0 < l_min <= l_max")
        if self.global_target <= 0:
            raise ValueError(f"lead.global_target={self.global_target} must be positive")
        if not 0 <= self.beta < 1:
            raise ValueError(f"lead.beta={self.beta} must be in [0, 1)")
        for name in ("lambda_min", "init_w_corr", "static_w_corr"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"lead.{name}={getattr(self, name)} must be in [0, 1]")
        if self.alpha <= 0 or self.eps <= 0:
            raise ValueError("lead.alpha and lead.eps must be positive")
        if not self.drpo_tau >= 0.01:  # exp(r_eff / tau) with |r_eff| <= 1 stays finite in float64
            raise ValueError(f"lead.drpo_tau={self.drpo_tau} must be >= 0.01")
        if self.normalisation == "drpo" and self.whiten:
            raise ValueError("lead.normalisation=drpo needs lead.whiten=false: whitening would give "
                             "correct rollouts negative advantages")
