#!/usr/bin/env bash
# Everything a lent GPU can check without vLLM, in ONE device call of at most 7 minutes
# (issues 11 and 16). The lent machine has no vLLM, Transformer Engine, apex or network, one GPU.
#
# COVERS (one process each, one GPU, an NCCL world of 1):
#   probe          versions, the GPU, torch's varlen attention signature, a C compiler
#   check          tools/check_packing_gpu.py: packed (varlen / loop / mask) and compiled log-probs
#                  against the padded fp32 path, chunked vs unchunked log-probs
#   train          tools/check_train_gpu.py: bf16 + Megatron DDP + the distributed optimizer: the PPO
#                  phase (first update's ratio exactly 1, padded and packed, memory/peak_train_gb),
#                  the offload round trip on CUDA (bytes freed on the device, bit-exact, GB/s), a
#                  save + load of the distributed-optimizer checkpoint into a fresh policy
#   ours           tools/bench_policy_gpu.py --configs ours (packed + compiled + chunked), single + rl
#   hf_sdpa        HF transformers + SDPA, padded micro-batches, same GPU and batches
#   hf_compile_*   the same under torch.compile (single and rl in separate processes: each
#                  compiles for its own shapes)
#   ours_eager     ours without torch.compile (what compilation adds)
# CANNOT COVER: vLLM (generation, the weight sync, sleep level 2 and the tagged wake-up,
# memory/peak_generate_gb), tensor / pipeline / data parallel over NCCL (one GPU), several nodes,
# Transformer Engine attention. docs/GPU.md lists what has never run on a GPU.
#
# megatron-core travels as a wheel in .whl/ (ignored by git). Fetch it once on a machine with
# network, from the repository root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl megatron-core==0.16.1
#
# then run (device tool): command "bash tools/gpu_session.sh", carry [".whl"], timeout_s 480.
# Dry run on a CPU machine (tiny models, same steps): TINY=1 PYTHON=.venv/bin/python bash tools/gpu_session.sh
#
# Each step runs in its own process under its own time limit (a hang or an out-of-memory loses one
# step, not the session); the limits add up to 395 s, inside the 400 s budget, so no step is
# skipped for time unless the wheel install is slow (a step whose limit would end past the budget
# is skipped and recorded).
# Results: $OUT/check_train_gpu.jsonl, $OUT/check_packing_gpu.jsonl, $OUT/bench_policy_gpu.jsonl,
# $OUT/gpu_session.jsonl (one line per step: rc, seconds), $OUT/gpu_session.log (everything printed).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
LOG="$OUT/gpu_session.log"
BUDGET=400
START=$(date +%s)
PY=${PYTHON:-python3}
TINY=${TINY:-}  # TINY=1: the CPU dry run of this script
BENCH_ARGS=${TINY:+--tiny}

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    if (( t0 - START + limit > BUDGET )); then
        echo "{\"step\": \"$name\", \"skipped\": \"budget\", \"elapsed_s\": $((t0 - START))}" >> "$OUT/gpu_session.jsonl"
        echo "== $name skipped: budget" | tee -a "$LOG"
        return
    fi
    echo "== $name (limit ${limit}s)" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"timed_out\": $([ $rc = 124 ] && echo true || echo false)}" \
        >> "$OUT/gpu_session.jsonl"
    grep -h '^{' "$OUT"/*.jsonl 2>/dev/null | tail -n 3 | cut -c1-400
}

# megatron-core from the carried wheel (no network there); this repository on the path.
if ls .whl/megatron_core-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/megatron_core-*.whl >> "$LOG" 2>&1 || echo "wheel install failed (see $LOG)"
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

step probe 15 $PY - <<'EOF'
import inspect, json, os, shutil, torch
r = {"step": "probe", "torch": torch.__version__, "cuda": torch.cuda.is_available()}
if r["cuda"]:
    r["gpu"] = torch.cuda.get_device_name()
    r["gpu_mem_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
try:
    import transformers; r["transformers"] = transformers.__version__
except Exception as e: r["transformers"] = repr(e)
try:
    import megatron.core; r["megatron_core"] = megatron.core.__version__
except Exception as e: r["megatron_core"] = repr(e)[:300]
try:
    from torch.nn.attention.varlen import varlen_attn
    r["varlen_params"] = list(inspect.signature(varlen_attn).parameters)
except Exception as e: r["varlen_params"] = repr(e)[:200]
r["cxx"] = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
print(json.dumps(r))
open(os.path.join(os.environ["OUT"], "gpu_session.jsonl"), "a").write(json.dumps(r) + "\n")
EOF

step check 40 $PY tools/check_packing_gpu.py
step train 60 $PY tools/check_train_gpu.py $BENCH_ARGS
step ours 95 $PY tools/bench_policy_gpu.py --configs ours $BENCH_ARGS
step hf_sdpa 30 $PY tools/bench_policy_gpu.py --configs hf_sdpa $BENCH_ARGS
step hf_compile_single 55 $PY tools/bench_policy_gpu.py --configs hf_sdpa_compile --workloads single $BENCH_ARGS
step hf_compile_rl 70 $PY tools/bench_policy_gpu.py --configs hf_sdpa_compile --workloads rl $BENCH_ARGS
step ours_eager 30 $PY tools/bench_policy_gpu.py --configs ours_eager $BENCH_ARGS
echo "== done in $(( $(date +%s) - START )) s" | tee -a "$LOG"
