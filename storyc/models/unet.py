"""A diffsynth SDXL/Kolors UNet built from a diffusers ``unet/config.json``.

diffsynth's ``SDXLUNet(is_kolors=True)`` hard-codes the full 2.6 B-parameter widths. This builds the same block
sequence (the one diffsynth's ``SDXLUNetStateDictConverter.from_diffusers`` maps onto) at the widths the config
names, so a real Kolors UNet and a tiny test UNet load through one code path.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffsynth.models.sd_unet import (GEGLU, AttentionBlock, DownSampler, PopBlock, PushBlock, ResnetBlock,
                                      Timesteps, UpSampler)
from diffsynth.models.sdxl_unet import SDXLUNet, SDXLUNetStateDictConverter


class SplitGEGLU(GEGLU):
    """diffsynth's GEGLU (same weights) whose projection runs as two half-width GEMMs.
    Why: ``proj(x).chunk(2)`` leaves both halves strided, so the GELU and the product ran as PyTorch's
    non-vectorised elementwise kernel. On an H200 the split made a 1024² generation call 6% and a 2048² refine call
    5% faster and a LoRA training step's UNet forward + backward 6% faster (GPU kernel time), with bit-identical
    fp16 outputs (bench/attn_probe.py --geglu, bench/RESULTS.md runs 13 and 15; on CPU in fp32 they differ by
    ~1e-6). Where the UNet's own weights are trained it costs 1.6% (the two halves' weight gradients); storyc never
    trains them."""

    with_grad = True  # split when gradients are taken too (False: diffsynth's path whenever grad is enabled)

    def forward(self, hidden_states):
        p = self.proj
        if (torch.is_grad_enabled() and not self.with_grad) or type(p) is not torch.nn.Linear:  # or a wrapped proj
            return super().forward(hidden_states)
        n, b = p.out_features // 2, p.bias
        h = torch.nn.functional.linear(hidden_states, p.weight[:n], None if b is None else b[:n])
        g = torch.nn.functional.linear(hidden_states, p.weight[n:], None if b is None else b[n:])
        g = torch.nn.functional.gelu(g)
        return g * h if torch.is_grad_enabled() else g.mul_(h)


def _half(x):
    """autocast's dtype where autocast is on and ``x`` is already half precision, else None."""
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        return dt if x.dtype == dt else None
    return None


class HalfLayerNorm(torch.nn.LayerNorm):
    """A LayerNorm that keeps a half-precision input in half precision under autocast.
    Why: autocast runs layer_norm in fp32, which costs four full-activation casts per norm a training step (its
    input up, its output down again for the projections, and both back in the backward). PyTorch's half kernels
    accumulate the statistics in fp32 and round once, as diffusers' fp16 pipelines run them. Measured on an H200:
    a LoRA training step 1.103x faster with these and HalfGroupNorm, 1,520 fewer kernels, the loss curve tracking
    fp32 norms' (bench/train_bench.py, bench/RESULTS.md run 22). Without autocast: nn.LayerNorm exactly."""

    def forward(self, x):
        dt = _half(x)
        if dt is None:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.layer_norm(x, self.normalized_shape, _as(self.weight, dt), _as(self.bias, dt),
                                                  self.eps)


class HalfGroupNorm(torch.nn.GroupNorm):
    """A GroupNorm that keeps a half-precision input in half precision under autocast (as :class:`HalfLayerNorm`;
    the SiLU after it then runs in half precision too, and the convolution casts nothing)."""

    def forward(self, x):
        dt = _half(x)
        if dt is None:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.group_norm(x, self.num_groups, _as(self.weight, dt), _as(self.bias, dt), self.eps)


def _as(t, dt):
    return None if t is None else t.to(dt)


def swap_classes(model: torch.nn.Module, pairs, on: bool = True) -> torch.nn.Module:
    """Give every submodule of exactly a ``base`` class its drop-in ``subclass`` (or back, ``on=False``), for each
    ``(base, subclass)`` in ``pairs``: same state, no weights move."""
    for m in model.modules():
        for base, sub in pairs:
            if type(m) is (base if on else sub):
                m.__class__ = sub if on else base
    return model


def half_norms(unet: torch.nn.Module, on: bool = True) -> torch.nn.Module:
    """Swap every LayerNorm / GroupNorm to :class:`HalfLayerNorm` / :class:`HalfGroupNorm` (or back, ``on=False``)."""
    return swap_classes(unet, ((torch.nn.LayerNorm, HalfLayerNorm), (torch.nn.GroupNorm, HalfGroupNorm)), on)


