"""The policy: a Megatron-Core GPTModel built from a Hugging Face config, and its forward pass.

`build_model` returns this rank's model chunks (a list, as Megatron's schedules take it) for the
current TP x PP layout (set up first with `policy.parallel.init_parallel`). `forward_backward`
runs micro-batches through Megatron's pipeline schedules (`get_forward_backward_func`), so the
same code serves PP=1 and PP>1; `forward_logits` is its forward-only use.

Logits are vocab-parallel: [b, s, padded_vocab / tp] on each TP rank of the LAST pipeline stage,
in TP-rank order. Columns past the HF vocab (padding added for TP) are set to -inf, so a softmax
over the padded vocab equals the softmax over the real one.

Positions: Megatron applies RoPE to positions 0..s-1 of every row (it ignores position_ids), so
rows must start at position 0 — right-padded batches, not left-padded ones.

Families (convert/families.py): Qwen3's per-head q/k RMSNorm is Megatron's `qk_layernorm`; a MoE
model (Qwen3-MoE) gets Megatron-Core's `MoELayer` in every layer (top-k softmax router, no
load-balancing loss: RL trains the policy as it is, and the loss would not change the logits);
a Mistral sliding window is refused for longer sequences (`arch.check_sequence_length`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch

from megatron_lead.policy import cpu_compat
from megatron_lead.policy.convert.arch import (
    ModelArch, arch_from_hf, check_parallel_sizes, check_sequence_length, load_hf_config, padded_vocab_size)


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match torch
        return False
    return True


def transformer_config(arch: ModelArch, dtype: torch.dtype = torch.float32, **overrides):
    """Megatron TransformerConfig for `arch` at the current TP x PP sizes."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_cpu = cpu_compat.needed()
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        gated_linear_unit=True,                      # SwiGLU: silu(gate) * up
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        # RL needs the exact policy: no dropout, and the HF models have none either.
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        # Fused kernels that need Apex/TE stay off (neither is on every machine); on GPU, the two
        # Megatron fuses itself (SwiGLU, vocab-parallel cross entropy) are on.
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        bias_activation_fusion=not on_cpu,
        cross_entropy_loss_fusion=not on_cpu,
        cross_entropy_fusion_impl="native",
        qk_layernorm=arch.qk_norm,
    )
    if arch.is_moe:
        kwargs.update(_moe_config(arch, on_cpu))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _moe_config(arch: ModelArch, on_cpu: bool) -> dict:
    """TransformerConfig keys of a MoE model (HF Qwen3-MoE routing, at the current EP size).

    HF: softmax over all experts, the top k kept, renormalised when norm_topk_prob. Megatron's
    "softmax" router does exactly that with pre-softmax (probabilities of the full softmax), and
    without it takes the softmax of the top-k logits, which is the renormalised form. The router
    runs in fp32 (bf16 logits can flip a top-k choice against vLLM's). Dispatcher: "allgather" on
    CPU, the one that runs there ("alltoall" creates CUDA streams in its constructor), "alltoall"
    on GPUs (expert-parallel ranks hold micro-batches of different lengths, which the all-gather
    of hidden states cannot take). Experts are Megatron's SequentialMLP (no grouped GEMM), whose
    names the mapping table uses.
    """
    from megatron.core import parallel_state

    return dict(
        num_moe_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_topk=arch.moe_topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not arch.moe_norm_topk,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="allgather" if on_cpu else "alltoall",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
    )


