"""The one place that decides where and how a stage computes: device, dtype/precision, memory and batch sizes.

Train, generate and score ask here instead of each reading ``--device``, ``torch.cuda`` and the spec on their
own. ``plan_train`` / ``plan_generate`` are pure functions of the free GPU memory (table-tested); ``free_gib``
measures it, honouring ``STORYC_GPU_MEMORY_GIB`` (a per-process cap, e.g. 22 to behave like a 24 GB card).
torch is imported inside the functions (executors call them).
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


# Memory model of the full-size Kolors parts at 1024x1024, measured through `storyc build` on an H200
# (bench/RESULTS.md, e2e run): training without gradient checkpointing peaks at 12.6 GiB (the 2.6 B UNet in fp16,
# the fp32 LoRA and its AdamW state, activations, the CUDA-graph pool), with it at 6.2 GiB; generation peaks at
# 13.3 GiB while ChatGLM encodes the prompts, and the UNet batch of 8 images with CFG stays below that. Activations
# scale with pixels x batch; the per-image figures below are those peaks minus the weights, rounded up.
UNET_GIB = 5.0  # 2.6 B parameters in fp16
TRAIN_ACTIVATIONS_GIB = 7.6  # per 1024x1024 image, gradient checkpointing off (12.6 GiB peak - 5.0)
TRAIN_ACTIVATIONS_GC_GIB = 1.2  # per 1024x1024 image, checkpointing on (6.2 GiB peak - 5.0)
GEN_PER_IMAGE_GIB = 1.0  # per 1024x1024 image with its CFG pair: (13.3 GiB - 5.3 GiB of weights) / 8 at most
HEADROOM_GIB = 1.5  # allocator fragmentation, cuDNN workspaces
MAX_GEN_BATCH = 8  # beyond 8 images (16 UNet rows) a step is GPU-bound: no faster per image


@dataclass(frozen=True)
class TrainMemory:
    gradient_checkpointing: bool
    cuda_graphs: bool
    reason: str


# What an adapter other than LoRA adds to a training step's peak (its update rebuilt as full weights in the forward
# and kept for the backward), rank 16 on to_q/k/v/out of the full-size UNet, CUDA graphs on: the H200 peaks 15.24
# (DoRA), 13.91 (LoHa) and 13.73 GiB (LoKr) against LoRA's 12.58 (bench/RESULTS.md, LoRA variants).
ADAPTER_EXTRA_GIB = {"dora": 2.7, "loha": 1.4, "lokr": 1.2}


def plan_train(free_gib: float | None, gc: "bool | str", graphs: bool, batch: int, width: int, height: int,
               world: int = 1, adapter: str = "lora") -> TrainMemory:
    """Gradient checkpointing and CUDA graphs for a training run; explicit spec values win over ``auto``."""
    scale = batch * width * height / 1024 ** 2
    need = UNET_GIB + TRAIN_ACTIVATIONS_GIB * scale + HEADROOM_GIB + ADAPTER_EXTRA_GIB.get(adapter, 0.0)
    if isinstance(gc, bool):
        use_gc, why = gc, f"train.gradient_checkpointing: {str(gc).lower()} (spec)"
    elif free_gib is None:
        use_gc, why = False, "on the CPU: no checkpointing"
    else:
        use_gc = free_gib < need
        why = (f"{free_gib:.1f} GiB free {'<' if use_gc else '>='} {need:.1f} GiB needed without checkpointing: "
               f"gradient checkpointing {'on' if use_gc else 'off'}")
    use_graphs = bool(graphs) and not use_gc and world == 1 and free_gib is not None
    least = UNET_GIB + TRAIN_ACTIVATIONS_GC_GIB * scale + HEADROOM_GIB + ADAPTER_EXTRA_GIB.get(adapter, 0.0)
    if use_gc and free_gib is not None and free_gib < least:
        why += (f"; even with checkpointing about {least:.1f} GiB is needed ({free_gib:.1f} free): lower "
                "train.batch_size or train.resolution")
    return TrainMemory(use_gc, use_graphs, why)


def plan_generate(free_gib: float | None, batch: "int | str", width: int, height: int, images: int) -> tuple[int, str]:
    """Images per UNet batch: the spec's number, or (auto) as many as the memory left free once the UNet and VAE
    are loaded holds, 1..8."""
    if isinstance(batch, int):
        return max(1, batch), f"generation.batch_size: {batch} (spec)"
    if free_gib is None:
        return max(1, min(MAX_GEN_BATCH, images)), "on the CPU"
    per = GEN_PER_IMAGE_GIB * width * height / 1024 ** 2
    fits = int((free_gib - HEADROOM_GIB) // per)
    b = max(1, min(MAX_GEN_BATCH, images, fits))
    return b, f"{free_gib:.1f} GiB free: {b} image(s) per UNet batch ({per:.1f} GiB each)"


# The refine pass beyond the loaded weights, per megapixel of the refined image, untiled: measured on an H200
# (bench/RESULTS.md, refine): 17.9 GiB peak at 2048x2048 (4.19 MPx) with 5.3 GiB of weights, the VAE in bf16.
REFINE_PER_MPX_GIB = 3.0


def plan_refine(free_gib: float | None, tile: "bool | str", width: int, height: int) -> tuple[bool, str]:
    """Tiled VAE encode/decode for a refine at width x height: the spec's choice, or (auto) tiled when the untiled
    VAE would not fit beside the UNet in the free memory. On the CPU: untiled (memory is not the limit)."""
    if isinstance(tile, bool):
        return tile, f"generation.refine.tile: {str(tile).lower()} (spec)"
    if free_gib is None:
        return False, "on the CPU: untiled VAE"
    need = REFINE_PER_MPX_GIB * width * height / 2 ** 20 + HEADROOM_GIB  # free memory already excludes the weights
    tiled = free_gib < need
    return tiled, (f"{free_gib:.1f} GiB free {'<' if tiled else '>='} {need:.1f} GiB for an untiled VAE at "
                   f"{width}x{height}: tiled VAE {'on' if tiled else 'off'}")


# ChatGLM3-6B in fp16 while it encodes: 12.5 GiB of weights and its activations.
TEXT_ENCODER_ENCODE_GIB = 13.3


def plan_loads(free_gib: float | None, unet_gib: float) -> tuple[bool, str]:
    """Whether generate/refine read the UNet's weights (``unet_gib`` on the device) while the text encoder loads
    and encodes, or only once it is freed (never both on a small card). On the CPU: while."""
    if free_gib is None:
        return True, "on the CPU: the UNet's weights read while the text encoder encodes"
    need = TEXT_ENCODER_ENCODE_GIB + unet_gib + HEADROOM_GIB
    both = free_gib >= need
    return both, (f"{free_gib:.1f} GiB free {'>=' if both else '<'} {need:.1f} GiB for the text encoder and the "
                  f"UNet's weights together: {'read while it encodes' if both else 'read once it is freed'}")


def cap_gib() -> float | None:
    """``STORYC_GPU_MEMORY_GIB``: the GPU memory storyc may use (e.g. 22 to behave like a 24 GB card)."""
    raw = os.environ.get("STORYC_GPU_MEMORY_GIB", "").strip()
    if not raw:
        return None
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not (v > 0 and v < 1e6):
        from .errors import StorycError

        raise StorycError(f"STORYC_GPU_MEMORY_GIB={raw!r} is not a positive number of GiB", "e.g. STORYC_GPU_MEMORY_GIB=22")
    return v


def free_gib(device: str) -> float | None:
    """Free memory of the device in GiB (None on the CPU), within ``STORYC_GPU_MEMORY_GIB`` when set; the cap is
    also applied to this process (torch.cuda.set_per_process_memory_fraction), so a run behaves like a smaller card."""
    if not device.startswith("cuda"):
        return None
    import torch

    idx = torch.device(device).index or 0
    free, total = torch.cuda.mem_get_info(idx)
    cap = cap_gib()
    if cap:
        cap_bytes = min(cap * 2 ** 30, total)
        torch.cuda.set_per_process_memory_fraction(cap_bytes / total, idx)
        free = min(free, cap_bytes - torch.cuda.memory_allocated(idx))
    return free / 2 ** 30


# Under `storyc watch` the text encoder (ChatGLM3-6B, 12.5 GiB in fp16) stays on the GPU between builds when what is
# left beside it still holds the merged pipeline (5.3 GiB), a batch of 8 images at 1024^2 or a 2048^2 refine (12.6
# GiB) and headroom: on a 24 GB card it waits on the CPU instead. Moving it over and back cost ~8 s of each prompt
# edit on an H200 (bench/RESULTS.md, the edit loop).
TEXT_ENCODER_KEEP_FREE_GIB = 20.0


def keep_text_encoder(device: str) -> tuple[bool, str]:
    """Whether the text encoder, now on ``device``, may stay there between watch builds, and why."""
    free = free_gib(device)
    if free is None:
        return False, "on the CPU"
    keep = free >= TEXT_ENCODER_KEEP_FREE_GIB
    return keep, (f"{free:.1f} GiB free beside the text encoder {'>=' if keep else '<'} "
                  f"{TEXT_ENCODER_KEEP_FREE_GIB:g}: it stays {'on the GPU' if keep else 'on the CPU'} between builds")


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


def for_generate(requested_device: str | None) -> Resources:
    """Device and dtype; the batch size comes from plan_generate once the UNet is loaded."""
    device = pick_device(requested_device)
    return Resources(device, "float16" if device.startswith("cuda") else "float32")


def for_score(requested_device: str | None, batch_size: int = 16) -> Resources:
    return Resources(pick_device(requested_device), "float32", batch_size=batch_size)
