#!/usr/bin/env python3
"""The train stage's CUDA-graph path through `storyc build` on one GPU: bench/multigpu/one-gpu.yaml trains with
train.cuda_graphs (the default), one-gpu-eager.yaml the same without; the two LoRAs must agree.
Run on the GPU machine: bash bench/gpu.sh graphs (ingest + filter run here first, as for bench/multigpu.py).
"""
from __future__ import annotations

from multigpu import R, ROOT, lora, storyc, write

(ROOT / ".storyc").mkdir(exist_ok=True)
out, R["graphs_build_s"] = storyc("build", "bench/multigpu/one-gpu.yaml", "--until", "train", CUDA_VISIBLE_DEVICES="0")
_, R["eager_build_s"] = storyc("build", "bench/multigpu/one-gpu-eager.yaml", "--until", "train", CUDA_VISIBLE_DEVICES="0")
a, b = lora("one-gpu"), lora("one-gpu-eager")
R["lora_graphs_vs_eager_max_abs_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
R["lora_finite"] = all(bool(v.isfinite().all()) for v in (*a.values(), *b.values()))
for s in ("one-gpu", "one-gpu-eager"):
    R[f"{s}_train_log_tail"] = (ROOT / f"build/{s}/lora/train_log.csv").read_text().splitlines()[-3:]
print({k: v for k, v in R.items() if k.startswith("lora") or k.endswith("tail")}, flush=True)
write("graphs_results.json")
