"""The build engine's seams: RunOptions and the Python API, the stage registry, typed lock entries, and errors
raised inside a stage (out of memory, disk full, a bug) becoming clear, recorded failures."""
import errno
import json
import shutil

import pytest
import yaml

from conftest import BASE_SPEC, build_report, edit as _edit, make_project, ran, run_cli


def _plan(spec):
    from storyc.compiler import compile
    from storyc.spec import load_story

    return compile(load_story(spec))


# ---------------------------------------------------------------- RunOptions and the Python API

def test_run_options_are_typed_and_refuse_misspelt_names():
    from storyc.options import RunOptions

    opts = RunOptions(cache_dir="x/cache")
    assert str(opts.cache_dir) == "x/cache" and not isinstance(opts.cache_dir, str)
    with pytest.raises(TypeError):
        RunOptions(forse="train")
    with pytest.raises(TypeError, match="unknown run option"):
        opts.with_(dryrun=True)
    with pytest.raises(Exception):
        opts.force = "all"  # frozen


def test_python_api_decides_and_executes_with_its_own_lock(copy):
    """A caller that is not the CLI (a sweep trial) runs a build with its own lock file; the spec's lock is
    untouched, and decide() says what is stale without running anything."""
    from storyc.lock import Lock
    from storyc.options import RunOptions
    from storyc.runner import decide, execute

    spec_lock = copy.parent / "story.lock"
    before = spec_lock.read_bytes()
    trial_lock = copy.parent / "trials" / "t1.lock"
    trial_lock.parent.mkdir()
    shutil.copyfile(spec_lock, trial_lock)
    _edit(copy, "cfg_scale: 4.0", "cfg_scale: 5.0")
    plan = _plan(copy)
    opts = RunOptions(lock_path=trial_lock, quiet=True, live=False)
    decisions = {d.name: d for d in decide(plan, Lock.load(trial_lock), opts)}
    assert decisions["generate[home]"].reasons == ("cfg_scale changed",) and decisions["generate[home]"].stale
    assert decisions["train"].state == "up to date"
    assert decisions["bundle"].state == "may rerun"
    assert decisions["bundle"].reasons == ("if the output of score (3 scenes) changes",)
    res = execute(plan, opts)
    assert res.exit_code == 0 and res.failures == []
    assert set(res.ran) == {f"{k}[{s}]" for k in ("generate", "score") for s in ("home", "concert", "stage")} | {"bundle"}
    assert spec_lock.read_bytes() == before
    doc = yaml.safe_load(trial_lock.read_text("utf-8"))
    assert doc["stages"]["generate[home]"]["params"]["cfg_scale"] == 5.0
    assert not [d for d in decide(plan, None, opts) if d.stale]


