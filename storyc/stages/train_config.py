"""The training recipe's configuration, built from the train stage's slice and settings. Light (no torch):
``compile`` uses it too, so ``train_config.json`` states exactly the step count that ``fit`` runs."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    lora: dict  # rank, alpha, target_modules, init
    train: dict  # the hashed train.* values (epochs, steps_per_epoch, batch_size, learning_rate, ...)
    formats: tuple  # LoRA files the stage writes into build/<id>/lora/
    models: dict  # kolors / vae references as written into artifacts
    settings: dict  # execution-only: checkpoint_every, cuda_graphs, compile, num_workers
    preview: dict | None = None  # train.preview_every: the scenes and settings the previews render

    @classmethod
    def from_job(cls, job) -> "TrainConfig":
        p = job.params
        return cls(p["lora"], p["train"], tuple(p["formats"]), dict(p["models"]), dict(job.settings), p.get("preview"))

    def module_config(self) -> dict:
        """The flat train.* dict the LightningModule reads (hashed values, knobs at their defaults, settings)."""
        from .registry import TRAIN_KNOBS

        return {**TRAIN_KNOBS, **self.train, **self.settings}

    def __getitem__(self, key):  # cfg["learning_rate"]: a train value, a knob or a setting
        from .registry import TRAIN_KNOBS

        if key in self.train:
            return self.train[key]
        return self.settings[key] if key in self.settings else TRAIN_KNOBS[key]

    @property
    def size(self) -> tuple[int, int]:
        r = self.train["resolution"]
        return (r, r) if isinstance(r, int) else (r[0], r[1])

    @property
    def micro_batches(self) -> int:
        """Batches over the whole run, as diffsynth counts them (steps_per_epoch samples per epoch)."""
        return self.train["epochs"] * -(-self.train["steps_per_epoch"] // self.train["batch_size"])

    def optimizer_steps(self, world: int) -> int:
        per_rank = -(-self.micro_batches // world)  # each rank takes every world-th batch
        return max(1, per_rank // self.train["accumulate_grad_batches"])

    def world_size(self, gpus: int | None = None) -> int | None:
        """Processes that train: 1 unless ddp/deepspeed on several devices; None when it depends on the GPU
        count and ``gpus`` is not known (compile time)."""
        strategy, devices = self.train["strategy"], self.train["devices"]
        if isinstance(devices, list):
            return len(devices) if strategy != "auto" or len(devices) > 1 else 1
        if isinstance(devices, int):
            return devices
        if strategy == "auto":
            return 1
        return gpus

    def cache_key_params(self) -> dict:
        """What the trained weights depend on (not which files are exported from them)."""
        if self.preview:  # which checkpoint is kept (select) depends on what the previews render and score
            return {"lora": self.lora, "train": self.train, "preview": self.preview}
        return {"lora": self.lora, "train": self.train}
