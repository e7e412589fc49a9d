"""The trainers' knobs (min-SNR, noise offset, caption dropout, EMA, optimizers, LR schedules, TensorBoard), each
against its formula, and a real training run on tiny models with all of them on."""
import json
import math

import pytest
import torch
import yaml

from conftest import copy_project, edit, ran, run_cli

KNOBS = ("min_snr_gamma", "noise_offset", "caption_dropout", "ema", "optimizer", "lr_scheduler", "lr_warmup_steps")


def test_min_snr_weight_is_the_papers_formula():
    from diffsynth.schedulers import EnhancedDDIMScheduler

    from storyc.stages.train.module import min_snr_weight

    sch = EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100)
    for t in (0, 10, 200, 550, 1099):
        a = float(sch.alphas_cumprod[t])
        snr = a / (1 - a)
        want = min(snr, 5.0) / snr  # Hang et al. 2023, epsilon prediction
        assert math.isclose(float(min_snr_weight(sch.alphas_cumprod, torch.tensor([t]), 5.0)), want, rel_tol=1e-5)
    assert float(min_snr_weight(sch.alphas_cumprod, torch.tensor([1099]), 5.0)) == 1.0  # noisy end: SNR < gamma


def _samples(**cfg):
    from storyc.stages.train.config import train_section
    from storyc.stages.train.data import Samples

    lat = torch.randn(1, 4, 8, 8)
    data = {"latents": [{"latent": lat, "latent_flip": lat.flip(3)}] * 2, "size": (64, 64),
            "text_of": [0, 0], "texts": ["", "二次元"]}
    data["text_of"] = [1, 1]
    base = {"seed": 3, "random_flip": False, "center_crop": True}
    return Samples(data, train_section({**base, **cfg}), 400)


def test_noise_offset_is_one_shift_per_channel():
    plain, shifted = _samples(), _samples(noise_offset=0.1)
    for i in (0, 7, 123):
        d = shifted[i]["noise"] - plain[i]["noise"]  # the same base noise, plus offset x N(0,1) per channel
        per_channel = d[:, :, :1, :1]
        assert torch.allclose(d, per_channel.expand_as(d), atol=1e-6)
        assert per_channel.abs().max() > 0 and per_channel.abs().max() < 0.1 * 5


def test_caption_dropout_is_deterministic_under_the_seed():
    a, b = _samples(caption_dropout=0.3), _samples(caption_dropout=0.3)
    drops = [a[i]["text"] == 0 for i in range(400)]
    assert drops == [b[i]["text"] == 0 for i in range(400)]
    assert 0.22 < sum(drops) / 400 < 0.38
    assert not any(_samples()[i]["text"] == 0 for i in range(400))  # off: never the empty caption
    other = _samples(caption_dropout=0.3, seed=4)
    assert drops != [other[i]["text"] == 0 for i in range(400)]


def test_ema_update_equals_a_plain_loop():
    from storyc.stages.train.callbacks import ema_update

    g = torch.Generator().manual_seed(0)
    values = [torch.randn(3, 2, generator=g) for _ in range(5)]
    ema = [values[0].clone()]
    want = values[0].clone()
    for v in values[1:]:
        ema_update(ema, [v], 0.9)
        want = 0.9 * want + 0.1 * v
    assert torch.allclose(ema[0], want)


def test_lr_schedules_by_hand():
    from storyc.stages.train.module import lr_lambda

    f = lr_lambda("cosine", 2, 10)
    assert [f(0), f(1)] == [0.0, 0.5]  # linear warm-up
    assert f(2) == 1.0 and math.isclose(f(6), 0.5) and math.isclose(f(10), 0.0, abs_tol=1e-12)
    lin = lr_lambda("linear", 0, 4)
    assert [lin(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_lambda("constant", 0, 4)(3) == 1.0


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "prodigy"])
def test_optimizers_construct_and_step(name):
    from storyc.stages.train.module import make_optimizer

    p = torch.nn.Parameter(torch.randn(64, 64))
    try:
        opt = make_optimizer(name, [p], 1.0 if name == "prodigy" else 1e-2, cuda=False)
    except RuntimeError as e:  # pragma: no cover - a bitsandbytes build without a CPU backend
        pytest.skip(f"{name} has no CPU kernel here: {e}")
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(before, p.detach())
    assert type(opt).__module__.split(".")[0] == {"adamw": "torch", "adamw8bit": "bitsandbytes",
                                                  "prodigy": "prodigyopt"}[name]


