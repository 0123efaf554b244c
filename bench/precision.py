"""Which precision a setting (fp32, bf16, auto) means on a device: shared by training, sampling and
prepare, so that `auto` resolves the same way in each."""

from __future__ import annotations

from typing import Optional

import torch

from bench.config import ConfigError

# The CPU flags under which `auto` means bf16, per setting: where bf16 autocast was measured
# faster than fp32 at the embedded default's shapes (docs/performance.md, "The embedded default's
# precision"). The transformer's training step and the sampler gain only from AMX's bf16 tiles:
# on a Xeon with AVX512-BF16 and no AMX they took 1.26-1.33x and 1.08-1.18x the fp32 time.
# EfficientNet's features gain from AVX512-BF16 alone (0.76x there).
AUTO_BF16_CPU_FLAGS = {"encoder.precision": frozenset({"amx_bf16", "avx512_bf16"})}
AUTO_BF16_CPU_FLAGS_ELSE = frozenset({"amx_bf16"})


def cpu_flags() -> frozenset[str]:
    """This CPU's /proc/cpuinfo flags (empty where it is not readable)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """True where the device has bf16 instructions: CUDA with bf16 support, or a CPU with AVX512-BF16
    or AMX-BF16 (elsewhere bf16 is emulated). Recorded beside timings; whether bf16 is also the
    faster choice is auto_is_bf16's rule (with AVX512-BF16 alone it was not)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def auto_is_bf16(device: torch.device, key: str = "train.precision") -> bool:
    """What `auto` means for the setting `key` on `device`: bf16 on a GPU that has it, and on a CPU
    whose flags made bf16 the faster choice for that setting (AUTO_BF16_CPU_FLAGS)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(cpu_flags() & AUTO_BF16_CPU_FLAGS.get(key, AUTO_BF16_CPU_FLAGS_ELSE))


def resolve_precision(setting: str, device: torch.device, key: str = "train.precision") -> Optional[torch.dtype]:
    """The autocast dtype (None = fp32) of `setting` (fp32, bf16 or auto, see auto_is_bf16). `key`
    is the setting the value came from: it picks auto's rule and names the setting in the error."""
    if setting == "fp32" or (setting == "auto" and not auto_is_bf16(device, key)):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{key}=bf16 but this GPU has no bf16 support; use auto or fp32")
    return torch.bfloat16
