"""The transport (CPU and GPU): the in-process vLLM worker reloads its weights from our iterator.

The worker's `reload_weights(weights_iterator=...)` (vllm/v1/worker/gpu_worker.py `Worker`, which
the CPU worker subclasses) sets vLLM's current config and runs the model runner's in-place reload:
vLLM's own checkpoint loader over the stream (so HF names and layouts are all it needs, and packed
QKV / gate-up params are filled the way vLLM fills them at start-up), processing each layer as
soon as all its tensors have arrived, so only the current bucket and one partly-loaded layer are
held at any time. One reload call spans all buckets: a layer split over two buckets is still
loaded whole. It also fills weights that a level-2 sleep left uninitialised (`engine.sleep`).
Two vLLM-CPU layouts are redone after each reload: a tied head's oneDNN copy and a MoE layer's
prepacked experts (`_reprocess_tied_layers`, `_repack_cpu_moe_experts`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch

from megatron_lead.rollout.sync.base import WeightSync
from megatron_lead.rollout.sync.stream import NamedTensor


def _reprocess_tied_layers(model: torch.nn.Module) -> None:
    """Re-run weight post-processing of layers that share their weight with another layer.

    A head tied to the embedding (Qwen2.5-0.5B/1.5B) gets no tensor of its own in the stream, so
    vLLM's reload leaves it alone; its weight is the embedding's and is updated in place, but on
    CPU vLLM multiplies with a copy packed for oneDNN at load time, which would stay stale.
    """
    sharing: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.is_meta and weight.numel() > 0:
            sharing.setdefault(weight.data_ptr(), []).append(module)
    for modules in sharing.values():
        if len(modules) < 2:
            continue
        for module in modules:
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)


# vllm/model_executor/model_loader/reload/layerwise.py (`finalize_layerwise_processing`) warns
# "<layer class>: Failed to load weights" for every layer that holds tensors but got none.
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
_NOT_LOADED = "%s: Failed to load weights"


def _layers_without_own_weights(model: torch.nn.Module) -> set[str]:
    """Class names of the layers a checkpoint stream legitimately gives nothing: those whose
    tensors are all buffers vLLM computes itself (RoPE's cos/sin cache) or parameters another
    layer owns too (a head tied to the embedding). A layer with a parameter of its own is never
    in it, so a real miss still warns (and `ReloadWeightSync` raises for a missing tensor)."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                holders[id(param)] = holders.get(id(param), 0) + 1
    names = set()
    for module in model.modules():
        params = [p for p in module._parameters.values() if p is not None]
        if not params and not any(b is not None for b in module._buffers.values()):
            continue
        if all(holders[id(p)] > 1 for p in params):
            names.add(type(module).__name__)
    return names


class _ExpectedNotLoadedFilter(logging.Filter):
    def __init__(self, layer_names: set[str]):
        super().__init__()
        self.layer_names = layer_names

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == _NOT_LOADED and len(record.args or ()) == 1
                    and record.args[0] in self.layer_names)


