"""`lora.type: dora`: peft's DoRA trained, merged for generation as peft computes it, shipped as diffsynth and
diffusers files that diffusers loads; the unsupported combinations are spec errors at their line."""
import torch
import yaml

from conftest import edit, ran, run_cli


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(2, 256, 64, generator=g),
            torch.tensor([64, 64, 0, 0, 64, 64]).repeat(2), torch.randn(2, 64, generator=g))


def test_a_dora_trains_merges_as_peft_and_loads_in_diffusers(copy, tiny_models):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, KolorsPipeline, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    from storyc import lora
    from storyc.models.kolors import load_unet_for

    root = copy.parent
    edit(copy, "lora: {rank: 4, alpha: 4.0}", "lora: {rank: 4, alpha: 4.0, type: dora}")
    edit(copy, "lora_formats: [diffsynth]", "lora_formats: [diffsynth, diffusers]")
    r = run_cli("build", copy, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train" in ran(copy) and "generate[home]" in ran(copy)
    lock = yaml.safe_load((root / "story.lock").read_text("utf-8"))["stages"]
    assert lock["train"]["params"]["lora"]["type"] == "dora"
    state, _ = lora.load(root / "build/t/lora/t.diffsynth.safetensors")
    mags = {k: v for k, v in state.items() if ".lora_magnitude_vector." in k}
    assert mags and len(mags) == sum(1 for _ in lora.pairs(state))
    assert not (root / "build/t/lora/t.kohya.safetensors").exists()

    # storyc's merge at alpha/rank is peft's own DoRA forward with the trained weights
    inp = _inputs()
    base = load_unet_for(tiny_models / "tiny-kolors", torch.float32, "cpu")
    with torch.no_grad():
        plain = base(*inp)
    ref = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out"],
                                             use_dora=True), load_unet_for(tiny_models / "tiny-kolors", torch.float32,
                                                                           "cpu"))
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if ".lora_" in k]
    with torch.no_grad():
        want = ref.eval()(*inp)
    ours = load_unet_for(tiny_models / "tiny-kolors", torch.float32, "cpu")
    assert lora.merge(ours, state, 4.0 / 4) == len(mags)
    with torch.no_grad():
        got = ours(*inp)
    assert torch.allclose(got, want, atol=2e-4), (got - want).abs().max()
    assert not torch.allclose(got, plain, atol=1e-5)  # the magnitudes and directions did train

    # diffusers' own Kolors entry point loads the diffusers file as a DoRA and computes the same UNet
    unet = UNet2DConditionModel.from_pretrained(tiny_models / "tiny-kolors" / "unet").eval()
    pipe = KolorsPipeline(vae=AutoencoderKL.from_pretrained(tiny_models / "tiny-kolors" / "vae"), text_encoder=None,
                          tokenizer=None, unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.load_lora_weights(str(root / "build/t/submission/t"), weight_name="t.diffusers.safetensors",
                           adapter_name="story")
    x, t, ehs, tid, ate = inp
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=ehs,
                           added_cond_kwargs={"text_embeds": ate, "time_ids": tid.reshape(2, 6).float()}).sample
    assert torch.allclose(theirs, want, atol=2e-4), (theirs - want).abs().max()


def test_dora_combinations_that_cannot_ship_are_spec_errors(project):
    spec = project / "story.yaml"
    (project / "data").mkdir()
    base = ("version: 1\nstory: {id: d}\ndataset: {source: folder, path: data}\nlora: {type: dora}\n"
            "scenes: [{id: a, prompt: x, seed: 0}]\nsubmission: {images: 1, rules: none%s}\n")
    spec.write_text(base % "", "utf-8")  # the default formats hold kohya: said at `type`
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "story.yaml:4:" in r.stderr and "$.lora.type: a DoRA has no kohya file" in r.stderr
    assert "lora_formats: [diffsynth, diffusers]" in r.stderr
    spec.write_text(base % ", lora_formats: [diffsynth, kohya]", "utf-8")  # written: said at the formats
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "story.yaml:6:" in r.stderr and "$.submission.lora_formats: a DoRA" in r.stderr
    spec.write_text(base % ", lora_formats: [diffsynth, diffusers]", "utf-8")
    assert run_cli("validate", spec, cwd=project).returncode == 0
    spec.write_text((base % ", lora_formats: [diffsynth, diffusers]").replace("rules: none", "rules: competition"),
                    "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "$.lora.type: the competition loads the LoRA with DiffSynth's `load_lora`" in r.stderr
