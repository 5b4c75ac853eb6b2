"""Measuring the extra memory a gradient costs: the CUDA allocator's peak, or on CPU the bytes autograd saves.

The two figures are different things and are labelled as such (``PeakMemory.kind``): on CUDA a true peak of
allocated memory; on CPU, where PyTorch keeps no allocator statistics, the total size of the activations saved
for backward (not a peak of process memory).
"""

from __future__ import annotations

import torch
from torch import nn

CUDA_PEAK = "cuda peak allocated"
CPU_SAVED = "cpu saved activations"


class PeakMemory:
    """Context manager giving ``peak_bytes``: the extra memory used while it is open, and ``kind``, what it is.

    CUDA (``kind == "cuda peak allocated"``): ``torch.cuda.max_memory_allocated`` minus the allocation at entry.
    This resets the allocator's peak statistics of the device, for the whole process, at entry: use it only where
    the caller asked for a measurement. CPU (``kind == "cpu saved activations"``; no allocator statistics): the
    bytes of distinct storages autograd saves for backward inside the context (parameters and views of them
    excluded, since they exist anyway) - the activation memory, which is what the gradient modes trade; it
    installs saved-tensor hooks while open.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.kind = CUDA_PEAK if self.device.type == "cuda" else CPU_SAVED
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
        if not _is_parameter(tensor):
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


def _is_parameter(tensor: torch.Tensor) -> bool:
    """A parameter, or a view of one (``linear`` saves ``weight.t()``): memory that exists without any graph."""
    return isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)
