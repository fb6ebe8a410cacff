"""The distributed optimizer's state in a trainer checkpoint, loadable at any layout.

Why this module: the distributed optimizer is saved in Megatron's `dp_reshardable` format, where
every rank writes its own shard of the fp32 main params and Adam moments as slices of flat
per-bucket tensors: no gather, no exchange, no extra host memory (the formats that gather hold
the whole state, 12 bytes per parameter, on a rank while saving and loading; measured in
docs/GPU.md). Megatron reads that format back only where the buckets are the same (same TP x PP
and model; the DP size may change). Everywhere else (another TP or PP, or the plain optimizer)
this module reads it:

- at save time, the DP rank 0 of every TP x PP group records in `optimizer_index.json` where each
  parameter lies in its buckets and which pieces of which global (model-space) tensors it holds:
  the model's own ShardedTensor metadata, after its factories (SwiGLU's fc1 is two pieces, its w
  and v halves), each piece with the strided view of the parameter's flat data it is made of;
- at load time every rank computes the same pieces for the parameters it needs now, reads the
  saved parameters whose pieces intersect them (slices of the bucket tensors) and copies the
  intersections: plain copies, so the state arrives bit for bit.

Each rank reads the saved parameters that overlap what it keeps, whole: about its own share of
the state, plus the parameters at the edges of its range, and more where a TP change splits every
parameter (measured in docs/GPU.md); never a gathered copy of everything on every rank. Nothing
here is collective but `dist_checkpointing.load`, which the caller runs once for the model and
these reads together.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

INDEX_FILE = "optimizer_index.json"
PIECES = "optimizer_pieces"  # the key of the reads in the load's sharded state dict


def inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_distributed(inner) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(inner, DistributedOptimizer)


def _keeps_step_per_param(torch_optimizer) -> bool:
    """torch's Adam / AdamW keep `step` in each parameter's state; TE's FusedAdam (GPU) does not."""
    return isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW))


def prepare_for_loading(optimizer) -> None:
    """Allocate the state of a fresh optimizer, so the loaders can copy into it.

    Megatron builds it lazily (the first step). The distributed optimizer's `state_dict()`, which
    its loaders call, also reads the step from torch Adam's per-parameter state. Zero moments and
    step 0, as before a first step (the load then sets both).
    """
    for inner in inner_optimizers(optimizer):
        opt = getattr(inner, "optimizer", None)
        if opt is None or len(opt.state) > 0 or inner.init_state_fn is None:
            continue
        inner.init_state_fn(opt, inner.config)
        if is_distributed(inner) and _keeps_step_per_param(opt):
            for group in opt.param_groups:
                for p in group["params"]:
                    opt.state[p]["step"] = torch.tensor(0.0)


def fix_param_group_index_map(optimizer) -> None:
    """Point Megatron's map from a model parameter to its main parameter at the right one.

    Megatron 0.16.1's DistributedOptimizer numbers each parameter within its param group in
    bucket order (`model_param_group_index_map`), but orders the group's main params fp32 ones
    first, then the fp32 copies of the bf16 ones. Where a group mixes both (bf16 weights with fp32
    norm weights: Megatron's torch norm, used without Transformer Engine, keeps fp32 weights),
    `_get_main_param_and_optimizer_states`, which every checkpoint format goes through, returns
    another parameter's state: a crash when the sizes differ (measured: `dp_reshardable` saving a
    bf16 model on CPU), a silently swapped state when they agree. Training itself does not use the
    map. This rebuilds it from the lists the main params were built from (a no-op where all
    parameters of a group share a dtype, e.g. with Transformer Engine on GPUs).
    """
    for inner in inner_optimizers(optimizer):
        if not is_distributed(inner):
            continue
        fixed = {}
        for g, (fp32, low) in enumerate(zip(inner.model_fp32_groups, inner.model_float16_groups)):
            fixed.update((p, (g, j)) for j, p in enumerate(fp32))
            fixed.update((p, (g, len(fp32) + j)) for j, p in enumerate(low))
        for p, main, flat_slice in _targets(inner):
            g, j = fixed[p]
            if inner.optimizer.param_groups[g]["params"][j].numel() != flat_slice.stop - flat_slice.start:
                raise ValueError("the distributed optimizer's main params are not in the order expected")
        inner.model_param_group_index_map = fixed


