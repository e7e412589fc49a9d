"""The storyc command line. One handler turns every StorycError into ``error:``/``hint:`` lines."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import SpecError, StorycError, UsageError


def _out(msg: str = "", err: bool = False) -> None:
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def _print_diags(diags, severity="error"):
    for d in diags:
        lines = d.render().split("\n")
        _out(f"{severity}: {lines[0]}", err=True)
        for ln in lines[1:]:
            _out(ln.replace("  hint:", "hint:", 1), err=True)


# ---------------------------------------------------------------- commands

def cmd_validate(args) -> int:
    bad = 0
    for spec in args.specs:
        try:
            story, loaded = _load_story(spec)
        except SpecError as e:
            bad += 1
            _print_diags(e.diagnostics)
            n = len(e.diagnostics)
            _out(f"{spec}: {n} problem{'s' if n != 1 else ''}", err=True)
            continue
        _print_diags(story.warnings, "warning")
        try:
            sweep = _sweep_of(story, loaded)
        except SpecError as e:
            bad += 1
            _print_diags(e.diagnostics)
            _out(f"{spec}: the sweep has {len(e.diagnostics)} problem{'s' if len(e.diagnostics) != 1 else ''}", err=True)
            continue
        if not args.quiet:
            from .compiler import compile

            for n in compile(story).notes:  # notes live in validate/compile/plan, not in every build
                _out(f"note: {n}")
            _out(f"ok: {spec}: story `{story.id}`, {len(story.scenes)} scenes")
            if sweep is not None:
                _out(f"ok: {spec}: sweep of {len(sweep.variants)} variants, {sweep.trainings} training"
                     f"{'s' if sweep.trainings != 1 else ''}")
    if bad:
        _out(f"{bad} of {len(args.specs)} spec{'s' if len(args.specs) > 1 else ''} invalid", err=True)
    return 1 if bad else 0


def _load_story(spec):
    """The validated story, and the loaded spec (positions, extends chain) for its sweep: the file is read once."""
    from .spec import load_located, story_from

    loaded = load_located(spec)
    return story_from(*loaded), loaded


def _sweep_of(story, loaded):
    """The spec's sweep with every variant validated, or None when it has no `sweep:` section."""
    from .sweep import sweep_from

    return sweep_from(*loaded, story) if "sweep" in loaded[0].data else None


def _load_plan(args, story=None):
    from .compiler import compile
    from .spec import load_story

    story = story or load_story(args.spec)
    _print_diags(story.warnings, "warning")
    out = Path(args.output) / story.id if args.output else None
    return compile(story, out)


def run_options(args, plan):
    """The one place argparse values become RunOptions (nothing below the CLI sees a Namespace)."""
    from .options import RunOptions

    a = vars(args)
    force = a.get("force")
    if force == "all" and a.get("stage"):  # `run STAGE --force` forces that stage, not what it needs
        force = a["stage"]
    return RunOptions(build_dir=plan.build_dir, lock_path=a.get("lock"), cache_dir=a.get("cache"), device=a.get("device"),
                      target=a.get("stage") or a.get("until"), force=force, dry_run=a.get("dry_run", False),
                      keep_going=a.get("keep_going", False), quiet=a.get("quiet", False))


def cmd_compile(args) -> int:
    from .compiler import write_plan

    plan = _load_plan(args)
    written = write_plan(plan)
    for n in plan.notes:
        _out(f"note: {n}")
    _out(f"compiled {plan.story.spec_path.name} -> {plan.story.rel(plan.build_dir)}/ "
         f"({len(plan.artifacts)} artifacts, {len(written)} changed)")
    for rel in written:
        _out(f"  wrote {rel}")
    return 0


def cmd_plan(args) -> int:
    from .views import show_plan, show_sweep

    story, loaded = _load_story(args.spec)
    show_plan(_load_plan(args, story))
    sweep = _sweep_of(story, loaded)
    if sweep is not None:
        show_sweep(sweep)
    return 0


def cmd_schema(args) -> int:
    from importlib import resources

    sys.stdout.write(resources.files("storyc").joinpath("schema/story.schema.json").read_text("utf-8"))
    return 0


