"""Full HF-named tensors from a TP x PP-sharded in-memory model: for HF export and vLLM weight sync.

Collective: every rank of the model (all TP x PP x DP ranks) must iterate `iter_hf_weights` to the
end together. For each HF tensor group, in the fixed order of `mapping.placements` (embedding,
layers 0..L-1, final norm, lm_head), the owning pipeline stage all-gathers the TP shards and
merges them with the family table (QKV de-interleaved, gate/up split, vocab padding dropped);
then the stage broadcasts the result over the pipeline group, so every rank yields every tensor.
A routed expert of a MoE model lives on one expert-parallel rank: its expert-TP group gathers it
and it is broadcast over the expert-parallel group first (one expert tensor at a time).
At most one fused group (q, k, v or gate, up) is held at a time.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist

from megatron_lead.policy.convert import hf_io
from megatron_lead.policy.convert.mapping import hf_from_shards, hf_shapes, placements
from megatron_lead.policy.parallel import errors_on_any_rank


def _all_gather_tp(tensor: torch.Tensor, expert: bool = False) -> list[torch.Tensor]:
    from megatron.core import parallel_state

    if expert:
        group = parallel_state.get_expert_tensor_parallel_group()
        size = parallel_state.get_expert_tensor_parallel_world_size()
    else:
        group = parallel_state.get_tensor_model_parallel_group()
        size = parallel_state.get_tensor_model_parallel_world_size()
    if size == 1:
        return [tensor]
    tensor = tensor.contiguous()
    shards = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(shards, tensor, group=group)
    return shards


def iter_hf_weights(model_chunks: list, hf_config: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) for every HF weight of the model, on every rank.

    hf_config is accepted for symmetry with build_model; the architecture is read from the
    model (build_model stores it). Tensors keep the model's dtype and device; they are fresh
    tensors (not views of parameters) and detached.
    """
    from megatron.core import parallel_state

    from megatron_lead.policy.convert.checkpoint import model_tensors, rank_layout
    from megatron_lead.policy.model import unwrap

    model = unwrap(model_chunks[0])
    arch = model.arch
    _, pp, ep, _, stage, ep_rank = rank_layout(arch)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else None
    ep_group = parallel_state.get_expert_model_parallel_group() if ep > 1 else None
    ep_ranks = dist.get_process_group_ranks(ep_group) if ep > 1 else None  # in EP-rank order
    local = model_tensors(model)
    param = next(iter(local.values()))
    dtype, device = param.dtype, param.device

    with torch.no_grad():
        for p in placements(arch, pp, ep):
            owner = p.stage == stage and p.ep_rank in (None, ep_rank)
            if owner:
                shards = _all_gather_tp(local[p.megatron_name].detach(), expert=p.ep_rank is not None)
                full = hf_from_shards(p, shards, arch)
                if len(shards) == 1 and p.rule.split == "replicated":
                    full = [full[0].clone()]  # every other split concatenates, i.e. copies
                full = [t.contiguous() for t in full]
            else:
                full = [torch.empty(shape, dtype=dtype, device=device) for shape in hf_shapes(p, arch)]
            if p.ep_rank is not None and ep > 1 and p.stage == stage:
                for t in full:
                    dist.broadcast(t, src=ep_ranks[p.ep_rank], group=ep_group)
            if pp > 1:
                for t in full:
                    dist.broadcast(t, src=pp_ranks[p.stage], group=pp_group)
            yield from zip(p.hf_names, full)
            del full


def save_hf_checkpoint(model_chunks: list, out_dir: str, hf_source_dir: str | None = None,
                       dtype: torch.dtype | None = None) -> None:
    """Collective: export the in-memory model as an HF folder (rank 0 writes, all ranks gather).

    hf_source_dir: HF folder whose config/tokenizer files are copied (else the model's config).
    dtype: cast the weights (e.g. torch.bfloat16) while writing.
    """
    from megatron_lead.policy.model import unwrap

    model = unwrap(model_chunks[0])
    tensors = iter_hf_weights(model_chunks)
    if dtype is not None:
        tensors = ((name, t.to(dtype)) for name, t in tensors)
    error = None
    if dist.get_rank() == 0:
        try:
            hf_io.write_hf_folder(tensors, out_dir, side_files_dir=hf_source_dir,
                                  config=None if hf_source_dir else model.hf_config, overwrite=True)
        except Exception as e:  # noqa: BLE001 - re-raised below, once the other ranks are free
            error = e
    # Every rank runs the gather to its end (rank 0 too, after a failed write), so no rank is
    # left waiting in a collective; then all ranks learn whether the write succeeded.
    for _ in tensors:
        pass
    failed = errors_on_any_rank(None if error is None else f"rank 0: {error}")
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"saving the HF checkpoint to {out_dir} failed on {failed[0]}")
