"""`storyc sweep SPEC`: the variants of a sweep as Ray Tune trials, each an ordinary storyc build.

Ray Tune is the engine: trial scheduling, resources per trial, retries of a failed trial or a dead worker, and
the experiment state that `storyc sweep` again resumes (finished trials are not rerun). Each trial builds its
variant with its own build folder and lock under build/<story>/sweeps/<sweep>/<variant>/. Work is shared: each
distinct ingest + filter (Data-Juicer) runs once before the trials and is linked into their builds; LoRAs go
through the content-addressed training cache, and the trials that train one go first (one per training), so the
variants that only differ in generation settings reuse it instead of waiting on it.
"""
from __future__ import annotations

import base64
import functools
import html
import json
import os
import time
from pathlib import Path

from .lock import digest
from .render import atomic_write, canonical_json


def sweep_dir(sw) -> Path:
    return sw.base.root / "build" / sw.base.id / "sweeps" / sw.spec.stem


def trial_order(sw) -> list[str]:
    """Variant ids with one variant per training first: the LoRA a group shares is trained once, early."""
    leaders, rest, seen = [], [], set()
    for v in sw.variants:
        (rest if v.training in seen else leaders).append(v.id)
        seen.add(v.training)
    return leaders + rest


def data_stages(plan) -> tuple:
    """The data stages: filter (Data-Juicer) and everything it needs, in order."""
    from .schedule import order, selected

    needed = selected(plan, "filter")
    return tuple(n for n in order(plan) if n in needed)


def data_key(plan) -> str:
    """Variants with the same key read the same filtered data: their ingest + filter (Data-Juicer) is one job."""
    return digest([plan.stages[n].params_hash for n in data_stages(plan)])[:16]


def prepare_data(sw, folder: Path, cache: str | None, quiet: bool) -> None:
    """Run each distinct data slice's ingest + filter once, before the trials, into folder/data/<key>/; each trial
    links that result into its own build instead of running Data-Juicer again. A failure here is left to the
    trials, which run the stages themselves and report it."""
    from .compiler import compile
    from .options import RunOptions
    from .runner import execute

    seen = set()
    for v in sw.variants:
        key = data_key(compile(v.story))
        if key in seen:
            continue
        seen.add(key)
        donor = folder / "data" / key
        if not quiet:
            print(f"sweep: ingest + filter once for the variants that share them ({sw.base.rel(donor)})", flush=True)
        plan = compile(v.story, donor / "build")
        execute(plan, RunOptions(build_dir=plan.build_dir, lock_path=donor / "story.lock", target="filter",
                                 quiet=True, live=False, cache_dir=Path(cache) if cache else None))


def seed_data(plan, opts, folder: Path) -> None:
    """Give a fresh variant build the sweep's finished ingest + filter (the runner links their outputs and takes
    their lock entries, then checks them like any other: a mismatch just reruns the stages)."""
    from .lock import Lock
    from .runner import adopt

    donor = folder / "data" / data_key(plan)
    adopt(plan, opts, Lock.load(donor / "story.lock"), donor / "build", data_stages(plan))


