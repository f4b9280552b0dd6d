"""The nominal peak FLOP/s a training job's devices could reach, the denominator of its MFU.

- GPU: the vendor's dense (no sparsity) tensor-core number per device for bf16, or plain fp32,
  from :data:`GPU_PEAK_TFLOPS` by device name, times the number of ranks.
- CPU: cores this process may run on x clock x FLOPs per cycle per core, read from the machine:
  two FMA units of 8 fp32 lanes (AVX2 + FMA) give 32 fp32 FLOP/cycle/core, AVX-512 64; bf16 is
  counted at twice the fp32 rate with ``avx512_bf16`` and at AMX's 1024 with ``amx_bf16`` (Intel's
  nominal figures). The ranks of a CPU job share these cores, so the peak is not multiplied by them.
  Clock: ``cpufreq``'s maximum, else ``/proc/cpuinfo``'s ``cpu MHz`` (a VM reports its nominal one).

Every answer says how it was found (``source``); ``--peak-tflops`` replaces it when the machine's
own numbers are wrong (turbo clocks, a GPU not in the table).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# dense TFLOP/s per device: (bf16 tensor core, fp32 without tensor cores); NVIDIA data sheets (SXM parts)
GPU_PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5)}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_clock_hz() -> float | None:
    """The cores' maximum clock from cpufreq, else the one /proc/cpuinfo reports."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) * 1e3
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1]) * 1e6
    except (OSError, ValueError):
        pass
    return None


def cpu_flops_per_cycle(flags: set[str], precision: str) -> int:
    """Nominal FLOPs per cycle per core for ``precision`` (fp32 or bf16) from the CPU's feature flags."""
    fp32 = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    if precision == "bf16":
        if "amx_bf16" in flags:
            return 1024
        if "avx512_bf16" in flags:
            return 2 * fp32
    return fp32


def peak_flops(device_type: str, precision: str, world_size: int = 1, override_tflops: float = 0.0) -> dict[str, Any]:
    """``{"peak_flops": FLOP/s of the job's devices, "source": how it was found}`` (peak None if unknown)."""
    if override_tflops > 0:
        return {"peak_flops": override_tflops * 1e12, "source": f"--peak-tflops {override_tflops}"}
    if device_type == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        for key, (bf16, fp32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                per_device = bf16 if precision == "bf16" else fp32
                return {"peak_flops": per_device * 1e12 * world_size,
                        "source": f"{name}: {per_device} TFLOP/s dense {precision} x {world_size} GPUs"}
        return {"peak_flops": None, "source": f"{name} is not in the peak table: pass --peak-tflops"}
    flags, clock = _cpu_flags(), cpu_clock_hz()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_cycle = cpu_flops_per_cycle(flags, precision)
    if clock is None:
        return {"peak_flops": None, "source": "no CPU clock found: pass --peak-tflops"}
    return {"peak_flops": cores * clock * per_cycle,
            "source": f"{cores} cores x {clock / 1e9:.2f} GHz x {per_cycle} {precision} FLOP/cycle"}
