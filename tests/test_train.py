"""train stage on tiny random-init Kolors-architecture models, through the CLI and the real libraries."""
import json
import os

import pytest
import torch

from conftest import BASE_SPEC, copy_project, make_project, ran, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    spec = make_project(tmp_path_factory.mktemp("train"), tiny_models,
                        BASE_SPEC.replace("lora_formats: [diffsynth]", "lora_formats: [diffsynth, diffusers, kohya]"))
    from storyc.cli import main

    assert main(["build", str(spec), "--until", "train", "-q"]) == 0
    return spec


def _lora(spec, fmt="diffsynth"):
    from storyc import lora

    return lora.load(spec.parent / f"build/t/lora/t.{fmt}.safetensors")


def test_lora_files_are_safetensors_with_metadata(trained):
    for fmt in ("diffsynth", "diffusers", "kohya"):
        state, meta = _lora(trained, fmt)
        assert state and meta["format"] == fmt and meta["rank"] == "4" and meta["alpha"] == "4"
        assert meta["base_model"] == "tiny:kolors" and meta["storyc_version"]
    state, _ = _lora(trained)
    assert any(k.endswith("to_q.lora_A.default.weight") for k in state)
    assert any(k.endswith("to_out.lora_B.default.weight") for k in state)
    # gaussian init starts lora_B at zero: training moved it
    assert max(float(v.abs().max()) for k, v in state.items() if "lora_B" in k) > 0
    log = (trained.parent / "build/t/lora/train_log.csv").read_text("utf-8").splitlines()
    assert log[0] == "step,loss" and len(log) == 5


def _unet_and_inputs(tiny_models, seed=0):
    from storyc.models.kolors import load_unet_for

    unet = load_unet_for(tiny_models / "tiny-kolors", torch.float32, "cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 256, 64, generator=g)
    ate = torch.randn(2, 64, generator=g)
    tid = torch.tensor([64, 64, 0, 0, 64, 64]).repeat(2)
    return unet, (x, torch.tensor([500.0]), ehs, tid, ate)


def test_diffsynth_lora_loads_with_the_notebooks_load_lora(trained, tiny_models):
    """The notebook's load_lora (peft inject + load_state_dict) and storyc's merge give the same UNet."""
    from peft import LoraConfig, inject_adapter_in_model

    from storyc import lora

    state, meta = _lora(trained)
    unet_a, inp = _unet_and_inputs(tiny_models)
    cfg = LoraConfig(r=4, lora_alpha=4.0, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out"])
    unet_a = inject_adapter_in_model(cfg, unet_a)
    missing, unexpected = unet_a.load_state_dict(state, strict=False)
    assert not unexpected
    unet_b, _ = _unet_and_inputs(tiny_models)
    base = unet_b(*inp).detach().clone()
    assert lora.merge(unet_b, state, 4.0 / 4) > 0
    with torch.no_grad():
        out_a, out_b = unet_a(*inp), unet_b(*inp)
    assert torch.allclose(out_a, out_b, atol=1e-4), (out_a - out_b).abs().max()
    assert not torch.allclose(base, out_b, atol=1e-6)  # the LoRA does something


def _diffusers_unet(tiny_models):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_models / "tiny-kolors" / "unet").eval()


def _diffusers_out(unet, inp):
    x, t, ehs, tid, ate = inp
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ehs,
                    added_cond_kwargs={"text_embeds": ate, "time_ids": tid.reshape(2, 6).float()}).sample


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exports_load_into_diffusers_and_match(trained, tiny_models, fmt):
    from diffusers import StableDiffusionXLPipeline

    from storyc import lora

    state, _ = _lora(trained)
    ours, inp = _unet_and_inputs(tiny_models)
    lora.merge(ours, state, 1.0)
    with torch.no_grad():
        want = ours(*inp)
    exported, _ = _lora(trained, fmt)
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(exported)
    unet = _diffusers_unet(tiny_models)
    base = _diffusers_out(unet, inp)
    unet.load_lora_adapter(sd, prefix="unet", network_alphas=alphas, adapter_name="story")
    got = _diffusers_out(unet, inp)
    assert torch.allclose(got, want, atol=2e-4), (got - want).abs().max()
    assert not torch.allclose(base, got, atol=1e-6)


