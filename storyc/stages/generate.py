"""generate: render every stale scene with diffsynth's Kolors pipeline and the trained LoRA merged in.

Fast path (same function as the notebook's pipeline call at the same seed, to float tolerance):
- the LoRA is merged into the UNet weights once (alpha/rank * lora_scale): no per-step adapter overhead;
- scenes are rendered in batches and classifier-free guidance is batched with them: one UNet call per step
  for 2 x batch samples instead of two batch-1 calls per image;
- each scene's starting noise comes from its own seed (diffsynth's generate_noise), so an image depends on
  its seed alone, never on batch size, order or GPU count.
With several GPUs, scenes are sharded across them as Ray tasks (one pipeline per GPU).
"""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

from .. import resources
from ..errors import StageError
from ..render import atomic_write, canonical_json
from ._quiet import quiet_libraries, silent_stdout
from .registry import GEN_COMMON, Result


def lora_file(ctx) -> Path:
    return ctx.path(f"lora/{ctx.story.id}.diffsynth.safetensors")


def load_merged_pipeline(kolors: Path, lora_path: Path | None, strength: float, dtype, device,
                         text_encoder: bool = True, vae_encoder: Path | None = None, unet_state: dict | None = None):
    """Kolors pipeline with the LoRA merged into the UNet at ``strength`` (= alpha/rank * lora_scale)."""
    from .. import lora as L
    from ..models.kolors import load_pipeline

    with silent_stdout():
        pipe = load_pipeline(kolors, dtype, device, text_encoder=text_encoder, vae_encoder=vae_encoder,
                             unet_state=unet_state)
    if lora_path is not None and strength:
        state, _ = L.load(lora_path)
        if not L.merge(pipe.unet, state, strength):
            raise StageError("generate", f"{lora_path.name} holds no LoRA weights for this UNet")
    return pipe


def merged_pipeline(ctx, kolors: Path, lora_path: Path, strength: float, res, vae_encoder: bool = False,
                    unet_state: dict | None = None):
    """The pipeline generate and refine render with (no text encoder: prompts come from ``encode_all``): loaded
    for this stage (from ``unet_state`` where prefetch_unet read it), or under `storyc watch` the one held between
    builds for this Kolors, LoRA and strength (with the VAE encoder, so refine shares it)."""
    from .. import resident

    enc = Path(kolors) / "vae" / "diffusion_pytorch_model.safetensors"
    if not resident.enabled():
        return load_merged_pipeline(kolors, lora_path, strength, res.torch_dtype(), res.device, text_encoder=False,
                                    vae_encoder=enc if vae_encoder else None, unet_state=unet_state)
    key = (str(kolors), ctx.fingerprint("kolors"), ctx.hasher.file(lora_path), strength, str(res.torch_dtype()),
           res.device)
    return resident.get("pipeline", key, lambda: load_merged_pipeline(
        kolors, lora_path, strength, res.torch_dtype(), res.device, text_encoder=False, vae_encoder=enc))


def prefetch_unet(ctx, res, kolors: Path, stage: str):
    """Start reading the UNet's weights file onto the device, on a thread, before diffsynth is imported: the read
    and the copy leave Python's lock free while the import (~8 s in a new process on an H200 host) and ChatGLM's
    load hold it. Only where resources.plan_loads finds room for those weights beside ChatGLM, and not under
    `storyc watch` (it holds the pipeline). Returns a function giving the tensors (None: not prefetched)."""
    from .. import resident

    weights = Path(kolors) / "unet" / "diffusion_pytorch_model.safetensors"
    if resident.enabled() or not weights.is_file():
        return lambda: None
    both, _ = resources.plan_loads(resources.free_gib(res.device), weights.stat().st_size / 2 ** 30)
    ctx.metric(f"{stage}.unet_prefetched", int(both))
    if not both:
        return lambda: None
    from concurrent.futures import ThreadPoolExecutor

    def read():
        from safetensors.torch import load_file

        t = time.monotonic()
        state = load_file(str(weights), device=str(res.device))
        ctx.metric(f"{stage}.unet_read_s", time.monotonic() - t)
        return state

    pool = ThreadPoolExecutor(1, thread_name_prefix="storyc-unet")
    pending = pool.submit(read)
    pool.shutdown(wait=False)
    return pending.result


