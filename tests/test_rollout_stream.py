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
    # The GPU transports through vLLM's weight-transfer API are gone (never wired, rank 0 only).
    for removed in ("ipc", "nccl"):
        with pytest.raises(ValueError, match="unknown weight-sync transport"):
            make_weight_sync(None, removed)
