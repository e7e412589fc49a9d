"""What the CLI prints about a plan and a build: `storyc plan`, a sweep's variants, a build's summary and dry run,
`storyc status`. Presentation only: the decisions come from the scheduler and the runner."""
from __future__ import annotations

import json


def show_plan(plan) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    con = Console()
    if not con.is_terminal:
        con = Console(width=160)  # piped or captured: don't wrap scene ids
    st = plan.story
    gen = json.loads(plan.artifacts["generate/generation_plan.json"])
    tr = json.loads(plan.artifacts["train/train_config.json"])
    con.print(f"[bold]{st.title}[/bold]  ({st.id})  spec: {st.rel(st.spec_path)}")
    lo, t = tr["lora"], tr["train"]
    kind = f"{lo.get('type', 'lora')}" + (f" (factor {lo['factor']})" if lo.get("type") == "lokr" else "")
    con.print(f"LoRA: {kind}, rank {lo['rank']}, alpha {lo['alpha']:g}, targets {', '.join(lo['target_modules'])}, "
              f"init {lo['init']}")
    for src, mask, caps in zip(st.spec.datasets, st.mask_paths or (None,) * len(st.spec.datasets),
                               st.caption_paths or (None,) * len(st.spec.datasets)):
        where = escape(src.path or src.id or src.source)
        if src.masks:
            con.print(f"data {where}: loss masks from {'the alpha channel' if src.masks == 'alpha' else escape(st.rel(mask))}"
                      + ("" if t.get("masked_loss") else " (unused: train.masked_loss is off)"))
        if src.recaption:
            rc = src.recaption
            con.print(f"data {where}: recaptioned by models.captioner, mode {rc.get('mode', 'replace')}, template "
                      f"{escape(rc.get('template', '{caption}'))}, kept in {escape(st.rel(caps))}")
    if isinstance(t.get("validation"), dict):
        v = t["validation"]
        what = f"folder {escape(str(v['folder']))}" if "folder" in v else f"{v.get('images')} held-out image(s)"
        con.print(f"validation: {what}, every {v.get('every', 100)} steps")
    con.print(f"train: {t['epochs']} x {t['steps_per_epoch']} steps, batch {t['batch_size']}, lr {t['learning_rate']:g}, "
              f"{t['width']}x{t['height']}, {t['precision']}, strategy {t['strategy']}, seed {t['seed']}")
    con.print(f"generate: {gen['width']}x{gen['height']}, {gen['steps']} steps, cfg {gen['cfg_scale']:g}, "
              f"LoRA scale {gen['lora_scale']:g} (alpha {gen['lora_alpha']:g}), {gen['candidates']} candidate(s)/scene")
    for cid, ch in st.spec.characters.items():
        shown = [s["id"] for s in gen["scenes"] if cid in s.get("characters", ())]
        refs = ", ".join(st.rel(p) for p in st.character_paths.get(cid, ()))
        con.print(f"character {escape(cid)}: {escape(refs)} at scale {ch.scale:g}, in {len(shown)} scene(s)"
                  + (f": {escape(', '.join(shown))}" if shown else ""))
    for n in plan.notes:
        con.print(f"[yellow]note:[/yellow] {n}")
    table = Table(title="scenes", show_lines=True)
    for col in ("#", "scene", "seed", "prompt", "negative prompt"):
        table.add_column(col, overflow="fold")
    for s in gen["scenes"]:
        seeds = str(s["seed"]) if len(s["seeds"]) == 1 else f"{s['seeds'][0]}..{s['seeds'][-1]}"
        table.add_row(str(s["index"] + 1), escape(s["id"]), seeds, escape(s["prompt"]), escape(s["negative_prompt"]))
    con.print(table)
    stages = Table(title="stages")
    for col in ("stage", "depends on", "input hash"):
        stages.add_column(col)
    for name, s in plan.stages.items():
        deps = ", ".join(s.deps) if len(s.deps) <= 2 else f"{s.deps[0]} +{len(s.deps) - 1}"
        stages.add_row(escape(name), escape(deps), s.params_hash[:12])
    con.print(stages)


def show_sweep(sweep) -> None:
    """The variants of a sweep, their values, and how many trainings they need."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    con = Console()
    if not con.is_terminal:
        con = Console(width=160)
    keys = list(sweep.variants[0].overrides) if sweep.variants else []
    table = Table(title=f"sweep of {sweep.base.rel(sweep.spec)}: {len(sweep.variants)} variants, "
                        f"{sweep.trainings} training{'s' if sweep.trainings != 1 else ''}")
    for col in ("variant", *keys, "training"):
        table.add_column(escape(col), overflow="fold")
    groups: dict = {}
    for v in sweep.variants:
        t = groups.setdefault(v.training, f"t{len(groups) + 1}")
        table.add_row(v.id, *[escape(json.dumps(v.overrides[k], ensure_ascii=False)) for k in keys], t)
    con.print(table)
    con.print("objective: " + " + ".join(f"{w:g} x {k}" for k, w in sweep.objective.items())
              + "; the aesthetic gate stays a hard constraint")


def build(plan, opts) -> int:
    """`storyc build` / `storyc run`: run (or, dry, say what would run), then the summary and the verdict."""
    from .progress import Reporter
    from .runner import execute

    reporter = Reporter(quiet=opts.quiet, live=opts.live)
    res = execute(plan, opts, reporter)
    st = res.states
    if opts.dry_run:
        _dry_run(plan, res, reporter)
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


def _dry_run(plan, res, reporter) -> None:
    from .schedule import names

    for rel in res.written:
        reporter.line(f"would write {plan.story.rel(plan.build_dir / rel)}")
    maybe: dict = {}  # kind -> its may-run stages: one line per kind, not one per scene
    for d in res.decisions:
        if d.stale:
            reporter.line(f"would run {d.name}: {'; '.join(d.reasons)}")
        elif d.maybe:
            maybe.setdefault(plan.stages[d.name].kind, []).append(d)
    for kind, ds in maybe.items():
        if len(ds) == 1:
            reporter.line(f"may run   {ds[0].name}: {ds[0].reasons[0]}")
            continue
        ups = sorted({u for d in ds for u in d.upstream}, key=list(plan.stages).index)
        reporter.line(f"may run   {kind} ({len(ds)} scenes): if the output of {names(plan, ups)} changes")


def status(plan, opts) -> int:
    """Each stage up to date, stale or may rerun, and why. Writes nothing (a test hashes the project)."""
    from .compiler import changed_artifacts
    from .runner import open_context
    from .schedule import decide

    from .compiler import owner

    ctx = open_context(plan, opts)
    other = owner(plan)
    print(f"build folder: {plan.story.rel(plan.build_dir)}/" + (f" (the build of {other}: same story.id; building "
          f"this spec is refused)" if other else "") + f"  lock: {plan.story.rel(opts.lock_for(plan.story))}")
    if ctx.lock.problem:
        print(f"warning: {ctx.lock.problem}")
    changed = changed_artifacts(plan)
    if changed:
        print(f"compiled files out of date: {', '.join(changed)} (`storyc compile` or a build writes them)")
    rows = [(d.name, d.state, "; ".join(d.reasons)) for d in decide(ctx, opts.target, opts.force)]
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
