"""Timing machinery of `bench perf`: workloads, warm-up, interleaved repeats, statistics, memory,
and the provenance every JSONL row carries.

A *workload* is one thing to time (a training step of one spec, a guided sampling step, an encoder
batch). Workloads of one kind are timed **round-robin**: repeat r of every workload runs before repeat
r + 1 of any, so a slow drift of the machine (other jobs on a shared CPU, thermal throttling) lands
on all of them alike and the ratios the targets check stay fair; each round starts one workload
later than the one before, so no workload always follows the same other one. nanoGPT's `bench.py` is the model:
a burn-in stage, then a timed stage.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from bench import precision, resources

# The checkout the code runs from; an installed wheel has none (git_commit is then None).
REPO_ROOT = resources.source_root() or Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Workloads and their statistics


@dataclass
class Workload:
    """One timed operation. `run()` performs one call that processes `images_per_call` images."""

    kind: str
    """train, sample, prepare or eval."""
    name: str
    """Unique label in the printed table (e.g. `redi`, `redi [reference]`, `redi cfg`)."""
    run: Callable[[], Any]
    images_per_call: int
    calls_per_repeat: int = 1
    fields: dict = field(default_factory=dict)
    """Extra row fields: spec, mode, batch, precision, guidance, encoder, ..."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    peak_memory_mb: Optional[float] = None
    times: list[float] = field(default_factory=list)
    """Seconds per repeat (each repeat = `calls_per_repeat` calls)."""

    def images_per_s(self) -> list[float]:
        """Images per second of every repeat."""
        return [self.images_per_call * self.calls_per_repeat / t for t in self.times]


@dataclass(frozen=True)
class Stats:
    """Median and spread of images/s over the repeats."""

    median: float
    q25: float
    q75: float
    min: float
    max: float
    repeats: int

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25


def summarize(values: Sequence[float]) -> Stats:
    """Median, quartiles (linear interpolation, numpy's default), min and max of `values`."""
    if not values:
        raise ValueError("summarize: no measurements (repeats must be >= 1)")
    data = sorted(values)

    def quantile(q: float) -> float:
        position = q * (len(data) - 1)
        low = int(position)
        high = min(low + 1, len(data) - 1)
        return data[low] + (data[high] - data[low]) * (position - low)

    return Stats(median=statistics.median(data), q25=quantile(0.25), q75=quantile(0.75),
                 min=data[0], max=data[-1], repeats=len(data))


def paired_time_ratio(numerator: Workload, denominator: Workload) -> float:
    """Median over repeats of time(numerator) / time(denominator), per image.

    Repeat r of both workloads ran back to back (round-robin), so each ratio compares the two under
    the same machine load; the median of the ratios is more robust than a ratio of medians.
    """
    if not numerator.times or len(numerator.times) != len(denominator.times):
        raise ValueError("paired_time_ratio needs two workloads timed in the same rounds")
    per_image_n = [t / (numerator.images_per_call * numerator.calls_per_repeat) for t in numerator.times]
    per_image_d = [t / (denominator.images_per_call * denominator.calls_per_repeat) for t in denominator.times]
    return statistics.median(n / d for n, d in zip(per_image_n, per_image_d))


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so a timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Peak memory


def _read_status_kb(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the process's resident-set high-water mark (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block *above what was in use before it*, in MB.

    CUDA: `max_memory_allocated` after `reset_peak_memory_stats`, minus the allocation at entry.
    CPU: the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs)
    minus the resident set at entry; approximate, since the allocator may reuse pages freed
    earlier. `None` when the platform offers neither.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.value_mb: Optional[float] = None
        self.scope = ("cuda max_memory_allocated above entry" if device.type == "cuda"
                      else "process peak RSS (VmHWM) above entry")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._ok = _reset_rss_peak()
            self._base = _read_status_kb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.value_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._ok and self._base is not None:
            peak = _read_status_kb("VmHWM")
            if peak is not None:
                self.value_mb = max(0, peak - self._base) / 1024


# ---------------------------------------------------------------------------------------------
# Running


def warm_up(workload: Workload, calls: int, min_repeat_seconds: float = 0.0) -> None:
    """Run `calls` untimed calls (allocator, caches, torch.compile), then size a repeat: the last
    call's duration decides how many calls make a repeat of at least `min_repeat_seconds`. The
    first call's seconds go to the row (`first_call_seconds`: with torch.compile, the compile time)."""
    for index in range(max(calls - 1, 0)):
        start = time.perf_counter()
        workload.run()
        synchronize(workload.device)
        if index == 0:
            workload.fields["first_call_seconds"] = round(time.perf_counter() - start, 3)
    synchronize(workload.device)
    start = time.perf_counter()
    workload.run()
    synchronize(workload.device)
    elapsed = max(time.perf_counter() - start, 1e-9)
    workload.fields.setdefault("first_call_seconds", round(elapsed, 3))
    workload.calls_per_repeat = max(1, math.ceil(min_repeat_seconds / elapsed))


def time_round_robin(workloads: Sequence[Workload], repeats: int,
                     progress: Optional[Callable[[str], None]] = None) -> None:
    """Time `repeats` repeats of every workload, interleaved (see the module docstring).

    Round r starts at workload r mod n (a rotation), so no workload always runs right after the
    same other one: whatever a step leaves behind (the allocator's heap, the caches) lands on each
    in turn instead of always on the same neighbour.
    """
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    for workload in workloads:
        workload.times = []
    count = len(workloads)
    for index in range(repeats):
        for position in range(count):
            workload = workloads[(index + position) % count]
            synchronize(workload.device)
            start = time.perf_counter()
            for _ in range(workload.calls_per_repeat):
                workload.run()
            synchronize(workload.device)
            workload.times.append(time.perf_counter() - start)
        if progress is not None:
            progress(f"repeat {index + 1}/{repeats}")


# ---------------------------------------------------------------------------------------------
# Provenance


def cpu_model() -> str:
    """The CPU's `model name` from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Settings that narrow which instructions torch's, oneDNN's and MKL's CPU kernels use (e.g. to stand in
# for a CPU without AVX-512): a timing taken under them says so.
KERNEL_ISA_SETTINGS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_kernels() -> str:
    """The instruction set torch's CPU kernels dispatch to (`AVX512`, `AVX2`, ...), followed by any
    environment setting that restricts torch, oneDNN or MKL to fewer instructions than the CPU has."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    limits = [f"{name}={os.environ[name]}" for name in KERNEL_ISA_SETTINGS if os.environ.get(name)]
    return capability + (f" ({', '.join(limits)})" if limits else "")


# The /proc/cpuinfo flags that decide which CPU kernels can run (AVX-512, native bf16, AMX tiles).
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """The SPEED_FLAGS this CPU has (empty where /proc/cpuinfo is not readable)."""
    have = precision.cpu_flags()
    return [flag for flag in SPEED_FLAGS if flag in have]


def git_commit() -> Optional[str]:
    """HEAD of the repository (with `-dirty` when tracked files changed), or None outside git."""
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head is None:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + ("-dirty" if dirty else "")


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose kernels are timed."""
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("numpy", "timm", "diffusers", "torchvision"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def environment(device: torch.device, command: str) -> dict[str, Any]:
    """Fields shared by every row of one run."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "device": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_kernels": cpu_kernels(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "versions": library_versions(),
        "git_commit": git_commit(),
        "command": command,
        "hostname": platform.node(),
        "load_avg_start": [round(v, 2) for v in load],
    }


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
