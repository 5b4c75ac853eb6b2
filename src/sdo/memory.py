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
    largest total size of distinct storages that autograd holds for backward at any one time inside the context,
    through forward and backward (parameters and views of them excluded, since they exist anyway) - the activation
    memory, which is what the gradient modes trade. A step recomputed in backward (checkpointing, the adjoint walk)
    counts while its activations are alive. It installs saved-tensor hooks while open.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.kind = CUDA_PEAK if self.device.type == "cuda" else CPU_SAVED
        self.peak_bytes = 0
        self._live_bytes = 0
        self._holders: dict[int, int] = {}  # storage address -> number of saved tensors on it still alive
        self._hooks = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            self._hooks.__enter__()
        return self

    def _pack(self, tensor: torch.Tensor) -> object:
        if is_parameter(tensor):
            return tensor
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if not self._holders.get(address):
            self._live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self._live_bytes)
        self._holders[address] = self._holders.get(address, 0) + 1
        return _Saved(tensor, self, address, storage.nbytes())

    def _release(self, address: int, nbytes: int) -> None:
        self._holders[address] -= 1
        if not self._holders[address]:
            del self._holders[address]
            self._live_bytes -= nbytes

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._baseline
        else:
            self._hooks.__exit__(*exc)


class _Saved:
    """A saved activation as autograd holds it, counted by its meter while alive.

    It keeps a detached alias of the tensor (same storage, same lifetime): holding the tensor itself would tie it
    to its own ``grad_fn`` in a reference cycle and keep the graph alive.
    """

    __slots__ = ("address", "meter", "nbytes", "tensor")

    def __init__(self, tensor: torch.Tensor, meter: PeakMemory, address: int, nbytes: int) -> None:
        self.tensor, self.meter, self.address, self.nbytes = tensor.detach(), meter, address, nbytes

    def __del__(self) -> None:
        self.meter._release(self.address, self.nbytes)


def _unpack(saved: object) -> torch.Tensor:
    return saved.tensor if isinstance(saved, _Saved) else saved


def is_parameter(tensor: torch.Tensor) -> bool:
    """A parameter, or a view of one (``linear`` saves ``weight.t()``): memory that exists without any graph."""
    return isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)
