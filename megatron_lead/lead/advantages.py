"""LEAD advantages (and the baselines') from rollout lengths and correctness.

The whole method in one place (LEAD_SPEC.md sections 1-6):

  1. target length per prompt   L*_q = clamp(mean of correct lengths, l_min, l_max), l_max if none
  2. efficiency reward          r_eff = max(-1, 1 - |L - L*_q| / L*_q)
  3. correctness reward         r_corr = the grader's score (1 correct, 0 not)
  4. group normalisation        A_k = (r_k - mean_q r_k) / (std_q r_k + 1e-6), per reward k
  5. combination + whitening    A = w_corr A_corr + w_eff A_eff, whitened over response tokens
  6. weights                    PSI controller (controller.py) from the raw reward moments

DRPO's decoupled advantages (normalisation "drpo", the `drpo_style` preset; Li et al., arXiv
2510.04474). In a prompt q with both correct rollouts K_q and wrong ones N_q (G_q rollouts):

  A_i =  G_q w_i / sum_{K_q} w          correct i,  w_i = exp((1 - L_i / l_max) / drpo_lambda)
  A_j = -G_q e_j / sum_{N_q} e          wrong j,    e_j = exp(s_j / drpo_tau), s_j its mean token log-prob

and 0 in a prompt whose rollouts are all correct or all wrong. With a loss that averages each
sequence's tokens and then the sequences (loss.aggregation=seq_mean_token_mean) this is the
gradient of DRPO's objective at ratio 1: the length preference is normalised within the correct
rollouts alone, so a correct rollout never gets a negative advantage. The four per-prompt sums (G,
K, sum w, sum e) are columns of the moment table below; the token moments of the result (metrics
only: the preset is not whitened) take one more all-reduce.

Data parallelism. Each rank holds any subset of the batch's rollouts; a rollout carries its
prompt's global index. Everything is derived from per-prompt *sums*, so two all-reduces make
all ranks agree exactly (up to float64 rounding) with a single process holding the whole
batch: one for the targets (step 1 needs the correct lengths of the whole group) and one for
everything else. The combined advantage is affine in the two rewards inside a prompt,
A = a_q + b_q r_corr + d_q r_eff, so even the token-weighted whitening moments follow from
per-prompt sums of L, L*r and L*r*r' taken in that same second all-reduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import LeadConfig
from .controller import PSIController
from .reduce import GroupReducer

# Inside the sqrt of the PSI total standard deviation (spec section 6), independent of eps.
_PSI_VAR_EPS = 1e-8


@dataclass
class RolloutShard:
    """The rollouts this rank holds. Rollouts of one prompt may be spread over ranks."""

    prompt_index: torch.Tensor
    """int64 [n]: global index of each rollout's prompt, in [0, num_prompts)."""
    length: torch.Tensor
    """[n]: response length in tokens (also the rollout's weight in the token whitening)."""
    score: torch.Tensor
    """[n]: correctness score from the grader (1.0 correct, 0.0 wrong)."""
    num_prompts: int
    """Number of prompts in the global batch (same on every rank)."""
    mean_logprob: torch.Tensor | None = None
    """[n]: mean sampling log-prob of each rollout's response tokens (DRPO's score of a wrong
    rollout); None: all equal (the softmax over wrong rollouts is then uniform)."""

    def __post_init__(self):
        self.prompt_index = torch.as_tensor(self.prompt_index, dtype=torch.int64).reshape(-1)
        self.length = torch.as_tensor(self.length, dtype=torch.float64).reshape(-1)
        self.score = torch.as_tensor(self.score, dtype=torch.float64).reshape(-1)
        if self.mean_logprob is not None:
            self.mean_logprob = torch.as_tensor(self.mean_logprob, dtype=torch.float64).reshape(-1)
        n = self.prompt_index.numel()
        if self.mean_logprob is not None and self.mean_logprob.numel() != n:
            raise ValueError(f"rollout shard: mean_logprob ({self.mean_logprob.numel()}) and prompt_index "
                             f"({n}) must have the same size")
        if self.length.numel() != n or self.score.numel() != n:
            raise ValueError(f"rollout shard: prompt_index ({n}), length ({self.length.numel()}) and "
                             f"score ({self.score.numel()}) must have the same size")
        if n and (int(self.prompt_index.min()) < 0 or int(self.prompt_index.max()) >= self.num_prompts):
            raise ValueError(f"rollout shard: prompt_index outside [0, {self.num_prompts})")
        if n and float(self.length.min()) < 0:
            raise ValueError("rollout shard: negative response length")


