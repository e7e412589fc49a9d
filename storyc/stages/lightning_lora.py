"""The LightningModule that trains a LoRA on cached latents/embeddings, and storyc's training callbacks."""
from __future__ import annotations

import time

import lightning as L
import torch

from .. import lora as lora_mod


def sample_seed(seed: int, index: int) -> int:
    # A fixed mix of (seed, sample index): every draw for a sample is reproducible on resume.
    return (seed * 0x9E3779B1 + index * 0x85EBCA77 + 1) % (2**63)


class Samples(torch.utils.data.Dataset):
    """Training sample ``i`` (a global sample index): a cached latent, its caption's index and its noise.

    Every draw for sample i comes from a generator seeded by (seed, i), so a resumed run, any DataLoader worker
    count and N DDP ranks all draw exactly what one uninterrupted process draws.
    """

    def __init__(self, data: dict, train: dict, length: int):
        self.data, self.cfg, self.length = data, train, length
        if "buckets" in data:
            self.bucket_rows = [[i for i, b in enumerate(data["bucket_of"]) if b == k] for k in range(len(data["buckets"]))]

    def batch_bucket(self, micro_batch: int) -> int:
        """The bucket of micro-batch m: drawn from (seed, m), weighted by how many rows each bucket holds."""
        g = torch.Generator().manual_seed(sample_seed(self.cfg["seed"] + 0x2545F491, micro_batch))
        pick = int(torch.randint(0, len(self.data["bucket_of"]), (1,), generator=g))
        return self.data["bucket_of"][pick]

    def __len__(self):
        return self.length

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(sample_seed(self.cfg["seed"], index))
        n = len(self.data["latents"])
        data_id = (int(torch.randint(0, n, (1,), generator=g)) + index) % n
        if "buckets" in self.data:  # train.buckets: every sample of a micro-batch from that batch's bucket
            rows = self.bucket_rows[self.batch_bucket(index // self.cfg.get("batch_size", 1))]
            data_id = rows[(int(torch.randint(0, len(rows), (1,), generator=g)) + index) % len(rows)]
        rec = self.data["latents"][data_id]
        lat = rec["latent"]
        if self.cfg["random_flip"] and torch.rand((), generator=g) < 0.5:
            lat = rec["latent_flip"]
        if "buckets" not in self.data and not self.cfg["center_crop"]:  # random crop of the cached latent, 8-px steps
            w, h = self.data["size"]
            lh, lw = h // 8, w // 8
            y = int(torch.randint(0, lat.shape[2] - lh + 1, (1,), generator=g))
            x = int(torch.randint(0, lat.shape[3] - lw + 1, (1,), generator=g))
            lat = lat[:, :, y:y + lh, x:x + lw]
        noise = torch.randn(lat.shape, generator=g)
        if self.cfg.get("noise_offset"):  # one shift per latent channel (drawn only when on: defaults draw as before)
            noise = noise + self.cfg["noise_offset"] * torch.randn(lat.shape[:2] + (1, 1), generator=g)
        text = self.data["text_of"][data_id]
        if self.cfg.get("caption_dropout") and float(torch.rand((), generator=g)) < self.cfg["caption_dropout"]:
            text = self.data["texts"].index("")  # the empty caption's embedding (encoded in the cache pass)
        return {"latent": lat, "noise": noise, "text": text}


def collate(items):
    return {"latent": torch.cat([it["latent"] for it in items]), "noise": torch.cat([it["noise"] for it in items]),
            "text": [it["text"] for it in items]}


class GlobalBatches(torch.utils.data.Sampler):
    """Micro-batch m of rank r (of W) holds samples (m*W + r)*b ... (m*W + r)*b + b-1: W ranks at batch b draw
    what one process at batch W*b draws. Starts at ``progress.micro_batches`` (restored from a checkpoint before
    Lightning iterates the loader), so a resumed run continues with the next unseen samples."""

    def __init__(self, micro_batches: int, batch_size: int, progress):
        self.total, self.b, self.progress = micro_batches, batch_size, progress

    def _rank(self):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def __len__(self):
        world, _ = self._rank()
        return -(-self.total // world)

    def __iter__(self):
        world, rank = self._rank()
        for m in range(self.progress.micro_batches, len(self)):
            first = (m * world + rank) * self.b
            yield list(range(first, first + self.b))


def make_loader(data: dict, train: dict, micro_batches: int, progress, num_workers: int = 0):
    """The DataLoader a LoRAModule trains from (``progress`` is the module: it counts consumed micro-batches)."""
    b = train.get("batch_size", 1)
    return torch.utils.data.DataLoader(Samples(data, train, micro_batches * b), collate_fn=collate,
                                       batch_sampler=GlobalBatches(micro_batches, b, progress),
                                       num_workers=num_workers, persistent_workers=False)


class LoRAModule(L.LightningModule):
    """LoRA training on cached latents/embeddings, with the recipe's seams as named hooks:
    ``compute_loss`` (the objective), ``configure_optimizers`` (optimizer + LR schedule) and, through Lightning,
    the callbacks passed to the Trainer.

    ``unet`` is a UNet or a picklable zero-argument loader: with a loader, each process (every DDP rank) builds
    its own UNet in ``configure_model`` instead of receiving a pickled 2.6 B-parameter copy.
    """

    def __init__(self, unet, data: dict, lora: dict, train: dict, export=None):
        super().__init__()
        from diffsynth.schedulers import EnhancedDDIMScheduler

        self._loader = None if isinstance(unet, torch.nn.Module) else unet
        self.unet = None
        self.lora_cfg = lora
        self.scheduler = EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100)  # Kolors' scheduler
        self.scheduler.set_timesteps(1100)  # training samples from all 1100 timesteps
        self.data, self.cfg = data, train
        self.lr, self.gc = train["learning_rate"], train["gradient_checkpointing"] is True  # `auto` is planned earlier
        self.strict_loading = False  # checkpoints hold the trained state only, not the frozen UNet
        self.micro_batches = 0  # micro-batches consumed; saved in checkpoints so a resume draws the same samples
        self.compiled = False
        self.graphed = None  # the CUDA-graphed UNet once captured (False: not used)
        self.export = export  # rank 0 writes the trained LoRA here at the end (the main process may hold no copy)
        self._snr_table = None  # min-SNR weight per timestep (train.min_snr_gamma)
        self._timestep_id = 0
        self._ema_pairs = None  # (EMA buffers, trained tensors), listed once on the training device
        if self._loader is None:
            self._attach(unet)

    def _attach(self, unet):
        lo = self.lora_cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg["seed"])  # the LoRA's initial weights: the same in every rank and run
            self.unet = lora_mod.inject(unet, lo["rank"], lo["alpha"], lo["target_modules"], lo["init"])
        self.unet.train()  # diffsynth's UNet checkpoints activations only in training mode
        self.unet.requires_grad_(False)
        for n, p in self.unet.named_parameters():
            p.requires_grad_(".lora_" in n)
        if self.cfg.get("ema"):
            self._ema_buffers()  # registered before a checkpoint restores them

    def configure_model(self):
        if self.unet is None:
            with torch.device("cpu"):  # LoRA init on the CPU generator: identical on every rank and device
                self._attach(self._loader())
        if self.cfg.get("compile") and self.trainer.strategy.root_device.type == "cuda" and not self.compiled:
            # The whole UNet as one graph: measured faster per step than compiling its repeated blocks alone.
            self.unet.compile()  # in place: parameter names (and so checkpoints) stay the same
            self.compiled = True

    def state_dict(self, *args, **kwargs):
        # Checkpoints (and ddp_spawn's hand-back) keep the trained state: the LoRA and anything registered
        # beside the UNet (e.g. EMA weights), never the frozen 2.6 B base weights.
        sd = super().state_dict(*args, **kwargs)
        for k in [k for k in sd if ".lora_" not in k and k.split(".", 1)[0] == "unet"]:
            del sd[k]
        return sd

    def training_step(self, batch, batch_idx):
        m = self.micro_batches  # the loader's batch is micro-batch m (GlobalBatches): the timestep is drawn per m
        self.micro_batches += 1
        dev = self.device
        wdtype = next(p for p in self.unet.parameters() if not p.requires_grad).dtype
        latents = batch["latent"].to(dev, wdtype)
        noise = batch["noise"].to(dev, wdtype)
        tg = torch.Generator().manual_seed(sample_seed(self.cfg["seed"] + 0x7F4A7C15, m))
        tid = torch.randint(0, self.scheduler.num_train_timesteps, (1,), generator=tg)
        timestep = self.scheduler.timesteps[tid].to(dev)
        self._timestep_id = int(self.scheduler.timesteps[tid])  # the loss weighting's index, known on the host
        emb = [self.data["emb"][self.data["texts"][t]] for t in batch["text"]]
        ehs = torch.cat([e["encoder_hidden_states"] for e in emb]).to(dev, wdtype)
        ate = torch.cat([e["add_text_embeds"] for e in emb]).to(dev, wdtype)
        h, w = latents.shape[2] * 8, latents.shape[3] * 8
        add_time_id = torch.tensor([h, w, 0, 0, h, w], device=dev).repeat(latents.shape[0])
        noisy = self.scheduler.add_noise(latents, noise, timestep)
        target = self.scheduler.training_target(latents, noise, timestep)
        pred = self._unet(noisy, timestep, ehs, add_time_id, ate)
        loss = self.compute_loss(pred, target, timestep)
        self.log("loss", loss.detach(), prog_bar=False, on_step=True)
        return loss

    def compute_loss(self, pred, target, timestep):
        """The objective (a hook): diffsynth's MSE on the scheduler's target, weighted per timestep; with
        ``min_snr_gamma`` times min(SNR, gamma) / SNR (epsilon prediction, Hang et al. 2023)."""
        loss = torch.nn.functional.mse_loss(pred.float(), target.float()) * self.scheduler.training_weight(timestep)
        gamma = self.cfg.get("min_snr_gamma")
        if gamma:  # a Python float from a table on the host: no per-step host-to-device work
            if self._snr_table is None:
                ids = torch.arange(len(self.scheduler.alphas_cumprod))
                self._snr_table = min_snr_weight(self.scheduler.alphas_cumprod, ids, gamma).tolist()
            loss = loss * self._snr_table[self._timestep_id]
        return loss

    def _unet(self, x, t, ehs, tid, ate):
        if self.graphed is None:  # object.__setattr__: keep the graphed wrapper out of the module tree
            object.__setattr__(self, "graphed", self._capture(x, t, ehs, tid, ate) if self._graphs_apply() else False)
        if self.graphed:
            with _autocast_no_cache():
                return self.graphed(x, t, ehs, tid, ate)
        return self.unet(x, timestep=t, encoder_hidden_states=ehs, add_time_id=tid, add_text_embeds=ate,
                         use_gradient_checkpointing=self.gc)

    def _graphs_apply(self) -> bool:
        # Shapes are fixed for a run (fixed resolution and batch), so one capture serves every step. The
        # gradients come back in the graph's static buffers: fine when each step's backward is consumed by the
        # optimizer before the next replay, not when micro-batches accumulate into them.
        if len(self.data.get("buckets", ())) > 1:  # several latent shapes: one captured graph cannot serve them
            return False
        return (self.cfg.get("cuda_graphs", False) and self.device.type == "cuda" and not self.gc
                and not self.compiled and self.trainer.world_size == 1 and self.trainer.accumulate_grad_batches == 1)

    def _capture(self, *sample):
        """The UNet's forward and backward captured as CUDA graphs (torch.cuda.make_graphed_callables).

        A batch-1 step launches ~15k kernels and the GPU idles between them; replaying a graph launches them
        at once. Same kernels, same math. The LoRA weights are graph inputs, so optimizer updates are seen.
        """
        try:
            wrapped = _Positional(self.unet)
            with _autocast_no_cache():
                graphed = torch.cuda.make_graphed_callables(wrapped, tuple(a.detach().clone() for a in sample),
                                                            num_warmup_iters=3)
            return graphed
        except Exception as e:  # unsupported op or out of memory: the step still runs, eagerly
            import warnings

            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); training eagerly", stacklevel=2)
            torch.cuda.empty_cache()
            return False

    def configure_optimizers(self):
        """The optimizer and LR schedule (a hook): by default AdamW at a constant rate, as the notebook trains."""
        params = [p for p in self.unet.parameters() if p.requires_grad]
        opt = make_optimizer(self.cfg.get("optimizer", "adamw"), params, self.lr, self.device.type == "cuda")
        sched = self.cfg.get("lr_scheduler", "constant")
        warm = int(self.cfg.get("lr_warmup_steps", 0))
        if sched == "constant" and not warm:
            return opt
        total = int(self.trainer.max_steps)
        lam = lr_lambda(sched, warm, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lam),
                                                   "interval": "step"}}

    # ---- EMA of the LoRA weights (train.ema): a buffer per trained tensor, updated after each optimizer step
    def _ema_buffers(self):
        if not hasattr(self, "ema_weights"):
            self.ema_weights = torch.nn.Module()
            for i, (n, p) in enumerate((n, p) for n, p in self.unet.named_parameters() if p.requires_grad):
                self.ema_weights.register_buffer(f"w{i}", p.detach().clone().float())
        return list(self.ema_weights.buffers())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        decay = self.cfg.get("ema")
        if decay and (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            if self._ema_pairs is None:  # listed once (after the move to the device): a step is host-bound
                self._ema_pairs = (self._ema_buffers(), [p for p in self.unet.parameters() if p.requires_grad])
            ema_update(*self._ema_pairs, decay)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["storyc_micro_batches"] = self.micro_batches

    def on_train_end(self):
        if self.export is not None and self.trainer.is_global_zero:
            lora_mod.save(self.export, self.lora_state(), {"rank": self.lora_cfg["rank"], "alpha": self.lora_cfg["alpha"]})

    def on_load_checkpoint(self, checkpoint):
        self.micro_batches = int(checkpoint.get("storyc_micro_batches", 0))

    def lora_state(self) -> dict:
        """What is exported: the trained LoRA, or its EMA weights when train.ema is on."""
        state = lora_mod.lora_state_dict(self.unet)
        if self.cfg.get("ema"):
            names = [n for n, p in self.unet.named_parameters() if p.requires_grad]
            ema = dict(zip(names, self._ema_buffers()))
            state = {k: ema[k].to(v.dtype) if k in ema else v for k, v in state.items()}
        return state


def min_snr_weight(alphas_cumprod, timestep, gamma: float):
    """min(SNR(t), gamma) / SNR(t) per timestep index, SNR(t) = a_t / (1 - a_t) with a_t the cumulative alpha
    product (Hang et al. 2023, epsilon prediction)."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)[torch.as_tensor(timestep).long().cpu()]
    snr = a / (1 - a)
    return torch.clamp(snr, max=gamma) / snr


def ema_update(ema: list, params: list, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, in place: one multi-tensor lerp over every LoRA tensor
    (two kernels per tensor made EMA cost ~50% of a CUDA-graphed step)."""
    with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1 - decay)