def cmd_init(args) -> int:
    from importlib import resources

    from .render import atomic_write

    target = Path(args.dir) / "story.yaml"
    if target.exists() and not args.force:
        raise StorycError(f"{target} already exists", "pass --force to overwrite it")
    atomic_write(target, resources.files("storyc").joinpath("templates/starter.yaml").read_text("utf-8"))
    _out(f"wrote {target}")
    ignore = Path(args.dir) / ".gitignore"  # what a build writes is rebuilt from the spec and its lock: not versioned
    lines = ignore.read_text("utf-8").splitlines() if ignore.is_file() else []
    missing = [p for p in GITIGNORE if p not in lines]
    if missing:
        atomic_write(ignore, "\n".join([*lines, *(["# storyc: builds, model folders and caches (commit story.yaml and story.lock)"]
                                                  if not lines else []), *missing]) + "\n")
        _out(f"{'added ' + ', '.join(missing) + ' to' if lines else 'wrote'} {ignore}")
    _out(f"next: write your team under `story:`, then `storyc validate {target}`")
    return 0


GITIGNORE = ["/build/", "/.storyc/", "/models/"]


def cmd_ops(args) -> int:
    import textwrap

    from .rules import dj_registry

    reg = dj_registry()
    names = [n for n in sorted(reg["ops"]) if not args.filter or args.filter in n]
    if not names:
        from .errors import did_you_mean

        raise StorycError(f"no Data-Juicer op matches `{args.filter}`",
                          did_you_mean(args.filter, reg["ops"]) or "`storyc ops` lists them all")
    for name in names:
        op = reg["ops"][name]
        _out(f"{name} ({op['kind']})")
        for p in op["params"]:
            default = f" = {p['default']!r}" if "default" in p else " (required)"
            _out(f"    {p['name']}: {p.get('type', 'any')}{default}")
        if not op["params"]:
            _out("    (no parameters of its own)")
    # the base classes' parameters: the same for (nearly) every op, so listed once, apart
    common = sorted({c for n in names for c in reg["common"][reg["ops"][n]["common"]]})
    _out("")
    _out(f"common parameters ({'every op above accepts them' if len({reg['ops'][n]['common'] for n in names}) == 1 else 'from the Data-Juicer base classes; most ops above accept them'}):")
    _out(textwrap.fill(", ".join(common), 100, initial_indent="    ", subsequent_indent="    "))
    _out(f"\n{len(names)} op{'s' if len(names) != 1 else ''} (py-data-juicer {reg['data_juicer']})")
    return 0


def cmd_build(args) -> int:  # also `storyc run STAGE`: a build with a target
    from .views import build

    plan = _load_plan(args)
    return build(plan, run_options(args, plan))


def cmd_watch(args) -> int:
    from .watch import watch

    spec = Path(args.spec)
    if not spec.is_file():
        raise StorycError(f"{spec}: no such file")
    return watch(spec, lambda plan: run_options(args, plan), args.port, args.train, args.interval,
                 output=args.output)


def cmd_status(args) -> int:
    from .views import status

    plan = _load_plan(args)
    return status(plan, run_options(args, plan))


def cmd_score(args) -> int:
    from .stages.score import score_folder

    model, gate, clip_zh = Path(args.model) if args.model else None, args.min, None
    if args.spec:
        from .context import model_folder
        from .spec import load_story

        story = load_story(args.spec)
        model = model or model_folder(story, "aesthetic")
        gate = story.spec.submission.min_aesthetic if gate is None else gate
        clip_zh = model_folder(story, "clip_zh") if "clip_zh" in story.models else None
        from .model import PREFERENCE

        preference = {k: model_folder(story, k) for k in PREFERENCE if k in story.models}
        dreamsim = model_folder(story, "dreamsim") if "dreamsim" in story.models else None
    if model is None:
        raise StorycError("no aesthetic model given", "pass --model DIR or --spec story.yaml")
    return score_folder(Path(args.dir), model, 6.0 if gate is None else gate, args.device, clip_zh,
                        preference if args.spec else None, dreamsim if args.spec else None)


