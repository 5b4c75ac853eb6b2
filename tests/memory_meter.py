"""Peak bytes of tensors autograd holds for backward at any one time, through forward *and* backward."""

from __future__ import annotations

import torch


class _Held:
    """A saved tensor as autograd stores it: counted while alive, uncounted when its graph is freed."""

    def __init__(self, tensor: torch.Tensor, meter: PeakSaved) -> None:
        # detached: holding the tensor itself would make a reference cycle with its own grad_fn (a leak)
        self.tensor, self.meter, self.nbytes = tensor.detach(), meter, tensor.numel() * tensor.element_size()
        meter.live += self.nbytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.nbytes


class PeakSaved:
    """Context manager: ``peak`` is the largest total size of saved-for-backward tensors alive at once."""

    def __init__(self) -> None:
        self.live = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: _Held(t, self), lambda held: held.tensor)

    def __enter__(self) -> PeakSaved:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def peak_saved_bytes(run) -> int:
    """Peak saved-tensor bytes while ``run()`` (a forward and its backward) executes."""
    with PeakSaved() as meter:
        run()
    return meter.peak