def lr_lambda(schedule: str, warmup: int, total: int):
    """The LR multiplier at optimizer step s: linear warm-up over ``warmup`` steps, then constant, linear decay
    to 0 or a half cosine to 0 over the remaining steps."""
    import math

    def f(step: int) -> float:
        if warmup and step < warmup:  # as transformers' get_scheduler: 0 at step 0
            return step / warmup
        rest = max(total - warmup, 1)
        done = min(max(step - warmup, 0) / rest, 1.0)
        if schedule == "linear":
            return 1.0 - done
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * done))
        return 1.0
    return f


OPTIMIZERS = {"adamw8bit": ("bitsandbytes", "bitsandbytes.optim", "AdamW8bit"),
              "prodigy": ("prodigyopt", "prodigyopt", "Prodigy")}  # name -> (pip package, module, class)


def make_optimizer(name: str, params, lr: float, cuda: bool):
    """adamw (torch, fused on CUDA), adamw8bit (bitsandbytes) or prodigy (prodigyopt): the libraries' own."""
    if name not in OPTIMIZERS:
        return torch.optim.AdamW(params, lr=lr, fused=cuda)
    import importlib

    package, module, cls = OPTIMIZERS[name]
    try:
        optimizer = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        from ..errors import StageError

        raise StageError("train", f"train.optimizer {name} needs {package} ({e})",
                         f"pip install {package}, or use `optimizer: adamw`") from None
    return optimizer(params, lr=lr)


