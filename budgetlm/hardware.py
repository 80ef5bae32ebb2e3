"""Device facts for honest speed numbers: peak FLOP/s (a table for GPUs, measured for CPUs)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets, FLOP/s.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


# Memory of the common models (the largest variant where a name has several), bytes.
GPU_MEMORY = {
    "H200": 141e9,
    "H100": 80e9,
    "A100": 80e9,
    "A10G": 24e9,
    "A10": 24e9,
    "L40S": 48e9,
    "L4": 24e9,
    "RTX 4090": 24e9,
    "RTX 3090": 24e9,
    "V100": 32e9,
    "T4": 16e9,
}


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _lookup(table: dict, name: str):
    """The entry whose key appears in the device name, the longest key first ("H100 NVL" before "H100")."""
    for key in sorted(table, key=len, reverse=True):
        if key.lower() in name.lower():
            return table[key]
    return None


def gpu_memory(name: str) -> float | None:
    return _lookup(GPU_MEMORY, name)


def device_memory(device) -> float:
    """Bytes a training run may use: the GPU's memory, or half of this machine's RAM on a CPU."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8e9


def gpu_peak_flops(name: str) -> float | None:
    """The table entry whose key appears in the device name (longest key first)."""
    return _lookup(GPU_PEAK_BF16, name)


_CPU_PEAK: dict[str, float] = {}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.5) -> float:
    """Achieved FLOP/s of a large square matmul: the practical peak of a device we have no table for."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm up kernels and thread pools
        a @ b
    iters, start = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and iters >= 3:
            break
    return 2 * n**3 * iters / elapsed


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is not None:
            return peak, f"datasheet bf16 dense peak of {name}"
        return measure_matmul_flops(device, dtype, n=4096), f"measured {dtype} matmul on {name}"
    from budgetlm.speed import matmul_peak  # speed imports this module

    key = f"{device}:{dtype}:{torch.get_num_threads()}"
    if key not in _CPU_PEAK:
        _CPU_PEAK[key] = matmul_peak(device, dtype)[0]
    return _CPU_PEAK[key], f"measured {dtype} matmul on CPU ({torch.get_num_threads()} threads)"
