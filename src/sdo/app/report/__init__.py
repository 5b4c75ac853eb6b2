"""Reporting helpers shared by the commands: markdown tables, the machine a figure comes from, memory labels."""

from __future__ import annotations

import platform
from collections.abc import Sequence

import torch

__all__ = ["MEMORY_HEADER", "machine_info", "markdown_table", "mebibytes"]

# Column header for ``peak_mem_bytes``: on CUDA the allocator's peak; on CPU the activations saved for backward.
MEMORY_HEADER = "extra memory (CUDA: peak allocated; CPU: saved activations)"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table: one header row, a rule, then one line per row (cells already formatted as text)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mebibytes(count: float, digits: int = 1) -> str:
    """``count`` bytes as ``"12.3 MiB"``."""
    return f"{count / 2**20:.{digits}f} MiB"


def machine_info(device: torch.device) -> dict:
    """The processor or GPU the figures come from."""
    info = {"processor": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
