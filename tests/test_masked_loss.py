"""`train.masked_loss` with per-source `masks` (the images' alpha channel, or a folder matched by name): the loss is
mean(mask * (prediction - target)^2) on the latent grid, masks follow their image through crop and flip, a region
masked out teaches the LoRA nothing, and a mask edit retrains; bad settings are spec errors at their line."""
import json

import torch
import yaml
from PIL import Image

from conftest import edit, ran, run_cli

SOURCE = "dataset: {source: folder, path: data, caption: 二次元}"


def test_masked_mse_is_the_formula():
    from storyc.stages.train.module import masked_mse

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.rand(2, 1, 8, 8, generator=g)
    want = sum(float(mask[b, 0, y, x]) * float(pred[b, c, y, x] - target[b, c, y, x]) ** 2
               for b in range(2) for c in range(4) for y in range(8) for x in range(8)) / (2 * 4 * 8 * 8)
    assert abs(float(masked_mse(pred, target, mask)) - want) < 1e-5
    assert torch.equal(masked_mse(pred, target, torch.ones(2, 1, 8, 8)), masked_mse(pred, target))
    half = torch.ones(2, 1, 8, 8)
    half[..., 4:] = 0
    moved = pred.clone()
    moved[..., 4:] += 5  # what is masked out does not count
    assert torch.equal(masked_mse(moved, target, half), masked_mse(pred, target, half))


def test_masks_follow_their_latent_through_crop_and_flip():
    from storyc.stages.train.config import train_section
    from storyc.stages.train.data import Samples

    # latent value = its column index; mask = the column index too: any crop or flip applied to one and not the
    # other (or at another offset) shows up as a mismatch
    col = torch.arange(12.0).repeat(1, 1, 10, 1)  # (1, 1, 10, 12): 10 rows x 12 columns of latent pixels
    rec = {"latent": col.repeat(1, 4, 1, 1), "latent_flip": torch.flip(col, dims=[3]).repeat(1, 4, 1, 1),
           "mask": col, "mask_flip": torch.flip(col, dims=[3])}
    data = {"latents": [rec, {"latent": rec["latent"], "latent_flip": rec["latent_flip"]}], "texts": ["x"],
            "text_of": [0, 0], "size": (64, 64)}
    tr = train_section({"seed": 3, "masked_loss": True, "random_flip": True, "center_crop": False})
    seen_flip = seen_ones = 0
    for i in range(40):
        s = Samples(data, tr, 40)[i]
        assert s["mask"].shape == (1, 1, 8, 8) and s["latent"].shape == (1, 4, 8, 8)
        if torch.all(s["mask"] == 1):  # the record without a mask: trains on all of it
            seen_ones += 1
            continue
        assert torch.equal(s["mask"][0, 0], s["latent"][0, 0])
        seen_flip += bool(s["mask"][0, 0, 0, 0] > s["mask"][0, 0, 0, 1])
    assert seen_ones and seen_flip and seen_ones + seen_flip < 40


def _lora_b(root):
    from storyc import lora

    state, _ = lora.load(root / "build/t/lora/t.diffsynth.safetensors")
    return [v for k, v in state.items() if ".lora_B." in k]


def test_alpha_masked_out_everywhere_teaches_nothing(copy):
    root = copy.parent
    for p in sorted((root / "data").glob("*.png")):  # every pixel fully transparent
        im = Image.open(p).convert("RGBA")
        im.putalpha(0)
        im.save(p)
    edit(copy, SOURCE, SOURCE.replace("}", ", masks: alpha}"))
    edit(copy, "checkpoint_every: 2}", "checkpoint_every: 2, masked_loss: true}")
    r = run_cli("build", copy, "--until", "train", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {"ingest", "filter", "train"} <= ran(copy)
    assert "masked loss: 2 of 2 training rows have a mask" in r.stdout + r.stderr
    report = json.loads((root / "build/t/data/input/ingest_report.json").read_text("utf-8"))
    assert report["masks"] == 3
    bs = _lora_b(root)
    assert bs and all(torch.count_nonzero(b) == 0 for b in bs)  # zero loss, zero gradient: B stays at its zero init


def test_mask_folder_trains_the_white_part_and_a_mask_edit_retrains(copy):
    root = copy.parent
    (root / "masks").mkdir()
    left = Image.new("L", (1024, 1024), 0)
    left.paste(255, (0, 0, 512, 1024))
    left.save(root / "masks" / "img00.png")
    Image.new("L", (40, 40), 255).save(root / "masks" / "img01.jpg")  # another size and type: stretched
    edit(copy, SOURCE, SOURCE.replace("}", ", masks: masks}"))
    edit(copy, "checkpoint_every: 2}", "checkpoint_every: 2, masked_loss: true}")
    r = run_cli("build", copy, "--until", "train", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "1 of the 3 images of data have no mask" in out  # img02 (filtered out later by its size)
    lock = yaml.safe_load((root / "story.lock").read_text("utf-8"))["stages"]
    assert lock["ingest"]["params"]["dataset"]["masks"] == "masks"
    assert lock["train"]["params"]["train"]["masked_loss"] is True
    train_masks = sorted(p.name for p in (root / "build/t/data/train/masks").iterdir())
    assert train_masks == ["000000.png", "000001.png"]
    m = Image.open(root / "build/t/data/train/masks/000000.png")
    assert m.size == (1024, 1024) and m.getpixel((10, 10)) == 255 and m.getpixel((1000, 10)) == 0
    first = _lora_b(root)
    assert any(torch.count_nonzero(b) for b in first)

    Image.new("L", (1024, 1024), 0).save(root / "masks" / "img00.png")  # a mask edited: the data changed
    r = run_cli("status", copy, cwd=root)
    assert "dataset source changed" in r.stdout
    r = run_cli("build", copy, "--until", "train", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {"ingest", "filter", "train"} <= ran(copy)
    assert any(not torch.equal(a, b) for a, b in zip(first, _lora_b(root)))


def test_mask_settings_that_cannot_work_are_spec_errors(project):
    spec = project / "story.yaml"
    (project / "data").mkdir()
    base = ("version: 1\nstory: {id: d}\ndataset: {source: %s, path: data%s}\ntrain: {%s}\n"
            "scenes: [{id: a, prompt: x, seed: 0}]\nsubmission: {images: 1, rules: none}\n")
    spec.write_text(base % ("folder", "", "masked_loss: true"), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "story.yaml:4:" in r.stderr
    assert "$.train.masked_loss: masked_loss is on, but no training source has `masks`" in r.stderr
    assert "add `masks: alpha`" in r.stderr
    spec.write_text(base % ("folder", ", masks: mask", "masked_loss: true"), "utf-8")
    (project / "masks").mkdir()
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "story.yaml:3:" in r.stderr and "$.dataset.masks: `mask` does not exist" in r.stderr
    assert "masks" in r.stderr.split("$.dataset.masks", 1)[1]  # did you mean `masks`
    spec.write_text(base % ("folder", ", masks: masks", ""), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 0 and "the sources' `masks` are used only by the masked loss" in r.stderr
    spec.write_text(base % ("folder", ", masks: masks", "masked_loss: true"), "utf-8")
    assert run_cli("validate", spec, cwd=project).returncode == 0
    assert "data data: loss masks from masks" in run_cli("plan", spec, cwd=project).stdout
    spec.write_text((base % ("modelscope", ", masks: masks", "masked_loss: true")).replace("path: data", "id: a/b"),
                    "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "a ModelScope dataset's images have no file names to match masks by" in r.stderr
