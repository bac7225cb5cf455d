"""What machine a figure was measured on: CPU model, int8 dot-product support, versions."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

_X86_INT8 = ("avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8")
_ARM_INT8 = ("asimddp", "i8mm", "sve")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
    except OSError:
        pass
    return model, flags


def _mac_cpu() -> tuple[str, set[str]]:  # pragma: no cover - macOS only
    def sysctl(name: str) -> str:
        try:
            return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    model = sysctl("machdep.cpu.brand_string")
    flags = set()
    if sysctl("hw.optional.arm.FEAT_DotProd") == "1":
        flags.add("asimddp")
    if sysctl("hw.optional.arm.FEAT_I8MM") == "1":
        flags.add("i8mm")
    return model, flags


@functools.cache
def cpu() -> dict[str, Any]:
    model, flags = _mac_cpu() if sys.platform == "darwin" else _cpuinfo()
    int8 = sorted(f for f in flags if f in _X86_INT8 + _ARM_INT8)
    return {
        "model": model or platform.processor() or "unknown",
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "int8_dot_product": bool(int8),
        "int8_isa": int8,
    }


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS says, else the logical count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("keiryo", "torch", "onnx", "onnxruntime", "numpy", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine_info(threads: int | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": cpu(), "os": f"{platform.system()} {platform.release()}", "libraries": library_versions()}
    if threads is not None:
        info["threads"] = threads
    return info
