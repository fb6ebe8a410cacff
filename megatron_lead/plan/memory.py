"""The memory terms of one GPU, phase by phase, each from what the trainer's code allocates.

Training phase (vLLM asleep at level 2: its weights and KV cache freed):
  - `train_state`: Megatron's bf16 weights, the DDP gradient buffer in fp32 (policy/optim.py sets
    grad_reduce_in_fp32), the optimizer's fp32 main params and Adam moments, sharded over DP by
    the distributed optimizer. Modelled as Megatron lays them out: one contiguous buffer per
    dtype, every parameter starting at a multiple of 64 elements and every bucket padded to a
    multiple of lcm(DP, 128) with the distributed optimizer, whose shard of a bucket is its
    1/DP slice (main params and moments only for the parameter elements in that slice). With
    expert parallelism (EP > 1) the experts' weights have buffers of their own, over the
    expert-data-parallel group of DP / EP ranks (its own padding, its own 1/(DP / EP) shards).
  - `micro_batch_activations`: the bytes autograd saves for the backward of one micro-batch,
    term by term per layer (`layer_saved`), plus the peak of the chunked log-prob
    (policy/logprobs.py: 1024 tokens at a time, never a [tokens x vocab] fp32 tensor) or of the
    output layer's backward, whichever is larger. Kernels decide what is saved, so the terms
    follow a `Kernels` profile: "gpu" (Transformer Engine or torch's fused RMSNorm: the norm
    saves its bf16 input; Megatron's fused SwiGLU: only its input) or "cpu" (what runs here,
    where the planner is checked: torch.rms_norm keeps fp32 copies, SwiGLU is unfused).
    A MoE layer (`moe_saved`) saves, per token, the router's top-k choice and the permutation's
    indices and masks, and per routed (token, expert) row the expert's input, its SwiGLU tensors
    and the row's routing weight: balanced routing puts tokens x top-k rows on every EP rank
    (each EP rank is also a DP rank with a micro-batch of its own); with EP > 1 the busiest
    rank is allowed MOE_EP_IMBALANCE times that.
  - The KL reference is a host copy swapped into the policy's own storage (policy/reference.py):
    nothing on the GPU but one tensor during the reference pass.

Generation phase (the trainer's state offloaded to pinned host memory or not; vLLM awake):
  - what stays of the trainer (weights, unless offloaded too; gradients and optimizer unless
    offloaded), vLLM's weights at its TP, its runtime (profiling peak, sampler, CUDA graphs), and
    the KV cache of the step's concurrent sequences, block-rounded (`kv_cache_bytes`).

Allowances (GPU-only memory this CPU project cannot measure) are named constants, stated in the
output and in docs/PLAN.md, never hidden in another term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_lead.plan.shapes import ModelShape, ParamTensor, kv_bytes_per_token, megatron_params
from megatron_lead.policy.convert.arch import padded_vocab_size

GIB = 1 << 30
LOGPROB_CHUNK_TOKENS = 1024
"""policy/logprobs.py DEFAULT_CHUNK_TOKENS: log-probs are computed this many tokens at a time."""

# ---- allowances: GPU memory no CPU check can see (docs/PLAN.md explains each) ------------------
CUDA_CONTEXT_GIB = 0.6
"""CUDA context, cuBLAS/cuDNN handles and workspaces of the one process per GPU (vLLM runs in it)."""
NCCL_GIB_PER_GROUP = 0.3
"""NCCL buffers of each communicator a rank uses (world, and TP / DP / PP / vLLM TP when > 1)."""
VLLM_ASLEEP_GIB = 0.5
"""What vLLM keeps while asleep at level 2: CUDA-graph pools and its allocator's bookkeeping."""
VLLM_CUDA_GRAPHS_GIB = 0.5
"""vLLM's captured CUDA graphs while awake (0 with enforce_eager)."""
FRAGMENTATION = 0.05
"""Caching-allocator slack on top of the activations (variable micro-batch shapes)."""
LOSS_BYTES_PER_TOKEN = 32
"""Per-token fp32 tensors of the loss (ratio, masks, KL) saved for the backward."""
MOE_EP_IMBALANCE = 1.5
"""With EP > 1, the busiest EP rank's routed rows over the balanced tokens x top-k: routing is not
balanced micro-batch by micro-batch (this trainer has no load-balancing loss, and none would make
it exact). An allowance, not a measurement: at EP = 1 every expert is local and the rows are
exactly tokens x top-k; the first EP run's memory metrics are its check."""
LOGPROB_STATS_BYTES_PER_TOKEN = 21
"""The chunked log-prob's saved per-token statistics: max, log-sum, entropy (fp32), target (int64),
outside-slice flag (bool)."""


