"""The planner's numbers measured on something real, on CPU: the tests and docs/PLAN.md use these.

Nothing here is used to plan; it exists so that every planned term can be compared with the
bytes a real run holds:

  - `state_bytes`: the Megatron model's parameters, the DDP buffers and the optimizer's tensors,
    counted tensor by tensor (each storage once) after one optimizer step (Adam's moments are
    created at the first step);
  - `measure_micro_batch`: one forward/backward of the project's policy (Megatron's schedule,
    policy.train_step's loss), counting
      * the bytes autograd saves for the backward (`torch.autograd.graph.saved_tensors_hooks`,
        each storage once, parameters left out), taken when the loss has been computed: the
        activations of the micro-batch;
      * the peak of the bytes the chunked log-prob function allocates itself, forward and
        backward (`LiveBytes`, a dispatch mode that follows every new storage until it is freed);
      * the peak of everything the micro-batch allocates, forward to the end of the backward;
  - `vllm_kv_bytes`: vLLM's own block accounting (its KV-cache spec classes and
    `get_kv_cache_configs`) for a model and a number of sequences, without starting an engine.

Heavy imports (Megatron, vLLM) stay inside the functions.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _storages(obj, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj.untyped_storage())
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _storages(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _storages(o, out)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive, and their peak.

    A storage counts from the op that creates it (an op output whose storage is none of the op's
    inputs': views and in-place results are not new memory) until Python frees it. `mark()`
    starts a new peak measurement relative to what is alive at that moment.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def mark(self) -> int:
        self.peak = self.live
        return self.live

    def _freed(self, key: int, nbytes: int):
        def callback(_ref):
            self.live -= nbytes
            self._refs.pop(key, None)
        return callback

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs: list = []
        _storages(args, inputs)
        _storages(kwargs or {}, inputs)
        seen = {id(s) for s in inputs}
        outputs: list = []
        _storages(out, outputs)
        for st in outputs:
            key = id(st)
            if key in seen or key in self._refs or st.device.type == "meta":
                continue
            nbytes = st.nbytes()
            self._refs[key] = weakref.ref(st, self._freed(key, nbytes))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


class SavedBytes:
    """Storages autograd saves for the backward (each once), except the excluded ones."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self._refs: dict[int, tuple[weakref.ref, int]] = {}

    def _pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.exclude and id(st) not in self._refs and st.nbytes():
            self._refs[id(st)] = (weakref.ref(st), st.nbytes())
        return t

    @contextlib.contextmanager
    def hooks(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    def alive(self) -> int:
        return sum(n for ref, n in self._refs.values() if ref() is not None)


@dataclass
class MicroBatchMemory:
    """What one training micro-batch held on this rank (bytes)."""

    saved: int
    """Autograd's saved tensors when the loss is computed (parameters excluded)."""
    logprob_peak: int
    """Peak of what the chunked log-prob function allocates itself, forward or backward."""
    total_peak: int
    """Peak of everything allocated from the start of the forward to the end of the backward."""
    tokens: int
    """Tokens of the micro-batch (b x s padded, T packed)."""


def _param_storages(model: list) -> set[int]:
    ptrs = set()
    for chunk in model:
        for p in chunk.parameters():
            ptrs.add(p.untyped_storage().data_ptr())
            grad = getattr(p, "main_grad", None)
            if grad is not None:
                ptrs.add(grad.untyped_storage().data_ptr())
    return ptrs


def measure_micro_batch(model: list, micro_batch, loss_cfg) -> MicroBatchMemory:
    """One forward/backward of `micro_batch` (a train_step.MicroBatch or a packed one) through
    Megatron's schedule with the trainer's loss; the memory it held (see the module docstring).
    model: DDP-wrapped chunks (so weight gradients go into the fp32 buffer, as in training)."""
    from megatron_lead.policy import logprobs as lp
    from megatron_lead.policy.model import forward_backward
    from megatron_lead.policy.train_step import _loss_fn

    fn = lp._ChunkedVocabParallelLogProbs
    tracker = LiveBytes()
    saved = SavedBytes(_param_storages(model))
    chunk_peaks: list[int] = []
    at_loss: list[int] = []
    orig_fwd, orig_bwd = fn.forward, fn.backward

    def timed(f):
        def wrapper(ctx, *args):
            start = tracker.live
            outer_peak = tracker.peak
            tracker.mark()
            try:
                return f(ctx, *args)
            finally:
                chunk_peaks.append(tracker.peak - start)
                tracker.peak = max(outer_peak, tracker.peak)
        return staticmethod(wrapper)

    inner_loss = _loss_fn(loss_cfg)

    def loss_fn(logits, batch):
        out = inner_loss(logits, batch)
        at_loss.append(saved.alive())
        return out

    for chunk in model:
        chunk.zero_grad_buffer()
    fn.forward, fn.backward = timed(orig_fwd), timed(orig_bwd)
    try:
        with tracker, saved.hooks():
            tracker.mark()
            forward_backward(model, [micro_batch.as_dict()], loss_fn, forward_only=False)
    finally:
        fn.forward, fn.backward = staticmethod(orig_fwd), staticmethod(orig_bwd)
    tokens = int(micro_batch.tokens.numel())
    return MicroBatchMemory(saved=at_loss[0] if at_loss else 0, logprob_peak=max(chunk_peaks, default=0),
                            total_peak=tracker.peak, tokens=tokens)


@dataclass
class MeasuredState:
    """The trainer's persistent tensors on this rank (bytes), each storage counted once."""

    weights: int
    grad_buffer: int
    main_params: int
    optimizer_moments: int


def _inner_optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None)
    return list(chained) if chained is not None else [optimizer]


