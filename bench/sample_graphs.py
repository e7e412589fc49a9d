#!/usr/bin/env python3
"""The sampling loop's CUDA graphs (storyc.stages.generate.denoise): eager against graphed, same run, same card.

Full-size random-weight Kolors UNet in fp16; random caption embeddings in ChatGLM's shapes; the loop storyc's
generate and refine stages run (CFG batched, DiffSynth's scheduler). Per shape: seconds for the whole loop
(synchronised), the graphed loop's first call and capture included, its peak memory, and the largest difference
between the two loops' final latents.
  one image      1024^2, 2 UNet rows (the image and its CFG pair), 50 steps: a watch edit, a cold one-scene edit
  four images    1024^2, 8 rows, 50 steps: a batch of the whole build
  refine         2048^2, 2 rows, 20 steps: the hi-res pass per image
Run on the GPU machine: bash bench/gpu.sh sample-graphs   (BENCH_SMOKE=1 on a CPU only checks the plumbing)
"""
from __future__ import annotations

import time

from common import DEV, DT, SMOKE, build_unet, gpu_info, make_pipe, out_dir, peak, peak_reset, sync, torch, write

from storyc.stages.generate import denoise

R = {"meta": gpu_info()}
pipe = make_pipe(None, build_unet())
hid = 64 if SMOKE else 4096
shapes = {"one_image": (1, 1024, 50), "four_images": (4, 1024, 50), "refine": (1, 2048, 20)}
if SMOKE:
    shapes = {"one_image": (1, 64, 4)}
for name, (n, size, steps) in shapes.items():
    g = torch.Generator(DEV).manual_seed(0)
    lat = torch.randn((n, 4, size // 8, size // 8), generator=g, device=DEV, dtype=DT)
    ehs = torch.randn((2 * n, 256, hid), generator=g, device=DEV, dtype=DT)
    ate = torch.randn((2 * n, hid), generator=g, device=DEV, dtype=DT)
    row = {}
    out = {}
    for graphs in (False, True, False, True):  # twice each: the first pair also warms the card up
        pipe.scheduler.set_timesteps(steps)
        sync()
        peak_reset()
        t = time.perf_counter()
        with torch.no_grad():
            out[graphs] = denoise(pipe, lat, ehs, ate, 4.0, graphs=graphs)
        sync()
        key = "graphed" if graphs else "eager"
        row[f"{key}_s"] = round(time.perf_counter() - t, 3)
        row[f"{key}_peak_gib"] = peak()
    row["speedup"] = round(row["eager_s"] / row["graphed_s"], 2)
    row["max_abs_diff"] = float((out[True].float() - out[False].float()).abs().max())
    row["finite"] = bool(out[True].isfinite().all())
    R[name] = row
    print(name, row, flush=True)
write(out_dir(), "sample_graphs.json", R)
