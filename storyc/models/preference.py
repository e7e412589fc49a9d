"""Human-preference scores through DiffSynth-Studio's own ``extensions/ImageQualityMetric`` (PickScore, HPS v2,
HPS v2.1, ImageReward, MPS), loaded from its model repository's layout
(``DiffSynth-Studio/QualityMetric_reward_pretrained``).

Four things in diffsynth 1.1.9 need help, and get it here rather than a copy of its code:
- ``BLIP/med.py`` (imported by the package, whichever metric is used) reads three helpers from
  ``transformers.modeling_utils``, which moved to ``transformers.pytorch_utils`` (same functions) in 4.x;
- its vendored open_clip ships without ``model_configs/``, so ``HPScore_v2`` cannot build "ViT-H-14". The
  architecture is read from the checkpoint instead (widths, depths, patch, context; the text tower's MLP is always
  4x wide): for the real HPS files this is exactly open_clip's ViT-H-14 config, and a tiny test checkpoint gets its
  own widths;
- ``ImageRewardScore`` always builds a ViT-L and loads with ``strict=False`` (see :func:`_image_reward`);
- ``MPScore`` loads with ``strict=False`` too, reads its tokenizer with ``trust_remote_code=True``, and its CLIP
  passes ``return_dict`` to transformers 4.57's CLIP towers, which no longer take it (see :func:`_mps`).
"""
from __future__ import annotations

import threading
from pathlib import Path

from ..errors import StorycError
from .kolors import CLIP_H, PREFERENCE_FILES, check_folder

VIT_H_14 = {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                                              "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}
_LOCK = threading.Lock()  # open_clip's config registry is module state


def _compat() -> None:
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name))


def open_clip_config(state: dict) -> dict:
    """open_clip's model config for a ViT CLIP state dict: ViT-H-14's, with every size the checkpoint fixes read
    from its tensors (vision head width 80 and text head width 64, as ViT-H-14 has them)."""
    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vocab, text_width = state["token_embedding.weight"].shape
    vision = dict(VIT_H_14["vision_cfg"], width=width, patch_size=patch, image_size=grid * patch,
                  layers=count("visual.transformer.resblocks."),
                  mlp_ratio=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width)
    text = dict(VIT_H_14["text_cfg"], width=text_width, heads=text_width // 64, vocab_size=vocab,
                context_length=state["positional_embedding"].shape[0], layers=count("transformer.resblocks."))
    return {"embed_dim": state["text_projection"].shape[1], "vision_cfg": vision, "text_cfg": text}


class Preference:
    """One preference model: ``score(images, prompts)`` -> one float per image, each against its own prompt."""

    def __init__(self, name: str, folder: Path, device: str):
        _compat()
        root = Path(folder)
        check_folder(name, root)
        self.name, self.device = name, device
        if name == "imagereward":
            self.model = _image_reward(root, device)
        elif name == "mps":
            self.model = _mps(root, device)
        elif name == "pickscore":
            from diffsynth.extensions.ImageQualityMetric import PickScore

            self.model = PickScore(device=device, path={"pickscore": str(root / "PickScore_v1"),
                                                        "clip": str(root / CLIP_H)})
        else:
            from diffsynth.extensions.ImageQualityMetric import HPScore_v2
            from diffsynth.extensions.ImageQualityMetric.open_clip import factory
            from safetensors import safe_open

            weights = root / PREFERENCE_FILES[name][0]
            with safe_open(str(weights), "pt") as f:
                state = {k: _Shape(f.get_slice(k).get_shape()) for k in f.keys()}
            key = "hpsv2" if name == "hpsv2" else "hpsv2.1"
            with _LOCK:
                factory._MODEL_CONFIGS["ViT-H-14"] = open_clip_config(state)
                self.model = HPScore_v2(device=device, model_version="v2" if name == "hpsv2" else "v21",
                                        path={key: str(weights),
                                              "open_clip_bpe": str(root / "bpe_simple_vocab_16e6.txt.gz")})

    def score(self, images, prompts) -> list[float]:
        import torch

        with torch.no_grad():  # ImageReward.score (the model, not DiffSynth's wrapper) keeps no no_grad of its own
            return [float(self.model.score(im, p)[0]) for im, p in zip(images, prompts)]


