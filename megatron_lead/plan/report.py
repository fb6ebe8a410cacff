"""The planner's answers as text: phase tables, the ranked layouts, YAML keys, JSON, the one line
`train` prints, and the memory comment the recipes carry.

Kept apart from the arithmetic (planner.py) so the tests can compare numbers without parsing text,
and the recipes' comments are produced by the same function that the recipe test re-runs.
"""

from __future__ import annotations

from megatron_lead.plan import memory as M
from megatron_lead.plan.planner import Cluster, Estimate, Workload, gib
from megatron_lead.plan.shapes import ModelShape


def phase_table(est: Estimate, indent: str = "  ") -> list[str]:
    """Both phases, term by term, with peaks and headroom."""
    lines = []
    stage = f" (pipeline stage {est.training_stage}, the largest)" if est.layout.pp > 1 else ""
    for phase, title in ((est.training, f"training{stage}"), (est.generation, "generation")):
        lines.append(f"{indent}{title:<34} {'GiB':>6}")
        for t in phase.terms:
            lines.append(f"{indent}  {t.name:<32} {gib(t.bytes):>6}  {t.note}")
            if t.name == "activations" and est.layer_bytes:
                lines.append(f"{indent}    one layer: " + "; ".join(
                    f"{label}: {gib(n)} GiB" for label, n in est.layer_bytes.items()))
        lines.append(f"{indent}  {'peak':<32} {gib(phase.total):>6}  headroom {gib(est.usable - phase.total)} "
                     f"GiB to the {gib(est.usable)} GiB usable")
    share = f"{est.concurrency:.0%}" if est.concurrency < 1 else "all"
    lines.append(f"{indent}vLLM: gpu_memory_utilization {est.gpu_memory_utilization:.2f}; KV cache holds {share} of "
                 f"the replica's {est.sequences} sequences at once ({gib(est.kv_needed)} GiB for all)")
    if est.note:
        lines.append(f"{indent}note: {est.note}")
    return lines


def yaml_keys(est: Estimate, w: Workload) -> list[str]:
    """The trainer keys that select this layout and micro-batch."""
    lay, micro = est.layout, est.micro
    lines = ["parallel:", f"  tensor_model_parallel_size: {lay.tp}", f"  pipeline_model_parallel_size: {lay.pp}"]
    if lay.ep > 1:
        lines.append(f"  # expert parallelism EP={lay.ep}: no train key yet (megatron-lead convert --ep {lay.ep})")
    lines += ["rollout:", f"  tensor_parallel_size: {lay.vllm_tp}",
             f"  gpu_memory_utilization: {est.gpu_memory_utilization:.2f}",
             f"  offload_train_state: {str(lay.offload).lower()}"]
    if lay.offload and w.offload_weights:
        lines.append("  offload_weights: true")
    lines += ["ppo:", f"  pack_sequences: {str(micro.pack).lower()}"]
    if micro.pack and micro.max_tokens:
        lines.append(f"  max_tokens_per_micro_batch: {micro.max_tokens}")
    else:
        lines.append(f"  micro_batch_size: {micro.micro_batch_size}")
    lines += ["optim:", f"  distributed_optimizer: {str(lay.distributed_optimizer).lower()}"]
    return lines


def layouts_table(fits: list[Estimate], w: Workload, top: int) -> list[str]:
    """One row per layout; an EP column and a note column only when some layout has EP > 1 (a
    dense model's table is unchanged)."""
    moe = any(e.layout.ep > 1 for e in fits)
    head = (f"  {'#':>2} {'TP':>3} {'PP':>3} {'DP':>3} " + (f"{'EP':>3} " if moe else "") + f"{'vTP':>4} "
            f"{'optimizer':<10} {'offload':<8} {'micro-batch':<32} {'train':>6} {'gen':>6} {'headroom':>8} "
            f"{'util':>5} {'KV':>5}" + ("  note" if moe else ""))
    lines = [head]
    for i, e in enumerate(fits[:top], start=1):
        lay = e.layout
        lines.append(f"  {i:>2} {lay.tp:>3} {lay.pp:>3} {lay.dp:>3} " + (f"{lay.ep:>3} " if moe else "")
                     + f"{lay.vllm_tp:>4} "
                     f"{'dist' if lay.distributed_optimizer else 'plain':<10} {'on' if lay.offload else 'off':<8} "
                     f"{e.micro.label(w.max_len):<32} {gib(e.training.total):>6} {gib(e.generation.total):>6} "
                     f"{gib(e.usable - e.peak):>8} {e.gpu_memory_utilization:>5.2f} {e.concurrency:>5.0%}"
                     + (("  plan/convert only" if e.note else "") if moe else ""))
    if len(fits) > top:
        lines.append(f"  ... and {len(fits) - top} more (--top {len(fits)})")
    if moe:
        lines.append("  plan/convert only: EP > 1, which train cannot ask for yet (no expert-parallel key); "
                     "megatron-lead convert --ep N writes such checkpoints")
    return lines


