"""Shared set-up for the GPU benchmarks: full-size Kolors-architecture models with random weights.

Speed does not depend on weight values, so nothing is downloaded: ChatGLM3-6B, the Kolors UNet (2.6 B) and the
SDXL VAE are built at full size on the GPU with small random weights (std 0.02 keeps activations finite).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # storyc from this checkout


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: (_ for _ in ()).throw(RuntimeError(f"stub {self.__name__}.{name}"))


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """diffsynth imports modelscope at module level (hub upload only); the GPU image lacks it."""

    def __init__(self, names):
        self.names = names

    def find_spec(self, name, path, target=None):
        if any(name == n or name.startswith(n + ".") for n in self.names):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _Stub(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


if importlib.util.find_spec("modelscope") is None:
    sys.meta_path.insert(0, _StubFinder(["modelscope"]))

import torch  # noqa: E402

SMOKE = os.environ.get("BENCH_SMOKE") == "1"  # CPU plumbing check with tiny widths: not a measurement
DEV = "cpu" if SMOKE else "cuda"
DT = torch.float32 if SMOKE else torch.float16
PROMPT = "二次元，日系动漫，一个紫色短发小女孩，在家中沙发上坐着，双手托着腮，很无聊，全身，粉色连衣裙"
NEG = "丑陋、变形、嘈杂、模糊、低对比度"


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def peak_reset():
    """Start a peak-memory window (a no-op in the CPU smoke run)."""
    if not SMOKE:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak():
    """GiB allocated at the peak since peak_reset (None in the CPU smoke run)."""
    return None if SMOKE else round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)


def timed(fn, reps=1, warmup=0):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out), out


def random_init_(module, std=0.02, seed=0):
    module.to(DEV)
    g = torch.Generator(device=DEV).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, std, generator=g)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def build_text_encoder():
    from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel

    if SMOKE:
        from storyc.models.tiny import _glm_config

        with torch.device(DEV):
            m = ChatGLMModel(_glm_config())
        random_init_(m, seed=1)
        return m.eval()
    cfg = ChatGLMConfig(num_layers=28, hidden_size=4096, ffn_hidden_size=13696, kv_channels=128, num_attention_heads=32,
                        multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=65024, seq_length=32768,
                        original_rope=True, use_cache=True, torch_dtype="float16")
    with torch.device(DEV):
        m = ChatGLMModel(cfg).to(DT)
    random_init_(m, seed=1)
    return m.eval()


def build_unet(seed=2):
    from storyc.models.kolors import KOLORS_UNET
    from storyc.models.tiny import TINY_UNET
    from storyc.models.unet import ConfigSDXLUNet

    with torch.device(DEV):
        u = ConfigSDXLUNet(TINY_UNET if SMOKE else KOLORS_UNET).to(DT)
    random_init_(u, seed=seed)
    return u.eval()


def build_vae(which):
    from diffsynth.models.sdxl_vae_decoder import SDXLVAEDecoder
    from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder

    with torch.device(DEV):
        m = (SDXLVAEDecoder() if which == "decoder" else SDXLVAEEncoder())
    random_init_(m, seed=3)
    return m.to(torch.float32).eval()  # ModelManager keeps the SDXL VAE in fp32 (upcast_to_float32)


def make_pipe(text_encoder, unet, vae_decoder=None, vae_encoder=None):
    from diffsynth import ModelManager, SDXLImagePipeline

    mm = ModelManager(torch_dtype=DT, device=DEV)
    for m, n in ((text_encoder, "kolors_text_encoder"), (unet, "sdxl_unet"), (vae_decoder, "sdxl_vae_decoder"),
                 (vae_encoder, "sdxl_vae_encoder")):
        if m is not None:
            mm.model.append(m)
            mm.model_path.append("random")
            mm.model_name.append(n)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return SDXLImagePipeline.from_model_manager(mm)


def random_lora_state(unet, rank=16, seed=5):
    """A LoRA state dict in diffsynth/peft key layout with non-zero A and B (as after training)."""
    from storyc import lora

    from peft import LoraConfig, inject_adapter_in_model

    import copy

    with torch.device("meta"):
        shell = copy.deepcopy(unet).to("meta")
    shell = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=4.0, init_lora_weights="gaussian",
                                               target_modules=["to_q", "to_k", "to_v", "to_out"]), shell)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in shell.state_dict().items():
        if ".lora_" in k:
            state[k] = torch.randn(tuple(v.shape), generator=g) * 0.01
    assert state and sum(1 for _ in lora.pairs(state)) > (10 if SMOKE else 100)
    return state


def gpu_info():
    if SMOKE:
        return {"gpu": "cpu smoke test", "torch": torch.__version__}
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda}


def matmul_tflops(dtype=torch.float16, n=8192):
    if SMOKE:
        return 1.0
    a = torch.randn(n, n, device=DEV, dtype=dtype)
    b = torch.randn(n, n, device=DEV, dtype=dtype)
    t, _ = timed(lambda: a @ b, reps=10, warmup=3)
    return 2 * n ** 3 / t / 1e12


def write(out: Path, name: str, data: dict):
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def out_dir() -> Path:
    return Path(os.environ.get("OUT") or Path(__file__).parent / "out")


def compile_regions(unet, mode: str | None = None) -> int:
    """torch.compile the UNet's repeated blocks (regional compilation), in place: a bench variant.

    The 70 transformer blocks of Kolors share two input shapes and the resnet blocks a dozen; instances of a class
    share one compiled graph per shape, so this compiles ~14 small graphs instead of one 2.6 B-parameter graph.
    Measured (RESULTS.md): a third of the compile time, but training steps barely faster than eager, and ~10% off
    batch-16 generation after a 75 s compile, so storyc's stages do not use it.
    """
    import torch._dynamo
    from diffsynth.models.sd_unet import BasicTransformerBlock, ResnetBlock

    # one cache entry per distinct block shape (SDXL has ~12 resnet shapes, over dynamo's default of 8)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    n = 0
    for m in unet.modules():
        if isinstance(m, (BasicTransformerBlock, ResnetBlock)):
            m.compile(dynamic=False, mode=mode)
            n += 1
    return n


def group_norm_bn(x, groups, weight, bias, eps):
    """storyc.models.unet.group_norm with its scale-and-shift as batch norm's inference kernel (each (image, channel)
    a channel of one image, cuDNN's where PyTorch picks it): an experiment of norm_probe / attn_probe / refine_bench."""
    from storyc.models.unet import group_stats

    n, c = x.shape[:2]
    mean, rstd = group_stats(x, groups, eps)
    k = c // groups
    rm = mean.repeat_interleave(k, dim=1).reshape(-1)
    rv = (rstd.square().reciprocal() - eps).repeat_interleave(k, dim=1).reshape(-1)  # var: batch norm adds eps
    w = None if weight is None else weight.float().repeat(n)
    b = None if bias is None else bias.float().repeat(n)
    return torch.nn.functional.batch_norm(x.reshape(1, n * c, *x.shape[2:]), rm, rv, w, b, False, 0.0, eps).view_as(x)


def unet_norms(unet, how: str):
    """The UNet's GroupNorms as PyTorch's kernel ("pytorch"), as storyc runs them (HalfGroupNorm: storyc's
    group_norm where PyTorch's statistics would starve the card: "storyc"), or storyc's group_norm everywhere with
    batch norm's scale-and-shift ("wide_bn", an experiment): a bench switch."""
    import storyc.models.unet as su

    if not hasattr(su, "_bench_group_norm"):
        su._bench_group_norm = su.group_norm
    su.group_norm = group_norm_bn if how == "wide_bn" else su._bench_group_norm
    su.HalfGroupNorm.wide = how != "pytorch"
    su.swap_classes(unet, ((su.HalfGroupNorm, su.WideGroupNorm),), how == "wide_bn")
