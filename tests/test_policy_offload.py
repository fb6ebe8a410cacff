"""TrainStateOffload on CPU: the gradients, the optimizer state and the weights leave (their storages
are freed) and come back bit for bit, and training after a round trip equals training without one.

One spawn of two processes runs the layouts one after another:
    TP=2, bf16 params with fp32 main params (Megatron's Float16Optimizer)
    DP=2, bf16 and the distributed optimizer (fp32 main shards, Adam shards)
    DP=2, fp32 and the distributed optimizer (its shards are views into the fp32 params)
In each, two policies load the same weights and take the same two steps; one of them offloads
and reloads everything between the steps, as a colocated step does around generation.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lead.launch import run_local
from rollout_tiny import save_tiny_qwen2

pytestmark = pytest.mark.slow

LAYOUTS = [dict(tp=2, bf16=True, distributed=False), dict(tp=1, bf16=True, distributed=True),
           dict(tp=1, bf16=False, distributed=True)]


def _policy(hf_dir, bf16, distributed):
    from megatron_lead.policy.convert.checkpoint import load_hf_weights
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.optim import OptimConfig, build_optimizer, wrap_ddp

    cfg = OptimConfig(lr=1e-2, bf16=bf16, distributed_optimizer=distributed)
    model = build_model(hf_dir, dtype=torch.bfloat16 if bf16 else torch.float32, init_weights=False)
    load_hf_weights(model, hf_dir)
    model = wrap_ddp(model, cfg)
    optimizer, scheduler = build_optimizer(model, cfg)
    return model, optimizer, scheduler


def _step(policy, seed):
    from megatron.core import parallel_state

    from megatron_lead.policy.loss import LossConfig
    from megatron_lead.policy.train_step import MicroBatch, train_step

    g = torch.Generator().manual_seed(seed * 10 + parallel_state.get_data_parallel_rank())
    tokens = torch.randint(0, 250, (2, 10), generator=g)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 4:] = True
    mb = MicroBatch(tokens=tokens, response_mask=mask, advantages=torch.randn(2, generator=g),
                    old_logprobs=torch.full((2, 10), -5.5))
    return train_step(*policy, [mb], LossConfig(kl_coef=0.0))


def _snapshot(offload) -> dict[str, list[torch.Tensor]]:
    """Every tensor the offload moves, copied (the byte-exact 'before')."""
    return {kind: [t.detach().clone() for t in offload._tensors(kind)] for kind in ("grads", "optimizer", "weights")}


def _nbytes(tensors) -> list[int]:
    return [t.untyped_storage().nbytes() for t in tensors]


def _layouts(rank, world, hf_dir):
    from megatron_lead.policy.offload import TrainStateOffload
    from megatron_lead.policy.parallel import destroy_parallel, init_parallel

    out = []
    for layout in LAYOUTS:
        init_parallel(layout["tp"], 1)
        moved, plain = _policy(hf_dir, layout["bf16"], layout["distributed"]), \
            _policy(hf_dir, layout["bf16"], layout["distributed"])
        first = [_step(moved, 1), _step(plain, 1)]
        offload = TrainStateOffload(moved[0], moved[1])
        before = _snapshot(offload)
        sizes = {k: sum(t.numel() * t.element_size() for t in v) for k, v in before.items()}
        sizes["params"] = sum(p.numel() for chunk in moved[0] for p in chunk.parameters())
        opt_grad_bytes = offload.offload_optimizer_and_grads()
        freed_after_first = {k: all(n == 0 for n in _nbytes(offload._tensors(k))) for k in before}
        weight_bytes = offload.offload_weights()
        freed_after_weights = all(n == 0 for n in _nbytes(offload._tensors("weights")))
        back = offload.reload()
        after = _snapshot(offload)
        exact = {k: len(before[k]) == len(after[k]) and all(
            a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            for a, b in zip(before[k], after[k])) for k in before}
        # A second round trip reuses the host buffers (allocated once).
        buffers = {k: v.data_ptr() for k, v in offload._host.items()}
        offload.offload_optimizer_and_grads()
        offload.reload()
        second = [_step(moved, 2), _step(plain, 2)]
        weights_equal = all(torch.equal(a, b) for a, b in zip(offload._tensors("weights"),
                                                              TrainStateOffload(plain[0], plain[1])._tensors("weights")))
        out.append(dict(layout=layout, first=first, second=second, sizes=sizes, exact=exact,
                        opt_grad_bytes=opt_grad_bytes, weight_bytes=weight_bytes, back=back,
                        freed_after_first=freed_after_first, freed_after_weights=freed_after_weights,
                        reused=buffers == {k: v.data_ptr() for k, v in offload._host.items()},
                        weights_equal=weights_equal,
                        optimizer_kind=type(moved[1].chained_optimizers[0]).__name__))
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    hf_dir = save_tiny_qwen2(tmp_path_factory.mktemp("offload") / "hf", seed=0)
    return run_local(_layouts, 2, hf_dir)


@pytest.mark.parametrize("index", range(len(LAYOUTS)))
def test_round_trip_is_bit_exact_and_really_frees(results, index):
    for rank in results:
        r = rank[index]
        print(r["layout"], r["optimizer_kind"], r["sizes"])
        assert r["optimizer_kind"] == ("DistributedOptimizer" if r["layout"]["distributed"]
                                       else "Float16OptimizerWithFloat16Params")
        # Adam's moments exist after a step, and there are gradients in the buffer to keep.
        assert r["sizes"]["optimizer"] > 0 and r["sizes"]["grads"] > 0
        assert r["exact"] == {"grads": True, "optimizer": True, "weights": True}
        # The first call frees gradients and optimizer state but not the weights (the sync reads them).
        assert r["freed_after_first"] == {"grads": True, "optimizer": True, "weights": False}
        assert r["freed_after_weights"]
        assert r["back"] == r["opt_grad_bytes"] + r["weight_bytes"] > 0
        assert r["reused"]


@pytest.mark.parametrize("index", range(len(LAYOUTS)))
def test_training_after_a_round_trip_equals_training_without(results, index):
    for rank in results:
        r = rank[index]
        moved, plain = r["first"]
        assert moved == plain
        moved, plain = r["second"]
        assert moved == plain and moved["grad_norm"] > 0 and moved["skipped"] == 0.0
        assert r["weights_equal"]


def test_bytes_moved_are_the_state_the_planner_counts(results):
    """DP=2, bf16, distributed optimizer: the fp32 grad buffer (4 B/param, padded to Megatron's
    bucket alignment) and this rank's half of the fp32 main params and both Adam moments
    (12 B/param / 2)."""
    for rank in results:
        r = rank[1]
        params = r["sizes"]["params"]
        assert 4 * params <= r["sizes"]["grads"] < 4 * params * 1.01
        assert abs(r["sizes"]["optimizer"] - 6 * params) / (6 * params) < 0.01
        assert r["opt_grad_bytes"] == r["sizes"]["grads"] + r["sizes"]["optimizer"]