def run_sweep(spec, address: str | None = None, concurrent: int | None = None, gpus_per_trial: float | None = None,
              quiet: bool = False, cache: str | None = None) -> int:
    from .errors import StorycError
    from .sweep import load_sweep

    sw = load_sweep(spec)
    if sw is None:
        raise StorycError(f"{spec} has no `sweep:` section", "add one (see README: Sweeps), or use `storyc build`")
    folder = sweep_dir(sw)
    folder.mkdir(parents=True, exist_ok=True)
    order = trial_order(sw)
    prepare_data(sw, folder, cache, quiet)
    atomic_write(folder / "variants.json", canonical_json(
        {"format": "storyc.sweep_variants/1", "spec": sw.base.rel(sw.spec), "objective": sw.objective,
         "order": order, "variants": {v.id: v.overrides for v in sw.variants}}))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # only the JSON result logger (below): the default set wants tensorboardX and warns without it
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the trials' "Loading checkpoint shards" bars
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:  # a private local cluster: its own token (set before Ray reads its config; Ray warns when it
        import secrets  # picks the mode itself)

        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    started = False
    if not ray.is_initialized():
        kw = {"address": address} if address else {"num_cpus": max(1, concurrent or 1)}

        ray.init(include_dashboard=False, log_to_driver=not quiet, configure_logging=False, **kw)
        started = True
    try:
        gpus = gpus_per_trial if gpus_per_trial is not None else (1 if ray.cluster_resources().get("GPU") else 0)
        trainable = tune.with_resources(functools.partial(_trial, spec=str(sw.spec), folder=str(folder),
                                                          cache=str(Path(cache).resolve()) if cache else None),
                                        {"cpu": 1, "gpu": gpus})
        # Every run is a fresh experiment over the current variants (a restored Tune experiment would keep its old
        # grid and call stale trials finished): each trial is an incremental storyc build, so an up-to-date one
        # does nothing, a stale one reruns what changed, a new grid point runs.
        import shutil

        shutil.rmtree(folder / "tune", ignore_errors=True)
        t0 = time.monotonic()
        tuner = tune.Tuner(
            trainable, param_space={"variant": tune.grid_search(order)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent or None),
            run_config=tune.RunConfig(storage_path=str(folder), name="tune", verbose=0,
                                      callbacks=[JsonLoggerCallback()],
                                      failure_config=tune.FailureConfig(max_failures=2)))
        grid = tuner.fit()
        wall = time.monotonic() - t0
    finally:
        if started:
            ray.shutdown()
    rows = collect(sw, folder)
    atomic_write(folder / "results.json", canonical_json({"format": "storyc.sweep_results/1", "wall_s": round(wall, 1),
                                                          "objective": sw.objective, "variants": rows}))
    atomic_write(folder / "compare.html", compare_html(sw, folder, rows))
    show(folder)
    failed = [r for r in rows if r.get("state") != "done"]
    errors = getattr(grid, "num_errors", 0)
    if failed or errors:
        print(f"{len(failed)} variant(s) did not finish; run `storyc sweep {sw.base.rel(sw.spec)}` again to resume")
        return 1
    if not any(r["valid"] for r in rows):
        print("no variant is a valid submission (each is below its gate)")
        return 3
    return 0


def _trial(config: dict, spec: str, folder: str, cache: str | None = None) -> None:
    """One Tune trial: build one variant with its own build folder and lock; report its scores."""
    from ray import tune

    from .compiler import compile
    from .lock import Lock
    from .options import RunOptions
    from .runner import execute
    from .sweep import METRICS, load_sweep, score

    sw = load_sweep(spec, only=config["variant"])  # expands every variant, validates this one
    v, = sw.variants
    vdir = Path(folder) / v.id
    plan = compile(v.story, vdir / "build")
    opts = RunOptions(build_dir=plan.build_dir, lock_path=vdir / "story.lock", quiet=True, live=False,
                      cache_dir=Path(cache) if cache else None)
    seed_data(plan, opts, Path(folder))
    t0 = time.monotonic()
    res = execute(plan, opts)
    seconds = time.monotonic() - t0
    if res.failures:
        raise RuntimeError("; ".join(f.message for f in res.failures))
    done = vdir / "result.json"
    try:
        before = json.loads(done.read_text("utf-8"))
    except (OSError, ValueError):
        before = None
    facts = Lock.load(vdir / "story.lock").entry("bundle").facts
    times = json.loads((plan.build_dir / "build_times.json").read_text("utf-8"))
    trained = "train.fit_s" in times.get("metrics", {}) or bool("train" not in res.ran and before and before["trained"])
    record = {"variant": v.id, "values": v.overrides, **{k: facts.get(k) for k in METRICS},
              "valid": facts["valid"], "trained": trained,
              "submission": str(plan.build_dir / "submission" / v.story.id)}
    # what the build is now, never a record of an earlier state: rewritten when anything differs (an up-to-date
    # trial of a resumed sweep keeps its record, time and all)
    if before is None or res.ran or {k: before.get(k) for k in record} != record:
        import ray

        atomic_write(done, canonical_json({**record, "seconds": round(seconds, 2), "stages_ran": len(res.ran),
                                           "node": ray.get_runtime_context().get_node_id()}))  # where it ran
    out = json.loads(done.read_text("utf-8"))
    objective = score(sw.objective, out)
    tune.report({k: out[k] for k in ("mean_aesthetic", "style_coherence", "seconds")}
                | {k: out[k] for k in METRICS[2:] if out.get(k) is not None}
                | {"valid": int(out["valid"]), "trained": int(out["trained"]),
                   "objective": float("nan") if objective is None else objective})


