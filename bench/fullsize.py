#!/usr/bin/env python3
"""Random-weight model folders laid out exactly as the real downloads, for `storyc build` on a GPU machine.

    python3 bench/fullsize.py OUT_DIR [--scale full|tiny] [--device cuda]

writes OUT_DIR/kolors/Kolors, OUT_DIR/sdxl-vae-fp16-fix and OUT_DIR/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE.
Where each layout comes from:
- Kwai-Kolors/Kolors: the files DiffSynth-Studio 1.1.9 downloads for it (diffsynth/configs/model_config.py,
  preset "Kolors"): text_encoder/config.json, text_encoder/pytorch_model.bin.index.json,
  text_encoder/pytorch_model-0000{1..7}-of-00007.bin (ChatGLM3-6B in fp16, transformers' sharded .bin layout),
  unet/diffusion_pytorch_model.safetensors (+ unet/config.json, as in the repository), vae/diffusion_pytorch_model.safetensors
  (diffusers AutoencoderKL keys). ChatGLM's config is the Kolors text encoder's (28 layers, hidden 4096, ffn 13696,
  multi-query with 2 groups, vocab 65024); the UNet config is Kolors' (storyc.models.kolors.KOLORS_UNET plus the
  diffusers fields of the repository's unet/config.json).
- AI-ModelScope/sdxl-vae-fp16-fix (mirror of madebyollin/sdxl-vae-fp16-fix): config.json +
  diffusion_pytorch_model.safetensors, fp32 (the shipped file is 335 MB = 83.7 M parameters x 4 bytes).
- AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE (shunk031's simple-aesthetics-predictor
  model): config.json (CLIP ViT-L/14 vision tower + linear head), pytorch_model.bin (fp32), the CLIP processor
  files (preprocessor_config.json at 224 px, tokenizer files).
`--scale tiny` writes the same files and names with tiny widths (what the CPU test loads through storyc's own
loaders). Weights are random (speed does not depend on their values); seeds are fixed.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KOLORS_TEXT = dict(num_layers=28, hidden_size=4096, ffn_hidden_size=13696, kv_channels=128, num_attention_heads=32,
                   multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=65024, seq_length=32768,
                   original_rope=True, use_cache=True)
KOLORS_UNET_DIFFUSERS = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 5632,
    "encoder_hid_dim": 4096, "encoder_hid_dim_type": "text_proj", "norm_num_groups": 32,
}
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
               patch_size=14, projection_dim=768)


def _init_(model, seed: int, device: str):
    """Random weights the way bench/common.py builds them: N(0, 0.02) matrices, zero biases, unit norms."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02, generator=g)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def write_text_encoder(folder: Path, scale: str, device: str, seed: int = 1):
    import torch
    from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel

    if scale == "tiny":
        from storyc.models.tiny import _glm_config

        cfg = _glm_config()
        shard = "2MB"
    else:
        cfg = ChatGLMConfig(**KOLORS_TEXT, architectures=["ChatGLMModel"], torch_dtype="float16")
        shard = "2GB"  # 12.5 GB of fp16 weights -> 7 shards, as shipped
    with torch.device(device):
        model = ChatGLMModel(cfg)
    model = model.to(device=device, dtype=torch.float16)  # skip_init may leave parameters on the CPU
    _init_(model, seed, device)
    model.save_pretrained(folder, safe_serialization=False, max_shard_size=shard)
    return sorted(p.name for p in folder.iterdir())


def write_unet(folder: Path, scale: str, device: str, seed: int = 2):
    import torch
    from diffusers import UNet2DConditionModel

    from storyc.models.tiny import TINY_UNET

    cfg = {k: v for k, v in (TINY_UNET if scale == "tiny" else KOLORS_UNET_DIFFUSERS).items() if not k.startswith("_")}
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg)
    unet = unet.to(device=device, dtype=torch.float16)
    _init_(unet, seed, device)
    unet.save_pretrained(folder, safe_serialization=True)


def write_vae(folder: Path, device: str, dtype: str, seed: int = 3):
    import torch
    from diffusers import AutoencoderKL

    from storyc.models.tiny import SDXL_VAE

    with torch.device(device):
        vae = AutoencoderKL(**{k: v for k, v in SDXL_VAE.items() if not k.startswith("_")})
    with torch.no_grad():  # diffusers' own init, scaled so random activations stay finite through 4 levels
        for p in vae.parameters():
            if p.dim() > 1:
                p.mul_(0.5)
    vae.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)


def write_aesthetic(folder: Path, scale: str, device: str, seed: int = 4):
    import torch
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    from storyc.models import tiny

    if scale == "tiny":
        tiny._build_aesthetic(folder, seed)
        (folder / "model.safetensors").unlink()
        torch.manual_seed(seed)
        cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=64, patch_size=32, projection_dim=32)
        AestheticsPredictorV2Linear(cfg).save_pretrained(folder, safe_serialization=False)
        return
    torch.manual_seed(seed)
    with torch.device(device):
        model = AestheticsPredictorV2Linear(CLIPVisionConfig(**VIT_L14))
    model.save_pretrained(folder, safe_serialization=False)  # pytorch_model.bin, fp32, as shipped
    tiny.write_clip_processor(folder, CLIPImageProcessor())  # 224 px, as shipped


def write_all(out: Path, scale: str = "full", device: str = "cuda") -> dict:
    out = Path(out)
    plan = [
        ("kolors/Kolors/text_encoder", lambda f: write_text_encoder(f, scale, device)),
        ("kolors/Kolors/unet", lambda f: write_unet(f, scale, device)),
        ("kolors/Kolors/vae", lambda f: write_vae(f, device, "float16")),
        ("sdxl-vae-fp16-fix", lambda f: write_vae(f, device, "float32")),
        ("aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE", lambda f: write_aesthetic(f, scale, device)),
    ]
    return write_folders(out, plan, f"random weights, {scale} scale, written by bench/fullsize.py", device)


def write_folders(out: Path, plan: list, note: str, device: str = "cuda") -> dict:
    """Write each (relative folder, writer) of ``plan`` under ``out`` once: into a .partial folder, marked
    .complete, then renamed. Returns seconds per folder; a folder already complete is skipped."""
    times = {}
    for rel, fn in plan:
        folder = out / rel
        if (folder / ".complete").exists():
            continue
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t = time.perf_counter()
        fn(tmp)
        (tmp / ".complete").write_text(note + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        times[rel] = round(time.perf_counter() - t, 1)
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--scale", choices=("full", "tiny"), default="full")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    times = write_all(Path(a.out), a.scale, a.device)
    for rel, s in times.items():
        size = sum(p.stat().st_size for p in (Path(a.out) / rel).rglob("*") if p.is_file())
        print(f"wrote {rel}: {size / 2**30:.2f} GiB in {s} s", flush=True)


if __name__ == "__main__":
    main()