def _image_reward(root: Path, device: str):
    """DiffSynth's ``ImageReward`` (BLIP ViT + BERT with cross-attention + the reward MLP) with its ViT's width and
    depth read from the checkpoint: ``ImageRewardScore`` always builds a ViT-L and loads with ``strict=False``
    (a checkpoint of another shape would load nothing and score at random). Built without weights, then every
    weight the scoring path reads must come from the file."""
    import torch
    from diffsynth.extensions.ImageQualityMetric.BLIP.med import BertConfig, BertModel
    from diffsynth.extensions.ImageQualityMetric.BLIP.vit import VisionTransformer
    from diffsynth.extensions.ImageQualityMetric.imagereward import ImageReward
    from safetensors.torch import load_file

    weights = root / "ImageReward/ImageReward.safetensors"
    state = load_file(str(weights))
    pe = state["blip.visual_encoder.patch_embed.proj.weight"]
    width, patch = pe.shape[0], pe.shape[-1]
    grid = round((state["blip.visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
    depth = len({k.split(".")[3] for k in state if k.startswith("blip.visual_encoder.blocks.")})
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device (no 300 M-weight ViT-L drawn at random first)
        model = ImageReward(med_config=str(root / "ImageReward/med_config.json"), device=device,
                            bert_model_path=str(root / "bert-base-uncased"))
        model.blip.visual_encoder = VisionTransformer(img_size=grid * patch, patch_size=patch, embed_dim=width,
                                                      depth=depth, num_heads=width // 64)
        cfg = BertConfig.from_json_file(str(root / "ImageReward/med_config.json"))
        cfg.encoder_width = width
        model.blip.text_encoder = BertModel(config=cfg, add_pooling_layer=False)
    model = model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    needed = [k for k in missing if k.startswith(("blip.visual_encoder.", "blip.text_encoder.", "mlp."))
              and not k.endswith("position_ids")]
    if needed or unexpected:
        raise StorycError(f"models.imagereward: {weights} is not an ImageReward checkpoint of the shape it "
                          f"declares (missing {needed[:3]}, unexpected {unexpected[:3]})")
    emb = model.blip.text_encoder.embeddings  # a buffer the file may not carry: 0, 1, ... as BERT makes it
    emb.position_ids.copy_(torch.arange(emb.position_ids.shape[-1]).expand_as(emb.position_ids))
    return model.to(device).eval()


def _mps(root: Path, device: str):
    """DiffSynth's ``MPScore`` (its scoring code, the "overall" condition) around a model built here.
    ``MPScore.__init__`` builds a cross model of fixed width 1024 and loads with ``strict=False``, so a checkpoint of
    other names or shapes would score at random, and it reads its tokenizer with ``trust_remote_code=True``. Here
    the cross model's sizes come from the checkpoint (for the real one: DiffSynth's 1024 wide, 4 layers, 16 heads),
    every weight must come from the file, and no code is read from the model folder. DiffSynth's XCLIPModel passes
    ``return_dict`` to the CLIP towers, which transformers 4.57 no longer takes: the towers here drop it (their
    output is the same model output, indexed alike)."""
    import torch
    from accelerate import init_empty_weights
    from diffsynth.extensions.ImageQualityMetric.mps import MPScore
    from diffsynth.extensions.ImageQualityMetric.trainer.models.clip_model import CLIPModel
    from diffsynth.extensions.ImageQualityMetric.trainer.models.cross_modeling import Cross_model
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPImageProcessor

    weights, clip = root / PREFERENCE_FILES["mps"][0], root / CLIP_H
    state = load_file(str(weights))
    try:
        sizes = mps_cross_sizes(state)
    except KeyError as e:
        raise StorycError(f"models.mps: {weights} is not an MPS checkpoint (no {e.args[0]})") from None
    with init_empty_weights():  # weights on the meta device until the file's are assigned; buffers are built
        model = CLIPModel(str(clip), config_file=True)
        model.cross_model = Cross_model(**sizes)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    params = {n for n, _ in model.named_parameters()}
    needed = [k for k in missing if k in params]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if needed or unexpected:
        raise StorycError(f"models.mps: {weights} does not match the CLIP of {clip / 'config.json'} and an MPS cross "
                          f"model (missing {needed[:3]}, unexpected {unexpected[:3]})")
    for tower in (model.model.text_model, model.model.vision_model):
        tower.__class__ = _without_return_dict(type(tower))
    scorer = MPScore.__new__(MPScore)
    torch.nn.Module.__init__(scorer)
    scorer.device, scorer.condition = device, "overall"
    scorer.image_processor = CLIPImageProcessor.from_pretrained(str(clip))
    scorer.tokenizer = AutoTokenizer.from_pretrained(str(clip))
    scorer.model = model.to(device=device, dtype=torch.float32).eval()  # fp32, as DiffSynth's MPScore runs it
    return scorer


def mps_cross_sizes(state: dict) -> dict:
    """``Cross_model``'s arguments for an MPS state dict, read from its tensors' shapes."""
    q, kv, ff = (state[f"cross_model.layers.0.0.fn.{k}.weight"] for k in ("to_q", "to_kv", "ff.0"))
    dim, head = q.shape[1], kv.shape[0] // 2
    return {"dim": dim, "layer_num": len({k.split(".")[2] for k in state if k.startswith("cross_model.layers.")}),
            "dim_head": head, "heads": q.shape[0] // head, "ff_mult": ff.shape[0] // (2 * dim)}


def _without_return_dict(cls):
    """``cls`` whose forward takes and drops ``return_dict`` (see :func:`_mps`)."""
    def forward(self, *args, return_dict=None, **kwargs):
        return cls.forward(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"forward": forward})


class _Shape:
    """A tensor's shape without its data (open_clip_config reads shapes only)."""

    def __init__(self, shape):
        self.shape = tuple(shape)
