"""Stale-stage scheduling over the stage graph: decide what must run and why, run it, record the lock.

The Python API (the CLI, tests and sweep trials call it; none passes argparse values):
    decide(plan, lock, opts) -> [Decision]   what is stale and why (status, --dry-run); reads no weights
    execute(plan, opts)      -> BuildResult  run the stale stages; the lock is written after every finished stage
Executors are ``storyc.stages.<kind>.run(ctx, jobs)``; each yields a ``Result`` per finished stage (each scene, for
generate/score), so an interruption loses at most the stage in flight. Any exception inside a stage is caught
there, turned into a clear error (or an honest internal error), recorded in the build report, and
``keep_going`` is honoured.
"""
from __future__ import annotations

import errno
import importlib
import os
import time
import traceback
from dataclasses import dataclass, field

from . import __version__
from .compiler import Plan, changed_artifacts, write_plan
from .context import Context
from .errors import StorycError, did_you_mean
from .lock import Hasher, Lock, LockEntry, digest
from .locks import exclusive
from .options import RunOptions
from .progress import Reporter
from .render import atomic_write, canonical_json
from .stages.registry import KINDS, Result, StageSpec


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


@dataclass(frozen=True)
class Failure:
    stage: str  # the kind, or the stage name
    message: str
    hint: str | None = None
    internal: bool = False  # a bug in storyc rather than in the input or the environment


@dataclass
class BuildResult:
    states: dict  # stage -> ran | up to date | would run | failed | blocked | skipped | not selected
    failures: list = field(default_factory=list)
    written: list = field(default_factory=list)  # compiled artifacts that changed
    verdict: int = 0  # exit code from the stages' verdicts (3: the submission is INVALID)
    verdict_lines: list = field(default_factory=list)

    @property
    def ran(self) -> list:
        return [n for n, s in self.states.items() if s == "ran"]

    @property
    def exit_code(self) -> int:
        if self.failures:
            return 2 if any(f.internal for f in self.failures) else 1
        return self.verdict


# ---------------------------------------------------------------- opening a build

def open_context(plan: Plan, opts: RunOptions, reporter: Reporter | None = None) -> Context:
    if opts.build_dir is not None and opts.build_dir.resolve() != plan.build_dir.resolve():
        raise ValueError(f"RunOptions.build_dir {opts.build_dir} differs from the plan's {plan.build_dir}; "
                         "compile with the same build_dir")
    lock = Lock.load(opts.lock_for(plan.story))
    hasher = Hasher(plan.story.root / ".storyc" / "fingerprints.json")
    return Context(plan, opts, lock, hasher, reporter or Reporter(quiet=True, live=False))


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


def models_of(ctx: Context, job: StageSpec) -> tuple:
    return KINDS[job.kind].models(job, ctx.story)


def dep_digest(ctx: Context, job: StageSpec, dep: str) -> str | None:
    """What ``job`` depends on of upstream ``dep``: its digest, or of the outputs ``job`` reads."""
    e = ctx.lock.entry(dep)
    if e is None:
        return None
    if dep not in job.reads:
        return e.digest
    return digest({rel: e.outputs.get(rel) for rel in job.reads[dep]})


