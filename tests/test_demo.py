"""The main job's pieces: the SFT warm start through Megatron, its cache, the report, and
`megatron-lead demo` wired end to end at a toy size (a few SFT and RL steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_lead import cli
from megatron_lead.eval.report import change, table

BEFORE = {"accuracy": 0.5, "mean_length": 100.0, "count": 4,
          "levels": {"1": {"accuracy": 1.0, "mean_length": 40.0, "count": 2},
                     "6": {"accuracy": 0.0, "mean_length": 160.0, "count": 2}}}
AFTER = {"accuracy": 0.75, "mean_length": 60.0, "count": 4,
         "levels": {"1": {"accuracy": 1.0, "mean_length": 20.0, "count": 2},
                    "6": {"accuracy": 0.5, "mean_length": 100.0, "count": 2}}}


def test_report_table_by_hand():
    lines = table(BEFORE, AFTER).splitlines()
    assert lines[0].split() == ["level", "n", "acc", "before", "acc", "after", "len", "before", "len", "after",
                                "len", "change"]
    assert lines[2].split() == ["1", "2", "100.0%", "100.0%", "40.0", "20.0", "-50.0%"]
    assert lines[3].split() == ["6", "2", "0.0%", "50.0%", "160.0", "100.0", "-37.5%"]
    assert lines[4].split() == ["all", "4", "50.0%", "75.0%", "100.0", "60.0", "-40.0%"]
    assert change(0.0, 5.0) == 0.0


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from megatron_lead.data import arith

    root = tmp_path_factory.mktemp("demo")
    rows = [json.loads(line) for line in open(arith.write_splits(str(root / "data"), train_per_level=40)["train"])]
    small = root / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows if r["level"] <= 2))
    arith.save_task_tokenizer(str(root / "tok"))
    config = {**arith.qwen2_config(), "num_hidden_layers": 2}
    (root / "config.json").write_text(json.dumps(config))
    return root


def _sft(rank, world, cfg):
    from megatron_lead.trainer.sft import run_sft

    return run_sft(cfg, progress=False)


@pytest.mark.slow
def test_sft_learns_exports_and_caches(task, capsys):
    import transformers

    from megatron_lead.launch import run_local
    from megatron_lead.trainer.sft import SFTConfig, is_done

    cfg = SFTConfig(data=str(task / "small.jsonl"), tokenizer=str(task / "tok"), out=str(task / "model"),
                    model_config=str(task / "config.json"), steps=40, batch_size=16, micro_batch_size=8,
                    lr=3e-3, warmup_steps=5)
    assert not is_done(cfg)
    result = run_local(_sft, 1, cfg)[0]
    # From ln(42) = 3.74 (uniform over the vocabulary) to well below it.
    assert result["first_loss"] > 3.0 and result["final_loss"] < 0.6 * result["first_loss"]
    assert is_done(cfg) and not is_done(SFTConfig(**{**vars(cfg), "steps": 41}))

    # An ordinary HF folder: transformers loads it and its loss on the training text is the
    # one Megatron reached (same weights, an independent implementation).
    tok = transformers.AutoTokenizer.from_pretrained(cfg.out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(cfg.out, torch_dtype=torch.float32).eval()
    rows = [json.loads(line) for line in open(cfg.data)][:32]
    nll = count = 0.0
    with torch.no_grad():
        for row in rows:
            p = tok(row["problem"], add_special_tokens=False)["input_ids"]
            ids = p + tok(row["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logp = hf(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            target = torch.tensor(ids[1:])
            token_logp = logp.gather(-1, target[:, None])[:, 0][len(p) - 1:]
            nll -= float(token_logp.sum())
            count += len(token_logp)
    assert nll / count < 0.6 * result["first_loss"]

    # The command skips a finished run with the same inputs and settings.
    argv = ["sft", "--data", cfg.data, "--tokenizer", cfg.tokenizer, "--out", cfg.out, "--model-config",
            cfg.model_config, "--steps", "40", "--batch-size", "16", "--micro-batch-size", "8",
            "--warmup-steps", "5"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "already holds this run" in capsys.readouterr().out


def _sft_weights(rank, world, cfg):
    from megatron_lead.policy.convert.hf_io import iter_hf_folder
    from megatron_lead.trainer.sft import run_sft

    result = run_sft(cfg, progress=False)
    return result, {name: t.clone() for name, t in iter_hf_folder(cfg.out)}


@pytest.mark.slow
def test_packed_sft_takes_the_padded_steps(task):
    """Packing the rows back to back (no padding, attention kept within each row, several packs
    per step) must give the same updates as right-padded micro-batches: the loss is a token sum
    over the step's global token count either way."""
    from megatron_lead.launch import run_local
    from megatron_lead.trainer.sft import SFTConfig

    base = dict(data=str(task / "small.jsonl"), tokenizer=str(task / "tok"), model_config=str(task / "config.json"),
                steps=4, batch_size=12, micro_batch_size=4, lr=3e-3, warmup_steps=1)
    padded, w_pad = run_local(_sft_weights, 1, SFTConfig(out=str(task / "padded"), **base))[0]
    packed, w_pack = run_local(_sft_weights, 1, SFTConfig(out=str(task / "packed"), pack_max_tokens=150, **base))[0]
    assert packed["first_loss"] == pytest.approx(padded["first_loss"], rel=1e-5)
    assert packed["final_loss"] == pytest.approx(padded["final_loss"], rel=1e-4)
    assert w_pad.keys() == w_pack.keys()
    for name in w_pad:
        torch.testing.assert_close(w_pack[name], w_pad[name], atol=2e-5, rtol=1e-4, msg=name)