@dataclass
class LeadResult:
    advantages: torch.Tensor
    """[n] float64: the advantage of each local rollout (whitened if configured)."""
    unwhitened: torch.Tensor
    """[n] float64: w_corr*A_corr + w_eff*A_eff before whitening."""
    corr_reward: torch.Tensor
    eff_reward: torch.Tensor
    targets: torch.Tensor
    """[num_prompts] float64: target length L*_q of every prompt of the global batch."""
    w_corr: float
    w_eff: float
    metrics: dict = field(default_factory=dict)
    """Global (all-reduced) scalars for logging; identical on every rank."""


# ----------------------------------------------------------------------------- 1. targets

def target_lengths(shard: RolloutShard, correct: torch.Tensor, cfg: LeadConfig,
                   reducer: GroupReducer) -> torch.Tensor:
    """Per-prompt target length L*_q for every prompt of the global batch."""
    P, idx, L = shard.num_prompts, shard.prompt_index, shard.length
    if cfg.target == "global":
        return torch.full((P,), float(cfg.global_target), dtype=torch.float64)

    if cfg.target in ("mean_correct", "mean_all"):
        if cfg.target == "mean_correct":
            idx, L = idx[correct], L[correct]
        sums = reducer.sum(torch.stack([torch.bincount(idx, minlength=P).double(),
                                        torch.bincount(idx, weights=L, minlength=P)], dim=1))
        found = sums[:, 0] > 0
        agg = sums[:, 1] / sums[:, 0].clamp_min(1.0)
    elif cfg.target == "min_correct":
        agg = torch.full((P,), math.inf, dtype=torch.float64)
        agg.scatter_reduce_(0, idx[correct], L[correct], reduce="amin")
        agg = reducer.min(agg)
        found = torch.isfinite(agg)
    elif cfg.target == "sol":  # ShorterBetter: no clamp, the mean of all when none is correct
        agg = torch.full((P,), math.inf, dtype=torch.float64)
        agg.scatter_reduce_(0, idx[correct], L[correct], reduce="amin")
        agg = reducer.min(agg)
        sums = reducer.sum(torch.stack([torch.bincount(idx, minlength=P).double(),
                                        torch.bincount(idx, weights=L, minlength=P)], dim=1))
        return torch.where(torch.isfinite(agg), agg, sums[:, 1] / sums[:, 0].clamp_min(1.0))
    elif cfg.target == "median_correct":
        pairs = reducer.gather_cat(torch.stack([idx[correct].double(), L[correct]], dim=1))
        agg, found = _group_median(pairs[:, 0].long(), pairs[:, 1], P)
    else:  # validated in LeadConfig
        raise ValueError(cfg.target)

    return torch.where(found, agg.clamp(cfg.l_min, cfg.l_max), torch.full_like(agg, cfg.l_max))


