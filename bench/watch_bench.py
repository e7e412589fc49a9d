#!/usr/bin/env python3
"""The edit loop on the CPU demo (issue 25): a one-scene seed edit through a cold `storyc build` (a new process)
against `storyc watch` (models held), in one run on one machine.

A copy of specs/ in a temporary project is built once; then the `longing` scene's seed is edited N times, each time
timed from the save to the end of the build: first with `storyc build` (the process start, imports and loads
included, as a user pays them), then with one `storyc watch` process (from the save to its "build done" line).
  python3 bench/watch_bench.py [--edits 3] [--spec demo-characters.yaml]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
p = argparse.ArgumentParser()
p.add_argument("--edits", type=int, default=3)
p.add_argument("--spec", default="demo-characters.yaml")
args = p.parse_args()
env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
root = Path(tempfile.mkdtemp(prefix="watch-bench-"))
shutil.copytree(REPO / "specs", root / "specs")
(root / ".storyc").mkdir()
spec = root / "specs" / args.spec
text = spec.read_text("utf-8")
anchor = re.search(r"\n  - id: longing\n", text)
assert anchor, "the spec needs a `longing` scene written in it"


def set_seed(seed: int):
    spec.write_text(text.replace(anchor.group(0), anchor.group(0) + f"    seed: {seed}\n", 1), "utf-8")


def storyc(*a, **k):
    return subprocess.run([sys.executable, "-m", "storyc", *a], cwd=root, env=env, capture_output=True, text=True, **k)


t = time.monotonic()
r = storyc("build", str(spec), "-q")
assert r.returncode == 0, r.stdout + r.stderr
print(f"first build {time.monotonic() - t:.1f}s", flush=True)
cold = []
for i in range(args.edits):
    set_seed(100 + i)
    t = time.monotonic()
    r = storyc("build", str(spec), "-q")
    cold.append(time.monotonic() - t)
    assert r.returncode == 0, r.stderr
    print(f"cold build, seed edit {i + 1}: {cold[-1]:.2f}s", flush=True)

proc = subprocess.Popen([sys.executable, "-m", "storyc", "watch", str(spec), "--interval", "0.1"], cwd=root, env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def until_done(n: int) -> None:
    for line in proc.stdout:
        if f"watch: build {n} done" in line:
            return
    raise SystemExit(f"watch ended before build {n}")


until_done(1)
warm = []
for i in range(args.edits):
    set_seed(200 + i)
    t = time.monotonic()
    until_done(i + 2)
    warm.append(time.monotonic() - t)
    print(f"storyc watch, seed edit {i + 1}: {warm[-1]:.2f}s", flush=True)
proc.terminate()
proc.wait(30)
out = {"spec": args.spec, "cold_s": [round(x, 2) for x in cold], "watch_s": [round(x, 2) for x in warm],
       "cold_median_s": round(statistics.median(cold), 2), "watch_median_s": round(statistics.median(warm), 2),
       "watch_first_s": round(warm[0], 2), "watch_over_cold": round(statistics.median(warm) / statistics.median(cold), 3),
       "cpu": os.cpu_count()}
print(json.dumps(out), flush=True)
shutil.rmtree(root, ignore_errors=True)
