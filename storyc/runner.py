"""Stale-stage scheduling: decide what must run and why (cheapest checks first), run it, record the lock.

Stages plug in by kind: ``storyc.stages.<kind>`` provides ``run(ctx, names)`` and calls ``ctx.finish(name,
outputs, extra)`` as each stage (each scene, for generate/score) completes, so an interruption loses at most
the stage in flight.
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path

from . import __version__
from .compiler import Plan, write_plan
from .errors import StageError, StorycError
from .lock import Hasher, Lock, digest, lock_path
from .progress import Reporter
from .render import atomic_write, canonical_json

KINDS = ("ingest", "filter", "train", "generate", "score", "bundle")


def stage_models(plan: Plan, name: str) -> tuple:
    """Model keys whose weights a stage's output depends on."""
    st = plan.stages[name]
    if st.kind == "ingest":
        return ("dataset",) if plan.story.dataset_path is not None else ()
    if st.kind == "train":
        return ("kolors", "vae")
    if st.kind == "generate":
        return ("kolors", "aesthetic") if plan.story.data["generation"]["candidates"] > 1 else ("kolors",)
    if st.kind == "score":
        return ("aesthetic",)
    return ()


def _diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if old.get(k) != new.get(k):
                sub = _diff(old.get(k), new.get(k), f"{prefix}{k}.")
                out.extend(sub if sub and len(sub) <= 3 else [f"{prefix}{k}"])
        return out
    return [prefix.rstrip(".")] if old != new else []


class Context:
    """What a stage executor gets: the plan, folders, models, the lock, progress."""

    def __init__(self, plan: Plan, args, lock: Lock, hasher: Hasher, reporter: Reporter):
        self.plan, self.story, self.build_dir = plan, plan.story, plan.build_dir
        self.args = args
        cache = getattr(args, "cache", None)
        self.cache_dir = Path(cache).resolve() if cache else plan.story.root / ".storyc" / "cache"
        self.device = getattr(args, "device", None)
        self.lock, self.hasher, self.report = lock, hasher, reporter
        self.finished: list[str] = []

    # ---- models
    def model_path(self, key: str) -> Path | None:
        ref = self.story.models.get(key)
        return ref.path if ref is not None else None

    def model(self, key: str) -> Path:
        """A usable local folder for ``models.<key>``: builds tiny models, downloads modelscope ones."""
        ref = self.story.models[key]
        if ref.scheme == "tiny":
            from .models import tiny

            if not (ref.path / ".complete").exists():
                self.report.info(f"     building tiny random-init model `{ref.name}` in {self.story.rel(ref.path)}")
            return tiny.ensure(ref.name, ref.path)
        if ref.scheme == "modelscope":
            from .models.download import snapshot

            return snapshot(ref.name, self.story.root / ".storyc" / "models")
        from .models.kolors import check_folder

        check_folder(key, ref.path)
        return ref.path

    def fingerprint(self, key: str) -> str | None:
        if key == "dataset":  # source content of a folder/jsonl dataset (captions included)
            p = self.story.dataset_path
            if p is None or not p.exists():
                return None
            return self.hasher.tree(p.parent if p.is_file() else p)
        ref = self.story.models.get(key)
        if ref is None:
            return None
        path = ref.path
        if ref.scheme == "modelscope":
            path = self.story.root / ".storyc" / "models" / ref.name
        if path is None or not path.exists() or (ref.scheme == "tiny" and not (path / ".complete").exists()):
            return None
        return self.hasher.tree(path)

    # ---- lock
    def record(self, p: Path) -> dict:
        """What the lock keeps of one output: sha256 and size of a file, tree digest and count of a folder."""
        if p.is_dir():
            return {"sha256": self.hasher.tree(p), "files": sum(1 for f in p.rglob("*") if f.is_file()
                                                                 and not f.name.startswith("."))}
        return {"sha256": self.hasher.file(p), "size": p.stat().st_size}

    def upstream(self, name: str) -> dict:
        return self.lock.entry(name) or {}

    def path(self, rel: str) -> Path:
        return self.build_dir / rel

    def finish(self, name: str, outputs: list[str], extra: dict | None = None) -> None:
        """Record a finished stage in the lock (and save it) right away."""
        st = self.plan.stages[name]
        outs = {}
        for rel in sorted(outputs):
            outs[rel] = self.record(self.build_dir / rel)
        extra = extra or {}
        entry = {
            "params": st.params, "params_hash": st.params_hash, "storyc": __version__,
            "deps": {d: (self.lock.entry(d) or {}).get("digest") for d in st.deps},
            "models": {k: self.fingerprint(k) for k in stage_models(self.plan, name)},
            "outputs": outs, "digest": digest({"outputs": outs, "extra": extra.get("digest_extra")}),
        }
        if extra:
            entry["extra"] = {k: v for k, v in extra.items() if k != "digest_extra"} or None
            if entry["extra"] is None:
                del entry["extra"]
        self.lock.stages[name] = entry
        self.lock.save(self.story.spec_path.name)
        self.hasher.save()
        self.finished.append(name)


