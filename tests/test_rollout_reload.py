"""The transport alone (no Megatron): an HF stream into a running engine, tied embeddings.

Qwen2.5-0.5B / 1.5B tie lm_head to the embedding: the stream has no lm_head.weight and vLLM's
reload must still update the head (it shares the embedding's tensor). The sync runs the way a
GPU step does it (sleep, wake the weights, sync, wake the KV cache) through vLLM's real engine
core; on CPU vLLM's worker ignores the sleep itself, the engine core's bookkeeping does not.
"""

from __future__ import annotations

import logging

import pytest
import torch

from megatron_lead.rollout import engine as engine_module
from megatron_lead.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig
from megatron_lead.rollout.sync import make_weight_sync
from rollout_tiny import ENGINE_ARGS, hf_greedy, hf_logprobs, prompts, save_tiny_qwen2

pytestmark = pytest.mark.slow


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _record_reload_config(worker, seen: list) -> None:
    """Wrap the model runner's reload_weights (this worker only) to note whether vLLM's current
    config is the worker's while it runs."""
    from vllm.config import get_current_vllm_config_or_none

    runner = worker.model_runner
    reload = runner.reload_weights

    def recording(*args, **kwargs):
        seen.append(get_current_vllm_config_or_none() is worker.vllm_config)
        return reload(*args, **kwargs)

    runner.reload_weights = recording


def test_reload_sync_into_tied_embedding_model(tmp_path, monkeypatch):
    import transformers

    start_dir = save_tiny_qwen2(tmp_path / "start", seed=0, tie_word_embeddings=True)
    target_dir = save_tiny_qwen2(tmp_path / "target", seed=1, tie_word_embeddings=True)
    target = transformers.Qwen2ForCausalLM.from_pretrained(target_dir, torch_dtype=torch.float32).eval()
    stream = [(n, t.clone()) for n, t in target.state_dict().items() if n != "lm_head.weight"]

    engine = RolloutEngine(EngineConfig(model_path=start_dir, **ENGINE_ARGS))
    records = _Records()  # after the start: vLLM's logging set-up clears its loggers' handlers
    reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    reload_logger.addHandler(records)
    try:
        batch = prompts(4, seed=7)
        greedy = SamplingConfig(temperature=0.0, max_response_len=8)
        before = engine.generate(batch, greedy)
        seen_config: list[bool] = []
        engine.llm.collective_rpc(_record_reload_config, args=(seen_config,))

        core = engine.llm.llm_engine
        with monkeypatch.context() as gpu:
            gpu.setattr(engine_module, "on_cpu", lambda: False)  # the GPU path of sleep / wake_up
            engine.sleep()
            assert core.is_sleeping()
            engine.wake_up(["weights"])
            assert core.is_sleeping()  # the KV cache stays asleep during the sync
            stats = make_weight_sync(engine).sync(iter(stream), bucket_bytes=32 << 10)
            engine.wake_up(["kv_cache"])
            assert not core.is_sleeping()  # scheduling resumed
        assert seen_config == [True]  # reloaded through the worker, under vLLM's config
        assert stats.tensors == len(stream) and stats.buckets > 5
        # The rotary cache and the tied head get no tensor by design: no warning about them.
        assert not [m for m in records.messages if "Failed to load weights" in m], records.messages

        after = engine.generate(batch, greedy)
        sampled = engine.generate(batch, SamplingConfig(n=2, temperature=1.0, max_response_len=8, seed=3))
        # A stream that misses a tensor is an error, not a half-loaded model passed off as synced,
        # and vLLM's own warning about that layer still shows.
        with pytest.raises(ValueError, match="lacks 1 of the model's tensors.*layers.1.mlp.down_proj"):
            make_weight_sync(engine).sync(iter([(n, t) for n, t in stream
                                                if n != "model.layers.1.mlp.down_proj.weight"]))
        assert [m for m in records.messages if "Failed to load weights" in m] == [
            "RowParallelLinear: Failed to load weights"]
    finally:
        reload_logger.removeHandler(records)
        engine.close()

    assert [r.response_ids for r in before] != [r.response_ids for r in after]
    for r in after:
        assert r.response_ids == hf_greedy(target, r.prompt_ids, 8)[:len(r.response_ids)]
    diffs = [abs(a - b) for r in sampled
             for a, b in zip(r.logprobs, hf_logprobs(target, r.prompt_ids, r.response_ids))]
    assert sum(diffs) / len(diffs) < 1e-3
