"""Load Kolors (ChatGLM text encoder, UNet, VAE) from local folders into diffsynth's SDXLImagePipeline.

Real Kolors folders and the tiny test folders go through the same code: the text encoder through diffsynth's
ModelManager (transformers folder), the UNet and VAE from diffusers-layout safetensors through diffsynth's own
state-dict converters.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import StorycError

KOLORS_UNET = {  # used when a Kolors unet/ folder has no config.json
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 5632, "encoder_hid_dim": 4096,
}
REQUIRED = {
    "kolors": ["text_encoder/config.json", "unet/diffusion_pytorch_model.safetensors",
               "vae/diffusion_pytorch_model.safetensors"],
    "vae": ["diffusion_pytorch_model.safetensors"],
    "aesthetic": ["config.json", "preprocessor_config.json"],
    "esrgan": ["RealESRGAN_x4.pth"],
    "clip_zh": ["config.json", "preprocessor_config.json", "vocab.txt"],
    "ip_adapter": ["image_encoder/config.json"],
    "captioner": ["config.json", "preprocessor_config.json"],
    "dreamsim": [],  # one of its variants' files: check_folder asks storyc.models.dreamsim
}
# DiffSynth's preference models: the files each reads from a DiffSynth-Studio/QualityMetric_reward_pretrained
# download (its own ImageQualityMetric.model_dict), weights first
QUALITY_METRIC_ID = "DiffSynth-Studio/QualityMetric_reward_pretrained"
CLIP_H = "CLIP-ViT-H-14-laion2B-s32B-b79K"
PREFERENCE_FILES = {
    "pickscore": ["PickScore_v1/config.json", f"{CLIP_H}/preprocessor_config.json",
                  f"{CLIP_H}/tokenizer_config.json"],
    "hpsv2": ["HPS_v2/HPS_v2_compressed.safetensors", "bpe_simple_vocab_16e6.txt.gz"],
    "hpsv2_1": ["HPS_v2/HPS_v2.1_compressed.safetensors", "bpe_simple_vocab_16e6.txt.gz"],
    "imagereward": ["ImageReward/ImageReward.safetensors", "ImageReward/med_config.json", "bert-base-uncased/vocab.txt"],
    "mps": ["MPS_overall_checkpoint/MPS_overall_checkpoint_diffsynth.safetensors", f"{CLIP_H}/config.json",
            f"{CLIP_H}/preprocessor_config.json", f"{CLIP_H}/tokenizer_config.json"],
}
_CLIP_H_FILES = tuple(f"{CLIP_H}/{f}" for f in ("config.json", "merges.txt", "preprocessor_config.json",
                                                 "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                                                 "vocab.json"))
PREFERENCE_PATTERNS = {  # what `modelscope:` downloads of that repository for each (not its other metrics' GBs)
    "pickscore": ["PickScore_v1/*", *_CLIP_H_FILES],
    "hpsv2": ["HPS_v2/HPS_v2_compressed.safetensors", "bpe_simple_vocab_16e6.txt.gz"],
    "hpsv2_1": ["HPS_v2/HPS_v2.1_compressed.safetensors", "bpe_simple_vocab_16e6.txt.gz"],
    "imagereward": ["ImageReward/ImageReward.safetensors", "ImageReward/med_config.json",
                    *(f"bert-base-uncased/{f}" for f in ("config.json", "tokenizer.json", "tokenizer_config.json",
                                                         "vocab.txt"))],  # not its 440 MB BERT weights: unread
    "mps": ["MPS_overall_checkpoint/MPS_overall_checkpoint_diffsynth.safetensors", *_CLIP_H_FILES],
}
REQUIRED.update(PREFERENCE_FILES)
IP_ADAPTER_WEIGHTS = ("ip_adapter_plus_general.safetensors", "ip_adapter_plus_general.bin")  # the release's names
MODELSCOPE_IDS = {"kolors": "Kwai-Kolors/Kolors", "vae": "AI-ModelScope/sdxl-vae-fp16-fix",
                  "aesthetic": "AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE",
                  "esrgan": "AI-ModelScope/Real-ESRGAN", "ip_adapter": "Kwai-Kolors/Kolors-IP-Adapter-Plus"}


def model_hint(kind: str, folder: str = "DIR") -> str:
    """How to get a model (the same words in validate's warning and in a build's error)."""
    if kind == "dreamsim":
        return (f"download DreamSim's open_clip_vitb32 checkpoint (dreamsim_open_clip_vitb32_checkpoint.zip, the "
                f"v0.2.0-checkpoints release of github.com/ssundaram21/dreamsim) and unzip it into {folder}; its "
                f"ensemble and DINO variants are not read (they run torch.hub code)")
    if kind == "captioner":
        return (f"download a BLIP-2 folder (e.g. `huggingface-cli download Salesforce/blip2-opt-2.7b --local-dir "
                f"{folder}`), or remove `recaption`")
    if kind in PREFERENCE_PATTERNS:  # one ModelScope repository holds every DiffSynth preference model
        inc = " ".join(f"'{p}'" for p in PREFERENCE_PATTERNS[kind])
        return (f"download it: `modelscope download --model {QUALITY_METRIC_ID} --include {inc} --local_dir "
                f"{folder}`, or write `models.{kind}: modelscope:{QUALITY_METRIC_ID}` to download it on first use")
    if kind not in MODELSCOPE_IDS:  # published on Hugging Face in the layout transformers loads
        return (f"download a ChineseCLIPModel folder (e.g. `huggingface-cli download "
                f"OFA-Sys/chinese-clip-vit-large-patch14 --local-dir {folder}`), or remove `models.{kind}`")
    mid = MODELSCOPE_IDS[kind]
    return (f"download it: `modelscope download --model {mid} --local_dir {folder}`, or write "
            f"`models.{kind}: modelscope:{mid}` to download it on first use")


def check_folder(kind: str, folder: Path) -> None:
    """Raise a clear error listing what a model folder lacks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StorycError(f"models.{kind}: model folder {folder} does not exist", model_hint(kind, str(folder)))
    missing = [f for f in REQUIRED[kind] if not (folder / f).exists()]
    if kind == "kolors" and not any((folder / "text_encoder").glob("*.safetensors")) and not any(
            (folder / "text_encoder").glob("*.bin")):
        missing.append("text_encoder/*.safetensors or *.bin")
    if kind == "dreamsim":
        from .dreamsim import TYPES, kind as dreamsim_kind

        if dreamsim_kind(folder) is None:
            missing.append(" or ".join(f"{c} with {lo}/adapter_config.json" for c, lo in TYPES.values()))
    if kind == "ip_adapter" and not any((folder / w).is_file() for w in IP_ADAPTER_WEIGHTS):
        missing.append("ip_adapter_plus_general.safetensors (or .bin)")
    if missing:
        raise StorycError(f"models.{kind}: model folder {folder} is incomplete: missing {', '.join(missing)}",
                          model_hint(kind, str(folder)))


