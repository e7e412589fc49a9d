"""Run a plan: its stale stages in order, each kind through its executor; the lock is written after every
finished stage, by the runner alone.

The Python API (the CLI, tests and sweep trials call it; none passes argparse values):
    decide(plan, lock, opts)               -> [Decision]   what is stale and why (status, --dry-run); reads no weights
    execute(plan, opts, executors=...)     -> BuildResult  run the stale stages (or, dry, say what would run)
    adopt(plan, opts, donor_lock, donor_build, stages)      seed a fresh build with another build's finished stages
An executor is ``run(ctx, jobs)`` (the kind's module by default; ``executors`` replaces the lookup, as the fast
tests do); it yields a ``Result`` per finished stage (each scene, for generate/score), so an interruption loses
at most the stage in flight. Any exception inside a stage is turned into a clear error (or an honest internal
error), recorded in the build report, and ``keep_going`` is honoured.
"""
from __future__ import annotations

import errno
import importlib
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from . import __version__
from .compiler import Plan, changed_artifacts, write_plan
from .context import Context
from .errors import StorycError
from .lock import Hasher, Lock, LockEntry, digest
from .mutex import exclusive
from .options import RunOptions
from .progress import Reporter
from .render import atomic_write, canonical_json
from .schedule import Decision, dep_digest, models_of, order, reasons
from .schedule import decide as _decide
from .schedule import forced, selected
from .stages.registry import KINDS, Result, StageSpec

__all__ = ["Decision", "BuildResult", "Failure", "decide", "execute", "adopt", "open_context"]


@dataclass(frozen=True)
class Failure:
    stage: str  # the kind, or the stage name
    message: str
    hint: str | None = None
    internal: bool = False  # a bug in storyc rather than in the input or the environment


@dataclass
class BuildResult:
    states: dict  # stage -> ran | up to date | would run | may run | failed | blocked | skipped | not selected
    failures: list = field(default_factory=list)
    written: list = field(default_factory=list)  # compiled artifacts that changed (dry run: that would change)
    decisions: list = field(default_factory=list)  # dry run: each stage's Decision
    verdict: int = 0  # exit code from the stages' verdicts (3: the submission is INVALID)
    verdict_lines: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)  # stage group -> what its executor said it did

    @property
    def ran(self) -> list:
        return [n for n, s in self.states.items() if s == "ran"]

    @property
    def exit_code(self) -> int:
        if self.failures:
            return 2 if any(f.internal for f in self.failures) else 1
        return self.verdict


def default_executor(kind: str) -> Callable:
    """The kind's executor as its declaration names it (imported only when the kind runs)."""
    return importlib.import_module(KINDS[kind].executor).run


# ---------------------------------------------------------------- opening a build

def open_context(plan: Plan, opts: RunOptions, reporter: Reporter | None = None) -> Context:
    if opts.build_dir is not None and opts.build_dir.resolve() != plan.build_dir.resolve():
        raise ValueError(f"RunOptions.build_dir {opts.build_dir} differs from the plan's {plan.build_dir}; "
                         "compile with the same build_dir")
    lock = Lock.load(opts.lock_for(plan.story))
    hasher = Hasher(plan.story.root / ".storyc" / "fingerprints.json")
    return Context(plan, opts, lock, hasher, reporter or Reporter(quiet=True, live=False))


def decide(plan: Plan, lock: Lock | None = None, opts: RunOptions = RunOptions()) -> list[Decision]:
    """Each selected stage, stale or not and why, as a build with ``opts`` would see it. Runs and writes nothing."""
    ctx = open_context(plan, opts)
    if lock is not None:
        ctx.lock = lock
    return _decide(ctx, opts.target, opts.force)


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
        where = f" {e.filename}" if e.filename else ""
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


# ---------------------------------------------------------------- the lock (written here only)

def record(ctx: Context, job: StageSpec, res: Result, before: dict | None = None) -> LockEntry:
    """Write a finished stage into the lock (and save it) right away. ``before``: the fingerprints of its models
    taken before it ran; those are recorded (an input edited while the stage ran is then seen as changed by the
    next build, never recorded as the one the outputs came from)."""
    outs = {rel: ctx.record(ctx.build_dir / rel) for rel in sorted(res.outputs)}
    deps = {d: dep_digest(ctx, job, d) for d in job.deps}
    models = {}
    for k in models_of(ctx, job):
        now, then = ctx.fingerprint(k), (before or {}).get(k)
        if k == "captions":  # the stage wrote them: what it left is what its outputs came from
            models[k] = now
            continue
        if then is not None and now != then:
            ctx.report.line(f"warning: {'the dataset source' if k == 'dataset' else 'model ' + k} changed while "
                            f"{job.name} ran; the next build runs it again")
        models[k] = then if then is not None else now
    entry = LockEntry(params=job.params, params_hash=job.params_hash, storyc=__version__, deps=deps,
                      models=models, outputs=outs,
                      digest=digest({"outputs": outs, "extra": res.digest_facts}), extra=res.facts or None)
    _put(ctx, job.name, entry)
    return entry


