"""DreamSim (Fu et al. 2023), a perceptual similarity tuned to human judgements, for character consistency: through
its own package (dreamsim 0.2.1), from a folder in the layout its ``dreamsim(cache_dir=...)`` downloads.

Only its single-backbone ViT-B/32 variants (``open_clip_vitb32``, ``clip_vitb32``): its default ensemble and its
DINO variants build DINO through ``torch.hub.load('facebookresearch/dino:main')``, which runs that repository's code
and downloads weights at load time; storyc runs no code from a model folder. The two it reads load with
``torch.load(weights_only=True)`` (dreamsim's checkpoint, peft's adapter), so no pickled code either. The similarity
of two images is 1 - DreamSim's distance, the cosine of their embeddings."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

# dreamsim_type -> the checkpoint and the LoRA folder dreamsim reads for it
TYPES = {"open_clip_vitb32": ("open_clip_vitb32_pretrain.pth.tar", "open_clip_vitb32_single_lora"),
         "clip_vitb32": ("clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora")}


def kind(folder: Path) -> str | None:
    """Which DreamSim variant ``folder`` holds (its checkpoint and its LoRA's adapter_config.json), or None."""
    for name, (ckpt, lora) in TYPES.items():
        if (Path(folder) / ckpt).is_file() and (Path(folder) / lora / "adapter_config.json").is_file():
            return name
    return None


class DreamSim:
    """The model, loaded once; :meth:`embed` gives each image's unit embedding (one image per forward, so an
    image's figure never depends on which others were measured with it)."""

    def __init__(self, folder: Path, device: str):
        import torch

        from ..errors import StorycError

        variant = kind(folder)
        if variant is None:
            raise StorycError(f"models.dreamsim: {folder} holds no DreamSim checkpoint storyc reads",
                              "unzip DreamSim's open_clip_vitb32 (or clip_vitb32) checkpoint there: "
                              + ", ".join(f"{c} and {lo}/" for c, lo in TYPES.values()))
        from dreamsim import dreamsim

        import warnings

        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # its "Using cached ..." line,
            # and peft's warning about the adapter dreamsim() attaches before it loads the saved one over it
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            self.model, self.preprocess = dreamsim(pretrained=True, device=device, cache_dir=str(folder),
                                                   dreamsim_type=variant)
        self.device, self.variant = device, variant
        self.torch = torch

    def embed(self, images) -> list[list[float]]:
        out = []
        with self.torch.no_grad():
            for im in images:
                e = self.model.embed(self.preprocess(im.convert("RGB")).to(self.device))
                out.append(self.torch.nn.functional.normalize(e.float(), dim=-1)[0].cpu().tolist())
        return out

    def embed_shown(self, images, shown: list) -> list:
        """The embeddings of the images that show a character (``shown[i]``: image i's character ids), None for the
        others: what character consistency reads."""
        got = iter(self.embed([im for im, ids in zip(images, shown) if ids]))
        return [next(got) if ids else None for ids in shown]
