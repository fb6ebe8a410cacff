"""From a model, a cluster and a workload to the layouts that fit, phase by phase.

A `Layout` is one way to run: Megatron TP x PP x DP over the world (and, for a MoE model, EP
expert-parallel ranks carved out of DP), vLLM's TP, the distributed optimizer on or off, the
trainer's state offloaded during generation or not. `evaluate` gives its
per-GPU peak in the two phases of a colocated step, term by term (memory.py), for the worst GPU
(pipeline stages differ: the first holds the embedding and the most micro-batches in flight, the
last the logits and the log-prob peak). `best_micro_batch` finds the largest micro-batch a layout
fits, and `plan` ranks every candidate layout: fewest model-parallel ranks first, then the
largest micro-batch, then the most of the step's sequences vLLM can hold at once; layouts the
trainer cannot run yet (EP > 1: `train` has no expert-parallel key) come after those it can, and
say so (`Estimate.note`).

Everything here is arithmetic on a config.json: no GPU, no Megatron, no vLLM import.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

from megatron_lead.plan import memory as M
from megatron_lead.plan.shapes import ModelShape, check_split, check_vllm_split, vllm_weight_bytes

EP_NOTE = ("EP={ep}: for planning and conversion (megatron-lead convert --ep {ep}) only: train has no "
           "expert-parallel key yet")
"""What a layout with expert parallelism says: Megatron builds and converts it (policy/model.py,
convert), the trainer's config cannot ask for it yet."""
MOE_TP_PROBLEM = ("tensor_model_parallel_size={tp}: the trainer trains a mixture-of-experts model at TP=1 only "
                  "(Megatron's MoE layer needs sequence parallelism at TP > 1, which it does not turn on); "
                  "split it with PP, or EP when train has it")
"""Why a MoE layout with TP > 1 is no candidate (policy/model.forward_backward refuses it)."""

GIB = M.GIB
PACK_ROUNDING = 256
"""max_tokens_per_micro_batch suggestions are multiples of this."""


@dataclass
class Workload:
    """What one RL step does (the trainer's keys in brackets)."""

    prompts_per_step: int = 128            # data.prompts_per_step
    rollouts_per_prompt: int = 8           # rollout.n
    max_prompt_len: int = 1024             # data.max_prompt_len
    max_response_len: int = 8000           # rollout.max_response_len
    mini_batch_prompts: int = 16           # ppo.mini_batch_prompts
    micro_batch_size: int = 1              # ppo.micro_batch_size
    pack_sequences: bool = False           # ppo.pack_sequences
    max_tokens_per_micro_batch: int = 0    # ppo.max_tokens_per_micro_batch
    bf16: bool = True                      # optim.bf16
    distributed_optimizer: bool = True     # optim.distributed_optimizer
    optimizer: str = "adam"                # optim.optimizer
    offload_train_state: bool = True       # rollout.offload_train_state
    offload_weights: bool = False          # rollout.offload_weights
    kl_reference: bool = True              # loss.kl_coef > 0 and loss.kl_type != none
    entropy: bool = True                   # loss.compute_entropy or loss.entropy_coef > 0
    enforce_eager: bool = False            # rollout.enforce_eager
    gpu_memory_utilization: float | None = None  # rollout.gpu_memory_utilization (None: planned)
    kv_cache_memory_bytes: int | None = None     # rollout.kv_cache_memory_bytes
    kv_block_size: int = 16                # vLLM's block size on GPU
    kernels: str = "gpu"                   # memory.KERNELS

    @property
    def max_len(self) -> int:
        return self.max_prompt_len + self.max_response_len

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.bf16 else 4


