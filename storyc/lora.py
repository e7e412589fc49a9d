"""LoRA on the diffsynth Kolors UNet: inject (peft), save, merge, and export to diffusers / kohya layouts.

Key layouts:
- diffsynth: peft names on diffsynth's UNet, ``blocks.N....to_q.lora_A.default.weight`` (what the notebook's
  ``load_lora`` reads with ``inject_adapter_in_model`` + ``load_state_dict``); alpha in the file's metadata.
- diffusers: ``unet.<diffusers module>.lora_A.weight`` / ``lora_B.weight`` with alpha/rank folded into lora_B,
  so ``pipeline.load_lora_weights`` gives the trained strength at scale 1.
- kohya: ``lora_unet_<diffusers module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
A DoRA (``lora.type: dora``) adds peft's ``lora_magnitude_vector`` per module to the diffsynth and diffusers files;
it has no kohya file (ComfyUI and LyCORIS normalise the weight per input column, peft per output row).
LoHa / LoKr (``lora.type: loha | lokr``, peft's LyCORIS ports) keep peft's parameter names (``hada_w1_a`` ...,
``lokr_w1`` ...): the diffsynth file as trained, the diffusers file under diffusers module names (for peft's
``set_peft_model_state_dict``; diffusers' ``load_lora_weights`` reads LoRA only), the kohya file in LyCORIS' keys
(``lora_unet_<module>.hada_w1_a`` / ``.lokr_w1`` / ``.alpha``), which ComfyUI and the WebUIs load.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ADAPTER = "default"
KINDS = ("lora", "dora", "loha", "lokr")
_MARKS = (".lora_", ".hada_", ".lokr_")  # the trained tensors' names: LoRA/DoRA, LoHa, LoKr
# LyCORIS' kohya keys, in peft's names (the same words, no adapter suffix)
_LYCORIS = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
            "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}


def is_adapter_key(name: str) -> bool:
    """A trained adapter tensor (LoRA, DoRA, LoHa or LoKr), as against the frozen UNet's."""
    return any(m in name for m in _MARKS)


def inject(unet, rank: int, alpha: float, targets, init: str = "gaussian", kind: str = "lora", factor: int = -1,
           decompose_both: bool = False):
    """Add a trainable LoRA to ``unet`` exactly as diffsynth's trainer does (LoRA params in fp32); ``kind: dora``
    adds peft's DoRA (a magnitude per output row, initialised to the base weight's row norms); ``loha`` / ``lokr``
    peft's LoHa (Hadamard product of two rank-r products) / LoKr (Kronecker product; ``factor`` and
    ``decompose_both`` as LyCORIS names them), each initialised by peft so that the update starts at zero."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    if kind == "loha":
        cfg = LoHaConfig(r=rank, alpha=alpha, target_modules=list(targets))
    elif kind == "lokr":
        cfg = LoKrConfig(r=rank, alpha=alpha, target_modules=list(targets), decompose_factor=factor,
                         decompose_both=decompose_both)
    else:
        cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True if init == "default" else init,
                         target_modules=list(targets), use_dora=kind == "dora")
    unet = inject_adapter_in_model(cfg, unet)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32)
    return unet


def lora_state_dict(unet) -> dict:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unet.state_dict().items()
            if is_adapter_key(k)}


def metadata(rank, alpha, base_model: str, fmt: str, targets, kind: str = "lora") -> dict:
    from . import __version__

    meta = {"format": fmt, "rank": str(rank), "alpha": f"{alpha:g}", "base_model": base_model,
            "target_modules": ",".join(targets), "storyc_version": __version__, "ss_network_dim": str(rank),
            "ss_network_alpha": f"{alpha:g}"}
    if kind != "lora":  # only then: a plain LoRA's files stay byte for byte as before
        meta["lora_type"] = kind
    return meta


def pairs(state: dict):
    """(module path, A, B) for every adapted module of a diffsynth/peft LoRA state dict."""
    for k in sorted(state):
        if k.endswith(f".lora_A.{ADAPTER}.weight"):
            mod = k[: -len(f".lora_A.{ADAPTER}.weight")]
            yield mod, state[k], state[f"{mod}.lora_B.{ADAPTER}.weight"]


def magnitude(state: dict, mod: str):
    """A DoRA module's magnitude vector (one per output row), None for a plain LoRA."""
    return state.get(f"{mod}.lora_magnitude_vector.{ADAPTER}.weight")