def split_geglu(unet: torch.nn.Module, on: bool = True) -> torch.nn.Module:
    """Swap every feed-forward GEGLU to :class:`SplitGEGLU` (or back, ``on=False``); no weights move."""
    return swap_classes(unet, ((GEGLU, SplitGEGLU),), on)


def _per_block(v, n):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


class ConfigSDXLUNet(SDXLUNet):
    """diffsynth's SDXLUNet (same forward) with widths from a diffusers config."""

    def __init__(self, cfg: dict):
        torch.nn.Module.__init__(self)
        C = list(cfg["block_out_channels"])
        n, L = len(C), cfg.get("layers_per_block", 2)
        heads = _per_block(cfg["attention_head_dim"], n)  # diffusers' SDXL config stores head counts here
        T = _per_block(cfg.get("transformer_layers_per_block", 1), n)
        cross = cfg["cross_attention_dim"]
        groups = cfg.get("norm_num_groups", 32)
        temb = C[0] * 4
        self.time_proj = Timesteps(C[0])
        self.time_embedding = torch.nn.Sequential(torch.nn.Linear(C[0], temb), torch.nn.SiLU(), torch.nn.Linear(temb, temb))
        self.add_time_proj = Timesteps(cfg["addition_time_embed_dim"])
        self.add_time_embedding = torch.nn.Sequential(
            torch.nn.Linear(cfg["projection_class_embeddings_input_dim"], temb), torch.nn.SiLU(), torch.nn.Linear(temb, temb))
        self.conv_in = torch.nn.Conv2d(cfg.get("in_channels", 4), C[0], kernel_size=3, padding=1)
        hid = cfg.get("encoder_hid_dim")
        self.text_intermediate_proj = torch.nn.Linear(hid, cross) if hid else None

        blocks, ch, skips = [], C[0], [C[0]]
        for i, typ in enumerate(cfg["down_block_types"]):
            for _ in range(L):
                blocks.append(ResnetBlock(ch, C[i], temb, groups))
                ch = C[i]
                if "CrossAttn" in typ:
                    blocks.append(AttentionBlock(heads[i], ch // heads[i], ch, T[i], cross, groups))
                blocks.append(PushBlock())
                skips.append(ch)
            if i < n - 1:
                blocks += [DownSampler(ch), PushBlock()]
                skips.append(ch)
        blocks += [ResnetBlock(ch, ch, temb, groups), AttentionBlock(heads[-1], ch // heads[-1], ch, T[-1], cross, groups),
                   ResnetBlock(ch, ch, temb, groups)]
        rC, rH, rT = C[::-1], heads[::-1], T[::-1]
        for i, typ in enumerate(cfg["up_block_types"]):
            for _ in range(L + 1):
                skip = skips.pop()
                blocks += [PopBlock(), ResnetBlock(ch + skip, rC[i], temb, groups)]
                ch = rC[i]
                if "CrossAttn" in typ:
                    blocks.append(AttentionBlock(rH[i], ch // rH[i], ch, rT[i], cross, groups))
            if i < n - 1:
                blocks.append(UpSampler(ch))
        self.blocks = torch.nn.ModuleList(blocks)
        self.conv_norm_out = torch.nn.GroupNorm(num_channels=C[0], num_groups=groups, eps=1e-5)
        self.conv_act = torch.nn.SiLU()
        self.conv_out = torch.nn.Conv2d(C[0], cfg.get("out_channels", 4), kernel_size=3, padding=1)
        self.is_kolors = hid is not None
        split_geglu(self)
        half_norms(self)


def load_unet(folder: Path, dtype=torch.float16, device="cpu", state: dict | None = None) -> ConfigSDXLUNet:
    """Load ``folder/config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers layout) into diffsynth;
    ``state``: that file's tensors, already read (on any device)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text("utf-8"))
    with torch.device("meta"):
        unet = ConfigSDXLUNet(cfg)
    if state is None:
        state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    converted = SDXLUNetStateDictConverter().from_diffusers(state)
    if isinstance(converted, tuple):
        converted = converted[0]
    missing, unexpected = unet.load_state_dict(converted, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"UNet weights do not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return unet.to(device=device, dtype=dtype).eval()