@dataclass
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 79.1
    """What torch reports per GPU (an H100 80GB: 79.1 GiB, an L40S 48 GB: 44.4 GiB)."""
    reserve: float = 0.05
    """Fraction of each GPU left free for what the planner does not know (GPU kernels' own
    workspaces, allocator behaviour): a layout fits when its peak is at most (1 - reserve) x memory."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def total(self) -> int:
        return int(self.gpu_memory_gib * GIB)

    @property
    def usable(self) -> int:
        return int(self.total * (1 - self.reserve))


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    vllm_tp: int
    distributed_optimizer: bool
    offload: bool
    ep: int = 1
    """Expert-parallel ranks (MoE models; they divide DP and the experts). The experts' weights and
    gradients are split EP ways; their optimizer state is sharded over the DP / EP ranks of the
    expert-data-parallel group, so a rank holds as much of it as at EP=1."""

    def label(self) -> str:
        ep = f" EP={self.ep}" if self.ep > 1 else ""
        return (f"TP={self.tp} PP={self.pp} DP={self.dp}{ep} vLLM-TP={self.vllm_tp} "
                f"{'dist-opt' if self.distributed_optimizer else 'plain-opt'} "
                f"{'offload' if self.offload else 'resident'}")


@dataclass(frozen=True)
class MicroBatch:
    """How the PPO passes cut a data-parallel rank's rollouts (ppo.* keys)."""

    pack: bool
    micro_batch_size: int
    max_tokens: int = 0

    def worst(self, max_len: int) -> M.MicroBatchShape:
        """The largest micro-batch these settings can produce: rows of max_len tokens."""
        if not self.pack:
            return M.MicroBatchShape.padded(self.micro_batch_size, max_len)
        if self.max_tokens:
            return M.MicroBatchShape.pack(max(self.max_tokens, max_len))  # a longer rollout goes alone
        return M.MicroBatchShape.pack(self.micro_batch_size * max_len)

    def label(self, max_len: int) -> str:
        tokens = self.worst(max_len).tokens
        if self.pack and self.max_tokens:
            return f"packed <= {self.max_tokens:,} tokens"
        return f"{'packed' if self.pack else 'padded'} {self.micro_batch_size} x {max_len:,} = {tokens:,} tokens"