class _Positional(torch.nn.Module):
    """diffsynth's UNet with positional inputs only, as make_graphed_callables needs."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, ehs, tid, ate):
        return self.unet(x, timestep=t, encoder_hidden_states=ehs, add_time_id=tid, add_text_embeds=ate)


def _autocast_no_cache():
    # Under Lightning's mixed precision: the same autocast, without its weight-cast cache, whose tensors would
    # be freed behind a captured graph's back (the documented requirement of make_graphed_callables).
    import contextlib

    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


class StoryCallbacks(L.Callback):
    """Loss log (CSV beside the LoRA), the fit result, and storyc's progress line (step, loss, it/s, ETA).

    Under ddp_spawn the trainer is pickled into each rank: there the callback reports through a plain
    line printer instead of the build's live display.
    """

    def __init__(self, report, log_path, result_path, total: int, resumed: bool):
        self.report, self.log_path, self.result_path, self.total = report, log_path, result_path, total
        self.last_loss = float("nan")
        self.t0 = None
        self.t_steady = None  # after the first step (CUDA-graph capture, warm-up): the steady step rate
        self.first = 0
        if not resumed and log_path.exists():
            log_path.unlink()

    def __getstate__(self):
        from ..progress import Reporter

        state = dict(self.__dict__)
        state["report"] = Reporter(quiet=getattr(self.report, "quiet", False), live=False)
        return state

    def on_train_start(self, trainer, module):
        self.t0 = time.monotonic()
        self.first = trainer.global_step
        if trainer.global_step and trainer.is_global_zero:
            self.report.info(f"     resuming training at step {trainer.global_step} of {self.total}")
            if self.log_path.exists():  # drop log lines past the checkpoint
                lines = self.log_path.read_text("utf-8").splitlines()
                keep = [ln for ln in lines[1:] if int(ln.split(",")[0]) <= trainer.global_step]
                self.log_path.write_text("\n".join([lines[0], *keep]) + "\n", "utf-8")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if not trainer.is_global_zero:
            return
        loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
        self.last_loss = loss
        step = trainer.global_step
        if self.t_steady is None:
            self.t_steady = time.monotonic()
        new = not self.log_path.exists()
        with open(self.log_path, "a", encoding="utf-8") as f:
            if new:
                f.write("step,loss\n")
            f.write(f"{step},{loss:.6f}\n")
        rate = (step - self.first) / max(time.monotonic() - self.t0, 1e-9)
        self.report.update(step, self.total, f"loss {loss:.4f}  {rate:.2f} it/s")

    def on_train_end(self, trainer, module):
        # every rank reports its device and peak memory: the evidence that each GPU trained
        dev = module.device
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
        peaks = trainer.strategy.all_gather(torch.tensor([peak], device=dev)) if trainer.world_size > 1 else None
        if trainer.is_global_zero:
            import json

            from ..render import atomic_write

            if getattr(module, "graphed", None):
                self.report.info("     the UNet's forward and backward ran as CUDA graphs (train.cuda_graphs)")
            if peaks is not None:
                per = ", ".join(f"rank {r}: {float(g):.2f} GiB" for r, g in enumerate(peaks.flatten()))
                self.report.info(f"     {trainer.world_size} ranks on {dev.type}; peak memory {per}")
            steps = int(trainer.global_step) - self.first
            per = (time.monotonic() - self.t_steady) / max(steps - 1, 1) if self.t_steady else None
            atomic_write(self.result_path, json.dumps({"steps": int(trainer.global_step), "final_loss": self.last_loss,
                                                       "world_size": trainer.world_size, "s_per_step": per}))


# ---------------------------------------------------------------- checkpoints that cannot run code
# The training cache may be shared (NFS across a cluster): anyone who can write there must not be able to run code
# on the nodes that resume from it. Checkpoints hold plain data only (tensors, numbers, strings, lists, dicts) and
# load with torch.load(weights_only=True); each is sealed with its sha256 and a missing, empty or different seal
# means "not ours": it is never loaded.

def plain(obj, where: str = "checkpoint"):
    """``obj`` as plain data weights_only loading accepts; anything else is a TypeError naming where it is."""
    import pathlib

    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.Size, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if isinstance(obj, dict):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj)) if isinstance(obj, tuple) \
            else [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):
        return obj.item() if getattr(obj, "ndim", 0) == 0 else torch.as_tensor(obj)
    raise TypeError(f"{where} is a {type(obj).__name__}: a checkpoint holds plain data only")


def seal_path(path) -> "pathlib.Path":
    from pathlib import Path

    return Path(str(path) + ".sha256")


def load_sealed(path) -> dict:
    """A checkpoint whose bytes match its seal, loaded without pickle code paths (weights_only=True).
    Raises ValueError saying why it is refused."""
    import hashlib
    import io
    from pathlib import Path

    path = Path(path)
    try:
        want = seal_path(path).read_text("utf-8").strip()
    except OSError:
        want = ""
    if len(want) != 64:
        raise ValueError("it has no seal (written by something other than this storyc, or cut off mid-write)")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != want:
        raise ValueError("its bytes differ from its seal (corrupt or replaced)")
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


class SealedCheckpointIO(L.pytorch.plugins.io.TorchCheckpointIO):
    """Lightning's checkpoint I/O with plain-data, sealed checkpoints (see ``load_sealed``)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        import hashlib
        import io

        from ..render import atomic_write

        buf = io.BytesIO()
        torch.save(plain(checkpoint), buf)
        raw = buf.getvalue()
        seal_path(path).unlink(missing_ok=True)  # never a new file under an old seal
        atomic_write(path, raw, "wb")
        atomic_write(seal_path(path), hashlib.sha256(raw).hexdigest() + "\n")

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_sealed(path)

    def remove_checkpoint(self, path):
        super().remove_checkpoint(path)
        seal_path(path).unlink(missing_ok=True)
