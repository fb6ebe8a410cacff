"""Settings of the advantage computation: LEAD and the baselines it is compared with.

A *method* is a named preset of four independent choices (target, reward, normalisation,
weighting); every choice can also be overridden on its own, so ablations are one flag away.
Defaults are the paper's (LEAD_SPEC.md sections 1-6).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

TARGETS = ("mean_correct", "min_correct", "median_correct", "mean_all", "global", "sol")
REWARDS = ("symmetric", "budget", "none", "absolute", "kimi", "l1_max")
NORMALISATIONS = ("decoupled", "combined", "drpo")
WEIGHTINGS = ("psi", "static")

# method -> the choices it stands for (spec section 10). A baseline carries a paper's name only
# where it computes that paper's formula (docs/LEAD.md, "Baselines": each with its source).
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
    # LEAD with the shortest correct rollout as target (an ablation; ShorterBetter is "shorterbetter").
    "lead_min_target": dict(target="min_correct", reward="symmetric", normalisation="decoupled", weighting="psi"),
    # One length budget for every prompt: no reward up to the budget, linear penalty beyond it.
    "budget": dict(target="global", reward="budget", normalisation="decoupled", weighting="static"),
    # LEAD ablations.
    "lead_global_target": dict(target="global", reward="symmetric", normalisation="decoupled", weighting="psi"),
    "lead_mean_all": dict(target="mean_all", reward="symmetric", normalisation="decoupled", weighting="psi"),
    "lead_median": dict(target="median_correct", reward="symmetric", normalisation="decoupled", weighting="psi"),
    # ShorterBetter (Yi et al., arXiv 2504.21370): r = alpha 1[correct] - beta |L - SOL| in tokens,
    # SOL = the shortest correct length, or the mean length of all rollouts when none is correct;
    # one GRPO group normalisation; alpha 2.0, beta 0.001 (its release's defaults).
    "shorterbetter": dict(target="sol", reward="absolute", normalisation="combined", weighting="static",
                          static_w_corr=2.0, static_w_eff=0.001, whiten=False),
    # Kimi k1.5's length reward (Kimi Team, arXiv 2501.12599): lambda = 0.5 - (L - min L) / (max L - min L)
    # over the prompt's rollouts, lambda if correct, min(0, lambda) if not, added to correctness;
    # one GRPO group normalisation. The report gives no weight: 1.0 (static_w_eff).
    "kimi": dict(target="global", reward="kimi", normalisation="combined", weighting="static",
                 static_w_corr=1.0, static_w_eff=1.0, whiten=False),
    # L1 / LCPO (Aggarwal & Welleck, arXiv 2503.04697) with one global budget B (global_target)
    # instead of a budget sampled into each prompt: L1-Exact r = 1[correct] - alpha |B - L|;
    # L1-Max r = 1[correct] clip(alpha (B - L) + delta, 0, 1); alpha 0.0003, delta 0.5; GRPO.
    "l1_exact": dict(target="global", reward="absolute", normalisation="combined", weighting="static",
                     static_w_corr=1.0, static_w_eff=0.0003, whiten=False),
    "l1_max": dict(target="global", reward="l1_max", normalisation="combined", weighting="static",
                   static_w_corr=0.0, static_w_eff=1.0, whiten=False),
    # DRPO's decoupled advantages (Li et al., arXiv 2510.04474), inside this PPO loss: in a prompt
    # with correct and wrong rollouts, a correct one gets G w_i / sum_correct w, w_i =
    # exp((1 - L_i / l_max) / drpo_lambda), a wrong one -G softmax_j(s_j / drpo_tau) over the wrong
    # ones (s = mean token log-prob); other prompts 0. With loss.aggregation=seq_mean_token_mean this
    # is DRPO's gradient at ratio 1; what differs (PPO clip instead of its KL hinge) is in docs/LEAD.md.
    "drpo_style": dict(target="global", reward="none", normalisation="drpo", weighting="static", whiten=False),
}

RENAMED = {"sol": "lead_min_target", "drpo": "drpo_style"}
"""Earlier method names -> what they are now (an old name gets a one-line error naming the new)."""


@dataclass
class LeadConfig:
    """Every knob of the advantage computation. Build with `LeadConfig.for_method(...)`."""

    method: str = "lead"
    """Name of the preset the four choices below came from (reported in metrics)."""
    target: str = "mean_correct"
    """Per-prompt target length L*: mean_correct | min_correct | median_correct | mean_all | global
    (clamped to [l_min, l_max]; l_max when none is correct) | sol (ShorterBetter: the shortest
    correct length, else the mean length of all rollouts; not clamped)."""
    reward: str = "symmetric"
    """Efficiency reward: symmetric max(-1, 1-|L-L*|/L*) | budget (penalty past L*) | none (always 0)
    | absolute -|L-L*| in tokens | kimi (Kimi k1.5's lambda) | l1_max 1[correct] clip(l1_alpha (L*-L)
    + l1_delta, 0, 1)."""
    normalisation: str = "decoupled"
    """decoupled: each reward normalised in its group, then weighted; combined: weight, then normalise;
    drpo: DRPO's decoupled advantages (see METHODS["drpo_style"]; the rewards are not used)."""
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
    """Correctness weight for weighting == 'static'."""
    static_w_eff: float | None = None
    """Efficiency weight for weighting == 'static'; None = 1 - static_w_corr."""
    correct_threshold: float = 0.5
    """A rollout is correct when its correctness score is above this."""
    group_std_eps: float = 1e-6
    """Added to the unbiased group std in the group normalisation."""
    whiten: bool = True
    """Whiten the combined advantages over all response tokens of the batch (off in `grpo`)."""
    whiten_eps: float = 1e-8
    """Added to the token variance before rsqrt in the whitening."""
    drpo_tau: float = 10.0
    """DRPO's tau: temperature of the softmax over a prompt's wrong rollouts' mean token log-probs
    (normalisation 'drpo'; the paper's 10)."""
    drpo_lambda: float = 0.1
    """DRPO's lambda: correct rollout i weighs exp((1 - L_i / l_max) / lambda) (the paper's 0.1)."""
    l1_alpha: float = 0.0003
    """L1-Max's alpha (reward 'l1_max'; L1-Exact's is static_w_eff): per token of L - B."""
    l1_delta: float = 0.5
    """L1-Max's delta: the reward of a correct answer exactly at the budget."""

    @property
    def weights(self) -> tuple[float, float]:
        """(w_corr, w_eff) of weighting 'static'."""
        w_eff = 1.0 - self.static_w_corr if self.static_w_eff is None else self.static_w_eff
        return self.static_w_corr, w_eff

    @classmethod
    def for_method(cls, method: str = "lead", **overrides) -> "LeadConfig":
        check_method(method)
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
        for name in ("lambda_min", "init_w_corr"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"lead.{name}={getattr(self, name)} must be in [0, 1]")
        if self.static_w_corr < 0 or (self.static_w_eff is not None and self.static_w_eff < 0):
            raise ValueError(f"lead.static_w_corr={self.static_w_corr} and lead.static_w_eff="
                             f"{self.static_w_eff} must be >= 0")
        if self.drpo_lambda <= 0 or self.l1_alpha < 0:
            raise ValueError(f"lead.drpo_lambda={self.drpo_lambda} must be > 0 and lead.l1_alpha="
                             f"{self.l1_alpha} >= 0")
        if self.alpha <= 0 or self.eps <= 0:
            raise ValueError("lead.alpha and lead.eps must be positive")
        if not self.drpo_tau >= 0.01:  # exp(s / tau) of a mean token log-prob s stays finite in float64
            raise ValueError(f"lead.drpo_tau={self.drpo_tau} must be >= 0.01")
        if self.normalisation == "drpo" and self.whiten:
            raise ValueError("lead.normalisation=drpo needs lead.whiten=false: whitening would give "
                             "correct rollouts negative advantages")


def check_method(method: str) -> None:
    """One-line ValueError for an unknown (or renamed) method name."""
    if method in RENAMED:
        raise ValueError(f"lead.method={method!r} is now {RENAMED[method]!r} (issue 18: the name said "
                         f"what it was not)")
    if method not in METHODS:
        raise ValueError(f"lead.method={method!r} is not one of {', '.join(METHODS)}")