def is_dora(state: dict) -> bool:
    return any(".lora_magnitude_vector." in k for k in state)


def kind_of(state: dict) -> str:
    """lora | dora | loha | lokr, read off the tensors' names."""
    if any(".hada_" in k for k in state):
        return "loha"
    if any(".lokr_" in k for k in state):
        return "lokr"
    return "dora" if is_dora(state) else "lora"


def _lycoris(state: dict, kind: str):
    """(module path, {peft name: tensor}) for every module of a LoHa / LoKr state dict."""
    mods: dict = {}
    for k, v in state.items():
        for name in _LYCORIS[kind]:
            tail = f".{name}.{ADAPTER}"
            if k.endswith(tail):
                mods.setdefault(k[: -len(tail)], {})[name] = v
    return sorted(mods.items())


def modules(state: dict) -> list:
    """The adapted modules' paths, sorted."""
    kind = kind_of(state)
    if kind in ("loha", "lokr"):
        return [mod for mod, _ in _lycoris(state, kind)]
    return [mod for mod, _, _ in pairs(state)]


def _kron_factor(p: dict, n: str):
    """One of LoKr's two Kronecker factors, stored whole (``lokr_w1``) or as a rank-r product (``lokr_w1_a @ _b``)."""
    if f"lokr_{n}" in p:
        return p[f"lokr_{n}"].to(torch.float32)
    return p[f"lokr_{n}_a"].to(torch.float32) @ p[f"lokr_{n}_b"].to(torch.float32)


def deltas(state: dict):
    """(module path, unscaled weight update, DoRA magnitude or None) for every adapted module: B @ A (LoRA/DoRA),
    (w1a @ w1b) * (w2a @ w2b) (LoHa), kron(w1, w2) (LoKr) — each as peft computes it before alpha/rank."""
    kind = kind_of(state)
    if kind in ("loha", "lokr"):
        for mod, p in _lycoris(state, kind):
            if kind == "loha":
                f = {n: t.to(torch.float32) for n, t in p.items()}
                yield mod, (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]), None
            else:
                yield mod, torch.kron(_kron_factor(p, "w1"), _kron_factor(p, "w2")), None
        return
    for mod, a, b in pairs(state):
        yield mod, b.to(torch.float32) @ a.to(torch.float32), magnitude(state, mod)


@torch.no_grad()
def merge(unet, state: dict, scale: float) -> int:
    """W += scale * B @ A for every adapted Linear (scale = alpha/rank * lora_scale), or LoHa's / LoKr's update at
    that scale. A DoRA module merges as peft merges it at that scale: W = m * (W + scale * B @ A) /
    ||W + scale * B @ A||, the norm per output row. Returns the number of modules merged."""
    mods = dict(unet.named_modules())
    n = 0
    for mod, delta, m in deltas(state):
        lin = mods[mod]
        delta = delta.reshape(lin.weight.shape) * scale
        if m is None:
            lin.weight.add_(delta.to(lin.weight.device, lin.weight.dtype))
        else:
            v = lin.weight.to(torch.float32) + delta.to(lin.weight.device)
            v = v * (m.to(v.device, torch.float32) / torch.linalg.norm(v, dim=1)).unsqueeze(1)
            lin.weight.copy_(v.to(lin.weight.dtype))
        n += 1
    return n