def render(pipe, items: list[dict], gen: dict, batch_size: int, progress=None):
    """Render items [{prompt, negative_prompt, seed}] -> list of PIL images, batched with CFG."""
    return list(render_iter(pipe, items, gen, batch_size, progress))


TEXT_CACHE_VERSION = 1


def encode_all(kolors: Path, items: list[dict], cfg_scale: float, dtype, device, ctx=None) -> dict:
    """Every distinct prompt of ``items`` through ChatGLM, then ChatGLM is released: the 12 GB text encoder and
    the UNet are never on the GPU together. Returns (sign, text) -> (hidden states, pooled) on the CPU.

    With a build context, embeddings are cached by content (the text, positive or negative, the Kolors weights, the
    dtype and device kind) in the project's cache, sealed: a prompt already encoded is read back, and when every
    prompt is, ChatGLM is not even loaded (11 s of a one-scene edit on an H200). Each prompt is encoded on its own,
    so its embedding never depends on which other prompts were encoded with it (batched kernels may differ in the
    last bits): an edited scene renders exactly as in a cold build."""
    import torch

    wanted = [("+", t) for t in sorted({it["prompt"] for it in items})]
    if cfg_scale != 1.0:
        wanted += [("-", t) for t in sorted({it["negative_prompt"] for it in items})]
    paths = {}
    if ctx is not None:
        from .. import cache
        from ..lock import digest

        kolors_fp = ctx.fingerprint("kolors")
        for w in wanted:
            k = digest({"v": TEXT_CACHE_VERSION, "sign": w[0], "text": w[1], "kolors": kolors_fp, "dtype": str(dtype),
                        "device": str(device).split(":")[0]})
            paths[w] = ctx.cache_dir / "prompts" / f"{k}.safetensors"
        todo = [w for w in wanted if not cache.file_ok(paths[w], ctx.report)]
        ctx.metric("prompts_encoded", ctx.metrics.get("prompts_encoded", 0) + len(todo))
    else:
        todo = wanted
    out = {}
    if todo:
        from .. import resident

        prompter = _prompter(kolors, ctx.fingerprint("kolors") if ctx is not None else None, dtype, device)
        if resident.enabled() and str(device).startswith("cuda"):  # parked on the CPU on a small card (its 12 GB
            prompter.text_encoder.to(device)  # are the UNet's room between builds): moved over to encode
        shim = type("Encoder", (), {"prompter": prompter, "device": device})()
        with torch.no_grad():
            for sign, text in todo:
                ehs, ate = encode_prompts(shim, [text] if sign == "+" else [], [text] if sign == "-" else [])
                out[(sign, text)] = (ehs.cpu().contiguous(), ate.cpu().contiguous())
                if ctx is not None:
                    from safetensors.torch import save_file

                    tensors = {"encoder_hidden_states": out[(sign, text)][0], "add_text_embeds": out[(sign, text)][1]}
                    cache.save_file(paths[(sign, text)], lambda tmp, t=tensors: save_file(t, str(tmp)))
        why = _park(prompter, device)
        if why and ctx is not None:
            ctx.report.info(f"     text encoder: {why}")
        del prompter, shim
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    if ctx is not None:
        from safetensors.torch import load_file

        for w in wanted:
            if w not in out:
                t = load_file(str(paths[w]))
                out[w] = (t["encoder_hidden_states"], t["add_text_embeds"])
    return out


def _prompter(kolors: Path, fingerprint: str | None, dtype, device):
    """The Kolors prompter (ChatGLM), under `storyc watch` held between builds under one key (encode_all and warm
    share it)."""
    from .. import resident
    from ..models.kolors import load_prompter

    key = (str(kolors), fingerprint, str(dtype), str(device))
    return resident.get("prompter", key, lambda: load_prompter(Path(kolors), dtype, device))


