import json
import subprocess
import sys
from pathlib import Path
import pytest

from conftest import REPO, run_cli

HEAVY = ("torch", "transformers", "diffsynth", "data_juicer", "peft", "lightning", "diffusers", "ray")


def test_light_commands_import_no_heavy_library(tmp_path):
    specs = sorted(str(p) for p in (REPO / "specs").glob("*.yaml"))
    code = (
        "import sys\nfrom storyc.cli import main\n"
        f"rc = [main(['validate', '-q', *{specs!r}]), main(['compile', {specs[0]!r}, '-o', {str(tmp_path)!r}]),"
        f" main(['plan', {specs[0]!r}]), main(['status', {specs[0]!r}, '-o', {str(tmp_path)!r}])]\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print('RC', rc); print('HEAVY', heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "RC [0, 0, 0, 0]" in r.stdout, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout


def test_a_heavy_process_exits_without_teardown_but_loses_nothing(tmp_path):
    """After a stage ran (torch imported) storyc ends with os._exit, skipping ~2 s of interpreter teardown; first a
    worker thread still writing finishes, exit handlers run and buffered output is flushed; the exit code stands."""
    code = f"""
import atexit, sys, threading, time
import torch  # what a stage imports
sys.argv = ["storyc", "schema"]
def slow():
    time.sleep(0.5)
    open({str(tmp_path / "late.txt")!r}, "w").write("written")
threading.Thread(target=slow).start()
atexit.register(lambda: print("exit handler ran"))
import storyc.cli as cli
cli._dispatch = lambda args: (print("buffered", end=""), 3)[1]
cli.main()
print("after main: the interpreter went on")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                       env={**__import__("os").environ, "PYTHONUNBUFFERED": ""})
    assert r.returncode == 3, r.stderr
    assert r.stdout == "bufferedexit handler ran\n"
    assert (tmp_path / "late.txt").read_text() == "written"


def test_python_dash_m_and_console_script_agree():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("storyc ")
    exe = Path(sys.executable).with_name("storyc")
    if exe.exists():
        r2 = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
        assert r2.stdout == r.stdout


def test_schema_is_valid_draft_2020_12(cli):
    from jsonschema import Draft202012Validator

    code, out, _ = cli("schema")
    schema = json.loads(out)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("2020-12/schema")


def test_init_writes_a_spec_that_validates(cli, project):
    code, out, _ = cli("init", project / "new")
    assert code == 0
    code, out, err = cli("validate", project / "new/story.yaml")
    assert code == 0, err
    assert cli("init", project / "new")[0] == 1  # refuses to overwrite


def test_missing_file_is_a_clear_error(cli, project):
    code, _, err = cli("validate", project / "nope.yaml")
    assert code == 1 and "no such file" in err and "Traceback" not in err
    assert "error: no such file:" in err and "$:" not in err  # the file itself is missing, no value path


def test_ops_lists_data_juicer_ops(cli):
    code, out, _ = cli("ops", "image_shape")
    assert code == 0 and "image_shape_filter (filter)" in out
    own, common = out.split("common parameters")
    # the op's own parameters first, with types and defaults; the base classes' ones once, apart
    assert "    min_width: int = 1\n" in own and "    any_or_all: str = 'any'\n" in own
    assert "text_key" not in own and "text_key" in common and common.count("text_key") == 1
    code, out, _ = cli("ops", "filter")
    assert code == 0 and out.count("common parameters") == 1 and out.count("    num_proc") == 0
    code, out, err = cli("ops", "image_shap_filter")
    assert code == 1 and not out and "no Data-Juicer op matches" in err and "did you mean `image_shape_filter`?" in err


def test_readme_spec_reference_matches_schema():
    from storyc.docs import spec_reference

    readme = (REPO / "README.md").read_text("utf-8")
    assert spec_reference() in readme, "run: python -m storyc.docs --write"


def test_usage_errors_have_their_own_exit_code():
    for argv in ((), ("build",), ("nosuchcommand",), ("build", "x.yaml", "--nosuchflag")):
        r = run_cli(*argv)
        assert r.returncode == 64, (argv, r.returncode, r.stderr)
        assert "usage: storyc" in r.stderr and "Traceback" not in r.stderr


def test_outside_the_project_says_how_the_root_was_chosen(cli, tmp_path):
    proj = tmp_path / "story"  # no .git / .storyc / storyc.toml anywhere above: the spec's folder is the root
    proj.mkdir()
    spec = proj / "story.yaml"
    spec.write_text((REPO / "specs/camp.yaml").read_text("utf-8"), "utf-8")  # models: ../models/...
    code, _, err = cli("validate", spec)
    assert code == 1 and "`../models/kolors/Kolors` points outside the project folder" in err
    assert f"the project folder is {proj} (the spec's own folder, since no folder above it has .git" in err
    assert "empty storyc.toml" in err
    (tmp_path / "storyc.toml").write_text("", "utf-8")  # the documented way to widen the root
    code, _, err = cli("validate", spec)
    assert "outside the project" not in err


def test_help_describes_arguments_stages_and_the_token(capsys):
    from storyc.cli import main

    def helptext(*argv):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        assert e.value.code == 0
        return " ".join(capsys.readouterr().out.split())  # argparse wraps lines

    run = helptext("run")
    assert "STAGE is a kind (ingest, filter, train, generate, refine, score, bundle)" in run
    assert "SPEC the story spec, a story.yaml file" in run
    assert "-q, --quiet print only warnings, errors and the verdict" in run
    assert "--cache DIR the content-addressed training cache" in run
    assert "--force train retrains the LoRA and replaces its cache entry" in helptext("build")
    assert "MODELSCOPE_API_TOKEN" in helptext("publish")
    assert "DIR a folder of .png/.jpg/.webp images" in helptext("score")
    assert "64 wrong command line" in helptext()