def diffusers_names(unet_weights: Path) -> dict:
    """diffsynth parameter name -> diffusers parameter name, from the UNet file's own key list."""
    from diffsynth.models.sdxl_unet import SDXLUNetStateDictConverter
    from safetensors import safe_open

    with safe_open(str(unet_weights), "pt") as f:
        keys = list(f.keys())
    out = SDXLUNetStateDictConverter().from_diffusers({k: torch.empty(0) for k in keys})
    out = out[0] if isinstance(out, tuple) else out
    return dict(zip(out.keys(), keys))


def _module_map(unet_weights: Path, state: dict) -> dict:
    names = diffusers_names(unet_weights)
    out = {}
    for mod in modules(state):
        target = names.get(f"{mod}.weight")
        if target is None:
            raise KeyError(f"no diffusers name for {mod}")
        out[mod] = target[: -len(".weight")]
    return out


def to_diffusers(state: dict, rank: int, alpha: float, unet_weights: Path) -> dict:
    scale = alpha / rank
    mapping = _module_map(unet_weights, state)
    out = {}
    if kind_of(state) in ("loha", "lokr"):  # peft's own tensors under diffusers module names, alpha in the metadata
        for mod, p in _lycoris(state, kind_of(state)):
            for n, t in p.items():
                out[f"unet.{mapping[mod]}.{n}"] = t.contiguous()
        return out
    for mod, a, b in pairs(state):
        name = mapping[mod]
        out[f"unet.{name}.lora_A.weight"] = a.contiguous()
        out[f"unet.{name}.lora_B.weight"] = (b * scale).contiguous()
        m = magnitude(state, mod)
        if m is not None:  # peft's key in a diffusers file: its presence makes diffusers load the module as DoRA
            out[f"unet.{name}.lora_magnitude_vector"] = m.contiguous()
    return out


def to_kohya(state: dict, rank: int, alpha: float, unet_weights: Path) -> dict:
    if is_dora(state):  # the spec rules refuse it; a direct call must not write a file that loads wrong
        raise ValueError("a DoRA has no kohya export: kohya/LyCORIS loaders normalise per input column")
    mapping = _module_map(unet_weights, state)
    out = {}
    kind = kind_of(state)
    if kind in ("loha", "lokr"):
        for mod, p in _lycoris(state, kind):
            key = "lora_unet_" + mapping[mod].replace(".", "_")
            p = {n: t.contiguous() for n, t in p.items()}
            a = float(alpha)
            if kind == "lokr" and "lokr_w1" in p and "lokr_w2" in p:
                # both factors whole: LyCORIS and ComfyUI then apply no alpha/rank (they read the rank off a
                # product's inner size), peft does; the scale goes into w1 so that every loader gets peft's update
                p["lokr_w1"] = (p["lokr_w1"].to(torch.float32) * (alpha / rank)).contiguous()
                a = float(rank)
            for n, t in p.items():
                out[f"{key}.{n}"] = t
            out[f"{key}.alpha"] = torch.tensor(a)
        return out
    for mod, a, b in pairs(state):
        key = "lora_unet_" + mapping[mod].replace(".", "_")
        out[f"{key}.lora_down.weight"] = a.contiguous()
        out[f"{key}.lora_up.weight"] = b.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def deterministic_safetensors(tensors: dict, meta: dict) -> bytes:
    """safetensors bytes with a stable header: the library writes metadata in hash-map order, which would
    make identical LoRAs differ byte for byte (and so in the lock)."""
    import struct

    from safetensors.torch import save

    raw = save(tensors, metadata={k: str(v) for k, v in meta.items()})
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":")).encode()
    text += b" " * (-(len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def save(path: Path, tensors: dict, meta: dict) -> None:
    """safetensors (never pickle), byte-stable, written to a temp name and renamed."""
    from .render import atomic_write

    atomic_write(Path(path), deterministic_safetensors(tensors, meta), "wb")


def load(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def describe(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True)