def reasons(ctx: Context, job: StageSpec, will_run: set) -> list[str]:
    """Why stage ``job`` is stale (empty: up to date). Cheapest checks first, like DVC's status."""
    plan, name = ctx.plan, job.name
    entry = ctx.lock.entry(name)
    if entry is None:
        if name in ctx.lock.malformed:
            return ["lock entry is malformed"]
        return ["never built" if not ctx.lock.problem else "lock unreadable"]
    out = []
    if entry.params_hash != job.params_hash:
        changed = _diff(entry.params, job.params)
        own = {"prompt", "negative_prompt", "seeds", "file"}  # keys that come from the scene itself
        scene = (f"scenes[{[s.id for s in plan.story.scenes].index(job.scene)}]: "
                 if job.scene and changed and all(c.split(".")[0] in own for c in changed) else "")
        out.append(f"{scene}{', '.join(changed) or 'stage version'} changed")
    for d in job.deps:  # an upstream stage that will rerun is the caller's "may rerun", not a reason here
        if d not in will_run and dep_digest(ctx, job, d) != entry.deps.get(d):
            out.append(f"output of {d} changed")
    missing = []
    for rel, rec in entry.outputs.items():
        p = ctx.build_dir / rel
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
    for key in models_of(ctx, job):
        fp = ctx.fingerprint(key)
        what = {"dataset": "dataset source", "font": "caption font"}.get(key, f"model {key}")
        if fp is None:
            out.append(f"{what} not available yet")
        elif fp != entry.models.get(key):
            out.append(f"{what} changed" if key in ("dataset", "font") else f"{what} fingerprint changed")
    for rel, rec in entry.outputs.items():
        if ctx.record(ctx.build_dir / rel).get("sha256") != rec.get("sha256"):
            out.append(f"{rel} was modified")
    return out


def _matches(plan: Plan, name: str, sel: str) -> bool:
    return name == sel or plan.stages[name].kind == sel


def _closure(plan: Plan, targets: set) -> set:
    keep, todo = set(), list(targets)
    while todo:
        n = todo.pop()
        if n not in keep:
            keep.add(n)
            todo.extend(plan.stages[n].deps)
    return keep


def _named(plan: Plan, sel: str) -> set:
    found = {n for n in plan.stages if _matches(plan, n, sel)}
    if not found:
        names = list(plan.stages) + list(KINDS)
        raise StorycError(f"no stage `{sel}`", did_you_mean(sel, names) or f"stages: {', '.join(KINDS)}")
    return found


def selected(plan: Plan, opts: RunOptions) -> set:
    return _closure(plan, _named(plan, opts.target)) if opts.target else set(plan.stages)


def forced(plan: Plan, opts: RunOptions) -> set:
    if not opts.force:
        return set()
    return set(plan.stages) if opts.force == "all" else _named(plan, opts.force)


def order(plan: Plan) -> list[str]:
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


def _decide(ctx: Context, opts: RunOptions) -> list[Decision]:
    """Stale: the stage's own inputs changed. May rerun: only an upstream stage will rerun, and whether its
    output comes out different is known after it ran (a filter edit that keeps the same images stops there)."""
    plan = ctx.plan
    sel, force = selected(plan, opts), forced(plan, opts)
    will_run: set = set()
    out = []
    for name in order(plan):
        if name not in sel:
            continue
        job = plan.stages[name]
        why = ["forced"] if name in force else reasons(ctx, job, will_run)
        ups = [d for d in job.deps if d in will_run]
        if why or ups:
            will_run.add(name)
        if why:
            out.append(Decision(name, True, tuple(why)))
        elif ups:
            out.append(Decision(name, False, (f"if the output of {_names(plan, ups)} changes",), tuple(ups)))
        else:
            out.append(Decision(name, False, ()))
    return out


def _names(plan: Plan, names: list) -> str:
    """Stage names, a kind's many stages collapsed: "score (8 scenes)" rather than eight names."""
    by_kind: dict = {}
    for n in names:
        by_kind.setdefault(plan.stages[n].kind, []).append(n)
    parts = [f"{k} ({len(ns)} scenes)" if len(ns) > 1 else ns[0] for k, ns in by_kind.items()]
    return " or ".join(parts)


def decide(plan: Plan, lock: Lock | None = None, opts: RunOptions = RunOptions()) -> list[Decision]:
    """Each selected stage, stale or not and why, as a build with ``opts`` would see it. Runs and writes nothing."""
    ctx = open_context(plan, opts)
    if lock is not None:
        ctx.lock = lock
    return _decide(ctx, opts)


# ---------------------------------------------------------------- errors inside a stage

