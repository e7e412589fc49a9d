"""Keep third-party chatter (diffsynth prints, Lightning tips, deprecation warnings) out of storyc's output."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "transformers",
                 "diffusers", "modelscope", "bitsandbytes"):  # bitsandbytes: a CPU-kernel notice peft's import triggers
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@contextlib.contextmanager
def silent_stdout():
    """diffsynth prints on every model load and fetch; swallow it."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
