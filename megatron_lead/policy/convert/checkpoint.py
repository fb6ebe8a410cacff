"""Megatron checkpoints of this project, and conversion from / to HF folders.

On-disk layout of a Megatron checkpoint DIR (fixed TP x PP, and EP for a MoE model):
  DIR/megatron_lead.json               {"format", "family", "tp", "pp", "ep", "padded_vocab_size",
                                        "arch", "hf_config"} (no "ep": 1)
  DIR/model_tp{t}_pp{p}.safetensors    the Megatron state_dict of rank (tp_rank=t, pp_rank=p):
                                        local-spec names, stage-local layer indices, TP shards;
                                        for a MoE model all but the routed experts
  DIR/experts_tp{t}_pp{p}_ep{e}.safetensors   MoE only: the routed experts of expert-parallel rank
                                        e (EP-local indices), TP-sharded like the dense MLP; the
                                        rest of an EP rank's state is the same on every EP rank,
                                        so it is stored once, above
  DIR/hf/                              the source HF config, tokenizer and generation files
                                        (copied back on export)

Conversions run in one process: HF -> Megatron slices each HF tensor as each shard is written
(reading only the rows a shard needs); Megatron -> HF merges one tensor at a time.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_lead.policy.convert import hf_io
from megatron_lead.policy.convert.arch import (
    ModelArch, arch_from_hf, check_parallel_sizes, load_hf_config, padded_vocab_size)
from megatron_lead.policy.convert.mapping import (
    TE_ALIASES, hf_from_shards, placements, shard_from_hf)

META_FILE = "megatron_lead.json"
HF_FILES_DIR = "hf"
FORMAT = 1
TIED_OUTPUT = "output_layer.weight"  # last stage's copy of a tied embedding (PP > 1)


def shard_file(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank}_pp{pp_rank}.safetensors"


def expert_file(tp_rank: int, pp_rank: int, ep_rank: int) -> str:
    return f"experts_tp{tp_rank}_pp{pp_rank}_ep{ep_rank}.safetensors"


def _files(arch: ModelArch, tp: int, pp: int, ep: int) -> list[tuple[str, int, int, int | None]]:
    """(file name, tp_rank, pp_rank, ep_rank or None for the non-expert file) of a checkpoint."""
    out = [(shard_file(t, p), t, p, None) for p in range(pp) for t in range(tp)]
    if arch.is_moe:
        out += [(expert_file(t, p, e), t, p, e) for p in range(pp) for t in range(tp) for e in range(ep)]
    return out


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt_dir} is not a megatron-lead checkpoint (no {META_FILE})")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format')!r}")
    return meta


def _meta(arch: ModelArch, hf_config: dict, tp: int, pp: int, ep: int = 1) -> dict:
    return {"format": FORMAT, "family": arch.family, "tp": tp, "pp": pp, "ep": ep,
            "padded_vocab_size": padded_vocab_size(arch.vocab_size, tp),
            "arch": arch.to_dict(), "hf_config": hf_config}


def _tied_copy_needed(arch: ModelArch, pp: int) -> bool:
    return arch.tie_embeddings and pp > 1


def ignorable_hf_tensor(hf_name: str, arch: ModelArch) -> bool:
    """An HF tensor that the mapping does not carry and no consumer needs: the one rule for the
    converter and the weight sync (rollout/sync/reload.py).

    Old checkpoints store RoPE buffers; some tied ones also store the (equal) lm_head copy.
    """
    return hf_name.endswith("rotary_emb.inv_freq") or (
        arch.tie_embeddings and hf_name == "lm_head.weight")


def megatron_shard_from_hf(reader, arch: ModelArch, tp: int, pp: int, tp_rank: int, pp_rank: int,
                           ep: int = 1, ep_rank: int = 0, experts: bool | None = None
                           ) -> dict[str, torch.Tensor]:
    """The Megatron state dict of rank (tp_rank, pp_rank, ep_rank), read from an HF tensor reader.

    experts: None for the whole state dict, False for its non-expert tensors only, True for its
    routed experts only (the two files of a MoE checkpoint).
    """
    padded = padded_vocab_size(arch.vocab_size, tp)
    out = {}
    for p in placements(arch, pp, ep):
        if p.stage != pp_rank or (p.ep_rank is not None and p.ep_rank != ep_rank):
            continue
        if experts is None or experts == (p.ep_rank is not None):
            out[p.megatron_name] = shard_from_hf(p, reader, arch, tp, tp_rank, padded)
    if _tied_copy_needed(arch, pp) and pp_rank == pp - 1 and not experts:
        embed = next(p for p in placements(arch, pp) if p.rule.where == "first")
        out[TIED_OUTPUT] = shard_from_hf(embed, reader, arch, tp, tp_rank, padded)
    return out


def hf_to_megatron(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, ep: int = 1,
                   overwrite: bool = False) -> None:
    """Convert an HF folder into a Megatron checkpoint for tp x pp (x ep) ranks, a shard at a time."""
    hf_config = load_hf_config(hf_dir)
    arch = arch_from_hf(hf_config)
    check_parallel_sizes(arch, tp, pp, ep)
    with hf_io.HFReader(hf_dir) as reader, hf_io.atomic_dir(out_dir, overwrite) as tmp:
        expected = {n for p in placements(arch, pp, ep) for n in p.hf_names}
        unknown = sorted(n for n in set(reader.names()) - expected if not ignorable_hf_tensor(n, arch))
        if unknown:
            raise ValueError(f"HF checkpoint {hf_dir} has tensors the {arch.family} table does not "
                             f"map: {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
        for name, tp_rank, pp_rank, ep_rank in _files(arch, tp, pp, ep):
            shard = megatron_shard_from_hf(reader, arch, tp, pp, tp_rank, pp_rank, ep, ep_rank or 0,
                                           experts=ep_rank is not None if arch.is_moe else None)
            save_file({k: v.contiguous() for k, v in shard.items()}, os.path.join(tmp, name),
                      metadata={"format": "pt"})
            del shard
        os.makedirs(os.path.join(tmp, HF_FILES_DIR))
        hf_io.copy_hf_side_files(hf_dir, os.path.join(tmp, HF_FILES_DIR))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(_meta(arch, hf_config, tp, pp, ep), f, indent=2)


def _iter_hf_from_megatron_files(ckpt_dir: str, meta: dict) -> Iterator[tuple[str, torch.Tensor]]:
    arch = ModelArch(**meta["arch"])
    tp, pp, ep = meta["tp"], meta["pp"], meta.get("ep", 1)
    with ExitStack() as stack:
        handles = {}
        for name, tp_rank, pp_rank, ep_rank in _files(arch, tp, pp, ep):
            path = os.path.join(ckpt_dir, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint {ckpt_dir} is missing shard file {name}")
            handles[tp_rank, pp_rank, ep_rank] = (name, stack.enter_context(
                safe_open(path, framework="pt", device="cpu")))
        for p in placements(arch, pp, ep):
            shards = []
            for tp_rank in range(tp):
                name, handle = handles[tp_rank, p.stage, p.ep_rank]
                if p.megatron_name not in handle.keys():
                    raise ValueError(f"checkpoint {ckpt_dir} is missing tensor {p.megatron_name!r} "
                                     f"in {name}")
                shards.append(handle.get_tensor(p.megatron_name))
            yield from zip(p.hf_names, hf_from_shards(p, shards, arch))


def megatron_to_hf(ckpt_dir: str, out_dir: str, overwrite: bool = False) -> None:
    """Export a Megatron checkpoint folder as an HF folder (safetensors + config + tokenizer)."""
    meta = read_meta(ckpt_dir)
    side = os.path.join(ckpt_dir, HF_FILES_DIR)
    hf_io.write_hf_folder(_iter_hf_from_megatron_files(ckpt_dir, meta), out_dir,
                          side_files_dir=side if os.path.isdir(side) else None,
                          config=None if os.path.isdir(side) else meta["hf_config"],
                          overwrite=overwrite)


def model_tensors(model) -> dict[str, torch.Tensor]:
    """A GPTModel's parameters under canonical (local-spec) names; TE names mapped back."""
    from megatron_lead.policy.model import unwrap

    out = {}
    for name, tensor in unwrap(model).state_dict(keep_vars=True).items():
        if name.endswith("_extra_state") or tensor is None:
            continue
        for canonical, te_name in TE_ALIASES.items():
            if name.endswith(te_name):
                name = name[: -len(te_name)] + canonical
        out[name] = tensor
    return out


