"""Device facts for honest speed numbers: peak FLOP/s (a table for GPUs, measured for CPUs)."""

from __future__ import annotations

import time

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


def gpu_peak_flops(name: str) -> float | None:
    """The table entry whose key appears in the device name (longest key first)."""
    for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_PEAK_BF16[key]
    return None


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
    key = f"{device}:{dtype}:{torch.get_num_threads()}"
    if key not in _CPU_PEAK:
        _CPU_PEAK[key] = measure_matmul_flops(device, dtype)
    return _CPU_PEAK[key], f"measured {dtype} matmul on CPU ({torch.get_num_threads()} threads)"
