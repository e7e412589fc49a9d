#!/usr/bin/env python3
"""The preference scores' cost per image (issue 24): PickScore, HPS v2, ImageReward and MPS through storyc's loader
(storyc.models.preference, DiffSynth's ImageQualityMetric classes) on full-size random-weight models written in
DiffSynth-Studio/QualityMetric_reward_pretrained's layout: PickScore_v1 a CLIP ViT-H/14 (transformers), HPS v2 an
open_clip ViT-H-14, ImageReward a BLIP ViT-L + BERT-base, MPS a CLIP ViT-H/14 + DiffSynth's 1024-wide cross model. The tokenizers are small byte-level ones (the real
vocabularies are not here); a prompt is at most 77 (35 for ImageReward) tokens either way, so the cost is the
models'. 8 images of 1024^2, each against its own prompt, one at a time as the score stage runs them.
Run on the GPU machine: bash bench/gpu.sh preference
"""
from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import DEV, SMOKE, gpu_info, out_dir, peak, peak_reset, sync, torch, write

from storyc.models import tiny  # noqa: E402
from storyc.models.preference import VIT_H_14, Preference, _compat  # noqa: E402

R = {"meta": gpu_info(), "images": 8, "size": 1024}
print("card", R["meta"], flush=True)
root = Path(tempfile.mkdtemp(prefix="prefbench-"))
S = 16 if SMOKE else 1  # widths divided under BENCH_SMOKE (a CPU plumbing check)


def save(state: dict, path: Path):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


t = time.perf_counter()
_compat()
# PickScore: CLIP-ViT-H-14's transformers config
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel  # noqa: E402

cfg = CLIPConfig(text_config=dict(hidden_size=1024 // S, intermediate_size=4096 // S, num_hidden_layers=24 // S or 1,
                                  num_attention_heads=16, vocab_size=49408, max_position_embeddings=77),
                 vision_config=dict(hidden_size=1280 // S, intermediate_size=5120 // S, num_hidden_layers=32 // S or 1,
                                    num_attention_heads=16, image_size=224, patch_size=14), projection_dim=1024 // S)
with torch.device(DEV):
    m = CLIPModel(cfg)
m.save_pretrained(root / "PickScore_v1", safe_serialization=True)
del m
clip = root / "CLIP-ViT-H-14-laion2B-s32B-b79K"
clip.mkdir()
tiny.write_clip_processor(clip, CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}))
cfg.save_pretrained(clip)
# HPS v2: open_clip ViT-H-14
from diffsynth.extensions.ImageQualityMetric.open_clip import factory  # noqa: E402

hps_cfg = json.loads(json.dumps(VIT_H_14))
if SMOKE:
    hps_cfg = tiny.TINY_OPEN_CLIP
factory._MODEL_CONFIGS["bench-hps"] = hps_cfg
with torch.device(DEV):
    m = factory.create_model("bench-hps", device=DEV)
save(m.state_dict(), root / "HPS_v2/HPS_v2_compressed.safetensors")
del m
import gzip  # noqa: E402

with gzip.GzipFile(root / "bpe_simple_vocab_16e6.txt.gz", "wb", mtime=0) as f:
    f.write(b"#version: 0.2\nt h\nth e</w>")
# ImageReward: BLIP ViT-L/16 + BERT-base (med_config) + the reward MLP
from diffsynth.extensions.ImageQualityMetric.BLIP.med import BertConfig, BertModel  # noqa: E402
from diffsynth.extensions.ImageQualityMetric.BLIP.vit import VisionTransformer  # noqa: E402
from diffsynth.extensions.ImageQualityMetric.imagereward import MLP  # noqa: E402

small = tiny._tiny_image_reward  # its bert-base-uncased/ and med_config.json layout, then full widths
small(root, 0)
med = json.loads((root / "ImageReward/med_config.json").read_text())
med.update(intermediate_size=3072, num_hidden_layers=12 if not SMOKE else 1, max_position_embeddings=512,
           encoder_width=1024 // S)
(root / "ImageReward/med_config.json").write_text(json.dumps(med))
with torch.device(DEV):
    parts = {"blip.visual_encoder": VisionTransformer(img_size=224, patch_size=16, embed_dim=1024 // S,
                                                      depth=24 // S or 1, num_heads=16 // S or 1),
             "blip.text_encoder": BertModel(BertConfig.from_json_file(str(root / "ImageReward/med_config.json")),
                                            add_pooling_layer=False), "mlp": MLP(768)}
save({f"{p}.{k}": v for p, mod in parts.items() for k, v in mod.state_dict().items()},
     root / "ImageReward/ImageReward.safetensors")
del parts
# MPS: its own CLIP ViT-H/14 (the CLIP-ViT-H-14 folder's config) and DiffSynth's cross model (1024 wide, 4 layers)
from diffsynth.extensions.ImageQualityMetric.trainer.models.cross_modeling import Cross_model  # noqa: E402

with torch.device(DEV):
    parts = {"model": CLIPModel(cfg), "cross_model": Cross_model(dim=1024 // S, layer_num=4, heads=16 // S or 1)}
save({f"{p}.{k}": v for p, mod in parts.items() for k, v in mod.state_dict().items()},
     root / "MPS_overall_checkpoint/MPS_overall_checkpoint_diffsynth.safetensors")
del parts
R["write_s"] = time.perf_counter() - t
print("models written", round(R["write_s"], 1), "s", flush=True)

from PIL import Image  # noqa: E402

g = torch.Generator().manual_seed(0)
size = 64 if SMOKE else 1024
images = [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy()) for _ in range(8)]
prompts = [f"a girl with short purple hair, scene {i}, anime style" for i in range(8)]
for name in ("pickscore", "hpsv2", "imagereward", "mps"):
    if DEV == "cuda":
        torch.cuda.empty_cache()
    peak_reset()
    t = time.perf_counter()
    model = Preference(name, root, DEV)
    sync()
    load = time.perf_counter() - t
    model.score(images[:1], prompts[:1])  # warm-up
    ts = []
    for im, p in zip(images, prompts):
        sync()
        t = time.perf_counter()
        model.score([im], [p])
        sync()
        ts.append(time.perf_counter() - t)
    params = sum(x.numel() for x in model.model.parameters()) / 1e6
    R[name] = {"load_s": round(load, 2), "s_per_image": round(statistics.median(ts), 4), "times": ts,
               "peak_gib": peak(), "params_m": round(params, 1)}
    print(name, R[name], flush=True)
    del model
shutil.rmtree(root, ignore_errors=True)
write(out_dir(), "preference_bench", R)