@dataclass
class Estimate:
    """One layout and micro-batch, evaluated."""

    layout: Layout
    micro: MicroBatch
    training: M.Phase
    generation: M.Phase
    training_stage: int
    usable: int
    total: int
    kv_needed: int
    """KV cache for all of a replica's sequences at once (bytes per GPU)."""
    kv_planned: int
    """What the generation phase gives vLLM's KV cache (bytes per GPU)."""
    kv_per_sequence: int
    sequences: int
    """Sequences one replica generates in a step (its prompts x rollout.n)."""
    gpu_memory_utilization: float
    host_per_gpu: int
    """Pinned host memory per GPU: the reference copy and what is offloaded."""
    problem: str = ""
    """Why it does not fit (one line), or ""."""
    note: str = ""
    """Why the trainer cannot run this layout yet although it fits (EP_NOTE), or ""."""
    layer_bytes: dict[str, int] = field(default_factory=dict)
    """One layer's saved activations for the workload's rows, padded and packed (the issue's "per
    layer, with and without packing")."""

    @property
    def fits(self) -> bool:
        return not self.problem

    @property
    def peak(self) -> int:
        return max(self.training.total, self.generation.total)

    @property
    def concurrency(self) -> float:
        """Fraction of the replica's sequences the KV cache holds at once (1.0: all)."""
        return min(1.0, self.kv_planned / max(self.kv_needed, 1))


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _allowances(phase: M.Phase, layout: Layout, world: int) -> None:
    sizes = (layout.tp, layout.pp, layout.dp, layout.vllm_tp, layout.ep,
             layout.dp // layout.ep if layout.ep > 1 else 1)  # EP and expert-DP communicators
    groups = 1 + sum(size > 1 for size in sizes) if world > 1 else 0
    phase.add("CUDA context", M.CUDA_CONTEXT_GIB * GIB, "allowance: context, cuBLAS/cuDNN workspaces")
    if groups:
        phase.add("NCCL buffers", groups * M.NCCL_GIB_PER_GROUP * GIB,
                  f"allowance: {M.NCCL_GIB_PER_GROUP} GiB x {groups} communicators")


@functools.lru_cache(maxsize=4096)
def _state(shape: ModelShape, tp: int, pp: int, stage: int, dp: int, precision: M.Precision,
           fp32_norms: bool, ep: int = 1) -> M.StateBytes:
    """memory.train_state, cached: the searches below ask for the same layouts many times."""
    return M.train_state(shape, tp, pp, stage, dp, precision, fp32_norms=fp32_norms, ep=ep)


def _training(shape: ModelShape, w: Workload, layout: Layout, micro: MicroBatch, world: int
              ) -> tuple[M.Phase, int]:
    """The training phase of the worst pipeline stage, and that stage."""
    kernels = M.KERNELS[w.kernels]
    precision = M.Precision(bf16=w.bf16, distributed_optimizer=layout.distributed_optimizer, optimizer=w.optimizer)
    mb = micro.worst(w.max_len)
    rows_per_rank = w.mini_batch_prompts * w.rollouts_per_prompt // layout.dp
    micro_batches = rows_per_rank if micro.pack else max(1, rows_per_rank // micro.micro_batch_size)
    best: tuple[int, M.Phase, int] | None = None
    for stage in range(layout.pp):
        state = _state(shape, layout.tp, layout.pp, stage, layout.dp, precision, kernels.norm_params_fp32,
                       layout.ep)
        act = M.micro_batch_activations(shape, layout.tp, layout.pp, stage, mb, kernels, w.dtype_bytes,
                                        entropy=w.entropy, ep=layout.ep)
        flying = M.in_flight(layout.pp, stage, micro_batches)
        p = M.Phase("training")
        experts = ""
        if shape.arch.is_moe:
            experts = (f" ({shape.arch.num_experts // layout.ep} of {shape.arch.num_experts} experts per layer"
                       + (f", their optimizer over DP/EP={layout.dp // layout.ep}" if layout.ep > 1 else "") + ")")
        p.add("weights", state.weights, f"{'bf16' if w.bf16 else 'fp32'} params of this rank's shard{experts}")
        p.add("gradient buffer", state.grad_buffer, "fp32 (grad_reduce_in_fp32)")
        if state.main_params:
            p.add("optimizer: main params", state.main_params,
                  "fp32, 1/DP shard" if layout.distributed_optimizer else "fp32")
        p.add("optimizer: moments", state.optimizer_moments,
              ("2 fp32 Adam moments" if w.optimizer == "adam" else "fp32 momentum")
              + (", 1/DP shard" if layout.distributed_optimizer else ""))
        if w.kl_reference:
            p.add("KL reference", 0, "host copy swapped in (policy/reference.py)")
        layers = act.layers // max(1, shape.arch.num_layers // layout.pp)
        routed = ""
        if shape.arch.is_moe:
            routed = (f", routed rows {shape.arch.moe_topk} per token"
                      + (f" x {M.MOE_EP_IMBALANCE} imbalance allowance" if layout.ep > 1 else ""))
        p.add("activations", flying * act.saved,
              f"{mb.tokens:,} tokens x {shape.arch.num_layers // layout.pp} layers "
              f"({gib(layers)} GiB/layer{routed})" + (f" x {flying} micro-batches in flight" if flying > 1 else "")
              + (", logits kept" if act.logits else ""))
        if act.transient and act.transient > act.moe_dispatch:
            p.add("log-prob / output-layer peak", act.transient,
                  f"chunks of {M.LOGPROB_CHUNK_TOKENS} tokens; logits' gradient")
        elif act.transient:
            p.add("MoE dispatch peak", act.transient, "one layer's token-dispatch buffers: 2 x routed rows x hidden")
        p.add("allocator fragmentation", M.FRAGMENTATION * (flying * act.saved + act.transient),
              f"allowance: {M.FRAGMENTATION:.0%} of activations")
        _allowances(p, layout, world)
        p.add("vLLM asleep", M.VLLM_ASLEEP_GIB * GIB, "allowance: level-2 sleep keeps graphs, allocator")
        if best is None or p.total > best[0]:
            best = (p.total, p, stage)
    return best[1], best[2]


def _replica_sequences(w: Workload, layout: Layout, world: int) -> int:
    replicas = world // layout.vllm_tp
    return -(-w.prompts_per_step // replicas) * w.rollouts_per_prompt


def check_workload(shape: ModelShape, w: Workload) -> str | None:
    """Why the trainer cannot run this workload on this model at all, or None: a sequence longer
    than a Mistral sliding window (arch.check_sequence_length: Megatron's attention here has none)."""
    window = shape.arch.sliding_window
    if window is not None and w.max_len > window:
        return (f"max_prompt_len + max_response_len = {w.max_len:,} tokens is longer than this {shape.arch.family} "
                f"model's sliding_window={window:,}, which the trainer refuses (Megatron's attention here has no "
                "window); keep prompt + response within it")
    return None


def layout_note(layout: Layout) -> str:
    """What keeps the trainer from running a layout that fits (EP_NOTE), or ""."""
    return EP_NOTE.format(ep=layout.ep) if layout.ep > 1 else ""


def evaluate(shape: ModelShape, w: Workload, cluster: Cluster, layout: Layout, micro: MicroBatch) -> Estimate:
    """Both phases of `layout` with `micro`, and whether they fit (see the module docstring)."""
    world = cluster.world
    training, stage = _training(shape, w, layout, micro, world)
    precision = M.Precision(bf16=w.bf16, distributed_optimizer=layout.distributed_optimizer, optimizer=w.optimizer)
    kernels = M.KERNELS[w.kernels]
    # Generation: the worst stage's resident state (stage 0 holds the embedding).
    state = max((_state(shape, layout.tp, layout.pp, s, layout.dp, precision, kernels.norm_params_fp32, layout.ep)
                 for s in range(layout.pp)), key=lambda s: s.total)
    g = M.Phase("generation")
    offload_weights = layout.offload and w.offload_weights
    if not offload_weights:
        g.add("trainer weights", state.weights, "resident (rollout.offload_weights=false)")
    if not layout.offload:
        g.add("trainer gradients + optimizer", state.grad_buffer + state.optimizer,
              "resident (rollout.offload_train_state=false)")
    _allowances(g, layout, world)
    vw = vllm_weight_bytes(shape, layout.vllm_tp, w.dtype_bytes)
    g.add("vLLM weights", vw, f"bf16 at vLLM TP={layout.vllm_tp}")
    tokens, seqs = M.vllm_default_batching(cluster.gpu_memory_gib)
    runtime = M.vllm_runtime_bytes(shape, layout.vllm_tp, tokens, seqs, w.enforce_eager, w.dtype_bytes)
    g.add("vLLM runtime", sum(runtime.values()),
          f"profiling forward of {tokens:,} tokens, sampler for {seqs:,} sequences"
          + ("" if w.enforce_eager else ", CUDA graphs"))
    sequences = _replica_sequences(w, layout, world)
    kv = M.kv_cache(shape, layout.vllm_tp, sequences, w.max_len, w.kv_block_size, w.dtype_bytes)
    vllm_fixed = vw + sum(runtime.values())
    before_kv = g.total
    problem = ""
    if w.gpu_memory_utilization is not None or w.kv_cache_memory_bytes is not None:
        # As configured: vLLM takes util x memory (or weights + runtime + the explicit KV size).
        if w.kv_cache_memory_bytes is not None:
            kv_planned = int(w.kv_cache_memory_bytes)
        else:
            kv_planned = int(w.gpu_memory_utilization * cluster.total) - vllm_fixed
        util = (vllm_fixed + max(kv_planned, 0)) / cluster.total
    else:
        available = cluster.usable - before_kv
        kv_planned = max(0, min(kv.bytes, available))
        needed = (vllm_fixed + kv_planned) / cluster.total
        ceiling = (cluster.usable - (before_kv - vllm_fixed)) / cluster.total
        util = min(math.ceil(needed * 100) / 100, math.floor(ceiling * 100) / 100)
        kv_planned = max(0, int(util * cluster.total) - vllm_fixed)  # vLLM takes all of util x memory
    g.add("KV cache", max(kv_planned, 0),
          f"{sequences} sequences x {kv.blocks_per_sequence} blocks of {w.kv_block_size} tokens"
          + ("" if kv_planned >= kv.bytes else f" ({kv_planned / kv.bytes:.0%} of them at once)"))
    if workload_problem := check_workload(shape, w):
        problem = workload_problem
    elif training.total > cluster.usable:
        problem = (f"training needs {gib(training.total)} GiB with a {micro.worst(w.max_len).tokens:,}-token "
                   f"micro-batch, {gib(training.total - cluster.usable)} GiB over the {gib(cluster.usable)} GiB usable")
    elif kv_planned < replace(kv, sequences=1).bytes:
        one = replace(kv, sequences=1).bytes
        problem = (f"generation leaves vLLM's KV cache {gib(max(kv_planned, 0))} GiB, less than one "
                   f"{w.max_len:,}-token sequence ({gib(one)} GiB): {gib(one - max(kv_planned, 0))} GiB short")
    elif g.total > cluster.usable:
        problem = (f"generation needs {gib(g.total)} GiB (gpu_memory_utilization {util:.2f}), "
                   f"{gib(g.total - cluster.usable)} GiB over the {gib(cluster.usable)} GiB usable")
    kern, stage_layers = M.KERNELS[w.kernels], max(1, shape.arch.num_layers // layout.pp)
    padded = MicroBatch(False, w.micro_batch_size)
    packed = MicroBatch(True, w.micro_batch_size, w.max_tokens_per_micro_batch)
    layer_bytes = {label: M.micro_batch_activations(shape, layout.tp, layout.pp, 0, mb.worst(w.max_len), kern,
                                                    w.dtype_bytes, entropy=w.entropy, ep=layout.ep).layers
                   // stage_layers
                   for label, mb in ((padded.label(w.max_len), padded), (packed.label(w.max_len), packed))}
    host = (state.weights if w.kl_reference else 0)
    if layout.offload:
        host += state.grad_buffer + state.optimizer + (state.weights if offload_weights else 0)
    return Estimate(layout=layout, micro=micro, training=training, generation=g, training_stage=stage,
                    usable=cluster.usable, total=cluster.total, kv_needed=kv.bytes, kv_planned=max(kv_planned, 0),
                    kv_per_sequence=kv.bytes_per_sequence, sequences=sequences,
                    gpu_memory_utilization=round(util, 2), host_per_gpu=host, problem=problem,
                    layer_bytes=layer_bytes, note=layout_note(layout))


# -------------------------------------------------------------------------------- searching

def _rows_per_rank(w: Workload, dp: int) -> int:
    return w.mini_batch_prompts * w.rollouts_per_prompt // dp


def best_micro_batch(shape: ModelShape, w: Workload, cluster: Cluster, layout: Layout) -> Estimate:
    """The largest micro-batch with which `layout`'s training phase fits (packed: the largest
    max_tokens_per_micro_batch, a multiple of PACK_ROUNDING at or above one full-length rollout;
    padded: the largest micro_batch_size that divides the rank's rows). When even the smallest
    does not fit, the estimate of the smallest (with its problem)."""
    rows = _rows_per_rank(w, layout.dp)
    if w.pack_sequences:
        smallest = MicroBatch(pack=True, micro_batch_size=1, max_tokens=w.max_len)
        first = evaluate(shape, w, cluster, layout, smallest)
        if first.training.total > cluster.usable:
            return first
        lo, hi = w.max_len, max(w.max_len, rows * w.max_len)  # more than the rank's rows buys nothing
        while lo < hi:  # largest M whose training phase fits (the training phase alone decides)
            mid = (lo + hi + 1) // 2
            trial, _ = _training(shape, w, layout, MicroBatch(True, 1, mid), cluster.world)
            lo, hi = (mid, hi) if trial.total <= cluster.usable else (lo, mid - 1)
        tokens = max(w.max_len, lo // PACK_ROUNDING * PACK_ROUNDING) if lo < rows * w.max_len else lo
        return evaluate(shape, w, cluster, layout, MicroBatch(True, 1, tokens))
    best = None
    for size in sorted(d for d in range(1, rows + 1) if rows % d == 0):
        est = evaluate(shape, w, cluster, layout, MicroBatch(False, size))
        if best is None or est.training.total <= cluster.usable:
            best = est
        if est.training.total > cluster.usable:
            break
    return best


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def expert_parallel_sizes(shape: ModelShape, dp: int) -> list[int]:
    """EP sizes a layout with `dp` data-parallel ranks can take: 1 for a dense model; for a MoE
    model every EP that divides the experts and DP (Megatron's initialize_model_parallel needs
    world % (expert TP x EP x PP) == 0, i.e. EP | DP with expert TP = TP)."""
    if not shape.arch.is_moe:
        return [1]
    return [ep for ep in _divisors(dp) if shape.arch.num_experts % ep == 0]


def candidate_layouts(shape: ModelShape, w: Workload, cluster: Cluster,
                      distributed: tuple[bool, ...] = (True, False),
                      offload: tuple[bool, ...] = (True, False)) -> list[Layout]:
    """Every Megatron TP x PP x DP that divides the world and the model (TP within a node; a MoE
    model at TP=1 only, MOE_TP_PROBLEM, with every EP of expert_parallel_sizes), every vLLM TP
    within a node that the model allows, with the distributed optimizer and offload on/off; the
    batch must split over DP (the trainer's own check)."""
    world, out = cluster.world, []
    for tp in _divisors(world):
        if tp > cluster.gpus_per_node or (shape.arch.is_moe and tp > 1):
            continue
        for pp in _divisors(world // tp):
            if check_split(shape, tp, pp):
                continue
            dp = world // (tp * pp)
            if (w.mini_batch_prompts * w.rollouts_per_prompt) % dp:
                continue
            for ep in expert_parallel_sizes(shape, dp):
                for vtp in _divisors(world):
                    if vtp > cluster.gpus_per_node or check_vllm_split(shape, vtp):
                        continue
                    for dist in distributed:
                        for off in offload:
                            out.append(Layout(tp, pp, dp, vtp, dist, off, ep))
    return out


def _micro_tokens(e: Estimate, max_len: int) -> int:
    return e.micro.worst(max_len).tokens


def plan(shape: ModelShape, w: Workload, cluster: Cluster, layouts: list[Layout] | None = None
         ) -> tuple[list[Estimate], list[Estimate]]:
    """(layouts that fit, ranked; layouts that do not, each with its problem)."""
    layouts = candidate_layouts(shape, w, cluster) if layouts is None else layouts
    fits, rejected = [], []
    for layout in layouts:
        # Generation does not depend on the micro-batch; the plan's own gpu_memory_utilization does.
        est = best_micro_batch(shape, replace(w, gpu_memory_utilization=None, kv_cache_memory_bytes=None),
                               cluster, layout)
        (fits if est.fits else rejected).append(est)
    # What the trainer runs today first (EP > 1 after), then the fewest model-parallel ranks (EP
    # counted: it splits the experts, at the price of two all-to-alls per layer), the largest
    # micro-batch, the most concurrent sequences, no offload (no host copies each step), the most
    # headroom, the smallest vLLM TP (more replicas).
    fits.sort(key=lambda e: (bool(e.note), e.layout.tp * e.layout.pp * e.layout.ep, -_micro_tokens(e, w.max_len),
                             -round(e.concurrency, 3), e.layout.offload, e.peak, e.layout.vllm_tp,
                             not e.layout.distributed_optimizer))
    return fits, rejected