def is_expert_tensor(megatron_name: str) -> bool:
    """A routed expert's tensor (held by one expert-parallel rank), by its Megatron name."""
    return ".mlp.experts.local_experts." in megatron_name


def rank_layout(arch: ModelArch) -> tuple[int, int, int, int, int, int]:
    """(tp, pp, ep, tp_rank, pp_rank, ep_rank) of this process from Megatron's parallel state.

    The routed experts are split over the expert-parallel group and, within it, over an expert
    tensor-parallel group that this project keeps equal to the TP size (Megatron's default), so
    an expert's shards line up with the dense MLP's.
    """
    from megatron.core import parallel_state as ps

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size() if arch.is_moe else 1
    if arch.is_moe and ps.get_expert_tensor_parallel_world_size() != tp:
        raise ValueError(f"expert tensor-parallel size {ps.get_expert_tensor_parallel_world_size()} "
                         f"differs from tp={tp}; only an equal one is supported")
    ep_rank = ps.get_expert_model_parallel_rank() if ep > 1 else 0
    return tp, pp, ep, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), ep_rank


def load_megatron_checkpoint(model_chunks: list, ckpt_dir: str) -> None:
    """Load this rank's shard into a model built (build_model) for the same model at the same
    TP x PP (x EP)."""
    from megatron_lead.policy.model import unwrap

    meta = read_meta(ckpt_dir)
    arch = unwrap(model_chunks[0]).arch
    tp, pp, ep, tp_rank, pp_rank, ep_rank = rank_layout(arch)
    saved = (meta["tp"], meta["pp"], meta.get("ep", 1))
    if saved != (tp, pp, ep):
        written = f"tp={saved[0]} pp={saved[1]}" + (f" ep={saved[2]}" if arch.is_moe else "")
        ours = f"tp={tp} pp={pp}" + (f" ep={ep}" if arch.is_moe else "")
        raise ValueError(f"checkpoint {ckpt_dir} was written for {written}, this run uses {ours}")
    if ModelArch(**meta["arch"]) != arch:
        diff = [k for k, v in arch.to_dict().items() if meta["arch"].get(k) != v]
        raise ValueError(f"checkpoint {ckpt_dir} is for a different model ({', '.join(diff)} differ)")
    names = [shard_file(tp_rank, pp_rank)] + ([expert_file(tp_rank, pp_rank, ep_rank)] if arch.is_moe else [])
    with ExitStack() as stack:
        source = {}
        for name in names:
            path = os.path.join(ckpt_dir, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint {ckpt_dir} is missing shard file {name}")
            handle = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            source.update({k: handle for k in handle.keys()})
        _copy_into_model(model_chunks[0], set(source), lambda k: source[k].get_tensor(k),
                         f"checkpoint {ckpt_dir} ({' + '.join(names)})")


def _copy_into_model(model, stored: set[str], get, where: str) -> None:
    """Copy every model tensor from `get(name)`; the names must match `stored` exactly."""
    targets = model_tensors(model)
    missing = sorted(set(targets) - stored)
    if missing:
        raise ValueError(f"{where} is missing tensor {missing[0]!r}"
                         + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(stored - set(targets))
    if unexpected:
        raise ValueError(f"{where} has tensor {unexpected[0]!r} the model lacks")
    with torch.no_grad():
        for name, target in targets.items():
            value = get(name)
            if value.shape != target.shape:
                raise ValueError(f"{where}: tensor {name!r} has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            target.copy_(value)


def load_hf_weights(model_chunks: list, hf_dir: str) -> None:
    """Load this rank's TP x PP (x EP) shard straight from an HF folder (no conversion on disk).

    Every rank reads only the rows of the HF tensors its shard needs (safetensors slices), and
    only its own experts.
    """
    from megatron_lead.policy.model import unwrap

    arch = unwrap(model_chunks[0]).arch
    source = arch_from_hf(load_hf_config(hf_dir))
    if source != arch:
        diff = [k for k, v in arch.to_dict().items() if source.to_dict().get(k) != v]
        raise ValueError(f"HF folder {hf_dir} holds a different model ({', '.join(diff)} differ)")
    tp, pp, ep, tp_rank, pp_rank, ep_rank = rank_layout(arch)
    with hf_io.HFReader(hf_dir) as reader:
        shard = megatron_shard_from_hf(reader, arch, tp, pp, tp_rank, pp_rank, ep, ep_rank)
    _copy_into_model(model_chunks[0], set(shard), shard.__getitem__, f"HF folder {hf_dir}")


def save_megatron_checkpoint(model_chunks: list, out_dir: str, hf_source_dir: str | None = None) -> None:
    """Collective: the ranks of data-parallel replica 0 write their shards into out_dir (for a MoE
    model: its non-expert tensors; the ranks of expert-data-parallel replica 0 write the experts).

    Shards go to a temp folder that rank 0 renames once every rank has written. hf_source_dir:
    an HF folder whose config/tokenizer files are kept for export.
    """
    import shutil

    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_lead.policy.model import unwrap
    from megatron_lead.policy.parallel import errors_on_any_rank

    model = unwrap(model_chunks[0])
    tp, pp, ep, tp_rank, pp_rank, ep_rank = rank_layout(model.arch)
    rank = dist.get_rank()
    error = None
    tmp = [None]
    if rank == 0:
        try:
            tmp = [hf_io.make_temp_dir(out_dir, overwrite=True)]
        except Exception as e:  # noqa: BLE001 - broadcast as "no folder", raised below
            error = f"rank 0: {e}"
    dist.broadcast_object_list(tmp, src=0)
    if tmp[0] is not None:  # else rank 0 could not create the folder: its error is in `error`
        try:
            writes = []  # (file, whether it holds the experts) this rank writes
            if parallel_state.get_data_parallel_rank() == 0:
                writes.append((shard_file(tp_rank, pp_rank), False))
            if model.arch.is_moe and parallel_state.get_expert_data_parallel_rank() == 0:
                writes.append((expert_file(tp_rank, pp_rank, ep_rank), True))
            for name, experts in writes:
                tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_tensors(model).items()
                           if is_expert_tensor(k) == experts}
                save_file(tensors, os.path.join(tmp[0], name), metadata={"format": "pt"})
                del tensors
            if rank == 0:
                if hf_source_dir:
                    os.makedirs(os.path.join(tmp[0], HF_FILES_DIR))
                    hf_io.copy_hf_side_files(hf_source_dir, os.path.join(tmp[0], HF_FILES_DIR))
                with open(os.path.join(tmp[0], META_FILE), "w") as f:
                    json.dump(_meta(model.arch, model.hf_config, tp, pp, ep), f, indent=2)
        except Exception as e:  # noqa: BLE001 - every rank must reach errors_on_any_rank below
            error = f"rank {rank}: {e}"
    errors = errors_on_any_rank(error)
    if rank == 0 and tmp[0] is not None:
        if errors:
            shutil.rmtree(tmp[0], ignore_errors=True)
        else:
            hf_io.commit_dir(tmp[0], out_dir)
    dist.barrier()
    if errors:
        raise OSError(f"saving checkpoint {out_dir} failed: {errors[0]}")
