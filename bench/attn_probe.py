#!/usr/bin/env python3
"""Where the Kolors UNet's time goes, and which attention kernel it should use (issues 24 and 25).

One full-size Kolors-architecture UNet (random weights, fp16) run three ways, each timed with PyTorch's scaled-dot-
product attention left to choose its kernel ("default") and pinned to each fused kernel in turn:
  generate  one UNet call of the batched sampling loop at 1024²: 8 rows (4 images x classifier-free guidance)
  refine    one UNet call of the refine pass at 2048²: 2 rows (1 image x guidance)
  train     one training step's forward + backward at 1024², batch 1 (grads through every activation, as a LoRA's)
Then a CUDA-kernel profile of each at the default, summed by kind (attention, GEMM, convolution, norms, other), so
the attention's share is measured rather than guessed. Run on the GPU machine: bash bench/gpu.sh attn
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import DEV, DT, SMOKE, build_unet, gpu_info, out_dir, sync, torch, unet_norms, write

p = argparse.ArgumentParser()
p.add_argument("--reps", type=int, default=5)
p.add_argument("--only", default="generate,refine,train")
p.add_argument("--geglu", action="store_true", help="instead of the attention kernels: diffsynth's GEGLU against "
               "storyc's SplitGEGLU (storyc.models.unet), timed, profiled and compared output for output")
p.add_argument("--channels-last", action="store_true", help="instead of the attention kernels: the UNet and its "
               "input in channels_last (NHWC) against the default layout, timed and profiled")
p.add_argument("--norms", action="store_true", help="instead of the attention kernels: the UNet's GroupNorm as "
               "PyTorch's against storyc's (HalfGroupNorm's group_norm path), group_norm with batch norm's "
               "scale-and-shift, and storyc's with the GEGLU's GELU and product fused by torch.compile: kernel "
               "profile, CUDA-graph replay time, output diff")
p.add_argument("--refine-loop", action="store_true", help="also time storyc's refine_image call by call (the stage's "
               "own loop at 2048², VAE included) against the bare UNet call above")
args = p.parse_args()
R = {"meta": gpu_info(), "runs": {}}
print("card", R["meta"], flush=True)

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

unet = build_unet()
DIM, POOLED, LEN = 4096, 4096, 256  # ChatGLM hidden states, pooled, 256 tokens
if SMOKE:
    from storyc.models.tiny import TINY_UNET

    DIM, POOLED, LEN = TINY_UNET["encoder_hid_dim"], TINY_UNET["projection_class_embeddings_input_dim"] - 6 * \
        TINY_UNET["addition_time_embed_dim"], 16
SCEN = {"generate": (8, 1024, False), "refine": (2, 2048, False), "train": (1, 1024, True),
        "generate_one": (2, 1024, False),  # one scene re-rendered alone (the edit loop): 1 image + guidance
        "train_lora": (1, 1024, True)}  # train_lora: the UNet's weights frozen, as under a LoRA (no weight grads)
BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def inputs(rows: int, size: int, grad: bool):
    s = 64 if SMOKE else size
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(rows, 4, s // 8, s // 8, device=DEV, dtype=DT, generator=g).requires_grad_(grad)
    ehs = torch.randn(rows, LEN, DIM, device=DEV, dtype=DT, generator=g)
    ate = torch.randn(rows, POOLED, device=DEV, dtype=DT, generator=g)
    tid = torch.tensor([s, s, 0, 0, s, s], device=DEV).repeat(rows)
    return x, torch.tensor([500], device=DEV), ehs, tid, ate


def call(args_, grad: bool):
    x, t, ehs, tid, ate = args_
    if grad:
        out = unet(x, timestep=t, encoder_hidden_states=ehs, add_time_id=tid, add_text_embeds=ate)
        out.float().square().mean().backward()
        x.grad = None
    else:
        with torch.no_grad():
            unet(x, timestep=t, encoder_hidden_states=ehs, add_time_id=tid, add_text_embeds=ate)


def kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")):
        return "attention"
    if any(k in n for k in ("conv", "implicit_gemm", "winograd", "nchw", "nhwc")):
        return "convolution"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "sm90", "ampere")):
        return "gemm"
    if any(k in n for k in ("norm", "welford")):
        return "norm"
    return "other"


def profile(fn) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([] if SMOKE else [ProfilerActivity.CUDA])
    with prof(activities=acts) as pr:
        fn()
        sync()
    by, top = {}, {}
    for e in pr.events():
        us = getattr(e, "device_time", 0) if not SMOKE else 0
        if us and e.device_type.name == "CUDA":
            by[kind(e.name)] = by.get(kind(e.name), 0.0) + us / 1e3
            top[e.name[:160]] = top.get(e.name[:160], 0.0) + us / 1e3
    return {"kernel_ms": round(sum(by.values()), 2),
            "ms_by_kind": {k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": {k: round(v, 2) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]}}


q = torch.randn(2, 10, (64 if SMOKE else 16384), 64, device=DEV, dtype=DT)
try:
    R["meta"]["sdpa_choice_2048_level2"] = str(SDPBackend(torch._fused_sdp_choice(q, q, q)))
except Exception as e:  # noqa: BLE001
    R["meta"]["sdpa_choice_2048_level2"] = repr(e)[:200]
print("sdpa picks", R["meta"]["sdpa_choice_2048_level2"], flush=True)
del q


def timed(a, grad: bool) -> float:
    times = []
    for i in range(2 + args.reps):
        sync()
        t = time.perf_counter()
        call(a, grad)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return round(1e3 * statistics.median(times), 2)


def variant(name: str, tag: str, a, grad: bool):
    """One variant of a probe's call: its output (no grad), then wall ms and a kernel profile."""
    with torch.no_grad():
        out = unet(a[0].detach(), timestep=a[1], encoder_hidden_states=a[2], add_time_id=a[3],
                   add_text_embeds=a[4]).float()
    rec = {"wall_ms": timed(a, grad), "profile": profile(lambda: call(a, grad))}
    print(name, tag, rec["wall_ms"], "ms wall,", rec["profile"]["kernel_ms"], "ms kernels",
          rec["profile"]["ms_by_kind"], flush=True)
    return out, rec


