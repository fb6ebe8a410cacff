"""The CPU transport alone (no Megatron): an HF stream into a running engine, tied embeddings.

Qwen2.5-0.5B / 1.5B tie lm_head to the embedding: the stream has no lm_head.weight and vLLM's
reload must still update the head (it shares the embedding's tensor).
"""

from __future__ import annotations

import pytest
import torch

from megatron_lead.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig
from megatron_lead.rollout.sync import make_weight_sync
from rollout_tiny import ENGINE_ARGS, hf_greedy, hf_logprobs, prompts, save_tiny_qwen2

pytestmark = pytest.mark.slow


def test_reload_sync_into_tied_embedding_model(tmp_path):
    import transformers

    start_dir = save_tiny_qwen2(tmp_path / "start", seed=0, tie_word_embeddings=True)
    target_dir = save_tiny_qwen2(tmp_path / "target", seed=1, tie_word_embeddings=True)
    target = transformers.Qwen2ForCausalLM.from_pretrained(target_dir, torch_dtype=torch.float32).eval()
    stream = [(n, t.clone()) for n, t in target.state_dict().items() if n != "lm_head.weight"]

    engine = RolloutEngine(EngineConfig(model_path=start_dir, **ENGINE_ARGS))
    try:
        batch = prompts(4, seed=7)
        greedy = SamplingConfig(temperature=0.0, max_response_len=8)
        before = engine.generate(batch, greedy)
        stats = make_weight_sync(engine).sync(iter(stream), bucket_bytes=32 << 10)
        assert stats.tensors == len(stream) and stats.buckets > 5
        after = engine.generate(batch, greedy)
        sampled = engine.generate(batch, SamplingConfig(n=2, temperature=1.0, max_response_len=8, seed=3))
        # A stream that misses a tensor is an error, not a half-loaded model passed off as synced.
        with pytest.raises(ValueError, match="lacks 1 of the model's tensors.*layers.1.mlp.down_proj"):
            make_weight_sync(engine).sync(iter([(n, t) for n, t in stream
                                                if n != "model.layers.1.mlp.down_proj.weight"]))
    finally:
        engine.close()

    assert [r.response_ids for r in before] != [r.response_ids for r in after]
    for r in after:
        assert r.response_ids == hf_greedy(target, r.prompt_ids, 8)[:len(r.response_ids)]
    diffs = [abs(a - b) for r in sampled
             for a, b in zip(r.logprobs, hf_logprobs(target, r.prompt_ids, r.response_ids))]
    assert sum(diffs) / len(diffs) < 1e-3
