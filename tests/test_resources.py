"""The memory planner (a pure function of free GPU memory), the memory cap variable, and the full-size model
layout writer (bench/fullsize.py) at tiny scale, loaded through storyc's real loaders in a real build."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, run_cli, write_images


@pytest.mark.parametrize("free, gc, graphs, want_gc, want_graphs", [
    (None, "auto", True, False, False),  # CPU: no checkpointing, no graphs
    (139.0, "auto", True, False, True),  # H200: the fast path
    (22.0, "auto", True, False, True),  # a 24 GB card: 14.1 GiB needed without checkpointing
    (14.5, "auto", True, False, True),
    (13.5, "auto", True, True, False),  # just under: checkpointing on, so no CUDA graphs
    (10.0, "auto", True, True, False),  # a 12 GB card
    (139.0, True, True, True, False),  # explicit values win
    (8.0, False, True, False, True),
    (139.0, "auto", False, False, False),  # graphs off in the spec
])
def test_train_plan(free, gc, graphs, want_gc, want_graphs):
    from storyc.resources import plan_train

    p = plan_train(free, gc, graphs, batch=1, width=1024, height=1024)
    assert (p.gradient_checkpointing, p.cuda_graphs) == (want_gc, want_graphs), p.reason
    assert p.reason


def test_train_plan_scales_with_pixels_batch_and_ranks():
    from storyc.resources import plan_train

    assert not plan_train(10.0, "auto", True, 1, 512, 512).gradient_checkpointing  # a quarter of the pixels
    assert plan_train(20.0, "auto", True, 2, 1024, 1024).gradient_checkpointing  # two images per step
    assert not plan_train(139.0, "auto", True, 1, 1024, 1024, world=2).cuda_graphs  # graphs on one GPU only
    # a DoRA's step needs 2.7 GiB more than a LoRA's (measured): 15 GiB free is enough for one, not the other
    assert not plan_train(15.0, "auto", True, 1, 1024, 1024).gradient_checkpointing
    assert plan_train(15.0, "auto", True, 1, 1024, 1024, adapter="dora").gradient_checkpointing


@pytest.mark.parametrize("free, batch, images, want", [  # free: what is left once the UNet and VAE are loaded
    (None, "auto", 8, 8),
    (130.0, "auto", 8, 8),
    (130.0, "auto", 3, 3),  # never more than there are images
    (16.0, "auto", 8, 8),  # a 24 GB card with the UNet loaded: (16 - 1.5) / 1.0 = 14 -> 8
    (5.0, "auto", 8, 3),
    (2.0, "auto", 8, 1),  # never below 1
    (16.0, 6, 8, 6),  # explicit wins
])
def test_generate_plan(free, batch, images, want):
    from storyc.resources import plan_generate

    b, why = plan_generate(free, batch, 1024, 1024, images)
    assert b == want and why


@pytest.mark.parametrize("free, want", [  # free: the card's free memory before generate loads anything
    (None, True),  # the CPU
    (130.0, True),  # an H200
    (22.0, True),  # STORYC_GPU_MEMORY_GIB=22: 13.3 + 4.8 + 1.5 = 19.6 GiB fit
    (19.0, False),  # less: the UNet's weights are read once ChatGLM is freed
])
def test_load_plan(free, want):
    from storyc.resources import plan_loads

    both, why = plan_loads(free, 4.8)  # the Kolors UNet's fp16 safetensors
    assert both is want and ("while" if want else "once it is freed") in why


def test_silent_stdout_is_per_thread(capsys):
    """A model loading quietly on a worker thread neither swallows the main thread's lines nor leaves stdout
    swapped when the two leave their quiet spans out of order."""
    import sys
    import threading

    from storyc.stages._quiet import silent_stdout

    before = sys.stdout
    inside, release = threading.Event(), threading.Event()

    def worker():
        with silent_stdout():
            inside.set()
            print("worker chatter")
            release.wait(5)
            print("more worker chatter")

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(5)
    with silent_stdout():
        print("main chatter")
    print("main line")  # while the worker is still silent
    release.set()
    t.join(5)
    print("after")
    assert sys.stdout is before
    assert capsys.readouterr().out == "main line\nafter\n"


def test_memory_cap_variable(monkeypatch):
    from storyc.errors import StorycError
    from storyc.resources import cap_gib, free_gib

    monkeypatch.setenv("STORYC_GPU_MEMORY_GIB", "22")
    assert cap_gib() == 22.0
    assert free_gib("cpu") is None  # the cap is for GPUs; the CPU plan ignores it
    for bad in ("lots", "-3", "0"):
        monkeypatch.setenv("STORYC_GPU_MEMORY_GIB", bad)
        with pytest.raises(StorycError, match="STORYC_GPU_MEMORY_GIB"):
            cap_gib()


SPEC = """\
version: 1
story: {id: fs}
models: {kolors: models/kolors/Kolors, vae: models/sdxl-vae-fp16-fix,
         aesthetic: models/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE}
dataset: {source: folder, path: data, caption: 二次元}
filters: [{image_shape_filter: {min_width: 64, min_height: 64}}]
processing: {workers: 1}
lora: {rank: 4, alpha: 4.0}
train: {epochs: 1, steps_per_epoch: 2, resolution: 64, precision: "32"}
generation: {width: 64, height: 64, steps: 2}
submission: {rules: none, images: 2, min_aesthetic: -1000}
scenes:
  - {id: a, prompt: 一个女孩, seed: 0}
  - {id: b, prompt: 一个男孩, seed: 1}
"""


@pytest.mark.slow  # Data-Juicer, Ray or full-size layouts: seconds to minutes
def test_fullsize_layout_writer_at_tiny_scale_loads_through_storyc(project):
    r = subprocess.run([sys.executable, str(REPO / "bench/fullsize.py"), str(project / "models"), "--scale", "tiny",
                        "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    te = project / "models/kolors/Kolors/text_encoder"
    shards = sorted(p.name for p in te.glob("pytorch_model-*.bin"))
    index = json.loads((te / "pytorch_model.bin.index.json").read_text())
    assert shards and set(index["weight_map"].values()) == set(shards)  # transformers' sharded .bin layout
    assert (project / "models/kolors/Kolors/unet/diffusion_pytorch_model.safetensors").is_file()
    assert (project / "models/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE/pytorch_model.bin").is_file()
    write_images(project / "data", [(96, 96), (80, 64)])
    (project / "story.yaml").write_text(SPEC, "utf-8")
    r = run_cli("build", project / "story.yaml", cwd=project)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "submission VALID" in r.stdout
    assert "generate: on the CPU" in r.stdout  # batch_size auto, planned


def test_a_card_too_small_even_with_checkpointing_is_said():
    from storyc.resources import plan_train

    assert "lower train.batch_size or train.resolution" in plan_train(6.0, "auto", True, 1, 1024, 1024).reason
    assert "even with" not in plan_train(9.0, "auto", True, 1, 1024, 1024).reason
