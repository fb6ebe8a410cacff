# GPU image: CUDA 13.0 devel + cuDNN on Ubuntu 24.04 (Python 3.12), with PyPI's torch 2.13.0,
# vllm 0.32.0, megatron-core 0.16.1 and Transformer Engine 2.17.1 compiled against that torch.
#
#   docker build -t megatron-lead .
#   docker run --gpus all --ipc=host megatron-lead train --config run.yaml             # one process
#   docker run --gpus all --ipc=host -e NPROC_PER_NODE=8 megatron-lead train --config run.yaml
#       (torchrun, one rank per GPU; several nodes: also NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT)
#
# Why this base and not NGC PyTorch (the earlier one): an NGC PyTorch image pins its own torch
# build through pip constraints, while vllm 0.32.0 requires torch==2.13.0 exactly, so
# `pip install -r requirements.txt` cannot resolve there, and forcing it breaks NGC's own
# Transformer Engine and apex, which are compiled against NGC's torch. Here torch comes from PyPI:
# torch 2.13.0's PyPI wheel is a CUDA 13.0 build (it pulls cuda-toolkit 13.0.3 wheels) and
# vllm 0.32.0's PyPI wheel is built against it (it links libnvrtc.so.13), so the CUDA toolkit
# here is 13.0 too. devel (nvcc, headers) + cuDNN because Transformer Engine's PyTorch extension
# is source only on PyPI and is compiled below; Ubuntu 24.04 because its Python is 3.12 and its
# glibc (2.39) takes every wheel of the set (vllm's llguidance 1.7 needs glibc 2.31+).
# tools/check_gpu_requirements.sh asks pip's resolver whether this set still resolves.
ARG BASE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUDA_HOME=/usr/local/cuda VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# Ubuntu's Python is "externally managed" (PEP 668): the stack goes into a venv.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv

WORKDIR /workspace/megatron-lead
COPY requirements.txt .
# 1. The wheel set in one resolve: torch 2.13.0 (CUDA 13.0), vllm, megatron-core, TE's Python
#    package and prebuilt CUDA 13 core library, transformers, ...
RUN pip install -r requirements.txt
# 2. TE's PyTorch extension, compiled against the torch installed in step 1. --no-build-isolation:
#    otherwise pip builds it in a throwaway environment with the newest torch (its build
#    requirement is only torch>=2.1), and the extension fails to load against 2.13.0. Its
#    setup.py imports `wheel`. It first looks for a matching prebuilt wheel on TE's GitHub
#    releases and compiles (C++ only, a few minutes; MAX_JOBS parallel jobs) when there is none.
#    The release must equal transformer-engine's in requirements.txt (tests/test_versions.py).
ARG MAX_JOBS=8
RUN pip install wheel \
    && MAX_JOBS=${MAX_JOBS} pip install --no-build-isolation transformer-engine-torch==2.17.1

COPY . .
RUN pip install --no-deps -e . \
    && python -c "from megatron_lead.versions import require; print('vllm', require('vllm'), 'megatron-core', require('megatron-core'))"

# One process by default; NPROC_PER_NODE=N (or "gpu": every visible GPU) runs torchrun with one
# rank per GPU, which sets each rank's device and NCCL (`megatron-lead train --nproc N` is CPU only).
RUN printf '%s\n' '#!/bin/sh' 'set -e' 'n=${NPROC_PER_NODE:-1}' \
        'if [ "$n" = 1 ]; then exec python -m megatron_lead.cli "$@"; fi' \
        'exec torchrun --nproc-per-node "$n" --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" -m megatron_lead.cli "$@"' \
        > /usr/local/bin/megatron-lead-entrypoint \
    && chmod +x /usr/local/bin/megatron-lead-entrypoint
ENTRYPOINT ["megatron-lead-entrypoint"]
CMD ["--help"]
