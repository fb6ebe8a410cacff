"""Megatron -> vLLM weight sync: one stream (`stream`), one interface (`base`), one file per transport.

- `reload`: CPU, in-process vLLM worker; `model_runner.reload_weights(weights_iterator=...)`.
- `transfer_api`: GPU, vLLM's weight-transfer API (IPC when colocated, NCCL for separate GPUs).
"""

from megatron_lead.rollout.sync.base import SyncStats, WeightSync, make_weight_sync, sync_policy_weights
from megatron_lead.rollout.sync.stream import (
    DEFAULT_BUCKET_BYTES, iter_buckets, policy_weight_metadata, policy_weight_stream)

__all__ = ["DEFAULT_BUCKET_BYTES", "SyncStats", "WeightSync", "iter_buckets", "make_weight_sync",
           "policy_weight_metadata", "policy_weight_stream", "sync_policy_weights"]
