"""The LightningModule that trains a LoRA on cached latents/embeddings, and storyc's training callbacks."""
from __future__ import annotations

import time

import lightning as L
import torch

from .. import lora as lora_mod


def sample_seed(seed: int, index: int) -> int:
    # A fixed mix of (seed, sample index): every draw for a sample is reproducible on resume.
    return (seed * 0x9E3779B1 + index * 0x85EBCA77 + 1) % (2**63)


class LoRAModule(L.LightningModule):
    def __init__(self, unet, data: dict, lora: dict, train: dict):
        super().__init__()
        from diffsynth.schedulers import EnhancedDDIMScheduler

        self.unet = lora_mod.inject(unet, lora["rank"], lora["alpha"], lora["target_modules"], lora["init"])
        self.unet.train()  # diffsynth's UNet checkpoints activations only in training mode
        self.unet.requires_grad_(False)
        for n, p in self.unet.named_parameters():
            p.requires_grad_(".lora_" in n)
        self.scheduler = EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100)  # Kolors' scheduler
        self.scheduler.set_timesteps(1100)  # training samples from all 1100 timesteps
        self.data, self.cfg = data, train
        self.lr, self.gc = train["learning_rate"], train["gradient_checkpointing"]
        self.strict_loading = False  # checkpoints hold only the LoRA weights
        self.micro_batches = 0  # micro-batches consumed; saved in checkpoints so a resume draws the same samples
        self.compiled = False

    def setup(self, stage):
        if self.cfg.get("compile") and self.device.type == "cuda" and not self.compiled:
            self.unet.compile()  # in place: parameter names (and so checkpoints) stay the same
            self.compiled = True

    def _sample(self, index: int):
        g = torch.Generator().manual_seed(sample_seed(self.cfg["seed"], index))
        n = len(self.data["latents"])
        data_id = (int(torch.randint(0, n, (1,), generator=g)) + index) % n
        rec = self.data["latents"][data_id]
        lat = rec["latent"]
        if self.cfg["random_flip"] and torch.rand((), generator=g) < 0.5:
            lat = rec["latent_flip"]
        if not self.cfg["center_crop"]:  # random crop of the cached full-image latent, 8-px granularity
            w, h = self.data["size"]
            lh, lw = h // 8, w // 8
            y = int(torch.randint(0, lat.shape[2] - lh + 1, (1,), generator=g))
            x = int(torch.randint(0, lat.shape[3] - lw + 1, (1,), generator=g))
            lat = lat[:, :, y:y + lh, x:x + lw]
        return lat, self.data["text_of"][data_id], g

    def training_step(self, batch, batch_idx):
        b = len(batch)
        first = self.micro_batches * b
        self.micro_batches += 1
        lats, texts, gens = zip(*(self._sample(first + j) for j in range(b)))
        dev = self.device
        wdtype = next(p for p in self.unet.parameters() if not p.requires_grad).dtype
        latents = torch.cat(lats).to(dev, wdtype)
        g = gens[0]
        noise = torch.randn(latents.shape, generator=g).to(dev, wdtype)
        tid = torch.randint(0, self.scheduler.num_train_timesteps, (1,), generator=g)
        timestep = self.scheduler.timesteps[tid].to(dev)
        emb = [self.data["emb"][self.data["texts"][t]] for t in texts]
        ehs = torch.cat([e["encoder_hidden_states"] for e in emb]).to(dev, wdtype)
        ate = torch.cat([e["add_text_embeds"] for e in emb]).to(dev, wdtype)
        h, w = latents.shape[2] * 8, latents.shape[3] * 8
        add_time_id = torch.tensor([h, w, 0, 0, h, w], device=dev).repeat(latents.shape[0])
        noisy = self.scheduler.add_noise(latents, noise, timestep)
        target = self.scheduler.training_target(latents, noise, timestep)
        pred = self.unet(noisy, timestep=timestep, encoder_hidden_states=ehs, add_time_id=add_time_id,
                         add_text_embeds=ate, use_gradient_checkpointing=self.gc)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float()) * self.scheduler.training_weight(timestep)
        self.log("loss", loss.detach(), prog_bar=False, on_step=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(params, lr=self.lr, fused=fused)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if ".lora_" in k}
        checkpoint["storyc_micro_batches"] = self.micro_batches

    def on_load_checkpoint(self, checkpoint):
        self.micro_batches = int(checkpoint.get("storyc_micro_batches", 0))

    def lora_state(self) -> dict:
        return lora_mod.lora_state_dict(self.unet)


class StoryCallbacks(L.Callback):
    """Loss log (CSV beside the LoRA) and storyc's progress line (step, loss, it/s, ETA)."""

    def __init__(self, ctx, log_path, total: int, resumed: bool):
        self.ctx, self.log_path, self.total = ctx, log_path, total
        self.last_loss = float("nan")
        self.t0 = None
        self.first = 0
        if not resumed and log_path.exists():
            log_path.unlink()

    def on_train_start(self, trainer, module):
        self.t0 = time.monotonic()
        self.first = trainer.global_step
        if trainer.global_step:
            self.ctx.report.line(f"     resuming training at step {trainer.global_step} of {self.total}")
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
        new = not self.log_path.exists()
        with open(self.log_path, "a", encoding="utf-8") as f:
            if new:
                f.write("step,loss\n")
            f.write(f"{step},{loss:.6f}\n")
        rate = (step - self.first) / max(time.monotonic() - self.t0, 1e-9)
        self.ctx.report.update(step, self.total, f"loss {loss:.4f}  {rate:.2f} it/s")
