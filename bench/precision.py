"""Which precision a setting (fp32, bf16, auto) means on a device: shared by training, sampling and
prepare, so that `auto` resolves the same way in each."""

from __future__ import annotations

from typing import Optional

import torch

from bench.config import ConfigError


def native_bf16(device: torch.device) -> bool:
    """True when bf16 matmuls run natively: CUDA with bf16 support, or a CPU with AVX512-BF16 or
    AMX-BF16. Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(setting: str, device: torch.device, key: str = "train.precision") -> Optional[torch.dtype]:
    """The autocast dtype (None = fp32): `auto` = bf16 where the device has it natively. `key` is
    the setting the value came from, for the error."""
    if setting == "fp32" or (setting == "auto" and not native_bf16(device)):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{key}=bf16 but this GPU has no bf16 support; use auto or fp32")
    return torch.bfloat16