def _put(ctx: Context, name: str, entry: LockEntry) -> None:
    ctx.lock.put(name, entry)
    ctx.lock.save(ctx.story.spec_path.name)
    ctx.hasher.save()


def adopt(plan: Plan, opts: RunOptions, donor_lock: Lock, donor_build, stages: tuple) -> bool:
    """Give a fresh build another build's finished ``stages`` (a sweep's shared ingest + filter): hard links of
    their outputs and their lock entries, which the scheduler then checks like any other (a mismatch just reruns
    them). Only when this build has none of them yet and the donor built exactly these slices."""
    import shutil

    ctx = open_context(plan, opts)
    entries = {n: donor_lock.entry(n) for n in stages}
    if any(ctx.lock.entry(n) for n in stages) or not all(e and e.params_hash == plan.stages[n].params_hash
                                                         for n, e in entries.items()):
        return False
    for e in entries.values():
        for rel in e.outputs:
            src, dst = donor_build / rel, plan.build_dir / rel
            for f in ([src] if src.is_file() else sorted(x for x in src.rglob("*") if x.is_file())):
                to = dst / f.relative_to(src) if f != src else dst
                to.parent.mkdir(parents=True, exist_ok=True)
                if not to.exists():
                    try:
                        os.link(f, to)
                    except OSError:  # a file system without hard links
                        shutil.copy2(f, to)
    for n, e in entries.items():
        _put(ctx, n, e)
    return True


# ---------------------------------------------------------------- running

def _run_group(ctx: Context, run: Callable, kind: str, todo: dict, state: dict) -> tuple[str | None, Failure | None]:
    """Run one executor over ``todo`` (name -> reasons); record each result. Returns (note, failure)."""
    from .stages._quiet import quiet_libraries

    jobs = [ctx.plan.stages[n] for n in todo]
    done: set = set()
    before = {j.name: {k: ctx.fingerprint(k) for k in models_of(ctx, j)} for j in jobs}  # the inputs as they ran
    try:
        quiet_libraries()
        gen = run(ctx, jobs)
        note = None
        while True:
            try:
                res = next(gen)
            except StopIteration as stop:
                note = stop.value
                break
            if res.name not in todo or res.name in done:
                raise RuntimeError(f"executor {kind} reported an unexpected stage {res.name}")
            record(ctx, ctx.plan.stages[res.name], res, before[res.name])
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


def execute(plan: Plan, opts: RunOptions = RunOptions(), reporter: Reporter | None = None,
            executors: Callable[[str], Callable] | None = None) -> BuildResult:
    """Compile the plan's artifacts to disk, then run what is stale (with ``dry_run``: decide only, write
    nothing). A build holds its build folder exclusively: a second build of it refuses, naming the holder."""
    reporter = reporter or Reporter(quiet=opts.quiet, live=opts.live)
    if opts.dry_run:  # writes nothing: not the compiled files, the lock, the report or the fingerprint cache
        ctx = open_context(plan, opts, reporter)
        if ctx.lock.problem:
            reporter.line(f"warning: {ctx.lock.problem}")
        decisions = _decide(ctx, opts.target, opts.force)
        states = {d.name: "would run" if d.stale else "may run" if d.maybe else "up to date" for d in decisions}
        return BuildResult(states, written=changed_artifacts(plan), decisions=decisions)
    with exclusive(plan.build_dir / ".storyc-build.lock", f"a build of {plan.story.rel(plan.build_dir)}/"):
        return _Build(plan, opts, reporter, executors or default_executor).run()


