"""filter: run Data-Juicer itself (dj-process) on the compiled config, then lay out DiffSynth's training folder.

Data-Juicer runs as its own process (exactly the notebook's `dj-process --config ...`), so its logger, worker
pool and Ray client never leak into storyc; its per-op "Left N samples" lines give the per-filter counts.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from ..errors import StageError
from ..render import canonical_json, link_or_copy
from ._child import release, spawn
from .registry import Result

_LEFT = re.compile(r"OP \[(\w+)\] Done in [\d.]+s\. Left (\d+) samples")
_ERR = re.compile(r"(\w+Error|Exception): (.+)")


def dj_args(config: Path, dataset: Path, export: Path, np: int, ray_address: str | None) -> list[str]:
    """The arguments of Data-Juicer's own `dj-process` for the compiled config."""
    args = ["--config", str(config), "--dataset_path", str(dataset), "--export_path", str(export), "--np", str(np),
            "--work_dir", str(export.parent)]
    if ray_address:
        args += ["--executor_type", "ray", "--ray_address", ray_address]
    return args


def _op_line(ctx, index: int) -> str:
    from ..yamlio import load

    try:
        loc = load(ctx.story.spec_path)
        m = loc.mark(("filters", index), prefer_key=False)
        return f"{ctx.story.rel(Path(m.file))}:{m.line}:{m.col}: $.filters[{index}]" if m else f"$.filters[{index}]"
    except Exception:  # the spec may extend another file; fall back to the path
        return f"$.filters[{index}]"


def run(ctx, jobs):
    job, = jobs
    build = ctx.build_dir
    data = build / "data"
    inp = data / "input" / "metadata.jsonl"
    out_dir = data / "output"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    proc = job.params["processing"]
    ops = [next(iter(op)) for op in job.params["filters"]]
    n_in = sum(1 for ln in inp.read_text("utf-8").splitlines() if ln.strip())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    address, stop_ray = None, None
    if proc["executor"] == "ray":
        address, stop_ray, ray_env = _start_ray(ctx, proc["workers"])
        env.update(ray_env)
    try:
        args = dj_args(data / "data_juicer.yaml", inp, out_dir / "result.jsonl", proc["workers"], address)
        # its own process group: on an interruption storyc ends Data-Juicer and its worker pool, nothing else;
        # and the group dies with storyc however storyc ends (the watchdog of _child.spawn)
        p = spawn("data_juicer.tools.process_data:main", args, cwd=build, env=env, stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT, text=True, errors="replace")
        log, left = [], {}
        try:
            for line in p.stdout:
                log.append(line)
                m = _LEFT.search(line)
                if m:
                    left[len(left)] = (m.group(1), int(m.group(2)))
                    ctx.report.update(len(left), len(ops), f"{m.group(1)}: {m.group(2)} left")
            code = p.wait()
        except BaseException:
            _end_group(p)
            raise
        finally:
            release(p)
    finally:
        if stop_ray:
            stop_ray()
    (out_dir / "dj.log").write_text("".join(log), "utf-8")
    if code != 0:
        raise _dj_error(ctx, "".join(log), ops, out_dir / "dj.log")

    result = out_dir / "result.jsonl"
    rows = _read_result(result)
    report = {"format": "storyc.filter_report/1", "input": n_in, "kept": len(rows), "executor": proc["executor"],
              "ops": []}
    prev = n_in
    for i, name in enumerate(ops):
        if i in left:
            kept = left[i][1]
            report["ops"].append({"op": name, "in": prev, "kept": kept, "dropped": prev - kept})
            prev = kept
        else:
            report["ops"].append({"op": name, "in": None, "kept": None, "dropped": None})
    _print_table(ctx, report)
    if not rows:
        culprit = next((o["op"] for o in report["ops"] if o["kept"] == 0), ops[-1] if ops else "the filters")
        raise StageError("filter", f"no image survived the filters: `{culprit}` removed the last record",
                         "relax that op's parameters in `filters`")

    # DiffSynth's layout: train/metadata.csv (file_name,text; utf-8-sig like the notebook) + images beside it
    train = data / "train"
    tmp = data / "train.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    names_out, buf = [], io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file_name", "text"])
    try:  # dataset repeats: an image counts that many times per epoch (a row per repeat, as kohya's folders do)
        repeats = json.loads((data / "input" / "repeats.json").read_text("utf-8"))
    except OSError:
        repeats = {}
    for i, row in enumerate(rows):
        src = Path(row["image"][0])
        rep = repeats.get(Path(row["image"][0]).name, 1)  # ingest names each image uniquely
        src = src if src.is_absolute() else (data / "input" / src)
        name = f"{i:06d}{src.suffix}"
        link_or_copy(src, tmp / name)
        mask = data / "input" / "masks" / f"{src.stem}.png"  # ingest's loss mask of this image, if any
        if mask.is_file():
            (tmp / "masks").mkdir(exist_ok=True)
            link_or_copy(mask, tmp / "masks" / f"{i:06d}.png")
        for _ in range(rep):
            w.writerow([name, row.get("text", "")])
        names_out.append(name)
    (tmp / "metadata.csv").write_text(buf.getvalue(), encoding="utf-8-sig")
    shutil.rmtree(train, ignore_errors=True)
    tmp.rename(train)
    (data / "filter_report.json").write_text(canonical_json(report), "utf-8")
    outputs = ["data/train", "data/filter_report.json"]
    yield Result("filter", outputs, {"kept": len(rows), "input": n_in})
    return f"kept {len(rows)} of {n_in}"


