"""The transport (CPU and GPU): the in-process vLLM worker reloads its weights from our iterator.

The worker's `reload_weights(weights_iterator=...)` (vllm/v1/worker/gpu_worker.py `Worker`, which
the CPU worker subclasses) sets vLLM's current config and runs the model runner's in-place reload:
vLLM's own checkpoint loader over the stream (so HF names and layouts are all it needs, and packed
QKV / gate-up params are filled the way vLLM fills them at start-up), processing each layer as
soon as all its tensors have arrived, so only the current bucket and one partly-loaded layer are
held at any time. One reload call spans all buckets: a layer split over two buckets is still
loaded whole. It also fills weights that a level-2 sleep left uninitialised (`engine.sleep`).
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


def _reload_in_worker(worker, weights: Iterator[NamedTensor]) -> None:
    """Runs inside vLLM's worker (this process: the engine is in-process). Through the worker, not
    its model runner: the worker sets vLLM's current config, which custom ops and quantisation
    methods read while weights are processed."""
    model = worker.get_model()
    with _quiet_expected_not_loaded(model):
        worker.reload_weights(weights_iterator=weights)
    _reprocess_tied_layers(model)


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


class ReloadWeightSync(WeightSync):
    transport = "reload"

    def __init__(self, engine=None):
        super().__init__(engine)
        # A stream that misses a tensor would leave part of a layer unloaded: vLLM only warns.
        self.expected = None if engine is None else checkpoint_tensor_names(engine.config.model_path)

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