def cmd_sweep(args) -> int:
    """`storyc sweep SPEC` runs the variants; `storyc sweep show SPEC` prints the last results."""
    words = list(args.words)
    if words[0] == "show":
        if len(words) != 2:
            raise UsageError("usage: storyc sweep show SPEC")
        from .sweep import load_sweep
        from .sweep_run import show, sweep_dir

        sw = load_sweep(words[1])
        if sw is None:
            raise StorycError(f"{words[1]} has no `sweep:` section")
        if not (sweep_dir(sw) / "results.json").exists():
            raise StorycError("this sweep has no results yet", f"run `storyc sweep {words[1]}`")
        show(sweep_dir(sw))
        return 0
    if words[0] == "apply":
        if len(words) != 3:
            raise UsageError("usage: storyc sweep apply SPEC VARIANT")
        from .sweep import apply

        path, values = apply(words[1], words[2])
        for k, v in values.items():
            _out(f"  {k} = {v!r}")
        _out(f"wrote the values of {words[2]} into {path}; `storyc build {words[1]}` builds it")
        return 0
    if len(words) != 1:
        raise UsageError("usage: storyc sweep SPEC | storyc sweep show SPEC | storyc sweep apply SPEC VARIANT")
    from .sweep_run import run_sweep

    return run_sweep(words[0], args.address, args.concurrent, args.gpus_per_trial, args.quiet, args.cache)


def cmd_publish(args) -> int:
    from .publish import publish

    return publish(_load_plan(args), args.model_id, args.dry_run, args.display_name)


# ---------------------------------------------------------------- parser

USAGE_ERROR = 64  # a wrong command line (BSD's EX_USAGE); 2 stays "internal error"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


SPEC_HELP = "the story spec, a story.yaml file (paths in it are relative to its folder)"


