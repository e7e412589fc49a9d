#!/usr/bin/env python3
"""The hi-res refine pass (issue 24): DiffSynth's Kolors example path vs storyc's refine stage, same card, same run.

The story's 8 scenes: each generated at 1024x1024 (storyc's generate path, batched), then refined to 2048x2048 at
strength 0.4, cfg 4, on full-size Kolors-architecture models with random weights. DiffSynth's img2img runs every one
of its `num_inference_steps` over the redrawn part of the schedule (50 UNet calls for the example's 50 at 0.4, not
20): storyc's refine is timed at --steps (its default, 20: a 50-step generation's spacing) and at the example's 50.
  generate   storyc.stages.generate.render_iter at 1024^2, 8 scenes in one UNet batch (the stage's own path):
             the cost refine is measured against (goal: refine <= 2x generation per image)
  example    DiffSynth's own img2img: SDXLImagePipeline(prompt, input_image=image.resize(2048), denoising_strength
             0.4, 50 steps) with the LoRA merged, one image at a time (its example's path)
  storyc     storyc.stages.refine.refine_many, the stage's loop: embeddings encoded once, the shared denoise loop,
             the CPU's part (upscale, PIL conversion) on threads beside the GPU's, the VAE with storyc's GroupNorm and
             attention (storyc.models.unet.wide_vae), VAE tiling as the memory planner decides; untiled and tiled
             timed apart, with peak memory, and under STORYC_GPU_MEMORY_GIB=22; also refine_image one image after
             the other, and a refine's phases with PyTorch's VAE kernels
Run on the GPU machine: bash bench/gpu.sh refine
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from common import (DEV, NEG, PROMPT, SMOKE, build_text_encoder, build_unet, build_vae, gpu_info, make_pipe, out_dir,
                    peak, peak_reset, random_lora_state, sync, torch, write)

p = argparse.ArgumentParser()
p.add_argument("--images", type=int, default=8)
p.add_argument("--size", type=int, default=1024)
p.add_argument("--scale", type=float, default=2.0)
p.add_argument("--example-images", type=int, default=3, help="timed images of DiffSynth's path")
p.add_argument("--steps", type=int, default=20, help="storyc's refine steps (generation.refine.steps' default)")
p.add_argument("--skip", default="", help="comma list: example, tiled, variants, breakdown, sequential, steps50, cap22, "
               "every_step (the refine with every step guided), generate_interval (the generation with SD-XL's "
               "guidance interval)")
p.add_argument("--vae-layouts", default="", help="comma list of VAE memory formats (channels_last) whose phases "
               "and stage loop are also timed, over --images, and compared with the default's pixels")
p.add_argument("--unet-norms", default="", help="comma list of UNet GroupNorm variants (bench/common.py unet_norms: "
               "pytorch, wide_bn) whose stage loop is also timed, over --images (storyc's own is the main row)")
args = p.parse_args()
skip = set(args.skip.split(","))
R = {"meta": {**gpu_info(), "images": args.images, "size": args.size, "scale": args.scale, "strength": 0.4,
              "steps": args.steps, "example_steps": 50, "cfg": 4.0}}
out = out_dir()
print("card", R["meta"], flush=True)

from storyc import lora as L  # noqa: E402
from storyc import resources  # noqa: E402
from storyc.schema import resolve  # noqa: E402
from storyc.stages.generate import SDXL_GUIDANCE_INTERVAL, encode_prompts, render_iter  # noqa: E402
from storyc.models.unet import wide_vae  # noqa: E402
from storyc.stages.refine import refine_image, refine_many, refined_size  # noqa: E402

te, enc, dec, unet = build_text_encoder(), build_vae("encoder"), build_vae("decoder"), build_unet(seed=2)
wide_vae(enc), wide_vae(dec)  # as storyc.models.kolors.load_vae loads them (the example's path: swapped back)
L.merge(unet, random_lora_state(unet), 4.0 * 0.5 / 16)  # the camp LoRA at alpha 2: merged as storyc merges it
pipe = make_pipe(te, unet, dec, enc)
scenes = [(PROMPT + f"，第{i}幕", NEG, i) for i in range(args.images)]
INTERVAL = resolve({"$ref": "#/$defs/refine"})["properties"]["guidance_interval"]["default"]  # the stage's default
r = {"scale": args.scale, "strength": 0.4, "steps": 2 if SMOKE else args.steps, "cfg_scale": 4.0, "upscaler": "lanczos",
     "guidance_interval": INTERVAL}
R["meta"]["guidance_interval"] = INTERVAL
EXAMPLE_STEPS = 2 if SMOKE else 50  # DiffSynth's Kolors example
W, H = refined_size(args.size, args.size, args.scale)
R["meta"]["refined"] = [W, H]


# ---------------- generate at 1024^2: storyc's stage path (8 scenes batched with CFG)
items = [{"prompt": a, "negative_prompt": b, "seed": s} for a, b, s in scenes]
gen = {"height": args.size, "width": args.size, "steps": 2 if SMOKE else 50, "cfg_scale": 4.0}
list(render_iter(pipe, items[:1], dict(gen, steps=2), 1))  # warm-up
peak_reset()
sync()
t = time.perf_counter()
images = list(render_iter(pipe, items, gen, min(8, len(items))))
sync()
R["generate"] = {"s_per_image": (time.perf_counter() - t) / len(items), "peak_gib": peak(), "batch": min(8, len(items))}
print("generate", R["generate"], flush=True)
if "generate_interval" not in skip:  # generation.guidance_interval: SD-XL's (the generation's default guides every step)
    gi = dict(gen, guidance_interval=list(SDXL_GUIDANCE_INTERVAL))
    list(render_iter(pipe, items[:1], dict(gi, steps=2), 1))
    sync()
    t = time.perf_counter()
    list(render_iter(pipe, items, gi, min(8, len(items))))
    sync()
    R["generate_interval"] = {"s_per_image": (time.perf_counter() - t) / len(items), "interval": gi["guidance_interval"]}
    print("generate with SD-XL's guidance interval", R["generate_interval"], flush=True)

# the prompt embeddings as the refine stage has them (encoded once, ChatGLM released before the UNet loads)
with torch.no_grad():
    table = {}
    ehs, ate = encode_prompts(pipe, [a for a, _, _ in scenes], [NEG])
    for i, (a, _, _) in enumerate(scenes):
        table[("+", a)] = (ehs[i:i + 1], ate[i:i + 1])
    table[("-", NEG)] = (ehs[-1:], ate[-1:])


def encode(pipe_, positive, negative):
    rows = [table[("+", x)] for x in positive] + [table[("-", x)] for x in negative]
    return torch.cat([x[0] for x in rows]), torch.cat([x[1] for x in rows])


# ---------------- DiffSynth's example path
def example(i):
    a, b, s = scenes[i]
    wide_vae(enc, on=False), wide_vae(dec, on=False)  # DiffSynth's own VAE modules
    try:
        return pipe(prompt=a, negative_prompt=b, cfg_scale=4.0, input_image=images[i].resize((W, H)),
                    denoising_strength=0.4, num_inference_steps=EXAMPLE_STEPS, height=H, width=W, seed=s,
                    progress_bar_cmd=lambda x: x)
    finally:
        wide_vae(enc), wide_vae(dec)


if "example" not in skip:
    example(0)  # warm-up at the full size
    peak_reset()
    times = []
    for i in range(min(args.example_images, args.images)):
        sync()
        t = time.perf_counter()
        example(i)
        sync()
        times.append(time.perf_counter() - t)
    R["example"] = {"s_per_image": statistics.median(times), "times": times, "peak_gib": peak(),
                    "note": "its own text encoding per image, untiled VAE"}
    print("example", R["example"], flush=True)


# ---------------- storyc's refine stage path: ChatGLM is off the GPU (the stage releases it before the UNet
# loads), so peaks are the UNet's and the VAE's; untiled, tiled, and as planned under a 22 GiB cap
te.to("cpu")
if not SMOKE:
    torch.cuda.empty_cache()
if "example" in R:
    R["example"]["note"] += "; its peak includes ChatGLM (12 GB) on the GPU, which its path keeps there"
def storyc_refine(tiled, n, r=r):
    """The stage's loop (refine_many: the CPU's part on threads beside the GPU's), n images: seconds per image."""
    peak_reset()
    items = [{"image": images[i], "size": (W, H), "r": r, "seed": scenes[i][2], "prompt": scenes[i][0],
              "negative": scenes[i][1], "tiled": tiled} for i in range(n)]
    sync()
    t = time.perf_counter()
    out_imgs = [im for _, im in refine_many(pipe, items, encode)]
    sync()
    total = time.perf_counter() - t
    return {"s_per_image": total / n, "total_s": total, "images": n, "peak_gib": peak(), "tiled": tiled}, out_imgs