def geglu_probe():
    """The same UNet call with diffsynth's GEGLU and with storyc's split one: wall ms, kernel ms, output diff."""
    from storyc.models.unet import SplitGEGLU, split_geglu

    for name in args.only.split(","):
        rows, size, grad = SCEN[name]
        a = inputs(rows, size, grad)
        run = R["runs"][name] = {"rows": rows, "size": size, "backward": grad}
        unet.requires_grad_(name != "train_lora")
        SplitGEGLU.with_grad = grad  # a training variant times the split with gradients on
        outs = {}
        for tag in ("diffsynth", "split"):
            split_geglu(unet, tag == "split")
            outs[tag], run[tag] = variant(name, tag, a, grad)
        d = (outs["split"] - outs["diffsynth"]).abs()
        run["output_max_abs_diff"] = float(d.max())
        run["output_rel_rms_diff"] = float(d.square().mean().sqrt() / outs["diffsynth"].square().mean().sqrt())
        k = run["split"]["profile"]["kernel_ms"]
        run["speedup_kernels"] = round(run["diffsynth"]["profile"]["kernel_ms"] / k, 3) if k else None
        print(name, "diff", run["output_max_abs_diff"], run["output_rel_rms_diff"], "kernel speedup",
              run["speedup_kernels"], flush=True)
        del a, outs
        sync()
    split_geglu(unet, True)
    SplitGEGLU.with_grad = False
    unet.requires_grad_(True)


for name in ([] if args.geglu or args.channels_last or args.norms else args.only.split(",")):
    rows, size, grad = SCEN[name]
    a = inputs(rows, size, grad)
    run = R["runs"][name] = {"rows": rows, "size": size, "backward": grad, "ms": {}}
    for tag, backend in BACKENDS.items():
        ctx = sdpa_kernel([backend]) if backend is not None and not SMOKE else None
        try:
            with ctx if ctx is not None else torch.enable_grad():
                run["ms"][tag] = timed(a, grad)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run this shape: recorded, not fatal
            run["ms"][tag] = repr(e)[:200]
        print(name, tag, run["ms"][tag], flush=True)
    run["profile_default"] = profile(lambda: call(a, grad))
    print(name, "profile", run["profile_default"]["ms_by_kind"], flush=True)
    best = min((t for t, v in run["ms"].items() if isinstance(v, float)), key=lambda t: run["ms"][t])
    if best != "default" and not SMOKE:
        with sdpa_kernel([BACKENDS[best]]):
            run[f"profile_{best}"] = profile(lambda: call(a, grad))
        print(name, "profile", best, run[f"profile_{best}"]["ms_by_kind"], flush=True)
    del a
    sync()
