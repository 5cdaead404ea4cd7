"""Devices and backend reports: which hardware runs a method, and the label shown next to its numbers."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Iterator

import torch

from quantlib.errors import BackendUnavailableError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class BackendReport:
    """Which backend a scheme will run on, and why: shown next to every number it produces."""

    method: str
    scheme: str
    device: str  # "cpu" or "cuda"
    device_name: str  # e.g. "CPU (2 cores)" or "NVIDIA H100 80GB HBM3"
    library: str  # e.g. "bitsandbytes 0.50.2" or "torch 2.13.0 (simulated)"
    simulated: bool  # True when weights are replaced by quantize->dequantize results
    reason: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data

    @property
    def short(self) -> str:
        """One-word backend label for table columns."""
        return self.device.upper() + (" (sim)" if self.simulated else "")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device_name(device: str) -> str:
    """Human name of a device, for reports."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)


    return f"CPU ({os.cpu_count()} cores)"


def resolve_device(device: str) -> tuple[str, str]:
    """Turn 'auto'/'cpu'/'cuda' into a concrete device and the reason it was chosen."""
    if device not in DEVICES:
        raise ValueError(f"device: got {device!r}; allowed: {', '.join(DEVICES)}")
    if device == "auto":
        if cuda_available():
            return "cuda", "CUDA is available, so the GPU runs it (device=auto)"
        return "cpu", "no CUDA device found, so the CPU runs it (device=auto)"
    if device == "cuda" and not cuda_available():
        raise BackendUnavailableError("device cuda", "no CUDA device is visible to torch",
                                      "Use --device cpu (or auto), or run on a machine with an NVIDIA GPU.")
    return device, f"device={device} was asked for"



#: CPU features that change which kernel bitsandbytes and torch run (and so their numbers), as /proc/cpuinfo
#: names them.
CPU_FEATURE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


@lru_cache(maxsize=1)
def _cpu_flags() -> tuple[Any, Any]:
    """(model name, set of flags) from /proc/cpuinfo; None for what the OS does not say."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and flags is None:
                    flags = frozenset(value.split())
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return model, flags


def cpu_features() -> dict[str, Any]:
    """The CPU's model and the features that pick kernels (each True/False, None where the OS does not say),
    torch's own CPU capability, and bitsandbytes' own AVX512-BF16 check (None where bitsandbytes is absent).
    Stored with every run and printed first by CI, so a number or a failure on another CPU explains itself."""
    model, flags = _cpu_flags()
    info: dict[str, Any] = {"model": model}
    info.update({flag: (flag in flags) if flags is not None else None for flag in CPU_FEATURE_FLAGS})
    info["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        info["bitsandbytes_avx512bf16"] = None
    else:
        info["bitsandbytes_avx512bf16"] = bool(has_avx512bf16())
    return info


def cpu_flags_text() -> str:
    """The kernel-picking features this CPU has, comma-separated ("" where none or unknown)."""
    flags = _cpu_flags()[1] or ()
    return ", ".join(flag for flag in CPU_FEATURE_FLAGS if flag in flags)


def cpu_features_text(info: dict[str, Any]) -> str:
    """One line: the CPU, the kernel-picking features it has, torch's capability and bitsandbytes' check."""
    if not info:
        return "CPU features: not recorded"
    have = [flag for flag in CPU_FEATURE_FLAGS if info.get(flag)]
    known = any(info.get(flag) is not None for flag in CPU_FEATURE_FLAGS)
    bnb = info.get("bitsandbytes_avx512bf16")
    return (f"CPU: {info.get('model') or 'unknown model'}; features: "
            f"{', '.join(have) if have else ('none of ' + ', '.join(CPU_FEATURE_FLAGS)) if known else 'unknown'}; "
            f"torch capability {info.get('torch_capability', '?')}; bitsandbytes' AVX512-BF16 check: "
            f"{'n/a' if bnb is None else 'yes' if bnb else 'no'}")


def vm_hwm() -> int:
    """Peak resident set size of this process in bytes (Linux `VmHWM`), 0 where unknown.

    Unlike `getrusage(RUSAGE_SELF).ru_maxrss`, it is the process's own: Linux carries the parent's peak into
    ru_maxrss across the fork and exec that start a subprocess, so a child of a large process reports at least
    the parent's size."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise); no garbage collection."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@contextmanager
def objects_frozen() -> Iterator[None]:
    """Inside, full garbage collections skip the objects alive on entry (`gc.freeze`); they are unfrozen on exit.

    Why: the libraries and a loaded transformers model are about half a million Python objects, and each
    `release_memory()` (a full collection, which lets a dropped model's reference cycles go) scanned them all:
    0.3-0.45 s a call here, four calls in a three-scheme comparison. Garbage is collected on entry, so nothing
    dead is frozen; objects created inside stay collectable. Concurrent or nested uses are safe: an early exit
    only unfreezes, which makes the others' collections slower, never wrong.
    """
    import gc

    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS."""
    import gc

    gc.collect()
    trim_heap()


def device_clock() -> float:
    """`time.perf_counter()` once the GPU's queued work has finished (where CUDA is in use), so a phase timed
    between two calls is the phase's own time and not the time to queue it. On a CPU, the plain counter."""
    import time

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()
