"""Bucketing of the weight stream and the sync bookkeeping, against hand-computed values (no vLLM)."""

from __future__ import annotations

import pytest
import torch

from megatron_lead.rollout.sync import iter_buckets, make_weight_sync


def _named(*numels):
    return [(f"w{i}", torch.zeros(n)) for i, n in enumerate(numels)]  # fp32: 4 bytes each


def test_buckets_are_bounded_and_keep_order():
    stream = _named(10, 10, 10, 30, 5, 5)  # 40, 40, 40, 120, 20, 20 bytes
    buckets = list(iter_buckets(stream, bucket_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1"], ["w2"], ["w3"], ["w4", "w5"]]
    # A tensor larger than the bucket travels alone; nothing is dropped or duplicated.
    assert [n for b in buckets for n, _ in b] == [n for n, _ in stream]
    assert list(iter_buckets([], 80)) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets(stream, 0))


def test_sync_without_engine_drains_and_counts():
    stats = make_weight_sync(None).sync(iter(_named(10, 10, 10, 30)), bucket_bytes=80)
    assert (stats.tensors, stats.buckets, stats.bytes) == (4, 3, 240)
    assert stats.transport == "reload" and stats.seconds > 0
    assert set(stats.metrics()) == {"rollout/sync_seconds", "rollout/sync_bytes", "rollout/sync_gb_per_s"}
    with pytest.raises(ValueError, match="empty stream"):
        make_weight_sync(None).sync(iter([]))


def test_unknown_transport_is_rejected():
    with pytest.raises(ValueError, match="unknown weight-sync transport"):
        make_weight_sync(None, "carrier-pigeon")


def test_gpu_source_follows_vllm_weight_source_contract():
    """The GPU transports hand vLLM a WeightSource over the same stream; vLLM checks its order."""
    from megatron_lead.rollout.sync.transfer_api import _stream_source

    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight",
             "model.norm.weight", "lm_head.weight"]
    stream = [(n, torch.full((2, 3), float(i))) for i, n in enumerate(names)]
    source = _stream_source([(n, t.dtype, tuple(t.shape)) for n, t in stream])
    assert [m.name for m in source.metadata()] == names
    source.stream = iter(stream)
    groups = list(source.iter_groups())  # vLLM's own batching: embedding, layer 0, layer 1, head
    assert [g for g, _ in groups] == [names[:1], names[1:3], names[3:4], names[4:]]
    with pytest.raises(RuntimeError, match="outside a sync round"):
        list(source)  # each round's stream is consumed once
    source.stream = iter([stream[1], stream[0]] + stream[2:])
    with pytest.raises(RuntimeError, match="iteration order must match"):
        list(source.iter_groups())
