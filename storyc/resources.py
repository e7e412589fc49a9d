"""The one place that decides where and how a stage computes: device, dtype/precision and batch sizes.

Train, generate and score ask here instead of each reading ``--device``, ``torch.cuda`` and the spec on their
own, so a memory planner has one owner. torch is imported inside the functions (executors call them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Resources:
    device: str  # "cpu", "cuda", "cuda:1", ...
    dtype: str  # float32 | float16 | bfloat16: weights and activations outside autocast
    precision: str = "32-true"  # Lightning precision (train only)
    batch_size: int = 1  # images per UNet/scorer call
    note: str | None = None  # a decision the user should hear about (printed once by the stage)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def pick_device(requested: str | None) -> str:
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_count(device: str) -> int:
    """GPUs a stage may spread over (generate shards); ``STORYC_GENERATE_SHARDS`` overrides."""
    forced = os.environ.get("STORYC_GENERATE_SHARDS")
    if forced:
        return int(forced)
    if device == "cuda":
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 1
    return 1


_PRECISION_DTYPE = {"16-mixed": "float16", "bf16-mixed": "bfloat16", "32": "float32"}


def for_train(requested_device: str | None, precision: str, batch_size: int) -> Resources:
    device = pick_device(requested_device)
    note = None
    if device == "cpu" and precision == "16-mixed":
        note = "train.precision 16-mixed needs a GPU; training in 32-bit on the CPU"
        precision = "32"
    return Resources(device, _PRECISION_DTYPE[precision], "32-true" if precision == "32" else precision, batch_size,
                     note)


def for_generate(requested_device: str | None, batch_size: int) -> Resources:
    device = pick_device(requested_device)
    return Resources(device, "float16" if device.startswith("cuda") else "float32", batch_size=max(1, batch_size))


def for_score(requested_device: str | None, batch_size: int = 16) -> Resources:
    return Resources(pick_device(requested_device), "float32", batch_size=batch_size)