# --------------------------------------------------------------------------- pieces


def _sharded_by_param(model_sharded: dict) -> dict:
    """id(parameter) -> its ShardedTensor or ShardedTensorFactory in the model's sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out: dict = {}
    for sh in nested_values(model_sharded):
        if isinstance(sh, (ShardedTensor, ShardedTensorFactory)) and isinstance(sh.data, torch.Tensor):
            out.setdefault(id(sh.data), sh)
    return out


def _pieces(sh, shape) -> list[dict]:
    """The global-tensor pieces a parameter of this local shape holds, found by running its
    sharding (factory included) on a tensor of flat indices: each piece's data is then a strided
    view of those indices, recorded as (storage offset, shape, strides)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    index = torch.arange(math.prod(shape)).view(tuple(shape))
    if isinstance(sh, ShardedTensorFactory):
        parts = [(p, p.data) for p in nested_values(sh.build_fn(sh.key, index, sh.replica_id, None))]
    else:
        parts = [(sh, index)]
    out = []
    for part, data in parts:
        view = [data.storage_offset(), list(data.shape), list(data.stride())]
        if not torch.equal(index.view(-1).as_strided(view[1], view[2], view[0]), data):
            raise ValueError(f"the sharding of {sh.key} is not a view of the parameter")
        out.append({"key": part.key, "offset": list(part.global_offset),
                    "size": [1] * part.prepend_axis_num + list(part.local_shape),
                    "view": view, "padded": bool(part.allow_shape_mismatch)})
    return out


def _bucket_key(prefix: str, inner, gbuf_idx: int, bucket_idx: int) -> str:
    (dtype,) = inner.gbuf_ranges[gbuf_idx].keys()  # Megatron: one dtype per buffer
    return (f"{prefix}optimizer.distributed.dp_group_idx_{inner.data_parallel_group_idx}"
            f".gbuf_idx_{gbuf_idx}.dtype_{dtype}.bucket_idx_{bucket_idx}")


def index_entries(optimizer, model_sharded: dict, saved_keys: set[str]) -> dict:
    """This rank's part of optimizer_index.json (entries only on DP rank 0 of each group).

    saved_keys: the ShardedTensor keys Megatron is saving; every bucket key recorded must be one
    of them (a check that this module names the tensors as Megatron does)."""
    inners = inner_optimizers(optimizer)
    prefix_of = (lambda i: f"chained_{i}.") if len(inners) > 1 else (lambda i: "")
    to_sh = _sharded_by_param(model_sharded)
    groups, steps, dtypes = [], [], {}
    for i, inner in enumerate(inners):
        local = _targets(inner)
        if local:
            states = inner._get_main_param_and_optimizer_states(local[0][0])
            dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in states.items() if k != "step"}
        steps.append(inner.state_dict()["optimizer"]["param_groups"][0]["step"])
        if inner.data_parallel_group.rank() != 0:
            continue
        buckets = []
        for gbuf_idx, buffer in enumerate(inner.buffers):
            for bucket_idx, bucket in enumerate(buffer.buckets):
                key = _bucket_key(prefix_of(i), inner, gbuf_idx, bucket_idx)
                missing = [k for k in dtypes if f"{key}.{k}" not in saved_keys]
                if missing:
                    raise ValueError(f"Megatron saved no tensor {key}.{missing[0]}")
                params = []
                for p, (start, end, bucket_id) in buffer.param_index_map.items():
                    if bucket_id != bucket_idx:
                        continue
                    if id(p) not in to_sh:
                        raise ValueError(f"a parameter of shape {tuple(p.shape)} is not in the "
                                         "model's sharded state dict")
                    params.append({"start": start - bucket.offset, "numel": end - start,
                                   "pieces": _pieces(to_sh[id(p)], p.shape)})
                buckets.append({"key": key, "numel": bucket.numel_unpadded, "params": params})
        groups.append({"optimizer": i, "buckets": buckets})
    return {"groups": groups, "steps": steps, "dtypes": dtypes}


def merge_index(parts: list[dict]) -> dict:
    """optimizer_index.json from every rank's index_entries."""
    return {"groups": [g for part in parts for g in part["groups"]], "steps": parts[0]["steps"],
            "dtypes": next(part["dtypes"] for part in parts if part["dtypes"])}