def _moe_router_without_te() -> None:
    """Megatron-Core 0.16.1's router linear (`moe_utils.RouterGatingLinearFunction`) tests
    `te_general_gemm is not None`, a name that module only defines when Transformer Engine
    imports: without TE every MoE forward dies with a NameError. Defining it as None selects the
    plain torch.mm branch the code has for that case (idempotent; nothing changes with TE)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def layer_spec(attention: str = "auto", arch: ModelArch | None = None):
    """Layer spec: "te" (Transformer Engine), "sdpa" (local spec + SDPA), "local" (Megatron's
    unfused DotProductAttention, needs an explicit mask), or "auto" (te if importable, else sdpa).
    arch: adds the q/k norms and the MoE layer its family has (None: a dense Llama-like layer)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec)

    family = dict(qk_layernorm=bool(arch and arch.qk_norm),
                  num_experts=arch.num_experts if arch and arch.is_moe else None, moe_grouped_gemm=False)
    if attention == "auto":
        attention = "te" if have_transformer_engine() else "sdpa"
    if attention == "te":
        return get_gpt_layer_with_transformer_engine_spec(**family)
    if attention not in ("sdpa", "local"):
        raise ValueError(f"unknown attention {attention!r}; use auto, te, sdpa or local")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", **family)
    if attention == "sdpa":
        from megatron_lead.policy.attention import SDPACoreAttention

        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def build_model(hf_config: Any, dtype: torch.dtype = torch.float32, attention: str = "auto",
                init_weights: bool = True, compile_layers: bool = False, **config_overrides) -> list:
    """This rank's model chunks (one GPTModel) for the current TP x PP groups.

    hf_config: HF model folder, config.json path, dict or PretrainedConfig of a family in
    convert/families.py (Qwen2, Llama, Qwen3, Mistral, Qwen3-MoE).
    init_weights=False skips Megatron's random init (faster when a checkpoint is loaded next).
    compile_layers: torch.compile every transformer layer (see compile_transformer_layers).
    The model is on the current CUDA device, or on CPU without CUDA; in train mode.
    """
    from megatron_lead.policy.packing import use_traceable_thd_rope

    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    cpu_compat.apply()
    hf_config = load_hf_config(hf_config)
    arch = arch_from_hf(hf_config)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    check_parallel_sizes(arch, tp, pp, ep)
    if arch.is_moe and parallel_state.get_expert_tensor_parallel_world_size() != tp:
        raise ValueError(f"expert tensor-parallel size {parallel_state.get_expert_tensor_parallel_world_size()} "
                         f"differs from tp={tp}; only an equal one is supported")
    if arch.is_moe:
        _moe_router_without_te()
    config = transformer_config(arch, dtype, perform_initialization=init_weights,
                                **config_overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(attention, arch),
        vocab_size=padded_vocab_size(arch.vocab_size, tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )
    if not init_weights:
        _mark_tensor_parallel_weights(model)
    # The loader, the gather, the forward and checkpoint saving read these from the model.
    model.arch = arch
    model.hf_config = hf_config
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    use_traceable_thd_rope()  # packed sequences: RoPE without host syncs (policy/packing.py)
    if compile_layers:
        compile_transformer_layers([model])
    return [model]


def _quiet_default_tp_group() -> None:
    """Megatron 0.16.1's RowParallelLinear passes tp_group=None on every forward, and the lookup
    of the default group warns each time (on rank 0): inside a compiled layer that warning is a
    graph break, two per layer. Same lookup, no warning (idempotent)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import layers

    original = layers.get_tensor_model_parallel_group_if_none
    if getattr(original, "quiet", False):
        return

    def quiet(tp_group, is_expert=False, check_initialized=True):
        if tp_group is None and not is_expert and parallel_state.is_initialized():
            return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)
        return original(tp_group, is_expert=is_expert, check_initialized=check_initialized)

    quiet.quiet = True
    layers.get_tensor_model_parallel_group_if_none = quiet


def compile_problem() -> str | None:
    """Why torch.compile cannot run here (inductor builds C++ on CPU, Triton's launcher in C on
    GPU, both with the system compiler), or None."""
    import shutil

    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        return "torch.compile needs a C/C++ compiler (g++, c++ or clang++ on PATH, or CXX) and none is installed"
    return None


def compile_transformer_layers(model_chunks: list) -> int:
    """torch.compile each TransformerLayer of the chunks in place; returns how many.

    Layers, not the whole model: Megatron's pipeline schedule, the embedding, the vocab-parallel
    output and the loss stay eager (and every layer shares one compiled graph, the parameters
    being graph inputs). dynamic=True: sequence and pack lengths are symbolic from the first
    call, so RL batches of ever-changing length reuse the graphs instead of recompiling
    (tests/test_policy_compile.py counts the compilations).
    """
    problem = compile_problem()
    if problem:
        raise RuntimeError(problem)
    _quiet_default_tp_group()
    count = 0
    for chunk in model_chunks:
        for layer in unwrap(chunk).decoder.layers:
            layer.compile(dynamic=True)
            count += 1
    return count


def _mark_tensor_parallel_weights(model) -> None:
    """Tag split weights as tensor-parallel, as Megatron's random init would have.

    Megatron sets `tensor_model_parallel` / `partition_dim` on a layer's weight only inside its
    init routine, which perform_initialization=False skips; without the tags the grad norm (and
    so clipping) counts those weights on TP rank 0 only.
    """
    from megatron.core import tensor_parallel as mtp

    dims = ((mtp.VocabParallelEmbedding, 0), (mtp.ColumnParallelLinear, 0), (mtp.RowParallelLinear, 1))
    for module in model.modules():
        for cls, dim in dims:
            weight = getattr(module, "weight", None)
            if isinstance(module, cls) and weight is not None and not hasattr(weight, "partition_dim"):
                mtp.set_tensor_model_parallel_attributes(weight, True, dim, 1)


def unwrap(module):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(module, "arch") and hasattr(module, "module"):
        module = module.module
    return module


def mask_vocab_padding(logits: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """Set this TP rank's logit columns past arch.vocab_size to -inf (in place; autograd-safe)."""
    from megatron.core import parallel_state

    part = logits.size(-1)
    start = parallel_state.get_tensor_model_parallel_rank() * part
    first_pad = arch.vocab_size - start
    if first_pad < part:
        logits[..., max(first_pad, 0):] = float("-inf")
    return logits


def forward_backward(model_chunks: list, micro_batches: Iterable[dict],
                     loss_fn: Callable | None, *, forward_only: bool,
                     collect: Callable | None = None) -> list:
    """Run micro-batches through Megatron's schedule for the current PP size.

    micro_batches: dicts with "tokens" [mbs, s] (int64; all the same shape) plus anything the
    loss needs; optional "attention_mask" (bool [mbs, 1, s, s], True = masked, replaces causal).
    Or packed ones (policy/packing.PackedMicroBatch.as_dict: tokens [1, T], "positions",
    "cu_seqlens", "max_seqlen"; T may differ between micro-batches), run with Megatron's
    PackedSeqParams; logits are then [1, T, V/tp].
    loss_fn(logits, batch) -> (loss_sum, num_tokens, metrics_dict): called on the last stage with
    vocab-parallel logits [mbs, s, V/tp]; Megatron divides loss_sum by num_tokens (with
    calculate_per_token_loss=False) and by the number of micro-batches, then backpropagates.
    collect(logits, batch) -> anything: forward-only alternative to loss_fn; its results are
    returned in micro-batch order on the last stage.
    Returns the per-micro-batch metrics (or collect results) on the last stage, [] elsewhere.
    The caller zeroes grads / steps the optimizer; this only runs forward (+ backward).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro_batches = list(micro_batches)
    if not micro_batches:
        return []
    if collect is not None and not forward_only:
        raise ValueError("collect= is for forward_only runs")
    if (loss_fn is None) == (collect is None):
        raise ValueError("pass exactly one of loss_fn and collect")
    packed = "cu_seqlens" in micro_batches[0]
    mbs, seq = micro_batches[0]["tokens"].shape
    if packed:
        # Packs differ in length: Megatron's pipeline then sends each activation's shape first.
        seq = max(mb["tokens"].size(1) for mb in micro_batches)
        unwrap(model_chunks[0]).config.variable_seq_lengths = True
    for mb in micro_batches:
        if not packed and mb["tokens"].shape != (mbs, seq):
            raise ValueError(f"micro-batch tokens {tuple(mb['tokens'].shape)} differ from "
                             f"the first one's {(mbs, seq)}")
        if ("cu_seqlens" in mb) != packed:
            raise ValueError("micro-batches are either all packed or all padded")
    model = unwrap(model_chunks[0])
    arch = model.arch
    check_sequence_length(arch, seq if not packed else max(int(mb["max_seqlen"]) for mb in micro_batches))
    if arch.is_moe and model.config.tensor_model_parallel_size > 1 and (model.training or not forward_only):
        # Megatron's MoELayer raises in train mode at TP > 1 without sequence parallelism (forward
        # passes of the trainer run in train mode too); say what to do instead, up front.
        raise ValueError("training a mixture-of-experts model at TP > 1 needs Megatron's sequence "
                         "parallelism, which this project does not turn on; train it at TP=1 "
                         "(pipeline and expert parallelism split it further)")
    if arch.is_moe and model.config.expert_model_parallel_size > 1 \
            and model.config.moe_token_dispatcher_type == "allgather":
        _same_tokens_over_expert_parallel(micro_batches)
    device = next(model.parameters()).device
    batches = iter(micro_batches)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device, non_blocking=True)
        mask = batch.get("attention_mask")
        extra = {}
        if packed:
            from megatron_lead.policy.packing import packed_seq_params

            positions = batch["positions"].to(device, non_blocking=True)
            extra["packed_seq_params"] = packed_seq_params(batch["cu_seqlens"].to(device), batch["max_seqlen"])
        else:
            positions = torch.arange(tokens.size(1), device=device).unsqueeze(0).expand(tokens.size(0), -1)
        output = model(input_ids=tokens, position_ids=positions,
                       attention_mask=None if mask is None else mask.to(device), **extra)

        def finish(logits, non_loss_data=False):
            logits = mask_vocab_padding(logits, arch)
            if non_loss_data:
                return collect(logits, batch)
            return loss_fn(logits, batch)

        return output, finish

    forward_backward_func = get_forward_backward_func()
    return forward_backward_func(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=model_chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
        collect_non_loss_data=collect is not None,
    )


def _same_tokens_over_expert_parallel(micro_batches: list[dict]) -> None:
    """One-line ValueError on every rank of the expert-parallel group unless all of them run the
    same number of tokens in each micro-batch.

    Megatron's all-gather token dispatcher (the one that runs on CPU) all-gathers the hidden
    states of the whole EP group; gloo aborts the process when the ranks' sizes differ (RL
    micro-batches are cut to their own longest row, so they do). The all-to-all dispatcher used
    on GPUs exchanges counts first and has no such need.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    counts = [int(mb["tokens"].numel()) for mb in micro_batches]
    every = [None] * parallel_state.get_expert_model_parallel_world_size()
    dist.all_gather_object(every, counts, group=parallel_state.get_expert_model_parallel_group())
    if any(c != every[0] for c in every):
        raise ValueError(f"expert parallelism with Megatron's all-gather token dispatcher (CPU) needs the "
                         f"same tokens per micro-batch on every EP rank; they have {every}")


@torch.no_grad()
def forward_logits(model_chunks: list, tokens: torch.Tensor, micro_batch_size: int | None = None,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Vocab-parallel logits [b, s, padded_vocab/tp] of tokens [b, s] (eval mode, no grad).

    Returns the logits on the last pipeline stage and None on the others. The model's
    train/eval mode is restored afterwards.
    """
    b = tokens.size(0)
    mbs = micro_batch_size or b
    if b % mbs:
        raise ValueError(f"batch size {b} is not divisible by micro_batch_size {mbs}")
    micro_batches = []
    for i in range(0, b, mbs):
        mb = {"tokens": tokens[i:i + mbs]}
        if attention_mask is not None:
            mb["attention_mask"] = attention_mask[i:i + mbs] if attention_mask.size(0) == b \
                else attention_mask
        micro_batches.append(mb)
    modes = [m.training for m in model_chunks]
    for m in model_chunks:
        m.eval()
    try:
        outs = forward_backward(model_chunks, micro_batches, None, forward_only=True,
                                collect=lambda logits, batch: logits)
    finally:
        for m, mode in zip(model_chunks, modes):
            m.train(mode)
    from megatron.core import parallel_state

    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.cat(outs, dim=0)
