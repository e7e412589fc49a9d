"""train.validation and train.stop: the loss on held-out images, and early stopping on it (or on the story
previews' score).

The validation loss is deterministic: each held-out image at fixed timesteps (evenly spaced over the schedule) with
fixed noise (drawn from train.seed, the image and the timestep), so the same spec gives the same curve. It is
measured with the weights that would be exported (the EMA's when train.ema is on), under the training precision.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import lightning as L
import torch

from .data import sample_seed
from .module import masked_mse

VAL_SEED = 0x51ED2705  # the validation noise's stream, apart from the training samples' draws


def validation_loss(module, val: list, timesteps: int) -> float:
    """Mean of the objective over the held-out images x fixed timesteps, without gradients."""
    sched = module.scheduler
    n = len(sched.timesteps)
    ids = [min(n - 1, int((k + 0.5) * n / timesteps)) for k in range(timesteps)]
    dev = module.device
    wdtype = next(p for p in module.unet.parameters() if not p.requires_grad).dtype
    total = 0.0
    with torch.no_grad():
        for i, item in enumerate(val):
            lat = item["latent"].to(dev, wdtype)
            ehs, ate, tid_ = module.conditioning([item["text"]], lat, wdtype)
            for k, tid in enumerate(ids):
                g = torch.Generator().manual_seed(sample_seed(module.cfg.seed + VAL_SEED, i * 1009 + k))
                noise = torch.randn(lat.shape, generator=g).to(dev, wdtype)
                t = sched.timesteps[tid:tid + 1].to(dev)
                noisy = sched.add_noise(lat, noise, t)
                target = sched.training_target(lat, noise, t)
                pred = module.unet(noisy, timestep=t, encoder_hidden_states=ehs, add_time_id=tid_, add_text_embeds=ate)
                mask = item["mask"].to(dev) if "mask" in item else None  # train.masked_loss: what is trained
                loss = masked_mse(pred, target, mask) * sched.training_weight(t)
                total += float(loss)
    return total / (len(val) * len(ids))


def _ema_weights(trainer, module):
    from .callbacks import EMA

    ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)
    return ema.swapped(module) if ema is not None else contextlib.nullcontext()


class Validation(L.Callback):
    """Every ``every`` optimizer steps (and at the last): the held-out loss, into val_log.csv, TensorBoard and
    ``history`` (the lock's record). Every rank measures the same images; rank 0's value is the one kept."""

    def __init__(self, cfg: dict, total: int, log_path: Path, report):
        self.every, self.timesteps, self.total = cfg["every"], cfg["timesteps"], total
        self.log_path, self.report = log_path, report
        self.history: list = []  # [step, loss]
        self.last = None  # (step, loss) of the latest measurement

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        step = int(trainer.global_step)
        if (step % self.every and step != self.total) or (self.history and self.history[-1][0] == step):
            return
        was = module.unet.training
        module.unet.eval()
        try:
            with _ema_weights(trainer, module), trainer.strategy.precision_plugin.forward_context():
                loss = validation_loss(module, module.data["val"], self.timesteps)
        finally:
            module.unet.train(was)
        loss = float(trainer.strategy.broadcast(loss, 0))
        self.history.append([step, round(loss, 6)])
        self.last = (step, loss)
        if trainer.is_global_zero:
            new = not self.log_path.exists()
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(("step,val_loss\n" if new else "") + f"{step},{loss:.6f}\n")
            if trainer.logger:
                trainer.logger.log_metrics({"val/loss": loss}, step=step)
            self.report.info(f"     validation at step {step}: loss {loss:.4f} on {len(module.data['val'])} held-out "
                             f"image(s)")

    def on_train_start(self, trainer, module):
        if trainer.is_global_zero:  # a fresh run starts its log; a resumed one keeps its measurements up to the checkpoint
            self.log_path.unlink(missing_ok=True)
            if self.history:
                self.log_path.write_text("step,val_loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in self.history),
                                         "utf-8")

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state):
        self.history = [list(h) for h in state.get("history", [])]
        self.last = tuple(self.history[-1]) if self.history else None


class EarlyStop(L.Callback):
    """train.stop: after each measurement of its metric, keep the best (its LoRA saved as best.safetensors) and
    stop after ``patience`` measurements without an improvement of ``min_delta``. Runs after the measuring
    callbacks of the same step; rank 0 decides and every rank follows."""

    def __init__(self, cfg: dict, source, folder: Path, report, lora_meta: dict):
        self.metric, self.patience, self.min_delta = cfg["metric"], cfg["patience"], cfg["min_delta"]
        self.source, self.folder, self.report, self.meta = source, folder, report, lora_meta
        self.best = None  # [step, value]
        self.bad = 0
        self.stopped = None  # the step training stopped at
        self.seen = None

    def _latest(self):
        if self.metric == "val_loss":
            return self.source.last
        recs = self.source.records  # the story previews (rank 0)
        if not recs:
            return None
        step = max(recs, key=int)
        return int(step), recs[step]["mean"]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        latest = self._latest() if trainer.is_global_zero else None
        stop = False
        if latest is not None and latest[0] == int(trainer.global_step) and latest != self.seen:
            self.seen = latest
            step, value = latest
            lower = self.metric == "val_loss"
            better = self.best is None or (value < self.best[1] - self.min_delta if lower
                                           else value > self.best[1] + self.min_delta)
            if better:
                self.best, self.bad = [step, value], 0
                from ... import lora as lora_mod

                self.folder.mkdir(parents=True, exist_ok=True)
                lora_mod.save(self.folder / "best.safetensors", module.lora_state(), self.meta)
            else:
                self.bad += 1
                stop = self.bad >= self.patience
            if stop:
                self.stopped = step
                self.report.info(f"     early stop at step {step}: {self.metric} has not improved by "
                                 f"{self.min_delta:g} for {self.patience} measurement(s); best at step {self.best[0]}")
        if trainer.world_size > 1:
            stop = bool(trainer.strategy.broadcast(stop, 0))
        if stop:
            trainer.should_stop = True

    def on_train_end(self, trainer, module):
        if trainer.is_global_zero and self.best is not None:
            from ...render import atomic_write, canonical_json

            atomic_write(self.folder / "stop.json", canonical_json({
                "metric": self.metric, "patience": self.patience, "min_delta": self.min_delta,
                "best_step": self.best[0], "best": round(self.best[1], 6), "stopped_at": self.stopped,
                "why": (f"{self.metric} did not improve by {self.min_delta:g} for {self.patience} measurement(s)"
                        if self.stopped is not None else "ran to the last step")}))

    def state_dict(self):
        return {"best": self.best, "bad": self.bad, "stopped": self.stopped}

    def load_state_dict(self, state):
        self.best, self.bad, self.stopped = state.get("best"), state.get("bad", 0), state.get("stopped")


def read_stop(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "stop.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
