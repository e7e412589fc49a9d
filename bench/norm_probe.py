#!/usr/bin/env python3
"""GroupNorm and the VAE's attention at the refine's shapes: PyTorch's own kernels against storyc's replacements.

bench/vae_probe.py found GroupNorm's statistics kernel (RowwiseMomentsCUDAKernel: one block per (image, group),
32 blocks on a 132-SM card at batch 1) at 187 ms of a 2048^2 decode's 442 ms of kernels, and the VAE's one
attention (65,536 tokens, one 512-wide head, PyTorch's memory-efficient kernel) at 64 ms. Timed here, each against
an fp32 reference, on random activations with a per-channel offset (so a mean far from zero tests cancellation):
  group_norm   native F.group_norm | storyc.models.unet.group_norm (statistics by full-card reductions)
  attention    SDPA (its default) | storyc.models.unet.attention_chunked (fp32 scores, query chunks)
Run on the GPU machine: bash bench/gpu.sh norm
"""
from __future__ import annotations

import statistics
import time

from common import DEV, SMOKE, gpu_info, group_norm_bn, out_dir, sync, torch, write

from storyc.models.unet import attention_chunked, group_norm, group_stats  # noqa: E402

R = {"meta": gpu_info(), "group_norm": [], "attention": []}
print("card", R["meta"], flush=True)


def timed(fn, reps=7, warm=2):
    for _ in range(warm):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def err(a, b):
    d = (a.float() - b.float()).abs()
    return [round(d.max().item(), 6), round(d.mean().item(), 7)]


S = 1 / 16 if SMOKE else 1
SHAPES = [  # (what, N, C, H, dtype): the VAE decoder's levels at a 2048^2 refine, then the UNet's (CFG: 2 rows)
    ("vae 2048 top", 1, 128, 2048, torch.bfloat16), ("vae 1024", 1, 256, 1024, torch.bfloat16),
    ("vae 512", 1, 512, 512, torch.bfloat16), ("vae 256 (mid)", 1, 512, 256, torch.bfloat16),
    ("unet 2048 l0", 2, 320, 256, torch.float16), ("unet 2048 l1", 2, 640, 128, torch.float16),
    ("unet 2048 l2", 2, 1280, 64, torch.float16), ("unet 1024x8 l0", 16, 320, 128, torch.float16),
]
g = torch.Generator(DEV).manual_seed(0)


def case(n, c, h, dt):
    """Activations with a per-channel offset, a weight and a bias, and the fp32 reference result."""
    x = (torch.randn(n, c, h, h, device=DEV, generator=g) * 2 + torch.randn(1, c, 1, 1, device=DEV, generator=g) * 4).to(dt)
    w = torch.randn(c, device=DEV, generator=g).to(dt)
    b = torch.randn(c, device=DEV, generator=g).to(dt)
    return x, w, b, torch.nn.functional.group_norm(x.float(), 32, w.float(), b.float(), 1e-5)


for what, n, c, h, dt in SHAPES:
    h = max(8, int(h * S))
    x, w, b, ref = case(n, c, h, dt)
    native = lambda: torch.nn.functional.group_norm(x, 32, w, b, 1e-5)  # noqa: E731
    ours = lambda: group_norm(x, 32, w, b, 1e-5)  # noqa: E731
    row = {"what": what, "shape": [n, c, h, h], "dtype": str(dt), "native_s": timed(native), "storyc_s": timed(ours),
           "native_err": err(native(), ref), "storyc_err": err(ours(), ref)}
    row["speedup"] = round(row["native_s"] / row["storyc_s"], 2)
    R["group_norm"].append(row)
    print("group_norm", row, flush=True)
    del x, ref

tokens = max(64, int(65536 * S * S))
for dt in (torch.bfloat16,):
    q, k, v = (torch.randn(1, 1, tokens, 512, device=DEV, generator=g).to(dt) for _ in range(3))
    ref = torch.cat([torch.softmax(q[0, 0, i:i + 4096].float() @ k[0, 0].float().T / 512 ** 0.5, -1) @ v[0, 0].float()
                     for i in range(0, tokens, 4096)])[None, None]
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    row = {"tokens": tokens, "dtype": str(dt), "sdpa_s": timed(sdpa, 5), "sdpa_err": err(sdpa(), ref)}
    for chunk in (4096, 8192, 16384):
        f = lambda: attention_chunked(q, k, v, chunk)  # noqa: E731
        row[f"chunk{chunk}_s"] = timed(f, 5)
        row[f"chunk{chunk}_err"] = err(f(), ref)
        torch.cuda.reset_peak_memory_stats() if DEV == "cuda" else None
        f()
        row[f"chunk{chunk}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if DEV == "cuda" else None
    R["attention"].append(row)
    print("attention", row, flush=True)



def graphed(fn, reps=20):
    """fn captured once as a CUDA graph (as the stages replay the UNet), replayed reps times: seconds per call."""
    if DEV != "cuda":
        return timed(fn)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        fn()
    gr.replay()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        gr.replay()
    sync()
    return (time.perf_counter() - t) / reps


def applied(x, groups, w, b, eps, how):
    """group_norm with its statistics as storyc computes them and the scale-and-shift done ``how``."""
    n, c = x.shape[:2]
    mean, rstd = group_stats(x, groups, eps)
    scale = rstd.repeat_interleave(c // groups, dim=1) * w.float()
    shift = b.float() - mean.repeat_interleave(c // groups, dim=1) * scale
    if how == "addcmul_half":  # scale and shift rounded to x's dtype: same-dtype broadcast kernel
        return torch.addcmul(shift.to(x.dtype)[..., None, None], x, scale.to(x.dtype)[..., None, None])
    if how == "batch_norm":  # each (image, channel) a channel of one image: batch norm's inference kernel
        return group_norm_bn(x, groups, w, b, eps)
    if how == "rows":  # (n*c, HW) rows against (n*c, 1) columns, as PyTorch's own group-norm apply iterates
        return torch.addcmul(shift.reshape(-1, 1), x.reshape(n * c, -1), scale.reshape(-1, 1)).to(x.dtype).view_as(x)
    raise ValueError(how)


if "--apply" in __import__("sys").argv:  # the scale-and-shift's kernels, timed as CUDA-graph replays
    R["apply"] = []
    for what, n, c, h, dt in SHAPES:
        h = max(8, int(h * S))
        x, w, b, ref = case(n, c, h, dt)
        fns = {"native": lambda: torch.nn.functional.group_norm(x, 32, w, b, 1e-5),
               "storyc": lambda: group_norm(x, 32, w, b, 1e-5),
               "stats_only": lambda: group_stats(x, 32, 1e-5)}
        for how in ("addcmul_half", "batch_norm", "rows"):
            fns[how] = (lambda how=how: applied(x, 32, w, b, 1e-5, how))
        row = {"what": what, "shape": [n, c, h, h], "dtype": str(dt)}
        for k, f in fns.items():
            try:
                row[f"{k}_ms"] = round(1e3 * graphed(f), 4)
                if k != "stats_only":
                    row[f"{k}_err"] = err(f(), ref)
            except Exception as e:  # noqa: BLE001 - a variant that cannot run here: recorded
                row[f"{k}_ms"] = repr(e)[:160]
        R["apply"].append(row)
        print("apply", row, flush=True)
        del x, ref

write(out_dir(), "norm_probe", R)
