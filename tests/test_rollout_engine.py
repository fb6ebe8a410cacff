"""The vLLM rollout engine on CPU, for real: greedy/sampled outputs and log-probs against HF;
what it sets in vLLM for GPUs (sleep level, wake-up tags, model runner) and what it leaves of
vLLM's process-wide settings."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import psutil
import pytest
import torch

from megatron_lead.rollout import engine as engine_module
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


class _RecordingLLM:
    """Stands in for vllm.LLM: records sleep / wake_up calls, bound to the real methods'
    signatures (so a misspelt or dropped argument fails here as it would in vLLM)."""

    def __init__(self):
        engine_module.import_vllm()  # as the engine does: a bare import would keep vLLM's threads=1
        from vllm import LLM

        self.signatures = {name: inspect.signature(getattr(LLM, name)) for name in ("sleep", "wake_up")}
        self.calls = []

    def _record(self, name, *args, **kwargs):
        bound = self.signatures[name].bind(self, *args, **kwargs)
        bound.apply_defaults()
        self.calls.append((name, {k: v for k, v in bound.arguments.items() if k != "self"}))

    def sleep(self, *args, **kwargs):
        self._record("sleep", *args, **kwargs)

    def wake_up(self, *args, **kwargs):
        self._record("wake_up", *args, **kwargs)


def test_gpu_sleep_is_level_2_and_wake_up_passes_tags(monkeypatch):
    engine = RolloutEngine.__new__(RolloutEngine)  # no vLLM start: only the calls matter here
    engine.config = EngineConfig(model_path="unused")
    engine.llm = _RecordingLLM()
    monkeypatch.setattr(engine_module, "on_cpu", lambda: False)
    # The step's order: sleep for training; weights back, sync, then the KV cache.
    engine.sleep()
    engine.wake_up(["weights"])
    engine.wake_up(["kv_cache"])
    engine.sleep()
    engine.wake_up()  # untagged: everything
    assert engine.llm.calls == [
        ("sleep", {"level": 2, "mode": "abort"}),
        ("wake_up", {"tags": ["weights"]}),
        ("wake_up", {"tags": ["kv_cache"]}),
        ("sleep", {"level": 2, "mode": "abort"}),
        ("wake_up", {"tags": None}),
    ]
    # On CPU vLLM has no sleep mode: nothing reaches it.
    monkeypatch.setattr(engine_module, "on_cpu", lambda: True)
    engine.sleep()
    engine.wake_up(["weights"])
    assert len(engine.llm.calls) == 5


@pytest.mark.long  # four fresh interpreters, two importing vLLM: the extended tier
def test_vllm_import_keeps_inductor_compile_threads():
    """vLLM's import sets TORCHINDUCTOR_COMPILE_THREADS=1 and Inductor reads it then: the engine's
    import leaves both as a process without vLLM would have them (fresh processes: the variable
    and Inductor's config are decided once per process)."""
    probe = textwrap.dedent("""
        import os, sys
        if sys.argv[1] != "unset":
            os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = sys.argv[1]
        if sys.argv[2] == "vllm":
            from megatron_lead.rollout.engine import import_vllm
            import_vllm()
            assert "vllm" in sys.modules
        from torch._inductor import config
        print(os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"), config.compile_threads)
    """)

    def run(threads: str, with_vllm: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_COMPILE_THREADS"}
        done = subprocess.run([sys.executable, "-c", probe, threads, with_vllm], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1]

    without = run("unset", "plain")
    assert without.startswith("None ")
    assert run("unset", "vllm") == without
    assert run("2", "vllm") == run("2", "plain") == "2 2"


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


THREADS = "TORCHINDUCTOR_COMPILE_THREADS"
START = {}  # what the module's engine start left behind


@pytest.fixture(scope="module")
def engine(model_dir):
    before = os.environ.get(THREADS)
    os.environ[THREADS] = "3"  # a user's setting; vLLM's CPU platform sets 1 at every start
    try:
        eng = RolloutEngine(EngineConfig(model_path=model_dir, **ENGINE_ARGS))
        START["threads"] = os.environ.get(THREADS)
    finally:
        if before is None:
            os.environ.pop(THREADS, None)
        else:
            os.environ[THREADS] = before
    yield eng
    eng.close()


def test_engine_start_keeps_compile_threads(engine):
    assert START["threads"] == "3"


def test_v1_model_runner_is_pinned(engine, monkeypatch):
    """vLLM picks the V2 runner wherever Triton is installed (CUDA); the engine pins V1. vLLM's
    own decision, with Triton made to look installed, must still come out V1."""
    import vllm.config.vllm as vllm_config_module
    from vllm import envs

    assert envs.VLLM_USE_V2_MODEL_RUNNER is False  # as vLLM reads it (cached after the start)
    config = engine.llm.llm_engine.vllm_config
    assert config.use_v2_model_runner is False
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    assert config.use_v2_model_runner is False
    # The check is not blind: without the pin, the same config picks V2.
    monkeypatch.setattr(envs, "VLLM_USE_V2_MODEL_RUNNER", None, raising=False)
    assert config.use_v2_model_runner is True


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