def _group_median(group: torch.Tensor, values: torch.Tensor, P: int):
    """Median per group (mean of the two middle values for even counts, as numpy.median)."""
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(group[order], stable=True)]  # by group, then by value
    v = values[order]
    count = torch.bincount(group, minlength=P)
    start = torch.cumsum(count, 0) - count
    found = count > 0
    c = count.clamp_min(1)
    lo = (start + (c - 1) // 2).clamp_max(max(v.numel() - 1, 0))
    hi = (start + c // 2).clamp_max(max(v.numel() - 1, 0))
    if v.numel() == 0:
        return torch.zeros(P, dtype=torch.float64), found
    return torch.where(found, (v[lo] + v[hi]) / 2, torch.zeros(P, dtype=torch.float64)), found


# --------------------------------------------------------------------- 2. efficiency reward

def efficiency_reward(length: torch.Tensor, target: torch.Tensor, kind: str, correct: torch.Tensor | None = None,
                      group_min: torch.Tensor | None = None, group_max: torch.Tensor | None = None,
                      cfg: LeadConfig | None = None) -> torch.Tensor:
    """r_eff per rollout given each rollout's prompt target (both in tokens).

    correct: bool per rollout (kimi, l1_max); group_min / group_max: the shortest and longest
    rollout of each rollout's prompt (kimi); cfg: l1_alpha and l1_delta (l1_max)."""
    if kind == "symmetric":
        return torch.clamp(1.0 - (length - target).abs() / target, min=-1.0)
    if kind == "budget":  # free up to the budget, then -1 at twice the budget
        return torch.clamp(-(length - target).clamp_min(0.0) / target, min=-1.0)
    if kind == "none":
        return torch.zeros_like(length)
    if kind == "absolute":  # ShorterBetter, L1-Exact: minus the distance in tokens
        return -(length - target).abs()
    if kind == "kimi":  # Kimi k1.5: lambda if correct, min(0, lambda) if not; 0 if all one length
        span = group_max - group_min
        lam = torch.where(span > 0, 0.5 - (length - group_min) / span.clamp_min(1e-300), 0.0)
        return torch.where(correct, lam, lam.clamp(max=0.0))
    if kind == "l1_max":  # L1-Max: a correct answer's reward falls linearly past the budget
        return torch.where(correct, (cfg.l1_alpha * (target - length) + cfg.l1_delta).clamp(0.0, 1.0), 0.0)
    raise ValueError(kind)


# --------------------------------------------------------- per-prompt moments (one reduce)

# Columns of the per-prompt moment table: c = r_corr, e = r_eff, w = tokens, k = correct,
# x, y = DRPO's weights of correct and of wrong rollouts (zeros for other methods).
_COLS = ("n", "c", "cc", "e", "ee", "ce", "w", "wc", "we", "wcc", "wee", "wce", "k", "ke", "kee", "x", "y")
_C = {name: i for i, name in enumerate(_COLS)}


def prompt_moments(idx, c, e, w, k, P: int, reducer: GroupReducer, x=None, y=None) -> torch.Tensor:
    """[P, len(_COLS)] per-prompt sums over the whole batch (one all-reduce)."""
    X = torch.empty(len(_COLS), idx.numel(), dtype=torch.float64)  # row per column, contiguous
    X[_C["n"]].fill_(1.0)
    X[_C["c"]].copy_(c)
    torch.mul(c, c, out=X[_C["cc"]])
    X[_C["e"]].copy_(e)
    torch.mul(e, e, out=X[_C["ee"]])
    torch.mul(c, e, out=X[_C["ce"]])
    X[_C["w"]].copy_(w)
    torch.mul(w, c, out=X[_C["wc"]])
    torch.mul(w, e, out=X[_C["we"]])
    torch.mul(X[_C["wc"]], c, out=X[_C["wcc"]])
    torch.mul(X[_C["we"]], e, out=X[_C["wee"]])
    torch.mul(X[_C["wc"]], e, out=X[_C["wce"]])
    X[_C["k"]].copy_(k)
    torch.mul(X[_C["k"]], e, out=X[_C["ke"]])
    torch.mul(X[_C["ke"]], e, out=X[_C["kee"]])
    for name, v in (("x", x), ("y", y)):
        X[_C[name]].zero_() if v is None else X[_C[name]].copy_(v)
    sums = torch.zeros(len(_COLS), P, dtype=torch.float64).index_add_(1, idx, X)
    return reducer.sum(sums.t().contiguous())


# A group whose variance is below this fraction of its mean square is constant up to float64
# rounding of the sums (E[x^2] - E[x]^2 leaves ~1e-16 relative noise). Its normalised reward is
# exactly 0 in the spec ((r - mean) / (0 + 1e-6)); without the snap the rounding noise would be
# amplified 1e6-fold. Genuine reward differences are >= ~1e-5 (one token over L*), far above.
_CONSTANT_REL_VAR = 1e-14


def _mean_var(s1, s2, n, unbiased: bool):
    """Group mean and variance from sums; groups of size 1 get mean 0, std 1 (as the release).

    Returns (mean, var, constant) where `constant` flags groups whose rewards are all equal.
    """
    nn = n.clamp_min(1.0)
    mean = s1 / nn
    var = (s2 - s1 * mean).clamp_min(0.0) / ((nn - 1.0).clamp_min(1.0) if unbiased else nn)
    constant = var <= _CONSTANT_REL_VAR * (s2 / nn).abs()
    var = torch.where(constant, torch.zeros_like(var), var)
    if unbiased:
        single = n <= 1
        mean = torch.where(single, torch.zeros_like(mean), mean)
        var = torch.where(single, torch.ones_like(var), var)
        constant = constant & ~single
    return mean, var, constant


def _total_moments(mean_q: torch.Tensor, var_q: torch.Tensor):
    """Law of total variance, every prompt weighted equally: (mu, sigma)."""
    mu = mean_q.mean()
    between = ((mean_q - mu) ** 2).mean()
    return float(mu), float(torch.sqrt(var_q.mean() + between + _PSI_VAR_EPS))


def psi_statistics(M: torch.Tensor) -> tuple[float, float, float, float]:
    """(mu_corr, sigma_corr, mu_eff, sigma_eff) from the reduced moment table (spec section 6)."""
    present = M[:, _C["n"]] > 0
    if not bool(present.any()):
        return 0.0, 0.0, 0.0, 0.0
    Mp = M[present]
    m_c, v_c, _ = _mean_var(Mp[:, _C["c"]], Mp[:, _C["cc"]], Mp[:, _C["n"]], unbiased=False)
    mu_c, sigma_c = _total_moments(m_c, v_c)
    solved = Mp[:, _C["k"]] > 0
    if not bool(solved.any()):  # efficiency statistics use correct rollouts only
        return mu_c, sigma_c, 0.0, 0.0
    Ms = Mp[solved]
    m_e, v_e, _ = _mean_var(Ms[:, _C["ke"]], Ms[:, _C["kee"]], Ms[:, _C["k"]], unbiased=False)
    mu_e, sigma_e = _total_moments(m_e, v_e)
    return mu_c, sigma_c, mu_e, sigma_e


def affine_coefficients(M: torch.Tensor, w_corr: float, w_eff: float, cfg: LeadConfig):
    """Per-prompt (a, b, d) with A = a + b*r_corr + d*r_eff, the combined group-normalised advantage."""
    n, eps = M[:, _C["n"]], cfg.group_std_eps
    if cfg.normalisation == "decoupled":
        m_c, v_c, const_c = _mean_var(M[:, _C["c"]], M[:, _C["cc"]], n, unbiased=True)
        m_e, v_e, const_e = _mean_var(M[:, _C["e"]], M[:, _C["ee"]], n, unbiased=True)
        b = torch.where(const_c, 0.0, w_corr / (v_c.sqrt() + eps))
        d = torch.where(const_e, 0.0, w_eff / (v_e.sqrt() + eps))
        return -(b * m_c + d * m_e), b, d
    # combined: r = w_corr r_corr + w_eff r_eff, then one group normalisation
    s1 = w_corr * M[:, _C["c"]] + w_eff * M[:, _C["e"]]
    s2 = (w_corr ** 2 * M[:, _C["cc"]] + 2 * w_corr * w_eff * M[:, _C["ce"]] + w_eff ** 2 * M[:, _C["ee"]])
    m_r, v_r, const_r = _mean_var(s1, s2, n, unbiased=True)
    inv = torch.where(const_r, 0.0, 1.0 / (v_r.sqrt() + eps))
    return -m_r * inv, w_corr * inv, w_eff * inv


def token_whitening_moments(M: torch.Tensor, a, b, d):
    """(N tokens, mean, unbiased var) of the advantage over all response tokens, from sums."""
    S = lambda name: M[:, _C[name]]  # noqa: E731
    N = float(S("w").sum())
    s1 = float((a * S("w") + b * S("wc") + d * S("we")).sum())
    s2 = float((a * a * S("w") + b * b * S("wcc") + d * d * S("wee")
                + 2 * a * b * S("wc") + 2 * a * d * S("we") + 2 * b * d * S("wce")).sum())
    return _token_moments(N, s1, s2)


def _token_moments(N: float, s1: float, s2: float):
    if N <= 0:
        return N, 0.0, 0.0
    mean = s1 / N
    var = max(s2 - N * mean * mean, 0.0) / (N - 1.0) if N > 1 else 0.0
    return N, mean, var


def drpo_advantages(M: torch.Tensor, idx, correct, x, y, reducer: GroupReducer, L):
    """DRPO's decoupled advantages (module docstring) and their token moments (one all-reduce)."""
    n, k, X, Y = (M[:, _C[name]] for name in ("n", "k", "x", "y"))
    valid = (k > 0) & (k < n)
    pos = torch.where(valid & (X > 0), n / X.clamp_min(1e-300), 0.0).index_select(0, idx)
    neg = torch.where(valid & (Y > 0), n / Y.clamp_min(1e-300), 0.0).index_select(0, idx)
    adv = torch.where(correct, pos * x, -neg * y)
    s = reducer.sum(torch.stack([L.sum(), (L * adv).sum(), (L * adv * adv).sum()]))
    return adv, _token_moments(*(float(v) for v in s))


# ----------------------------------------------------------------------------- the driver

class AdvantageComputer:
    """Turns a shard of graded rollouts into advantages; holds the PSI state between steps."""

    def __init__(self, cfg: LeadConfig, group=None):
        cfg.validate()
        self.cfg = cfg
        self.reducer = GroupReducer(group)
        self.controller = PSIController.from_config(cfg)

    def __call__(self, shard: RolloutShard) -> LeadResult:
        cfg, idx, L, P = self.cfg, shard.prompt_index, shard.length, shard.num_prompts
        calls_before = self.reducer.calls
        correct = shard.score > cfg.correct_threshold
        r_corr = shard.score

        targets = target_lengths(shard, correct, cfg, self.reducer)
        group_min = group_max = None
        if cfg.reward == "kimi":  # the prompt's shortest and longest rollout, correct or not
            lo = torch.full((P,), math.inf, dtype=torch.float64).scatter_reduce_(0, idx, L, reduce="amin")
            hi = torch.full((P,), math.inf, dtype=torch.float64).scatter_reduce_(0, idx, -L, reduce="amin")
            lo, hi = self.reducer.min(torch.stack([lo, hi]))
            group_min, group_max = lo.index_select(0, idx), -hi.index_select(0, idx)
        r_eff = efficiency_reward(L, targets.index_select(0, idx), cfg.reward, correct, group_min, group_max, cfg)
        drpo = cfg.normalisation == "drpo"
        x = y = None
        if drpo:
            x = torch.where(correct, torch.exp((1.0 - L / cfg.l_max) / cfg.drpo_lambda), 0.0)
            s = torch.zeros_like(L) if shard.mean_logprob is None else shard.mean_logprob
            y = torch.where(correct, 0.0, torch.exp(s / cfg.drpo_tau))
        M = prompt_moments(idx, r_corr, r_eff, L, correct, P, self.reducer, x, y)

        mu_c, sigma_c, mu_e, sigma_e = psi_statistics(M)
        if cfg.weighting == "psi":
            psi = self.controller.update(mu_c, sigma_c, mu_e, sigma_e)
            w_corr, w_eff = psi["w_corr"], psi["w_eff"]
        else:
            psi = {}
            w_corr, w_eff = cfg.weights

        if drpo:
            raw, (n_tok, w_mean, w_var) = drpo_advantages(M, idx, correct, x, y, self.reducer, L)
        else:
            a, b, d = affine_coefficients(M, w_corr, w_eff, cfg)
            a_i, b_i, d_i = torch.stack([a, b, d]).index_select(1, idx)
            raw = a_i + b_i * r_corr + d_i * r_eff
            n_tok, w_mean, w_var = token_whitening_moments(M, a, b, d)
        adv = (raw - w_mean) / math.sqrt(w_var + cfg.whiten_eps) if cfg.whiten else raw

        metrics = self._metrics(M, targets, mu_c, sigma_c, mu_e, sigma_e, w_corr, w_eff, psi,
                                n_tok, w_mean, w_var)
        metrics["lead/collectives"] = float(self.reducer.calls - calls_before)
        return LeadResult(advantages=adv, unwhitened=raw, corr_reward=r_corr, eff_reward=r_eff,
                          targets=targets, w_corr=w_corr, w_eff=w_eff, metrics=metrics)

    def _metrics(self, M, targets, mu_c, sigma_c, mu_e, sigma_e, w_corr, w_eff, psi, n_tok, w_mean, w_var):
        present = M[:, _C["n"]] > 0
        n = float(M[:, _C["n"]].sum())
        n_k = float(M[:, _C["k"]].sum())
        solved = (M[:, _C["k"]] > 0) & present
        out = {
            "lead/w_corr": w_corr, "lead/w_eff": w_eff,
            "lead/mu_corr": mu_c, "lead/sigma_corr": sigma_c, "lead/mu_eff": mu_e, "lead/sigma_eff": sigma_e,
            "lead/accuracy": n_k / n if n else 0.0,
            "lead/solved_prompts": float(solved.sum()) / max(int(present.sum()), 1),
            "lead/target_mean": float(targets[present].mean()) if bool(present.any()) else 0.0,
            "lead/target_mean_solved": float(targets[solved].mean()) if bool(solved.any()) else 0.0,
            "lead/response_len_mean": float(M[:, _C["w"]].sum()) / n if n else 0.0,
            "lead/eff_reward_mean": float(M[:, _C["e"]].sum()) / n if n else 0.0,
            "lead/response_tokens": n_tok,
            "lead/whiten_mean": w_mean, "lead/whiten_std": math.sqrt(w_var),
        }
        out.update({f"lead/psi_{k}": v for k, v in psi.items() if k not in ("w_corr", "w_eff")})
        return out

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