class _Build:
    """One build: groups of ready stages of one kind, each run by its executor, until done or failed."""

    def __init__(self, plan: Plan, opts: RunOptions, reporter: Reporter, executors: Callable):
        self.plan, self.opts, self.reporter, self.executors = plan, opts, reporter, executors
        self.result = BuildResult(states={}, written=write_plan(plan))
        self.ctx = open_context(plan, opts, reporter)
        self.sel, self.ctx.forced = selected(plan, opts.target), forced(plan, opts.force)
        self.times: dict = {}

    def run(self) -> BuildResult:
        ctx, state = self.ctx, self.result.states
        if ctx.lock.problem:
            self.reporter.line(f"warning: {ctx.lock.problem}")
        self._preflight()
        pending = [n for n in order(self.plan) if n in self.sel]
        t_build = time.monotonic()
        try:
            while pending:
                kind, group = self._next_group(pending)
                pending = [n for n in pending if n not in group]
                todo = self._todo(group)
                if todo and not self._run(kind, todo):
                    for n in pending:
                        state[n] = "skipped"
                    break
        finally:
            ctx.hasher.save()
            self._report()
        self._write_times(time.monotonic() - t_build)
        if not self.result.failures:
            self.result.verdict, self.result.verdict_lines = self._verdicts()
        return self.result

    def _preflight(self) -> None:
        """Every model a stage that may run reads is there (or can be made or fetched) before the first stage runs:
        a missing Kolors folder is found before Data-Juicer runs (or a dataset downloads), not after."""
        from .context import check_model

        decisions = _decide(self.ctx, self.opts.target, self.opts.force)
        keys = {k for d in decisions if d.stale or d.maybe for k in models_of(self.ctx, self.plan.stages[d.name])}
        for key in sorted(keys & set(self.plan.story.models)):
            check_model(self.plan.story, key)

    def _next_group(self, pending: list) -> tuple[str, list]:
        """The ready stages of the first ready kind (all scenes of generate run as one batch)."""
        state = self.result.states
        ready = [n for n in pending if all(d in state or d not in self.sel for d in self.plan.stages[n].deps)]
        kind = self.plan.stages[ready[0]].kind
        return kind, [n for n in ready if self.plan.stages[n].kind == kind]

    def _todo(self, group: list) -> dict:
        """name -> why it runs, for the stages of ``group`` that must run; the others marked in the states."""
        state, todo = self.result.states, {}
        for n in group:
            if any(state.get(d) in ("failed", "blocked") for d in self.plan.stages[n].deps):
                state[n] = "blocked"
                continue
            why = ["forced"] if n in self.ctx.forced else reasons(self.ctx, self.plan.stages[n], set())
            if why:
                todo[n] = why
            else:
                state[n] = "up to date"
        return todo

    def _run(self, kind: str, todo: dict) -> bool:
        """Run one group; False when it failed and the build stops there."""
        rep = self.reporter
        label = kind if len(todo) > 1 else next(iter(todo))
        rep.start(label, sorted({r for why in todo.values() for r in why})[:4] if len(todo) > 1 else todo[label])
        t0 = time.monotonic()
        _gpu_peak_reset()
        note, failure = _run_group(self.ctx, self.executors(kind), kind, todo, self.result.states)
        self.times[label] = {"seconds": round(time.monotonic() - t0, 3), "stages": len(todo),
                             "peak_gpu_gib": _gpu_peak()}
        if failure is None:
            self.result.notes[label] = note
            rep.done(label, time.monotonic() - t0, note or "")
            return True
        rep.stop()
        self.result.failures.append(failure)
        rep.line(f"error: {failure.message}")
        if failure.hint:
            rep.line(f"hint: {failure.hint}")
        return self.opts.keep_going

    def _report(self) -> None:
        """build_report.json: what the last build did (tests and CI read it, not timings)."""
        doc = {"format": "storyc.build_report/1", "compiled": sorted(self.result.written),
               "stages": {n: self.result.states.get(n, "not selected") for n in self.plan.stages}}
        try:
            atomic_write(self.ctx.build_dir / "build_report.json", canonical_json(doc))
        except OSError:
            pass  # the failure that made the folder unwritable is already reported

    def _write_times(self, total: float) -> None:
        """build_times.json: each stage group's time and peak GPU memory, and the executors' own timings (model
        loads, cache pass, s/step). Not an output: it changes every run."""
        doc = {"format": "storyc.build_times/1", "total_s": round(total, 3), "stages": self.times,
               "metrics": self.ctx.metrics}
        try:
            atomic_write(self.ctx.build_dir / "build_times.json", canonical_json(doc))
        except OSError:
            pass

    def _verdicts(self) -> tuple[int, list]:
        """The kinds that judge the build (the bundle's aesthetic gate) give their verdict, as declared."""
        code, lines = 0, []
        for name in order(self.plan):
            job = self.plan.stages[name]
            how, entry = KINDS[job.kind].verdict, self.ctx.lock.entry(name)
            if name in self.sel and how and entry is not None:
                module, func = how.split(":")
                c, ls = getattr(importlib.import_module(module), func)(self.ctx, job, entry)
                code, lines = max(code, c), lines + ls
        return code, lines


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
