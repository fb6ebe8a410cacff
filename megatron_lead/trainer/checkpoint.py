"""Training checkpoints: Megatron distributed checkpointing of the model and optimizer, plus the
lr schedule, the trainer's global state and every rank's RNG states.

On-disk layout under ROOT (one folder per saved step):

  ROOT/step_00000012/                 a complete checkpoint (it has complete.json)
    metadata.json, common.pt,         Megatron dist_checkpointing (torch_dist): the model's
    __{rank}_{n}.distcp, .metadata    sharded_state_dict under "model" ("model{i}" per chunk) and
                                      the optimizer's under "optimizer"; tensors are stored as
                                      global (TP/PP-independent) tensors, so they load at any
                                      layout; the distributed optimizer's as each DP rank's shard
                                      of its buckets (Megatron's dp_reshardable)
    optimizer_index.json              with the distributed optimizer: where each parameter lies in
                                      the buckets of each TP x PP group (optimizer_reshard.py)
    scheduler.json                    OptimizerParamScheduler.state_dict()
    trainer_state.json                the trainer's `state` (step, LEAD controller, data position)
    rng/rank{R}.pt                    rank R's RNG states (torch CPU, CUDA, python, numpy, Megatron's
                                      tensor-parallel tracker): tensors, ints, floats, lists only
    manifest.json                     SHA-256 and size of every file above (safe_load.py)
    complete.json                     written last: format, step, world/tp/pp/dp sizes, ...
  ROOT/.tmp_step_00000012/            a save in progress (or one killed mid-way): never loaded

A save writes everything into the temp folder; once every rank has written its shards (a
collective error check, which is also a barrier) the ranks hash the files, rank 0 writes
manifest.json, then complete.json, syncs them and renames the folder. A folder without complete.json, or with a name other than step_*, is never picked by
`latest_checkpoint`; `load_checkpoint` refuses it.

Loading never runs code from the folder: the manifest is verified before anything is unpickled,
and Megatron's load runs under `safe_load.safe_unpickling` (an allow-list unpickler for DCP's
`.metadata`, `torch.load(weights_only=True)` for everything else). Format-1 checkpoints (before
manifests) still load, through the same safe loaders.

Resharding: the model and optimizer states load at any TP/PP/DP layout (Megatron's sharded format:
every tensor is a slice of a global tensor, padded vocab rows included). The distributed
optimizer's state is saved without any gather (dp_reshardable, docs/GPU.md has the measurements);
Megatron loads it back where the buckets are the same (same TP x PP, any DP), optimizer_reshard.py
everywhere else, the plain optimizer included. The RNG states are per-rank, so they are restored
only at the saved layout.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_lead.trainer import optimizer_reshard, safe_load, shard_writers

CHECKPOINT_PREFIX = "step_"
TEMP_PREFIX = ".tmp_step_"
DELETE_PREFIX = ".del_step_"
MARKER_FILE = "complete.json"
STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.json"
RNG_DIR = "rng"
FORMAT = 2
_READABLE_FORMATS = (1, 2)  # 1: no manifest.json
_STEP_DIR = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
# torch.distributed.checkpoint raises CheckpointException, a BaseException, on every rank when
# one rank's read or write failed.
_ERRORS = (Exception, CheckpointException)


def checkpoint_dir(root: str, step: int) -> str:
    return os.path.join(root, f"{CHECKPOINT_PREFIX}{step:08d}")


# --------------------------------------------------------------------------- finding checkpoints


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _is_complete(path: str) -> bool:
    try:
        marker = _read_json(os.path.join(path, MARKER_FILE))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") in _READABLE_FORMATS


def _complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of the complete step_* folders under root, oldest step first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path) and _is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    """The complete step_* folder under root with the highest step; None if there is none.

    Temp folders (a save in progress or killed) and folders without complete.json are ignored.
    """
    found = _complete_checkpoints(root)
    return found[-1][1] if found else None


# --------------------------------------------------------------------------- state dicts


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state

    return {"world_size": dist.get_world_size(),
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size()}


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def _sharding_metadata(optimizer) -> dict:
    """The JSON part of the metadata passed to the sharded_state_dict methods (as Megatron-LM).

    The distributed optimizer (GPU) is saved "dp_reshardable": every rank writes its own shard,
    with no gather (the fully_reshardable formats hold the whole fp32 state on a rank while saving
    and loading: docs/GPU.md has the measurements). optimizer_reshard.py loads it at any layout.
    """
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if optimizer is not None and _uses_distributed_optimizer(optimizer):
        metadata["distrib_optim_sharding_type"] = "dp_reshardable"
    return metadata


def _sharded_keys(sharded: dict) -> set[str]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return {v.key for v in nested_values(sharded) if hasattr(v, "key")}


def _with_groups(metadata: dict) -> dict:
    from megatron.core import parallel_state

    return {**metadata,
            "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def _model_sharded_state_dict(model_chunks: list, metadata: dict) -> dict:
    from megatron_lead.policy.model import unwrap

    chunks = [unwrap(m) for m in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=metadata)}
    return {f"model{i}": m.sharded_state_dict(metadata=metadata) for i, m in enumerate(chunks)}


def _optimizer_has_state(optimizer) -> bool:
    """Collective: whether any rank's optimizer has state (a distributed optimizer's shard can be
    empty on one rank while the others have theirs)."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    mine = any(len(o.optimizer.state) > 0 for o in inner if getattr(o, "optimizer", None) is not None)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return any(everyone)