def _megatron_lead(*argv) -> subprocess.CompletedProcess:
    """The console command in its own process, as a user runs it (the trainer's process group,
    Megatron's state and vLLM stay out of the test process)."""
    return subprocess.run([sys.executable, "-m", "megatron_lead.cli", *argv], capture_output=True, text=True,
                          timeout=1200)


@pytest.mark.slow
def test_demo_end_to_end_at_toy_size(tmp_path):
    out, warm = tmp_path / "run", tmp_path / "warm"
    argv = ["demo", "--out", str(out), "--warmstart", str(warm), "--sft-steps", "3",
            "data.prompts_per_step=4", "rollout.n=2", "ppo.steps=2", "ppo.mini_batch_prompts=4",
            "ppo.micro_batch_size=8", "rollout.max_response_len=48", "lead.l_min=8",
            "validation.max_prompts=12", "grading.workers=1", "logging.progress=false"]
    done = _megatron_lead(*argv)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))
    for block in ("before", "after"):
        assert set(summary[block]) >= {"accuracy", "mean_length", "levels"}
        assert summary[block]["count"] == 12
        # validation.max_prompts keeps problems spread over the level-sorted file, not its head
        assert set(summary[block]["levels"]) == set("123456")
    assert "held-out split" in done.stdout and "len change" in done.stdout
    # The sampled evaluation (temperature 1, 4 per problem) is printed first, greedy beside it.
    assert done.stdout.index("sampled (temperature 1, 4 per problem)") < done.stdout.index("greedy decoding")
    for block in ("before", "after"):
        assert summary["sampled"][block]["count"] == 48 and set(summary["sampled"][block]["levels"]) == set("123456")
    assert open(out / "report.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(out / "hf" / "config.json") and os.path.isfile(out / "metrics.jsonl")
    assert any(f.startswith("events.out") for f in os.listdir(out / "tensorboard"))
    assert "RL (LEAD)" in done.stdout
    # A second run reuses the warm start; every output names the method that ran.
    # (fewer held-out problems and one sample each: this run checks names and the cache only)
    again = _megatron_lead(*argv, "lead.method=grpo", "validation.max_prompts=6", "--eval-n", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "warm start: cached" in again.stdout
    assert "RL (grpo)" in again.stdout and "before and after RL (grpo)" in again.stdout
    assert "LEAD" not in again.stdout.split("warm start: cached")[1]