def _nhwc_block_class():
    """diffsynth's AttentionBlock that keeps a channels_last input channels_last: its NHWC reshapes become views and
    its output is not copied back to NCHW (an experiment for this probe; storyc's UNet does not use it)."""
    from diffsynth.models.sd_unet import AttentionBlock

    class NHWCAttentionBlock(AttentionBlock):
        def forward(self, hidden_states, time_emb, text_emb, res_stack, cross_frame_attention=False, tiled=False,
                    ipadapter_kwargs_list={}, **kwargs):  # noqa: B006 - diffsynth's signature
            if tiled or cross_frame_attention or not self.need_proj_out or hidden_states.is_contiguous():
                return super().forward(hidden_states, time_emb, text_emb, res_stack, cross_frame_attention, tiled,
                                       ipadapter_kwargs_list=ipadapter_kwargs_list, **kwargs)
            batch, c, height, width = hidden_states.shape
            residual = hidden_states
            x = self.norm(hidden_states).permute(0, 2, 3, 1).reshape(batch, height * width, c)
            x = self.proj_in(x)
            ehs = text_emb if text_emb.shape[0] == x.shape[0] else text_emb.repeat(x.shape[0], 1, 1)
            for i, block in enumerate(self.transformer_blocks):
                x = block(x, encoder_hidden_states=ehs, ipadapter_kwargs=ipadapter_kwargs_list.get(i, None))
            x = self.proj_out(x).reshape(batch, height, width, c).permute(0, 3, 1, 2)  # channels_last, no copy
            return x + residual, time_emb, text_emb, res_stack

    return AttentionBlock, NHWCAttentionBlock


def layout_probe():
    """The same UNet call in the default (NCHW) layout, in channels_last, and in channels_last with NHWC-keeping
    transformer blocks: wall ms, kernel ms, output diff."""
    base_cls, nhwc_cls = _nhwc_block_class()
    for name in args.only.split(","):
        rows, size, grad = SCEN[name]
        a = inputs(rows, size, grad)
        run = R["runs"][name] = {"rows": rows, "size": size, "backward": grad}
        unet.requires_grad_(name != "train_lora")
        outs = {}
        for tag in ("nchw", "channels_last", "channels_last_nhwc_blocks"):
            fmt = torch.contiguous_format if tag == "nchw" else torch.channels_last
            unet.to(memory_format=fmt)
            for m in unet.modules():
                if isinstance(m, base_cls):
                    m.__class__ = nhwc_cls if tag == "channels_last_nhwc_blocks" else base_cls
            a = (a[0].detach().contiguous(memory_format=fmt).requires_grad_(grad), *a[1:])
            outs[tag], run[tag] = variant(name, tag, a, grad)
        for tag in ("channels_last", "channels_last_nhwc_blocks"):
            k = run[tag]["profile"]["kernel_ms"]
            run[tag]["output_max_abs_diff"] = float((outs[tag] - outs["nchw"]).abs().max())
            run[tag]["speedup_kernels"] = round(run["nchw"]["profile"]["kernel_ms"] / k, 3) if k else None
            print(name, tag, "diff", run[tag]["output_max_abs_diff"], "kernel speedup", run[tag]["speedup_kernels"],
                  flush=True)
        unet.to(memory_format=torch.contiguous_format)
        for m in unet.modules():
            if isinstance(m, base_cls):
                m.__class__ = base_cls
        del a, outs
        sync()
    unet.requires_grad_(True)


def graphed_ms(a) -> float:
    """One no-grad UNet call captured as a CUDA graph and replayed (as the stages run it): median ms."""
    x, t, ehs, tid, ate = a
    fn = lambda: unet(x, timestep=t, encoder_hidden_states=ehs, add_time_id=tid, add_text_embeds=ate)  # noqa: E731
    if SMOKE:
        return 0.0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(2 + args.reps):
        sync()
        t0 = time.perf_counter()
        g.replay()
        sync()
        times.append(time.perf_counter() - t0)
    del g
    return round(1e3 * statistics.median(times[2:]), 2)