@contextlib.contextmanager
def _quiet_expected_not_loaded(model: torch.nn.Module):
    """During one reload, drop vLLM's "Failed to load weights" warnings for exactly the layers of
    `_layers_without_own_weights` (two lines per sync otherwise, every step); vLLM keeps their
    tensors as they are, which is right for them."""
    quiet = _ExpectedNotLoadedFilter(_layers_without_own_weights(model))
    logger = logging.getLogger(_RELOAD_LOGGER)
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _repack_cpu_moe_experts(model: torch.nn.Module) -> int:
    """Re-pack the routed experts of a MoE model on vLLM-CPU after a reload; returns how many layers.

    vLLM-CPU multiplies with expert weights prepacked for its grouped GEMM
    (`CPUUnquantizedExperts.process_weights_after_loading`, vllm/model_executor/layers/fused_moe/
    experts/cpu_moe.py). On a reload, `UnquantizedFusedMoEMethod._setup_kernel` (unquantized_
    fused_moe_method.py) sees its kernel already built, treats the call as a weight update and
    copies the freshly loaded, unpacked weights into the packed parameters without running that
    prepack: the engine then computes with scrambled experts (log-probs off by ~0.3 on a tiny
    Qwen3-MoE). Running the experts' own post-load step again packs what was loaded. GPU kernels
    use the weights as loaded, so this only acts on vLLM's CPU experts.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    count = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
            count += 1
    return count


def _reload_in_worker(worker, weights: Iterator[NamedTensor]) -> None:
    """Runs inside vLLM's worker (this process: the engine is in-process). Through the worker, not
    its model runner: the worker sets vLLM's current config, which custom ops and quantisation
    methods read while weights are processed."""
    model = worker.get_model()
    with _quiet_expected_not_loaded(model):
        worker.reload_weights(weights_iterator=weights)
    _reprocess_tied_layers(model)
    _repack_cpu_moe_experts(model)


def checkpoint_tensor_names(model_path: str | Path) -> set[str] | None:
    """Tensor names of the HF checkpoint the engine started from that a weight stream must carry
    (None if not safetensors): all of them but the ones the converter ignores too (RoPE buffers,
    and lm_head.weight when the embeddings are tied: vLLM skips it, the policy streams none)."""
    from safetensors import safe_open

    from megatron_lead.policy.convert.arch import arch_from_hf
    from megatron_lead.policy.convert.checkpoint import ignorable_hf_tensor

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as reader:
            names.update(reader.keys())
    arch = arch_from_hf(model_path)
    return {n for n in names if not ignorable_hf_tensor(n, arch)}


# vLLM-CPU's MoE kernels pad an expert's intermediate size (per vLLM TP rank) to a multiple of
# this (`CPUUnquantizedExperts._intermediate_alignment`, vllm/.../fused_moe/experts/cpu_moe.py).
CPU_MOE_ALIGNMENT = 32


def check_cpu_moe_reloadable(model_path: str | Path, vllm_tp: int) -> None:
    """One-line ValueError if vLLM-CPU cannot reload this MoE model's experts.

    When the expert intermediate size per vLLM TP rank is not a multiple of 32, vLLM-CPU pads the
    experts once at start (`CPUUnquantizedExperts._pad_moe_intermediate`); a reload then copies
    the unpadded weights it loaded into the padded parameters and fails on the shapes
    (`_copy_and_restore_kernel_tensors` in vllm/model_executor/model_loader/reload/layerwise.py).
    Refused here, when the sync is made, instead of at the first step. GPUs do not pad so.
    """
    from megatron_lead.policy.convert.arch import arch_from_hf

    if torch.cuda.is_available():
        return
    arch = arch_from_hf(model_path)
    if arch.is_moe and (arch.moe_ffn_hidden_size // vllm_tp) % CPU_MOE_ALIGNMENT:
        raise ValueError(f"vLLM-CPU cannot reload the experts of this {arch.family} model: "
                         f"moe_intermediate_size={arch.moe_ffn_hidden_size} / vLLM TP {vllm_tp} is not a "
                         f"multiple of {CPU_MOE_ALIGNMENT}, and vLLM's reload of padded experts fails")


class ReloadWeightSync(WeightSync):
    transport = "reload"

    def __init__(self, engine=None):
        super().__init__(engine)
        # A stream that misses a tensor would leave part of a layer unloaded: vLLM only warns.
        self.expected = None if engine is None else checkpoint_tensor_names(engine.config.model_path)
        if engine is not None:
            check_cpu_moe_reloadable(engine.config.model_path, engine.config.tensor_parallel_size)

    def push(self, buckets: Iterator[list[NamedTensor]]) -> None:
        if self.engine.llm is None:
            raise RuntimeError("weight sync into a closed rollout engine")
        seen: set[str] = set()

        def weights():
            for bucket in buckets:
                for name, tensor in bucket:
                    seen.add(name)
                    yield name, tensor

        self.engine.llm.collective_rpc(_reload_in_worker, args=(weights(),))
        # KV blocks cached for earlier prompts were computed with the old weights.
        self.engine.llm.reset_prefix_cache()
        missing = sorted(self.expected - seen) if self.expected is not None else []
        if missing:
            raise ValueError(f"weight sync stream lacks {len(missing)} of the model's tensors "
                             f"(e.g. {missing[0]}); the engine's weights are now inconsistent")