@dataclass(frozen=True)
class Kernels:
    """Which kernels run, as far as saved activations differ (see the module docstring)."""

    name: str
    norm_fp32_copies: bool
    """torch.rms_norm's CPU path: saves an fp32 copy of its input and of the normalised output
    (GPU: TE / torch's fused RMSNorm save the bf16 input and an fp32 rstd per token)."""
    fused_swiglu: bool
    """Megatron's bias_swiglu_impl saves only its input; the unfused glu() also saves silu(gate)
    and a copy of the linear half (`x_linear + glu_linear_offset`)."""
    packed_out_copy: bool
    """Packed attention as one SDPA call per sequence (CPU): the per-sequence outputs and their
    concatenation are both saved; flash varlen / TE (GPU) save one output."""
    norm_params_fp32: bool
    """Norm weights are fp32 (Megatron's local spec builds torch.nn.RMSNorm without a dtype); in
    Transformer Engine's fused norm-linear they are bf16."""


KERNELS = {
    # GPU with Transformer Engine (model.attention auto/te, TE installed as requirements.txt has it).
    "gpu": Kernels("gpu", norm_fp32_copies=False, fused_swiglu=True, packed_out_copy=False,
                   norm_params_fp32=False),
    # GPU with Megatron's local spec (model.attention=sdpa): torch norms; assumed to save what they
    # save on CPU (fp32 copies), the safe side: no GPU check of torch.rms_norm's CUDA path here.
    "gpu-local": Kernels("gpu-local", norm_fp32_copies=True, fused_swiglu=True, packed_out_copy=False,
                         norm_params_fp32=True),
    # What runs here (tests/test_plan_measure.py checks it), and the same with Megatron's fused SwiGLU.
    "cpu": Kernels("cpu", norm_fp32_copies=True, fused_swiglu=False, packed_out_copy=True,
                   norm_params_fp32=True),
    "cpu-fused-swiglu": Kernels("cpu-fused-swiglu", norm_fp32_copies=True, fused_swiglu=True,
                                packed_out_copy=True, norm_params_fp32=True),
}


@dataclass(frozen=True)
class Precision:
    bf16: bool = True
    """bf16 params and activations with fp32 main params (False: fp32 throughout)."""
    distributed_optimizer: bool = True
    optimizer: str = "adam"
    """adam (two fp32 moments) | sgd (one momentum buffer)."""

    @property
    def param_bytes(self) -> int:
        return 2 if self.bf16 else 4


# ---------------------------------------------------------------------------- training state

@dataclass
class DDPLayout:
    """Megatron's contiguous parameter/gradient buffer of one rank (one dtype, one model chunk)."""

    numel: int
    """Buffer elements, padding included."""
    param_ranges: list[tuple[int, int]]
    """[start, end) of each parameter in the buffer, in the order of `megatron_params`."""
    buckets: list[tuple[int, int]]


