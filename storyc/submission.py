"""The competition entry's rules, written once: the aesthetic gate, the bundle's verdict, the model's name.
Light (no PIL, no torch)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import StorycError

PLACEHOLDER_TEAMS = {"my-team", "team", "your-team", "<team>", "xxx", "todo", "队伍名称", "队伍名"}
COMPETITION_NAME = "{team}-可图Kolors训练-{rest}"  # the competition's model naming rule


@dataclass(frozen=True)
class Gate:
    """The competition's rule: the mean aesthetic score of the images, and whether it reaches the minimum."""

    mean: float
    minimum: float

    @property
    def valid(self) -> bool:
        return self.mean >= self.minimum

    @classmethod
    def of(cls, scores, minimum: float) -> "Gate":
        scores = list(scores)
        return cls(sum(scores) / len(scores), minimum)


def display_name(story: dict) -> str:
    """The model's name by the competition's rule: `<team>-可图Kolors训练-<title>`."""
    return COMPETITION_NAME.format(team=story.get("team") or "<team>", rest=story.get("title") or story["id"])


def read_json(p: Path):
    try:
        return json.loads(Path(p).read_text("utf-8"))
    except (OSError, ValueError):
        return None


def sha256(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a sorted relative posix path."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def verdict(ctx, job, entry) -> tuple[int, list]:
    """The bundle's verdict (exit code 3 when INVALID), recomputed from the per-scene score files (whose bytes the
    lock's score entries vouch for) and the gate in the bundle's slice: never taken from a flag someone could edit."""
    folder = ctx.story.rel(ctx.path(f"submission/{job.params['story']['id']}"))
    scores = {}
    for s in job.params["scenes"]:
        try:
            doc = read_json(ctx.output(f"score[{s['id']}]", ".json"))
        except StorycError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("score"), (int, float)):
            return 1, [f"error: no score for scene {s['id']}: rebuild with `storyc build`"]
        scores[s["id"]] = float(doc["score"])
    gate = Gate.of(scores.values(), job.params["submission"]["min_aesthetic"])
    entry = job.settings.get("rules", "competition") == "competition"
    rules = ("by the competition's rules (8 images, mean >= 6)" if entry else
             "by its own gate (submission.rules: none: not a competition entry, whose gate is a mean of 6)")
    if gate.valid:
        return 0, [f"submission VALID {rules}: mean aesthetic {gate.mean:.3f} >= {gate.minimum:g} -> {folder}/"]
    weakest = ", ".join(f"{s} ({v:.2f})" for s, v in sorted(scores.items(), key=lambda kv: kv[1])[:3])
    return 3, [f"error: submission INVALID {rules}: mean aesthetic {gate.mean:.3f} < {gate.minimum:g} (weakest: "
               f"{weakest}); the bundle is written to {folder}/ and marked invalid",
               "hint: rework the weakest scenes (prompt, seed, or generation.candidates) and build again"]
