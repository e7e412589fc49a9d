"""Keep third-party chatter (diffsynth prints, Lightning tips, deprecation warnings) out of storyc's output."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # storyc runs transformers on PyTorch only: where TensorFlow or Flax is installed, transformers would import it
    # too (jax: 2.0 s of a new process's imports on the GPU host, bench/RESULTS.md); read when transformers loads
    os.environ.setdefault("USE_TF", "0")
    os.environ.setdefault("USE_FLAX", "0")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "transformers",
                 "diffusers", "modelscope", "bitsandbytes"):  # bitsandbytes: a CPU-kernel notice peft's import triggers
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


_local = threading.local()
_lock = threading.Lock()
_gate = None  # sys.stdout while any thread is silent


class _Gate(io.TextIOBase):
    """sys.stdout while some thread is silent: drops the silent threads' writes and passes every other thread's on
    to the stdout it stands in for (a model loading on a worker thread must not swallow the build's own lines)."""

    def __init__(self, real):
        super().__init__()
        self.real = real
        self.users = 0  # threads inside silent_stdout

    def write(self, s):
        return len(s) if getattr(_local, "depth", 0) else self.real.write(s)

    def flush(self):
        self.real.flush()

    def __getattr__(self, name):
        return getattr(self.real, name)


@contextlib.contextmanager
def silent_stdout():
    """diffsynth prints on every model load and fetch; swallow it, in this thread only (contextlib.redirect_stdout
    swaps the process's stdout, and two threads undoing their swaps out of order would leave one in place)."""
    global _gate
    with _lock:
        if _gate is None:
            _gate = sys.stdout = _Gate(sys.stdout)
        _gate.users += 1
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        with _lock:
            _gate.users -= 1
            if not _gate.users:
                if sys.stdout is _gate:
                    sys.stdout = _gate.real
                _gate = None