def header(shape: ModelShape, w: Workload, cluster: Cluster) -> list[str]:
    a = shape.arch
    heads = f"{a.num_heads} heads / {a.num_kv_heads} KV heads"
    if a.head_dim * a.num_heads != a.hidden_size:
        heads += f" of {a.head_dim}"
    moe = ""
    if a.is_moe:
        moe = (f", {a.num_experts} experts of {a.moe_ffn_hidden_size} per layer, top-{a.moe_topk}: "
               f"{shape.active_params / 1e9:.2f}B active per token")
    micro = ("packed" + (f", <= {w.max_tokens_per_micro_batch:,} tokens" if w.max_tokens_per_micro_batch else "")
             if w.pack_sequences else f"padded, {w.micro_batch_size} rollout(s)")
    lines = [
        f"model: {shape.source} ({shape.num_params / 1e9:.2f}B params, {a.num_layers} layers, hidden "
        f"{a.hidden_size}, {heads}, vocab {a.vocab_size:,}{moe})",
        f"cluster: {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs of {cluster.gpu_memory_gib:.1f} GiB; "
        f"usable {gib(cluster.usable)} GiB per GPU (reserve {cluster.reserve:.0%})",
        f"workload: {w.prompts_per_step} prompts x {w.rollouts_per_prompt} rollouts per step, "
        f"{w.max_prompt_len:,} + {w.max_response_len:,} tokens, mini-batches of {w.mini_batch_prompts} prompts, "
        f"micro-batches {micro}; {'bf16' if w.bf16 else 'fp32'}, {w.optimizer}, "
        f"KL reference {'on (host copy)' if w.kl_reference else 'off'}; kernels: {w.kernels}",
    ]
    if a.is_moe:
        lines.append("mixture of experts: layouts at TP=1 only (the trainer's MoE training refuses TP > 1: Megatron's "
                     "MoE layer would need sequence parallelism), EP = 1 and every EP dividing DP and the experts; "
                     f"routed rows balanced, x {M.MOE_EP_IMBALANCE} on the busiest EP rank when EP > 1")
    return lines


def one_line(est: Estimate, w: Workload, checked: bool = True) -> str:
    """What `train` prints at start-up."""
    text = (f"plan: {est.layout.label()}, {est.micro.label(w.max_len)}: peak {gib(est.training.total)} GiB "
            f"training, {gib(est.generation.total)} GiB generating (KV cache {gib(est.kv_planned)} GiB)")
    if not checked:
        return text + " per GPU (no GPU here: not checked)"
    text += f" of {gib(est.total)} GiB per GPU"
    if est.fits:
        return text + f"; fits with {gib(est.usable - est.peak)} GiB to spare"
    return text + f"; does not fit: {est.problem}"


def recipe_comment(est: Estimate, w: Workload, command: str) -> list[str]:
    """The memory block a recipe carries (tests/test_plan.py re-runs the planner and compares)."""
    t, g = est.training, est.generation

    def named(phase: M.Phase, *names: str) -> float:
        return sum(term.bytes for term in phase.terms if term.name in names)

    allow_t = named(t, "allocator fragmentation", "CUDA context", "NCCL buffers", "vLLM asleep")
    allow_g = named(g, "CUDA context", "NCCL buffers")
    optimizer = named(t, "optimizer: main params", "optimizer: moments")
    resident = named(g, "trainer weights", "trainer gradients + optimizer")
    lines = [
        "Memory per GPU, from the planner (docs/PLAN.md explains every term):",
        f"  {command}",
        f"  {est.layout.label()}; {est.micro.label(w.max_len)}",
        f"  training {gib(t.total)} GiB: weights {gib(named(t, 'weights'))}, fp32 gradients "
        f"{gib(named(t, 'gradient buffer'))}, optimizer {gib(optimizer)}, activations {gib(named(t, 'activations'))}, "
        f"log-prob peak {gib(named(t, 'log-prob / output-layer peak'))}, allowances {gib(allow_t)}",
        f"  generation {gib(g.total)} GiB: trainer {gib(resident)}, vLLM weights {gib(named(g, 'vLLM weights'))}, "
        f"runtime {gib(named(g, 'vLLM runtime'))}, KV cache {gib(named(g, 'KV cache'))}, allowances {gib(allow_g)}",
        f"  of {gib(est.total)} GiB ({gib(est.usable)} usable): "
        + ("fits" if est.fits else f"DOES NOT FIT: {est.problem}")
        + f"; gpu_memory_utilization {est.gpu_memory_utilization:.2f}; "
        f"pinned host memory {gib(est.host_per_gpu)} GiB per GPU",
    ]
    return lines


def as_json(est: Estimate, w: Workload) -> dict:
    def phase(p: M.Phase) -> dict:
        return {"peak_bytes": p.total, "terms": [{"name": t.name, "bytes": t.bytes, "note": t.note} for t in p.terms]}

    lay = est.layout
    return {"layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep, "vllm_tp": lay.vllm_tp,
                       "distributed_optimizer": lay.distributed_optimizer, "offload_train_state": lay.offload},
            "micro_batch": {"pack_sequences": est.micro.pack, "micro_batch_size": est.micro.micro_batch_size,
                            "max_tokens_per_micro_batch": est.micro.max_tokens,
                            "worst_tokens": est.micro.worst(w.max_len).tokens},
            "fits": est.fits, "problem": est.problem, "note": est.note, "training": phase(est.training),
            "generation": phase(est.generation), "training_stage": est.training_stage,
            "gpu_memory_utilization": est.gpu_memory_utilization, "kv_needed_bytes": est.kv_needed,
            "kv_planned_bytes": est.kv_planned, "sequences_per_replica": est.sequences,
            "usable_bytes": est.usable, "total_bytes": est.total, "host_pinned_bytes_per_gpu": est.host_per_gpu,
            "yaml": "\n".join(yaml_keys(est, w))}