def test_cache_is_reused_and_text_encoder_not_called_again(trained):
    rep = json.loads((trained.parent / "build/t/lora/train_report.json").read_text("utf-8"))
    assert rep["encoded_images"] == 2 and rep["encoded_texts"] == 1
    spec2 = trained.parent / "story2.yaml"
    spec2.write_text(trained.read_text("utf-8").replace("{rank: 4, alpha: 4.0}", "{rank: 2, alpha: 2.0}")
                     .replace("story: {id: t}", "story: {id: t2}"), "utf-8")
    from storyc.cli import main

    assert main(["build", str(spec2), "--until", "train", "-q"]) == 0
    rep2 = json.loads((trained.parent / "build/t2/lora/train_report.json").read_text("utf-8"))
    assert rep2["encoded_images"] == 0 and rep2["encoded_texts"] == 0  # no VAE, no ChatGLM this time
    assert rep2["lora"]["rank"] == 2


def _eval_loss(unet, latent, emb, seeds=range(8)):
    """Mean diffusion loss over fixed (noise, timestep) draws: the same batch every call."""
    from diffsynth.schedulers import EnhancedDDIMScheduler

    sch = EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100)
    sch.set_timesteps(1100)
    tid = torch.tensor([64, 64, 0, 0, 64, 64])
    total = 0.0
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        noise = torch.randn(latent.shape, generator=g)
        t = sch.timesteps[torch.randint(0, 1100, (1,), generator=g)]
        with torch.no_grad():
            pred = unet(sch.add_noise(latent, noise, t), t, emb["encoder_hidden_states"].float(), tid,
                        emb["add_text_embeds"].float())
        total += float(torch.nn.functional.mse_loss(pred, sch.training_target(latent, noise, t)))
    return total / len(seeds)


def test_training_lowers_the_loss_on_a_repeated_image(tmp_path, tiny_models):
    from safetensors.torch import load_file

    from storyc import lora
    from storyc.models.kolors import load_unet_for

    spec = make_project(tmp_path, tiny_models, BASE_SPEC.replace(
        "train: {epochs: 1, steps_per_epoch: 4,", "train: {epochs: 1, steps_per_epoch: 80, learning_rate: 1.0e-2,"),
        sizes=((1024, 1024),))
    from storyc.cli import main

    assert main(["build", str(spec), "--until", "train", "-q"]) == 0
    latent = load_file(str(next((tmp_path / ".storyc/cache/latents").glob("*.safetensors"))))["latent"].float()
    emb = load_file(str(next((tmp_path / ".storyc/cache/text").glob("*.safetensors"))))
    unet = load_unet_for(tiny_models / "tiny-kolors", torch.float32, "cpu")
    before = _eval_loss(unet, latent, emb)
    state, _ = lora.load(tmp_path / "build/t/lora/t.diffsynth.safetensors")
    lora.merge(unet, state, 1.0)
    after = _eval_loss(unet, latent, emb)
    assert after < before * 0.95, (before, after)


