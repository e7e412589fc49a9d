"""Kolors IP-Adapter-Plus on diffsynth's UNet: the release's weights and key names, conditioning by reference image.

The release (Kwai-Kolors/Kolors-IP-Adapter-Plus) is ``ip_adapter_plus_general.safetensors`` (flat keys
``image_proj.*`` and ``ip_adapter.<n>.to_{k,v}_ip.weight``; the ``.bin`` holds the same two dicts) and
``image_encoder/``, a CLIP ViT-L/14-336 (transformers' CLIPVisionModelWithProjection). diffsynth v1 has SDXL
IP-Adapter classes but not the Plus "Resampler" that turns the encoder's penultimate hidden states into image
tokens, so that is written here after the IP-Adapter reference code, under the release's key names. The
per-layer ``to_k_ip`` / ``to_v_ip`` feed diffsynth's own attention (``ipadapter_kwargs``: ``scale *
attention(q, ip_k, ip_v)`` added to each cross-attention, as diffusers' IPAdapterAttnProcessor does).
``tests/test_characters.py`` checks the UNet's output against diffusers 0.35's ``_load_ip_adapter_weights`` on
the same tiny weights.

Several reference images of one character are one token sequence (as diffusers does with several images for one
adapter); several characters in one scene are concatenated too, each one's values scaled by its own ``scale``
(one character: exactly ``scale * attention``, as diffusers).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .kolors import IP_ADAPTER_WEIGHTS as WEIGHTS

DIM_HEAD = 64  # the release's (and diffusers' conversion assumes it)


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int = DIM_HEAD):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))  # as the reference: split between q and k, for fp16
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(b, n, -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """IP-Adapter-Plus's image projection: learned queries attend to the image encoder's hidden states."""

    def __init__(self, dim: int, depth: int, heads: int, num_queries: int, embedding_dim: int, output_dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList([nn.ModuleList([PerceiverAttention(dim, heads), _feed_forward(dim)])
                                     for _ in range(depth)])

    @classmethod
    def from_state(cls, sd: dict) -> "Resampler":
        depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
        r = cls(dim=sd["latents"].shape[2], depth=depth, heads=sd["layers.0.0.to_q.weight"].shape[0] // DIM_HEAD,
                num_queries=sd["latents"].shape[1], embedding_dim=sd["proj_in.weight"].shape[1],
                output_dim=sd["proj_out.weight"].shape[0])
        r.load_state_dict(sd, strict=True)
        return r

    def forward(self, x):
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def weights_file(folder: Path) -> Path | None:
    return next((Path(folder) / w for w in WEIGHTS if (Path(folder) / w).is_file()), None)


def read_weights(folder: Path) -> tuple[dict, dict]:
    """(image_proj, ip_adapter) state dicts from the release file, .safetensors (flat, prefixed keys) or .bin."""
    path = weights_file(folder)
    if path is None:
        raise FileNotFoundError(f"{folder} holds none of {', '.join(WEIGHTS)}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        parts = {"image_proj": {}, "ip_adapter": {}}
        for k, v in flat.items():
            head, _, rest = k.partition(".")
            if head in parts:
                parts[head][rest] = v
        return parts["image_proj"], parts["ip_adapter"]
    sd = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickles code
    return sd["image_proj"], sd["ip_adapter"]


def attention_layers(unet) -> list[tuple[int, int]]:
    """(block index, transformer index) of every cross-attention in the order the release numbers them
    (diffusers' attention-processor order: down blocks, up blocks, then the mid block)."""
    from diffsynth.models.sd_unet import AttentionBlock, PopBlock, PushBlock

    blocks = list(unet.blocks)
    last_push = max(i for i, b in enumerate(blocks) if isinstance(b, PushBlock))
    first_pop = min(i for i, b in enumerate(blocks) if isinstance(b, PopBlock))
    found = [(i, len(b.transformer_blocks)) for i, b in enumerate(blocks) if isinstance(b, AttentionBlock)]
    down = [f for f in found if f[0] < last_push]
    mid = [f for f in found if last_push < f[0] < first_pop]
    up = [f for f in found if f[0] > first_pop]
    return [(i, t) for i, n in down + up + mid for t in range(n)]


class IPAdapterPlus(nn.Module):
    """The image encoder, the Resampler and one (to_k_ip, to_v_ip) pair per cross-attention of ``unet``."""

    def __init__(self, folder: Path, unet, dtype, device):
        super().__init__()
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        folder = Path(folder)
        proj, layers = read_weights(folder)
        self.resampler = Resampler.from_state(proj)
        self.where = attention_layers(unet)
        n = len({k.split(".")[0] for k in layers})
        if n != len(self.where):
            raise ValueError(f"{weights_file(folder).name} has IP layers for {n} cross-attentions; this UNet has "
                             f"{len(self.where)} (an IP-Adapter for another model?)")
        # the release numbers them 1, 3, 5, ... (every second attention processor is a cross-attention)
        order = sorted({int(k.split(".")[0]) for k in layers})
        self.to_k = nn.ModuleList()
        self.to_v = nn.ModuleList()
        for j in order:
            k, v = layers[f"{j}.to_k_ip.weight"], layers[f"{j}.to_v_ip.weight"]
            self.to_k.append(nn.Linear(k.shape[1], k.shape[0], bias=False))
            self.to_v.append(nn.Linear(v.shape[1], v.shape[0], bias=False))
            self.to_k[-1].weight.data.copy_(k)
            self.to_v[-1].weight.data.copy_(v)
        enc = folder / "image_encoder"
        self.encoder = CLIPVisionModelWithProjection.from_pretrained(str(enc), dtype=dtype)
        size = self.encoder.config.image_size
        self.processor = (CLIPImageProcessor.from_pretrained(str(enc)) if (enc / "preprocessor_config.json").is_file()
                          else CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}))
        self.to(device=device, dtype=dtype).eval()
        self.dtype_, self.device_ = dtype, device

    @torch.no_grad()
    def tokens(self, images: list) -> torch.Tensor:
        """Image tokens of each PIL image, one after another: (len(images) * queries, cross_dim)."""
        px = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        return self._project(px.to(self.device_, self.dtype_)).flatten(0, 1)

    @torch.no_grad()
    def uncond_tokens(self, count: int) -> torch.Tensor:
        """The negative branch's tokens: the encoder on all-zero pixel values (as diffusers), ``count`` images."""
        size = self.encoder.config.image_size
        px = torch.zeros(1, 3, size, size, device=self.device_, dtype=self.dtype_)
        return self._project(px).flatten(0, 1).repeat(count, 1)

    def _project(self, px):
        hidden = self.encoder(px, output_hidden_states=True).hidden_states[-2]  # Plus reads the penultimate layer
        return self.resampler(hidden)

    @torch.no_grad()
    def unet_kwargs(self, rows: list[torch.Tensor], value_scales: list[torch.Tensor]) -> dict:
        """diffsynth's ``ipadapter_kwargs_list`` for a batch: ``rows[b]`` the tokens of row b (the same count in
        every row), ``value_scales[b]`` one scale per token (the character's)."""
        x = torch.stack(rows)
        s = torch.stack(value_scales).unsqueeze(-1).to(x.dtype)
        out: dict = {}
        for (block, t), k, v in zip(self.where, self.to_k, self.to_v):
            out.setdefault(block, {})[t] = {"ip_k": k(x), "ip_v": v(x) * s, "scale": 1.0}
        return out
