"""A diffsynth SDXL/Kolors UNet built from a diffusers ``unet/config.json``.

diffsynth's ``SDXLUNet(is_kolors=True)`` hard-codes the full 2.6 B-parameter widths. This builds the same block
sequence (the one diffsynth's ``SDXLUNetStateDictConverter.from_diffusers`` maps onto) at the widths the config
names, so a real Kolors UNet and a tiny test UNet load through one code path.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from diffsynth.models.attention import Attention
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
    the SiLU after it then runs in half precision too, and the convolution casts nothing). Its inference on a GPU
    runs :func:`group_norm` where PyTorch's statistics kernel would leave most of the card idle (fewer (image, group)
    pairs than SMs: a 2048² refine's CFG pair is 64 on a 132-SM H200), which makes that UNet call 4.2% faster
    replayed from a CUDA graph (bench/RESULTS.md, "The UNet's GroupNorm statistics at a refine's batch of 2")."""

    wide = True  # False: PyTorch's kernel always (the benches' baseline)

    def forward(self, x):
        if (self.wide and not torch.is_grad_enabled() and x.is_cuda
                and x.shape[0] * self.num_groups <= _sms(x.device)):
            with torch.autocast(x.device.type, enabled=False):
                return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        dt = _half(x)
        if dt is None:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.group_norm(x, self.num_groups, _as(self.weight, dt), _as(self.bias, dt), self.eps)


