"""The stage graph and what is stale in it: order, selection (--until / run STAGE), forcing, and each stage's
reasons to rerun. Writes nothing and runs nothing: ``status``, ``--dry-run`` and the runner ask here.

A stage is *stale* when its own inputs changed (its slice, an upstream output it reads, a model, its outputs on
disk); it *may rerun* when only an upstream stage will rerun (whether that output comes out different is known
after it ran: a filter edit that keeps the same images stops there). Checks run cheapest first, like DVC's status.
``probe`` is what can look at the project: the lock, output records and model fingerprints (a runner Context).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import StorycError, did_you_mean
from .lock import digest
from .stages.registry import KINDS, StageSpec


@dataclass(frozen=True)
class Decision:
    name: str
    stale: bool  # its own inputs changed (or forced): it will run
    reasons: tuple  # why it is stale, or why it may rerun (empty: up to date)
    upstream: tuple = ()  # not stale: the upstream stages that will rerun (it reruns if their output changes)

    @property
    def maybe(self) -> bool:
        return not self.stale and bool(self.upstream)

    @property
    def state(self) -> str:
        return "stale" if self.stale else "may rerun" if self.maybe else "up to date"


# ---------------------------------------------------------------- the graph

def order(plan) -> list[str]:
    """The stages in dependency order (compile's order where the graph allows it)."""
    done, out, pending = set(), [], list(plan.stages)
    while pending:
        ready = [n for n in pending if all(d in done for d in plan.stages[n].deps)]
        if not ready:
            raise StorycError(f"the stage graph has a cycle among {', '.join(pending)}")
        for n in ready:
            done.add(n)
            out.append(n)
        pending = [n for n in pending if n not in done]
    return out


def _named(plan, sel: str) -> set:
    found = {n for n in plan.stages if n == sel or plan.stages[n].kind == sel}
    if not found:
        names = list(plan.stages) + list(KINDS)
        raise StorycError(f"no stage `{sel}`", did_you_mean(sel, names) or f"stages: {', '.join(KINDS)}")
    return found


def _closure(plan, targets: set) -> set:
    keep, todo = set(), list(targets)
    while todo:
        n = todo.pop()
        if n not in keep:
            keep.add(n)
            todo.extend(plan.stages[n].deps)
    return keep


def selected(plan, target: str | None) -> set:
    """The target (a stage or a kind) and everything it needs; every stage without one."""
    return _closure(plan, _named(plan, target)) if target else set(plan.stages)


def forced(plan, force: str | None) -> set:
    if not force:
        return set()
    return set(plan.stages) if force == "all" else _named(plan, force)


def names(plan, stages: list) -> str:
    """Stage names, a kind's many stages collapsed: "score (8 scenes)" rather than eight names."""
    by_kind: dict = {}
    for n in stages:
        by_kind.setdefault(plan.stages[n].kind, []).append(n)
    return " or ".join(f"{k} ({len(ns)} scenes)" if len(ns) > 1 else ns[0] for k, ns in by_kind.items())


# ---------------------------------------------------------------- staleness

def _diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if old.get(k) != new.get(k):
                sub = _diff(old.get(k), new.get(k), f"{prefix}{k}.")
                out.extend(sub if sub and len(sub) <= 3 else [f"{prefix}{k}"])
        return out
    return [prefix.rstrip(".")] if old != new else []


def models_of(probe, job: StageSpec) -> tuple:
    return KINDS[job.kind].models(job, probe.story)


def dep_digest(probe, job: StageSpec, dep: str) -> str | None:
    """What ``job`` depends on of upstream ``dep``: its digest, or of the outputs ``job`` reads."""
    e = probe.lock.entry(dep)
    if e is None:
        return None
    if dep not in job.reads:
        return e.digest
    return digest({rel: e.outputs.get(rel) for rel in job.reads[dep]})


def reasons(probe, job: StageSpec, will_run: set) -> list[str]:
    """Why stage ``job`` is stale (empty: up to date)."""
    name = job.name
    entry = probe.lock.entry(name)
    if entry is None:
        if name in probe.lock.malformed:
            return ["lock entry is malformed"]
        return ["never built" if not probe.lock.problem else "lock unreadable"]
    out = []
    if entry.params_hash != job.params_hash:
        changed = _diff(entry.params, job.params)
        own = set(KINDS[job.kind].scene_keys)  # keys that come from the scene itself
        scene = (f"scenes[{[s.id for s in probe.story.scenes].index(job.scene)}]: "
                 if job.scene and changed and all(c.split(".")[0] in own for c in changed) else "")
        out.append(f"{scene}{', '.join(changed) or 'stage version'} changed")
    for d in job.deps:  # an upstream stage that will rerun is the caller's "may rerun", not a reason here
        if d not in will_run and dep_digest(probe, job, d) != entry.deps.get(d):
            out.append(f"output of {d} changed")
    missing = []
    for rel, rec in entry.outputs.items():
        p = probe.build_dir / rel
        if not p.exists():
            missing.append(rel)
        elif p.is_file() and p.stat().st_size != rec.get("size"):
            out.append(f"{rel} was modified")
    if len(missing) > 2:  # a removed folder is one reason, not twenty
        out.append(f"{len(missing)} outputs missing ({missing[0]}, …)")
    else:
        out.extend(f"{rel} missing" for rel in missing)
    if out:
        return out
    for key in models_of(probe, job):
        fp = probe.fingerprint(key)
        char = key.split(":", 1)[1] if key.startswith("character:") else None
        labels = {"dataset": "dataset source", "font": "caption font", "captions": "captions file",
                  "validation": "validation folder"}
        what = f"character {char}'s reference images" if char else labels.get(key, f"model {key}")
        if fp is None:
            out.append(f"{what} not available yet" if not char else f"{what} missing")
        elif fp != entry.models.get(key):
            out.append(f"{what} changed" if key in labels or char else f"{what} fingerprint changed")
    for rel, rec in entry.outputs.items():
        if probe.record(probe.build_dir / rel).get("sha256") != rec.get("sha256"):
            out.append(f"{rel} was modified")
    return out


def decide(probe, target: str | None = None, force: str | None = None) -> list[Decision]:
    """Each selected stage: stale (and why), may rerun (and on what), or up to date."""
    plan = probe.plan
    sel, forced_ = selected(plan, target), forced(plan, force)
    will_run: set = set()
    out = []
    for name in order(plan):
        if name not in sel:
            continue
        job = plan.stages[name]
        why = ["forced"] if name in forced_ else reasons(probe, job, will_run)
        ups = [d for d in job.deps if d in will_run]
        if why or ups:
            will_run.add(name)
        if why:
            out.append(Decision(name, True, tuple(why)))
        elif ups:
            out.append(Decision(name, False, (f"if the output of {names(plan, ups)} changes",), tuple(ups)))
        else:
            out.append(Decision(name, False, ()))
    return out