def _ensure_init_state_fn(optimizer) -> None:
    """Give SGD an init_state_fn: Megatron sets none for it, but calls it to build the state to
    load into (sharded_state_dict(is_loading=True)). Zero momentum buffers, as after Adam's init."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(inner, "init_state_fn", 0) is not None:
            continue

        def init_sgd(opt, config=None):
            for group in opt.param_groups:
                if group.get("momentum", 0) != 0:
                    for p in group["params"]:
                        if "momentum_buffer" not in opt.state[p]:
                            opt.state[p]["momentum_buffer"] = torch.zeros_like(p.data)

        inner.init_state_fn = init_sgd


# --------------------------------------------------------------------------- RNG states


def _rng_states() -> dict:
    import numpy as np
    from megatron.core import tensor_parallel

    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_gauss)},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    if all(isinstance(v, torch.Tensor) for v in tracker.values()):
        out["tracker"] = {name: state.clone() for name, state in tracker.items()}
    return out


def _set_rng_states(states: dict) -> None:
    import numpy as np
    from megatron.core import tensor_parallel

    torch.set_rng_state(states["torch"])
    py = states["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = states["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "tracker" in states:
        tensor_parallel.get_cuda_rng_tracker().set_states(dict(states["tracker"]))


# --------------------------------------------------------------------------- saving


def _write_rng(path: str, states: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        torch.save(states, f)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj, indent=2))
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _collective_check(error: str | None, what: str, path: str, cleanup: str | None = None) -> None:
    """Raise OSError on every rank if any rank failed; rank 0 removes `cleanup` first."""
    from megatron_lead.policy.parallel import errors_on_any_rank

    errors = errors_on_any_rank(error)
    if errors:
        if cleanup and dist.get_rank() == 0:
            shutil.rmtree(cleanup, ignore_errors=True)
        dist.barrier()  # the temp folder is gone before any rank raises
        raise OSError(f"{what} checkpoint {path} failed: {errors[0]}")


def _one_line(e: BaseException) -> str:
    if isinstance(e, CheckpointException) and e.failures:  # the first failing rank's own error
        rank, (inner, _) = next(iter(sorted(e.failures.items(), key=lambda kv: kv[0])))
        return f"{_one_line(inner)} (read/written by rank {rank})"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def _commit(tmp: str, final: str) -> None:
    """Rename the finished temp folder to final (replacing an older folder of the same step)."""
    if os.path.exists(final):
        old = os.path.join(os.path.dirname(final), DELETE_PREFIX + os.path.basename(final)[len(CHECKPOINT_PREFIX):])
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))


def _prune(root: str, keep_last: int) -> None:
    """Rank 0, after a save (best effort): delete the complete checkpoints older than the newest
    keep_last, and what killed saves and deletions left (.tmp_step_* / .del_step_* folders; one
    trainer saves into a root at a time, so none of them is in progress).

    A checkpoint is first renamed to a .del_step_* name, so a half-deleted folder is never taken
    for a checkpoint."""
    for name in os.listdir(root):
        if name.startswith((TEMP_PREFIX, DELETE_PREFIX)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep_last <= 0:
        return
    for _, path in _complete_checkpoints(root)[:-keep_last]:
        doomed = os.path.join(root, DELETE_PREFIX + os.path.basename(path)[len(CHECKPOINT_PREFIX):])
        try:
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(path, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(root: str, step: int, model_chunks: list, optimizer, scheduler, state: dict,
                    keep_last: int = 3) -> str:
    """Collective over all ranks: write ROOT/step_{step:08d} and return its path.

    model_chunks: this rank's chunks (DDP-wrapped or not); optimizer, scheduler: from
    policy.optim.build_optimizer; state: the trainer's global state, JSON-able (rank 0's copy is
    written). keep_last: complete checkpoints to keep, this one included (0 keeps all).
    A failure on any rank raises OSError on every rank and leaves no step folder behind.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    if step < 0 or keep_last < 0:
        raise ValueError(f"save_checkpoint needs step >= 0 and keep_last >= 0, got {step}, {keep_last}")
    root = os.path.abspath(root)
    final = checkpoint_dir(root, step)
    tmp = os.path.join(root, f"{TEMP_PREFIX}{step:08d}")
    rank = dist.get_rank()

    # 1. Every rank: its RNG states (before anything below could draw from them) and a check
    #    that the state serialises; rank 0 makes a fresh, empty temp folder.
    error = None
    try:
        rng = _rng_states()
        state_text = json.dumps(state, indent=2)
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save of the same step
            os.makedirs(tmp)
    except Exception as e:  # noqa: BLE001 - raised on every rank below
        error = f"rank {rank}: {_one_line(e)}"
    _collective_check(error, "saving", final, cleanup=tmp)

    # 2. Model + optimizer shards (Megatron's collectives; its own errors reach every rank),
    #    then this rank's RNG file.
    metadata = _sharding_metadata(optimizer)
    has_optimizer_state = optimizer is not None and _optimizer_has_state(optimizer)
    index = None  # this rank's part of optimizer_index.json (the distributed optimizer)
    try:
        sharded = _model_sharded_state_dict(model_chunks, _with_groups(metadata))
        if has_optimizer_state:
            optimizer_reshard.fix_param_group_index_map(optimizer)
            model_sd = {k: v for k, v in sharded.items()}
            sharded["optimizer"] = optimizer.sharded_state_dict(
                model_sd, is_loading=False, metadata=_with_groups(metadata))
            if "distrib_optim_sharding_type" in metadata:
                index = optimizer_reshard.index_entries(optimizer, model_sd,
                                                        _sharded_keys(sharded["optimizer"]))
        shard_writers.in_process_results_queue()
        with shard_writers.die_with_the_trainer():
            dist_checkpointing.save(sharded, tmp,
                                    sharded_strategy=get_default_save_sharded_strategy("torch_dist"))
        _write_rng(os.path.join(tmp, RNG_DIR, f"rank{rank}.pt"), rng)
    except _ERRORS as e:
        error = f"rank {rank}: {_one_line(e)}"
    _collective_check(error, "saving", final, cleanup=tmp)

    # 3. Rank 0, after every rank's shards are written: the global files.
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, index)
    if rank == 0:
        try:
            if index is not None:
                _write_json(os.path.join(tmp, optimizer_reshard.INDEX_FILE),
                            json.dumps(optimizer_reshard.merge_index(parts)))
            _write_json(os.path.join(tmp, STATE_FILE), state_text)
            _write_json(os.path.join(tmp, SCHEDULER_FILE),
                        scheduler.state_dict() if scheduler is not None else None)
            _fsync_dir(os.path.join(tmp, RNG_DIR))
        except Exception as e:  # noqa: BLE001
            error = f"rank 0: {_one_line(e)}"
    _collective_check(error, "saving", final, cleanup=tmp)

    # 4. Every rank hashes its share of the files; rank 0 writes the manifest, the marker last,
    #    and renames the folder.
    entries: dict = {}
    try:
        files = [safe_load.checkpoint_files(tmp) if rank == 0 else None]
        dist.broadcast_object_list(files, src=0)
        share = safe_load.hash_share(tmp, files[0], rank, dist.get_world_size())
    except Exception as e:  # noqa: BLE001
        share, error = {}, f"rank {rank}: {_one_line(e)}"
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, share)
    _collective_check(error, "saving", final, cleanup=tmp)
    if rank == 0:
        try:
            for part in shares:
                entries.update(part)
            safe_load.write_manifest(tmp, entries)
            marker = {"format": FORMAT, "step": step, **_layout(),
                      "optimizer_state": has_optimizer_state, "sharding_metadata": metadata}
            _write_json(os.path.join(tmp, MARKER_FILE), marker)
            _fsync_dir(tmp)
            _commit(tmp, final)
        except Exception as e:  # noqa: BLE001
            error = f"rank 0: {_one_line(e)}"
    _collective_check(error, "saving", final, cleanup=tmp)

    if rank == 0:
        _prune(root, keep_last)
    dist.barrier()
    return final


