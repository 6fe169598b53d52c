"""Live GPU figures from NVML, per device, for `/metrics`.

NVML is optional: without the `nvidia-ml-py` package or without a driver, `GpuSampler.sample()` returns
no readings and every later call returns at once. A figure a board does not report (power on some
cards, for instance) is None, so `/metrics` leaves it out instead of claiming 0.

NVML calls block (tens of milliseconds on a busy multi-GPU host): call `sample()` from a thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import structlog

log = structlog.get_logger("dsnode.gpu")

T = TypeVar("T")


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    uuid: str | None
    utilization: float | None  # 0..1: share of the last sample period a kernel was running
    memory_bandwidth_utilization: float | None  # 0..1: share of it device memory was read or written
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_celsius: float | None
    power_watts: float | None


class GpuSampler:
    """Owns the process's NVML session: opened on the first sample, closed by `close()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._names: list[tuple[str, str | None]] = []
        self._tried = False

    @property
    def unavailable(self) -> bool:
        """True once NVML was tried and is not there: sampling is then free."""
        return self._tried and self._nvml is None

    @property
    def is_open(self) -> bool:
        return self._nvml is not None

    def sample(self) -> list[GpuReading]:
        with self._lock:
            if not self._tried:
                self._open()
            if self._nvml is None:
                return []
            return [self._read(i, handle) for i, handle in enumerate(self._handles)]

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:  # shutting down anyway
                    pass
            self._nvml, self._handles = None, []

    # --- internals ----------------------------------------------------------------------------
    def _open(self) -> None:
        self._tried = True
        try:
            import pynvml
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
        except Exception:  # pynvml.NVMLError_LibraryNotFound and friends: no driver here
            return
        try:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            names = [(_text(pynvml.nvmlDeviceGetName(h)), _uuid(pynvml, h)) for h in handles]
        except Exception as exc:
            log.warning("nvml_unusable", error=str(exc))
            pynvml.nvmlShutdown()
            return
        self._nvml, self._handles, self._names = pynvml, handles, names
        log.info("nvml_opened", gpus=len(handles))

    def _read(self, index: int, handle: Any) -> GpuReading:
        nvml = self._nvml
        rates = _maybe(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        memory = _maybe(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        temperature = _maybe(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        milliwatts = _maybe(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        name, uuid = self._names[index]
        return GpuReading(
            index=index,
            name=name,
            uuid=uuid,
            utilization=None if rates is None else rates.gpu / 100.0,
            memory_bandwidth_utilization=None if rates is None else rates.memory / 100.0,
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            temperature_celsius=None if temperature is None else float(temperature),
            power_watts=None if milliwatts is None else milliwatts / 1000.0,
        )


def _maybe(read: Callable[[], T]) -> T | None:
    """One NVML figure, or None where the board doesn't support it (NVMLError_NotSupported, ...)."""
    try:
        return read()
    except Exception:
        return None


def _uuid(nvml: Any, handle: Any) -> str | None:
    return _maybe(lambda: _text(nvml.nvmlDeviceGetUUID(handle)))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
