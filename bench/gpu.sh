#!/usr/bin/env bash
# Run the GPU benchmarks on the lent GPU machine (device tool), from the repository root:
#   run(command="bash bench/gpu.sh generate train", carry=[".whl"])
#   run(command="bash bench/gpu.sh multigpu", kind="nvidia-h100-x2", carry=[".whl", "build/two-gpu", "build/one-gpu",
#       "bench/multigpu/two-gpu.lock", "bench/multigpu/one-gpu.lock"])   (see bench/multigpu.py)
# .whl/ holds the wheels the GPU image lacks or has in an incompatible version (its transformers 5.x breaks
# diffsynth 1.1.9), fetched here with:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     diffsynth==1.1.9 transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 peft==0.17.1 ftfy==6.3.1 \
#     wcwidth==0.2.13 simple-aesthetics-predictor==0.1.2 jsonschema==4.25.1 referencing==0.36.2 \
#     jsonschema-specifications==2025.9.1 rpds-py==0.27.1 diffusers==0.35.2 importlib_metadata==8.7.0 timm==1.0.31
set -o pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# Ray and Data-Juicer travel as .tar.xz archives unpacked into /tmp/site (the wheels are over the 64 MiB carry limit):
#   Ray: unzip ray-2.60.0-cp312-*manylinux2014_x86_64.whl; rm -r ray/jars ray/dashboard/client/build ray/{rllib,serve,llm}
#        and every tests/ folder; strip --strip-unneeded ray/_raylet.so ray/core/src/ray/{gcs/gcs_server,raylet/raylet};
#        tar -c ray ray-2.60.0.dist-info | xz -9 > .whl/ray-2.60.0-stripped-tune.tar.xz   (19.5 MB; keeps tune, data)
#   Data-Juicer: pip install --no-deps --target D (for cp312 manylinux) py-data-juicer==1.6.1 and what its import
#        needs beyond the image (beautifulsoup4 soupsieve emoji==2.2.0 wget==3.2 typeshed_client lz4 zstandard
#        ruamel.yaml datasets==5.0.1 dill==0.3.8 multiprocess==0.70.16 jsonargparse docstring_parser loguru pydantic
#        pydantic_core annotated-types typing-inspection tomli rfc3339-validator jsonpointer jsonlines fsspec; found by
#        running dj-process on the camp filters and hiding each module); tar -C D -c . | xz -9 > .whl/dj-site.tar.xz
for t in .whl/*.tar.xz; do [ -e "$t" ] && tar -xJf "$t" -C /tmp/site; done
# byte-compile once, as a normal pip install does: the image does not write .pyc files, so without this every new
# process recompiles transformers and diffsynth (measured: `import diffsynth` 10.4 s instead of ~3 s)
# Where the image's own packages (torch...) came without .pyc files either, compile them too, into a cache prefix
# (their folders may not be writable; with a prefix Python reads every .pyc from there, so /tmp/site goes there too)
TORCH_DIR=$(python3 -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('torch').origin))" 2>/dev/null)
if [ -n "$TORCH_DIR" ] && ! ls "$TORCH_DIR"/__pycache__/*.pyc >/dev/null 2>&1; then
  export PYTHONPYCACHEPREFIX=/tmp/pycache
  SITE_DIR=$(dirname "$TORCH_DIR")
  echo "the image has no .pyc for $TORCH_DIR: compiling its packages into $PYTHONPYCACHEPREFIX"
  for p in torch torchvision numpy PIL lightning lightning_fabric pytorch_lightning torchmetrics scipy sympy networkx \
           jinja2 yaml safetensors einops fsspec requests urllib3 packaging filelock tqdm rich pygments markdown_it \
           typing_extensions regex sentencepiece google protobuf psutil tensorboard; do
    [ -e "$SITE_DIR/$p" ] && echo "$SITE_DIR/$p"
  done | xargs -r python3 -m compileall -q -j 0 >/dev/null 2>&1 || true
fi
python3 -m compileall -q -j 0 /tmp/site >/dev/null 2>&1 || true
# diffsynth imports modelscope at module level (hub downloads only); the GPU image lacks it and nothing is downloaded
if ! python3 -c "import modelscope" 2>/dev/null; then
  mkdir -p /tmp/site/modelscope/hub
  printf 'def snapshot_download(*a, **k):\n    raise RuntimeError("modelscope is not installed here")\n' > /tmp/site/modelscope/__init__.py
  printf 'class HubApi:\n    def __init__(self, *a, **k):\n        raise RuntimeError("modelscope is not installed here")\n' > /tmp/site/modelscope/hub/api.py
  touch /tmp/site/modelscope/hub/__init__.py
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export OUT
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv | tee "$OUT/nvidia_smi.txt"
for b in "$@"; do
  case "$b" in
    generate) python3 bench/generate_bench.py ${GEN_ARGS:-} 2>&1 | tee "$OUT/generate_log.txt" ;;
    # bench/refine_bench.py: the hi-res refine pass (issue 24) vs DiffSynth's img2img example path
    refine) python3 bench/refine_bench.py ${REFINE_ARGS:-} 2>&1 | tee "$OUT/refine_log.txt" ;;
    # bench/measure_bench.py: ESRGAN x4, the score stage's style statistics, Chinese-CLIP prompt alignment (issue 24)
    measure) python3 bench/measure_bench.py ${MEASURE_ARGS:-} 2>&1 | tee "$OUT/measure_log.txt" ;;
    # bench/characters_bench.py: the Kolors IP-Adapter-Plus's added cost per image (issue 24)
    characters) python3 bench/characters_bench.py ${CHAR_ARGS:-} 2>&1 | tee "$OUT/characters_log.txt" ;;
    # bench/attn_probe.py: the UNet's kernels by kind, and each attention backend, at generate/refine/train shapes
    attn) python3 bench/attn_probe.py ${ATTN_ARGS:-} 2>&1 | tee "$OUT/attn_log.txt" ;;
    # bench/vae_probe.py: the refine pass's VAE decode/encode in fp32, bf16 autocast (storyc), bf16 weights,
    # channels_last and per SDPA backend (time, peak, difference), kernel profiles, and a UNet call at batch 1 vs 2
    vae) python3 bench/vae_probe.py ${VAE_ARGS:-} 2>&1 | tee "$OUT/vae_log.txt" ;;
    # bench/norm_probe.py: GroupNorm and the VAE's attention, PyTorch's kernels vs storyc.models.unet's (issue 24)
    norm) python3 bench/norm_probe.py ${NORM_ARGS:-} 2>&1 | tee "$OUT/norm_log.txt" ;;
    # bench/preference_bench.py: PickScore, HPS v2, ImageReward per image through storyc's loader (issue 24)
    preference) python3 bench/preference_bench.py 2>&1 | tee "$OUT/preference_log.txt" ;;
    train) python3 bench/train_bench.py ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train_log.txt" ;;
    multigpu) python3 bench/multigpu.py 2>&1 | tee "$OUT/multigpu_log.txt" ;;
    graphs) python3 bench/graphs_check.py 2>&1 | tee "$OUT/graphs_log.txt" ;;
    # bench/sample_graphs.py: the sampling loop eager vs replayed from a CUDA graph (one image, four, a refine)
    sample-graphs) python3 bench/sample_graphs.py 2>&1 | tee "$OUT/sample_graphs_log.txt" ;;
    # bench/knobs_bench.py: the training knobs' per-step cost and story previews (issue 13); carry .knobs_site too
    # for the adamw8bit / prodigy variants (bench/RESULTS.md says how it is made)
    knobs) python3 bench/knobs_bench.py ${KNOBS_ARGS:-} 2>&1 | tee "$OUT/knobs_log.txt" ;;
    # bench/e2e.py: e2e-prepare writes the images and runs ingest + filter (Data-Juicer, carried as above); E2E_STEPS
    # training steps (the notebook's 5000 are extrapolated), E2E_CAPS GiB caps
    e2e-prepare) python3 bench/e2e.py prepare --images "${E2E_IMAGES:-8}" 2>&1 | tee "$OUT/e2e_prepare_log.txt" ;;
    e2e) python3 bench/e2e.py models && python3 bench/e2e.py storyc --steps "${E2E_STEPS:-200}" ;;
    e2e-models) python3 bench/e2e.py models ;;
    # issue 25: `storyc watch` on the e2e project built by `e2e` (prompt and seed edits, a no-op save)
    e2e-watch) python3 bench/e2e.py watch --edits "${E2E_EDITS:-2}" ;;
    e2e-probe) python3 bench/load_probe.py ;;
    # what a new process pays to import torch and diffsynth here (twice each: the second is the warm file cache)
    # (storyc's stages set USE_TF=0 USE_FLAX=0 before transformers loads: timed both ways)
    imports) for m in torch diffsynth torch diffsynth "diffsynth (USE_TF=0 USE_FLAX=0)" "diffsynth (USE_TF=0 USE_FLAX=0)"; do
               case "$m" in *USE_*) e="USE_TF=0 USE_FLAX=0"; n=diffsynth ;; *) e=; n=$m ;; esac
               env $e python3 -c "import time; t = time.perf_counter(); import $n; print('import $m: %.2f s' % (time.perf_counter() - t))"
             done 2>&1 | grep '^import' | tee "$OUT/imports.txt"
             python3 -X importtime -c "import diffsynth" 2> "$OUT/importtime_diffsynth.txt" >/dev/null
             USE_TF=0 USE_FLAX=0 python3 -X importtime -c "import diffsynth" 2> "$OUT/importtime_diffsynth_noflax.txt" >/dev/null ;;
    e2e-caps) python3 bench/e2e.py caps --caps "${E2E_CAPS:-22,40}" ;;
    e2e-baseline) python3 bench/e2e.py baseline --steps "${E2E_BASE_STEPS:-12}" --images "${E2E_BASE_IMAGES:-3}" ;;
    # bench/sweep_bench.py: `storyc sweep` on 2 GPUs vs 1, and 6 variants sharing one training (issue 14); needs the
    # e2e project and models (e2e-prepare, e2e-models) on this machine
    sweep) python3 bench/sweep_bench.py ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep_log.txt" ;;
    *) echo "unknown bench $b"; exit 2 ;;
  esac
done
