"""What the CPU offers: the instruction-set flags that decide the compute dtype (``model/loader.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The flags that matter for torch's CPU kernels, in the order they are reported.
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class CpuFeatures:
    flags: frozenset[str]  # the reported flags (REPORTED_FLAGS) this CPU has

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX512_BF16 or AMX): where oneDNN's bf16 GEMMs beat fp32."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    def summary(self) -> str:
        """The reported flags present, comma-separated in REPORTED_FLAGS order ('' when none)."""
        return ",".join(f for f in REPORTED_FLAGS if f in self.flags)


def parse_cpuinfo(text: str) -> CpuFeatures:
    """The reported flags of the first processor in a /proc/cpuinfo text (x86 ``flags``, none elsewhere)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            present = set(value.split())
            return CpuFeatures(frozenset(f for f in REPORTED_FLAGS if f in present))
    return CpuFeatures(frozenset())


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
    """This machine's features; none (so fp32) where /proc/cpuinfo is unreadable (not Linux)."""
    try:
        return parse_cpuinfo(cpuinfo.read_text())
    except OSError:
        return CpuFeatures(frozenset())


def cpu_flags_line(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first processor's whole ``flags`` line ('' where unreadable): what a build for this CPU
    (``-march=native``, model/native.py) depends on, so its cache key."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return " ".join(value.split())
    return ""
