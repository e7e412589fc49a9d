"""Tiny random-init models in the real on-disk layouts, for tests and the offline demo.

Each runs the real diffsynth / transformers / simple-aesthetics-predictor code; only the widths are small
(the VAE is diffsynth's full-size SDXL VAE, which is fine on CPU at small sizes). Weights are seeded, so the
same call builds byte-identical files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

TINY_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 32, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64], "layers_per_block": 2, "transformer_layers_per_block": [1, 1, 1],
    "attention_head_dim": [2, 2, 2], "cross_attention_dim": 64, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 16,
    "projection_class_embeddings_input_dim": 64 + 6 * 16, "encoder_hid_dim": 64, "encoder_hid_dim_type": "text_proj",
    "norm_num_groups": 32,
}
SDXL_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 1024,
    "scaling_factor": 0.13025, "force_upcast": False, "norm_num_groups": 32,
}


def _glm_config():
    from diffsynth.models.kolors_text_encoder import ChatGLMConfig

    return ChatGLMConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, kv_channels=16, num_attention_heads=4,
                         multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=65024,
                         seq_length=256, original_rope=True, use_cache=True, architectures=["ChatGLMModel"])


def _done(folder: Path) -> bool:
    return (folder / ".complete").is_file()


def _finish(tmp: Path, folder: Path) -> Path:
    (tmp / ".complete").write_text("tiny random-init model built by storyc\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def build_text_encoder(folder: Path, seed: int = 0) -> None:
    import torch
    from diffsynth.models.kolors_text_encoder import ChatGLMModel, RMSNorm

    torch.manual_seed(seed)
    model = ChatGLMModel(_glm_config())
    # ChatGLM builds its layers with skip_init (empty_init) and diffsynth's RMSNorm with torch.empty: every
    # weight is uninitialised memory (zeros on one machine, NaN/1e38 on another). Initialise all of it.
    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in norms:
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.zero_()
    model.save_pretrained(folder, safe_serialization=True)


def build_unet(folder: Path, seed: int = 0) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    cfg = {k: v for k, v in TINY_UNET.items() if not k.startswith("_")}
    UNet2DConditionModel(**cfg).save_pretrained(folder, safe_serialization=True)


def build_vae(folder: Path, seed: int = 0) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    cfg = {k: v for k, v in SDXL_VAE.items() if not k.startswith("_")}
    vae = AutoencoderKL(**cfg)
    with torch.no_grad():  # keep random activations in a sane range through 4 down/up levels
        for p in vae.parameters():
            if p.dim() > 1:
                p.mul_(0.5)
    vae.to(torch.float16).save_pretrained(folder, safe_serialization=True)


def _build_once(folder: Path, build) -> Path:
    """Build into folder.partial, then rename: a half-built model is never taken as complete."""
    folder = Path(folder)
    if _done(folder):
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    return _finish(tmp, folder)


def tiny_kolors(folder: Path, seed: int = 0) -> Path:
    """Kolors layout: text_encoder/, unet/, vae/ (diffusers/transformers key names)."""
    def build(tmp):
        build_text_encoder(tmp / "text_encoder", seed)
        build_unet(tmp / "unet", seed + 1)
        build_vae(tmp / "vae", seed + 2)

    return _build_once(folder, build)


def tiny_sdxl_vae(folder: Path, seed: int = 0) -> Path:
    """The sdxl-vae-fp16-fix layout: config.json + diffusion_pytorch_model.safetensors at the top."""
    return _build_once(folder, lambda tmp: build_vae(tmp, seed + 2))


def tiny_aesthetic(folder: Path, seed: int = 0) -> Path:
    """aesthetics-predictor-v2 layout: AestheticsPredictorV2Linear + CLIPProcessor files."""
    return _build_once(folder, lambda tmp: _build_aesthetic(tmp, seed))


def _build_aesthetic(tmp: Path, seed: int) -> None:
    import torch
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=32, projection_dim=32)
    AestheticsPredictorV2Linear(cfg).save_pretrained(tmp, safe_serialization=True)
    write_clip_processor(tmp, CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}))


def write_clip_processor(folder: Path, image_processor) -> None:
    """The CLIPProcessor files of an aesthetic-predictor folder. A byte-level vocabulary and an empty merge list
    make a valid CLIP tokenizer offline (the predictor reads images only)."""
    from transformers import CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for tok in ("<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)  # CLIP's
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)


def tiny_esrgan(folder: Path, seed: int = 0) -> Path:
    """The AI-ModelScope/Real-ESRGAN layout: RealESRGAN_x4.pth, a plain state dict. DiffSynth recognises the
    model by its key names and shapes, so this one has the full RRDBNet architecture (16.7 M weights, small
    enough), at random."""
    def build(tmp):
        import torch
        from diffsynth.extensions.ESRGAN import RRDBNet

        torch.manual_seed(seed)
        model = RRDBNet()
        with torch.no_grad():  # 23 residual blocks of random convs: damp them so the image stays in range
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_(0.1)
        torch.save(model.state_dict(), tmp / "RealESRGAN_x4.pth")

    return _build_once(folder, build)


def tiny_clip_zh(folder: Path, seed: int = 0) -> Path:
    """The OFA-Sys/chinese-clip-vit-* layout (ChineseCLIPModel + ChineseCLIPProcessor: a BERT vocab.txt), with a
    vocabulary of ASCII and the CJK Unified Ideographs block, so Chinese prompts tokenise (one token a character,
    as the real RoBERTa-wwm vocabulary does)."""
    def build(tmp):
        import torch
        from transformers import (BertTokenizer, ChineseCLIPConfig, ChineseCLIPImageProcessor, ChineseCLIPModel,
                                  ChineseCLIPProcessor)

        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789,.，。、！？",
                 *(chr(c) for c in range(0x4E00, 0x4E00 + 20902))]
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n", "utf-8")
        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        cfg = ChineseCLIPConfig(text_config=dict(small, vocab_size=len(vocab), max_position_embeddings=128),
                                vision_config=dict(small, image_size=64, patch_size=32), projection_dim=16)
        torch.manual_seed(seed)
        ChineseCLIPModel(cfg).save_pretrained(tmp, safe_serialization=True)
        ChineseCLIPProcessor(image_processor=ChineseCLIPImageProcessor(size={"height": 64, "width": 64},
                                                                      crop_size={"height": 64, "width": 64}),
                             tokenizer=BertTokenizer(str(tmp / "vocab.txt"))).save_pretrained(tmp)

    return _build_once(folder, build)


def tiny_captioner(folder: Path, seed: int = 0) -> Path:
    """The Salesforce/blip2-opt-2.7b layout (Blip2ForConditionalGeneration + Blip2Processor) at tiny widths. The
    OPT vocabulary keeps its real size (50272, words `w<id>`), because Data-Juicer's image_captioning_mapper sets
    the image token to OPT's id 50265."""
    def build(tmp):
        import torch
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                                  PreTrainedTokenizerFast)

        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 50272) if i != 50265},
                 "<image>": 50265}
        tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        tok.padding_side = "left"
        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        cfg = Blip2Config(vision_config=dict(small, image_size=32, patch_size=8),
                          qformer_config=dict(small, vocab_size=128, cross_attention_frequency=1),
                          text_config=dict(model_type="opt", vocab_size=50272, hidden_size=32, word_embed_proj_dim=32,
                                           ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                           max_position_embeddings=256, pad_token_id=1, bos_token_id=2, eos_token_id=2),
                          num_query_tokens=4, image_token_index=50265, image_text_hidden_size=32)
        torch.manual_seed(seed)
        Blip2ForConditionalGeneration(cfg).eval().save_pretrained(tmp, safe_serialization=True)
        Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                       num_query_tokens=4).save_pretrained(tmp)

    return _build_once(folder, build)


