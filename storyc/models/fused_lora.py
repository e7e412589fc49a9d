"""peft's LoRA ``Linear`` with its training forward and backward as one autograd function (same parameters).

Why: a training step adapts 560 projections. peft runs each as the base GEMM plus the adapter's own kernels: a cast
of the input to the adapter's fp32 and back under autocast, two GEMMs, a scale, an add, and as many again
backward, ~5,600 small kernels a step, each reading or writing a whole activation. Here the scale is folded into
the cast of B, the adapter's product is added by the GEMM's own epilogue (``addmm_``), the input gradient of both
branches is summed the same way, and the adapter's weight gradients come out of the GEMM in fp32: the same math
in fewer kernels. The parameters, their names and so every checkpoint and export are peft's. Measured on H200s: a
training step 1.158-1.178x faster, 4,614 fewer kernels, 0.5 GiB less peak (bench/RESULTS.md runs 19-21).
"""
from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLinear

from .unet import swap_classes


_F32_OUT = [True]  # False once this torch refused addmm's out_dtype (it came in torch 2.8)


def _mm_f32(a, b, alpha: float = 1.0):
    """``alpha * a @ b`` as fp32: one GEMM writing fp32 from fp16/bf16 operands on CUDA (no cast kernel)."""
    if _F32_OUT[0] and a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        out = torch.empty(a.shape[0], b.shape[1], device=a.device, dtype=torch.float32)  # not read: beta=0
        try:  # refused, if at all, when the arguments are checked: before any kernel runs
            return torch.addmm(out, a, b, out_dtype=torch.float32, beta=0, alpha=alpha)
        except (TypeError, RuntimeError, NotImplementedError):
            _F32_OUT[0] = False
    r = torch.mm(a, b)
    return (r.mul_(alpha) if alpha != 1.0 else r).float()


class _LoRALinearFn(torch.autograd.Function):
    """``linear(x, W, bias) + scaling * x A^T B^T`` in ``dtype``, gradients for x, A and B (W and bias frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        w = weight.to(dtype)
        a = lora_a.to(dtype)
        bs = torch.empty(lora_b.shape, device=lora_b.device, dtype=dtype)
        torch.mul(lora_b, scaling, out=bs)  # scale and cast in one kernel
        h = torch.mm(x2, a.t())
        y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(dtype))
        y.addmm_(h, bs.t())
        ctx.save_for_backward(x2, w, a, bs, h)
        ctx.scaling, ctx.shape, ctx.x_dtype = scaling, shape, x.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, w, a, bs, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        gh = torch.mm(g, bs)  # scaling * g B
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g, w)
            dx.addmm_(gh, a)
            dx = dx.view(ctx.shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            da = _mm_f32(gh.t(), x2)
        if ctx.needs_input_grad[4]:
            db = _mm_f32(g.t(), h, ctx.scaling)
        return dx, None, None, da, db, None, None


class FusedLoraLinear(PeftLinear):
    """peft's LoRA ``Linear`` (same state) that trains through :class:`_LoRALinearFn` when it can: one plain LoRA
    adapter active and unmerged, no dropout, a frozen ``nn.Linear`` base, and either autocast on or one dtype
    throughout. Anything else (DoRA, a merged or disabled adapter, dropout, several adapters) is peft's own path, and
    so is torch.compile (``train.compile``), which fuses peft's graph itself and was measured that way."""

    def forward(self, x, *args, **kwargs):
        fn = self._fused_args(x) if not args and not kwargs else None
        if fn is None:
            return super().forward(x, *args, **kwargs)
        return _LoRALinearFn.apply(x, *fn)

    def _fused_args(self, x):
        if (self.disable_adapters or self.merged or len(self.active_adapters) != 1
                or torch.compiler.is_compiling()):
            return None
        name = self.active_adapters[0]
        base = self.base_layer
        if (name not in self.lora_A or name in getattr(self, "lora_variant", {})
                or getattr(self, "use_dora", {}).get(name) or type(base) is not torch.nn.Linear
                or not isinstance(self.lora_dropout[name], torch.nn.Identity)):
            return None
        w, b = base.weight, base.bias
        if w.requires_grad or (b is not None and b.requires_grad) or not x.is_floating_point():
            return None
        la, lb = self.lora_A[name].weight, self.lora_B[name].weight
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        elif x.dtype == w.dtype == la.dtype == lb.dtype:
            dtype = x.dtype
        else:  # peft's mixed-dtype rules (the adapter in fp32 beside a half base) are its own
            return None
        return w, b, la, lb, float(self.scaling[name]), dtype


def fuse_lora(unet: torch.nn.Module, on: bool = True) -> torch.nn.Module:
    """Swap every peft LoRA ``Linear`` to :class:`FusedLoraLinear` (or back, ``on=False``); no weights move."""
    return swap_classes(unet, ((PeftLinear, FusedLoraLinear),), on)
