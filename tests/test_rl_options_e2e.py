"""Issue 20's options through `megatron-lead train` (the step loop, vLLM, the grader): one run on CPU
with every option on, on the tiny random Qwen2 of test_trainer_e2e.

The random model answers nothing correctly, so every group is all wrong: group filtering keeps a
group only while its efficiency reward varies (its lengths differ: some rollouts stop early,
most run into the 12-token cap), refills with a second round of prompts when fewer than P groups
are kept, and trains whole mini-batches of the kept ones. vLLM and Megatron both run in fp32
here, so the rollout correction's ratios sit at 1 (nothing clipped or masked).
"""

from __future__ import annotations

import json
import math
import os

import pytest

from megatron_lead.launch import run_local
from rollout_tiny import save_tiny_qwen2
from tiny_tokenizer import save_tiny_tokenizer

pytestmark = pytest.mark.slow

P, G, STEPS, MAX_LEN = 4, 4, 2, 12


def _train(rank, world, overrides):
    from megatron_lead.trainer.config import load_config
    from megatron_lead.trainer.loop import train

    return train(load_config(None, overrides))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rl_options_e2e"))
    save_tiny_qwen2(os.path.join(root, "model"), seed=0)
    save_tiny_tokenizer(os.path.join(root, "model"))
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for i in range(10):
            f.write(json.dumps({"problem": f"{i} + {i + 1} = ?", "answer": str(2 * i + 1)}) + "\n")
    overrides = {
        "run_dir": os.path.join(root, "run"), "model.path": os.path.join(root, "model"),
        "data.train_path": os.path.join(root, "train.jsonl"), "data.instruction": " Box it.",
        "data.max_prompt_len": 64, "data.prompts_per_step": P, "rollout.n": G,
        "rollout.max_response_len": MAX_LEN, "rollout.dtype": "float32", "rollout.enforce_eager": True,
        "rollout.kv_cache_memory_bytes": 16 << 20, "rollout.temperature": 0.9,
        "ppo.steps": STEPS, "ppo.mini_batch_prompts": 1, "ppo.micro_batch_size": 2, "ppo.pack_sequences": True,
        "lead.l_min": 2, "optim.lr": 1e-3, "optim.weight_decay": 0.0, "grading.workers": 1,
        "checkpoint.every": 0, "validation.every": 0, "logging.progress": False,
        "rollout.filter_groups": True, "rollout.refill_max_rounds": 1,
        "loss.agg_mode": "seq_mean_token_mean", "loss.rollout_tis_cap": 2.0, "loss.rollout_seq_mask": 1.5,
        "loss.overlong_buffer": 4, "loss.mask_truncated": True,
    }
    summary = run_local(_train, 1, [f"{k}={v}" for k, v in overrides.items()])[0]
    with open(os.path.join(root, "run", "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return dict(summary=summary, metrics=metrics)


def test_every_option_runs_through_the_trainer(run):
    m = run["metrics"]
    assert [x["step"] for x in m] == list(range(STEPS)) and run["summary"]["steps_done"] == STEPS
    for x in m:
        rounds = x["filter/rounds"]
        assert rounds in (1.0, 2.0)
        # A second round only when the first kept fewer than P groups; it samples P new prompts.
        assert x["filter/groups"] == rounds * P and x["rollout/generated_sequences"] == rounds * P * G
        assert x["filter/dropped_all_correct"] == 0.0  # nothing is ever correct here
        assert x["filter/kept"] == x["filter/kept_for_efficiency"] == x["filter/groups"] - x["filter/dropped_all_wrong"]
        assert x["filter/trained"] == min(x["filter/kept"], P) == x["train/updates"]  # 1 group per update
        assert x["filter/unused"] == x["filter/kept"] - x["filter/trained"]
        # Overlong shaping over every sampled rollout: the truncated ones (12 tokens) get -1.
        assert x["overlong/penalized_frac"] >= x["response/truncated_frac"] > 0
        assert -1.0 <= x["overlong/penalty_mean"] <= -x["response/truncated_frac"]
        assert 0 <= x["overlong/masked_frac"] <= 1
        assert x["train/empty_updates"] == 0.0  # a kept group has a rollout that stopped: not all masked
        if x["train/updates"]:
            # fp32 engine and trainer: ratios at 1, nothing clipped or masked.
            assert abs(x["rollout_corr/token_ratio_mean"] - 1) < 1e-3 and x["rollout_corr/tis_clipped_frac"] == 0.0
            assert x["rollout_corr/seq_masked_frac"] == 0.0
            assert math.isfinite(x["train/loss"]) and x["train/grad_norm"] > 0 and x["train/tokens"] > 0
        else:  # no group kept: the step trains nothing and the run goes on
            assert x["train/tokens"] == 0.0 and x["filter/kept"] == 0.0
    # This seed exercises both: a refilled step that trains, and a step with nothing to train.
    assert any(x["filter/rounds"] == 2.0 and x["train/updates"] > 0 for x in m)
    assert any(x["train/updates"] == 0.0 for x in m)