def parser() -> argparse.ArgumentParser:
    from .stages.registry import KINDS

    p = _Parser(prog="storyc", description="Compile a story.yaml into a Kolors LoRA story pipeline.",
                epilog="exit codes: 0 ok, 1 error, 2 internal error (a storyc bug), 3 the submission is INVALID, "
                       "64 wrong command line, 130 interrupted")
    p.add_argument("--version", action="version", version=f"storyc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def quiet(c, what="print only warnings, errors and the verdict"):
        c.add_argument("-q", "--quiet", action="store_true", help=what)

    v = sub.add_parser("validate", help="check specs; report every problem",
                       description="Check specs against the schema and the rules; every problem is reported as "
                                   "file:line:col: $.path: message, with a hint. Exit 1 if any spec is invalid.")
    v.add_argument("specs", nargs="+", metavar="SPEC", help="one or more story.yaml files")
    quiet(v, "print only problems (no 'ok' line, no notes)")
    v.set_defaults(func=cmd_validate)

    def spec_cmd(name, func, help, description=None):
        c = sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".")
        c.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
        c.add_argument("-o", "--output", metavar="DIR", help="build folder (default: build/ in the project)")
        c.set_defaults(func=func)
        return c

    spec_cmd("compile", cmd_compile, "write every artifact to build/<story-id>/",
             "Write every compiled artifact (Data-Juicer config, training config and command, generation plan, "
             "submission manifest) to build/<story-id>/; byte-identical for the same spec. Runs nothing.")
    spec_cmd("plan", cmd_plan, "show scenes, prompts, seeds and stage hashes")
    stages = ", ".join(KINDS)

    def cache_lock(c):
        c.add_argument("--cache", metavar="DIR", help="the content-addressed training cache: trained LoRAs and "
                       "encoded latents, shared by every story of the project (default: .storyc/cache)")
        c.add_argument("--lock", metavar="FILE", help="lock file (default: the spec's path with .lock)")

    def run_opts(c, force_help):
        c.add_argument("--force", nargs="?", const="all", metavar="STAGE", help=force_help)
        c.add_argument("--dry-run", action="store_true",
                       help="say what would run and why; write nothing (not even the compiled files)")
        c.add_argument("--until", metavar="STAGE", help="stop after STAGE (a kind or one stage)")
        c.add_argument("--keep-going", action="store_true", help="after a failure, still run the stages that do "
                                                                 "not depend on it")
        quiet(c)
        cache_lock(c)
        c.add_argument("--device", default=None, help="torch device for GPU stages (default: cuda if available)")

    stage_text = (f"STAGE is a kind ({stages}) or one stage of a kind, named by scene id: generate[applause]. "
                  "--force train retrains the LoRA and replaces its cache entry.")
    b = spec_cmd("build", cmd_build, "compile, then run the stale stages",
                 "Compile the spec, then run the stale stages in order and record them in the lock. " + stage_text)
    run_opts(b, "rerun STAGE even if it is up to date (no STAGE: every stage); what depends on it reruns "
                "only if its output changes")
    w = spec_cmd("watch", cmd_watch, "rebuild on every save, models kept in memory, with a live page",
                 "Build, then rebuild on every save of the spec, the files it extends, the dataset folders or the "
                 "reference images, through the same runner as `build` (same lock, same outputs), with the models "
                 "kept in memory between builds. A save during a build restarts it from its finished stages. A save "
                 "never retrains unless --train. --port serves a live page of the build on 127.0.0.1.")
    w.add_argument("--port", type=int, default=None, metavar="N", help="serve the live page on 127.0.0.1:N "
                   "(0: any free port; the address is printed)")
    w.add_argument("--train", action="store_true", help="retrain when a save makes the LoRA stale (default: say so "
                   "and wait)")
    w.add_argument("--interval", type=float, default=0.5, metavar="S", help="seconds between looks at the files")
    quiet(w)
    cache_lock(w)
    w.add_argument("--device", default=None, help="torch device for GPU stages (default: cuda if available)")
    s = spec_cmd("status", cmd_status, "list stages as up to date, stale or may rerun, and why",
                 "List each stage as up to date, stale (its own inputs changed) or may rerun (an upstream stage "
                 "will rerun; it reruns if that output comes out different), and why. Reads no weights and "
                 "writes nothing.")
    cache_lock(s)
    r = sub.add_parser("run", help="run one stage (and its stale inputs)",
                       description="Run STAGE and whatever stale stages it needs, nothing after it. " + stage_text)
    r.add_argument("stage", metavar="STAGE", help=f"a kind ({stages}) or one stage, e.g. 'generate[applause]'")
    r.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    r.add_argument("-o", "--output", metavar="DIR", help="build folder (default: build/ in the project)")
    run_opts(r, "rerun STAGE even if it is up to date (not the stages it needs; --force OTHER names another)")
    r.set_defaults(func=cmd_build)

    sc = sub.add_parser("score", help="score a folder of images with the aesthetic predictor",
                        description="Score the images of DIR with the aesthetic predictor (the competition's "
                                    "evaluate()): each image, the mean, PASS or FAIL against the gate. In a storyc "
                                    "submission folder only the scene images count, never the storyboard.")
    sc.add_argument("dir", metavar="DIR", help="a folder of .png/.jpg/.webp images")
    sc.add_argument("--model", metavar="DIR", help="aesthetic predictor folder (or use --spec)")
    sc.add_argument("--spec", metavar="SPEC", help="take the model and the gate from this spec")
    sc.add_argument("--min", type=float, default=None, help="pass mark (default: the spec's, else 6.0)")
    sc.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    sc.set_defaults(func=cmd_score)

    pb = spec_cmd("publish", cmd_publish, "upload the submission's model page to ModelScope",
                  "Stage the model page (LoRA files, configuration.json, the model card README with the storyboard "
                  "and the 8 images and their prompts) in build/<story-id>/publish/model/, write POST.md (the "
                  "competition's discussion post) beside it, and upload the page to a ModelScope model repo named "
                  "`<team>-可图Kolors训练-<title>` from story.team. Needs the access token of your ModelScope "
                  "account in the MODELSCOPE_API_TOKEN environment variable (MODELSCOPE_ENDPOINT points the client "
                  "at another hub). Refuses a bundle that is out of date, edited or INVALID.")
    pb.add_argument("--model-id", required=True, metavar="OWNER/NAME", help="the ModelScope model id (ASCII)")
    pb.add_argument("--display-name", metavar="NAME", help="the model's name on ModelScope (default: "
                    "<team>-可图Kolors训练-<title>; must keep that prefix)")
    pb.add_argument("--dry-run", action="store_true", help="stage and list the tree and POST.md; upload nothing")

    sw = sub.add_parser("sweep", help="run a spec's sweep variants on Ray Tune; `sweep show|apply`",
                        description="Run every variant of the spec's `sweep:` section as a Ray Tune trial (a storyc "
                                    "build with its own folder and lock under build/<story>/sweeps/), sharing "
                                    "trainings through the cache; running it again resumes. `storyc sweep show SPEC` "
                                    "prints the results table; compare.html shows every storyboard. `storyc sweep "
                                    "apply SPEC VARIANT` writes a variant's values into SPEC, keeping its comments.")
    sw.add_argument("words", nargs="+", metavar="SPEC", help="SPEC, or: show SPEC, or: apply SPEC VARIANT")
    sw.add_argument("--address", help="a Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")
    sw.add_argument("--concurrent", type=int, default=None, metavar="N", help="trials at once (default: as resources allow)")
    sw.add_argument("--gpus-per-trial", type=float, default=None, metavar="G", help="default: 1 when the cluster has GPUs")
    sw.add_argument("--cache", metavar="DIR", help="the training cache the trials share (default: .storyc/cache); on "
                    "a cluster, a folder every node mounts")
    quiet(sw, "no Ray worker output")
    sw.set_defaults(func=cmd_sweep)

    sub.add_parser("schema", help="print the JSON Schema of the spec",
                   description="Print the JSON Schema of story.yaml (for editors and other tools).").set_defaults(
        func=cmd_schema)
    i = sub.add_parser("init", help="write a commented starter spec",
                       description="Write a commented starter story.yaml into DIR.")
    i.add_argument("dir", metavar="DIR", help="the folder to write story.yaml into")
    i.add_argument("--force", action="store_true", help="overwrite an existing story.yaml")
    i.set_defaults(func=cmd_init)
    o = sub.add_parser("ops", help="list the Data-Juicer ops a spec may use",
                       description="List the Data-Juicer ops a spec's `filters` may use, each with its own "
                                   "parameters (type and default); the parameters common to all ops once, apart.")
    o.add_argument("filter", nargs="?", default="", metavar="FILTER", help="only ops whose name contains FILTER")
    o.set_defaults(func=cmd_ops)
    return p