def explain(e: BaseException, kind: str) -> Failure:
    """Turn any exception raised inside a stage into what the user reads."""
    if isinstance(e, StorycError):
        return Failure(kind, str(e), e.hint)
    name, text = type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else ""
    if name == "OutOfMemoryError" or (isinstance(e, RuntimeError) and "out of memory" in text.lower()):
        hint = KINDS[kind].oom_hint if kind in KINDS else ""
        return Failure(kind, f"stage {kind}: out of GPU memory ({text[:160]})",
                       (hint + "; " if hint else "") + "finished outputs are kept: run the same command to resume")
    if isinstance(e, MemoryError):
        return Failure(kind, f"stage {kind}: out of memory (RAM)",
                       "close other programs or lower the batch size; finished outputs are kept")
    if isinstance(e, OSError):
        path = e.filename or ""
        where = f" {path}" if path else ""
        if e.errno == errno.ENOSPC:
            return Failure(kind, f"stage {kind}: no space left on the device writing{where}",
                           "free disk space, then run the same command to resume")
        if isinstance(e, PermissionError):
            return Failure(kind, f"stage {kind}: permission denied:{where}",
                           "make that path writable (or readable) for this user, then run the same command")
        if isinstance(e, FileNotFoundError):
            return Failure(kind, f"stage {kind}: no such file:{where}",
                           "a file the stage needs is missing; `storyc build --force` rebuilds it")
        return Failure(kind, f"stage {kind}: {e.strerror or name}:{where}", "check the path and run the same command")
    return Failure(kind, f"stage {kind}: internal error: {name}: {text}",
                   "this is a storyc bug; the traceback is in build_error.log in the build folder "
                   "(rerun with STORYC_DEBUG=1 to raise it) — please report it", internal=True)


def _log_traceback(ctx: Context, kind: str, e: BaseException) -> None:
    try:
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        atomic_write(ctx.build_dir / "build_error.log", f"stage {kind}, storyc {__version__}\n{text}")
    except OSError:
        pass


# ---------------------------------------------------------------- running

def record(ctx: Context, job: StageSpec, res: Result) -> LockEntry:
    """Write a finished stage into the lock (and save it) right away."""
    outs = {rel: ctx.record(ctx.build_dir / rel) for rel in sorted(res.outputs)}
    deps = {d: dep_digest(ctx, job, d) for d in job.deps}
    entry = LockEntry(params=job.params, params_hash=job.params_hash, storyc=__version__, deps=deps,
                      models={k: ctx.fingerprint(k) for k in models_of(ctx, job)}, outputs=outs,
                      digest=digest({"outputs": outs, "extra": res.digest_facts}), extra=res.facts or None)
    ctx.lock.put(job.name, entry)
    ctx.lock.save(ctx.story.spec_path.name)
    ctx.hasher.save()
    return entry


def _run_group(ctx: Context, kind: str, todo: dict, state: dict) -> tuple[str | None, Failure | None]:
    """Run one executor over ``todo`` (name -> reasons); record each result. Returns (note, failure)."""
    from .stages._quiet import quiet_libraries

    jobs = [ctx.plan.stages[n] for n in todo]
    done: set = set()
    try:
        quiet_libraries()
        executor = importlib.import_module(f".stages.{kind}", __package__)
        gen = executor.run(ctx, jobs)
        note = None
        while True:
            try:
                res = next(gen)
            except StopIteration as stop:
                note = stop.value
                break
            if res.name not in todo or res.name in done:
                raise RuntimeError(f"executor {kind} reported an unexpected stage {res.name}")
            record(ctx, ctx.plan.stages[res.name], res)
            done.add(res.name)
            state[res.name] = "ran"
        missing = [n for n in todo if n not in done]
        if missing:
            raise RuntimeError(f"executor {kind} did not finish {', '.join(missing)}")
        return note, None
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - every failure inside a stage is reported, not a crash
        if os.environ.get("STORYC_DEBUG"):
            raise
        failure = explain(e, kind)
        if failure.internal:
            _log_traceback(ctx, kind, e)
        for n in todo:
            if n not in done:
                state[n] = "failed"
        return None, failure


