"""Megatron -> vLLM weight sync: one stream (`stream`), one interface (`base`), one transport.

- `reload` (CPU and GPU): the in-process vLLM worker's `reload_weights(weights_iterator=...)`.
"""

from megatron_lead.rollout.sync.base import SyncStats, WeightSync, make_weight_sync, sync_policy_weights
from megatron_lead.rollout.sync.stream import DEFAULT_BUCKET_BYTES, iter_buckets, policy_weight_stream

__all__ = ["DEFAULT_BUCKET_BYTES", "SyncStats", "WeightSync", "iter_buckets", "make_weight_sync",
           "policy_weight_stream", "sync_policy_weights"]
