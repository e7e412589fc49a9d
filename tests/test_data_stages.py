"""ingest + filter through the public CLI, with real Data-Juicer, on generated images."""
import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import DATA_SPEC as SPEC, run_cli


def _img(path: Path, w, h, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (w, h), (10, 200, 30, 128)[: len(mode)]).save(path)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / ".storyc").mkdir()
    imgs = root / "imgs"
    for name, (w, h) in {"a_512.png": (512, 512), "b_1100.png": (1100, 1100), "c_1024x300.png": (1024, 300),
                         "d_2048x1024.png": (2048, 1024), "e_2049x1024.png": (2049, 1024),
                         "sub/f_1200x2400.jpg": (1200, 2400)}.items():
        _img(imgs / name, w, h)
    _img(imgs / "g_alpha.png", 1024, 1024, "RGBA")
    (imgs / "h_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (imgs / "b_1100.txt").write_text("自己的标题\n", "utf-8")
    (root / "story.yaml").write_text(SPEC, "utf-8")
    r = run_cli("run", "filter", root / "story.yaml", cwd=root)
    return root, r


def test_notebook_filters_keep_exactly_the_right_images(filtered):
    root, r = filtered
    assert r.returncode == 0, r.stdout + r.stderr
    data = root / "build/d/data"
    rows = list(csv.DictReader(open(data / "train/metadata.csv", encoding="utf-8-sig")))
    sizes = sorted(Image.open(data / "train" / row["file_name"]).size for row in rows)
    # both bounds inclusive: 2048x1024 (ratio 2.0) and 1200x2400 (0.5) stay; 2049x1024 goes
    assert sizes == [(1024, 1024), (1100, 1100), (1200, 2400), (2048, 1024)]
    assert all(Image.open(data / "train" / row["file_name"]).mode == "RGB" for row in rows)
    assert (data / "train/metadata.csv").read_bytes().startswith(b"\xef\xbb\xbf")  # utf-8-sig like the notebook


def test_per_op_counts_and_report(filtered):
    root, r = filtered
    rep = json.loads((root / "build/d/data/filter_report.json").read_text("utf-8"))
    assert rep["input"] == 7 and rep["kept"] == 4
    assert [(o["op"], o["in"], o["kept"]) for o in rep["ops"]] == [
        ("image_shape_filter", 7, 5), ("image_aspect_ratio_filter", 5, 4)]
    assert "image_shape_filter" in r.stdout and "kept      5 of 7" in r.stdout


def test_corrupt_image_is_reported_by_name_not_fatal(filtered):
    root, r = filtered
    assert "ingest skipped h_corrupt.png" in r.stdout
    rep = json.loads((root / "build/d/data/input/ingest_report.json").read_text("utf-8"))
    assert [s["source"] for s in rep["skipped"]] == ["h_corrupt.png"]


def test_folder_captions_from_txt_files(filtered):
    root, _ = filtered
    rows = list(csv.DictReader(open(root / "build/d/data/train/metadata.csv", encoding="utf-8-sig")))
    texts = {Image.open(root / "build/d/data/train" / r["file_name"]).size: r["text"] for r in rows}
    assert texts[(1100, 1100)] == "自己的标题"
    assert texts[(1024, 1024)] == "二次元"


@pytest.mark.slow  # Data-Juicer, Ray or full-size layouts: seconds to minutes
def test_jsonl_source_and_limit(project):
    _img(project / "set/x/one.png", 1024, 1024)
    _img(project / "set/x/two.png", 1300, 1024)
    _img(project / "set/x/three.png", 1024, 1024)
    (project / "set/data.jsonl").write_text(
        '{"text": "第一", "image": ["x/one.png"]}\n{"text": "第二", "image": ["x/two.png"]}\n'
        '{"text": "第三", "image": ["x/three.png"]}\n', "utf-8")
    (project / "story.yaml").write_text(SPEC.replace("{source: folder, path: imgs, caption: 二次元}",
                                                     "{source: jsonl, path: set/data.jsonl, limit: 2}"), "utf-8")
    r = run_cli("run", "filter", project / "story.yaml", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = list(csv.DictReader(open(project / "build/d/data/train/metadata.csv", encoding="utf-8-sig")))
    assert [row["text"] for row in rows] == ["第一", "第二"]


def test_jsonl_broken_line_is_a_clear_error(project):
    _img(project / "set/one.png", 1024, 1024)
    (project / "set/data.jsonl").write_text('{"text": "a", "image": ["one.png"]}\n{"text": oops}\n', "utf-8")
    (project / "story.yaml").write_text(SPEC.replace("{source: folder, path: imgs, caption: 二次元}",
                                                     "{source: jsonl, path: set/data.jsonl}"), "utf-8")
    r = run_cli("run", "ingest", project / "story.yaml", cwd=project)
    assert r.returncode == 1
    assert "data.jsonl:2: not valid JSON" in r.stdout and "Traceback" not in r.stdout + r.stderr


@pytest.mark.slow  # Data-Juicer, Ray or full-size layouts: seconds to minutes
def test_empty_result_names_the_op(project):
    _img(project / "imgs/small.png", 300, 300)
    (project / "story.yaml").write_text(SPEC, "utf-8")
    r = run_cli("run", "filter", project / "story.yaml", cwd=project)
    assert r.returncode == 1
    assert "`image_shape_filter` removed the last record" in r.stdout


def test_modelscope_offline_fails_fast(project):
    (project / "story.yaml").write_text(SPEC.replace("{source: folder, path: imgs, caption: 二次元}",
                                                     "{source: modelscope, id: AI-ModelScope/lowres_anime}"), "utf-8")
    r = run_cli("run", "ingest", project / "story.yaml", cwd=project, timeout=60)
    assert r.returncode == 1
    assert "cannot reach ModelScope at https://www.modelscope.cn to load dataset `AI-ModelScope/lowres_anime`" in r.stdout
    assert "`dataset: {source: folder, path: ...}` or `source: jsonl`" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.slow  # Data-Juicer, Ray or full-size layouts: seconds to minutes
def test_bad_op_parameter_value_is_data_juicers_error_at_the_spec_line(project):
    _img(project / "imgs/a.png", 1024, 1024)
    (project / "story.yaml").write_text(SPEC + "filters:\n  - image_shape_filter: {min_width: wide}\n", "utf-8")
    r = run_cli("run", "filter", project / "story.yaml", cwd=project)
    assert r.returncode == 1
    assert ("story.yaml:8:5: $.filters[0]: Data-Juicer rejected `image_shape_filter`: "
            "Parameter 'min_width' expects type 'int', got 'str'") in r.stdout, r.stdout


@pytest.mark.slow  # Data-Juicer, Ray or full-size layouts: seconds to minutes
def test_ray_executor(project):
    import shutil

    for i, (w, h) in enumerate([(1024, 1024), (1024, 2400), (300, 300)]):
        _img(project / f"imgs/{i}.png", w, h)
    (project / "story.yaml").write_text(SPEC.replace("workers: 1", "workers: 2, executor: ray"), "utf-8")
    users = _users_ray()  # a Ray instance of the user's own: storyc must leave it running
    try:
        r = run_cli("run", "filter", project / "story.yaml", cwd=project, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert users[0].poll() is None, "the user's Ray instance was stopped by the build"
        import socket

        host, port = users[1].rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()  # its GCS still answers
    finally:
        users[0].terminate()
        users[0].wait(timeout=60)
    rows = list(csv.DictReader(open(project / "build/d/data/train/metadata.csv", encoding="utf-8-sig")))
    assert len(rows) == 1
    shutil.rmtree(project / "build", ignore_errors=True)


def _users_ray():
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="user-ray-")
    p = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
                          "--num-cpus=1", f"--temp-dir={temp}",
                          "--include-dashboard=false", "--disable-usage-stats"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(__import__("os").environ, RAY_USAGE_STATS_ENABLED="0"))
    deadline = time.time() + 180
    for line in p.stdout:
        if "Ray runtime started" in line or time.time() > deadline:
            break
    import threading

    threading.Thread(target=p.stdout.read, daemon=True).start()  # keep its pipe drained
    from pathlib import Path

    address = Path(temp) / "ray_current_cluster"

    def written():  # Ray writes the file, then its address: wait for the address
        return address.is_file() and ":" in address.read_text()

    while not written() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if p.poll() is not None or not written():  # no Ray on this machine at all: nothing to test against
        p.terminate()
        pytest.skip("Ray cannot start on this machine")
    return p, address.read_text().strip()


@pytest.mark.slow  # Data-Juicer, Ray or full-size layouts: seconds to minutes
def test_several_sources_with_their_captions_and_repeats(project):
    _img(project / "a/x.png", 1024, 1024)
    _img(project / "a/y.png", 1024, 1024)
    _img(project / "b/z.png", 1024, 1024)
    (project / "b/data.jsonl").write_text('{"image": ["z.png"]}\n', "utf-8")
    spec = project / "story.yaml"
    spec.write_text(SPEC.replace("dataset: {source: folder, path: imgs, caption: 二次元}\n",
                                 "datasets:\n  - {source: folder, path: a, caption: 甲, repeats: 3}\n"
                                 "  - {source: jsonl, path: b/data.jsonl, caption: 乙}\n"), "utf-8")
    r = run_cli("run", "filter", spec, cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = list(csv.DictReader(open(project / "build/d/data/train/metadata.csv", encoding="utf-8-sig")))
    # each image of the first source counts three times per epoch, with its own source's caption
    assert [(r["file_name"], r["text"]) for r in rows] == [("000000.png", "甲")] * 3 + [("000001.png", "甲")] * 3 + \
        [("000002.png", "乙")]
    rep = json.loads((project / "build/d/data/input/ingest_report.json").read_text("utf-8"))
    assert [(s["records"], s["repeats"]) for s in rep["sources"]] == [(2, 3), (1, 1)]
    r = run_cli("status", spec, cwd=project)
    assert r.stdout.splitlines()[1].startswith("ingest") and "up to date" in r.stdout.splitlines()[1]
    _img(project / "b/w.png", 1024, 1024)  # a file added to the second source changes the dataset fingerprint
    r = run_cli("status", spec, cwd=project)
    assert "dataset source changed" in r.stdout


def test_source_errors_name_the_list_entry(project):
    spec = project / "story.yaml"
    spec.write_text(SPEC.replace("dataset: {source: folder, path: imgs, caption: 二次元}\n",
                                 "dataset: {source: folder, path: imgs}\n"
                                 "datasets:\n  - {source: folder, path: nope}\n  - {source: modelscope, id: null}\n"),
                    "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1
    assert "$.datasets: both `dataset` and `datasets` are given" in r.stderr
    assert "$.datasets[0].path: `nope` does not exist" in r.stderr
    assert "$.datasets[1]: `source: modelscope` needs a dataset `id`" in r.stderr
