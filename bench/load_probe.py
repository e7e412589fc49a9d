#!/usr/bin/env python3
"""Where a fresh process's time goes before generate can denoise (the one-scene rebuild): imports, CUDA start,
ChatGLM from the real .bin layout, the UNet. Run after bench/e2e.py models: bash bench/gpu.sh e2e-probe."""
import json
import os
import sys
import time
from pathlib import Path

t0 = time.perf_counter()
R = {}
import torch  # noqa: E402

R["import_torch_s"] = time.perf_counter() - t0
t = time.perf_counter()
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
R["cuda_init_s"] = time.perf_counter() - t
t = time.perf_counter()
import diffsynth  # noqa: E402,F401

R["import_diffsynth_s"] = time.perf_counter() - t
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storyc.stages.generate import encode_all, load_merged_pipeline  # noqa: E402

M = Path(__file__).resolve().parent / "out/e2e/proj/models/kolors/Kolors"
items = [{"prompt": "二次元，一个女孩", "negative_prompt": "丑陋"}]
for attempt in (1, 2):
    t = time.perf_counter()
    encode_all(M, items, 4.0, torch.float16, "cuda")
    torch.cuda.synchronize()
    R[f"chatglm_load_and_encode_{attempt}_s"] = time.perf_counter() - t
t = time.perf_counter()
from transformers import AutoConfig  # noqa: E402,F401
from diffsynth.models.kolors_text_encoder import ChatGLMModel  # noqa: E402

m = ChatGLMModel.from_pretrained(str(M / "text_encoder"), torch_dtype=torch.float16)
R["chatglm_from_pretrained_cpu_s"] = time.perf_counter() - t
t = time.perf_counter()
m.to("cuda")
torch.cuda.synchronize()
R["chatglm_to_cuda_s"] = time.perf_counter() - t
del m
torch.cuda.empty_cache()
t = time.perf_counter()
load_merged_pipeline(M, None, 0.0, torch.float16, "cuda", text_encoder=False)
torch.cuda.synchronize()
R["unet_vae_load_s"] = time.perf_counter() - t
R["total_s"] = time.perf_counter() - t0
R = {k: round(v, 2) for k, v in R.items()}
print(json.dumps(R, indent=2))
if os.environ.get("OUT"):
    (Path(os.environ["OUT"]) / "load_probe.json").write_text(json.dumps(R, indent=2) + "\n")
