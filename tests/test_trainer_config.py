"""The trainer's configuration: YAML + dotted overrides, --print-config, and one-line errors naming
the key for every bad setting the trainer must refuse before anything heavy starts."""

from __future__ import annotations

import json

import pytest
import yaml

from megatron_lead import cli
from megatron_lead.trainer.config import load_config


@pytest.fixture
def paths(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(_QWEN2))
    data = tmp_path / "train.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    return {"model.path": str(model), "data.train_path": str(data)}


_QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 256, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def test_what_a_family_cannot_do_is_refused_before_anything_starts(paths):
    """A Mistral window shorter than prompt + response, a MoE update at TP > 1, another
    architecture: one line naming the key, at validate() (tests/test_families*.py cover the model)."""
    import os

    config = os.path.join(paths["model.path"], "config.json")
    cases = [({**_QWEN2, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 512},
              {}, "data.max_prompt_len + rollout.max_response_len of 9024 tokens is longer than this mistral "
                  "model's sliding_window=512"),
             ({**_QWEN2, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4,
               "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
              {"parallel.tensor_model_parallel_size": 2},
              "parallel.tensor_model_parallel_size=2: a mixture-of-experts model trains at TP=1"),
             ({**_QWEN2, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, {}, "GPT2LMHeadModel")]
    for hf, extra, message in cases:
        with open(config, "w") as f:
            json.dump(hf, f)
        with pytest.raises(ValueError) as err:
            load_config(None, _args(paths, **extra)).validate(world_size=2)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    # The same Mistral within its window, and the MoE at TP=1, pass.
    with open(config, "w") as f:
        json.dump(cases[0][0], f)
    load_config(None, _args(paths, **{"rollout.max_response_len": 400, "data.max_prompt_len": 100,
                                      "lead.l_min": 100})).validate(1)
    with open(config, "w") as f:
        json.dump(cases[1][0], f)
    load_config(None, _args(paths)).validate(world_size=2)


def _args(paths, **extra):
    return [f"{k}={v}" for k, v in {**paths, **extra}.items()]


def test_yaml_then_overrides_then_derived_values(tmp_path, paths):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"seed": 3, "rollout": {"n": 4, "temperature": 0.7, "max_response_len": 512},
                                    "lead": {"method": "grpo", "l_min": 64}, "optim": {"lr": 1e-5}}))
    cfg = load_config(str(path), _args(paths, **{"optim.lr": "2e-6", "ppo.steps": 10, "data.val_path": "null"}))
    assert (cfg.seed, cfg.rollout.n, cfg.optim.lr, cfg.ppo.steps, cfg.data.val_path) == (3, 4, 2e-6, 10, None)
    # lead.method picks the preset (GRPO: no efficiency reward, no whitening as in the release);
    # lead.l_max follows the response budget and loss.temperature the sampling temperature.
    assert (cfg.lead.method, cfg.lead.reward, cfg.lead.l_min, cfg.lead.l_max) == ("grpo", "none", 64, 512.0)
    assert cfg.loss.temperature == 0.7
    # 128 prompts / 16 per mini-batch = 8 updates per step: the lr schedule spans all of them.
    assert cfg.optim.total_steps == 10 * 8
    cfg.validate(world_size=4)


@pytest.mark.parametrize("extra, world, message", [
    ({"parallel.tensor_model_parallel_size": 2, "parallel.pipeline_model_parallel_size": 2}, 6,
     "parallel: world size 6 is not a multiple of tensor_model_parallel_size x pipeline_model_parallel_size = 2 x 2"),
    ({"rollout.n": 1}, 1, "rollout.n=1: GRPO/LEAD group statistics need at least 2 rollouts per prompt"),
    ({"ppo.micro_batch_size": 3}, 2, "ppo: a mini-batch of 16 prompts x rollout.n=8 = 128 rollouts does not "
                                     "split into 2 data-parallel rank(s) x micro-batches of ppo.micro_batch_size=3"),
    ({"data.prompts_per_step": 100}, 1, "data.prompts_per_step=100 is not divisible by ppo.mini_batch_prompts=16"),
    ({"loss.temperature": 0.6}, 1, "loss.temperature=0.6 differs from rollout.temperature=1.0: the PPO ratio "
                                   "would not start at 1"),
    ({"lead.l_max": 4096}, 1, "lead.l_max=4096 differs from rollout.max_response_len=8000: unsolved prompts "
                              "would get the wrong target"),
    ({"rollout.tensor_parallel_size": 2}, 3, "rollout.tensor_parallel_size=2 does not divide the world size 3"),
    ({"model.path": "/nonexistent/model"}, 1, "model.path=/nonexistent/model: no HF model there"),
    ({"data.train_path": "/nonexistent/train.jsonl"}, 1, "data.train_path=/nonexistent/train.jsonl: no such file"),
    ({"lead.l_min": 9000}, 1, "lead.l_min=9000.0 and lead.l_max=8000.0 need 0 < l_min <= l_max"),
    ({"rollout.offload_weights": True}, 1, "rollout.offload_weights needs rollout.offload_train_state (on by "
                                           "default with CUDA)"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(paths, extra, world, message):
    cfg = load_config(None, _args(paths, **extra))
    with pytest.raises(ValueError) as err:
        cfg.validate(world_size=world)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("rollout.temprature=0.5", "unknown config key 'rollout.temprature'; did you mean rollout.temperature?"),
    ("optim.lr=fast", "optim.lr='fast' is not a valid float"),
    ("ppo.steps=1.5", "ppo.steps=1.5 is not a valid int"),
    ("lead.method=lead2", "lead.method='lead2' is not one of lead, grpo"),
    ("nonsense", "override 'nonsense' is not of the form key=value"),
])
def test_bad_keys_and_values(paths, override, message):
    with pytest.raises(ValueError) as err:
        load_config(None, _args(paths) + [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_print_config_and_errors(paths, capsys, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # set by in-process tests before this one
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["train", "--print-config"] + _args(paths, **{"rollout.n": 4})) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["rollout"]["n"] == 4 and printed["lead"]["method"] == "lead"
    assert printed["parallel"] == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}
    # A bad setting stops the command with one line and exit code 2, before any process starts.
    assert cli.main(["train"] + _args(paths, **{"rollout.n": 1})) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megatron-lead train: error: rollout.n=1") and "\n" not in err
    assert cli.main(["train", "--nproc", "3"] + _args(paths, **{"parallel.tensor_model_parallel_size": 2})) == 2
    assert "world size 3 is not a multiple" in capsys.readouterr().err