@functools.lru_cache(maxsize=None)
def _sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def group_norm(x, groups: int, weight, bias, eps: float):
    """``F.group_norm``'s result for inference, with statistics that keep the whole card busy.
    Why: PyTorch's statistics kernel gives each (image, group) one block, so a batch-1 VAE decode runs 32 blocks on
    a 132-SM card: 187 ms of a 2048-px decode's 442 ms of kernels (bench/vae_probe.py); this is 3.7-4.6x faster at
    the VAE's shapes, and slower where the batch already fills the card (bench/norm_probe.py). Here the mean and the
    second moment are plain reductions over each group (PyTorch spreads a long one over many blocks), accumulated in
    fp32 straight from x, and the normalisation is one fused multiply-add in fp32 rounded once to x's dtype.
    The variance comes from E[x^2] - mean^2 in fp32: its relative error is about 2^-24 (1 + mean^2 / var), below
    a half-precision rounding while |mean| < ~180 standard deviations of the group. The scale and shift stay in
    fp32: in fp16 (PyTorch's same-dtype kernel, 1.2-1.4x faster at the UNet's shapes: bench/norm_probe.py --apply)
    the shift, -mean x scale + bias, loses what a mean far from zero cancels (a CPU test: 1.6x PyTorch's error)."""
    n, c = x.shape[:2]
    mean, rstd = group_stats(x, groups, eps)
    scale = rstd.repeat_interleave(c // groups, dim=1)  # (n, c)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean.repeat_interleave(c // groups, dim=1) * scale
    if bias is not None:
        shift = shift + bias.float()
    view = (n, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(view), x, scale.view(view), out=torch.empty_like(x))


def group_stats(x, groups: int, eps: float):
    """Each (image, group)'s mean and 1 / sqrt(var + eps), both (n, groups) in fp32 (see :func:`group_norm`).
    A channels-last x is read in place: per-channel sums over the pixels, then over each group's channels."""
    n, c = x.shape[:2]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        xc = x.permute(0, 2, 3, 1).reshape(n, -1, c)  # a view: NHWC is this tensor's memory order
        count = xc.shape[1] * (c // groups)
        s1 = xc.sum(1, dtype=torch.float32).view(n, groups, -1).sum(-1)
        s2 = torch.linalg.vector_norm(xc, dim=1, dtype=torch.float32).square().view(n, groups, -1).sum(-1)
    else:
        xg = x.reshape(n, groups, -1)
        count = xg.shape[-1]
        s1 = xg.sum(-1, dtype=torch.float32)
        s2 = torch.linalg.vector_norm(xg, dim=-1, dtype=torch.float32).square()
    mean = s1 / count
    var = (s2 / count - mean.square()).clamp_min_(0)
    return mean, torch.rsqrt(var + eps)


def attention_chunked(q, k, v, chunk: int):
    """Softmax attention (``F.scaled_dot_product_attention(q, k, v)``'s result) for long sequences with wide heads,
    query chunk by query chunk: the scores of a chunk come out of one GEMM in fp32 (scaled there), the softmax runs in
    fp32, and the probabilities meet V in the GEMM in half precision, as flash attention does. For the VAE's
    attention, whose 512-wide head no flash or cuDNN kernel takes: PyTorch falls back to its memory-efficient kernel,
    69.5 ms at 65,536 tokens on an H200 against 45.5 ms here (bench/norm_probe.py)."""
    b, h, t, d = q.shape
    out = torch.empty_like(q)
    kt = k.transpose(-1, -2)
    scale = d ** -0.5
    for i in range(b):
        for j in range(h):
            for s in range(0, t, chunk):
                scores = _mm_f32(q[i, j, s:s + chunk], kt[i, j]).mul_(scale)
                torch.mm(torch.softmax(scores, -1).to(q.dtype), v[i, j], out=out[i, j, s:s + chunk])
    return out


def _mm_f32(a, b):
    """a @ b with fp32 output from half inputs in one GEMM where the backend has it (CUDA), else in fp32."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


class WideGroupNorm(torch.nn.GroupNorm):
    """A GroupNorm whose inference on a GPU runs :func:`group_norm` (in the input's dtype, also under autocast, as
    :class:`HalfGroupNorm`); with gradients, or on a CPU, nn.GroupNorm exactly."""

    def forward(self, x):
        if torch.is_grad_enabled() or not x.is_cuda:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class ChunkedAttention(Attention):
    """diffsynth's Attention, whose inference on a GPU over a long sequence with heads wider than flash attention
    takes (the VAE's: one 512-wide head) runs :func:`attention_chunked`; otherwise diffsynth's own forward."""

    CHUNK_ELEMENTS = 2 ** 28  # fp32 scores per query chunk (1 GiB): 4,096 queries against 65,536 keys, as fast
    # as 8,192 on an H200 at half the peak (bench/RESULTS.md, "The VAE at a refine's size")

    def forward(self, hidden_states, encoder_hidden_states=None, attn_mask=None, ipadapter_kwargs=None,
                qkv_preprocessor=None):
        long = hidden_states.shape[1] >= 8192 and self.head_dim > 256
        if (torch.is_grad_enabled() or not hidden_states.is_cuda or not long or encoder_hidden_states is not None
                or attn_mask is not None or ipadapter_kwargs is not None or qkv_preprocessor is not None):
            return super().forward(hidden_states, encoder_hidden_states, attn_mask, ipadapter_kwargs, qkv_preprocessor)
        b, t = hidden_states.shape[:2]
        q, k, v = (f(hidden_states).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for f in (self.to_q, self.to_k, self.to_v))
        with torch.autocast(hidden_states.device.type, enabled=False):
            out = attention_chunked(q, k, v, max(1024, self.CHUNK_ELEMENTS // t))
        return self.to_out(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def wide_vae(vae: torch.nn.Module, on: bool = True) -> torch.nn.Module:
    """Swap a VAE encoder's or decoder's GroupNorms and attention to :class:`WideGroupNorm` and
    :class:`ChunkedAttention` (or back, ``on=False``): same weights, their GPU inference without the kernels that
    leave the card idle at batch 1 (bench/RESULTS.md: "The VAE at a refine's size")."""
    return swap_classes(vae, ((torch.nn.GroupNorm, WideGroupNorm), (Attention, ChunkedAttention)), on)


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