def ddp_layout(params: list[ParamTensor], dp: int, distributed: bool) -> DDPLayout:
    """Where Megatron's DDP puts each parameter (its `_ParamAndGradBuffer` rules for overlap_grad_reduce
    off: one bucket, except that a shared embedding gets its own with the distributed optimizer)."""
    divisor = math.lcm(dp, 128)

    def pad(n: int, m: int) -> int:
        return -(-n // m) * m

    ranges: dict[int, tuple[int, int]] = {}
    buckets: list[tuple[int, int]] = []
    start = bucket_start = 0
    in_bucket = 0
    for index in reversed(range(len(params))):  # Megatron walks the params backwards
        p = params[index]
        if distributed:
            start = pad(start, 64)
        own = p.shared_embedding and distributed
        if own and in_bucket:
            end_of_bucket = pad(start, divisor)
            buckets.append((bucket_start, end_of_bucket))
            start = bucket_start = end_of_bucket
            in_bucket = 0
        ranges[index] = (start, start + p.numel)
        start += p.numel
        in_bucket += 1
        if own:
            end_of_bucket = pad(start, divisor)
            buckets.append((bucket_start, end_of_bucket))
            start = bucket_start = end_of_bucket
            in_bucket = 0
    if in_bucket:
        end = pad(start, divisor) if distributed else start
        buckets.append((bucket_start, end))
        start = end
    return DDPLayout(numel=start, param_ranges=[ranges[i] for i in range(len(params))], buckets=buckets)


def shard_elements(layout: DDPLayout, dp: int, dp_rank: int) -> int:
    """Parameter elements the distributed optimizer of DP rank `dp_rank` holds (padding excluded)."""
    total = 0
    for b_start, b_end in layout.buckets:
        size = (b_end - b_start) // dp
        lo, hi = b_start + dp_rank * size, b_start + (dp_rank + 1) * size
        for start, end in layout.param_ranges:
            if b_start <= start < b_end:
                total += max(0, min(end, hi) - max(start, lo))
    return total


@dataclass
class StateBytes:
    """The trainer's persistent GPU memory on one rank (bytes)."""

    weights: int
    grad_buffer: int
    main_params: int
    optimizer_moments: int
    num_params: int
    """Parameter elements of this rank (no padding)."""

    @property
    def optimizer(self) -> int:
        return self.main_params + self.optimizer_moments

    @property
    def total(self) -> int:
        return self.weights + self.grad_buffer + self.optimizer


def train_state(shape: ModelShape, tp: int, pp: int, stage: int, dp: int, precision: Precision,
                dp_rank: int | None = None, fp32_norms: bool = False, ep: int = 1,
                expert_dp_rank: int | None = None) -> StateBytes:
    """Weights, gradient buffer and optimizer state of pipeline stage `stage` on one rank; with the
    distributed optimizer, of DP rank `dp_rank` (None: the largest shard over the DP ranks).
    fp32_norms: norm weights are fp32 (Megatron's local spec); DDP then keeps them in a second
    buffer, and the mixed-precision optimizer uses them as their own main params.
    ep: expert-parallel ranks (a MoE model; they divide DP, as Megatron requires): this rank holds
    num_experts / ep experts, in buffers of their own over the expert-data-parallel group of
    dp / ep ranks, of which it is rank `expert_dp_rank` (None: the largest shard)."""
    if dp % ep:
        raise ValueError(f"EP={ep} does not divide DP={dp} (Megatron carves expert parallelism out of DP)")
    params = megatron_params(shape, tp, pp, stage, ep)
    half = precision.bf16
    dist = precision.distributed_optimizer
    weights = grads = main = owned_total = 0
    for expert_parallel, group_dp, group_rank in ((False, dp, dp_rank), (True, dp // ep, expert_dp_rank)):
        mine = [p for p in params if p.expert_parallel == expert_parallel]
        for low_precision in (True, False):  # the param dtype's buffer, then the fp32 norms'
            group = [p for p in mine if low_precision != (half and fp32_norms and p.norm)]
            if not group:
                continue
            n = sum(p.numel for p in group)
            layout = ddp_layout(group, group_dp, dist)
            elem = precision.param_bytes if low_precision else 4
            weights += (layout.numel if dist else n) * elem  # without it params keep their own storage
            grads += layout.numel * 4  # grad_reduce_in_fp32
            if dist:
                ranks = range(group_dp) if group_rank is None else [group_rank]
                owned = max(shard_elements(layout, group_dp, r) for r in ranks)
            else:
                owned = n
            owned_total += owned
            if half and low_precision:
                main += 4 * owned  # fp32 copies of the bf16 params (fp32 params are their own)
    moments = (2 if precision.optimizer == "adam" else 1) * 4 * owned_total
    return StateBytes(weights=weights, grad_buffer=grads, main_params=main, optimizer_moments=moments,
                      num_params=sum(p.numel for p in params))


# ------------------------------------------------------------------------------- activations

@dataclass(frozen=True)
class MicroBatchShape:
    """The tokens one micro-batch puts through the model."""

    tokens: int
    """b x s (padded) or T, the pack's length."""
    positions: int
    """Rows of the RoPE tables: s (padded: every row shares them) or T (packed)."""
    packed: bool

    @classmethod
    def padded(cls, rows: int, width: int) -> "MicroBatchShape":
        return cls(tokens=rows * width, positions=width, packed=False)

    @classmethod
    def pack(cls, tokens: int) -> "MicroBatchShape":
        return cls(tokens=tokens, positions=tokens, packed=True)


def layer_saved(shape: ModelShape, tp: int, kernels: Kernels, packed: bool, dtype_bytes: int = 2, ep: int = 1
                ) -> dict[str, float]:
    """Bytes one transformer layer saves for the backward, per token (and `rope` per position),
    on one TP rank without sequence parallelism (norms and the residual stream are replicated).
    Keys: norms, attention, qk_norms (Qwen3), mlp (dense) or router and experts (MoE), rope."""
    a = shape.arch
    h, d, f, b = a.hidden_size, a.head_dim, a.ffn_hidden_size // tp, dtype_bytes
    nq, nkv = a.num_heads // tp, a.num_kv_heads // tp
    # A norm saves its input (the residual stream), an fp32 rstd per token, and its output (the
    # next linear's input); the CPU path saves fp32 copies of its input and of the normalised
    # output instead of the input.
    norm = (8 * h if kernels.norm_fp32_copies else h * b) + 4 + h * b
    attention = ((nq + 2 * nkv) * d * b     # fused QKV output (kept alive by the view V is)
                 + (nq + nkv) * d * b       # Q and K after RoPE (new tensors)
                 + nq * d * b               # attention output (linear_proj's input)
                 + nq * 4)                  # softmax log-sum-exp, fp32
    if packed and kernels.packed_out_copy:
        attention += nq * d * b             # per-sequence outputs + their concatenation
    out = {"norms": 2 * norm, "attention": attention}
    if a.qk_norm:
        # Qwen3's RMSNorm over each query and key head (head_dim wide), before RoPE: per head the CPU
        # path's fp32 copies of its input and output, or TE's bf16 input (a contiguous copy of the
        # head's slice of the fused QKV output), and an fp32 rstd. Its output goes to RoPE, which
        # saves only cos/sin, then to attention as the Q and K already counted.
        out["qk_norms"] = (nq + nkv) * ((8 * d if kernels.norm_fp32_copies else d * b) + 4)
    if a.is_moe:
        out.update(moe_saved(shape, tp, kernels, dtype_bytes, ep))
    else:
        mlp = 2 * f * b + f * b             # linear_fc1 output, SwiGLU output (linear_fc2's input)
        if not kernels.fused_swiglu:
            mlp += 2 * f * b                # silu(gate) and the copy of the linear half
        out["mlp"] = mlp
    out["rope"] = 4 * d * b
    return out


def moe_rows_per_token(shape: ModelShape, ep: int) -> float:
    """Routed (token, expert) rows one EP rank's experts process per token of its micro-batch:
    top-k under balanced routing (every EP rank sends and receives tokens x k / EP rows to and from
    each), times MOE_EP_IMBALANCE for the busiest rank when EP > 1."""
    return shape.arch.moe_topk * (MOE_EP_IMBALANCE if ep > 1 else 1.0)


def moe_saved(shape: ModelShape, tp: int, kernels: Kernels, dtype_bytes: int = 2, ep: int = 1) -> dict[str, float]:
    """A Megatron-Core MoELayer's saved bytes per token (megatron/core/transformer/moe, unfused
    router and permutation as policy/model.py configures them):

    - router: the fp32 router's top-k indices (int64), and the softmax it differentiates: over the
      k chosen logits (norm_topk_prob: Megatron's pre_softmax off) or over all experts; the
      logits themselves are not kept. The router's input is the pre-MLP norm's output (`norms`);
    - permutation: the sorted token indices (int64, k per token), the transposed routing map
      (bool) and routing probabilities (fp32) its masked_select keeps, one per expert;
    - experts, per routed row: the row's input (h), the SwiGLU's tensors as in a dense MLP but of
      moe_intermediate_size / TP (fused: fc1's output and the weighted SwiGLU's output; unfused:
      also silu(gate), the linear half's copy and the product the routing weight scales) and
      the row's fp32 routing weight.
    """
    a = shape.arch
    h, b, e, k = a.hidden_size, dtype_bytes, a.num_experts, a.moe_topk
    f = a.moe_ffn_hidden_size // tp
    router = 8 * k + 4 * (k if a.moe_norm_topk else e)
    permutation = 8 * k + 5 * e
    row = h * b + (3 if kernels.fused_swiglu else 6) * f * b + 4
    return {"router": router + permutation, "experts": moe_rows_per_token(shape, ep) * row}


@dataclass
class ActivationTerms:
    """One micro-batch on one pipeline stage of one rank (bytes)."""

    layers: int
    """Saved by the stage's transformer layers."""
    per_layer: int
    """Of which one layer."""
    edges: int
    """Saved outside the layers: token ids (first stage); final norm, logits, log-prob
    statistics and loss tensors (last stage)."""
    logits: int
    """Of which the logits the log-prob function keeps (by reference) for its backward."""
    transient: int
    """Peak on top of the saved bytes: the log-prob's chunk buffers (forward) or gradient buffer
    plus chunks (backward), or the output layer's backward, whichever is larger (last stage)."""
    logprob_peak: int
    """Of which the log-prob function's own peak (what tests/test_plan_measure.py measures)."""
    moe_dispatch: int = 0
    """A MoE layer's own peak, any stage: two [routed rows, hidden] buffers of the token dispatch
    alive at once (the all-to-all's output and its sorted copy in the forward, their gradients in
    the backward). From Megatron's code, not measured; it competes with the log-prob peak."""

    @property
    def saved(self) -> int:
        return self.layers + self.edges

    @property
    def peak(self) -> int:
        return self.saved + self.transient


def micro_batch_activations(shape: ModelShape, tp: int, pp: int, stage: int, mb: MicroBatchShape,
                            kernels: Kernels, dtype_bytes: int = 2, entropy: bool = True,
                            chunk: int = LOGPROB_CHUNK_TOKENS, ep: int = 1) -> ActivationTerms:
    """Activations of micro-batch `mb` on pipeline stage `stage` (see ActivationTerms)."""
    a = shape.arch
    t, b = mb.tokens, dtype_bytes
    terms = layer_saved(shape, tp, kernels, mb.packed, dtype_bytes, ep)
    per_token = sum(v for key, v in terms.items() if key != "rope")
    per_layer = int(per_token * t + terms["rope"] * mb.positions)
    layers = a.num_layers // pp * per_layer
    edges = logits = transient = lp_peak = 0
    dispatch = int(2 * moe_rows_per_token(shape, ep) * t * a.hidden_size * b) if a.is_moe else 0
    if stage == 0:
        edges += 8 * t  # token ids, saved by the embedding
    if stage == pp - 1:
        vocab = padded_vocab_size(a.vocab_size, tp) // tp
        logits = vocab * b * t
        final_norm = terms["norms"] // 2 * t
        edges += final_norm + logits + (LOGPROB_STATS_BYTES_PER_TOKEN + LOSS_BYTES_PER_TOKEN) * t
        c = min(chunk, t)
        fwd = (3 if entropy else 2) * c * vocab * 4 + 16 * t
        bwd = t * vocab * b + 2 * c * vocab * 4 + 8 * t
        lp_peak = max(fwd, bwd)
        padded_here = tp_rank_has_padding(a.vocab_size, tp)
        # After the log-prob's backward its saved logits are freed; the output layer then holds the
        # logits' gradient (and, on the TP rank with vocabulary padding, the masked copy of it),
        # its weight's bf16 gradient until DDP adds it to the fp32 buffer, and its input's gradient.
        out_bwd = (t * vocab * b * (1 if padded_here else 0) + vocab * a.hidden_size * b
                   + t * a.hidden_size * b)
        transient = max(lp_peak, out_bwd)
    return ActivationTerms(layers=layers, per_layer=per_layer, edges=edges, logits=logits,
                           transient=max(transient, dispatch), logprob_peak=lp_peak, moe_dispatch=dispatch)


def tp_rank_has_padding(vocab_size: int, tp: int) -> bool:
    """Whether some TP rank holds vocabulary padding (its logits are then masked in place, and
    that in-place write copies the logits' gradient in the backward)."""
    return padded_vocab_size(vocab_size, tp) != vocab_size


def in_flight(pp: int, stage: int, num_micro_batches: int) -> int:
    """Micro-batches whose activations a stage holds at once under Megatron's 1F1B schedule."""
    return max(1, min(pp - stage, num_micro_batches))


# --------------------------------------------------------------------------------- generation

@dataclass(frozen=True)
class KVCache:
    """The KV cache one vLLM rank needs for its replica's concurrent sequences."""

    sequences: int
    tokens_per_sequence: int
    block_size: int
    bytes_per_token: int

    @property
    def blocks_per_sequence(self) -> int:
        return -(-self.tokens_per_sequence // self.block_size)

    @property
    def bytes(self) -> int:
        """All sequences at once, plus the one block vLLM's block pool keeps back for good (its null
        block, v1/core/block_pool.py)."""
        return (self.sequences * self.blocks_per_sequence + 1) * self.block_size * self.bytes_per_token

    @property
    def bytes_per_sequence(self) -> int:
        return self.blocks_per_sequence * self.block_size * self.bytes_per_token


def kv_cache(shape: ModelShape, vllm_tp: int, sequences: int, tokens_per_sequence: int,
             block_size: int = 16, dtype_bytes: int = 2) -> KVCache:
    """K and V of every layer for `sequences` sequences of up to `tokens_per_sequence` tokens,
    each rounded up to whole blocks of `block_size` tokens (vLLM's paged cache). No prefix sharing:
    the G samples of a prompt could share its full blocks, the plan does not count on it."""
    return KVCache(sequences=sequences, tokens_per_sequence=tokens_per_sequence, block_size=block_size,
                   bytes_per_token=kv_bytes_per_token(shape, vllm_tp, dtype_bytes))


def vllm_runtime_bytes(shape: ModelShape, vllm_tp: int, max_num_batched_tokens: int, max_num_seqs: int,
                       enforce_eager: bool, dtype_bytes: int = 2) -> dict[str, int]:
    """vLLM's memory besides weights and KV cache while awake: the activations of its profiling
    forward (max_num_batched_tokens tokens: the residual stream, one layer's QKV, gate/up and
    SwiGLU outputs; for a MoE layer the router's logits and the fused-MoE kernel's workspaces,
    [tokens, k, max(I/TP, h)] and [tokens, k, max(2I/TP, h)], and its [tokens, h] output), the
    sampler's fp32 logits, probabilities and sorted copy for max_num_seqs rows, and its CUDA
    graphs."""
    a = shape.arch
    h, t = a.hidden_size, max_num_batched_tokens
    qkv = (a.num_heads // vllm_tp + 2 * max(1, a.num_kv_heads // vllm_tp)) * a.head_dim
    if a.is_moe:
        f = a.moe_ffn_hidden_size // vllm_tp
        mlp = a.num_experts + a.moe_topk * (max(f, h) + max(2 * f, h)) + h
    else:
        mlp = 3 * a.ffn_hidden_size // vllm_tp
    forward = t * (2 * h + qkv + mlp) * dtype_bytes
    sampler = max_num_seqs * a.vocab_size * 4 * 3
    graphs = 0 if enforce_eager else int(VLLM_CUDA_GRAPHS_GIB * GIB)
    return {"forward": forward, "sampler": sampler, "graphs": graphs}


def vllm_default_batching(gpu_memory_gib: float) -> tuple[int, int]:
    """vLLM 0.32's defaults for the offline LLM class (engine/arg_utils.py): 16,384 batched tokens and
    1,024 sequences on GPUs of 70 GiB or more (not A100), else 8,192 and 256."""
    return (16384, 1024) if gpu_memory_gib >= 70 else (8192, 256)


@dataclass
class Term:
    """One line of a phase: a name, bytes, and what it is."""

    name: str
    bytes: int
    note: str = ""


@dataclass
class Phase:
    name: str
    terms: list[Term] = field(default_factory=list)

    def add(self, name: str, nbytes: float, note: str = "") -> None:
        self.terms.append(Term(name, int(nbytes), note))

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)
