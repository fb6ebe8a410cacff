"""Host memory and time of the distributed optimizer's checkpoint formats, per rank, on CPU.

    .venv/bin/python tools/bench_checkpoint_memory.py [--layouts dp2,tp2dp2] [--hidden 512]
        [--layers 8] [--ffn 1536] [--vocab 8192] [--out FILE.json]

Why: the format decides how much host memory every rank needs while a checkpoint is written and
read (the 1.5B recipe's state is 21 GB in fp32), so the choice is made from measurements. For each
layout (dp2: TP=1 x DP=2, tp2dp2: TP=2 x DP=2; gloo, one process per rank) it builds a random
Qwen2-shaped model in the GPU's configuration (bf16 params, fp32 main params and Adam moments in
Megatron's distributed optimizer), takes one real train step, and measures per rank:

1. Megatron-Core's own formats, saved and loaded natively (`DistributedOptimizer.sharded_state_dict`
   + `dist_checkpointing.save/load` + `load_state_dict`): `dp_reshardable`, `fully_reshardable`,
   `fully_reshardable` with `distrib_optim_fully_reshardable_mem_efficient`, and
   `fully_sharded_model_space` (which Megatron 0.16.1 refuses: its ShardedTensors carry a
   `flattened_range`, which `ShardedTensor.validate_metadata_integrity` rejects).
2. The trainer's own `save_checkpoint` / `load_checkpoint` (trainer/checkpoint.py): at the same
   layout, and at another one (optimizer_reshard.py): the dp2 save at TP=2 x DP=1 and into the
   plain optimizer, the tp2dp2 save at TP=1 x DP=4.

"extra" is the peak resident memory during the call above the resident memory just before it
(VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS), with glibc told to return
every block of 64 KiB or more to the system on free (MALLOC_MMAP_THRESHOLD_), so a freed buffer
is not counted again by the next call. `state` is the fp32 main params + both Adam moments of the
parameters at this TP x PP (what a full gather materialises): 12 bytes per parameter.

Before every native call the distributed optimizer's map from model params to main params is
repaired (optimizer_reshard.fix_param_group_index_map): this model's norm weights are fp32 next
to bf16 weights (Megatron's torch norm, no Transformer Engine on CPU), and with the map as Megatron
builds it `dp_reshardable` cannot even save it. Two CPU-only shims, active only around the native
calls: Megatron's `get_parameter_state_dp_zero` moves its send buffer with `Tensor.cuda()` before
the NCCL all-gather of the non-mem-efficient `fully_reshardable` save (made the identity here, so
the gather runs over gloo into host tensors; on a GPU the receive buffers are on the device, their
copies, the concatenation and the 3 world tensors on the host); and
`_set_main_param_and_optimizer_states` copies every key of the torch optimizer's state, `step`
included, which the `fully_reshardable` loader does not pass (TE's FusedAdam, on GPUs, keeps no
per-parameter `step`): the shim skips the missing key. The first save and load of a process pay
one-off costs (writer start-up), so one untimed dp_reshardable save and load run first.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NATIVE = {
    "dp_reshardable": {"distrib_optim_sharding_type": "dp_reshardable"},
    "fully_reshardable": {"distrib_optim_sharding_type": "fully_reshardable"},
    "fully_reshardable_mem_efficient": {"distrib_optim_sharding_type": "fully_reshardable",
                                        "distrib_optim_fully_reshardable_mem_efficient": True},
    "fully_sharded_model_space": {"distrib_optim_sharding_type": "fully_sharded_model_space"},
}
LAYOUTS = {"dp2": (1, 2), "tp2dp2": (2, 4)}  # name: (tp, world size)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(fn):
    """(result, peak extra resident bytes, seconds) of fn(), after a barrier on every rank."""
    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    dist.barrier()
    return result, max(peak - before, 0), seconds


def hf_config(args) -> dict:
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=args.vocab,
                hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                num_attention_heads=args.hidden // 64, num_key_value_heads=max(args.hidden // 256, 1),
                max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6,
                rope_theta=10000.0, torch_dtype="bfloat16")


def build(args, tp: int, distributed: bool = True):
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.optim import OptimConfig, build_optimizer, wrap_ddp
    from megatron_lead.policy.parallel import init_parallel

    import torch

    init_parallel(tp, 1)
    torch.manual_seed(0)
    cfg = OptimConfig(lr=1e-4, bf16=True, distributed_optimizer=distributed)
    model = wrap_ddp(build_model(hf_config(args), dtype=torch.bfloat16), cfg)
    optimizer, scheduler = build_optimizer(model, cfg)
    return model, optimizer, scheduler


def train_one_step(model, optimizer, scheduler, args) -> None:
    import torch
    from megatron.core import parallel_state

    from megatron_lead.policy.loss import LossConfig
    from megatron_lead.policy.train_step import split_micro_batches, train_step

    g = torch.Generator().manual_seed(1 + parallel_state.get_data_parallel_rank())
    rows, seq = 2, 32
    tokens = torch.randint(0, args.vocab, (rows, seq), generator=g)
    mask = torch.zeros(rows, seq, dtype=torch.bool)
    mask[:, seq // 2:] = True
    old = torch.full((rows, seq), -9.0)
    mbs = split_micro_batches(rows, tokens=tokens, response_mask=mask,
                              advantages=torch.tensor([1.0, -1.0]), old_logprobs=old)
    train_step(model, optimizer, scheduler, mbs, LossConfig(kl_type="none"))


def _metadata(fmt: str) -> dict:
    from megatron.core import parallel_state

    return {"singleton_local_shards": False, "chained_optim_avoid_prefix": True, **NATIVE[fmt],
            "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


class _CpuShims:
    """The two CPU-only shims of the module docstring, for the native calls."""

    def __enter__(self):
        import torch
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        self.cuda, self.set_states = torch.Tensor.cuda, DistributedOptimizer._set_main_param_and_optimizer_states
        real_set = self.set_states

        def set_states(opt, model_param, tensors):
            current = opt._get_main_param_and_optimizer_states(model_param)
            return real_set(opt, model_param, {**{k: v for k, v in current.items() if k not in tensors},
                                               **tensors})

        torch.Tensor.cuda = lambda self, *a, **k: self
        DistributedOptimizer._set_main_param_and_optimizer_states = set_states
        return self

    def __exit__(self, *exc):
        import torch
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        torch.Tensor.cuda = self.cuda
        DistributedOptimizer._set_main_param_and_optimizer_states = self.set_states


def native_save(model, optimizer, folder: str, fmt: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    from megatron_lead.policy.model import unwrap
    from megatron_lead.trainer.optimizer_reshard import fix_param_group_index_map

    import torch.distributed as dist

    os.makedirs(folder, exist_ok=True)  # Megatron saves into an existing, empty folder
    dist.barrier()
    md = _metadata(fmt)
    fix_param_group_index_map(optimizer)
    with _CpuShims():
        sharded = {"model": unwrap(model[0]).sharded_state_dict(metadata=md)}
        sharded["optimizer"] = optimizer.sharded_state_dict(dict(sharded), is_loading=False, metadata=md)
        dist_checkpointing.save(sharded, folder,
                                sharded_strategy=get_default_save_sharded_strategy("torch_dist"))


def native_load(model, optimizer, folder: str, fmt: str) -> None:
    import torch
    from megatron.core import dist_checkpointing

    from megatron_lead.policy.model import unwrap
    from megatron_lead.trainer.optimizer_reshard import fix_param_group_index_map
    from megatron_lead.trainer.safe_load import safe_unpickling

    md = _metadata(fmt)
    fix_param_group_index_map(optimizer)
    sharded = {"model": unwrap(model[0]).sharded_state_dict(metadata=md)}
    sharded["optimizer"] = optimizer.sharded_state_dict(dict(sharded), is_loading=True, metadata=md)
    with safe_unpickling():
        loaded = dist_checkpointing.load(sharded, folder)
    unwrap(model[0]).load_state_dict(loaded["model"], strict=True)
    with _CpuShims(), torch.no_grad():
        optimizer.load_state_dict(loaded["optimizer"])


def state_fingerprint(optimizer) -> float:
    """Sum of |main param| + |exp_avg| + |exp_avg_sq| over this rank's shards (a loaded state
    must match the saved one)."""
    total = 0.0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            for p in group["params"]:
                total += p.detach().double().abs().sum().item()
                for k, v in inner.optimizer.state[p].items():
                    if k != "step":
                        total += v.double().abs().sum().item()
    return total


def _fresh(args, tp, distributed=True):
    from megatron_lead.policy.parallel import destroy_parallel
    from megatron_lead.trainer.optimizer_reshard import prepare_for_loading

    destroy_parallel()
    gc.collect()
    model, optimizer, scheduler = build(args, tp, distributed)
    prepare_for_loading(optimizer)
    return model, optimizer, scheduler


def worker(rank, world, args, layout, folder):
    import faulthandler

    from megatron.core import parallel_state

    faulthandler.dump_traceback_later(args.stack_after, exit=False)  # where a hung rank waits

    from megatron_lead.trainer import checkpoint as ckpt

    tp = LAYOUTS[layout][0]
    model, optimizer, scheduler = build(args, tp)
    train_one_step(model, optimizer, scheduler, args)
    numel = sum(p.numel() for p in model[0].parameters())
    out = {"rank": rank, "params_at_this_tp": numel, "state_bytes": 12 * numel,
           "dp": parallel_state.get_data_parallel_world_size(), "runs": {}}
    reference = state_fingerprint(optimizer)
    warmup = os.path.join(folder, "warmup")  # the first save and load of a process pay one-off costs
    native_save(model, optimizer, warmup, "dp_reshardable")
    native_load(model, optimizer, warmup, "dp_reshardable")

    def record(name, save_fn, load_fn, tp_load=tp, distributed=True, compare=True):
        _, save_extra, save_s = measure(save_fn)
        nonlocal model, optimizer, scheduler
        fresh = _fresh(args, tp_load, distributed)
        _, load_extra, load_s = measure(lambda: load_fn(*fresh))
        ok = abs(state_fingerprint(fresh[1]) - reference) <= 1e-6 * reference if compare else None
        out["runs"][name] = dict(save_extra=save_extra, save_s=save_s, load_extra=load_extra,
                                 load_s=load_s, state_matches=ok)
        return fresh

    for fmt in NATIVE:
        path = os.path.join(folder, fmt)
        try:
            fresh = record(fmt, lambda: native_save(model, optimizer, path, fmt),
                           lambda m, o, s: native_load(m, o, path, fmt))
            model, optimizer, scheduler = fresh
        except Exception as e:  # noqa: BLE001 - reported in the table
            import traceback

            traceback.print_exc()
            out["runs"][fmt] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            from megatron_lead.policy.parallel import destroy_parallel

            destroy_parallel()
            model, optimizer, scheduler = build(args, tp)
            train_one_step(model, optimizer, scheduler, args)
            reference = state_fingerprint(optimizer)

    root = os.path.join(folder, "trainer")
    model, optimizer, scheduler = record(
        "trainer", lambda: ckpt.save_checkpoint(root, 1, model, optimizer, scheduler, {}),
        lambda m, o, s: ckpt.load_checkpoint(ckpt.latest_checkpoint(root), m, o, s))
    others = {"dp2": (("trainer -> TP=2 x DP=1", 2, True), ("trainer -> plain optimizer", 1, False)),
              "tp2dp2": (("trainer -> TP=1 x DP=4", 1, True),)}
    for name, tp_load, distributed in others[layout]:
        fresh = _fresh(args, tp_load, distributed)
        _, extra, seconds = measure(lambda: ckpt.load_checkpoint(ckpt.latest_checkpoint(root), *fresh))
        out["runs"][name] = dict(load_extra=extra, load_s=seconds)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="dp2,tp2dp2")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--out", default=None)
    p.add_argument("--stack-after", type=float, default=1800, help="print every rank's stack after S s")
    args = p.parse_args()
    # Every block of 64 KiB or more is mmapped, so freeing it returns it to the system at once.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "65536"
    from megatron_lead.launch import run_local

    results = {}
    for layout in args.layouts.split(","):
        folder = tempfile.mkdtemp(prefix="bench-ckpt-")
        try:
            results[layout] = run_local(worker, LAYOUTS[layout][1], args, layout, folder, timeout=3600)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    mb = 1 << 20
    for layout, ranks in results.items():
        r0 = ranks[0]
        print(f"\n{layout}: world {len(ranks)}, DP={r0['dp']}, {r0['params_at_this_tp'] / 1e6:.1f}M params "
              f"per TP rank, state (fp32 main + 2 moments) {r0['state_bytes'] / mb:.0f} MiB per TP rank")
        print("| format | save extra MiB per rank | save s | load extra MiB per rank | load s | state ok |")
        print("|---|---|---|---|---|---|")
        for name in r0["runs"]:
            runs = [r["runs"][name] for r in ranks]
            if "error" in runs[0]:
                print(f"| {name} | refused: {runs[0]['error']} | | | | |")
                continue
            cell = lambda key, scale=mb, fmt="{:.0f}": " / ".join(  # noqa: E731
                fmt.format(r[key] / scale) if key in r else "-" for r in runs)
            print(f"| {name} | {cell('save_extra')} | {cell('save_s', 1, '{:.1f}')} | "
                  f"{cell('load_extra')} | {cell('load_s', 1, '{:.1f}')} | "
                  f"{runs[0].get('state_matches', '-')} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