def execute(plan: Plan, opts: RunOptions = RunOptions(), reporter: Reporter | None = None) -> BuildResult:
    """Compile the plan's artifacts to disk, then run what is stale (or, with ``dry_run``, say what would).
    A build holds its build folder exclusively: a second build of it refuses, naming the holder."""
    if opts.dry_run:
        return _execute(plan, opts, reporter)
    with exclusive(plan.build_dir / ".storyc-build.lock", f"a build of {plan.story.rel(plan.build_dir)}/"):
        return _execute(plan, opts, reporter)


def _execute(plan: Plan, opts: RunOptions, reporter: Reporter | None) -> BuildResult:
    reporter = reporter or Reporter(quiet=opts.quiet, live=opts.live)
    if opts.dry_run:  # writes nothing: not the compiled files, the lock, the report or the fingerprint cache
        return _dry_run(plan, opts, reporter)
    written = write_plan(plan)
    ctx = open_context(plan, opts, reporter)
    if ctx.lock.problem:
        reporter.line(f"warning: {ctx.lock.problem}")
    result = BuildResult(states={}, written=written)
    state = result.states
    sel, force = selected(plan, opts), forced(plan, opts)
    ctx.forced = force
    pending = [n for n in order(plan) if n in sel]
    times: dict = {}
    t_build = time.monotonic()
    try:
        while pending:
            # the next group: ready stages of the first ready kind (all scenes of generate run as one batch)
            ready = [n for n in pending if all(d in state or d not in sel for d in plan.stages[n].deps)]
            kind = plan.stages[ready[0]].kind
            group = [n for n in ready if plan.stages[n].kind == kind]
            pending = [n for n in pending if n not in group]
            todo: dict[str, list[str]] = {}
            for n in group:
                if any(state.get(d) in ("failed", "blocked") for d in plan.stages[n].deps):
                    state[n] = "blocked"
                    continue
                why = ["forced"] if n in force else reasons(ctx, plan.stages[n], set())
                if why:
                    todo[n] = why
                else:
                    state[n] = "up to date"
            if not todo:
                continue
            label = kind if len(todo) > 1 else next(iter(todo))
            reporter.start(label, sorted({r for why in todo.values() for r in why})[:4] if len(todo) > 1 else todo[label])
            t0 = time.monotonic()
            _gpu_peak_reset()
            note, failure = _run_group(ctx, kind, todo, state)
            times[label] = {"seconds": round(time.monotonic() - t0, 3), "stages": len(todo),
                            "peak_gpu_gib": _gpu_peak()}
            if failure is None:
                reporter.done(label, time.monotonic() - t0, note or "")
                continue
            reporter.stop()
            result.failures.append(failure)
            reporter.line(f"error: {failure.message}")
            if failure.hint:
                reporter.line(f"hint: {failure.hint}")
            if not opts.keep_going:
                for n in pending:
                    state[n] = "skipped"
                break
    except KeyboardInterrupt:
        reporter.stop()
        _report(ctx, state, written)
        raise
    ctx.hasher.save()
    _report(ctx, state, written)
    _write_times(ctx, times, time.monotonic() - t_build)
    if not result.failures:
        result.verdict, result.verdict_lines = _verdicts(ctx, sel)
    return result


def _dry_run(plan: Plan, opts: RunOptions, reporter: Reporter) -> BuildResult:
    ctx = open_context(plan, opts, reporter)
    if ctx.lock.problem:
        reporter.line(f"warning: {ctx.lock.problem}")
    result = BuildResult(states={}, written=changed_artifacts(plan))
    for rel in result.written:
        reporter.line(f"would write {plan.story.rel(plan.build_dir / rel)}")
    decisions = _decide(ctx, opts)
    maybe: dict = {}  # kind -> its may-run stages: one line per kind, not one per scene
    for d in decisions:
        result.states[d.name] = "would run" if d.stale else "may run" if d.maybe else "up to date"
        if d.stale:
            reporter.line(f"would run {d.name}: {'; '.join(d.reasons)}")
        elif d.maybe:
            maybe.setdefault(plan.stages[d.name].kind, []).append(d)
    for kind, ds in maybe.items():
        if len(ds) == 1:
            reporter.line(f"may run   {ds[0].name}: {ds[0].reasons[0]}")
            continue
        ups = sorted({u for d in ds for u in d.upstream}, key=list(plan.stages).index)
        reporter.line(f"may run   {kind} ({len(ds)} scenes): if the output of {_names(plan, ups)} changes")
    return result


