import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run the real CLI in a subprocess (as a user would); return CompletedProcess with text output."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "storyc", *map(str, args)], cwd=cwd or REPO, env=e,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process (fast); return (exit code, stdout, stderr)."""
    from storyc.cli import main

    def go(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return go


@pytest.fixture
def project(tmp_path):
    """An empty project folder (a .storyc marker makes it the project root)."""
    (tmp_path / ".storyc").mkdir()
    return tmp_path