def sequential_refine(n, pipelined):
    """refine_image one image after the other (the CPU's part in line with the GPU's, a graph captured per image):
    seconds per image, and whether each image is refine_many's to the byte."""
    import numpy as np

    ts, same = [], []
    for i in range(n):
        sync()
        t = time.perf_counter()
        im = refine_image(pipe, images[i], (W, H), r, scenes[i][2], scenes[i][0], scenes[i][1], encode, False)
        sync()
        ts.append(time.perf_counter() - t)
        same.append(bool(np.array_equal(np.asarray(im), np.asarray(pipelined[i]))))
    return {"s_per_image": statistics.median(ts), "times": ts, "same_images_as_the_stage_loop": same}


refine_image(pipe, images[0], (W, H), dict(r, steps=2), 0, scenes[0][0], NEG, encode, False)  # warm-up

# where the time of one refine goes: VAE encode, the 20 UNet steps, VAE decode (synchronised wall times)
phases = {"encode": 0.0, "decode": 0.0}
orig_enc, orig_dec = pipe.encode_image, dec.forward  # the refine decodes with the module (then to PIL apart)


def timed_phase(name, fn):
    def f(*a, **k):
        sync()
        t0 = time.perf_counter()
        y = fn(*a, **k)
        sync()
        phases[name] += time.perf_counter() - t0
        return y
    return f


