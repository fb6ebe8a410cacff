# GPU image: NGC PyTorch (CUDA, cuDNN, NCCL, Transformer Engine and apex preinstalled) + our stack.
#   docker build -t megatron-lead . && docker run --gpus all --ipc=host megatron-lead --help
FROM nvcr.io/nvidia/pytorch:25.10-py3
WORKDIR /workspace/megatron-lead
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
ENTRYPOINT ["megatron-lead"]