def unet_config(folder: Path) -> dict:
    p = Path(folder) / "config.json"
    return json.loads(p.read_text("utf-8")) if p.is_file() else KOLORS_UNET


def load_vae(path: Path, which: str, dtype, device):
    """diffsynth SDXL VAE encoder or decoder from a diffusers AutoencoderKL safetensors file."""
    import torch
    from diffsynth.models.sdxl_vae_decoder import SDXLVAEDecoder
    from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder
    from safetensors.torch import load_file

    cls = SDXLVAEEncoder if which == "encoder" else SDXLVAEDecoder
    state = load_file(str(path))
    converted = cls.state_dict_converter().from_diffusers(state)
    converted = converted[0] if isinstance(converted, tuple) else converted
    with torch.device("meta"):
        model = cls()
    model.load_state_dict(converted, strict=True, assign=True)
    from .unet import wide_vae

    return wide_vae(model).to(device=device, dtype=dtype).eval()


def load_unet_for(kolors: Path, dtype, device):
    from .unet import load_unet

    check_folder("kolors", kolors)
    return load_unet(Path(kolors) / "unet", dtype, device)


def _add_text_encoder(mm, kolors: Path) -> None:
    """ChatGLM (diffsynth's ChatGLMModel, a transformers folder) into a ModelManager, quietly."""
    from diffsynth.models.kolors_text_encoder import ChatGLMModel

    from ..stages._quiet import silent_stdout

    with silent_stdout():  # diffsynth prints every load
        mm.load_model_from_huggingface_folder(str(Path(kolors) / "text_encoder"), ["kolors_text_encoder"], [ChatGLMModel])


def load_prompter(kolors: Path, dtype, device):
    """Kolors' text encoder behind diffsynth's KolorsPrompter (what encodes prompts for training, generation and
    previews): the one place ChatGLM is loaded."""
    from diffsynth import ModelManager
    from diffsynth.prompters import KolorsPrompter

    from ..stages._quiet import silent_stdout

    check_folder("kolors", kolors)
    mm = ModelManager(torch_dtype=dtype, device=device)
    _add_text_encoder(mm, kolors)
    prompter = KolorsPrompter()
    with silent_stdout():
        prompter.fetch_models(mm.fetch_model("kolors_text_encoder"))
    return prompter


def load_pipeline(kolors: Path, dtype, device, vae_encoder: Path | None = None, decoder: bool = True,
                  text_encoder: bool = True, unet=None, unet_state: dict | None = None):
    """An SDXLImagePipeline in Kolors mode (KolorsPrompter, 1100-step scheduler); ``unet``: use this UNet (the
    one being trained, for previews) instead of loading one; ``unet_state``: its weights file, already read."""
    from diffsynth import ModelManager, SDXLImagePipeline

    from ..stages._quiet import silent_stdout
    from .unet import load_unet

    kolors = Path(kolors)
    check_folder("kolors", kolors)
    mm = ModelManager(torch_dtype=dtype, device=device)
    if text_encoder:
        _add_text_encoder(mm, kolors)
    with silent_stdout():  # diffsynth prints every load
        if not text_encoder:  # a placeholder keeps the pipeline in Kolors mode (prompter, scheduler) without 6B weights
            mm.model.append(_NoTextEncoder())
            mm.model_path.append("none")
            mm.model_name.append("kolors_text_encoder")

        def add(model, path, name):
            mm.model.append(model)
            mm.model_path.append(str(path))
            mm.model_name.append(name)

        add(unet if unet is not None else load_unet(kolors / "unet", dtype, device, unet_state), kolors / "unet",
            "sdxl_unet")
        if decoder:
            add(load_vae(kolors / "vae/diffusion_pytorch_model.safetensors", "decoder", dtype, device),
                kolors / "vae", "sdxl_vae_decoder")
        if vae_encoder is not None:
            add(load_vae(vae_encoder, "encoder", dtype, device), vae_encoder, "sdxl_vae_encoder")
        pipe = SDXLImagePipeline.from_model_manager(mm)
    return pipe


class _NoTextEncoder:
    """Stands in for ChatGLM when prompt embeddings come from a cache."""

    def __call__(self, *a, **k):
        raise RuntimeError("text encoder was released; embeddings must come from the cache")

    def to(self, *a, **k):
        return self

    def eval(self):
        return self

    def parameters(self):
        return iter(())
