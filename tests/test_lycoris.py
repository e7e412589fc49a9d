"""`lora.type: loha | lokr`: peft's LoHa / LoKr trained, merged for generation as peft computes them, shipped as a
kohya file in LyCORIS' keys that ComfyUI's own formulas load to the same UNet, and a diffusers-named file that
peft loads onto diffusers' UNet; the combinations that cannot work are spec errors at their line."""
import pytest
import torch
import yaml

from conftest import edit, ran, run_cli
from test_submission import _comfy_config, _comfy_key_map, _diffusers_out, _unet_inputs

TARGETS = ["to_q", "to_k", "to_v", "to_out"]


def _comfy_loha(sd, b):
    """ComfyUI's LoHaAdapter.calculate_weight (comfy/weight_adapter/loha.py, no Tucker, no DoRA), restated:
    (w1a @ w1b) * (w2a @ w2b) * alpha / w1b.shape[0]."""
    w1a, w1b = sd[f"{b}.hada_w1_a"].float(), sd[f"{b}.hada_w1_b"].float()
    w2a, w2b = sd[f"{b}.hada_w2_a"].float(), sd[f"{b}.hada_w2_b"].float()
    return (w1a @ w1b) * (w2a @ w2b) * (float(sd[f"{b}.alpha"]) / w1b.shape[0])


def _comfy_lokr(sd, b):
    """ComfyUI's LoKrAdapter.calculate_weight (comfy/weight_adapter/lokr.py), restated: each factor whole or a
    product; the scale is alpha / (the inner size of the last product), or 1 when both factors are whole."""
    dim = None
    w1 = sd.get(f"{b}.lokr_w1")
    if w1 is None:
        dim = sd[f"{b}.lokr_w1_b"].shape[0]
        w1 = sd[f"{b}.lokr_w1_a"].float() @ sd[f"{b}.lokr_w1_b"].float()
    w2 = sd.get(f"{b}.lokr_w2")
    if w2 is None:
        dim = sd[f"{b}.lokr_w2_b"].shape[0]
        w2 = sd[f"{b}.lokr_w2_a"].float() @ sd[f"{b}.lokr_w2_b"].float()
    alpha = float(sd[f"{b}.alpha"]) / dim if dim is not None else 1.0
    return torch.kron(w1.float(), w2.float()) * alpha


def _peft_config(kind, factor=-1, targets=TARGETS):
    from peft import LoHaConfig, LoKrConfig

    if kind == "loha":
        return LoHaConfig(r=4, alpha=4.0, target_modules=targets)
    return LoKrConfig(r=4, alpha=4.0, target_modules=targets, decompose_factor=factor)