# --------------------------------------------------------------------------- loading


def _check_folder(path: str) -> tuple[dict, dict, Any]:
    """(marker, state, scheduler state) of a complete checkpoint folder, else a one-line error."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    marker_path = os.path.join(path, MARKER_FILE)
    if not os.path.isfile(marker_path):
        raise ValueError(f"checkpoint {path} is incomplete (no {MARKER_FILE})")
    try:
        marker = _read_json(marker_path)
        state = _read_json(os.path.join(path, STATE_FILE))
        sched = _read_json(os.path.join(path, SCHEDULER_FILE))
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is corrupt: {_one_line(e)}") from None
    if not isinstance(marker, dict) or marker.get("format") not in _READABLE_FORMATS:
        raise ValueError(f"checkpoint {path} is corrupt: unknown {MARKER_FILE} format")
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} is corrupt: {STATE_FILE} is not an object")
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise ValueError(f"checkpoint {path} is corrupt: no dist-checkpoint metadata.json")
    return marker, state, sched


def load_checkpoint(path: str, model_chunks: list, optimizer, scheduler,
                    load_optimizer: bool = True) -> dict:
    """Collective: load a checkpoint written by save_checkpoint into the current layout.

    The model (and, with load_optimizer, the optimizer state and lr schedule) are resharded to
    the current TP/PP/DP. RNG states are restored only when the layout equals the saved one.
    Returns the trainer state dict. A missing folder raises FileNotFoundError, an incomplete or
    corrupt one ValueError (one line, naming the path), on every rank.
    """
    from megatron.core import dist_checkpointing

    path = os.path.abspath(path)
    rank = dist.get_rank()

    # 1. Every rank checks the folder and its share of the manifest (before anything is
    #    unpickled); all raise the first rank's error, with its type.
    failure = None
    try:
        marker, state, sched = _check_folder(path)
        if marker["format"] >= 2:
            try:
                safe_load.verify_share(path, safe_load.read_manifest(path), rank, dist.get_world_size())
            except (OSError, ValueError) as e:
                msg = str(e) if isinstance(e, ValueError) else _one_line(e)
                raise ValueError(f"checkpoint {path} is corrupt or was modified: {msg}") from None
    except (FileNotFoundError, ValueError) as e:
        failure = json.dumps([type(e).__name__, str(e)])
    failures: list = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    failures = [f for f in failures if f]
    if failures:
        kind, message = json.loads(failures[0])
        raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(message)

    # 2. Model (+ optimizer) shards, resharded to this layout by Megatron (or, for a distributed
    #    optimizer's state at another layout, by optimizer_reshard).
    metadata = marker.get("sharding_metadata") or {}
    with_optimizer = load_optimizer and optimizer is not None and marker.get("optimizer_state")
    error, index, megatron_loads, plan = None, None, True, None
    try:
        if with_optimizer:
            index, megatron_loads = _optimizer_route(path, marker, optimizer)
    except (OSError, ValueError) as e:
        error = f"rank {rank}: {_one_line(e)}"
    _raise_load_error(error, path)
    agreed: list = [None] * dist.get_world_size()
    dist.all_gather_object(agreed, megatron_loads)
    try:
        sharded = _model_sharded_state_dict(model_chunks, _with_groups(metadata))
        if with_optimizer:
            _ensure_init_state_fn(optimizer)
            model_sd = {k: v for k, v in sharded.items()}
            if index is not None or _uses_distributed_optimizer(optimizer):
                optimizer_reshard.fix_param_group_index_map(optimizer)
                optimizer_reshard.prepare_for_loading(optimizer)
            if all(agreed):
                sharded["optimizer"] = optimizer.sharded_state_dict(
                    model_sd, is_loading=True, metadata=_with_groups(metadata))
            else:
                plan = optimizer_reshard.ReshardPlan(index, optimizer, model_sd)
                sharded[optimizer_reshard.PIECES] = plan.sharded()
        with safe_load.safe_unpickling():
            loaded = dist_checkpointing.load(sharded, path)
    except _ERRORS as e:  # Megatron's and DCP's errors are multi-line
        error = f"rank {rank}: {_one_line(e)}"
    _raise_load_error(error, path)

    # 3. Copy into the model, optimizer, scheduler; RNG at the same layout only.
    try:
        from megatron_lead.policy.model import unwrap

        keys = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
        for key, chunk in zip(keys, model_chunks):
            unwrap(chunk).load_state_dict(loaded[key], strict=True)
        if plan is not None:
            plan.apply(loaded[optimizer_reshard.PIECES], optimizer)
        elif with_optimizer:
            with torch.no_grad():  # the fp32 distributed optimizer's main params are views of the weights
                optimizer.load_state_dict(loaded["optimizer"])
            if index is not None:
                optimizer_reshard.set_steps(optimizer, index["steps"])
        elif optimizer is not None:
            optimizer.reload_model_params()  # mixed precision: main params from the new weights
        if load_optimizer and scheduler is not None and sched is not None:
            scheduler.load_state_dict(sched)
        if all(marker.get(k) == v for k, v in _layout().items()):
            rng_path = os.path.join(path, RNG_DIR, f"rank{rank}.pt")
            _set_rng_states(torch.load(rng_path, weights_only=True))
    except Exception as e:  # noqa: BLE001
        error = f"rank {rank}: {_one_line(e)}"
    _raise_load_error(error, path)
    return state


def _optimizer_route(path: str, marker: dict, optimizer) -> tuple[dict | None, bool]:
    """(optimizer_index.json or None, whether Megatron's own loader fits) for this rank.

    Megatron loads the plain optimizer's state at any layout, and a dp_reshardable one where the
    buckets are the same; optimizer_reshard the latter everywhere else."""
    saved = (marker.get("sharding_metadata") or {}).get("distrib_optim_sharding_type")
    if saved is None and _uses_distributed_optimizer(optimizer):
        raise ValueError("it holds the plain optimizer's state: resume it with "
                         "optim.distributed_optimizer=false, or without its optimizer state")
    if saved != "dp_reshardable":
        return None, True
    try:
        index = _read_json(os.path.join(path, optimizer_reshard.INDEX_FILE))
    except (OSError, ValueError) as e:
        raise ValueError(f"it is corrupt: {_one_line(e)}") from None
    same = all(marker.get(k) == v for k, v in _layout().items() if k in ("tp", "pp"))
    return index, same and optimizer_reshard.megatron_can_load(index, optimizer)


def _raise_load_error(error: str | None, path: str) -> None:
    from megatron_lead.policy.parallel import errors_on_any_rank

    errors = errors_on_any_rank(error)
    if errors:
        raise ValueError(f"checkpoint {path} could not be loaded: {errors[0]}")
