"""The LightningModule that trains a LoRA on cached latents/embeddings: the recipe's objective
(``compute_loss``) and optimizer (``configure_optimizers``) as named hooks; the callbacks live in callbacks.py."""
from __future__ import annotations

import lightning as L
import torch

from ... import lora as lora_mod
from ...models.fused_lora import fuse_lora
from .data import sample_seed


class LoRAModule(L.LightningModule):
    """LoRA training on cached latents/embeddings, with the recipe's seams as named hooks:
    ``compute_loss`` (the objective), ``configure_optimizers`` (optimizer + LR schedule) and, through Lightning,
    the callbacks passed to the Trainer.

    ``unet`` is a UNet or a picklable zero-argument loader: with a loader, each process (every DDP rank) builds
    its own UNet in ``configure_model`` instead of receiving a pickled 2.6 B-parameter copy.
    """

    def __init__(self, unet, data: dict, lora, train, export=None):
        super().__init__()
        from diffsynth.schedulers import EnhancedDDIMScheduler

        self._loader = None if isinstance(unet, torch.nn.Module) else unet
        self.unet = None
        self.lora_cfg = lora
        self.scheduler = EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100)  # Kolors' scheduler
        self.scheduler.set_timesteps(1100)  # training samples from all 1100 timesteps
        self.data, self.cfg = data, train
        self.lr, self.gc = train.learning_rate, train.gradient_checkpointing is True  # `auto` is planned earlier
        self.strict_loading = False  # checkpoints hold the trained state only, not the frozen UNet
        self.micro_batches = 0  # micro-batches consumed; saved in checkpoints so a resume draws the same samples
        self.compiled = False
        self.graphed = None  # the CUDA-graphed UNet once captured (False: not used)
        self.export = export  # rank 0 writes the trained LoRA here at the end (the main process may hold no copy)
        self._snr_table = None  # min-SNR weight per timestep (train.min_snr_gamma)
        self._timestep_id = 0
        self._consts = {}  # _resident's device tensors
        if self._loader is None:
            self._attach(unet)

    def _attach(self, unet):
        lo = self.lora_cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)  # the LoRA's initial weights: the same in every rank and run
            self.unet = lora_mod.inject(unet, lo.rank, lo.alpha, list(lo.target_modules), lo.init, lo.type,
                                        lo.factor, lo.decompose_both)
        fuse_lora(self.unet)  # same parameters, fewer kernels a step (models/fused_lora.py)
        self.unet.train()  # diffsynth's UNet checkpoints activations only in training mode
        self.unet.requires_grad_(False)
        for n, p in self.unet.named_parameters():
            p.requires_grad_(lora_mod.is_adapter_key(n))

    def configure_model(self):
        if self.unet is None:
            with torch.device("cpu"):  # LoRA init on the CPU generator: identical on every rank and device
                self._attach(self._loader())
        if self.cfg.compile and self.trainer.strategy.root_device.type == "cuda" and not self.compiled:
            # The whole UNet as one graph: measured faster per step than compiling its repeated blocks alone.
            self.unet.compile()  # in place: parameter names (and so checkpoints) stay the same
            self.compiled = True

    def state_dict(self, *args, **kwargs):
        # Checkpoints (and ddp_spawn's hand-back) keep the trained state: the LoRA and anything registered
        # beside the UNet (e.g. EMA weights), never the frozen 2.6 B base weights.
        sd = super().state_dict(*args, **kwargs)
        for k in [k for k in sd if not lora_mod.is_adapter_key(k) and k.split(".", 1)[0] == "unet"]:
            del sd[k]
        return sd

    def training_step(self, batch, batch_idx):
        m = self.micro_batches  # the loader's batch is micro-batch m (GlobalBatches): the timestep is drawn per m
        self.micro_batches += 1
        dev = self.device
        wdtype = next(p for p in self.unet.parameters() if not p.requires_grad).dtype
        latents = batch["latent"].to(dev, wdtype)
        noise = batch["noise"].to(dev, wdtype)
        tg = torch.Generator().manual_seed(sample_seed(self.cfg.seed + 0x7F4A7C15, m))
        tid = int(torch.randint(0, self.scheduler.num_train_timesteps, (1,), generator=tg))
        # No host sync in a step: the scheduler reads its timestep back to the host (add_noise indexes a table with
        # it), so it gets the host copy; the UNet gets a slice of the schedule kept on the device. Each
        # blocking host-to-device copy (or read-back) would make the CPU wait for the GPU's queue to drain.
        t_host = self.scheduler.timesteps[tid:tid + 1]
        timestep = self._resident("timesteps", lambda: self.scheduler.timesteps.to(dev))[tid:tid + 1]
        self._timestep_id = int(t_host)  # the loss weighting's index, known on the host
        ehs, ate, add_time_id = self.conditioning(batch["text"], latents, wdtype)
        noisy = self.scheduler.add_noise(latents, noise, t_host)
        target = self.scheduler.training_target(latents, noise, t_host)
        pred = self._unet(noisy, timestep, ehs, add_time_id, ate)
        mask = batch.get("mask")
        loss = self.compute_loss(pred, target, t_host, None if mask is None else mask.to(dev))
        return loss  # logged by StoryCallbacks, without a host sync per step

    def _resident(self, key, make):
        """A constant tensor of the step kept on the training device (made once: the one blocking copy)."""
        hit = self._consts.get(key)
        if hit is None or hit.device != self.device:
            hit = self._consts[key] = make()
        return hit

    def conditioning(self, text_ids: list, latents, dtype):
        """The UNet's conditioning of a batch: the cached caption embeddings (hidden states, pooled) and the SDXL
        time ids of the latents' image size."""
        dev = self.device
        emb = [self.data["emb"][self.data["texts"][t]] for t in text_ids]
        ehs = _upload(torch.cat([e["encoder_hidden_states"] for e in emb]), dev).to(dtype)
        ate = _upload(torch.cat([e["add_text_embeds"] for e in emb]), dev).to(dtype)
        h, w, b = latents.shape[2] * 8, latents.shape[3] * 8, latents.shape[0]
        tid = self._resident(("time_ids", h, w, b), lambda: torch.tensor([h, w, 0, 0, h, w], device=dev).repeat(b))
        return ehs, ate, tid

    def compute_loss(self, pred, target, timestep, mask=None):
        """The objective (a hook): diffsynth's MSE on the scheduler's target, weighted per timestep; with
        ``min_snr_gamma`` times min(SNR, gamma) / SNR (epsilon prediction, Hang et al. 2023); with a ``mask``
        (train.masked_loss, one channel on the latent grid) mean(mask * (pred - target)^2), as kohya sd-scripts."""
        loss = masked_mse(pred, target, mask) * self.scheduler.training_weight(timestep)
        gamma = self.cfg.min_snr_gamma
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
        return (self.cfg.cuda_graphs and self.device.type == "cuda" and not self.gc
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
        opt = make_optimizer(self.cfg.optimizer, params, self.lr, self.device.type == "cuda")
        sched, warm = self.cfg.lr_scheduler, self.cfg.lr_warmup_steps
        if sched == "constant" and not warm:
            return opt
        total = int(self.trainer.max_steps)
        lam = lr_lambda(sched, warm, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lam),
                                                   "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["storyc_micro_batches"] = self.micro_batches

    def on_train_end(self):
        # after the callbacks' on_train_end: the EMA callback has its last update
        if self.export is not None and self.trainer.is_global_zero:
            lo = self.lora_cfg
            lora_mod.save(self.export, self.lora_state(), {"rank": lo.rank, "alpha": lo.alpha})
        # Lightning's teardown, next, moves the whole module to the CPU: 2.6 B frozen UNet weights copied back
        # only to be dropped. Nothing reads the UNet after the export, so it (and its captured graphs) goes now.
        object.__setattr__(self, "graphed", None)
        self.unet = None

    def on_load_checkpoint(self, checkpoint):
        self.micro_batches = int(checkpoint.get("storyc_micro_batches", 0))

    def trained(self) -> list:
        """The trained tensors (the LoRA), in a fixed order."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    def lora_state(self) -> dict:
        """What is exported: the trained LoRA, or its EMA weights when the EMA callback runs (train.ema)."""
        from .callbacks import EMA

        state = lora_mod.lora_state_dict(self.unet)
        ema = next((cb for cb in (self.trainer.callbacks if self._trainer else []) if isinstance(cb, EMA)), None)
        if ema is not None:
            names = [n for n, p in self.unet.named_parameters() if p.requires_grad]
            weights = dict(zip(names, ema.weights(self)))
            state = {k: weights[k].to(v.dtype) if k in weights else v for k, v in state.items()}
        return state


def _upload(t, dev):
    """A CPU tensor to a CUDA device without a host sync: through pinned memory, asynchronously (PyTorch's caching
    host allocator keeps the pinned block until the copy has run). Elsewhere a plain copy."""
    if dev.type == "cuda" and t.device.type == "cpu":
        try:
            return t.pin_memory().to(dev, non_blocking=True)
        except RuntimeError:  # no page-locked memory to be had (a locked-down container): a blocking copy
            pass
    return t.to(dev)


def masked_mse(pred, target, mask=None):
    """MSE in fp32; with a mask (broadcast over the latent channels), the mean of mask * squared error over every
    element, so masked-out latent pixels add nothing and an all-ones mask is the plain MSE."""
    if mask is None:
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    return ((pred.float() - target.float()) ** 2 * mask.float()).mean()


def min_snr_weight(alphas_cumprod, timestep, gamma: float):
    """min(SNR(t), gamma) / SNR(t) per timestep index, SNR(t) = a_t / (1 - a_t) with a_t the cumulative alpha
    product (Hang et al. 2023, epsilon prediction)."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)[torch.as_tensor(timestep).long().cpu()]
    snr = a / (1 - a)
    return torch.clamp(snr, max=gamma) / snr


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
        from ...errors import StageError

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