def cross_attention_widths(cfg: dict) -> list[int]:
    """The width of every cross-attention of a diffusers UNet config, in diffusers' processor order (down blocks,
    up blocks, mid block): what an IP-Adapter for that UNet has one (to_k_ip, to_v_ip) pair for."""
    C, L = list(cfg["block_out_channels"]), cfg.get("layers_per_block", 2)
    T = cfg.get("transformer_layers_per_block", 1)
    T = list(T) if isinstance(T, (list, tuple)) else [T] * len(C)
    down = [C[i] for i, t in enumerate(cfg["down_block_types"]) if "CrossAttn" in t for _ in range(L * T[i])]
    up = [C[::-1][i] for i, t in enumerate(cfg["up_block_types"]) if "CrossAttn" in t
          for _ in range((L + 1) * T[::-1][i])]
    return down + up + [C[-1]] * T[-1]


def tiny_ip_adapter(folder: Path, seed: int = 0) -> Path:
    """The Kwai-Kolors/Kolors-IP-Adapter-Plus layout for the tiny Kolors UNet: ip_adapter_plus_general.safetensors
    (the Resampler under ``image_proj.``, one to_k_ip/to_v_ip pair per cross-attention under ``ip_adapter.1``,
    ``.3``, ...) and image_encoder/ (a CLIPVisionModelWithProjection with its preprocessor)."""
    def build(tmp):
        import torch
        from safetensors.torch import save_file
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        from .ipadapter import Resampler

        torch.manual_seed(seed)
        enc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                               image_size=56, patch_size=14, projection_dim=32)
        CLIPVisionModelWithProjection(enc).save_pretrained(tmp / "image_encoder", safe_serialization=True)
        CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(
            tmp / "image_encoder")
        cross = TINY_UNET["cross_attention_dim"]
        r = Resampler(dim=64, depth=4, heads=1, num_queries=4, embedding_dim=32, output_dim=cross)
        with torch.no_grad():
            r.latents.normal_(0, 64 ** -0.5)
        flat = {f"image_proj.{k}": v.contiguous() for k, v in r.state_dict().items()}
        for n, width in enumerate(cross_attention_widths(TINY_UNET)):
            for w in ("to_k_ip", "to_v_ip"):
                flat[f"ip_adapter.{2 * n + 1}.{w}.weight"] = torch.nn.Linear(cross, width, bias=False).weight.data
        save_file(flat, str(tmp / "ip_adapter_plus_general.safetensors"))

    return _build_once(folder, build)


