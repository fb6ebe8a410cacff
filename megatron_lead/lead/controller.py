"""The Potential-Scaled Instability (PSI) controller: LEAD's online reward weights.

Input each step: mean and std of each raw reward over the batch (computed in advantages.py from
all-reduced sums). A reward gets weight when it is both *unstable* (high coefficient of
variation: still a learning signal) and has *headroom* (potential: far from its ceiling).
The target weights are smoothed by an EMA; the correctness weight used for the step is floored.
LEAD_SPEC.md section 6 has the formulas; the names below follow it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class PSIState:
    """What must survive a checkpoint: the unfloored EMA weights and the step count."""

    w_corr_ema: float = 0.5
    w_eff_ema: float = 0.5
    steps: int = 0


class PSIController:
    def __init__(self, beta: float = 0.95, lambda_min: float = 0.3, alpha: float = 1.0,
                 eps: float = 1e-8, init_w_corr: float = 0.5):
        self.beta, self.lambda_min, self.alpha, self.eps = beta, lambda_min, alpha, eps
        self.state = PSIState(w_corr_ema=init_w_corr, w_eff_ema=1.0 - init_w_corr)

    @classmethod
    def from_config(cls, cfg) -> "PSIController":
        return cls(cfg.beta, cfg.lambda_min, cfg.alpha, cfg.eps, cfg.init_w_corr)

    def update(self, mu_corr: float, sigma_corr: float, mu_eff: float, sigma_eff: float) -> dict:
        """Advance one step; returns the weights to use now and every intermediate for logging."""
        eps, a = self.eps, self.alpha
        cv_corr = sigma_corr / (abs(mu_corr) + eps)
        cv_eff = sigma_eff / (abs(mu_eff) + eps)
        cv_sum = cv_corr + cv_eff + eps
        cvn_corr, cvn_eff = cv_corr / cv_sum, cv_eff / cv_sum
        # Headroom: correctness lives in [0, 1], the symmetric efficiency reward in [-1, 1].
        phi_corr = (1.0 - min(max(mu_corr, 0.0), 1.0)) ** a
        phi_eff = (1.0 - (min(max(mu_eff, -1.0), 1.0) + 1.0) / 2.0) ** a
        d_corr, d_eff = cvn_corr * phi_corr, cvn_eff * phi_eff
        d_sum = d_corr + d_eff + eps
        target_corr, target_eff = d_corr / d_sum, d_eff / d_sum

        s = self.state
        s.w_corr_ema = self.beta * s.w_corr_ema + (1.0 - self.beta) * target_corr
        s.w_eff_ema = self.beta * s.w_eff_ema + (1.0 - self.beta) * target_eff
        s.steps += 1
        # The floor applies to the weights used, never to the stored EMA.
        w_corr = max(s.w_corr_ema, self.lambda_min)
        out = dict(w_corr=w_corr, w_eff=1.0 - w_corr, w_corr_ema=s.w_corr_ema, w_eff_ema=s.w_eff_ema,
                   target_w_corr=target_corr, target_w_eff=target_eff,
                   cv_corr=cv_corr, cv_eff=cv_eff, phi_corr=phi_corr, phi_eff=phi_eff,
                   d_corr=d_corr, d_eff=d_eff)
        assert all(math.isfinite(v) for v in out.values()), f"non-finite PSI state: {out}"
        return out

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = PSIState(w_corr_ema=float(state["w_corr_ema"]), w_eff_ema=float(state["w_eff_ema"]),
                              steps=int(state["steps"]))
