"""`megatron-lead train` end to end on CPU: a tiny random Qwen2, real vLLM replicas, the real grader.

One module fixture runs the trainer in every layout the issue names and the tests read the run
folders (six launches; a resume is a new launch, as a user's):
    A  1 rank, 4 steps                      the baseline
    C  --nproc 2 (DP=2), 2 steps, then      DP=2 equals DP=1 (controller weights, losses); exact
       --resume to 4                        resume (fp32 CPU: identical metrics to T)
    T  two torchrun "nodes" of 1 rank,      multi-node equals one node (C) exactly; T also moves
       4 steps, uninterrupted               its gradients, optimizer state and weights to host
                                            memory around generation (rollout.offload_*), C not;
                                            T's output has vLLM's warnings but no traceback
    D  TP=2, 2 steps, then resumed at       resume at another layout, and PP=2 matches one rank
       TP=1 x PP=2 to 4
A, C and T validate greedily on 4 prompts before the run, after step 2 and at the end.
The random model answers nothing correctly, so every reward comes from lengths; that is enough
for the mechanics: LEAD's efficiency weights, advantages and updates are all non-trivial.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_lead.launch import free_port, run_local
from rollout_tiny import save_tiny_qwen2
from tiny_tokenizer import save_tiny_tokenizer

pytestmark = pytest.mark.slow

P, G, STEPS = 4, 4, 4
# Keys whose values are wall times or throughputs: they differ between any two runs.
NOISY = ("time/", "perf/", "rollout/sync_seconds", "rollout/sync_gb_per_s", "rollout/generate_seconds",
         "lead/compute_fraction")


def _overrides(root, run: str, **extra) -> list[str]:
    base = {
        "run_dir": os.path.join(root, run), "model.path": os.path.join(root, "model"),
        "data.train_path": os.path.join(root, "train.jsonl"), "data.instruction": " Box it.",
        "data.max_prompt_len": 64, "data.prompts_per_step": P, "rollout.n": G,
        "rollout.max_response_len": 12, "rollout.dtype": "float32", "rollout.enforce_eager": True,
        "rollout.kv_cache_memory_bytes": 16 << 20, "rollout.temperature": 0.9,
        "ppo.steps": STEPS, "ppo.mini_batch_prompts": 2, "ppo.micro_batch_size": 2,
        "lead.l_min": 2, "optim.lr": 1e-3, "optim.weight_decay": 0.0, "grading.workers": 1,
        "checkpoint.every": 2, "checkpoint.keep_last": 2, "validation.every": 0,
        "logging.progress": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train(rank, world, overrides, resume, max_steps):
    from megatron_lead.trainer.config import load_config
    from megatron_lead.trainer.loop import train

    return train(load_config(None, overrides), resume=resume, max_steps=max_steps)


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _quiet(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith(NOISY)}


def _torchrun_two_nodes(root, overrides) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lead-test",
           "-m", "megatron_lead.cli", "train"] + overrides
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    # A normal run prints no traceback: vLLM's chat-template warm-up (the engine has no tokenizer)
    # and "Failed to load weights" for layers a checkpoint never carries are filtered at their
    # source, and nothing else of vLLM's logging is (its warnings still reach the output).
    for out in outs:
        assert re.search(r"WARNING \d\d-\d\d [\d:]+ \[\w+\.py:\d+\]", out), out[-3000:]
        assert "Traceback" not in out, out[out.index("Traceback") - 500:][:3000]
        assert "Failed to load weights" not in out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("trainer"))
    save_tiny_qwen2(os.path.join(root, "model"), seed=0)
    save_tiny_tokenizer(os.path.join(root, "model"))
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for i in range(10):
            f.write(json.dumps({"problem": f"{i} + {i + 1} = ?", "answer": str(2 * i + 1)}) + "\n")
    out = {"root": root}
    val = {"data.val_path": os.path.join(root, "train.jsonl"), "validation.every": 2,
           "validation.max_prompts": 4}
    out["A"] = run_local(_train, 1, _overrides(root, "A", **val), False, None)[0]
    run_local(_train, 2, _overrides(root, "C", **val), False, 2)
    out["C_first_half"] = _metrics(os.path.join(root, "C"))
    run_local(_train, 2, _overrides(root, "C", **val), True, None)
    _torchrun_two_nodes(root, _overrides(root, "T", **val, **{"rollout.offload_train_state": True,
                                                               "rollout.offload_weights": True}))
    run_local(_train, 2, _overrides(root, "D", **{"parallel.tensor_model_parallel_size": 2}), False, 2)
    out["D_first_half"] = _metrics(os.path.join(root, "D"))
    run_local(_train, 2, _overrides(root, "D", **{"parallel.pipeline_model_parallel_size": 2}), True, None)
    return out


def yaml_value(root, run: str, key: str):
    import yaml

    with open(os.path.join(root, run, "config.yaml")) as f:
        return yaml.safe_load(f)["rollout"][key]


def _close(a: dict, b: dict, keys, rel=1e-4, abs_=1e-6):
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=rel, abs=abs_), k


def test_single_rank_run_trains_and_logs(runs):
    run_dir = os.path.join(runs["root"], "A")
    m = _metrics(run_dir)
    assert [x["step"] for x in m] == list(range(STEPS))
    for x in m:
        assert math.isfinite(x["train/loss"]) and x["train/updates"] == 2  # 2 mini-batches per step
        # vLLM sampled from the policy's current weights at every step (they change every step).
        assert 0 < x["rollout/logprob_diff"] < 1e-3
        assert x["rollout/generated_sequences"] == P * G  # nothing generated twice or dropped
        assert x["train/grad_norm"] > 0 and x["train/skipped_updates"] == 0
        # Old log-probs come from the update's own micro-batches: its first ratio is exactly 1.
        assert x["train/first_update_ppo_kl"] == 0.0 and x["train/first_update_clip_frac"] == 0.0
        assert not any(k.startswith("memory/") for k in x)  # GPU only
        assert x.get("grader/no_boxed", 0) + x.get("grader/truncated", 0) == P * G
        for key in ("lead/w_corr", "lead/w_eff", "lead/psi_w_corr_ema", "lead/psi_cv_eff", "lead/psi_phi_eff",
                    "lead/target_mean", "lead/target_std", "adv/std", "response/length_p90", "train/entropy",
                    "train/kl_ref", "train/clip_frac", "train/lr", "rollout/sync_bytes",
                    "time/rollout_seconds", "time/train_seconds", "perf/generated_tokens_per_second"):
            assert key in x, key
    # The PSI controller moves the weights, and the policy moved: KL to the reference grows.
    assert m[0]["lead/w_eff"] != m[-1]["lead/w_eff"]
    assert 0.0 < m[0]["train/kl_ref"] < m[-1]["train/kl_ref"]
    # TensorBoard files, the final HF export, the summary.
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "tensorboard")))
    assert os.path.isfile(os.path.join(run_dir, "hf", "config.json"))
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["steps_done"] == STEPS and summary["data"]["loaded"] == 10
    assert summary == runs["A"]
    # Validation: before the run (logged with step 0), after step 2, and at the end.
    assert m[0]["val_before/count"] == 4 and m[1]["val/count"] == 4 and summary["after"]["count"] == 4
    assert "val/count" not in m[0] and "val/count" not in m[2]
    for x in (summary["before"], summary["after"]):
        assert 0 < x["mean_length"] <= 12 and x["accuracy"] == 0.0
    # The exported weights differ from the start: the updates reached the policy.
    from safetensors.torch import load_file

    start = load_file(os.path.join(runs["root"], "model", "model.safetensors"))
    end = {}
    for f in os.listdir(os.path.join(run_dir, "hf")):
        if f.endswith(".safetensors"):
            end.update(load_file(os.path.join(run_dir, "hf", f)))
    assert any(not torch.equal(start[k], end[k]) for k in start if k in end)
    # Checkpoints: the last 2 complete ones are kept.
    ckpts = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert ckpts == ["step_00000002", "step_00000004"]


def test_exact_resume(runs):
    """C stopped after step 2 and resumed (a new launch) logs what uninterrupted T logs."""
    c, t = _metrics(os.path.join(runs["root"], "C")), _metrics(os.path.join(runs["root"], "T"))
    assert [x["step"] for x in c] == list(range(STEPS))  # no step repeated or lost in the log
    assert len(runs["C_first_half"]) == 2 and len(t) == STEPS
    assert c[0]["val_before/count"] == 4 and c[1]["val/count"] == 4
    for x, y in zip(c[2:], t[2:]):
        assert _quiet(x) == _quiet(y), x["step"]
    summaries = [json.load(open(os.path.join(runs["root"], r, "summary.json"))) for r in ("C", "T")]
    assert summaries[0]["after"] == summaries[1]["after"] and summaries[0]["steps_done"] == STEPS


def test_data_parallel_equals_single_rank(runs):
    a, c = _metrics(os.path.join(runs["root"], "A")), runs["C_first_half"]
    for x, y in zip(a[:2], c):
        assert x["rollout/generated_sequences"] == y["rollout/generated_sequences"]
        _close(x, y, ["lead/w_corr", "lead/w_eff", "lead/psi_w_corr_ema", "lead/target_mean", "train/loss",
                      "train/pg_loss", "train/grad_norm", "response/length_mean", "adv/std"])


def test_two_nodes_equal_one_node(runs):
    """And the offload round trip (T) changes nothing (C has none)."""
    c, t = runs["C_first_half"], _metrics(os.path.join(runs["root"], "T"))
    assert yaml_value(runs["root"], "T", "offload_weights") is True
    assert yaml_value(runs["root"], "C", "offload_train_state") is None
    for x, y in zip(c, t[:2]):
        assert _quiet(x) == _quiet(y)


def test_tensor_and_pipeline_parallel_match_single_rank(runs):
    """D's first half ran at TP=2, its second at TP=1 x PP=2: each step matches one rank's."""
    a, d = _metrics(os.path.join(runs["root"], "A")), _metrics(os.path.join(runs["root"], "D"))
    assert len(runs["D_first_half"]) == 2 and len(d) == STEPS
    for x, y in zip(a, runs["D_first_half"] + d[2:]):
        assert 0 < y["rollout/logprob_diff"] < 1e-3
        _close(x, y, ["lead/w_eff", "train/loss", "train/grad_norm", "response/length_mean"])


def test_resume_at_another_layout(runs):
    a, d = _metrics(os.path.join(runs["root"], "A")), _metrics(os.path.join(runs["root"], "D"))
    assert [x["step"] for x in d] == list(range(STEPS))
    for x, y in zip(a[2:], d[2:]):  # saved at TP=2 after step 2, continued at TP=1 x PP=2
        _close(x, y, ["lead/w_eff", "lead/psi_w_corr_ema", "train/loss", "train/grad_norm",
                      "response/length_mean"])