def _park(prompter, device) -> str | None:
    """Under `storyc watch` on a GPU, where the text encoder waits between builds: on the GPU where the card has
    room beside it, else on the CPU. Returns why (None: nothing held)."""
    from .. import resident

    if not (resident.enabled() and str(device).startswith("cuda")):
        return None
    keep, why = resources.keep_text_encoder(str(device))
    if not keep:
        prompter.text_encoder.to("cpu")
    return why


def cached_encoder(table: dict):
    """An ``encode`` for render_iter that looks prompts up in ``encode_all``'s table."""
    import torch

    def encode(pipe, positive, negative):
        rows = [table[("+", t)] for t in positive] + [table[("-", t)] for t in negative]
        return (torch.cat([r[0] for r in rows]).to(pipe.device, pipe.torch_dtype),
                torch.cat([r[1] for r in rows]).to(pipe.device, pipe.torch_dtype))

    return encode


def load_characters(ip_folder: Path, pipe, items: list[dict], root: Path, fingerprint: str | None = None) -> None:
    """Each item that shows characters gets its IP-Adapter image tokens (``item["ip"]``: positive tokens, the
    negative branch's tokens, one scale per token), from its characters' reference images; the adapter's modules
    are attached to the pipeline (``pipe.ip_adapter``) for the UNet calls."""
    from PIL import Image

    from ..models.ipadapter import IPAdapterPlus

    if not any(it.get("characters") for it in items):
        return
    import torch

    from .. import resident

    def load():
        with silent_stdout():
            return IPAdapterPlus(ip_folder, pipe.unet, pipe.torch_dtype, pipe.device)

    pipe.ip_adapter = resident.get("ip_adapter", (str(ip_folder), fingerprint, str(pipe.torch_dtype),
                                                  str(pipe.device)), load)
    made: dict = {}
    blank = pipe.ip_adapter.uncond_tokens(1)  # the negative branch's tokens of one image: the same for every image
    for it in items:
        rows, neg, scales = [], [], []
        for ch in it.get("characters") or ():
            key = (ch["id"], tuple(ch["references"]))
            if key not in made:
                imgs = []
                for rel in ch["references"]:
                    with Image.open(root / rel) as im:
                        imgs.append(im.convert("RGB"))
                made[key] = pipe.ip_adapter.tokens(imgs), len(imgs)
            tok, n = made[key]
            rows.append(tok)
            neg.append(blank.repeat(n, 1))
            scales.append(torch.full((tok.shape[0],), float(ch["scale"]), device=tok.device))
        if rows:
            it["ip"] = (torch.cat(rows), torch.cat(neg), torch.cat(scales))


def ip_kwargs(pipe, chunk: list[dict], cfg: float):
    """diffsynth's ipadapter_kwargs_list for a batch (positive rows, then the negative ones), None without."""
    if "ip" not in chunk[0]:
        return None
    rows = [it["ip"][0] for it in chunk] + ([it["ip"][1] for it in chunk] if cfg != 1.0 else [])
    scales = [it["ip"][2] for it in chunk] * (2 if cfg != 1.0 else 1)
    return pipe.ip_adapter.unet_kwargs(rows, scales)


def _chunks(items: list[dict], batch_size: int):
    """Batches of at most ``batch_size`` consecutive items that share one IP token count (none, or the same
    number of reference images): one UNet call holds one shape."""
    def tokens(it):
        return it["ip"][0].shape[0] if "ip" in it else 0

    start = 0
    while start < len(items):
        end = start + 1
        while end < len(items) and end - start < batch_size and tokens(items[end]) == tokens(items[start]):
            end += 1
        yield items[start:end]
        start = end