def breakdown():
    """One refine's wall time, with its VAE encode and decode apart (synchronised)."""
    phases.update(encode=0.0, decode=0.0)
    sync()
    t = time.perf_counter()
    refine_image(pipe, images[0], (W, H), r, 0, scenes[0][0], NEG, encode, False)
    sync()
    total = time.perf_counter() - t
    return {"total_s": total, **phases, "unet_and_rest_s": total - phases["encode"] - phases["decode"]}


import storyc.stages.refine as refine_mod  # noqa: E402

if "breakdown" not in skip:
    pipe.encode_image, dec.forward = timed_phase("encode", orig_enc), timed_phase("decode", orig_dec)
    R["breakdown_bf16_vae"] = breakdown()
    wide_vae(enc, on=False), wide_vae(dec, on=False)
    R["breakdown_bf16_vae_pytorch_norms"] = breakdown()  # PyTorch's GroupNorm and attention kernels in the VAE
    wide_vae(enc), wide_vae(dec)
    real = refine_mod.vae_precision
    refine_mod.vae_precision = lambda p_: __import__("contextlib").nullcontext()  # the VAE as kept: fp32
    R["breakdown_fp32_vae"] = breakdown()
    refine_mod.vae_precision = real
    pipe.encode_image = orig_enc
    del dec.forward
    print("breakdown", R["breakdown_bf16_vae"], R["breakdown_bf16_vae_pytorch_norms"], R["breakdown_fp32_vae"],
          flush=True)

R["storyc_untiled"], refined = storyc_refine(False, args.images)
print("storyc untiled", R["storyc_untiled"], flush=True)
if "every_step" not in skip:  # the refine as before the guidance interval: every step guided, as DiffSynth's img2img
    R["storyc_untiled_every_step_guided"], _ = storyc_refine(False, args.images, dict(r, guidance_interval=None))
    print("storyc untiled, every step guided", R["storyc_untiled_every_step_guided"], flush=True)
if "sequential" not in skip:
    R["storyc_untiled_sequential"] = sequential_refine(min(3, args.images), refined)
    print("storyc untiled, one image after the other", R["storyc_untiled_sequential"], flush=True)
if EXAMPLE_STEPS != r["steps"] and "steps50" not in skip:  # storyc at the example's own settings: the same work as DiffSynth's path
    r50 = dict(r, steps=EXAMPLE_STEPS)
    ts = []
    for i in range(min(2, args.images)):
        sync()
        t = time.perf_counter()
        refine_image(pipe, images[i], (W, H), r50, scenes[i][2], scenes[i][0], scenes[i][1], encode, False)
        sync()
        ts.append(time.perf_counter() - t)
    R["storyc_untiled_example_steps"] = {"steps": EXAMPLE_STEPS, "s_per_image": statistics.median(ts), "times": ts}
    print("storyc untiled at the example's steps", R["storyc_untiled_example_steps"], flush=True)

for how in filter(None, args.unet_norms.split(",")):  # the UNet's GroupNorm statistics as full-card reductions
    from common import unet_norms

    unet_norms(pipe.unet, how)
    refine_image(pipe, images[0], (W, H), dict(r, steps=2), 0, scenes[0][0], NEG, encode, False)  # warm-up
    R[f"storyc_untiled_unet_{how}"], _ = storyc_refine(False, args.images)
    unet_norms(pipe.unet, "storyc")
    print(f"storyc untiled, UNet norms {how}", R[f"storyc_untiled_unet_{how}"], flush=True)

