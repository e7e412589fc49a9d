import torch
from safetensors.torch import load_file
from pathlib import Path
import glob
for f in glob.glob(".storyc/models/tiny-kolors/text_encoder/*.safetensors"):
    d = load_file(f)
    bad = {k: (bool(v.float().isnan().any()), float(v.float().nan_to_num().abs().max())) for k, v in d.items() if not torch.isfinite(v.float()).all() or v.float().abs().max() > 100}
    print("weights file", f, len(d), "bad:", bad)
from storyc.models.tiny import _glm_config
from diffsynth.models.kolors_text_encoder import ChatGLMModel, RMSNorm
torch.manual_seed(0)
m = ChatGLMModel(_glm_config())
print("fresh model bad params:", [(n, float(p.float().nan_to_num().abs().max())) for n, p in m.named_parameters() if not torch.isfinite(p).all() or p.abs().max() > 100])
print("buffers:", [(n, b.dtype, bool(torch.isfinite(b.float()).all())) for n, b in m.named_buffers()])
from diffsynth.prompters import KolorsPrompter
from storyc.models.kolors import load_pipeline
p = load_pipeline(Path(".storyc/models/tiny-kolors"), torch.float32, "cpu", decoder=False)
te = p.prompter.text_encoder
print("loaded bad params:", [(n, float(p_.float().nan_to_num().abs().max())) for n, p_ in te.named_parameters() if not torch.isfinite(p_).all() or p_.abs().max() > 100])
print("loaded buffers:", [(n, b.dtype, bool(torch.isfinite(b.float()).all()), float(b.float().nan_to_num().abs().max())) for n, b in te.named_buffers()])
hooks = []
def mk(name):
    def h(mod, i, o):
        t = o[0] if isinstance(o, tuple) else o
        if torch.is_tensor(t) and not torch.isfinite(t).all():
            print("first non-finite at", name); [x.remove() for x in hooks]; 
    return h
for n, mod in te.named_modules():
    hooks.append(mod.register_forward_hook(mk(n)))
e = p.encode_prompt("二次元，日系动漫", positive=True)
print("text nan", bool(e["encoder_hidden_states"].isnan().any()))
