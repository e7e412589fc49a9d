#!/usr/bin/env python3
"""Where the bundle's time goes for a story of eight 1024x1024 images (CPU work; no GPU): the storyboard's
composition, its PNG encoding at zlib level 6 (PIL's default, storyc before), 1 (PIL) and storyc.png (level 1,
deflated on every core: what the bundle writes now), reading the 8 scene PNGs back (one thread, or a pool as the
bundle does), and a scene image's PNG encoding. Images are blurred noise (incompressible enough to be honest about zlib).
Run anywhere: python3 bench/bundle_bench.py
"""
import io
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from storyc import png  # noqa: E402
from storyc.stages.bundle import storyboard  # noqa: E402

rng = np.random.default_rng(0)
ims = [Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3))
       for _ in range(8)]


def _png(im):
    b = io.BytesIO()
    im.save(b, format="PNG")
    return b.getvalue()


pngs = [_png(im) for im in ims]  # the scene files the bundle reads back


def timed(fn, reps=3):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


R = {}
R["storyboard_compose_s"], (board, _) = timed(lambda: storyboard(ims, ["在家"] * 8, 2, True))
for level in (6, 1):
    def enc(level=level):
        b = io.BytesIO()
        board.save(b, format="PNG", compress_level=level)
        return len(b.getvalue())
    R[f"storyboard_png_level{level}_s"], size = timed(enc)
    R[f"storyboard_png_level{level}_mb"] = round(size / 1e6, 2)
R["storyboard_storyc_png_level1_s"], raw = timed(lambda: png.encode(board, level=1))  # what the bundle writes now
R["storyboard_storyc_png_level1_mb"] = round(len(raw) / 1e6, 2)
R["storyboard_storyc_png_1_thread_s"], _ = timed(lambda: png.encode(board, level=1, workers=1))
R["decode_8_images_serial_s"], _ = timed(lambda: [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs])
with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    R["decode_8_images_threads_s"], _ = timed(lambda: list(pool.map(lambda b: Image.open(io.BytesIO(b)).convert("RGB"),
                                                                    pngs)))
R["scene_png_level6_s"], _ = timed(lambda: ims[0].save(io.BytesIO(), format="PNG"))
R["cpus"] = os.cpu_count()
print(json.dumps({k: round(v, 3) for k, v in R.items()}, indent=1))
