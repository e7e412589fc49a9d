"""`storyc plan`: a readable summary of a compiled plan."""
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
    con.print(f"LoRA: rank {lo['rank']}, alpha {lo['alpha']:g}, targets {', '.join(lo['target_modules'])}, init {lo['init']}")
    con.print(f"train: {t['epochs']} x {t['steps_per_epoch']} steps, batch {t['batch_size']}, lr {t['learning_rate']:g}, "
              f"{t['width']}x{t['height']}, {t['precision']}, strategy {t['strategy']}, seed {t['seed']}")
    con.print(f"generate: {gen['width']}x{gen['height']}, {gen['steps']} steps, cfg {gen['cfg_scale']:g}, "
              f"LoRA scale {gen['lora_scale']:g} (alpha {gen['lora_alpha']:g}), {gen['candidates']} candidate(s)/scene")
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
