"""The weight stream every transport consumes: (hf_name, full tensor) pairs, grouped in buckets.

`policy_weight_stream` is Megatron's side: `policy.convert.gather.iter_hf_weights` gathers the TP
shards and PP stages into vLLM's (= HF's) names and layouts (QKV split, gate/up split, vocab padding
dropped), one tensor group at a time. `iter_buckets` groups that stream into lists of at most
`bucket_bytes` (one larger tensor travels alone), so a transport holds one bucket at a time and no
rank ever materialises a full copy of the model.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

DEFAULT_BUCKET_BYTES = 512 << 20

NamedTensor = tuple[str, torch.Tensor]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def iter_buckets(named_tensors: Iterable[NamedTensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES
                 ) -> Iterator[list[NamedTensor]]:
    """Group a (name, tensor) stream into consecutive buckets of at most bucket_bytes each."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[NamedTensor] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def policy_weight_stream(model_chunks: list, hf_config: Any = None,
                         dtype: torch.dtype | None = None) -> Iterator[NamedTensor]:
    """Collective over all trainer ranks: every rank gets every full HF-named tensor, in order.

    dtype: cast on the way (e.g. bf16 training weights into an fp32 engine); None keeps the
    model's dtype.
    """
    from megatron_lead.policy.convert.gather import iter_hf_weights

    for name, tensor in iter_hf_weights(model_chunks, hf_config):
        yield name, tensor if dtype is None else tensor.to(dtype)