def test_resume_with_ema_and_previews_matches_uninterrupted(tmp_path, tiny_models):
    import signal
    import subprocess
    import sys
    import time

    # with EMA and story previews on: their state (EMA buffers, preview records) resumes too
    spec_text = BASE_SPEC.replace("steps_per_epoch: 4,", "steps_per_epoch: 40,").replace(
        "checkpoint_every: 2", "checkpoint_every: 10, ema: 0.9, preview_every: 20, preview_steps: 1")
    a = make_project(tmp_path / "a", tiny_models, spec_text, sizes=((1024, 1024),))
    from storyc.cli import main

    assert main(["build", str(a), "--until", "filter", "-q"]) == 0
    b = copy_project(a, tmp_path / "b")
    assert main(["build", str(a), "--until", "train", "-q"]) == 0
    p = subprocess.Popen([sys.executable, "-m", "storyc", "build", str(b), "--until", "train"], cwd=tmp_path / "b",
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    ckpts = []
    while time.time() < deadline and not ckpts:
        ckpts = list((tmp_path / "b/.storyc/cache/train").glob("*.partial/checkpoints/last.ckpt"))
        time.sleep(0.05)
    assert ckpts, "no checkpoint appeared"
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = run_cli("build", b, "--until", "train", cwd=tmp_path / "b")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming training at step" in r.stdout
    log = (tmp_path / "b/build/t/lora/train_log.csv").read_text().splitlines()
    assert [int(x.split(",")[0]) for x in log[1:]] == list(range(1, 41))
    sa, _ = _lora(a)
    sb, _ = _lora(b)
    assert sa.keys() == sb.keys()
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-5
    ca = json.loads((tmp_path / "a/build/t/lora/checkpoints.json").read_text("utf-8"))["checkpoints"]
    cb = json.loads((tmp_path / "b/build/t/lora/checkpoints.json").read_text("utf-8"))["checkpoints"]
    assert [c["step"] for c in cb] == [20, 40]
    assert all(abs(x["mean"] - y["mean"]) < 1e-5 for x, y in zip(ca, cb))


def test_two_stories_share_one_trained_lora(trained):
    spec3 = trained.parent / "story3.yaml"
    spec3.write_text(trained.read_text("utf-8").replace("story: {id: t}", "story: {id: t3}")
                     .replace("seed: 0,", "seed: 10,"), "utf-8")
    r = run_cli("build", spec3, "--until", "train", cwd=trained.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reused cached LoRA" in r.stdout
    assert "train" in ran(spec3)  # it ran, but only to copy the cached LoRA
    a = (trained.parent / "build/t/lora/t.diffsynth.safetensors").read_bytes()
    b = (trained.parent / "build/t3/lora/t3.diffsynth.safetensors").read_bytes()
    assert _strip_meta(a) == _strip_meta(b)


def _strip_meta(raw: bytes):
    from safetensors.torch import load

    return {k: v.tolist() for k, v in load(raw).items()}


def test_ddp_on_two_processes_equals_one_process_at_the_global_batch(tmp_path, tiny_models):
    """train.strategy ddp runs Lightning's ddp_spawn (here 2 CPU processes over gloo): rank r draws the samples
    one process at batch 2 would draw, so the two LoRAs agree to float tolerance."""
    base = BASE_SPEC.replace("steps_per_epoch: 4,", "steps_per_epoch: 6,")
    ddp = make_project(tmp_path / "ddp", tiny_models, base.replace("checkpoint_every: 2}",
                                                                   "checkpoint_every: 2, strategy: ddp, devices: 2}"))
    from storyc.cli import main

    assert main(["build", str(ddp), "--until", "filter", "-q"]) == 0  # the same data for both: filter once
    one = copy_project(ddp, tmp_path / "one")
    one.write_text(base.replace("checkpoint_every: 2}", "checkpoint_every: 2, batch_size: 2}"), "utf-8")
    r = run_cli("build", ddp, "--until", "train", cwd=ddp.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ddp_spawn on 2 CPU processes: 3 optimizer steps of 2 x 1 images" in r.stdout
    assert run_cli("build", one, "--until", "train", cwd=one.parent).returncode == 0
    rep = json.loads((ddp.parent / "build/t/lora/train_report.json").read_text())
    assert rep["steps"] == 3
    sa, _ = _lora(ddp)
    sb, _ = _lora(one)
    assert sa.keys() == sb.keys()
    assert max(float(v.abs().max()) for k, v in sa.items() if "lora_B" in k) > 0
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-5

    # the same run on two "machines" (train.num_nodes: 2, NODE_RANK 0 and 1 over loopback, one process each),
    # sharing one cache as a cluster's nodes share storage: node 0 writes the LoRA, node 1 joins and takes it
    import socket
    import subprocess
    import sys

    nodes = [copy_project(ddp, tmp_path / f"node{i}") for i in range(2)]
    for spec in nodes:
        spec.write_text(base.replace("checkpoint_every: 2}", "checkpoint_every: 2, strategy: ddp, num_nodes: 2}"),
                        "utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "storyc", "build", str(spec), "--until", "train", "--cache",
                               str(tmp_path / "shared-cache")], cwd=spec.parent, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, NODE_RANK=str(i), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for i, spec in enumerate(nodes)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "node 1 of 2: trained with node 0" in outs[1] and "reused cached LoRA" in outs[1]
    s0, _ = _lora(nodes[0])
    s1, _ = _lora(nodes[1])
    assert all(torch.equal(s0[k], s1[k]) for k in s0)  # node 1 took node 0's LoRA from the cache
    assert max(float((s0[k] - sb[k]).abs().max()) for k in s0) < 1e-5  # = one process at the global batch
    assert json.loads((nodes[0].parent / "build/t/lora/train_report.json").read_text())["steps"] == 3


def test_tiny_text_encoder_has_every_weight_initialised(tiny_models):
    """ChatGLM builds its layers with skip_init: a builder that trusts its init saves uninitialised memory
    (zeros on one machine, NaN and 1e38 on another)."""
    from safetensors.torch import load_file

    state = load_file(str(tiny_models / "tiny-kolors/text_encoder/model.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
    mats = {k: v for k, v in state.items() if v.dim() >= 2}
    assert mats and all(0.01 < float(v.float().std()) < 0.05 for v in mats.values()), {k: float(v.std()) for k, v in mats.items()}
    norms = [v for k, v in state.items() if "layernorm" in k]
    assert norms and all(bool((v == 1).all()) for v in norms)


def test_checkpoints_keep_the_trained_state_not_the_frozen_unet(tiny_models):
    """The module's state_dict (what checkpoints and ddp_spawn's hand-back hold) keeps the LoRA, never the frozen
    base weights; the EMA is a callback whose state a checkpoint holds beside it and which the export uses."""
    from types import SimpleNamespace

    from storyc.model import LoRA
    from storyc.models.kolors import load_unet_for
    from storyc.stages.train.callbacks import EMA
    from storyc.stages.train.config import train_section
    from storyc.stages.train.module import LoRAModule

    unet = load_unet_for(tiny_models / "tiny-kolors", torch.float32, "cpu")
    m = LoRAModule(unet, {}, lora=LoRA.build({"rank": 2, "alpha": 2.0, "target_modules": ["to_q"], "init": "gaussian",
                                                    "type": "lora", "factor": -1, "decompose_both": False}),
                   train=train_section({"seed": 0, "gradient_checkpointing": False}))
    sd = m.state_dict()
    assert any(".lora_A." in k for k in sd)
    assert not [k for k in sd if k.startswith("unet.") and ".lora_" not in k]
    ema = EMA(0.5)
    m._trainer = SimpleNamespace(callbacks=[ema], accumulate_grad_batches=1)
    start = [p.detach().clone() for p in m.trained()]
    ema.on_train_start(m._trainer, m)  # the average starts at the initial weights
    for step in range(2):  # two "optimizer steps" that move every LoRA weight by +1
        with torch.no_grad():
            for p in m.trained():
                p.add_(1.0)
        ema.on_train_batch_end(m._trainer, m, None, None, step)
    # EMA = 0.5 * (0.5 * start + 0.5 * (start + 1)) + 0.5 * (start + 2) = start + 1.25, the last weights are start + 2
    names = [n for n, p in m.unet.named_parameters() if p.requires_grad]
    exported = m.lora_state()
    for n, s0 in zip(names, start):
        assert torch.allclose(exported[n], s0 + 1.25), n
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict()["weights"], ema.weights(m)))  # what a checkpoint saves


def _graph_nodes(t, name):
    seen, todo, n = set(), [t.grad_fn], 0
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        n += type(f).__name__ == name
        todo += [g for g, _ in f.next_functions]
    return n


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_fused_lora_trains_as_peft_does_and_steps_aside_where_it_cannot(tiny_models, autocast):
    """The training UNet's LoRA layers (models/fused_lora.py) give peft's outputs and gradients, through one
    autograd node per adapted projection; a merged, disabled or DoRA adapter goes through peft's own path."""
    from storyc import lora
    from storyc.models.fused_lora import FusedLoraLinear, fuse_lora

    def adapted(kind="lora"):
        unet, inp = _unet_and_inputs(tiny_models)
        torch.manual_seed(3)
        unet = lora.inject(unet, 4, 3.0, ["to_q", "to_k", "to_v", "to_out"], "gaussian", kind)  # scaling 0.75
        for n, p in unet.named_parameters():
            p.requires_grad_(lora.is_adapter_key(n))
            if ".lora_B." in n:
                torch.nn.init.normal_(p, std=0.1)  # gaussian init leaves B at zero: give the adapter an effect
        return unet, inp

    def run(unet, inp, dtype=autocast):
        x = inp[0].clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = unet(x, *inp[1:])
        out.float().square().mean().backward()
        return out.float(), x.grad, {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}, out

    def err(a, b):
        return float((a - b).detach().norm() / b.detach().norm())

    ref, inp = adapted()
    fused = fuse_lora(adapted()[0])
    n_layers = sum(type(m) is FusedLoraLinear for m in fused.modules())
    assert n_layers == len(list(lora.pairs(lora.lora_state_dict(fused)))) > 0
    want, got = run(ref, inp), run(fused, inp)
    assert _graph_nodes(got[3], "_LoRALinearFnBackward") == n_layers
    assert _graph_nodes(want[3], "_LoRALinearFnBackward") == 0
    assert all(g.dtype == torch.float32 for g in got[2].values())  # fp32 gradients for the fp32 adapter, as peft's
    def flat(g):
        return torch.cat([g[k].flatten() for k in sorted(want[2])])

    pairs = [(got[0], want[0]), (got[1], want[1]), (flat(got[2]), flat(want[2]))]  # output, input and LoRA grads
    if autocast is None:  # one dtype: the same values
        assert max(err(a, b) for a, b in pairs) < 1e-5
    else:  # bf16 rounds the two orders of operations differently: as close to fp32 as peft is (measured 0.7-1.06x)
        out, dx, grads, _ = run(adapted()[0], inp, None)
        for (a, b), t in zip(pairs, [out, dx, flat(grads)]):
            assert err(a, t) <= 1.25 * err(b, t)
    # where the fused function cannot stand in, peft's path runs (no fused node) and gives peft's values
    layer = next(m for m in fused.modules() if type(m) is FusedLoraLinear)
    layer.merge()
    assert layer._fused_args(torch.zeros(1, layer.in_features)) is None
    layer.unmerge()
    fused.zero_grad()
    with torch.no_grad():
        for m in fused.modules():
            if type(m) is FusedLoraLinear:
                m.enable_adapters(False)
        plain, _ = _unet_and_inputs(tiny_models)
        assert torch.allclose(fused(*inp), plain(*inp), atol=1e-6)
    dora, inp = adapted("dora")
    want = run(dora, inp)
    got = run(fuse_lora(adapted("dora")[0]), inp)
    assert _graph_nodes(got[3], "_LoRALinearFnBackward") == 0 and torch.equal(got[0], want[0])
    fuse_lora(fused, False)
    assert not any(type(m) is FusedLoraLinear for m in fused.modules())


def test_norms_keep_a_half_input_in_half_under_autocast_with_fp32_statistics(tiny_models):
    """models/unet.py's HalfLayerNorm / HalfGroupNorm: under autocast a half-precision input stays half (CUDA's
    autocast would run the norm in fp32 and cast both ways), with the fp32 computation's values rounded once;
    without autocast, nn.LayerNorm / nn.GroupNorm exactly."""
    from storyc.models.unet import HalfGroupNorm, HalfLayerNorm, half_norms

    unet, _ = _unet_and_inputs(tiny_models)
    unet.requires_grad_(False)  # frozen, as under a LoRA
    ln = next(m for m in unet.modules() if type(m) is HalfLayerNorm)
    gn = next(m for m in unet.modules() if type(m) is HalfGroupNorm)
    g = torch.Generator().manual_seed(0)
    for norm, shape, plain in ((ln, (2, 16, ln.normalized_shape[0]), torch.nn.LayerNorm),
                               (gn, (2, gn.num_channels, 8, 8), torch.nn.GroupNorm)):
        with torch.no_grad():
            norm.weight.normal_(1, 0.2, generator=g)
            norm.bias.normal_(0, 0.2, generator=g)
        leaf = (torch.randn(shape, generator=g) * 3 + 1).to(torch.bfloat16).requires_grad_()
        x = leaf * 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(x)
        assert out.dtype == torch.bfloat16
        assert _graph_nodes(out, "ToCopyBackward0") == 0  # nothing cast up to fp32 and back
        norm.__class__ = plain
        want = norm(leaf.detach().float()).detach()  # fp32 throughout, as CUDA's autocast computes it
        assert float((out.float() - want).norm() / want.norm()) < 8e-3  # one bf16 rounding (2^-8)
        r = torch.randn(shape, generator=g)  # a loss the normalisation does not make constant
        (out.float() * r).sum().backward()
        ref = leaf.detach().float().requires_grad_()
        (norm(ref) * r).sum().backward()
        assert float((leaf.grad.float() - ref.grad).norm() / ref.grad.norm()) < 3e-2
        x32 = torch.randn(shape, generator=g)
        half_norms(unet, True)
        assert type(norm) is not plain and torch.equal(norm(x32), plain.forward(norm, x32))  # no autocast: the same