TINY_OPEN_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 56, "layers": 2, "width": 160, "head_width": 80,
                                                 "patch_size": 14, "mlp_ratio": 2.0},
                  "text_cfg": {"context_length": 77, "vocab_size": 640, "width": 128, "heads": 2, "layers": 2}}


def tiny_preference(folder: Path, seed: int = 0) -> Path:
    """The DiffSynth-Studio/QualityMetric_reward_pretrained layout of the preference models storyc measures:
    PickScore_v1/ (a transformers CLIPModel) with the CLIP-ViT-H-14 processor folder, HPS v2 / v2.1 (open_clip
    state dicts in safetensors) with open_clip's BPE merges file, ImageReward (below) and MPS (a CLIP of the
    CLIP-ViT-H-14 folder's config and DiffSynth's cross model, 16 wide instead of 1024, in one safetensors). Tiny
    widths (HPS's vision heads 80 wide and text heads 64 wide, as ViT-H-14's, so storyc reads the architecture from
    the checkpoint as for the real one)."""
    def build(tmp):
        import gzip

        import torch
        from safetensors.torch import save_file
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        from .preference import _compat

        torch.manual_seed(seed)
        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        cfg = CLIPConfig(text_config=dict(small, vocab_size=600, max_position_embeddings=77),
                         vision_config=dict(small, image_size=64, patch_size=32), projection_dim=16)
        CLIPModel(cfg).save_pretrained(tmp / "PickScore_v1", safe_serialization=True)
        clip = tmp / "CLIP-ViT-H-14-laion2B-s32B-b79K"
        clip.mkdir()
        write_clip_processor(clip, CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}))
        cfg.save_pretrained(clip)
        # open_clip's BPE file: a header line, then merges (a few, so some words become one token)
        merges = ["#version: 0.2", "t h", "th e</w>", "a n", "i n", "r e", "o n</w>", "e r"]
        with gzip.GzipFile(tmp / "bpe_simple_vocab_16e6.txt.gz", "wb", mtime=0) as f:
            f.write("\n".join(merges).encode("utf-8"))
        _compat()
        from diffsynth.extensions.ImageQualityMetric.open_clip import factory

        factory._MODEL_CONFIGS["storyc-tiny-hps"] = TINY_OPEN_CLIP
        (tmp / "HPS_v2").mkdir()
        for i, name in enumerate(("HPS_v2_compressed", "HPS_v2.1_compressed")):
            torch.manual_seed(seed + 1 + i)
            model = factory.create_model("storyc-tiny-hps")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      str(tmp / "HPS_v2" / f"{name}.safetensors"))
        _tiny_image_reward(tmp, seed + 3)
        from diffsynth.extensions.ImageQualityMetric.trainer.models.cross_modeling import Cross_model

        torch.manual_seed(seed + 4)
        parts = {"model": CLIPModel(cfg), "cross_model": Cross_model(dim=cfg.projection_dim, layer_num=2, dim_head=8,
                                                                      heads=2)}
        (tmp / "MPS_overall_checkpoint").mkdir()
        save_file({f"{p}.{k}": v.contiguous() for p, m in parts.items() for k, v in m.state_dict().items()},
                  str(tmp / "MPS_overall_checkpoint/MPS_overall_checkpoint_diffsynth.safetensors"))

    return _build_once(folder, build)


TINY_IMAGE_REWARD_VIT = {"img_size": 224, "patch_size": 32, "embed_dim": 64, "depth": 2, "num_heads": 1}


