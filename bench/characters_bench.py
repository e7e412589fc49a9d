#!/usr/bin/env python3
"""Characters (issue 24): what the Kolors IP-Adapter-Plus adds to a scene's generation, same card, same run.

Full-size Kolors-architecture models with random weights (speed does not depend on weight values), and a full-size
random IP-Adapter-Plus saved in the Kwai-Kolors/Kolors-IP-Adapter-Plus layout (CLIP ViT-L/14-336 image encoder,
a Resampler of 4 layers, 1280 wide, 16 tokens out at 2048, one to_k_ip/to_v_ip pair per cross-attention), loaded
through storyc's own loader (storyc.models.ipadapter). The story's 8 scenes at 1024x1024, 50 steps, cfg 4, in one
batch as the generate stage renders them (storyc.stages.generate.render_iter):
  plain       no characters
  character   every scene shows one character drawn from one reference image (scale 0.6)
plus the adapter's load and the reference's encoding, the character-consistency figure's cost, and peak memory.
Run on the GPU machine: bash bench/gpu.sh characters
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import (NEG, PROMPT, SMOKE, build_text_encoder, build_unet, build_vae, gpu_info, make_pipe, out_dir,
                    peak, peak_reset, sync, torch, write)

p = argparse.ArgumentParser()
p.add_argument("--images", type=int, default=8)
p.add_argument("--size", type=int, default=1024)
args = p.parse_args()
R = {"meta": {**gpu_info(), "images": args.images, "size": args.size, "steps": 2 if SMOKE else 50, "cfg": 4.0}}
out = out_dir()
print("card", R["meta"], flush=True)

from storyc.models.kolors import KOLORS_UNET  # noqa: E402
from storyc.models.tiny import TINY_UNET, cross_attention_widths  # noqa: E402
from storyc.stages.generate import encode_prompts, load_characters, render_iter  # noqa: E402
from storyc.stages.score import character_consistency  # noqa: E402


def build_ip_folder(folder: Path) -> Path:
    """A random IP-Adapter-Plus in the release layout, at the release's widths (tiny ones for BENCH_SMOKE)."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from storyc.models.ipadapter import Resampler

    torch.manual_seed(0)
    if SMOKE:
        enc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                               image_size=56, patch_size=14, projection_dim=32)
        dims, ucfg = dict(dim=64, depth=4, heads=1, num_queries=4, embedding_dim=32), TINY_UNET
    else:  # CLIP ViT-L/14 at 336 px, and the Plus Resampler Kolors ships
        enc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=336, patch_size=14, projection_dim=768)
        dims, ucfg = dict(dim=1280, depth=4, heads=20, num_queries=16, embedding_dim=1024), KOLORS_UNET
    CLIPVisionModelWithProjection(enc).to(torch.float16).save_pretrained(folder / "image_encoder")
    size = enc.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        folder / "image_encoder")
    cross = ucfg["cross_attention_dim"]
    r = Resampler(output_dim=cross, **dims)
    flat = {f"image_proj.{k}": v.half().contiguous() for k, v in r.state_dict().items()}
    for n, width in enumerate(cross_attention_widths(ucfg)):
        for w in ("to_k_ip", "to_v_ip"):
            flat[f"ip_adapter.{2 * n + 1}.{w}.weight"] = (torch.randn(width, cross) * cross ** -0.5).half()
    save_file(flat, str(folder / "ip_adapter_plus_general.safetensors"))
    return folder


tmp = Path(tempfile.mkdtemp(prefix="ipbench-"))
t = time.perf_counter()
ip_folder = build_ip_folder(tmp / "ip")
print(f"random IP-Adapter-Plus written in {time.perf_counter() - t:.1f}s", flush=True)
from PIL import Image  # noqa: E402

Image.effect_noise((512, 640), 60).convert("RGB").save(tmp / "girl.png")

te, dec, unet = build_text_encoder(), build_vae("decoder"), build_unet(seed=2)
pipe = make_pipe(te, unet, dec)
scenes = [(PROMPT + f"，第{i}幕", NEG, i) for i in range(args.images)]
with torch.no_grad():  # the prompt embeddings as the stage has them (encoded once, ChatGLM then released)
    ehs, ate = encode_prompts(pipe, [a for a, _, _ in scenes], [NEG])
table = {("+", a): (ehs[i:i + 1], ate[i:i + 1]) for i, (a, _, _) in enumerate(scenes)}
table[("-", NEG)] = (ehs[-1:], ate[-1:])
te.to("cpu")
if not SMOKE:
    torch.cuda.empty_cache()


def encode(pipe_, positive, negative):
    rows = [table[("+", x)] for x in positive] + [table[("-", x)] for x in negative]
    return torch.cat([x[0] for x in rows]), torch.cat([x[1] for x in rows])


gen = {"height": args.size, "width": args.size, "steps": R["meta"]["steps"], "cfg_scale": 4.0}
plain = [{"prompt": a, "negative_prompt": b, "seed": s} for a, b, s in scenes]
chars = [dict(it, characters=[{"id": "girl", "scale": 0.6, "references": ["girl.png"]}]) for it in plain]

sync()
t = time.perf_counter()
load_characters(ip_folder, pipe, chars, tmp)
sync()
R["ip_adapter_load_and_encode_s"] = round(time.perf_counter() - t, 3)
print("IP-Adapter load + reference encoding", R["ip_adapter_load_and_encode_s"], "s", flush=True)


def run(items, name):
    list(render_iter(pipe, items[:1], dict(gen, steps=2), 1, encode=encode))  # warm-up
    peak_reset()
    sync()
    t0 = time.perf_counter()
    imgs = list(render_iter(pipe, items, gen, len(items), encode=encode))
    sync()
    R[name] = {"s_per_image": round((time.perf_counter() - t0) / len(items), 4), "peak_gib": peak(),
               "batch": len(items)}
    print(name, R[name], flush=True)
    return imgs


run(plain, "plain")
imgs = run(chars, "character")
R["ip_adapter_added_per_image_pct"] = round(100 * (R["character"]["s_per_image"] / R["plain"]["s_per_image"] - 1), 2)
# the set metric: pairwise cosine over the scenes' CLIP embeddings (768 wide, as the aesthetic CLIP's)
emb = torch.randn(args.images, 768).tolist()
t = time.perf_counter()
for _ in range(100):
    character_consistency([["girl"]] * args.images, emb)
R["character_consistency_ms"] = round((time.perf_counter() - t) * 10, 3)
print("summary", {k: R[k] for k in ("ip_adapter_load_and_encode_s", "ip_adapter_added_per_image_pct",
                                    "character_consistency_ms")}, flush=True)
write(out, "characters.json", R)