def render_iter(pipe, items: list[dict], gen: dict, batch_size: int, progress=None, encode=None):
    """Yield each item's PIL image as soon as its batch is decoded (so finished scenes can be saved at once).
    ``encode(pipe, positives, negatives)`` gives the prompt embeddings (default: the pipeline's text encoder)."""
    import torch

    h, w, steps, cfg = gen["height"], gen["width"], gen["steps"], gen["cfg_scale"]
    dev, dt = pipe.device, pipe.torch_dtype
    total = len(items) * steps
    done = 0
    for chunk in _chunks(items, batch_size):
        b = len(chunk)
        with torch.no_grad():
            ehs, ate = (encode or encode_prompts)(pipe, [it["prompt"] for it in chunk],
                                                  [it["negative_prompt"] for it in chunk] if cfg != 1.0 else [])
            latents = torch.cat([pipe.generate_noise((1, 4, h // 8, w // 8), seed=it["seed"], device=dev, dtype=dt)
                                 for it in chunk])
            pipe.scheduler.set_timesteps(steps)

            def step(k):
                nonlocal done
                done += b
                if progress:
                    progress(done, total)

            latents = denoise(pipe, latents, ehs, ate, cfg, step, ip_kwargs(pipe, chunk, cfg),
                              interval=gen.get("guidance_interval"))
            decoded = [pipe.decode_image(latents[i:i + 1]) for i in range(b)]
        yield from decoded


def denoise(pipe, latents, ehs, ate, cfg: float, each_step=None, ip=None, graphs: bool = True, calls=None,
            interval=None):
    """The sampling loop over the scheduler's timesteps (as set), classifier-free guidance batched with the
    images: one UNet call per step for 2 x batch rows (the notebook's pipeline makes two calls per image). Shared
    by generation and the refine pass (which starts from a noised image at its strength's first timestep).
    ``interval``: (lo, hi], the noise levels that are guided (see :func:`guided_steps`); the other steps run the
    positive rows alone, one UNet call for batch rows. ``ip``: IP-Adapter keys and values per cross-attention
    (characters): the UNet runs through diffsynth's ``lets_dance_xl``, its one entry point that passes them to the
    attention blocks. On a GPU without characters the calls after the first replay a CUDA graph of it (``graphs``;
    see _GraphedCall), one graph for the guided calls and one for the others. ``calls``: a dict that keeps those
    graphs for the next loops of the same shapes (the refine's scenes), which then only replay."""
    import torch

    b, dev = latents.shape[0], pipe.device
    h, w = latents.shape[2] * 8, latents.shape[3] * 8
    guided = guided_steps(pipe.scheduler, cfg, interval)
    phases = {}

    def phase(g: bool):  # the UNet call and its inputs for guided (2 x batch rows) or unguided steps
        if g not in phases:
            rows = 2 * b if g else b
            e, a, ipg = (ehs, ate, ip) if g else (ehs[:b], ate[:b], _first_rows(ip, b))
            tid = torch.tensor([h, w, 0, 0, h, w], device=dev).repeat(rows)
            unet = _unet_call(pipe, ipg)
            # graphed on a GPU, where measured (bench/RESULTS.md, sample graphs): not yet through the IP-Adapter's
            # entry point; a phase of one or two calls only when its graph is kept for the next loops
            graphed = (graphs and ipg is None and str(dev).startswith("cuda")
                       and (guided.count(g) > 2 or calls is not None))
            call = _GraphedCall(unet) if graphed else unet
            if graphed and calls is not None:
                call = calls.setdefault((tuple(latents.shape), rows, tuple(e.shape), tuple(a.shape), latents.dtype),
                                        call)
            phases[g] = (call, e, tid, a)
        return phases[g]

    for k, t in enumerate(pipe.scheduler.timesteps):
        timestep = t.unsqueeze(0).to(dev)
        call, e, tid, a = phase(guided[k])
        pred = call(torch.cat([latents, latents]) if guided[k] else latents, timestep, e, tid, a)
        if guided[k]:
            posi, nega = pred[:b], pred[b:]
            pred = nega + cfg * (posi - nega)
        latents = pipe.scheduler.step(pred, timestep, latents)
        if each_step:
            each_step(k)
    return latents


# Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in
# Diffusion Models": their Stable Diffusion XL setting (also ComfyUI's GuidanceLimiter default). The refine's default.
SDXL_GUIDANCE_INTERVAL = (0.28, 5.42)


def guided_steps(scheduler, cfg: float, interval=None) -> list[bool]:
    """Which of the scheduler's timesteps (as set) run classifier-free guidance: none at cfg 1, every one without an
    ``interval``, else those whose noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) is in (lo, hi]. Guidance
    harms at high noise and does little at low noise (the paper above); an unguided step costs about half a guided
    one (0.50-0.54x at 2048² on an H200, replayed from a CUDA graph: bench/RESULTS.md).
    sigma is the schedule's noise-to-signal ratio, so an interval means the same noise levels under Kolors' 1100-step
    schedule as under SD-XL's 1000."""
    n = len(scheduler.timesteps)
    if cfg == 1.0:
        return [False] * n
    if interval is None:
        return [True] * n
    lo, hi = interval
    out = []
    for t in scheduler.timesteps:
        a = scheduler.alphas_cumprod[int(t)]
        out.append(lo < ((1 - a) / a) ** 0.5 <= hi)
    return out


def _first_rows(ip, b: int):
    """IP-Adapter keys and values of the positive rows only (an unguided step's)."""
    if ip is None:
        return None
    return {blk: {t: {**d, "ip_k": d["ip_k"][:b], "ip_v": d["ip_v"][:b]} for t, d in by_t.items()}
            for blk, by_t in ip.items()}


def _unet_call(pipe, ip):
    """The UNet as denoise calls it: the pipeline's, or through ``lets_dance_xl`` with IP-Adapter keys and values."""
    if ip is None:
        return pipe.unet
    from diffsynth.pipelines.dancer import lets_dance_xl

    def unet(x, timestep, encoder_hidden_states, add_time_id, add_text_embeds):
        return lets_dance_xl(pipe.unet, sample=x, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                             add_time_id=add_time_id, add_text_embeds=add_text_embeds, ipadapter_kwargs_list=ip,
                             unet_batch_size=x.shape[0], device=x.device)

    return unet


class _GraphedCall:
    """One sampling loop's UNet calls, the first run eagerly and every later one replayed from a CUDA graph captured
    at the second: a batch-1 call launches thousands of small kernels and, on a slow host CPU, the GPU waits between
    them (a one-image render took 4.1-5.3 s on one H200 host, 2.8-3.6 s on another). The graph replays the same
    kernels on the same inputs, copied into its static buffers; its output buffer is read before the next replay.
    A capture that fails (an operation a graph cannot hold) leaves the loop eager."""

    def __init__(self, unet):
        self.unet, self.graph, self.calls = unet, None, 0

    def __call__(self, x, timestep, ehs, tid, ate):
        import torch

        self.calls += 1
        if self.graph is False:
            return self.unet(x, timestep=timestep, encoder_hidden_states=ehs, add_time_id=tid, add_text_embeds=ate)
        if self.calls == 1:  # warm cuDNN and cuBLAS up on the stream the capture will use (PyTorch's rule for it)
            self.stream = torch.cuda.Stream()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = self.unet(x, timestep=timestep, encoder_hidden_states=ehs, add_time_id=tid, add_text_embeds=ate)
            torch.cuda.current_stream().wait_stream(self.stream)
            out.record_stream(torch.cuda.current_stream())
            return out
        if self.graph is None:
            self.inputs = [a.clone() for a in (x, timestep, ehs, tid, ate)]
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    xi, ti, ei, di, ai = self.inputs
                    self.out = self.unet(xi, timestep=ti, encoder_hidden_states=ei, add_time_id=di, add_text_embeds=ai)
            except Exception as e:  # noqa: BLE001 - any capture failure: the eager loop is still right
                import warnings

                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); sampling eagerly", stacklevel=2)
                self.graph = False
                return self.unet(x, timestep=timestep, encoder_hidden_states=ehs, add_time_id=tid, add_text_embeds=ate)
            self.graph = graph
        for static, a in zip(self.inputs, (x, timestep, ehs, tid, ate)):
            if static.data_ptr() != a.data_ptr():
                static.copy_(a)
        self.graph.replay()
        return self.out


def encode_prompts(pipe, positive: list[str], negative: list[str]):
    """ChatGLM embeddings of every prompt in one text-encoder call (positives first, then negatives).

    The same as the pipeline's one-prompt encode_prompt per prompt: Kolors pads every prompt to 256 tokens, so
    the rows of the batch are independent.
    """
    pr = pipe.prompter  # KolorsPrompter: storyc's pipelines are always in Kolors mode
    texts = [pr.process_prompt(t, positive=True) for t in positive] + [pr.process_prompt(t, positive=False) for t in negative]
    # 256 tokens and hidden state -2, as SDXLImagePipeline.encode_prompt asks of the Kolors prompter
    return pr.encode_prompt_using_ChatGLM(texts, pr.text_encoder, pr.tokenizer, 256, 2, pipe.device)


def warm(ctx, jobs) -> list[str]:
    """`storyc watch` between builds: load what the next build of these scenes loads first (the text encoder and
    the merged pipeline), held by storyc.resident with the keys ``run`` uses, so that the first edit after a
    build that loaded nothing pays no load. Returns what it loaded now."""
    from .. import resident

    if not (resident.enabled() and jobs):
        return []
    res = resources.for_generate(ctx.device)
    lpath = lora_file(ctx)
    if not lpath.exists():  # no LoRA trained yet: a build will say so
        return []
    kolors = ctx.model("kolors")
    before = {role: resident.held(role) for role in ("prompter", "pipeline")}
    _park(_prompter(kolors, ctx.fingerprint("kolors"), res.torch_dtype(), res.device), res.device)
    merged_pipeline(ctx, kolors, lpath, jobs[0].params["lora_strength"], res)
    names = {"prompter": "text encoder", "pipeline": "pipeline"}
    return [names[role] for role, old in before.items() if resident.held(role) is not old]


def run(ctx, jobs):
    quiet_libraries()
    gen = {k: jobs[0].params[k] for k in GEN_COMMON}  # the same for every scene of a plan
    gen["guidance_interval"] = jobs[0].params.get("guidance_interval")
    todo = [{"id": j.scene, "name": j.name, "index": j.settings["index"], "lora_scale": j.settings["lora_scale"],
             "characters": j.params.get("characters"),
             **{k: j.params[k] for k in ("prompt", "negative_prompt", "seeds", "file")}} for j in jobs]
    res = resources.for_generate(ctx.device)
    kolors = ctx.model("kolors")
    lpath = lora_file(ctx)
    if not lpath.exists():
        raise StageError("generate", f"{ctx.story.rel(lpath)} is missing", "run the train stage first")
    lora_sha = ctx.hasher.file(lpath)
    items = [{"scene": s["id"], "prompt": s["prompt"], "negative_prompt": s["negative_prompt"], "seed": seed,
              **({"characters": s["characters"]} if s["characters"] else {})} for s in todo for seed in s["seeds"]]
    ip_folder = ctx.model("ip_adapter") if any(s["characters"] for s in todo) else None
    shards = resources.gpu_count(res.device)
    sharded = shards > 1 and len(items) > 1
    unet_state = (lambda: None) if sharded else prefetch_unet(ctx, res, kolors, "generate")  # first: it overlaps
    _warn_truncation(ctx, todo)
    memory = None
    scorer = None
    if gen["candidates"] > 1:
        from .score import Scorer

        scorer = Scorer(ctx.model("aesthetic"), resources.for_score(res.device))
        if "clip_zh" in jobs[0].params:  # generation.select weighs prompt alignment: a Chinese CLIP ranks too
            from .score import Aligner

            scorer.aligner = Aligner(ctx.model("clip_zh"), resources.for_score(res.device).device)
        scorer.weights = jobs[0].params.get("select")  # None: the aesthetic score alone, as before
        if "preference" in jobs[0].params:  # and DiffSynth's preference models it weighs
            from ..models.preference import Preference

            scorer.preference = {k: Preference(k, ctx.model(k), resources.for_score(res.device).device)
                                 for k in jobs[0].params["preference"]}
    pending = {s["id"]: [] for s in todo}
    by_scene = {s["id"]: s for s in todo}

    if sharded:
        rendered = _render_ray(ctx, kolors, lpath, gen, items, shards, jobs[0].settings["batch_size"], ip_folder)
    else:
        t = time.monotonic()
        table = encode_all(kolors, items, gen["cfg_scale"], res.torch_dtype(), res.device, ctx)  # ChatGLM then freed
        ctx.metric("generate.text_encoder_load_and_encode_s", time.monotonic() - t)
        t = time.monotonic()
        pipe = merged_pipeline(ctx, kolors, lpath, gen["lora_strength"], res, unet_state=unet_state())
        ctx.metric("generate.unet_vae_load_and_merge_s", time.monotonic() - t)
        if ip_folder is not None:
            t = time.monotonic()
            load_characters(ip_folder, pipe, items, ctx.story.root, ctx.fingerprint("ip_adapter"))
            ctx.metric("generate.ip_adapter_load_and_encode_s", time.monotonic() - t)
        batch, why = resources.plan_generate(resources.free_gib(res.device), jobs[0].settings["batch_size"],
                                             gen["width"], gen["height"], len(items))
        ctx.report.info(f"     generate: {why}")
        memory = {"batch_size": batch}
        progress = lambda d, t: ctx.report.update(d, t, "denoising")  # noqa: E731
        rendered = zip(items, render_iter(pipe, items, gen, batch, progress, cached_encoder(table)))
    t = time.monotonic()
    for item, image in rendered:  # save and record a scene as soon as all its candidates are rendered
        pending[item["scene"]].append((item, image))
        s = by_scene[item["scene"]]
        if len(pending[s["id"]]) == len(s["seeds"]):
            yield _finish_scene(ctx, gen, s, pending.pop(s["id"]), scorer, lora_sha, memory)
    ctx.metric("generate.render_s", time.monotonic() - t)
    ctx.metric("generate.images", len(items))
    return f"{len(todo)} scene(s), {len(items)} image(s) on {res.device}" + (f", {shards} Ray shards" if shards > 1 else "")


def _finish_scene(ctx, gen, s, cands, scorer, lora_sha, memory=None) -> Result:
    chosen_seed, cand_scores = s["seeds"][0], None
    ranked = {}
    if scorer is not None:
        folder = ctx.path("images/candidates")
        scores, embeds = scorer.score_and_embed([img for _, img in cands])
        cand_scores = {}
        for (it, img), sc in zip(cands, scores):
            save_png(img, folder / f"{Path(s['file']).stem}-s{it['seed']}.png")
            cand_scores[str(it["seed"])] = round(sc, 6)
        objective = scores
        w = scorer.weights
        if w:  # generation.select: a weighted sum of the aesthetic score, the prompt alignment, ...
            align = (scorer.aligner.align([img for _, img in cands], [s["prompt"]] * len(cands))
                     if scorer.aligner else [0.0] * len(cands))
            objective = [w["aesthetic"] * a + w["prompt_alignment"] * p for a, p in zip(scores, align)]
            prefs = {k: m.score([img for _, img in cands], [s["prompt"]] * len(cands))
                     for k, m in scorer.preference.items()}
            for k, vals in prefs.items():
                objective = [o + w[k] * v for o, v in zip(objective, vals)]
            like = None  # a scene without characters ranks as without the weight
            if w.get("character_likeness") and s.get("characters"):
                like = scorer.likeness(embeds, s["characters"], ctx.story.root)
                objective = [o + w["character_likeness"] * v for o, v in zip(objective, like)]
            ranked = {"candidate_objective": {str(it["seed"]): round(o, 6) for (it, _), o in zip(cands, objective)}}
            if scorer.aligner:
                ranked["candidate_alignment"] = {str(it["seed"]): round(p, 6) for (it, _), p in zip(cands, align)}
            if like is not None:
                ranked["candidate_character_likeness"] = {str(it["seed"]): round(v, 6)
                                                          for (it, _), v in zip(cands, like)}
            for k, vals in prefs.items():
                ranked[f"candidate_{k}"] = {str(it["seed"]): round(v, 6) for (it, _), v in zip(cands, vals)}
        best = max(range(len(cands)), key=lambda i: (objective[i], -cands[i][0]["seed"]))
        chosen_seed, image = cands[best][0]["seed"], cands[best][1]
    else:
        image = cands[0][1]
    save_png(image, ctx.path(s["file"]))
    # what was rendered: the scene's hashed values (its caption belongs to the bundle, not to the image)
    rec = {"format": "storyc.scene/1", "scene": s["id"], "index": s["index"], "prompt": s["prompt"],
           "negative_prompt": s["negative_prompt"], "seed": chosen_seed, "steps": gen["steps"],
           "cfg_scale": gen["cfg_scale"], "width": gen["width"], "height": gen["height"],
           "lora_scale": s["lora_scale"], "lora_sha256": lora_sha}
    if gen.get("guidance_interval"):  # only when set: a record without it is as it was
        rec["guidance_interval"] = gen["guidance_interval"]
    if s.get("characters"):  # who it shows and how strongly (the references are in the lock's fingerprints)
        rec["characters"] = [{"id": c["id"], "scale": c["scale"], "references": c["references"]}
                             for c in s["characters"]]
    if cand_scores:
        rec["candidate_scores"] = cand_scores
        rec.update(ranked)
    meta = str(Path(s["file"]).with_suffix(".json"))
    atomic_write(ctx.path(meta), canonical_json(rec))
    facts = {"seed": chosen_seed}
    if memory:
        facts["memory"] = memory  # the planner's choice on this machine (not hashed)
    if cand_scores:
        facts["candidate_scores"] = cand_scores
        facts.update(ranked)
    return Result(s["name"], [s["file"], meta], facts, digest_facts=chosen_seed)


def save_png(img, path: Path):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write(path, buf.getvalue(), "wb")


def _render_ray(ctx, kolors, lpath, gen, items, shards, batch_size, ip_folder=None):
    """Shard items over GPUs as Ray tasks; a scene's image depends only on its seed, so results are equal.

    Uses the Ray cluster this process is connected to, else starts a local one (the GPUs of this machine).
    """
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        started = True
    try:
        use_gpu = shards <= int(ray.cluster_resources().get("GPU", 0))
        task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1)(_shard_task)
        parts = [items[i::shards] for i in range(shards)]
        refs = [task.remote(str(kolors), str(lpath), gen, p, "cuda" if use_gpu else "cpu", batch_size,
                            str(ip_folder) if ip_folder else None, str(ctx.story.root))
                for p in parts if p]
        out = []
        for i, (rendered, where, secs) in enumerate(ray.get(refs)):
            ctx.report.info(f"     shard {i}: {len(rendered)} image(s) on {where} in {secs:.1f}s")
            out.extend(rendered)
    finally:
        if started:
            ray.shutdown()
    from PIL import Image

    order = {(it["scene"], it["seed"]): i for i, it in enumerate(items)}
    res = sorted(((it, Image.open(io.BytesIO(png))) for it, png in out), key=lambda x: order[(x[0]["scene"], x[0]["seed"])])
    return res