def _bucket_layout(inner, prefix: str) -> dict:
    """{bucket key: (numel, sorted (start, numel) of its parameters)} of this rank's buckets."""
    out = {}
    for gbuf_idx, buffer in enumerate(inner.buffers):
        for bucket_idx, bucket in enumerate(buffer.buckets):
            params = sorted((start - bucket.offset, end - start)
                            for start, end, bucket_id in buffer.param_index_map.values()
                            if bucket_id == bucket_idx)
            out[_bucket_key(prefix, inner, gbuf_idx, bucket_idx)] = (bucket.numel_unpadded, params)
    return out


def megatron_can_load(index: dict, optimizer) -> bool:
    """Whether Megatron's own dp_reshardable loader fits: a distributed optimizer whose buckets
    (this rank's TP x PP group's) are laid out exactly as the saved ones, whatever the DP size."""
    inners = inner_optimizers(optimizer)
    if len(inners) != len(index["steps"]) or not all(is_distributed(o) for o in inners):
        return False
    saved = {b["key"]: (b["numel"], sorted((p["start"], p["numel"]) for p in b["params"]))
             for g in index["groups"] for b in g["buckets"]}
    for i, inner in enumerate(inners):
        layout = _bucket_layout(inner, f"chained_{i}." if len(inners) > 1 else "")
        if not layout:
            continue
        group = next(iter(layout)).rsplit(".gbuf_idx_", 1)[0] + "."
        if layout != {k: v for k, v in saved.items() if k.startswith(group)}:
            return False
    return True


# --------------------------------------------------------------------------- loading


def _targets(inner) -> list[tuple]:
    """(model param, main param or None, flat slice of it this rank holds) for every parameter
    whose state this rank keeps: its shard with the distributed optimizer, all with the plain one."""
    if is_distributed(inner):
        out = []
        for gbuf_range_maps in inner.gbuf_ranges:
            for maps in gbuf_range_maps.values():
                for m in maps:
                    for p, ranges in m["param_map"].items():
                        out.append((p, None, slice(ranges["param"].start, ranges["param"].end)))
        return out
    if hasattr(inner, "float16_groups"):  # mixed precision: fp32 main copies of the bf16 params
        pairs = [pair for g16, g32 in zip(inner.float16_groups, inner.fp32_from_float16_groups)
                 for pair in zip(g16, g32)]
        pairs += [(p, p) for group in inner.fp32_from_fp32_groups for p in group]
    else:
        pairs = [(p, p) for group in inner.optimizer.param_groups for p in group["params"]]
    return [(p, main, slice(0, p.numel())) for p, main in pairs]


def _box(piece: dict) -> list[tuple[int, int]]:
    return [(o, o + s) for o, s in zip(piece["offset"], piece["size"])]


def _intersect(a: list, b: list) -> list | None:
    if len(a) != len(b):
        return None
    box = [(max(lo1, lo2), min(hi1, hi2)) for (lo1, hi1), (lo2, hi2) in zip(a, b)]
    return box if all(lo < hi for lo, hi in box) else None


def _as_box(flat: torch.Tensor, piece: dict) -> torch.Tensor:
    """The piece's elements of a parameter's flat data, as a view shaped like its box."""
    offset, shape, stride = piece["view"]
    t = flat.as_strided(shape, stride, flat.storage_offset() + offset)
    for _ in range(len(piece["size"]) - t.dim()):  # the prepended (layer) axes
        t = t.unsqueeze(0)
    return t


