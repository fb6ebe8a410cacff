"""The vLLM rollout engine on CPU, for real: greedy/sampled outputs and log-probs against HF."""

from __future__ import annotations

import psutil
import pytest
import torch

from megatron_lead.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig
from megatron_lead.rollout.metrics import logprob_diff
from rollout_tiny import ENGINE_ARGS, hf_greedy, hf_logprobs, prompts, save_tiny_qwen2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    import transformers

    return transformers.Qwen2ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


# Bad-input tests first: they must run before the module's engine exists (one engine per process).

def test_missing_model_files_is_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        RolloutEngine(EngineConfig(model_path=str(tmp_path / "nope")))


def test_impossible_memory_setting_is_rejected(model_dir):
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        RolloutEngine(EngineConfig(model_path=model_dir, gpu_memory_utilization=1.5))


def test_vllm_start_failure_is_one_line_and_leaves_no_processes(model_dir):
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    # More host RAM than this machine has free: vLLM's CPU worker refuses to start.
    config = EngineConfig(model_path=model_dir, gpu_memory_utilization=1.0, dtype="float32",
                          max_model_len=128, enforce_eager=True)
    with pytest.raises(RuntimeError, match="vLLM could not start") as err:
        RolloutEngine(config)
    assert "\n" not in str(err.value) and "memory" in str(err.value).lower()
    children_after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert children_after <= children_before
    assert not torch.distributed.is_initialized()  # vLLM's process group was dropped too


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = RolloutEngine(EngineConfig(model_path=model_dir, **ENGINE_ARGS))
    yield eng
    eng.close()


def test_greedy_matches_transformers(engine, hf_model):
    batch = prompts(8)
    rollouts = engine.generate(batch, SamplingConfig(n=1, temperature=0.0, max_response_len=12))
    assert [r.prompt_index for r in rollouts] == list(range(8))
    for r, p in zip(rollouts, batch):
        expected = hf_greedy(hf_model, p, 12)
        # EOS (255) would stop vLLM early; compare the common prefix and check the stop.
        assert r.response_ids == expected[:len(r.response_ids)]
        assert r.finish_reason == ("stop" if len(r.response_ids) < 12 else "length")


def test_sampled_logprobs_match_transformers(engine, hf_model):
    batch = prompts(4, seed=2)
    for temperature in (1.0, 0.7):
        sampling = SamplingConfig(n=3, temperature=temperature, max_response_len=10, seed=5)
        rollouts = engine.generate(batch, sampling)
        assert len(rollouts) == 12
        assert [r.prompt_index for r in rollouts] == [i for i in range(4) for _ in range(3)]
        assert len({tuple(r.response_ids) for r in rollouts[:3]}) > 1  # G samples differ
        width = max(len(r.response_ids) for r in rollouts)
        got = torch.zeros(len(rollouts), width)
        ref = torch.zeros(len(rollouts), width)
        mask = torch.zeros(len(rollouts), width, dtype=torch.bool)
        for i, r in enumerate(rollouts):
            n = len(r.response_ids)
            assert len(r.logprobs) == n
            got[i, :n] = torch.tensor(r.logprobs)
            ref[i, :n] = torch.tensor(hf_logprobs(hf_model, r.prompt_ids, r.response_ids, temperature))
            mask[i, :n] = True
        diff = logprob_diff(got, ref, mask)
        assert diff < 1e-3, (temperature, diff)
        # The metric is not blind: shifted log-probs show up.
        assert abs(logprob_diff(got + 0.5, ref, mask) - 0.5) < 1e-3 + diff

        again = engine.generate(batch, sampling)
        assert [r.response_ids for r in again] == [r.response_ids for r in rollouts]


def test_finish_reasons_stop_and_length(engine):
    p = prompts(1, seed=3)[0]
    free = engine.generate([p], SamplingConfig(temperature=0.0, max_response_len=6))[0]
    assert free.finish_reason == "length" and free.truncated and len(free.response_ids) == 6
    stop = free.response_ids[2]
    first = free.response_ids.index(stop)
    stopped = engine.generate([p], SamplingConfig(temperature=0.0, max_response_len=6,
                                                  stop_token_ids=(stop,)))[0]
    assert stopped.finish_reason == "stop" and not stopped.truncated
    assert stopped.response_ids == free.response_ids[:first + 1]  # the stop token is kept


def test_logprob_diff_metric_by_hand():
    a = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -0.25, -3.0]])
    b = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -0.75, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert logprob_diff(a, b, mask) == pytest.approx((0.5 + 0 + 0 + 0.5 + 2.0) / 5)
    assert logprob_diff(a, b, torch.zeros_like(mask)) == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        logprob_diff(a, b[:, :2], mask)


def test_close_releases_the_engine(engine):
    engine.close()
    assert not torch.distributed.is_initialized()  # vLLM's own process group is gone
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([[1, 2, 3]], SamplingConfig())
    engine.close()  # idempotent (the fixture closes again)