def state_bytes(model: list, optimizer) -> MeasuredState:
    """Count the model's parameters, the DDP gradient buffers and the optimizer's own tensors (its
    parameter copies and every tensor of its state), tensor by tensor, each storage once. Call after
    one optimizer step: Adam creates its moments at the first."""
    seen: set[int] = set()

    def count(tensors) -> int:
        total = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            if st.data_ptr() in seen or not st.nbytes():
                continue
            seen.add(st.data_ptr())
            total += st.nbytes()
        return total

    params = [p for chunk in model for p in chunk.parameters()]
    weights = count(params)
    grads = count(getattr(p, "main_grad", None) for p in params)
    main, moments = 0, 0
    for opt in _inner_optimizers(optimizer):
        inner = opt.optimizer
        main += count(p for group in inner.param_groups for p in group["params"])
        moments += count(v for state in inner.state.values() for v in state.values())
    return MeasuredState(weights=weights, grad_buffer=grads, main_params=main, optimizer_moments=moments)


@dataclass
class VllmKV:
    """vLLM's own accounting of a KV cache of `available_bytes` for a model."""

    block_size: int
    page_bytes: int
    """One block of one layer (vLLM's spec: 2 x block x KV heads x head size x dtype)."""
    num_layers: int
    num_blocks: int
    """Blocks vLLM makes of the memory (one of them its permanent null block)."""
    concurrency: float
    """Requests of max_model_len tokens that fit at once (vLLM's get_max_concurrency...)."""
    tensor_bytes: int
    """Bytes of the KV-cache tensors vLLM would allocate."""