def norms_probe():
    """The no-grad UNet call with PyTorch's GroupNorm, with storyc's (HalfGroupNorm: its group_norm where PyTorch's
    statistics would starve the card), with group_norm everywhere and batch norm's scale-and-shift, and with
    storyc's and the feed-forward's GELU x product as one compiled kernel."""
    import storyc.models.unet as su

    fused = torch.compile(lambda g, h: torch.nn.functional.gelu(g) * h, dynamic=False) if not SMOKE else None
    split_forward = su.SplitGEGLU.forward

    def fused_forward(self, hidden_states):
        if torch.is_grad_enabled() or type(self.proj) is not torch.nn.Linear:
            return split_forward(self, hidden_states)
        p, n = self.proj, self.proj.out_features // 2
        b = p.bias
        h = torch.nn.functional.linear(hidden_states, p.weight[:n], None if b is None else b[:n])
        g = torch.nn.functional.linear(hidden_states, p.weight[n:], None if b is None else b[n:])
        return fused(g, h) if fused is not None else torch.nn.functional.gelu(g) * h

    for name in args.only.split(","):
        rows, size, _ = SCEN[name]
        a = inputs(rows, size, False)
        run = R["runs"][name] = {"rows": rows, "size": size}
        outs = {}
        for tag in ("pytorch", "storyc", "wide_bn", "storyc_fused_geglu"):  # storyc: HalfGroupNorm's own choice
            unet_norms(unet, "storyc" if tag.startswith("storyc") else tag)
            su.SplitGEGLU.forward = fused_forward if tag.endswith("fused_geglu") else split_forward
            outs[tag], run[tag] = variant(name, tag, a, False)
            run[tag]["graphed_ms"] = graphed_ms(a)
            print(name, tag, "graphed", run[tag]["graphed_ms"], "ms", flush=True)
        for tag in ("storyc", "wide_bn", "storyc_fused_geglu"):
            d = (outs[tag] - outs["pytorch"]).abs()
            run[tag]["output_max_abs_diff"] = float(d.max())
            run[tag]["output_rel_rms_diff"] = float(d.square().mean().sqrt() / outs["pytorch"].square().mean().sqrt())
            if run[tag]["graphed_ms"]:
                run[tag]["speedup_graphed"] = round(run["pytorch"]["graphed_ms"] / run[tag]["graphed_ms"], 3)
            print(name, tag, {k: v for k, v in run[tag].items() if k != "profile"}, flush=True)
        unet_norms(unet, "storyc")
        su.SplitGEGLU.forward = split_forward
        del a, outs
        sync()


if args.norms:
    norms_probe()
if args.geglu:
    geglu_probe()
if args.channels_last:
    layout_probe()
if args.refine_loop:
    # refine_image as the stage calls it (1024² image -> 2048², strength 0.4 of 50 steps, cfg 4), every UNet call
    # synchronised and timed with its input's layout, then the same denoise loop from fresh random latents
    import numpy as np
    from common import build_vae, make_pipe
    from PIL import Image

    from storyc.stages.generate import denoise
    from storyc.stages.refine import refine_image

    pipe = make_pipe(None, unet, build_vae("decoder"), build_vae("encoder"))
    s = 64 if SMOKE else 1024
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (s, s, 3), dtype=np.uint8))
    g = torch.Generator(device=DEV).manual_seed(1)
    e2, a2 = (torch.randn(2, LEN, DIM, device=DEV, dtype=DT, generator=g),
              torch.randn(2, POOLED, device=DEV, dtype=DT, generator=g))
    calls = []
    forward = unet.forward

    def timed_forward(x, *a, **k):
        sync()
        t0 = time.perf_counter()
        y = forward(x, *a, **k)
        sync()
        calls.append({"ms": round(1e3 * (time.perf_counter() - t0), 2), "shape": list(x.shape), "dtype": str(x.dtype),
                      "stride": list(x.stride()), "contiguous": x.is_contiguous(),
                      "ehs": [list(k["encoder_hidden_states"].shape), str(k["encoder_hidden_states"].dtype),
                              k["encoder_hidden_states"].is_contiguous()],
                      "timestep": [str(k["timestep"].dtype), str(k["timestep"].device)]})
        return y

    unet.forward = timed_forward
    r = {"scale": 2.0, "strength": 0.4, "steps": 50, "cfg_scale": 4.0, "upscaler": "lanczos"}
    enc = lambda _p, pos, neg: (e2[:len(pos) + len(neg)], a2[:len(pos) + len(neg)])  # noqa: E731
    refine_image(pipe, img, (2 * s, 2 * s), dict(r, steps=5), 0, "a", "b", enc, False)  # warm-up
    calls.clear()
    sync()
    t = time.perf_counter()
    refine_image(pipe, img, (2 * s, 2 * s), r, 0, "a", "b", enc, False)
    sync()
    total = time.perf_counter() - t
    in_refine = list(calls)
    calls.clear()
    lat = torch.randn(1, 4, s // 4, s // 4, device=DEV, dtype=DT, generator=g)
    pipe.scheduler.set_timesteps(50, 0.4)
    sync()
    t = time.perf_counter()
    with torch.no_grad():
        denoise(pipe, lat, e2, a2, 4.0)
    sync()
    R["refine_loop"] = {"refine_image_s": round(total, 3), "unet_calls_in_refine": in_refine,
                        "unet_ms_sum_in_refine": round(sum(c["ms"] for c in in_refine), 1),
                        "denoise_from_random_s": round(time.perf_counter() - t, 3),
                        "unet_calls_from_random": calls}
    print("refine_loop", {k: v for k, v in R["refine_loop"].items() if not k.startswith("unet_calls")},
          "first call", in_refine[:1], "random first", calls[:1], flush=True)
    unet.forward = forward
write(out_dir(), "geglu_probe.json" if args.geglu else "layout_probe.json" if args.channels_last else
      "norms_probe.json" if args.norms else "attn_probe.json", R)
print("done", flush=True)