def _tiny_image_reward(tmp: Path, seed: int) -> None:
    """ImageReward/ (its safetensors and BLIP's med_config.json) and bert-base-uncased/ (a small uncased
    vocabulary, CJK ideographs one token a character as in BERT's own): a tiny BLIP ViT, a one-layer
    BERT 768 wide (the reward MLP's fixed input) with cross-attention, and the MLP. The vocabulary holds the first
    2000 CJK ideographs (others are [UNK], as characters missing from BERT's own vocabulary are)."""
    import torch
    from diffsynth.extensions.ImageQualityMetric.BLIP.med import BertConfig, BertModel
    from diffsynth.extensions.ImageQualityMetric.BLIP.vit import VisionTransformer
    from diffsynth.extensions.ImageQualityMetric.imagereward import MLP
    from safetensors.torch import save_file
    from transformers import BertTokenizer

    bert = tmp / "bert-base-uncased"
    bert.mkdir()
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(3)), "[UNK]", "[CLS]", "[SEP]", "[MASK]",
             *"abcdefghijklmnopqrstuvwxyz0123456789,.，。、！？", *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"),
             *(chr(c) for c in range(0x4E00, 0x4E00 + 2000))]
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n", "utf-8")
    BertTokenizer(str(bert / "vocab.txt")).save_pretrained(bert)
    (tmp / "ImageReward").mkdir()
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 256,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 12,
           "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(vocab) + 2,
           "encoder_width": TINY_IMAGE_REWARD_VIT["embed_dim"], "add_cross_attention": True}
    (tmp / "ImageReward/med_config.json").write_text(json.dumps(med, indent=2), "utf-8")
    (bert / "config.json").write_text(json.dumps(dict(med, vocab_size=len(vocab)), indent=2), "utf-8")
    torch.manual_seed(seed)
    cfg = BertConfig.from_json_file(str(tmp / "ImageReward/med_config.json"))
    parts = {"blip.visual_encoder": VisionTransformer(**TINY_IMAGE_REWARD_VIT),
             "blip.text_encoder": BertModel(config=cfg, add_pooling_layer=False), "mlp": MLP(768)}
    with torch.no_grad():  # MLP's own init (std 1/769 through five layers) leaves every reward at the same value
        for layer in parts["mlp"].layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, layer.in_features ** -0.5)
    save_file({f"{p}.{k}": v.contiguous() for p, m in parts.items() for k, v in m.state_dict().items()},
              str(tmp / "ImageReward/ImageReward.safetensors"))


def tiny_dreamsim(folder: Path, seed: int = 0) -> Path:
    """DreamSim's open_clip_vitb32 layout (what its ``dreamsim(dreamsim_type="open_clip_vitb32")`` downloads and
    reads): the OpenCLIP ViT-B/32 as DINO's ViT (``open_clip_vitb32_pretrain.pth.tar``, a ``state_dict`` with the
    768 -> 512 projection as ``proj``) and its LoRA (``open_clip_vitb32_single_lora/``, peft's layout). Full width:
    dreamsim builds ViT-B/32 from no config (87 M weights, stored in fp16 but the projection, 175 MB), so a random
    model is its real size. The LoRA's B matrices are random (peft starts them at zero), so the adapter acts."""
    def build(tmp):
        import json

        import torch
        from dreamsim.feature_extraction.vision_transformer import vit_base

        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        vit = vit_base(patch_size=32)
        vit.pos_drop = torch.nn.LayerNorm(vit.embed_dim)  # where load_open_clip_as_dino puts CLIP's ln_pre
        sd = {k: v.half() for k, v in vit.state_dict().items()}
        sd["proj"] = torch.randn(vit.embed_dim, 512, generator=g) * vit.embed_dim ** -0.5  # used as read: fp32
        torch.save({"state_dict": sd}, tmp / "open_clip_vitb32_pretrain.pth.tar")
        lora = tmp / "open_clip_vitb32_single_lora"
        lora.mkdir()
        (lora / "adapter_config.json").write_text(json.dumps(  # DreamSim's published LoRA settings
            {"r": 16, "lora_alpha": 0.5, "lora_dropout": 0.3, "bias": "none", "target_modules": ["qkv"]}), "utf-8")
        import contextlib
        import io

        from dreamsim import dreamsim

        with contextlib.redirect_stdout(io.StringIO()):
            model, _ = dreamsim(pretrained=False, device="cpu", cache_dir=str(tmp), dreamsim_type="open_clip_vitb32")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=g)
        model.save_pretrained(str(lora))

    return _build_once(folder, build)


BUILDERS = {"kolors": tiny_kolors, "sdxl-vae": tiny_sdxl_vae, "aesthetic": tiny_aesthetic, "esrgan": tiny_esrgan,
            "clip-zh": tiny_clip_zh, "ip-adapter": tiny_ip_adapter,
            "captioner": tiny_captioner, "preference": tiny_preference, "dreamsim": tiny_dreamsim}


def ensure(name: str, folder: Path) -> Path:
    """Build tiny model ``name`` into ``folder`` unless it is already complete there."""
    return BUILDERS[name](Path(folder))