def _terminate(signum, frame):
    # SIGTERM or SIGHUP unwinds like Ctrl-C: stages end the processes they started, outputs stay
    raise KeyboardInterrupt


def main(argv=None) -> int:
    import signal

    args = parser().parse_args(argv)
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a kill, a closed terminal: unwind like Ctrl-C
        try:
            previous[sig] = signal.signal(sig, _terminate)
        except ValueError:  # not the main thread (an embedding caller): leave its handlers alone
            pass
    try:
        code = _dispatch(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if argv is None and "torch" in sys.modules:  # the `storyc` process itself, after a stage ran
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown: with torch, transformers and diffsynth imported,
    clearing their modules takes ~2 s after the work is done (measured: bench/RESULTS.md, the cold edit). What a
    normal exit does first still happens: threads still working are waited for and what was registered to run at
    exit runs (logging, Ray, temporary folders); storyc's own files are closed and atomic by then."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what Python runs at exit to wind up and join threads
    if shutdown is None:
        return
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe: nothing left to say
            pass
    os._exit(code)


def _dispatch(args) -> int:
    try:
        return args.func(args)
    except SpecError as e:
        _print_diags(e.diagnostics)
        return 1
    except StorycError as e:
        _out(f"error: {e.message}", err=True)
        if e.hint:
            _out(f"hint: {e.hint}", err=True)
        return USAGE_ERROR if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        _out("interrupted: finished outputs are kept; run the same command again to resume", err=True)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug in storyc, not in the user's input
        if os.environ.get("STORYC_DEBUG"):
            raise
        _out(f"error: internal error: {type(e).__name__}: {e}", err=True)
        _out("hint: this is a storyc bug; rerun with STORYC_DEBUG=1 for the traceback and report it", err=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