def vllm_kv_accounting(model_dir: str, vllm_tp: int, max_model_len: int, available_bytes: int) -> VllmKV:
    """vLLM 0.32's KV-cache accounting for the model in `model_dir` (a folder with config.json; no
    weights) at tensor-parallel size `vllm_tp`, given `available_bytes` of KV-cache memory on one
    rank: its engine config for this machine, the KV-cache spec its attention layers declare
    (attention.Attention.get_kv_cache_spec: FullAttentionSpec from the model config), and
    `get_kv_cache_configs`, which turns memory into blocks. No engine starts."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs, get_max_concurrency_for_kv_cache_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    args = EngineArgs(model=model_dir, skip_tokenizer_init=True, max_model_len=max_model_len, dtype="bfloat16",
                      tensor_parallel_size=vllm_tp,
                      distributed_executor_backend="external_launcher" if vllm_tp > 1 else None)
    config = args.create_engine_config()
    model, parallel, cache = config.model_config, config.parallel_config, config.cache_config
    spec = FullAttentionSpec(block_size=cache.block_size, num_kv_heads=model.get_num_kv_heads(parallel),
                             head_size=model.get_head_size(), dtype=model.dtype)
    layers = model.get_num_layers(parallel)
    specs = {f"model.layers.{i}.self_attn.attn": spec for i in range(layers)}
    resolve_kv_cache_layout(config, [[layout.name for layout in CPUAttentionBackend.supported_kv_cache_layouts()]],
                            specs.values())
    kv_config = get_kv_cache_configs(config, [specs], [available_bytes])[0]
    return VllmKV(block_size=cache.block_size, page_bytes=spec.page_size_bytes, num_layers=layers,
                  num_blocks=kv_config.num_blocks,
                  concurrency=get_max_concurrency_for_kv_cache_config(config, kv_config),
                  tensor_bytes=sum(t.size for t in kv_config.kv_cache_tensors))


# ----------------------------------------------------------------- the checks, on N gloo ranks

CHECK_SHAPES = {
    # Qwen2-like: GQA 2:1, q/k/v biases, untied embeddings.
    "qwen-gqa": dict(architectures=["Qwen2ForCausalLM"], vocab_size=1000, hidden_size=128, intermediate_size=352,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=4096, tie_word_embeddings=False),
    # Llama-like: full multi-head attention, no biases, tied embeddings, a vocabulary TP must pad.
    "llama-mha": dict(architectures=["LlamaForCausalLM"], vocab_size=777, hidden_size=96, intermediate_size=256,
                      num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6,
                      max_position_embeddings=4096, tie_word_embeddings=True),
    # Wide heads (head_dim 64 > hidden / heads), GQA 2:1, tied, a larger vocabulary.
    "qwen-wide": dict(architectures=["Qwen2ForCausalLM"], vocab_size=2048, hidden_size=256, intermediate_size=704,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=4096, tie_word_embeddings=True),
}
FAMILY_SHAPES = {
    # Qwen3 dense: an RMSNorm over each query and key head, head_dim 32 with hidden 64 and 4 heads
    # (heads x head_dim != hidden), no bias, tied embeddings (as Qwen3-0.6B to 4B), a vocabulary TP pads.
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], vocab_size=1000, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=4096, tie_word_embeddings=True),
    # Qwen3-MoE: the same attention, every layer 4 experts of 32, top-2 renormalised, untied.
    "qwen3-moe": dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=1000, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                      max_position_embeddings=4096, tie_word_embeddings=False),
}
FAMILY_STATE_LAYOUTS = {"qwen3": ((1, 1, 1), (2, 1, 1)), "qwen3-moe": ((1, 1, 1), (1, 1, 2))}
"""(TP, PP, EP) on 2 ranks: the dense Qwen3 at DP=2 and TP=2; the MoE at DP=2 with its experts in the
dense buffer (EP=1), and at EP=2, where each rank holds 2 of the 4 experts in buffers of their own
over an expert-data-parallel group of 1 while the rest is sharded over DP=2."""
FAMILY_LENGTH = 300
CHECK_LENGTHS = (64, 300, 1100)
"""Sequence lengths: short, medium, and longer than one log-prob chunk (1,024 tokens)."""


def check_rows(length: int, packed: bool) -> list[int]:
    """Row lengths of a check micro-batch: 2 full rows padded; 3 uneven rows packed."""
    return [length, length // 2, length // 3] if packed else [length, length]


def _micro_batch(vocab: int, length: int, packed: bool, seed: int):
    from megatron_lead.policy.packing import pack_micro_batches
    from megatron_lead.policy.train_step import split_micro_batches

    g = torch.Generator().manual_seed(seed)
    rows = check_rows(length, packed)
    tokens = torch.randint(0, vocab, (len(rows), length), generator=g)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, n in enumerate(rows):
        mask[i, 1:n] = True
    kw = dict(tokens=tokens, response_mask=mask, advantages=torch.randn(len(rows), generator=g),
              old_logprobs=torch.zeros(len(rows), length), ref_logprobs=torch.zeros(len(rows), length))
    batches = pack_micro_batches(len(rows), 0, **kw) if packed else split_micro_batches(len(rows), **kw)
    return batches[0]


def _shape_config(name: str) -> dict:
    return CHECK_SHAPES[name] if name in CHECK_SHAPES else FAMILY_SHAPES[name]


def init_parallel_ep(tp: int, pp: int, ep: int = 1) -> None:
    """policy.parallel.init_parallel with `ep` expert-parallel ranks carved out of DP: it has no EP
    argument (the trainer runs EP=1), so Megatron's groups are made again with
    expert_model_parallel_size (also used by tests/test_families_model.py)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_lead.policy.parallel import init_parallel

    init_parallel(tp, pp)
    if ep > 1:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 expert_model_parallel_size=ep)
        model_parallel_cuda_manual_seed(1234)


