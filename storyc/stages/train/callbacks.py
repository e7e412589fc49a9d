"""The training recipe's callbacks: storyc's log and progress, the EMA of the LoRA weights, and checkpoints that
cannot run code."""
from __future__ import annotations

import time

import lightning as L
import torch


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
        self.pending = []  # (step, loss on the device, learning rates) since the last flush: one read-back
        self.t_flush = 0.0
        self.t_last, self.last_step, self.steady_from = None, None, 0
        self.lrs = {}
        if not resumed and log_path.exists():
            log_path.unlink()

    def __getstate__(self):
        from ...progress import Reporter

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

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        # the learning rates this step uses (host floats; Lightning steps the scheduler before the batch-end
        # hooks), logged with its loss. Lightning's LearningRateMonitor copies each to the device: a sync per step.
        self.lrs = {f"lr-{type(o).__name__}" + (f"/pg{i}" if i else ""): float(g["lr"])
                    for o in trainer.optimizers for i, g in enumerate(o.param_groups)} if trainer.loggers else {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # No host sync per step: a step's loss stays on the device until a flush, every FLUSH_S seconds, at the
        # last step, at each checkpoint and at the end. Each step still gets its own line in the log.
        if not trainer.is_global_zero:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        step = trainer.global_step
        self.pending.append((step, loss.detach() if hasattr(loss, "detach") else loss, self.lrs))
        if self.t_steady is None:  # the first step (CUDA-graph capture, warm-up) read back now: the steady rate
            self.flush(trainer)    # is timed from its end
            self.t_steady = time.monotonic()
            self.steady_from = step
        elif time.monotonic() - self.t_flush >= self.FLUSH_S or step >= self.total:
            self.flush(trainer)
            if step >= self.total:  # the steady rate ends at the last step (not at the fit's teardown)
                self.t_last, self.last_step = time.monotonic(), step

    FLUSH_S = 2.0

    def flush(self, trainer) -> None:
        """The pending losses to the CSV log, TensorBoard (when on) and the progress line, in one read-back."""
        if not self.pending:
            return
        steps, lrs = [s for s, _, _ in self.pending], [r for _, _, r in self.pending]
        values = torch.stack([torch.as_tensor(v).float().reshape(()) for _, v, _ in self.pending]).tolist()
        self.pending, self.t_flush = [], time.monotonic()
        new = not self.log_path.exists()
        with open(self.log_path, "a", encoding="utf-8") as f:
            if new:
                f.write("step,loss\n")
            f.writelines(f"{s},{v:.6f}\n" for s, v in zip(steps, values))
        for lg in trainer.loggers:
            for s, v, r in zip(steps, values, lrs):
                lg.log_metrics({"loss": v, **r}, step=s)
        self.last_loss = values[-1]
        rate = (steps[-1] - self.first) / max(time.monotonic() - self.t0, 1e-9)
        self.report.update(steps[-1], self.total, f"loss {values[-1]:.4f}  {rate:.2f} it/s")

    def on_save_checkpoint(self, trainer, module, checkpoint):
        if trainer.is_global_zero:  # the log holds every step a checkpoint holds (a resume keeps those lines)
            self.flush(trainer)

    def on_exception(self, trainer, module, exception):
        if trainer.is_global_zero:
            try:
                self.flush(trainer)
            except Exception:  # noqa: BLE001 - a failed device read must not hide the original error
                self.pending = []

    def on_train_end(self, trainer, module):
        if trainer.is_global_zero:
            self.flush(trainer)
        # every rank reports its device and peak memory: the evidence that each GPU trained
        dev = module.device
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
        peaks = trainer.strategy.all_gather(torch.tensor([peak], device=dev)) if trainer.world_size > 1 else None
        if trainer.is_global_zero:
            import json

            from ...render import atomic_write

            if getattr(module, "graphed", None):
                self.report.info("     the UNet's forward and backward ran as CUDA graphs (train.cuda_graphs)")
            if peaks is not None:
                per = ", ".join(f"rank {r}: {float(g):.2f} GiB" for r, g in enumerate(peaks.flatten()))
                self.report.info(f"     {trainer.world_size} ranks on {dev.type}; peak memory {per}")
            per = None
            if self.t_steady is not None:  # from the end of the first step to the end of the last
                end, last = (self.t_last, self.last_step) if self.t_last else (time.monotonic(), trainer.global_step)
                per = (end - self.t_steady) / max(int(last) - self.steady_from, 1)
            # where the fit's time goes (monotonic clock, comparable with the stage's own): Lightning's set-up and
            # the UNet's load before the first step, the first step (CUDA-graph capture), the steady steps
            marks = {"train_start": self.t0, "first_step_end": self.t_steady, "last_step_end": self.t_last,
                     "train_end": time.monotonic()}
            atomic_write(self.result_path, json.dumps({"steps": int(trainer.global_step), "final_loss": self.last_loss,
                                                       "world_size": trainer.world_size, "s_per_step": per,
                                                       "marks": marks}))


def ema_update(ema: list, params: list, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, in place: one multi-tensor lerp over every LoRA tensor
    (two kernels per tensor made EMA cost ~50% of a CUDA-graphed step)."""
    with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1 - decay)



class EMA(L.Callback):
    """train.ema: an exponential moving average of the LoRA weights, updated after every optimizer step and
    exported instead of the last weights. Its state is saved with each checkpoint (after the step's update: a
    resumed run continues the same average) and the previews render with it."""

    def __init__(self, decay: float):
        self.decay = decay
        self._weights = None  # fp32 copies of the trained tensors, on the training device
        self._pairs = None  # (EMA weights, trained tensors), listed once: a step is host-bound

    def weights(self, module) -> list:
        if self._weights is None:
            self._weights = [p.detach().clone().float() for p in module.trained()]
        return self._weights

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if self._pairs is None:
            self._pairs = (self.weights(module), module.trained())
        ema_update(*self._pairs, self.decay)

    def state_dict(self):
        return {"decay": self.decay, "weights": [w.cpu() for w in self._weights] if self._weights is not None else None}

    def load_state_dict(self, state):
        self._weights = state.get("weights")
        self._pairs = None

    def on_train_start(self, trainer, module):
        if self._weights is None:  # the average starts at the initial weights (before the first step)
            self.weights(module)
        else:  # restored from a checkpoint on the CPU: to the training device
            self._weights = [w.to(module.device, torch.float32) for w in self._weights]
        self._pairs = None

    def swapped(self, module):
        """A context in which the trained tensors hold the EMA weights (previews render what would be exported)."""
        import contextlib

        @contextlib.contextmanager
        def swap():
            saved = []
            with torch.no_grad():
                for p, e in zip(module.trained(), self.weights(module)):
                    saved.append(p.data.clone())
                    p.data.copy_(e.to(p.dtype))
            try:
                yield
            finally:
                with torch.no_grad():
                    for p, d in zip(module.trained(), saved):
                        p.data.copy_(d)
        return swap()


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


def seal_path(path):
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

        from ...render import atomic_write

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
