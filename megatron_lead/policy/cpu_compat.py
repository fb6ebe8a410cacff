"""Let Megatron-Core run on a CPU-only machine (tests, CI). Active only when CUDA is unavailable.

Megatron-Core 0.16 assumes a GPU in a handful of places. `apply()` redirects exactly these, and
nothing else; on a machine with CUDA it does nothing. The redirects:

1. `torch.cuda.current_device()` returns `torch.device("cpu")`: Megatron allocates buffers with
   `device=torch.cuda.current_device()` (RoPE inv_freq, TP all-gather outputs, PP p2p buffers).
2. `torch.cuda.synchronize()` is a no-op (called after PP p2p and in a few timers).
3. The CUDA RNG tracker (`tensor_parallel.random`): `_get_cuda_rng_state` / `_set_cuda_rng_state`
   read and write the CPU generator, and `CudaRNGStatesTracker.add` seeds its named states from a
   private CPU generator, so `model_parallel_cuda_manual_seed` works.
4. The pipeline schedules (`forward_backward_no_pipelining`, `..._pipelining_without_interleaving`,
   `..._with_interleaving`) create `torch.zeros(..., device="cuda")` token counters: they run
   under a torch-function mode that maps a "cuda" device argument to "cpu".
5. `LanguageModule.setup_embeddings_and_output_layer` moves the tied embedding copy of the last
   pipeline stage with `weight.data.cuda()` before its all-reduce: it runs with `Tensor.cuda`
   returning the tensor unchanged.
6. Optimizers: `FP32Optimizer.__init__` and `MixedPrecisionOptimizer.__init__` create their
   loss-scale tensors on "cuda": they run under the same torch-function mode as (4).
7. The mixed-precision and distributed optimizers (`Float16OptimizerWithFloat16Params`,
   `DistributedOptimizer`) sort their params by `param.type()` against the strings
   "torch.cuda.FloatTensor" / "torch.cuda.BFloat16Tensor" / "torch.cuda.HalfTensor" and raise on
   anything else: their `__init__` runs with `Tensor.type()` (no argument) answering the CUDA name
   of a CPU tensor's type. With that, bf16 params with fp32 main params, and the distributed
   optimizer's reduce-scatter / all-gather over gloo, run on CPU (tests: offload, checkpoints).
8. Grad norm and clipping (`optimizer.clip_grads`, also as imported into `optimizer.optimizer`):
   `get_grad_norm_fp32` and `count_zeros_fp32` run under that mode; `clip_grad_by_total_norm_fp32`
   (which asserts `torch.cuda.FloatTensor` grads) is replaced by the same formula on CPU tensors.

What the caller must still set on CPU (config, not patches; `policy.model.build_model` does it):
dropout off (attention_dropout = hidden_dropout = 0), `use_cpu_initialization=True`, no fused
kernels (rope/bias-dropout/softmax/gradient-accumulation fusion off), and an explicit attention
mask when Megatron's own DotProductAttention is used (our SDPA core attention needs none).
bf16 and the distributed optimizer are off by default on CPU (`OptimConfig`), and allowed there
for the tests that check the GPU's configuration (offload, checkpoint formats, bf16 ratios).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def needed() -> bool:
    return not torch.cuda.is_available()


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites `device="cuda"` (or cuda:N) keyword arguments of torch calls to "cpu"."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def _run_with_cuda_device_on_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaDeviceToCpu():
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _tensor_type_answers_cuda():
    original = torch.Tensor.type

    def cuda_type(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if not args and not kwargs and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch."):]
        return name

    torch.Tensor.type = cuda_type
    try:
        yield
    finally:
        torch.Tensor.type = original


def _init_with_cuda_type_names(init):
    @functools.wraps(init)
    def wrapper(*args, **kwargs):
        with _tensor_type_answers_cuda():
            return init(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _tracker_add_on_cpu(self, name, seed):
    # Same bookkeeping as CudaRNGStatesTracker.add, but the state comes from a CPU generator.
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    # Megatron's version: scale every grad by max_norm / (total_norm + 1e-6) when that is < 1.
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def apply() -> bool:
    """Install the redirects above once per process; returns whether they are active."""
    global _applied
    if _applied or not needed():
        return _applied
    from megatron_lead.versions import require
    require("megatron-core")  # the redirects below replace Megatron internals of this release
    from megatron.core.models.common.language_module import language_module
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    mrandom.CudaRNGStatesTracker.add = _tracker_add_on_cpu

    # get_forward_backward_func() looks these names up in the module at call time.
    for name in ("forward_backward_no_pipelining",
                 "forward_backward_pipelining_without_interleaving",
                 "forward_backward_pipelining_with_interleaving"):
        setattr(schedules, name, _run_with_cuda_device_on_cpu(getattr(schedules, name)))

    setup = language_module.LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(setup)
    def setup_on_cpu(self, *args, **kwargs):
        with _tensor_cuda_is_identity():
            return setup(self, *args, **kwargs)

    language_module.LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu

    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    for cls in (optimizer.FP32Optimizer, optimizer.MixedPrecisionOptimizer):
        cls.__init__ = _run_with_cuda_device_on_cpu(cls.__init__)
    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        cls.__init__ = _init_with_cuda_type_names(cls.__init__)
    grad_norm = _run_with_cuda_device_on_cpu(clip_grads.get_grad_norm_fp32)
    count_zeros = _run_with_cuda_device_on_cpu(clip_grads.count_zeros_fp32)
    for module in (clip_grads, optimizer):  # optimizer.py imported the functions by name
        module.get_grad_norm_fp32 = grad_norm
        module.count_zeros_fp32 = count_zeros
        module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    _applied = True
    return True
