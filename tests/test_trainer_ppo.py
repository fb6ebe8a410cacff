"""The PPO phase in bf16: old log-probs on the update's own micro-batches make the first update's
ratio exactly 1 (ppo_kl and clip_frac exactly 0), padded and packed; over the whole batch's
width (where they were computed before) they would not be.

One process, a tiny Qwen2 in bf16 with Megatron's mixed-precision optimizer (fp32 main params),
eight rollouts of uneven lengths in two mini-batches.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lead.launch import run_local
from rollout_tiny import save_tiny_qwen2

pytestmark = pytest.mark.slow

# (prompt length, response length): the first mini-batch's rows are much shorter than the batch's widest.
ROWS = [(4, 3), (6, 5), (3, 2), (5, 6), (4, 30), (7, 22), (3, 25), (6, 28)]


def _batch():
    from megatron_lead.rollout.engine import Rollout
    from megatron_lead.rollout.step import RolloutBatch, pack_rollouts

    g = torch.Generator().manual_seed(0)
    rollouts = [Rollout(prompt_index=i // 2, prompt_ids=torch.randint(0, 250, (p,), generator=g).tolist(),
                        response_ids=torch.randint(0, 250, (n,), generator=g).tolist(),
                        logprobs=(-3.0 - torch.rand(n, generator=g)).tolist(), finish_reason="stop")
                for i, (p, n) in enumerate(ROWS)]
    return RolloutBatch(rollouts=rollouts, rows=list(range(len(rollouts))), all_rollouts=rollouts,
                        **pack_rollouts(rollouts, pad_id=0))


def _phase(rank, world, hf_dir):
    from megatron_lead.policy.convert.checkpoint import load_hf_weights
    from megatron_lead.policy.loss import LossConfig
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.optim import OptimConfig, build_optimizer, wrap_ddp
    from megatron_lead.policy.parallel import init_parallel
    from megatron_lead.policy.train_step import forward_logprobs, make_micro_batches
    from megatron_lead.trainer.ppo import mini_batches, old_logprob_pass, ppo_update

    init_parallel(1, 1)
    cfg = OptimConfig(lr=1e-2, bf16=True)
    model = build_model(hf_dir, dtype=torch.bfloat16, init_weights=False)
    load_hf_weights(model, hf_dir)
    model = wrap_ddp(model, cfg)
    optimizer, scheduler = build_optimizer(model, cfg)
    batch = _batch()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 1.5, -1.5])
    out = {}
    for pack in (False, True):
        batches = mini_batches(batch, advantages, num_mini_batches=2, micro_batch_size=2, pack=pack)
        diff = old_logprob_pass(model, batches, temperature=1.0)
        # Control: the first mini-batch's log-probs computed over the whole batch's width instead.
        wide = forward_logprobs(model, make_micro_batches(2, False, 0, tokens=batch.tokens[:4],
                                                          response_mask=batch.response_mask[:4],
                                                          advantages=torch.zeros(4)))
        width = batches[0][0].tokens.size(1) if not pack else None
        cut = torch.cat([mb.old_logprobs for mb in batches[0]]) if not pack else None
        metrics = ppo_update(model, optimizer, scheduler, batches, LossConfig(kl_coef=0.0), epochs=1)
        out[pack] = dict(metrics=metrics, diff=diff, width=width, full_width=batch.tokens.size(1),
                         wide=torch.cat(wide)[:, :width] if not pack else None, cut=cut,
                         dtype=str(next(model[0].parameters()).dtype))
    return out


@pytest.fixture(scope="module")
def phase(tmp_path_factory):
    hf_dir = save_tiny_qwen2(tmp_path_factory.mktemp("ppo") / "hf", seed=0)
    return run_local(_phase, 1, hf_dir)[0]


@pytest.mark.parametrize("pack", [False, True])
def test_first_update_ratio_is_exactly_one_in_bf16(phase, pack):
    r = phase[pack]
    m = r["metrics"]
    print(pack, {k: m[k] for k in ("train/first_update_ppo_kl", "train/first_update_clip_frac", "train/ppo_kl",
                                   "train/clip_frac")}, r["diff"])
    assert r["dtype"] == "torch.bfloat16"
    assert m["train/first_update_ppo_kl"] == 0.0 and m["train/first_update_clip_frac"] == 0.0
    # The second update runs after the first changed the weights (lr 1e-2): its ratio moved.
    assert m["train/ppo_kl"] > 0.0 and m["train/updates"] == 2.0
    assert m["train/skipped_updates"] == 0.0
    # The rollout/trainer gap is measured on the same passes (vLLM's log-probs here are made up).
    assert r["diff"]["rollout/logprob_diff"] > 1.0


def test_the_whole_batch_width_rounds_differently(phase):
    """Why the pass moved: in bf16 the same rows over the batch's full width give other log-probs."""
    r = phase[False]
    assert r["width"] < r["full_width"]
    mask = _batch().response_mask[:4, :r["width"]]
    assert not torch.equal(r["wide"][mask], r["cut"][mask])