def test_default_knobs_keep_existing_locks(base):
    """A spec that leaves the knobs at the notebook's math hashes the same train slice as before they existed."""
    lock = yaml.safe_load((base.parent / "story.lock").read_text("utf-8"))
    assert not set(KNOBS) & set(lock["stages"]["train"]["params"]["train"])


def test_bad_knob_combinations_are_spec_errors(project):
    spec = project / "story.yaml"
    spec.write_text("version: 1\nstory: {id: k}\ntrain:\n  epochs: 1\n  steps_per_epoch: 10\n"
                    "  lr_warmup_steps: 10\n  optimizer: prodigy\nscenes: [{id: a, prompt: x, seed: 0}]\n"
                    "submission: {rules: none, images: 1}\n", "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1
    assert "story.yaml:6:20: $.train.lr_warmup_steps: 10 warm-up steps but the run has only 10 optimizer steps" in r.stderr
    spec.write_text(spec.read_text("utf-8").replace("lr_warmup_steps: 10", "lr_warmup_steps: 1"), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 0 and "warning: " in r.stderr
    assert "$.train.learning_rate: learning_rate 0.0001 with optimizer prodigy" in r.stderr


def test_training_with_every_knob_on(base, tmp_path):
    spec = copy_project(base, tmp_path / "p")
    edit(spec, "checkpoint_every: 2}", "checkpoint_every: 2, min_snr_gamma: 5, noise_offset: 0.05, "
                                       "caption_dropout: 0.5, ema: 0.9, lr_scheduler: cosine, lr_warmup_steps: 2}")
    r = run_cli("build", spec, "--until", "train", cwd=spec.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    lock = yaml.safe_load((spec.parent / "story.lock").read_text("utf-8"))
    params = lock["stages"]["train"]["params"]["train"]
    assert params["min_snr_gamma"] == 5 and params["ema"] == 0.9 and params["lr_scheduler"] == "cosine"
    rep = json.loads((spec.parent / "build/t/lora/train_report.json").read_text("utf-8"))
    assert rep["encoded_texts"] == 1  # the empty caption, for the dropped samples
    log = (spec.parent / "build/t/lora/train_log.csv").read_text("utf-8").splitlines()
    assert len(log) == 5 and all(math.isfinite(float(ln.split(",")[1])) for ln in log[1:])
    events = list((spec.parent / "build/t/train/logs").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"loss", "lr-AdamW"} <= set(acc.Tags()["scalars"]), acc.Tags()["scalars"]
    # the loss stays on the device between flushes (no host sync per step), yet every step reaches both logs
    rows = [ln.split(",") for ln in log[1:]]
    assert [e.step for e in acc.Scalars("loss")] == [int(r[0]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isclose(e.value, float(r[1]), abs_tol=1e-5) for e, r in zip(acc.Scalars("loss"), rows))
    lrs = [e.value for e in acc.Scalars("lr-AdamW")]
    assert lrs[0] < lrs[1] < lrs[2] and lrs[3] < lrs[2]  # warm-up, then the cosine decay
    # the exported LoRA is the EMA of the trained weights, not the last weights: the same run without EMA (the
    # same trajectory: EMA only watches it) exports the last weights. lora_B starts at zero, so its average over a
    # 4-step run at decay 0.9 is well under a quarter of where it ends.
    from storyc import lora

    ema, _ = lora.load(spec.parent / "build/t/lora/t.diffsynth.safetensors")
    edit(spec, " ema: 0.9,", "")
    r = run_cli("build", spec, "--until", "train", cwd=spec.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    last, _ = lora.load(spec.parent / "build/t/lora/t.diffsynth.safetensors")
    b = [k for k in last if "lora_B" in k]
    assert b and all(float(last[k].abs().max()) > 0 for k in b)
    assert all(float(ema[k].abs().max()) < 0.4 * float(last[k].abs().max()) for k in b)


def test_story_previews_score_each_checkpoint_and_select_the_best(base, tmp_path):
    from storyc import lora

    spec = copy_project(base, tmp_path / "p")
    edit(spec, "checkpoint_every: 2}", "checkpoint_every: 2, preview_every: 2, preview_steps: 1, select: best_score}")
    r = run_cli("build", spec, cwd=spec.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "preview at step 2: mean aesthetic" in r.stdout and "preview at step 4" in r.stdout
    lock = yaml.safe_load((spec.parent / "story.lock").read_text("utf-8"))
    facts = lock["stages"]["train"]["extra"]
    assert set(facts["checkpoints"]) == {"2", "4"}
    best = max((2, 4), key=lambda s: (facts["checkpoints"][str(s)]["mean_aesthetic"], s))
    assert facts["selected_step"] == best
    lora_dir = spec.parent / "build/t/lora"
    doc = json.loads((lora_dir / "checkpoints.json").read_text("utf-8"))
    for c in doc["checkpoints"]:  # the mean is the mean of that checkpoint's scene scores
        assert math.isclose(c["mean"], sum(c["scores"].values()) / 3, abs_tol=1e-5)
        assert (lora_dir / f"checkpoints/step-{c['step']}.png").is_file()
    shipped, _ = lora.load(lora_dir / "t.diffsynth.safetensors")
    chosen, _ = lora.load(lora_dir / f"checkpoints/step-{best}.safetensors")
    assert shipped.keys() == chosen.keys() and all(torch.equal(shipped[k], chosen[k]) for k in shipped)
    # previews never disturb training: the last checkpoint is exactly the LoRA trained without previews
    last, _ = lora.load(lora_dir / "checkpoints/step-4.safetensors")
    plain, _ = lora.load(base.parent / "build/t/lora/t.diffsynth.safetensors")
    assert all(torch.equal(last[k], plain[k]) for k in plain)
    report = (spec.parent / "build/t/submission/t/report.html").read_text("utf-8")
    assert "id='checkpoints'" in report and report.count("height='96'") == 2 and "<polyline" in report
    assert f"<td>{best} (used)</td>" in report
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(spec.parent / "build/t/train/logs"))
    acc.Reload()
    assert [e.step for e in acc.Images("preview")] == [2, 4]
    assert "preview/mean_aesthetic" in acc.Tags()["scalars"]


def test_best_score_needs_previews(project):
    spec = project / "story.yaml"
    spec.write_text("version: 1\nstory: {id: k}\ntrain: {select: best_score}\nscenes: [{id: a, prompt: x, seed: 0}]\n"
                    "submission: {rules: none, images: 1}\n", "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "$.train.select: `select: best_score` needs previews" in r.stderr
    spec.write_text(spec.read_text("utf-8").replace("select: best_score", "select: {weights: {style_coherense: 1}}"),
                    "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "unknown key `style_coherense`" in r.stderr and "did you mean `style_coherence`" in r.stderr
    spec.write_text(spec.read_text("utf-8").replace("style_coherense", "style_coherence"), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "`select: {weights: ...}` needs previews" in r.stderr
    spec.write_text(spec.read_text("utf-8").replace("select: {weights: {style_coherence: 1}}", "select: best-score"),
                    "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "did you mean `best_score`" in r.stderr, r.stderr


def test_select_rule():
    from storyc.stages.train.previews import select

    rec = {"2": {"mean": 5.1, "coherence": 0.9}, "4": {"mean": 6.3, "coherence": 0.5},
           "6": {"mean": 6.3, "coherence": 0.5}, "8": {"mean": 4.0, "coherence": 0.4}}
    assert select(rec, "best_score") == 6 and select(rec, "last") == 8
    assert select(rec, {"weights": {"mean_aesthetic": 1.0, "style_coherence": 5.0}}) == 2  # 9.6 against 8.8
    assert select(rec, {"weights": {"style_coherence": -1.0}}) == 8  # a negative weight prefers the least


def test_bucket_assignment_of_a_mixed_aspect_folder():
    from storyc.buckets import assign, bucket_sizes

    sizes = bucket_sizes(1024, 1024)
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 and 0.5 <= w / h <= 2 for w, h in sizes)
    assert {(h, w) for w, h in sizes} == set(sizes)  # portrait and landscape alike
    want = {(1024, 1024): (1024, 1024), (2048, 1024): (1408, 704), (1024, 2048): (704, 1408),
            (1920, 1080): (1344, 768), (1100, 1024): (1088, 960), (4000, 1000): (1408, 704)}
    assert {wh: assign(*wh, sizes) for wh in want} == want


def test_each_batch_comes_from_one_bucket():
    from storyc.stages.train.config import train_section
    from storyc.stages.train.data import Samples, collate

    lats = [torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 12, 20), torch.zeros(1, 4, 20, 12)]
    data = {"latents": [{"latent": x, "latent_flip": x} for x in lats], "texts": ["a"], "text_of": [0] * 4,
            "size": (128, 128), "buckets": [(128, 128), (160, 96), (96, 160)], "bucket_of": [0, 0, 1, 2]}
    s = Samples(data, train_section({"seed": 1, "random_flip": True, "center_crop": False, "batch_size": 2}), 200)
    seen = set()
    for m in range(100):
        batch = collate([s[2 * m], s[2 * m + 1]])  # torch.cat: one shape per batch or it raises
        seen.add(tuple(batch["latent"].shape[2:]))
    assert seen == {(16, 16), (12, 20), (20, 12)}


def test_training_with_buckets_on_mixed_aspect_images(base, tmp_path):
    from conftest import write_images

    spec = copy_project(base, tmp_path / "p")
    for p in (spec.parent / "data").iterdir():
        p.unlink()
    write_images(spec.parent / "data", [(1024, 1024), (2048, 1024), (1024, 2048), (1100, 1024)])
    edit(spec, "resolution: 64,", "resolution: 128, batch_size: 2, buckets: true,")
    r = run_cli("build", spec, "--until", "train", cwd=spec.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    from safetensors.torch import load_file

    shapes = sorted({tuple(load_file(str(f))["latent"].shape) for f in (spec.parent / ".storyc/cache/latents").glob("*.safetensors")})
    assert (1, 4, 16, 16) in shapes and (1, 4, 20, 12) in shapes and (1, 4, 12, 20) in shapes
    log = (spec.parent / "build/t/lora/train_log.csv").read_text("utf-8").splitlines()
    assert len(log) == 3 and all(math.isfinite(float(ln.split(",")[1])) for ln in log[1:])


def test_a_weighted_select_picks_the_checkpoint_a_controlled_scorer_prefers(base, tmp_path, monkeypatch):
    """The scorer is the test's: the last preview (step 4) has the best aesthetic score, but the first (step 2) the
    coherent set; `select: {weights: ...}` that values coherence ships step 2's LoRA, not the last."""
    from storyc import lora
    from storyc.cli import main
    from storyc.stages import score

    calls = []

    def scores(self, images):
        calls.append(len(images))
        if len(calls) == 1:  # step 2: plain, but the three images alike
            return [1.0] * len(images), [[1.0, 0.0]] * len(images)
        return [9.0] * len(images), [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]  # step 4: better images, one unlike the rest

    monkeypatch.setattr(score.Scorer, "score_and_embed", scores)
    spec = copy_project(base, tmp_path / "p")
    edit(spec, "checkpoint_every: 2}", "checkpoint_every: 2, preview_every: 2, preview_steps: 1, "
         "select: {weights: {mean_aesthetic: 0.1, style_coherence: 10}}}")
    assert main(["build", str(spec), "--until", "train", "-q"]) == 0
    assert calls == [3, 3]
    lora_dir = spec.parent / "build/t/lora"
    doc = json.loads((lora_dir / "checkpoints.json").read_text("utf-8"))
    assert [c["mean"] for c in doc["checkpoints"]] == [1.0, 9.0]
    assert [round(c["coherence"], 4) for c in doc["checkpoints"]] == [1.0, 0.3333]
    assert doc["selected"] == 2  # 0.1 x 1 + 10 x 1 = 10.1 beats 0.1 x 9 + 10 x 0.333 = 4.23
    shipped, _ = lora.load(lora_dir / "t.diffsynth.safetensors")
    step2, _ = lora.load(lora_dir / "checkpoints/step-2.safetensors")
    step4, _ = lora.load(lora_dir / "checkpoints/step-4.safetensors")
    assert all(torch.equal(shipped[k], step2[k]) for k in shipped)
    assert not all(torch.equal(shipped[k], step4[k]) for k in shipped)
    lock = yaml.safe_load((spec.parent / "story.lock").read_text("utf-8"))
    assert lock["stages"]["train"]["extra"]["selected_step"] == 2


def test_validation_holds_out_images_and_early_stopping_exports_the_best(base, tmp_path):
    """train.validation: a held-out image's loss at fixed timesteps and noise (the same curve on a forced retrain),
    in val_log.csv, TensorBoard, the report and the lock; train.stop on it ends training after `patience` measurements
    without improvement and ships the best measured weights."""
    from storyc import lora

    spec = copy_project(base, tmp_path / "p")
    edit(spec, "checkpoint_every: 2}", "checkpoint_every: 2, validation: {images: 1, every: 2, timesteps: 2}}")
    r = run_cli("build", spec, cwd=spec.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validation at step 2: loss" in r.stdout and "validation at step 4: loss" in r.stdout
    lora_dir = spec.parent / "build/t/lora"
    rep = json.loads((lora_dir / "train_report.json").read_text("utf-8"))
    assert rep["images"] == 1 and len(rep["held_out"]) == 1  # 2 images pass the filters: 1 trains, 1 is held out
    curve = (lora_dir / "val_log.csv").read_text("utf-8")
    assert [ln.split(",")[0] for ln in curve.splitlines()[1:]] == ["2", "4"]
    facts = yaml.safe_load((spec.parent / "story.lock").read_text("utf-8"))["stages"]["train"]["extra"]
    assert set(facts["validation"]) == {"2", "4"} and all(v > 0 for v in facts["validation"].values())
    assert 'id="val-loss"' in (spec.parent / "build/t/submission/t/report.html").read_text("utf-8")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(spec.parent / "build/t/train/logs"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]
    r = run_cli("build", spec, "-q", "--force", "train", cwd=spec.parent)  # trained again: the same curve
    assert r.returncode == 0, r.stdout + r.stderr
    assert (lora_dir / "val_log.csv").read_text("utf-8") == curve

    # early stopping: an improvement must be 1000 or more, so the first measurement stays the best and the
    # second ends the run (patience 1) at step 2 of 4
    edit(spec, "validation: {images: 1, every: 2, timesteps: 2}}",
         "validation: {images: 1, every: 1, timesteps: 1}, stop: {metric: val_loss, patience: 1, min_delta: 1000}}")
    r = run_cli("build", spec, cwd=spec.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "early stop at step 2: val_loss has not improved by 1000 for 1 measurement(s); best at step 1" in r.stdout
    rep = json.loads((lora_dir / "train_report.json").read_text("utf-8"))
    assert rep["steps"] == 2 and rep["stop"]["best_step"] == 1 and rep["stop"]["stopped_at"] == 2
    facts = yaml.safe_load((spec.parent / "story.lock").read_text("utf-8"))["stages"]["train"]["extra"]
    assert facts["stop"]["best_step"] == 1 and facts["steps"] == 2
    best = next((spec.parent / ".storyc").rglob("stop/best.safetensors"))
    shipped, _ = lora.load(lora_dir / "t.diffsynth.safetensors")
    kept, _ = lora.load(best)
    assert shipped.keys() == kept.keys() and all(torch.equal(shipped[k], kept[k]) for k in shipped)
    logged = (lora_dir / "train_log.csv").read_text("utf-8").splitlines()[1:]
    assert [ln.split(",")[0] for ln in logged] == ["1", "2"]  # training really ended at step 2


def test_stop_needs_what_it_measures(project):
    spec = project / "story.yaml"
    spec.write_text("version: 1\nstory: {id: k}\ntrain: {stop: {metric: val_loss}}\n"
                    "scenes: [{id: a, prompt: x, seed: 0}]\nsubmission: {rules: none, images: 1}\n", "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "story.yaml:3:" in r.stderr and "$.train.stop.metric" in r.stderr
    assert "needs held-out images" in r.stderr and "train.validation" in r.stderr
    spec.write_text(spec.read_text("utf-8").replace("metric: val_loss", "metric: story_scor"), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "did you mean `story_score`?" in r.stderr and "Traceback" not in r.stderr


def test_validation_folder_is_measured_fingerprinted_and_checked(copy):
    """train.validation.folder: images of their own (never trained on; nothing held out of the training data),
    captioned by their .txt or the source caption; an edit in the folder retrains; `images` and `folder` exclude
    each other and a missing folder is named with a did-you-mean."""
    from PIL import Image

    root = copy.parent
    (root / "val").mkdir()
    Image.new("RGB", (80, 64), (200, 40, 90)).save(root / "val" / "a.png")
    Image.new("RGB", (64, 64), (20, 140, 90)).save(root / "val" / "b.jpg")
    (root / "val" / "b.txt").write_text("验证图", "utf-8")
    edit(copy, "checkpoint_every: 2}", "checkpoint_every: 2, validation: {folder: val, every: 2, timesteps: 1}}")
    r = run_cli("build", copy, "--until", "train", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validation at step 2: loss" in r.stdout and "validation at step 4: loss" in r.stdout
    rep = json.loads((root / "build/t/lora/train_report.json").read_text("utf-8"))
    assert rep["images"] == 2 and rep["held_out"] == ["val/a.png", "val/b.jpg"]  # both training images train
    lock = yaml.safe_load((root / "story.lock").read_text("utf-8"))["stages"]["train"]
    assert lock["params"]["train"]["validation"]["folder"] == "val" and "validation" in lock["models"]
    curve = (root / "build/t/lora/val_log.csv").read_text("utf-8")

    (root / "val" / "b.txt").write_text("另一个标题", "utf-8")  # a validation caption edited: measured again
    r = run_cli("status", copy, cwd=root)
    assert "validation folder changed" in r.stdout
    r = run_cli("build", copy, "--until", "train", cwd=root)
    assert r.returncode == 0 and "train" in ran(copy), r.stdout + r.stderr
    assert (root / "build/t/lora/val_log.csv").read_text("utf-8") != curve
    (root / "val" / "b.txt").write_bytes("验证图".encode("gbk"))  # not UTF-8: said plainly, no traceback
    r = run_cli("build", copy, "--until", "train", cwd=root)
    assert r.returncode == 1 and "caption file val/b.txt is not UTF-8 text" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout

    edit(copy, "validation: {folder: val,", "validation: {folder: vall,")
    r = run_cli("validate", copy, cwd=root)
    assert r.returncode == 1 and "$.train.validation.folder: `vall` is not a folder of images" in r.stderr
    assert "did you mean `val`" in r.stderr
    edit(copy, "validation: {folder: vall,", "validation: {images: 1, folder: val,")
    r = run_cli("validate", copy, cwd=root)
    assert r.returncode == 1 and "`validation` takes `images` or `folder`, not both" in r.stderr