def test_cli_lock_option(copy):
    other = copy.parent / "other.lock"
    r = run_cli("build", copy, "--lock", other, "--until", "ingest", "-q", cwd=copy.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ingest" in yaml.safe_load(other.read_text("utf-8"))["stages"]
    assert ran(copy) == {"ingest"}  # a fresh lock: ingest never built for it


# ---------------------------------------------------------------- the registry

def test_every_stage_comes_from_the_registry_and_has_an_executor():
    import importlib

    from storyc.stages.registry import KINDS

    plan = _plan(__import__("conftest").REPO / "specs/camp.yaml")
    # the camp story leaves generation.refine off: every other kind, in the registry's order
    assert list(dict.fromkeys(s.kind for s in plan.stages.values())) == [k for k in KINDS if k != "refine"]
    for kind in KINDS.values():
        assert callable(importlib.import_module(kind.executor).run)
    assert plan.stages["train"].settings == {"checkpoint_every": 100, "cuda_graphs": True, "compile": False,
                                             "num_workers": 0, "gradient_checkpointing": "auto", "tensorboard": True}
    assert not set(plan.stages["train"].settings) & set(plan.stages["train"].params["train"])


def test_execution_settings_are_not_hashed(copy):
    _edit(copy, "checkpoint_every: 2}", "checkpoint_every: 3, num_workers: 2, cuda_graphs: false, compile: true}")
    r = run_cli("status", copy, cwd=copy.parent)
    assert "everything up to date" in r.stdout, r.stdout
    _edit(copy, "batch_size: 1}", "batch_size: 2}")  # generation.batch_size: how many scenes per UNet call
    assert "everything up to date" in run_cli("status", copy, cwd=copy.parent).stdout


def test_num_workers_trains_the_same_lora(copy, tmp_path):
    """train.num_workers runs the sample preparation in DataLoader worker processes, drawing exactly what one
    process draws (a fresh cache forces real training)."""
    _edit(copy, "checkpoint_every: 2}", "checkpoint_every: 2, num_workers: 2}")
    from storyc.cli import main

    base_lora = (copy.parent / "build/t/lora/t.diffsynth.safetensors").read_bytes()
    assert main(["build", str(copy), "--until", "train", "--force", "train", "--cache", str(tmp_path / "c"), "-q"]) == 0
    assert any((tmp_path / "c/train").iterdir())
    assert (copy.parent / "build/t/lora/t.diffsynth.safetensors").read_bytes() == base_lora


def test_adding_a_lora_format_reruns_train_from_the_cache_and_ships_it(copy):
    _edit(copy, "lora_formats: [diffsynth]", "lora_formats: [diffsynth, kohya]")
    r = run_cli("build", copy, cwd=copy.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reused cached LoRA" in r.stdout  # no retraining: the cache entry holds every format
    assert ran(copy) == {"train", "bundle"}  # same LoRA bytes: the images stay
    assert (copy.parent / "build/t/submission/t/t.kohya.safetensors").is_file()
    lock = yaml.safe_load((copy.parent / "story.lock").read_text("utf-8"))
    assert "lora/t.kohya.safetensors" in lock["stages"]["train"]["outputs"]


def test_train_config_states_the_steps_fit_runs(tmp_path, tiny_models):
    spec = make_project(tmp_path, tiny_models, BASE_SPEC.replace(
        "steps_per_epoch: 4,", "steps_per_epoch: 10, batch_size: 2, accumulate_grad_batches: 2,"),
        sizes=((1024, 1024),))
    from storyc.cli import main

    assert main(["build", str(spec), "--until", "train", "-q"]) == 0
    cfg = json.loads((tmp_path / "build/t/train/train_config.json").read_text("utf-8"))
    rep = json.loads((tmp_path / "build/t/lora/train_report.json").read_text("utf-8"))
    assert cfg["total_steps"] == rep["steps"] == 2  # 10 samples / batch 2 = 5 micro-batches; 5 // 2 steps


# ---------------------------------------------------------------- typed lock entries

def test_malformed_lock_entry_is_stale_not_a_crash(copy):
    lock = copy.parent / "story.lock"
    doc = yaml.safe_load(lock.read_text("utf-8"))
    doc["stages"]["score[home]"]["outputs"] = "garbage"
    doc["stages"]["generate[stage]"]["digest"] = 7
    lock.write_text(yaml.safe_dump(doc), "utf-8")
    r = run_cli("status", copy, cwd=copy.parent)
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr
    rows = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip()}
    assert "lock entry is malformed" in rows["score[home]"] and "lock entry is malformed" in rows["generate[stage]"]
    assert "up to date" in rows["train"]
    from storyc.cli import main

    assert main(["build", str(copy), "-q"]) == 0
    assert {"score[home]", "generate[stage]"} <= ran(copy) and "train" not in ran(copy)


# ---------------------------------------------------------------- errors inside a stage

def _break_scoring(monkeypatch, exc):
    from storyc.stages import score

    def fail(self, images):
        raise exc

    monkeypatch.setattr(score.Scorer, "measure", fail)


def test_out_of_memory_in_a_stage_is_a_clear_error_and_keeps_finished_outputs(copy, monkeypatch, capsys):
    import torch

    _edit(copy, "cfg_scale: 4.0", "cfg_scale: 5.0")
    _break_scoring(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    from storyc.cli import main

    assert main(["build", str(copy), "-q"]) == 1
    out = capsys.readouterr()
    assert "error: stage score: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in out.out
    assert "hint:" in out.out and "finished outputs are kept" in out.out and "storyc bug" not in out.out + out.err
    states = build_report(copy)
    assert states["generate[home]"] == "ran" and states["score[home]"] == "failed" and states["bundle"] == "skipped"
    lock = yaml.safe_load((copy.parent / "story.lock").read_text("utf-8"))
    assert lock["stages"]["generate[home]"]["params"]["cfg_scale"] == 5.0  # the finished stages are recorded
    monkeypatch.undo()
    assert main(["build", str(copy), "-q"]) == 0
    assert ran(copy) == {"score[home]", "score[concert]", "score[stage]", "bundle"}  # resumes, no re-render


def test_disk_full_names_the_file(copy, monkeypatch, capsys):
    _edit(copy, "cfg_scale: 4.0", "cfg_scale: 5.0")
    _break_scoring(monkeypatch, OSError(errno.ENOSPC, "No space left on device", "/data/scores/01-home.json"))
    from storyc.cli import main

    assert main(["build", str(copy), "-q", "--keep-going"]) == 1
    out = capsys.readouterr().out
    assert "stage score: no space left on the device writing /data/scores/01-home.json" in out
    assert build_report(copy)["bundle"] == "blocked"  # --keep-going: dependents are blocked, not skipped


def test_a_bug_in_a_stage_is_an_internal_error_with_the_traceback_kept(copy, monkeypatch, capsys):
    _edit(copy, "cfg_scale: 4.0", "cfg_scale: 5.0")
    _break_scoring(monkeypatch, ValueError("unexpected shape"))
    from storyc.cli import main

    assert main(["build", str(copy), "-q"]) == 2
    out = capsys.readouterr().out
    assert "error: stage score: internal error: ValueError: unexpected shape" in out and "storyc bug" in out
    log = (copy.parent / "build/t/build_error.log").read_text("utf-8")
    assert "Traceback" in log and "unexpected shape" in log
    assert build_report(copy)["score[home]"] == "failed"
