"""Untrusted input never becomes code: a spec's file name, folder names and texts reach generated files only
through the target language's own emitter, and a planted training checkpoint is never unpickled."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import DATA_SPEC, run_cli, write_images

HOSTILE = "x\u2028custom_operator_paths: [pwn.py] #"  # U+2028 ends a YAML comment line


def _dj_keys(build):
    return set(yaml.safe_load((build / "data/data_juicer.yaml").read_text("utf-8")))


@pytest.mark.slow  # Data-Juicer, Ray or full-size layouts: seconds to minutes
def test_a_spec_file_name_cannot_add_keys_to_the_data_juicer_config(project):
    """The probe: a spec named `x<U+2028>custom_operator_paths: [pwn.py] #.yaml` made Data-Juicer import pwn.py."""
    write_images(project / "imgs", [(1024, 1024), (1200, 1024)])
    spec = project / f"{HOSTILE}.yaml"
    spec.write_text(DATA_SPEC, "utf-8")
    marker = project / "PWNED"
    pwn = f"open({str(marker)!r}, 'w').write('ran')\n"
    (project / "build/d").mkdir(parents=True)
    (project / "build/d/pwn.py").write_text(pwn, "utf-8")  # where Data-Juicer (cwd: the build folder) would look
    r = run_cli("build", spec, "--until", "filter", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (project / "build/d/data/data_juicer.yaml").read_text("utf-8")
    assert "custom_operator_paths" not in _dj_keys(project / "build/d")
    assert "\u2028" not in text and "\\u2028" in text.splitlines()[0]  # the name is shown, escaped, in the comment
    assert not marker.exists()
    assert json.loads((project / "build/d/data/filter_report.json").read_text("utf-8"))["kept"] == 2


def _args_of_train_sh(path):
    """The arguments train.sh passes to python, as bash itself parses them (python replaced by a recorder)."""
    out = subprocess.run(["bash", "-c", 'python() { printf "%s\\0" "$@"; }; source "$0"', str(path)],
                         capture_output=True, check=True).stdout
    args = out.decode("utf-8").split("\0")[:-1]
    return dict(zip(args[1::2], args[2::2])) if len(args) % 2 else {}  # --flag value pairs after the script path


def test_every_compiled_file_keeps_hostile_names_inside_their_values(project):
    """Audit: Unicode line breaks, NUL-like escapes, quotes and shell syntax in the spec's own name, the dataset
    folder and a model folder stay values in every artifact: YAML parses to the same keys, JSON is strict, bash
    sees the same arguments, and no raw line break or bidi character lands in a comment."""
    name = "a\u2028b\u2029c\u0085d\u202e '$(touch PWNED)' \"; rm -rf x #"  # a file name may hold anything
    odd = "d '$(touch PWNED)' \"; rm -rf x #"  # what a spec value may hold (see the text rule)
    write_images(project / odd, [(1024, 1024)])
    (project / "imgs").mkdir()
    spec = project / f"{name}.yaml"
    spec.write_text(DATA_SPEC.replace("path: imgs", "path: " + json.dumps(odd))
                    + f"models: {{kolors: {json.dumps('m/' + odd)}}}\n", "utf-8")
    plain = project / "plain.yaml"
    plain.write_text(DATA_SPEC.replace("story: {id: d}", "story: {id: p}"), "utf-8")
    for s in (spec, plain):
        r = run_cli("compile", s, cwd=project)
        assert r.returncode == 0, r.stdout + r.stderr
    hostile, benign = project / "build/d", project / "build/p"
    assert _dj_keys(hostile) == _dj_keys(benign)
    for rel in ("plan.json", "spec.resolved.json", "data/ingest.json", "train/train_config.json",
                "generate/generation_plan.json", "submission_manifest.json"):
        json.loads((hostile / rel).read_text("utf-8"), parse_constant=lambda c: 1 / 0)
    assert json.loads((hostile / "data/ingest.json").read_text("utf-8"))["dataset"]["path"] == odd
    args = _args_of_train_sh(hostile / "train/train.sh")
    assert args["--pretrained_unet_path"] == f"m/{odd}/unet/diffusion_pytorch_model.safetensors"
    assert set(args) == set(_args_of_train_sh(benign / "train/train.sh"))
    assert not (project / "PWNED").exists()
    for rel in ("data/data_juicer.yaml", "train/train.sh"):
        for ln in (hostile / rel).read_text("utf-8").split("\n"):
            if ln.startswith("#"):
                assert ln.isprintable(), (rel, ln)


def test_text_that_could_hide_or_break_lines_is_a_spec_error(project):
    """Ids ending in a newline (Python's `$` matched before it), NUL, bidi overrides and line separators in
    titles, teams, prompts and paths: each refused at its line, by name."""
    (project / "story.yaml").write_text(
        'version: 1\nstory: {id: "s\\n", title: "a\\u202eb", team: "t\\nx"}\n'
        'dataset: {source: folder, path: "im\\0gs"}\n'
        'scenes: [{id: "a\\n", prompt: "p\\x00q", seed: 0, caption: "two\\nlines"}]\n'
        'submission: {rules: none, images: 1}\nmodels: {kolors: "m\\u2028x"}\n', "utf-8")
    r = run_cli("validate", "story.yaml", cwd=project)
    assert r.returncode == 1
    err = r.stderr
    assert "story.yaml:2:13: $.story.id: `s\\n` is not a valid slug" in err
    assert "$.scenes[0].id: `a\\n` is not a valid slug" in err
    assert "$.story.title: contains U+202E (RIGHT-TO-LEFT OVERRIDE)" in err
    assert "$.story.team: contains U+000A (newline)" in err
    assert "$.dataset.path: contains U+0000" in err
    assert "$.scenes[0].prompt: contains U+0000" in err
    assert "$.models.kolors: contains U+2028 (LINE SEPARATOR)" in err
    assert "caption" not in err  # a caption may span lines
    assert "Traceback" not in err


EVIL = """
import os, pickle, sys, torch
class Evil:
    def __reduce__(self):
        return (open, ({marker!r}, "w"))
torch.save({{"state_dict": {{}}, "global_step": 2, "payload": Evil()}}, sys.argv[1])
if sys.argv[2] == "sealed":  # a forged seal: whoever can write the cache can write the seal too
    import hashlib
    open(sys.argv[1] + ".sha256", "w").write(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest() + "\\n")
"""


def test_a_planted_checkpoint_in_the_training_cache_is_never_unpickled(copy):
    """`cache/train/<key>.partial/checkpoints/last.ckpt` was loaded with weights_only=False: a pickle planted in a
    shared cache ran code on every node. Now: plain-data loading only; unsealed or forged, it is dropped."""
    project = copy.parent
    key = yaml.safe_load((project / "story.lock").read_text("utf-8"))["stages"]["train"]["extra"]["cache_key"]
    marker = project / "PWNED"
    for sealed in ("sealed",):  # with a forged seal: what protects is weights_only (an unsealed one: unit test below)
        cache = project / ".storyc/cache/train"
        ckpt = cache / f"{key}.partial/checkpoints/last.ckpt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", EVIL.format(marker=str(marker)), str(ckpt), sealed], check=True)
        assert ckpt.exists()
        r = run_cli("build", copy, "--force", "train", cwd=project)
        assert r.returncode == 0, r.stdout + r.stderr
        assert not marker.exists(), f"the planted {sealed} checkpoint ran code"
        assert "checkpoint" in r.stdout + r.stderr and "not used" in r.stdout + r.stderr
        assert "training from step 0" in r.stdout + r.stderr
        assert not ckpt.exists()


def test_a_sealed_checkpoint_loads_as_plain_data(tmp_path):
    """What storyc writes loads with weights_only=True; a flipped byte or a removed seal refuses it."""
    import pytest
    import torch

    from storyc.stages.train.callbacks import SealedCheckpointIO, load_sealed, seal_path

    io = SealedCheckpointIO()
    p = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3, "dir": tmp_path,
                        "loops": {"fit": {"n": 1, "t": (1, 2.5)}}}, p)
    got = load_sealed(p)
    assert got["global_step"] == 3 and got["dir"] == str(tmp_path) and torch.equal(got["state_dict"]["w"], torch.ones(2))
    raw = bytearray(p.read_bytes())
    raw[-30] ^= 1
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="differ from its seal"):
        load_sealed(p)
    seal_path(p).unlink()
    with pytest.raises(ValueError, match="no seal"):
        load_sealed(p)
    with pytest.raises(TypeError, match="plain data only"):
        io.save_checkpoint({"x": object()}, tmp_path / "other.ckpt")
    os.remove(p)
