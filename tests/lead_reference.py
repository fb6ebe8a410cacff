"""A deliberately naive LEAD, written straight from LEAD_SPEC.md with Python lists and loops.

The tests compare megatron_lead.lead (vectorised, moment-based, all-reduced) against this. It
shares no code with the package: whitening here expands every rollout into its tokens.
"""

from __future__ import annotations

import math
import statistics


def target(lengths, correct, how="mean_correct", l_min=1000.0, l_max=8000.0, global_target=4000.0):
    if how == "global":
        return global_target
    pool = list(lengths) if how == "mean_all" else [n for n, c in zip(lengths, correct) if c > 0.5]
    if not pool:
        return l_max
    agg = {"mean_correct": statistics.fmean, "mean_all": statistics.fmean,
           "min_correct": min, "median_correct": statistics.median}[how](pool)
    return min(max(agg, l_min), l_max)


def r_eff(n, t, kind="symmetric"):
    if kind == "symmetric":
        return max(-1.0, 1.0 - abs(n - t) / t)
    if kind == "budget":
        return max(-1.0, -max(n - t, 0.0) / t)
    return 0.0


def group_norm(values):
    if len(values) == 1:
        mean, std = 0.0, 1.0
    else:
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return [(v - mean) / (std + 1e-6) for v in values]


def pop_stats(groups):
    """Law of total variance over groups (each a list), every group weighted equally."""
    means = [sum(g) / len(g) for g in groups]
    variances = [sum((v - m) ** 2 for v in g) / len(g) for g, m in zip(groups, means)]
    mu = sum(means) / len(means)
    between = sum((m - mu) ** 2 for m in means) / len(means)
    return mu, math.sqrt(sum(variances) / len(variances) + between + 1e-8)


class NaivePSI:
    def __init__(self, beta=0.95, lambda_min=0.3, alpha=1.0, eps=1e-8):
        self.beta, self.lambda_min, self.alpha, self.eps = beta, lambda_min, alpha, eps
        self.w = [0.5, 0.5]

    def step(self, mu_c, s_c, mu_e, s_e):
        eps = self.eps
        cv = [s_c / (abs(mu_c) + eps), s_e / (abs(mu_e) + eps)]
        cvn = [x / (cv[0] + cv[1] + eps) for x in cv]
        phi = [(1 - min(max(mu_c, 0), 1)) ** self.alpha, (1 - (min(max(mu_e, -1), 1) + 1) / 2) ** self.alpha]
        d = [cvn[0] * phi[0], cvn[1] * phi[1]]
        tgt = [d[0] / (d[0] + d[1] + eps), d[1] / (d[0] + d[1] + eps)]
        self.w = [self.beta * self.w[k] + (1 - self.beta) * tgt[k] for k in range(2)]
        wc = max(self.w[0], self.lambda_min)
        return wc, 1 - wc


def lead_step(prompts, psi: NaivePSI | None, how="mean_correct", reward="symmetric",
              normalisation="decoupled", static_w_corr=0.5, whiten=True, **target_kw):
    """prompts: list of (lengths, correct). Returns (w_corr, w_eff, targets, advantages per prompt)."""
    targets = [target(ls, cs, how, **target_kw) for ls, cs in prompts]
    effs = [[r_eff(n, t, reward) for n in ls] for (ls, _), t in zip(prompts, targets)]
    corrs = [[float(c) for c in cs] for _, cs in prompts]

    if psi is not None:
        mu_c, s_c = pop_stats(corrs)
        eff_correct = [[e for e, c in zip(es, cs) if c > 0.5] for es, cs in zip(effs, corrs)]
        eff_correct = [g for g in eff_correct if g]
        mu_e, s_e = pop_stats(eff_correct) if eff_correct else (0.0, 0.0)
        w_c, w_e = psi.step(mu_c, s_c, mu_e, s_e)
    else:
        w_c, w_e = static_w_corr, 1 - static_w_corr

    advs = []
    for cs, es in zip(corrs, effs):
        if normalisation == "decoupled":
            ac, ae = group_norm(cs), group_norm(es)
            advs.append([w_c * x + w_e * y for x, y in zip(ac, ae)])
        else:
            advs.append(group_norm([w_c * x + w_e * y for x, y in zip(cs, es)]))

    if whiten:
        tokens = [a for (ls, _), ap in zip(prompts, advs) for n, a in zip(ls, ap) for _ in range(int(n))]
        N = len(tokens)
        mean = sum(tokens) / N if N else 0.0
        var = sum((t - mean) ** 2 for t in tokens) / (N - 1) if N > 1 else 0.0
        advs = [[(a - mean) / math.sqrt(var + 1e-8) for a in ap] for ap in advs]
    return w_c, w_e, targets, advs