class ReshardPlan:
    """What this rank reads from a dp_reshardable checkpoint, and where each read goes."""

    def __init__(self, index: dict, optimizer, model_sharded: dict):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        saved = defaultdict(list)  # global key -> [(box, piece, where: the saved param's bucket slice)]
        seen = set()
        param_ids: dict = {}  # where -> the number of its reads
        for group in index["groups"]:
            for bucket in group["buckets"]:
                for prm in bucket["params"]:
                    for piece in prm["pieces"]:
                        box = _box(piece)
                        if (piece["key"], str(box)) in seen:  # a replica (TP-duplicated, tied)
                            continue
                        seen.add((piece["key"], str(box)))
                        where = (bucket["key"], bucket["numel"], prm["start"], prm["numel"])
                        saved[piece["key"]].append((box, piece, where))
        self.dtypes = {k: getattr(torch, v) for k, v in index["dtypes"].items()}
        self.steps = index["steps"]
        to_sh = _sharded_by_param(model_sharded)
        # (inner idx, model param, main param, its slice here, [(piece, common box, saved piece, where)])
        self.targets = []
        for i, inner in enumerate(inner_optimizers(optimizer)):
            for p, main, flat_slice in _targets(inner):
                if id(p) not in to_sh:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} is not in the model's "
                                     "sharded state dict")
                copies = []
                for piece in _pieces(to_sh[id(p)], p.shape):
                    box, covered = _box(piece), 0
                    for saved_box, saved_piece, where in saved.get(piece["key"], []):
                        common = _intersect(box, saved_box)
                        if common is not None:
                            copies.append((piece, common, saved_piece, where))
                            covered += math.prod(hi - lo for lo, hi in common)
                            param_ids.setdefault(where, len(param_ids))
                    if covered != math.prod(piece["size"]) and not piece["padded"]:
                        raise ValueError(f"the checkpoint holds {covered} of the "
                                         f"{math.prod(piece['size'])} optimizer-state elements of "
                                         f"{piece['key']} this rank needs")
                self.targets.append((i, p, main, flat_slice, copies))
        self.param_ids = param_ids
        self.requests = {}
        for (key, bucket_numel, start, numel), n in param_ids.items():
            for state, dtype in self.dtypes.items():
                self.requests[f"{n}.{state}"] = ShardedTensor(
                    key=f"{key}.{state}", data=torch.empty(numel, dtype=dtype), dtype=dtype,
                    local_shape=(numel,), global_shape=(bucket_numel,), global_offset=(start,),
                    axis_fragmentations=None, replica_id=0)

    def sharded(self) -> dict:
        """The reads, to add to the load's sharded state dict under `PIECES`."""
        return self.requests

    @torch.no_grad()
    def apply(self, loaded: dict, optimizer) -> None:
        """Copy the reads into the optimizer's state, and set its step."""
        inners = inner_optimizers(optimizer)
        for i, p, main, flat_slice, copies in self.targets:
            full = {state: torch.zeros(p.numel(), dtype=dtype) for state, dtype in self.dtypes.items()}
            for piece, common, saved_piece, where in copies:
                n = self.param_ids[where]
                for state in self.dtypes:
                    src = _as_box(loaded[f"{n}.{state}"], saved_piece)
                    dst = _as_box(full[state], piece)
                    dst[_slices(common, piece)] = src[_slices(common, saved_piece)]
            _write_state(inners[i], p, main, flat_slice, full)
        set_steps(optimizer, self.steps)


def set_steps(optimizer, steps: list) -> None:
    """Set each inner optimizer's step (Adam's bias correction) to the saved one.

    Also run after Megatron's own dp_reshardable load: with torch's Adam (CPU), its loader gives
    every parameter one shared step tensor (which each parameter's update then increments: 9
    parameters, 9 increments per update) and copies the fresh state's step 0 over it. TE's
    FusedAdam (GPU) keeps one step per param group instead, where this sets it too."""
    for inner, step in zip(inner_optimizers(optimizer), steps):
        opt = inner.optimizer
        for group in opt.param_groups:
            if _keeps_step_per_param(opt):
                for p in group["params"]:
                    opt.state[p]["step"] = torch.tensor(float(step))  # one tensor per parameter
            elif "step" in group or inner.config.optimizer == "adam":
                group["step"] = step


def _slices(box: list, piece: dict) -> tuple:
    return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, piece["offset"]))


def _write_state(inner, p, main, flat_slice: slice, full: dict) -> None:
    """Copy one parameter's full (TP-local) state into the optimizer: this rank's slice of it
    with the distributed optimizer, all of it (and the fp32 main copy) with the plain one."""
    if is_distributed(inner):
        dst = inner._get_main_param_and_optimizer_states(p)  # references to this rank's shards
        for state, t in full.items():
            dst[state].copy_(t[flat_slice].view_as(dst[state]))
        return
    main.copy_(full["param"].view_as(main))
    state = inner.optimizer.state[main]
    for k, t in full.items():
        if k != "param":
            state[k].copy_(t.view_as(state[k]))
