"""refine: the hi-res pass of DiffSynth's Kolors example (1024 -> 2048, img2img at strength 0.4), per scene.

The generated image is upscaled (Lanczos, or Real-ESRGAN x4 then Lanczos down to the refined size), encoded with the Kolors VAE, noised to the refine strength's first
timestep with the scene's own seed, and denoised again with the scene's prompts and the LoRA merged at the
generation's strength: the same steps as DiffSynth's ``SDXLImagePipeline(input_image=..., denoising_strength=...)``,
with the prompt embeddings encoded once for every scene (ChatGLM released before the UNet loads) and the loop
shared with generation. One difference by default: guidance only in SD-XL's guidance interval (``guidance_interval``;
the last, least noisy steps run the positive prompt alone, at about half the cost). Tiled VAE encode/decode when the
memory planner (or the spec) asks for it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .. import resources
from ..render import atomic_write, canonical_json
from ._quiet import quiet_libraries
from .generate import (cached_encoder, denoise, encode_all, ip_kwargs, load_characters, merged_pipeline,
                       prefetch_unet, save_png)
from .registry import Result


def refined_size(w: int, h: int, scale: float) -> tuple[int, int]:
    """The refined size: scale x the image, in multiples of 32 (the UNet halves the 1/8 latent twice)."""
    return max(32, round(w * scale / 32) * 32), max(32, round(h * scale / 32) * 32)


def refine_image(pipe, image, size: tuple, r: dict, seed: int, prompt: str, negative: str, encode, tiled: bool,
                 each_step=None, ip=None):
    """One image through the refine pass (what DiffSynth's pipeline does with ``input_image`` and
    ``denoising_strength``): Lanczos to ``size``, VAE-encode, noise to the strength's first timestep with ``seed``,
    denoise with classifier-free guidance (in ``r["guidance_interval"]`` when set), decode. ``encode(pipe,
    positives, negatives)`` gives the embeddings;
    ``ip``: the scene's characters (IP-Adapter keys and values), as generate drew them."""
    out = _redraw(pipe, upscaled(pipe, image, size), r, seed, prompt, negative, encode, tiled, each_step, ip)
    return pipe.vae_output_to_image(out)


def refine_many(pipe, items: list, encode, finish=None):
    """:func:`refine_image` over ``items`` (dicts of its arguments after ``pipe``: image, size, r, seed, prompt,
    negative, tiled, each_step, ip), yielding ``(index, finish(index, image))`` in order, the same images.
    The CPU's part runs on threads beside the GPU's: the next item's Lanczos upscale and tensor conversion while
    this one denoises; the conversion to a PIL image and ``finish`` (the stage writes its files there) while the
    next denoises (at 2048 px ~0.3 s an image, and a PNG, that the GPU would otherwise wait for). The UNet's CUDA
    graphs are captured once for all the scenes of a shape, not once a scene."""
    from concurrent.futures import ThreadPoolExecutor

    def after(i, out):
        image = pipe.vae_output_to_image(out)
        return finish(i, image) if finish else image

    if not items:
        return
    calls = {}  # the UNet's CUDA graphs, captured at the first scene and replayed for the others of its shapes
    with ThreadPoolExecutor(1) as pre, ThreadPoolExecutor(1) as post:
        nxt = pre.submit(upscaled, pipe, items[0]["image"], items[0]["size"])
        pending = []
        for i, it in enumerate(items):
            x = nxt.result()
            if i + 1 < len(items):
                nxt = pre.submit(upscaled, pipe, items[i + 1]["image"], items[i + 1]["size"])
            out = _redraw(pipe, x, it["r"], it["seed"], it["prompt"], it["negative"], encode, it["tiled"],
                          it.get("each_step"), it.get("ip"), calls).cpu()  # waits for this image's GPU work only
            pending.append((i, post.submit(after, i, out)))
            while pending and pending[0][1].done():  # finished ones, without waiting for the others
                j, f = pending.pop(0)
                yield j, f.result()
        for j, f in pending:
            yield j, f.result()