def gen_decode_s():
    """The generation's decode of one 1024² latent (fp32, as generate decodes): median of 5, synchronised."""
    lat = torch.randn(1, 4, args.size // 8, args.size // 8, device=DEV, dtype=pipe.torch_dtype)
    ts = []
    with torch.no_grad():
        for _ in range(6):
            sync()
            t = time.perf_counter()
            pipe.vae_decoder(lat)
            sync()
            ts.append(time.perf_counter() - t)
    return statistics.median(ts[1:])


if args.vae_layouts:
    R["generate_decode_s"] = gen_decode_s()
for fmt in filter(None, args.vae_layouts.split(",")):  # the VAE's convolutions without cuDNN's NCHW<->NHWC transposes
    import numpy as np

    mf = getattr(torch, fmt)
    enc.to(memory_format=mf), dec.to(memory_format=mf)
    refine_image(pipe, images[0], (W, H), dict(r, steps=2), 0, scenes[0][0], NEG, encode, False)  # warm-up
    pipe.encode_image, dec.forward = timed_phase("encode", orig_enc), timed_phase("decode", orig_dec)
    R[f"breakdown_vae_{fmt}"] = breakdown()
    pipe.encode_image = orig_enc
    del dec.forward
    R[f"storyc_untiled_vae_{fmt}"], imgs = storyc_refine(False, args.images)
    d = np.abs(np.asarray(imgs[0], dtype=np.int16) - np.asarray(refined[0], dtype=np.int16))
    R[f"storyc_untiled_vae_{fmt}"]["px_diff_vs_default"] = {"max": int(d.max()), "mean": float(d.mean())}
    R[f"generate_decode_s_vae_{fmt}"] = gen_decode_s()
    enc.to(memory_format=torch.contiguous_format), dec.to(memory_format=torch.contiguous_format)
    print(f"storyc untiled, VAE {fmt}", R[f"breakdown_vae_{fmt}"], R[f"storyc_untiled_vae_{fmt}"], flush=True)

# kernel-level levers for the UNet at 2048^2 (most of a refine), 2 images each
if "variants" not in skip:
    variants = {}
    torch.backends.cudnn.benchmark = True
    refine_image(pipe, images[0], (W, H), dict(r, steps=3), 0, scenes[0][0], NEG, encode, False)  # autotune
    variants["cudnn_benchmark"], _ = storyc_refine(False, 2)
    pipe.unet.to(memory_format=torch.channels_last)
    refine_image(pipe, images[0], (W, H), dict(r, steps=3), 0, scenes[0][0], NEG, encode, False)
    variants["cudnn_benchmark_channels_last"], _ = storyc_refine(False, 2)
    pipe.unet.to(memory_format=torch.contiguous_format)
    torch.backends.cudnn.benchmark = False
    R["variants"] = variants
    print("variants", variants, flush=True)
if "tiled" not in skip:
    R["storyc_tiled"], _ = storyc_refine(True, min(3, args.images))
    print("storyc tiled", R["storyc_tiled"], flush=True)
if "cap22" not in skip:
    os.environ["STORYC_GPU_MEMORY_GIB"] = "22"
    tiled, why = resources.plan_refine(resources.free_gib(DEV), "auto", W, H)
    R["storyc_cap22"], _ = storyc_refine(tiled, args.images)
    R["storyc_cap22"]["plan"] = why
    print("storyc cap 22", R["storyc_cap22"], flush=True)
    R["ratio_cap22_to_generate"] = R["storyc_cap22"]["s_per_image"] / R["generate"]["s_per_image"]
R["ratio_refine_to_generate"] = R["storyc_untiled"]["s_per_image"] / R["generate"]["s_per_image"]
if "storyc_untiled_every_step_guided" in R:
    R["ratio_every_step_guided_to_generate"] = (R["storyc_untiled_every_step_guided"]["s_per_image"]
                                                / R["generate"]["s_per_image"])
for k in [k for k in R if k.startswith(("storyc_untiled_unet_", "storyc_untiled_vae_"))]:
    R[f"ratio_{k[len('storyc_untiled_'):]}_to_generate"] = R[k]["s_per_image"] / R["generate"]["s_per_image"]
if "example" in R:
    R["example_over_storyc"] = R["example"]["s_per_image"] / R["storyc_untiled"]["s_per_image"]
out.mkdir(parents=True, exist_ok=True)
refined[0].save(out / "refine_sample.png")
write(out, "refine_bench.json", R)
print({k: round(v, 3) for k, v in R.items() if k.startswith(("ratio", "example_over"))}, flush=True)
