"""The training recipe's configuration: the train stage's slice, typed. Light (no torch): ``compile`` uses it too,
so ``train_config.json`` states exactly the step count that ``fit`` runs."""
from __future__ import annotations

from dataclasses import dataclass

from ...model import LoRA, Train
from ...schema import fields


def train_section(values: dict) -> Train:
    """A typed ``train`` from some of its values; the rest are the schema's defaults (its one source of them)."""
    return Train.build({**{k: default for k, (_, default) in fields(("train",)).items()}, **values})


@dataclass(frozen=True)
class TrainConfig:
    slice: dict  # the stage's hashed params, as the lock records them (the cache key is made of them)
    lora: LoRA
    train: Train  # the hashed values, every other one at its schema default, and the execution settings
    formats: tuple  # LoRA files the stage writes into build/<id>/lora/
    models: dict  # kolors / vae references as written into artifacts
    preview: dict | None = None  # train.preview_every: the scenes and settings the previews render

    @classmethod
    def from_job(cls, job) -> "TrainConfig":
        p = job.params
        lora = LoRA.build({**{k: default for k, (_, default) in fields(("lora",)).items()}, **p["lora"]})
        return cls(p, lora, train_section({**p["train"], **job.settings}), tuple(p["formats"]),
                   dict(p["models"]), p.get("preview"))

    @property
    def size(self) -> tuple[int, int]:
        return self.train.size

    @property
    def micro_batches(self) -> int:
        return self.train.micro_batches

    def optimizer_steps(self, world: int) -> int:
        return self.train.optimizer_steps(world)

    def world_size(self, gpus: int | None = None) -> int | None:
        return self.train.world_size(gpus)

    def cache_key_params(self) -> dict:
        """What the trained weights depend on (not which files are exported from them)."""
        out = {"lora": self.slice["lora"], "train": self.slice["train"]}
        if self.preview:  # which checkpoint is kept (select) depends on what the previews render and score
            out["preview"] = self.preview
        return out