def upscaled(pipe, image, size: tuple):
    """The image at the refined size (Lanczos), as the VAE encoder's input tensor on the CPU."""
    from PIL import Image

    return pipe.preprocess_image(image.resize(tuple(size), Image.LANCZOS))


def _redraw(pipe, x, r: dict, seed: int, prompt: str, negative: str, encode, tiled: bool, each_step=None, ip=None,
            calls=None):
    """The GPU's part of a refine: the upscaled image ``x`` encoded, noised, denoised and decoded (the decoder's
    output tensor). ``calls``: denoise's graphs, kept from one scene to the next."""
    import torch

    h, w = x.shape[-2:]
    tiled = tiled and min(w, h) >= 512  # the VAE's tiles are 512 px: a smaller image is one tile anyway
    with torch.no_grad():
        pipe.scheduler.set_timesteps(r["steps"], r["strength"])
        x = x.to(device=pipe.device, dtype=pipe.torch_dtype)
        with vae_precision(pipe):
            # contiguous: a channels-last VAE's latents would carry that layout into the UNet's calls
            latents = pipe.encode_image(x, tiled=tiled).to(pipe.torch_dtype).contiguous()
        noise = pipe.generate_noise((1, 4, h // 8, w // 8), seed=seed, device=pipe.device, dtype=pipe.torch_dtype)
        latents = pipe.scheduler.add_noise(latents, noise, timestep=pipe.scheduler.timesteps[0])
        cfg = r["cfg_scale"]
        ehs, ate = encode(pipe, [prompt], [negative] if cfg != 1.0 else [])
        latents = denoise(pipe, latents, ehs, ate, cfg, each_step, ip, calls=calls,
                          interval=r.get("guidance_interval"))
        with vae_precision(pipe):  # what pipe.decode_image does before its conversion to a PIL image
            return pipe.vae_decoder(latents.to(pipe.device), tiled=tiled, tile_size=64, tile_stride=32)


def vae_precision(pipe):
    """The VAE at a refine's size in bf16 on a GPU (it is kept in fp32, where a 2048-px image and the attention
    over its 65k latent pixels take seconds; bf16 has fp32's range, so none of fp16's overflow), as it is on the
    CPU otherwise."""
    return _bf16_on_gpu(pipe.device)


def _bf16_on_gpu(device):
    import contextlib

    import torch

    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def esrgan_upscale(folder: Path, images: list, device: str) -> list:
    """Real-ESRGAN x4 through DiffSynth (its ModelManager recognises RealESRGAN_x4.pth, its ESRGAN extension
    runs it), one image at a time, bf16 on a GPU; the model is released before the UNet loads."""
    import torch
    from diffsynth import ModelManager
    from diffsynth.extensions.ESRGAN import ESRGAN

    mm = ModelManager(torch_dtype=torch.float32, device=device)
    mm.load_model(str(Path(folder) / "RealESRGAN_x4.pth"))
    esrgan = ESRGAN.from_model_manager(mm)
    out = []
    for im in images:  # ESRGAN.upscale's steps, the forward under autocast and its output back in fp32 for numpy
        x = esrgan.process_images([im]).to(device)
        with torch.no_grad(), _bf16_on_gpu(device):
            y = esrgan.model(x)
        out += esrgan.decode_images(y.float().cpu())
    del esrgan, mm
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def run(ctx, jobs):
    from PIL import Image

    quiet_libraries()
    res = resources.for_generate(ctx.device)
    kolors = ctx.model("kolors")
    lora = ctx.output("train", f"{ctx.story.id}.diffsynth.safetensors")
    strength = jobs[0].params["lora_strength"]  # the same for every scene of a plan
    scenes = []
    for job in jobs:
        gen = f"generate[{job.scene}]"
        rec = json.loads(ctx.output(gen, ".json").read_text("utf-8"))  # what generate rendered: the chosen seed
        scenes.append((job, rec, ctx.output(gen, ".png")))
    items = [{"prompt": j.params["prompt"], "negative_prompt": j.params["negative_prompt"]} for j, _, _ in scenes]
    cfgs = {j.params["refine"]["cfg_scale"] for j in jobs}
    big = [j.name for j in jobs if j.params["refine"]["upscaler"] == "esrgan"]
    # with ESRGAN to run first the UNet is read after it (never its weights beside ESRGAN's 4x activations)
    unet_state = (lambda: None) if big else prefetch_unet(ctx, res, kolors, "refine")
    t = time.monotonic()
    guided = next((c for c in cfgs if c != 1.0), 1.0)  # negatives are encoded when any scene's guidance uses them
    table = encode_all(kolors, items, guided, res.torch_dtype(), res.device, ctx)  # then ChatGLM is freed
    ctx.metric("refine.text_encoder_load_and_encode_s", time.monotonic() - t)
    sources = {}
    for job, _, src in scenes:
        with Image.open(src) as im:
            sources[job.name] = im.convert("RGB")
    if big:  # enlarged 4x before the UNet loads; refine_image then brings them to the refined size (Lanczos)
        t = time.monotonic()
        for name, im in zip(big, esrgan_upscale(ctx.model("esrgan"), [sources[n] for n in big], res.device)):
            sources[name] = im
        ctx.metric("refine.esrgan_s", time.monotonic() - t)
    t = time.monotonic()
    pipe = merged_pipeline(ctx, kolors, lora, strength, res, vae_encoder=True, unet_state=unet_state())
    ctx.metric("refine.load_s", time.monotonic() - t)
    encode = cached_encoder(table)
    drawn = {}  # scene -> its characters' IP-Adapter tokens, as generate conditions it
    if any("characters" in j.params for j, _, _ in scenes):
        t = time.monotonic()
        drawn = {j.name: {"characters": j.params["characters"]} for j, _, _ in scenes if "characters" in j.params}
        load_characters(ctx.model("ip_adapter"), pipe, list(drawn.values()), ctx.story.root,
                        ctx.fingerprint("ip_adapter"))
        ctx.metric("refine.ip_adapter_load_and_encode_s", time.monotonic() - t)
    t_all = time.monotonic()
    items = []
    # UNet calls: DiffSynth's img2img runs all its steps over the redrawn part (as many as it has timesteps)
    calls = [min(j.params["refine"]["steps"], max(1, round(pipe.scheduler.num_train_timesteps *
                                                          j.params["refine"]["strength"]))) for j, _, _ in scenes]
    for i, (job, rec, src) in enumerate(scenes):
        r = job.params["refine"]
        size = refined_size(rec["width"], rec["height"], r["scale"])
        tiled, why = resources.plan_refine(resources.free_gib(res.device), job.settings["tile"], *size)
        if i == 0:
            ctx.report.info(f"     refine: {why}")
        done = sum(calls[:i])
        items.append({"image": sources[job.name], "size": size, "r": r, "seed": rec["seed"],
                      "prompt": job.params["prompt"], "negative": job.params["negative_prompt"], "tiled": tiled,
                      "each_step": lambda k, d=done: ctx.report.update(d + k + 1, sum(calls), "refining"),
                      "ip": ip_kwargs(pipe, [drawn[job.name]], r["cfg_scale"]) if job.name in drawn else None})

    def finish(i, image):  # on refine_many's thread, while the GPU draws the next scene
        job, rec, _ = scenes[i]
        w, h = items[i]["size"]
        save_png(image, ctx.path(job.params["file"]))
        meta = str(Path(job.params["file"]).with_suffix(".json"))
        atomic_write(ctx.path(meta), canonical_json({**rec, "width": w, "height": h, "refine": job.params["refine"]}))
        return Result(job.name, [job.params["file"], meta], {"size": [w, h], "tiled": items[i]["tiled"]})

    for _, result in refine_many(pipe, items, encode, finish):
        yield result
    ctx.metric("refine.render_s", time.monotonic() - t_all)
    return f"{len(scenes)} scene(s) refined on {res.device}"
