"""Count Kolors prompt tokens with the ChatGLM sentencepiece model that ships inside diffsynth.

The model file is found with ``importlib.util.find_spec`` (which does not import diffsynth) and read with
``sentencepiece`` directly, so validation stays light.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

LIMIT = 256  # KolorsPrompter pads/truncates to 256 tokens
SPECIAL = 2  # ChatGLM3 prepends [gMASK] and sop to every prompt


def tokenizer_model() -> Path | None:
    spec = importlib.util.find_spec("diffsynth")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        p = Path(base) / "tokenizer_configs" / "kolors" / "tokenizer" / "tokenizer.model"
        if p.is_file():
            return p
    return None


def why_unavailable() -> str:
    if importlib.util.find_spec("sentencepiece") is None:
        return "the sentencepiece package is not installed"
    if importlib.util.find_spec("diffsynth") is None:
        return "diffsynth is not installed (its Kolors ChatGLM tokenizer counts the tokens)"
    return "diffsynth has no Kolors tokenizer at tokenizer_configs/kolors/tokenizer/tokenizer.model"


@lru_cache(maxsize=1)
def counter():
    """A function text -> token count as Kolors sees it, or None when the tokenizer is unavailable."""
    model = tokenizer_model()
    if model is None or importlib.util.find_spec("sentencepiece") is None:
        return None
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    return lambda text: len(sp.encode(text)) + SPECIAL
