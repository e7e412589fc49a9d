#!/usr/bin/env python3
"""The bundle stage's own work (`bundle._write_bundle`) for eight 1024x1024 images, under cProfile: the tiny e2e
project's records with its scene images swapped for blurred-noise 1024² PNGs (the LoRA files stay tiny).
First build the project on the CPU:
    python3 bench/e2e.py prepare --scale tiny --images 4 && python3 bench/e2e.py models --scale tiny --device cpu \\
        && python3 bench/e2e.py storyc --steps 2 --scale tiny
then, from the repository root:  python3 bench/bundle_write_bench.py
"""
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO / "bench/out/e2e/proj")

import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from storyc.compiler import compile  # noqa: E402
from storyc.options import RunOptions  # noqa: E402
from storyc.runner import open_context  # noqa: E402
from storyc.spec import load_story  # noqa: E402
from storyc.stages import bundle  # noqa: E402

plan = compile(load_story(Path("camp.yaml").resolve()), None)
ctx = open_context(plan, RunOptions())
noise = Path(tempfile.mkdtemp())
rng = np.random.default_rng(0)
for i in range(8):
    Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3)).save(
        noise / f"{i}.png")
real, seen = ctx.output, {}
ctx.output = lambda stage, rel: noise / f"{seen.setdefault(stage, len(seen)) % 8}.png" if rel == ".png" \
    else real(stage, rel)
job = next(j for j in plan.stages.values() if j.kind == "bundle")
scenes = [{**s, "caption": c} for s, c in zip(job.params["scenes"], job.params["captions"])]
out = Path(tempfile.mkdtemp()) / "b"
out.mkdir()
t = time.perf_counter()
prof = cProfile.Profile()
prof.runcall(bundle._write_bundle, ctx, job.params, out, scenes, ctx.upstream("train").params["lora"])
print(f"_write_bundle: {time.perf_counter() - t:.3f} s (cProfile on); cpus {os.cpu_count()}")
pstats.Stats(prof).sort_stats("cumtime").print_stats(12)