def collect(sw, folder: Path) -> list[dict]:
    """The current variants' records, with the current objective (an edited objective re-ranks, nothing reruns)."""
    from .sweep import score

    rows = []
    for v in sw.variants:
        try:
            r = json.loads((folder / v.id / "result.json").read_text("utf-8"))
            rows.append({**r, "objective": score(sw.objective, r), "state": "done"})
        except (OSError, ValueError, KeyError):
            rows.append({"variant": v.id, "values": v.overrides, "state": "not finished"})
    return sorted(rows, key=lambda r: (r["state"] != "done", not r.get("valid", False), r.get("objective") is None,
                                       -(r.get("objective") or 0)))


def _num(v) -> str:
    return "not measured" if v is None else f"{v:.3f}"


def show(folder: Path) -> None:
    """The results table: variant values, scores, valid, time, whether it trained or reused the LoRA."""
    doc = json.loads((folder / "results.json").read_text("utf-8"))
    rows = doc["variants"]
    keys = list(rows[0]["values"]) if rows else []
    head = ["variant", *keys, "mean aesthetic", "coherence", "valid", "objective", "seconds", "LoRA"]
    table = [head]
    for r in rows:
        vals = [json.dumps(r["values"][k], ensure_ascii=False) for k in keys]
        if r["state"] != "done":
            table.append([r["variant"], *vals, "-", "-", "-", "-", "-", r["state"]])
            continue
        table.append([r["variant"], *vals, f"{r['mean_aesthetic']:.3f}", f"{r['style_coherence']:.3f}",
                      "yes" if r["valid"] else "NO", _num(r["objective"]), f"{r['seconds']:.1f}",
                      "trained" if r["trained"] else "cache hit"])
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"{len(rows)} variants, wall {doc.get('wall_s', 0):.1f}s; best first; compare: {folder / 'compare.html'}")


def compare_html(sw, folder: Path, rows: list[dict]) -> str:
    """Every variant's storyboard side by side with its values and scores (best first)."""
    e = html.escape
    cells = []
    for r in rows:
        board = Path(r.get("submission", "")) / "storyboard.png"
        img = (f"<img src='data:image/png;base64,{base64.b64encode(board.read_bytes()).decode()}' width='360'>"
               if r["state"] == "done" and board.is_file() else "<p>not finished</p>")
        vals = "<br>".join(f"{e(k)} = {e(json.dumps(v, ensure_ascii=False))}" for k, v in r["values"].items())
        score = (f"mean aesthetic {r['mean_aesthetic']:.3f}, coherence {r['style_coherence']:.3f}, "
                 f"objective {_num(r['objective'])}, {'VALID' if r['valid'] else 'INVALID'}") if r["state"] == "done" else ""
        cells.append(f"<div class='v' id='{e(r['variant'])}'><h3>{e(r['variant'])}</h3><p>{vals}</p>"
                     f"<p class='score'>{score}</p>{img}</div>")
    return f"""<!doctype html>
<html lang="zh"><head><meta charset="utf-8"><title>{e(sw.base.id)} sweep - storyc</title>
<style>body{{font-family:sans-serif;margin:1em}}.grid{{display:flex;flex-wrap:wrap;gap:12px}}
.v{{border:1px solid #ccc;padding:8px;width:380px}}</style></head><body>
<h1>{e(sw.base.id)}: {len(rows)} variants of {e(sw.base.rel(sw.spec))}</h1>
<p>objective: {e(' + '.join(f'{w:g} x {k}' for k, w in sw.objective.items()))}; best first</p>
<div class="grid">{''.join(cells)}</div></body></html>
"""
