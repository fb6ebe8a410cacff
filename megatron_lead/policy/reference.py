"""The frozen reference policy, without a second copy of the model on the GPU.

The reference weights live in host memory (pinned when CUDA is there). For the reference
forward they are exchanged with the policy's weights in place, one tensor at a time, and
exchanged back afterwards: the policy module runs as the reference, GPU memory grows by at most
one parameter tensor, and host memory holds one model copy (the reference while training,
the policy during the reference forward). Copies go through the module's own parameter
storage, so Megatron's DDP buffers (params are views into them) and the optimizer's fp32
master weights are never touched.
"""

from __future__ import annotations

import contextlib

import torch


def _params(model: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for chunk in model for p in chunk.parameters()]


class ReferenceWeights:
    """Host copy of a policy's weights, swappable into that policy module."""

    def __init__(self, model: list[torch.nn.Module]):
        """Snapshot the current weights of `model` (the list of model chunks) as the reference.

        Take it right after loading the base checkpoint (on resume: from the base checkpoint
        again, not from the resumed policy).
        """
        pin = torch.cuda.is_available()
        self._model_params = _params(model)
        self.host = [p.detach().to("cpu", copy=True) for p in self._model_params]
        if pin:
            self.host = [t.pin_memory() for t in self.host]
        self.swapped_in = False

    @torch.no_grad()
    def _exchange(self) -> None:
        for p, h in zip(self._model_params, self.host):
            tmp = p.detach().clone()         # the only extra device memory: one tensor
            p.data.copy_(h, non_blocking=True)
            h.copy_(tmp, non_blocking=True)  # same stream: runs after the copy above read h
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # host buffers are complete before anyone reads them
        self.swapped_in = not self.swapped_in

    @contextlib.contextmanager
    def active(self):
        """Within the block the policy module holds the reference weights; restored on exit."""
        if self.swapped_in:
            raise RuntimeError("reference weights are already swapped in")
        self._exchange()
        try:
            yield
        finally:
            self._exchange()