def reasons(ctx: Context, name: str, will_run: set) -> list[str]:
    """Why stage ``name`` is stale (empty: up to date). Cheapest checks first, like DVC's status."""
    plan, st = ctx.plan, ctx.plan.stages[name]
    entry = ctx.lock.entry(name)
    if entry is None:
        return ["never built" if not ctx.lock.problem else "lock unreadable"]
    if not isinstance(entry.get("outputs"), dict) or not isinstance(entry.get("params"), dict):
        return ["lock entry is malformed"]
    out = []
    if entry.get("params_hash") != st.params_hash:
        changed = _diff(entry.get("params"), st.params)
        own = {"prompt", "negative_prompt", "seeds", "file"}  # keys that come from the scene itself
        scene = (f"scenes[{[s.id for s in plan.story.scenes].index(st.scene)}]: "
                 if st.scene and changed and all(c.split(".")[0] in own for c in changed) else "")
        out.append(f"{scene}{', '.join(changed) or 'stage version'} changed")
    for d in st.deps:
        if d in will_run:
            out.append(f"upstream {d} will rerun")
        elif (ctx.lock.entry(d) or {}).get("digest") != (entry.get("deps") or {}).get(d):
            out.append(f"output of {d} changed")
    for rel, rec in entry["outputs"].items():
        p = ctx.build_dir / rel
        if not p.exists():
            out.append(f"{rel} missing")
        elif not isinstance(rec, dict) or (p.is_file() and p.stat().st_size != rec.get("size")):
            out.append(f"{rel} was modified")
    if out:
        return out
    for key in stage_models(plan, name):
        fp = ctx.fingerprint(key)
        what = "dataset source" if key == "dataset" else f"model {key}"
        if fp is None:
            out.append(f"{what} not available yet")
        elif fp != (entry.get("models") or {}).get(key):
            out.append(f"{what} changed" if key == "dataset" else f"{what} fingerprint changed")
    for rel, rec in entry["outputs"].items():
        if ctx.record(ctx.build_dir / rel).get("sha256") != rec.get("sha256"):
            out.append(f"{rel} was modified")
    return out


def _matches(name: str, sel: str, plan: Plan) -> bool:
    return name == sel or plan.stages[name].kind == sel


def _closure(plan: Plan, targets: set) -> set:
    keep, todo = set(), list(targets)
    while todo:
        n = todo.pop()
        if n not in keep:
            keep.add(n)
            todo.extend(plan.stages[n].deps)
    return keep


def _select(plan: Plan, sel: str | None) -> set:
    if not sel:
        return set(plan.stages)
    targets = {n for n in plan.stages if _matches(n, sel, plan)}
    if not targets:
        from .errors import did_you_mean

        names = list(plan.stages) + list(KINDS)
        raise StorycError(f"no stage `{sel}`", did_you_mean(sel, names) or f"stages: {', '.join(KINDS)}")
    return _closure(plan, targets)


def _open(plan: Plan, args, reporter=None):
    lock = Lock.load(lock_path(plan.story.spec_path))
    hasher = Hasher(plan.story.root / ".storyc" / "fingerprints.json")
    ctx = Context(plan, args, lock, hasher, reporter or Reporter(quiet=True))
    return ctx


def status(plan: Plan, args) -> int:
    write_plan(plan)
    ctx = _open(plan, args)
    if ctx.lock.problem:
        print(f"warning: {ctx.lock.problem}")
    stale = set()
    rows = []
    for name in plan.stages:
        why = reasons(ctx, name, stale)
        if why:
            stale.add(name)
        rows.append((name, "stale" if why else "up to date", "; ".join(why)))
    ctx.hasher.save()
    width = max(len(r[0]) for r in rows)
    for name, state, why in rows:
        print(f"{name:<{width}}  {state:<10}  {why}".rstrip())
    print(f"{len(stale)} of {len(rows)} stages stale" if stale else "everything up to date")
    return 0