def _shard_task(kolors, lpath, gen, items, device, batch_size, ip_folder=None, root=None):
    import socket
    import time

    import torch

    t0 = time.monotonic()
    quiet_libraries()
    res = resources.for_generate(device)
    pipe = load_merged_pipeline(Path(kolors), Path(lpath), gen["lora_strength"], res.torch_dtype(), res.device)
    if ip_folder:
        items = [dict(it) for it in items]
        load_characters(Path(ip_folder), pipe, items, Path(root))
    out = []
    batch, _ = resources.plan_generate(resources.free_gib(device), batch_size, gen["width"], gen["height"], len(items))
    for it, img in zip(items, render(pipe, items, gen, batch)):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(({k: v for k, v in it.items() if k != "ip"}, buf.getvalue()))
    where = socket.gethostname()
    if device == "cuda":  # Ray sets CUDA_VISIBLE_DEVICES to the GPU it gave this task
        where += f" GPU {os.environ.get('CUDA_VISIBLE_DEVICES', '?')} ({torch.cuda.get_device_name()})"
    return out, where, time.monotonic() - t0


def _warn_truncation(ctx, scenes):
    from .. import tokens

    count = tokens.counter()
    if count is None:
        return
    for s in scenes:
        for what in ("prompt", "negative_prompt"):
            n = count(s[what])
            if n > tokens.LIMIT:
                ctx.report.line(f"warning: scene {s['id']}: {what} is {n} tokens; Kolors truncates it to {tokens.LIMIT}")