def _end_group(p: subprocess.Popen) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_result(result: Path) -> list[dict]:
    """Data-Juicer's export: one jsonl file (default executor) or a folder of json parts (Ray), in input order."""
    files = sorted(result.iterdir()) if result.is_dir() else ([result] if result.exists() else [])
    rows = [json.loads(ln) for f in files for ln in f.read_text("utf-8").splitlines() if ln.strip()]
    return sorted(rows, key=lambda r: Path(r["image"][0]).name)  # ingest names images in dataset order


def _print_table(ctx, report):
    ctx.report.info(f"     filter: {report['input']} records in")
    for o in report["ops"]:
        if o["kept"] is None:
            ctx.report.info(f"       {o['op']:<32} (count not reported by the {report['executor']} executor)")
        else:
            ctx.report.info(f"       {o['op']:<32} kept {o['kept']:>6} of {o['in']:<6} (dropped {o['dropped']})")
    ctx.report.info(f"     filter: {report['kept']} records kept")


_PREFLIGHT = re.compile(r"✗ \[(\w+)\] (.+)")


def _dj_error(ctx, log: str, ops, log_path: Path) -> StageError:
    """Data-Juicer's own complaint, pointed at the spec line of the op it names."""
    hint = f"full log: {ctx.story.rel(log_path)}"
    found = list(dict.fromkeys(m.groups() for m in _PREFLIGHT.finditer(log)))  # its preflight check, per op
    if found:
        msgs = []
        for op, msg in found:
            where = _op_line(ctx, ops.index(op)) if op in ops else "$.filters"
            msgs.append(f"{where}: Data-Juicer rejected `{op}`: {msg.strip()}")
        return StageError("filter", "\n".join(msgs), hint)
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    msg = next((m.group(0) for ln in reversed(lines) for m in [_ERR.search(ln)] if m), lines[-1] if lines else "failed")
    for i, op in enumerate(ops):
        if op in msg:
            return StageError("filter", f"{_op_line(ctx, i)}: Data-Juicer rejected `{op}`: {msg}", hint)
    return StageError("filter", f"Data-Juicer failed: {msg}", hint)


def _start_ray(ctx, workers: int):
    """Start a private local Ray head for Data-Juicer's Ray executor; return (its address, a function that stops
    it, the environment a driver needs to connect).

    `ray start --block` owns the processes it starts (raylet, GCS, workers) and ends them when it gets SIGTERM,
    so storyc stops exactly its own instance: never `ray stop`, which stops every Ray on the machine (a user's
    cluster, or the Ray Tune sweep that launched this build). A temp dir of its own keeps `address="auto"`
    lookups of other Ray users pointed at their own cluster.
    """
    import secrets
    import socket
    import tempfile
    import time

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    temp = Path(tempfile.mkdtemp(prefix="storyc-ray-"))  # short: Ray's socket paths must fit 107 bytes
    log = temp / "ray-start.log"
    # its own token: Data-Juicer's driver authenticates with it, whatever ~/.ray/auth_token holds
    ray_env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = dict(os.environ, **ray_env)
    args = ["start", "--head", "--block", f"--port={port}", f"--num-cpus={workers}", f"--temp-dir={temp}",
            "--include-dashboard=false", "--disable-usage-stats"]
    with open(log, "w") as out:
        proc = spawn("-mray.scripts.scripts", args, env=env, stdout=out, stderr=subprocess.STDOUT)

    def stop():
        if proc.poll() is None:
            proc.terminate()  # its own shutdown handler ends the raylet, GCS and workers it started
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # its own process group only (start_new_session)
                proc.wait()
        release(proc)
        shutil.rmtree(temp, ignore_errors=True)

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = log.read_text("utf-8", errors="replace")
        address = temp / "ray_current_cluster"  # the GCS address, as Ray itself wrote it
        if "Ray runtime started" in text and address.is_file():
            return address.read_text().strip(), stop, ray_env
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    text = log.read_text("utf-8", errors="replace").strip()
    stop()
    raise StageError("filter", "could not start a local Ray instance for `processing.executor: ray`",
                     text.splitlines()[-1] if text else None)