@pytest.mark.parametrize("kind,factor,stored", [("loha", None, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
                                                ("lokr", None, {"lokr_w1", "lokr_w2"}),
                                                ("lokr", 4, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"})])
def test_loha_lokr_train_merge_as_peft_and_load_by_comfyui_and_peft(copy, tiny_models, kind, factor, stored):
    from diffusers import UNet2DConditionModel
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    from storyc import lora
    from storyc.models.kolors import load_unet_for

    root = copy.parent
    extra = f", factor: {factor}" if factor else ""
    edit(copy, "lora: {rank: 4, alpha: 4.0}", f"lora: {{rank: 4, alpha: 4.0, type: {kind}{extra}}}")
    edit(copy, "lora_formats: [diffsynth]", "lora_formats: [diffsynth, kohya, diffusers]")
    r = run_cli("build", copy, "--until", "train", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train" in ran(copy)
    lock = yaml.safe_load((root / "story.lock").read_text("utf-8"))["stages"]
    assert lock["train"]["params"]["lora"]["type"] == kind
    state, meta = lora.load(root / "build/t/lora/t.diffsynth.safetensors")
    assert meta["lora_type"] == kind and {k.split(".")[-2] for k in state} == stored
    assert not any(".lora_" in k for k in state)

    # storyc's merge at alpha/rank is peft's own forward with the trained weights
    inp = _unet_inputs(2)
    ref = inject_adapter_in_model(_peft_config(kind, factor or -1),
                                  load_unet_for(tiny_models / "tiny-kolors", torch.float32, "cpu"))
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if lora.is_adapter_key(k)]
    with torch.no_grad():
        want = ref.eval()(*inp)
    ours = load_unet_for(tiny_models / "tiny-kolors", torch.float32, "cpu")
    with torch.no_grad():
        plain = ours(*inp)
    assert lora.merge(ours, state, 4.0 / 4) == len(lora.modules(state)) == 88
    with torch.no_grad():
        got = ours(*inp)
    assert torch.allclose(got, want, atol=2e-4), (got - want).abs().max()
    assert not torch.allclose(got, plain, atol=1e-5)  # the adapter did train

    # the kohya file in LyCORIS' keys: every key one ComfyUI maps, patched by ComfyUI's formula -> the same UNet
    sd, _ = lora.load(root / "build/t/lora/t.kohya.safetensors")
    unet = UNet2DConditionModel.from_pretrained(tiny_models / "tiny-kolors" / "unet").eval()
    key_map = _comfy_key_map(_comfy_config(unet.config))
    bases = {k.split(".")[0] for k in sd}
    assert len(bases) == 88 and bases <= set(key_map), sorted(bases - set(key_map))[:3]
    assert {k.split(".", 1)[1] for k in sd} == stored | {"alpha"}
    weights = dict(unet.named_parameters())
    with torch.no_grad():
        for b in bases:
            target = weights[key_map[b][1]]
            target += (_comfy_loha if kind == "loha" else _comfy_lokr)(sd, b).reshape(target.shape)
    comfy = _diffusers_out(unet, inp)
    assert torch.allclose(comfy, want, atol=2e-4), (comfy - want).abs().max()

    # the diffusers file: peft's tensors under diffusers' module names, loaded by peft onto diffusers' UNet
    dsd, dmeta = lora.load(root / "build/t/lora/t.diffusers.safetensors")
    assert dmeta["lora_type"] == kind and all(k.startswith("unet.") for k in dsd)
    unet = UNet2DConditionModel.from_pretrained(tiny_models / "tiny-kolors" / "unet").eval()
    names = sorted({k.removeprefix("unet.").rsplit(".", 1)[0] for k in dsd})  # the adapted modules, by full name
    unet = inject_adapter_in_model(_peft_config(kind, factor or -1, names), unet)
    res = set_peft_model_state_dict(unet, {k.removeprefix("unet."): v for k, v in dsd.items()})
    assert not res.unexpected_keys
    theirs = _diffusers_out(unet, inp)
    assert torch.allclose(theirs, want, atol=2e-4), (theirs - want).abs().max()


def test_lycoris_combinations_that_cannot_work_are_spec_errors(project):
    spec = project / "story.yaml"
    (project / "data").mkdir()
    base = ("version: 1\nstory: {id: d}\ndataset: {source: folder, path: data}\nlora: {%s}\n"
            "scenes: [{id: a, prompt: x, seed: 0}]\nsubmission: {images: 1, rules: %s}\n")
    for ok in ("type: loha", "type: lokr", "type: lokr, factor: 8, decompose_both: true"):
        spec.write_text(base % (ok, "none"), "utf-8")
        r = run_cli("validate", spec, cwd=project)
        assert r.returncode == 0, (ok, r.stderr)
    spec.write_text(base % ("type: loha, factor: 8", "none"), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "story.yaml:4:" in r.stderr
    assert "$.lora.factor: `factor` is a LoKr parameter, but lora.type is loha" in r.stderr
    spec.write_text(base % ("decompose_both: true", "none"), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "$.lora.decompose_both: `decompose_both` is a LoKr parameter" in r.stderr
    spec.write_text(base % ("type: lokr, factor: 0", "none"), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "$.lora.factor: factor 0 splits no side" in r.stderr
    spec.write_text(base % ("type: locon", "none"), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "`locon` is not one of: lora, dora, loha, lokr" in r.stderr
    assert "Linear layers only" in r.stderr
    spec.write_text(base % ("type: lokr", "competition"), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "$.lora.type: the competition loads the LoRA with DiffSynth's `load_lora`" in r.stderr
    assert "a LoKr's Kronecker factors would not load" in r.stderr