def _report(ctx: Context, state: dict, written) -> None:
    """build_report.json: what the last build did (tests and CI read it, not timings)."""
    doc = {"format": "storyc.build_report/1", "compiled": sorted(written),
           "stages": {n: state.get(n, "not selected") for n in ctx.plan.stages}}
    try:
        atomic_write(ctx.build_dir / "build_report.json", canonical_json(doc))
    except OSError:
        pass  # the failure that made the folder unwritable is already reported


def _gpu_peak_reset() -> None:
    import sys

    torch = sys.modules.get("torch")  # never imported here: only measured when a stage already uses it
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak() -> float | None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return None


def _write_times(ctx: Context, times: dict, total: float) -> None:
    """build_times.json: how long each stage group took, its peak GPU memory, and the executors' own timings
    (model loads, cache pass, s/step). Not an output: it changes every run."""
    doc = {"format": "storyc.build_times/1", "total_s": round(total, 3), "stages": times, "metrics": ctx.metrics}
    try:
        atomic_write(ctx.build_dir / "build_times.json", canonical_json(doc))
    except OSError:
        pass


def _verdicts(ctx: Context, sel: set) -> tuple[int, list]:
    """Stages that judge the build (the bundle's aesthetic gate) say their verdict from their own facts."""
    code, lines = 0, []
    for name in order(ctx.plan):
        job = ctx.plan.stages[name]
        entry = ctx.lock.entry(name)
        if name in sel and KINDS[job.kind].verdict and entry is not None:
            module = importlib.import_module(f".stages.{job.kind}", __package__)
            c, ls = module.verdict(ctx, job, entry)
            code, lines = max(code, c), lines + ls
    return code, lines


# ---------------------------------------------------------------- the CLI's views

def build(plan: Plan, opts: RunOptions) -> int:
    reporter = Reporter(quiet=opts.quiet, live=opts.live)
    res = execute(plan, opts, reporter)
    st = res.states
    if opts.dry_run:
        maybe = sum(1 for s in st.values() if s == "may run")
        reporter.line(f"dry run: {sum(1 for s in st.values() if s == 'would run')} stage(s) would run"
                      + (f", {maybe} may run if their inputs come out different" if maybe else "")
                      + "; nothing was written")
        return 0
    reporter.info(f"{len(res.ran)} stage(s) ran, {sum(1 for s in st.values() if s == 'up to date')} up to date"
                  + (f", {len(res.failures)} failed" if res.failures else ""))
    if res.failures:
        reporter.line("finished outputs are kept; fix the problem and run the same command to resume")
    for ln in res.verdict_lines:
        reporter.line(ln)
    return res.exit_code


def status(plan: Plan, opts: RunOptions) -> int:
    """Each stage up to date, stale or may rerun, and why. Writes nothing (a test hashes the project)."""
    ctx = open_context(plan, opts)
    if ctx.lock.problem:
        print(f"warning: {ctx.lock.problem}")
    changed = changed_artifacts(plan)
    if changed:
        print(f"compiled files out of date: {', '.join(changed)} (`storyc compile` or a build writes them)")
    rows = [(d.name, d.state, "; ".join(d.reasons)) for d in _decide(ctx, opts)]
    width = max(len(r[0]) for r in rows)
    for name, state, why in rows:
        print(f"{name:<{width}}  {state:<10}  {why}".rstrip())
    stale, maybe = (sum(1 for r in rows if r[1] == k) for k in ("stale", "may rerun"))
    if not stale and not maybe:
        print("everything up to date")
    else:
        print(f"{stale} of {len(rows)} stages stale" + (f", {maybe} may rerun if their inputs come out different"
                                                       if maybe else ""))
    return 0
