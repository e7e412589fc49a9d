#!/usr/bin/env python3
"""Median wall time of `storyc validate` on the example spec, against `python -c pass` and `dj-process --help`.

    python bench/cli_startup.py [--runs 7]
"""
import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def median_wall(cmd, runs):
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, capture_output=True)
        out.append(time.perf_counter() - t)
        if r.returncode not in (0,):
            raise SystemExit(f"{cmd} failed: {r.stderr.decode()[-500:]}")
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()
    rows = [("python -c pass", [sys.executable, "-c", "pass"]),
            ("storyc validate specs/camp.yaml", [sys.executable, "-m", "storyc", "validate", "-q", "specs/camp.yaml"]),
            ("storyc validate specs/*.yaml", [sys.executable, "-m", "storyc", "validate", "-q",
                                              *sorted(str(p) for p in (REPO / "specs").glob("*.yaml"))])]
    dj = shutil.which("dj-process")
    if dj:
        rows.append(("dj-process --help", [dj, "--help"]))
    print(f"{'command':<36} median wall (s), {a.runs} runs")
    for name, cmd in rows:
        print(f"{name:<36} {median_wall(cmd, a.runs):.3f}")


if __name__ == "__main__":
    main()
