"""Which device and precision models run on: CUDA when present, else the CPU.

`resolve_device("auto")` is what `--device auto` means for `node`, `generate` and `demo`. On CUDA,
matmuls may use TF32 (`enable_fast_matmul`), training autocasts to bf16 and generation loads its
experts in bf16 (`inference_dtype`); the CPU keeps float32 throughout, where bf16 is slower and
costs accuracy for nothing.
"""

from __future__ import annotations

import re

import torch
from ddm_models.errors import ModelError


class UnknownDevice(ModelError, ValueError):
    """A device string that is neither "auto", "cpu" nor "cuda[:N]", or a CUDA device that is absent."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda:0 when a CUDA GPU is present, else cpu; "cpu"; "cuda" / "cuda:N" (checked to
    exist, so a typo fails here and not deep inside the first forward pass)."""
    if isinstance(name, torch.device):
        name = str(name)
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise UnknownDevice(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise UnknownDevice(f"device {name!r} asked for, but this machine has no CUDA GPU "
                            "(torch.cuda.is_available() is False); use 'auto' or 'cpu'")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UnknownDevice(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device("cuda", index)


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (half the memory and bandwidth of float32, no loss scaling needed), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; a disabled autocast elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def enable_fast_matmul() -> None:
    """Let float32 matmuls and convolutions use TF32 tensor cores (Ampere and later): the weights
    and optimizer stay float32, only the products lose mantissa bits, as PyTorch's own guide advises
    for training. Process-wide, so it is set once by whoever chose a CUDA device."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