def build(plan: Plan, args) -> int:
    reporter = Reporter(quiet=getattr(args, "quiet", False))
    written = write_plan(plan)
    ctx = _open(plan, args, reporter)
    for n in plan.notes:
        reporter.info(f"note: {n}")
    if ctx.lock.problem:
        reporter.line(f"warning: {ctx.lock.problem}")
    only = getattr(args, "only", None)
    selected = _select(plan, only or getattr(args, "until", None))
    force = getattr(args, "force", None)
    forced = set(plan.stages) if force == "all" else ({n for n in plan.stages if _matches(n, force, plan)} if force else set())
    if force and force != "all" and not forced:
        _select(plan, force)  # raises with a did-you-mean
    dry = getattr(args, "dry_run", False)
    keep_going = getattr(args, "keep_going", False)

    state: dict[str, str] = {}
    will_run: set = set()
    failures: list[str] = []
    for kind in KINDS:
        members = [n for n in plan.stages if plan.stages[n].kind == kind and n in selected]
        todo: dict[str, list[str]] = {}
        for n in members:
            if any(state.get(d) in ("failed", "blocked") for d in plan.stages[n].deps):
                state[n] = "blocked"
                continue
            why = ["forced"] if n in forced else reasons(ctx, n, will_run)
            if why:
                todo[n] = why
            else:
                state[n] = "up to date"
        if not todo:
            continue
        if dry:
            for n, why in todo.items():
                reporter.line(f"would run {n}: {'; '.join(why)}")
                state[n] = "would run"
            will_run |= set(todo)
            continue
        from .stages._quiet import quiet_libraries

        quiet_libraries()
        executor = importlib.import_module(f".stages.{kind}", __package__)
        label = kind if len(todo) > 1 else next(iter(todo))
        reporter.start(label, sorted({r for why in todo.values() for r in why})[:4] if len(todo) > 1 else todo[label])
        t0 = time.monotonic()
        before = len(ctx.finished)
        try:
            note = executor.run(ctx, list(todo))
        except KeyboardInterrupt:
            reporter.stop()
            _report(ctx, state | {n: "ran" for n in ctx.finished[before:]}, written)
            raise
        except StorycError as e:
            reporter.stop()
            done = set(ctx.finished[before:])
            for n in todo:
                state[n] = "ran" if n in done else "failed"
            failures.append(str(e) + (f"\nhint: {e.hint}" if e.hint else ""))
            reporter.line(f"error: {e}")
            if e.hint:
                reporter.line(f"hint: {e.hint}")
            if not keep_going:
                break
            continue
        done = set(ctx.finished[before:])
        missing = [n for n in todo if n not in done]
        if missing:
            raise StageError(kind, f"executor did not finish {', '.join(missing)}")
        for n in todo:
            state[n] = "ran"
        reporter.done(label, time.monotonic() - t0, note or "")
    ctx.hasher.save()
    _report(ctx, state, written)
    ran = [n for n, s in state.items() if s == "ran"]
    if dry:
        reporter.line(f"dry run: {len([s for s in state.values() if s == 'would run'])} stage(s) would run; nothing changed")
        return 0
    reporter.info(f"{len(ran)} stage(s) ran, {len([s for s in state.values() if s == 'up to date'])} up to date"
                  + (f", {len(failures)} failed" if failures else ""))
    if failures:
        reporter.line("finished outputs are kept; fix the problem and run the same command to resume")
        return 1
    return _verdict(ctx, reporter, selected)


def _report(ctx: Context, state: dict, written) -> None:
    """build_report.json: what the last build did (tests and CI read it, not timings)."""
    doc = {"format": "storyc.build_report/1", "compiled": sorted(written),
           "stages": {n: state.get(n, "not selected") for n in ctx.plan.stages}}
    atomic_write(ctx.build_dir / "build_report.json", canonical_json(doc))


def _verdict(ctx: Context, reporter: Reporter, selected: set) -> int:
    entry = ctx.lock.entry("bundle")
    if "bundle" not in selected or not entry:
        return 0
    extra = entry.get("extra") or {}
    folder = ctx.story.rel(ctx.build_dir / "submission" / ctx.story.id)
    mean, gate = extra.get("mean_aesthetic"), extra.get("min_aesthetic")
    if extra.get("valid"):
        reporter.line(f"submission VALID: mean aesthetic {mean:.3f} >= {gate:g} -> {folder}/")
        return 0
    weakest = ", ".join(f"{s} ({v:.2f})" for s, v in (extra.get("weakest") or []))
    reporter.line(f"error: submission INVALID: mean aesthetic {mean:.3f} < {gate:g} (weakest: {weakest}); "
                  f"the bundle is written to {folder}/ and marked invalid")
    reporter.line("hint: rework the weakest scenes (prompt, seed, or generation.candidates) and build again")
    return 3
