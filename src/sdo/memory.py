"""Measuring the extra memory a gradient costs: CUDA allocator peak, or on CPU the bytes autograd saves."""

from __future__ import annotations

import torch
from torch import nn


class PeakMemory:
    """Context manager giving ``peak_bytes``: the extra memory used while it is open.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at entry. CPU (no allocator statistics): the
    bytes of distinct storages autograd saves for backward inside the context (parameters excluded, since they
    exist anyway) - the activation memory, which is what the gradient modes trade.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._storages: dict[int, int] = {}
        self._hooks = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
            self._hooks.__enter__()
        return self

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, nn.Parameter):
            storage = tensor.untyped_storage()
            self._storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._baseline
        else:
            self._hooks.__exit__(*exc)
            self.peak_bytes = sum(self._storages.values())
