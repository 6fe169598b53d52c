"""What this host has: CPUs, memory, GPUs, installed inference backends.

GPUs come from NVML when the driver library is present, else from torch if it is already imported
(the edge never imports torch just to look). An empty GPU list is a valid answer.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

BACKEND_PACKAGES = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "torch": ("torch",),
    "transformers": ("transformers",),
    "deepspeed": ("deepspeed",),
    "bitsandbytes": ("bitsandbytes",),
}


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_total_mib: int
    compute_capability: str | None
    uuid: str | None = None


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    platform: str
    python: str
    cpu_logical: int
    cpu_physical: int | None
    memory_total_mib: int
    gpus: tuple[GPU, ...] = ()
    backends: dict[str, str] = field(default_factory=dict)  # package → version
    onnx_providers: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def probe_host() -> HostFacts:
    return HostFacts(
        hostname=platform.node(),
        platform=f"{platform.system()} {platform.release()} {platform.machine()}",
        python=platform.python_version(),
        cpu_logical=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        cpu_physical=psutil.cpu_count(logical=False),
        memory_total_mib=psutil.virtual_memory().total // 2**20,
        gpus=tuple(probe_gpus()),
        backends=installed_backends(),
        onnx_providers=tuple(onnx_providers()),
    )


def memory_available_mib() -> int:
    return psutil.virtual_memory().available // 2**20


def installed_backends() -> dict[str, str]:
    found: dict[str, str] = {}
    for backend, dists in BACKEND_PACKAGES.items():
        for dist in dists:
            try:
                found[backend] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


def onnx_providers() -> list[str]:
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def probe_gpus() -> list[GPU]:
    gpus = _nvml_gpus()
    if gpus is None and "torch" in sys.modules:
        gpus = _torch_gpus()
    return gpus or []


def _nvml_gpus() -> list[GPU] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: pynvml.NVMLError_LibraryNotFound and friends
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                GPU(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_total_mib=int(memory.total) // 2**20,
                    compute_capability=f"{major}.{minor}",
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                )
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _torch_gpus() -> list[GPU]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(GPU(i, props.name, props.total_memory // 2**20, f"{props.major}.{props.minor}"))
    return gpus


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