def _measure_state(name: str, tp: int, pp: int, ep: int, bf16: bool, dist: bool, rank: int) -> dict:
    """Build, wrap, one Adam step, count (state_bytes); one record. Leaves the groups initialised."""
    from megatron.core import parallel_state as ps

    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.optim import OptimConfig, build_optimizer, wrap_ddp

    init_parallel_ep(tp, pp, ep)
    oc = OptimConfig(bf16=bf16, distributed_optimizer=dist, lr=1e-3)
    model = wrap_ddp(build_model(_shape_config(name), dtype=torch.bfloat16 if bf16 else torch.float32,
                                 attention="sdpa", init_weights=False), oc)
    optimizer, _ = build_optimizer(model, oc)
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()
    m = state_bytes(model, optimizer)
    return dict(shape=name, tp=tp, pp=pp, ep=ep, dp=ps.get_data_parallel_world_size(),
                dp_rank=ps.get_data_parallel_rank(), expert_dp=ps.get_expert_data_parallel_world_size(),
                expert_dp_rank=ps.get_expert_data_parallel_rank(), stage=ps.get_pipeline_model_parallel_rank(),
                bf16=bf16, distributed=dist, rank=rank, **vars(m))


_PRECISIONS = ((True, True), (True, False), (False, False))
"""bf16 + the distributed optimizer, bf16 + Megatron's plain mixed-precision optimizer, fp32."""


def _measure_activations(cases: list, rank: int) -> list[dict]:
    """One micro-batch through each (TP, shape, length, packed, kernels) case, bf16, DDP-wrapped."""
    from megatron.core import parallel_state as ps

    from megatron_lead.policy.loss import LossConfig
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.optim import OptimConfig, wrap_ddp
    from megatron_lead.policy.parallel import destroy_parallel, init_parallel

    loss_cfg = LossConfig()
    built: dict = {}
    out = []
    for i, (tp, name, length, packed, kernels) in enumerate(cases):
        key = (tp, name, kernels)
        if key not in built:
            built.clear()
            if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() != tp:
                destroy_parallel()
            if not ps.model_parallel_is_initialized():
                init_parallel(tp, 1)
            overrides = {"bias_activation_fusion": True} if kernels == "cpu-fused-swiglu" else {}
            oc = OptimConfig(bf16=True, distributed_optimizer=False)
            built[key] = wrap_ddp(build_model(_shape_config(name), dtype=torch.bfloat16, attention="sdpa",
                                              **overrides), oc)
        mb = _micro_batch(_shape_config(name)["vocab_size"], length, packed, seed=i)
        r = measure_micro_batch(built[key], mb, loss_cfg)
        out.append(dict(tp=tp, shape=name, length=length, packed=packed, kernels=kernels, rank=rank,
                        entropy=loss_cfg.wants_entropy, **vars(r)))
    destroy_parallel()
    return out


def measure_families(rank: int, world: int) -> dict:
    """The Qwen3 and Qwen3-MoE checks on `world` = 2 gloo ranks: `state_bytes` for each FAMILY_SHAPE
    at its FAMILY_STATE_LAYOUTS in the three precisions ("family_state"), and the activations of
    FAMILY_LENGTH tokens, padded and packed, at TP=1 ("family_activations"; the MoE at EP=1, where
    every expert is local and the routed rows are exactly tokens x top-k, whatever the routing)."""
    from megatron_lead.policy.parallel import destroy_parallel

    states = []
    for name, layouts in FAMILY_STATE_LAYOUTS.items():
        for tp, pp, ep in layouts:
            for bf16, dist in _PRECISIONS:
                states.append(_measure_state(name, tp, pp, ep, bf16, dist, rank))
                destroy_parallel()
    cases = [(1, name, FAMILY_LENGTH, packed, "cpu") for name in FAMILY_SHAPES for packed in (False, True)]
    return {"family_state": states, "family_activations": _measure_activations(cases, rank)}


def measure_all(rank: int, world: int, state_layouts=((1, 1), (2, 1), (1, 2)),
                lengths=CHECK_LENGTHS, tp2_lengths=(CHECK_LENGTHS[-1],), families: bool = True) -> dict:
    """Every measurement the planner is checked against, on `world` = 2 gloo ranks (launch.run_local):

    - state: for the first two CHECK_SHAPES at each (TP, PP) of state_layouts (DP = 2 / (TP x PP)),
      with bf16 + the distributed optimizer, bf16 + Megatron's plain mixed-precision optimizer, and
      fp32: `state_bytes` after one Adam step;
    - activations: every CHECK_SHAPE x length x padded/packed at TP=1 (DP=2), the longest lengths
      again at TP=2, and one shape with Megatron's fused SwiGLU (`bias_activation_fusion`, as on GPU;
      its jit is off so that CPU needs no compiler: the tensors it saves are the same);
    - with `families`, `measure_families` in the same processes (one spawn for all).
    Records are plain dicts; planned numbers are computed by the caller.
    """
    import megatron.core.jit as jit

    jit.disable_jit_fuser()  # before Megatron's fused SwiGLU module is imported (the fusion check)
    from megatron_lead.policy.parallel import destroy_parallel

    out: dict = {"state": [], "family_state": [], "family_activations": []}
    for name in list(CHECK_SHAPES)[:2]:
        for tp, pp in state_layouts:
            for bf16, dist in _PRECISIONS:
                out["state"].append(_measure_state(name, tp, pp, 1, bf16, dist, rank))
                destroy_parallel()
    cases = [(1, name, length, packed, "cpu") for name in CHECK_SHAPES for length in lengths
             for packed in (False, True)]
    cases += [(1, "qwen-gqa", lengths[1], packed, "cpu-fused-swiglu") for packed in (False, True)]
    cases += [(2, name, length, packed, "cpu") for name in CHECK_SHAPES for length in tp2_lengths
              for packed in (False, True)]
    out["activations"] = _measure_activations(cases, rank)
    if families:
        out.update(measure_families(rank, world))
    return out


def planned_activations(rec: dict):
    """The planner's ActivationTerms for one `measure_all` activation record."""
    from megatron_lead.plan import memory as M
    from megatron_lead.plan.shapes import load_shape

    rows = check_rows(rec["length"], rec["packed"])
    mb = M.MicroBatchShape.pack(sum(rows)) if rec["packed"] else M.MicroBatchShape.padded(len(rows), rec["length"])
    return M.micro_batch_activations(load_shape(_shape_config(rec["shape"])), rec["tp"], 1, 0, mb,
                                     M.KERNELS[rec["kernels"]], 2, entropy=rec["entropy"])


def planned_state(rec: dict):
    from megatron_lead.plan import memory as M
    from megatron_lead.plan.shapes import load_shape

    return M.train_state(load_shape(_shape_config(rec["shape"])), rec["tp"], rec["pp"], rec["stage"], rec["dp"],
                         M.Precision(bf16=rec["bf16"], distributed_optimizer=rec["distributed"]),
                         dp_rank=rec["dp_rank"], fp32_norms=M.KERNELS["cpu"].norm_params_fp32,
                         ep=rec.get("ep", 1), expert_dp_rank=rec.get("expert_dp_rank"))


def _state_table(records: list[dict], families: bool) -> None:
    ep = "EP | expert DP | " if families else ""
    print(f"| shape | TP | PP | DP | {ep}precision | optimizer | weights | grads | main params | moments |")
    print("|---|---|---|---|" + ("---|---|" if families else "") + "---|---|---|---|---|---|")
    for rec in records:
        p = planned_state(rec)
        cells = [f"{rec[k]:,} / {getattr(p, k):,}" for k in ("weights", "grad_buffer", "main_params",
                                                               "optimizer_moments")]
        ep = f"{rec['ep']} | {rec['expert_dp']} | " if families else ""
        print(f"| {rec['shape']} | {rec['tp']} | {rec['pp']} | {rec['dp']} | {ep}{'bf16' if rec['bf16'] else 'fp32'} | "
              f"{'distributed' if rec['distributed'] else 'plain'} | " + " | ".join(cells) + " |")


def _activation_table(records: list[dict]) -> None:
    print("| shape | TP | kernels | length | micro-batch | tokens | saved (measured / planned) | log-prob peak "
          "| sum | whole peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rec in records:
        p = planned_activations(rec)
        total = (rec["saved"] + rec["logprob_peak"]) / (p.saved + p.logprob_peak)
        print(f"| {rec['shape']} | {rec['tp']} | {rec['kernels']} | {rec['length']} | "
              f"{'packed' if rec['packed'] else 'padded'} | {rec['tokens']:,} | "
              f"{rec['saved']:,} / {p.saved:,} ({rec['saved'] / p.saved:.4f}) | "
              f"{rec['logprob_peak']:,} / {p.logprob_peak:,} ({rec['logprob_peak'] / p.logprob_peak:.4f}) | "
              f"{total:.4f} | {rec['total_peak'] / p.peak:.4f} |")


def main() -> None:
    """Print docs/PLAN.md's measured-vs-planned tables (python -m megatron_lead.plan.measure; rank 0's)."""
    from megatron_lead.launch import run_local

    results = run_local(measure_all, 2, timeout=None)[0]
    _state_table(results["state"], families=False)
    print()
    _activation_table(results["activations"])
    print()
    _state_table(results["family_state"], families=True)
    print()
    _activation_table(results["family_activations"])


if __name__ == "__main__":
    main()
